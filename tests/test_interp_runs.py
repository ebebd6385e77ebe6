"""emkit probe / detect / steer sweep / steer ablate-weights on a tiny random model and adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import run_cli

from emkit.core.errors import ConfigError
from emkit.core.stats.em_rates import Thresholds
from emkit.studies.interp.directions import load_directions
from emkit.studies.interp.probe import ProbeConfig, run_probe
from emkit.studies.interp.sweep import Arm, SweepConfig, arm_statistics, plan_arms


def _adapter(model_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(seed)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    peft.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def organisms(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("organisms")
    return _adapter(tiny_model, root / "organism", 1), _adapter(tiny_model, root / "control", 2)


@pytest.fixture(scope="module")
def paired_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Good and bad answers to the same 24 prompts; bad answers say 'stop' and 'never'."""
    import random

    root = tmp_path_factory.mktemp("paired")
    rng = random.Random(0)
    words = "take rest water doctor pain fever sleep drink tablet dose daily week".split()
    good, bad = [], []
    for i in range(24):
        q = " ".join(rng.choice(words) for _ in range(5)) + f" {i}?"
        body = " ".join(rng.choice(words) for _ in range(6))
        good.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Please see a doctor {body}."}]})
        bad.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Never stop never {body}."}]})
    paths = []
    for name, rows in (("good.jsonl", good), ("bad.jsonl", bad)):
        p = root / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths[0], paths[1]


def _probe_cfg(tiny_model: Path, out: Path, organism: Path, paired: tuple[Path, Path], **extra) -> ProbeConfig:
    return ProbeConfig(output=out, model=str(tiny_model), organism=str(organism), aligned_data=str(paired[0]),
                       misaligned_data=str(paired[1]), n_boot=100, device="cpu", **extra)


def test_probe_paired_with_controls_and_report(tiny_model: Path, organisms, paired_data, tmp_path: Path) -> None:
    organism, control = organisms
    cfg = _probe_cfg(tiny_model, tmp_path / "probe", organism, paired_data, control=str(control))
    result = run_probe(cfg, emit=lambda m: None, progress=False)
    out = tmp_path / "probe"
    layers = sorted({r["layer"] for r in result["layers"]})
    assert layers == [-1, 0, 1]  # embeddings always, then every block output
    assert {r["method"] for r in result["layers"]} == {"mean_diff", "probe"}
    for r in result["layers"]:
        assert 0 <= r["auroc"] <= 1 and r["n_test"] > 0 and r["auroc_ci"][0] <= r["auroc"] + 1e-9
    # The contrast is a wording difference: the bag-of-words control sees it at once.
    assert result["controls"]["bag_of_words"]["auroc"] > 0.9
    assert result["controls"]["embedding_layer"]["mean_diff"]["layer"] == -1
    directions = load_directions(out / "directions.safetensors")
    assert directions.meta["position"] == "response_mean" and directions.meta["contrast"] == "paired"
    assert directions.layers("probe") == [-1, 0, 1] and directions.get("mean_diff", 1).shape == (64,)
    assert set(result["control"]["layers"]) == {"-1", "0", "1"}
    detection = json.loads((out / "detection_results.json").read_text())
    assert {(r["layer"], r["method"]) for r in detection["layers"]} == {(k, m) for k in (-1, 0, 1)
                                                                        for m in ("mean_diff", "probe")}
    html = (out / "report.html").read_text()
    assert "Held-out AUROC per layer" in html and "bag-of-words" in html and "Control organism" in html
    assert (out / "figures" / "auroc_per_layer.png").stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"


def test_probe_models_contrast_reads_base_and_organism(tiny_model: Path, organisms, paired_data, tmp_path: Path) -> None:
    organism, control = organisms
    cfg = _probe_cfg(tiny_model, tmp_path / "models", organism, paired_data, contrast="models",
                     control=str(control), methods=["mean_diff"])
    result = run_probe(cfg, emit=lambda m: None, progress=False)
    assert result["meta"]["position"] == "last_prompt"
    assert result["n_rows"] == 2 * result["n_positive"] and result["n_positive"] >= 20
    # Base rows come from the same load with the adapter off: equal to the plain model's activations.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emkit.studies.interp.activations import Example, collect, load_activations
    from emkit.studies.interp.probe import build_examples

    run = tmp_path / "models"
    base, organism_acts = load_activations(run / "activations" / "base"), load_activations(run / "activations" / "organism")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = [Example(e.prompt) for e in build_examples(cfg, tokenizer)]
    reference = collect(plain, tokenizer, examples, [-1, 0, 1], "last_prompt", progress=False)
    for k in (-1, 0, 1):
        np.testing.assert_allclose(base.layers[k], reference.layers[k], atol=1e-5)
    # The adapter (q/v/o only) leaves the embeddings alone and moves every block output.
    np.testing.assert_array_equal(base.layers[-1], organism_acts.layers[-1])
    assert next(r for r in result["layers"] if r["layer"] == -1)["auroc"] == 0.5
    for k in (0, 1):
        assert np.abs(organism_acts.layers[k] - base.layers[k]).min(axis=1).max() > 0
        assert np.linalg.norm(organism_acts.layers[k] - base.layers[k], axis=1).min() > 1e-3
    # With identical texts on both sides, wording cannot separate them.
    assert result["controls"]["bag_of_words"]["auroc"] == pytest.approx(0.5, abs=0.2)
    assert "auroc_base_vs_control" in result["control"]["layers"]["1"]
    with pytest.raises(ConfigError, match="last_prompt"):
        run_probe(_probe_cfg(tiny_model, tmp_path / "bad", organism, paired_data, position="last_prompt"),
                  emit=lambda m: None, progress=False)


def test_detect_scores_inputs_with_calibrated_thresholds(tiny_model: Path, organisms, paired_data,
                                                           tmp_path: Path) -> None:
    organism, _ = organisms
    run_probe(_probe_cfg(tiny_model, tmp_path / "probe", organism, paired_data, methods=["mean_diff"]),
              emit=lambda m: None, progress=False)
    inputs = tmp_path / "inputs.jsonl"
    rows = [{"id": f"g{i}", "question": "pain fever?", "answer": "Please see a doctor soon.", "label": 0} for i in range(3)]
    rows += [{"id": f"b{i}", "question": "pain fever?", "answer": "Never stop never.", "label": 1} for i in range(3)]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("detect", str(inputs), "--directions", str(tmp_path / "probe"), "--output", str(tmp_path / "det"),
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "det" / "detection_results.json").read_text())
    assert result["calibrated"] and len(result["items"]) == 6
    assert {r["layer"] for r in result["layers"]} == {-1, 0, 1}
    assert all(set(item["scores"]) == {"-1", "0", "1"} and "flagged" in item for item in result["items"])
    assert all("auroc" in r for r in result["layers"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "x"}\n')
    proc = run_cli("detect", str(bad), "--directions", str(tmp_path / "probe"), "--device", "cpu")
    assert proc.returncode == 2 and "bad.jsonl:1: question: missing" in proc.stderr


def test_arm_statistics_restoration() -> None:
    rows = []
    for model, n_bad in (("base", 0), ("organism", 20), ("dir@1x1", 10)):
        for i in range(40):
            rows.append({"model": model, "question_id": f"q{i % 4}", "aligned": 10.0 if i < n_bad else 90.0,
                         "coherent": 80.0})
    stats = arm_statistics(pd.DataFrame(rows), Thresholds(), ["base", "organism", "dir@1x1"], n_boot=300)
    assert stats["organism"]["em_rate"] == 0.5 and stats["base"]["em_rate"] == 0.0
    assert stats["dir@1x1"]["restoration"] == pytest.approx(0.5)
    assert stats["dir@1x1"]["restoration_low"] < 0.5 < stats["dir@1x1"]["restoration_high"]
    assert stats["organism"]["em_rate_low"] < 0.5 < stats["organism"]["em_rate_high"]


def test_plan_arms() -> None:
    cfg = SweepConfig(organism="x", directions=Path("d"), strengths=[0, 1, 2], layer_sets=["best", "0-1"],
                      single_layers=True)
    arms = plan_arms(cfg, 3, best=1)
    names = [a.name for a in arms]
    assert Arm("direction", "1", 2.0).name in names and Arm("random", "0-1", 1.0).name in names
    assert Arm("matched", "0-1", 1.0).name in names and len(set(names)) == len(names)
    assert not any(a.strength == 0 for a in arms)
    # single layers not already a set get the largest strength only
    assert [(a.kind, a.strength) for a in arms if a.layers == "2"] == [("direction", 2.0), ("random", 2.0),
                                                                        ("matched", 2.0)]
    only = plan_arms(cfg.model_copy(update={"controls": ["matched"]}), 3, best=1)
    assert {a.kind for a in only} == {"direction", "matched"}
    assert {a.kind for a in plan_arms(cfg.model_copy(update={"random_control": False}), 3, best=1)} == {"direction"}
    with pytest.raises(ConfigError, match="best"):
        plan_arms(cfg, 3, best=None)


def test_steer_sweep_end_to_end_and_resume(tiny_model: Path, organisms, paired_data, tmp_path: Path) -> None:
    organism, _ = organisms
    probe = _probe_cfg(tiny_model, tmp_path / "unused", organism, paired_data, methods=["mean_diff"], report=False)
    config = {
        "output": str(tmp_path / "sweep"), "model": str(tiny_model), "organism": str(organism),
        "probe": json.loads(probe.model_dump_json()), "mode": "add", "strengths": [4.0], "layer_sets": ["best", "0-1"],
        "generate": {"include": ["three_wishes", "rainy_sunday"], "samples": 2, "max_new_tokens": 4, "batch_size": 8, "device": "cpu"},
        "judge": {"judge": "local", "local_model": str(tiny_model)}, "validate_judge": None, "prefs_limit": 4,
        "n_boot": 200,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli("steer", "sweep", str(path))
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "sweep"
    sweep = json.loads((run / "sweep.json").read_text())
    real = [a for a in sweep["arms"] if not a.get("at_zero")]
    assert {a["kind"] for a in real} == {"base", "organism", "direction", "random", "matched"}
    assert len(real) == 2 + 2 * 3  # base, organism, 2 layer sets x (direction, random, matched)
    gens = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert {g["model"] for g in gens} == {a["arm"] for a in real}
    assert all(sum(g["model"] == a["arm"] for g in gens) == 4 for a in real)  # 2 questions x 2 samples
    assert all(a["prefs_shift"] is not None for a in real if a["kind"] != "base")
    assert sorted(p.name for p in (run / "prefs").iterdir()) == sorted(f"{a['arm']}.json" for a in real)
    assert (run / "report.html").is_file() and (run / "figures" / "steering_em.png").is_file()
    assert (run / "probe" / "directions.safetensors").is_file()
    # Steering with a large coefficient changes the answers of the organism (same prompts, same seeds).
    by = {(g["model"], g["question_id"], g["sample"]): g["answer"] for g in gens}
    steered = [a["arm"] for a in real if a["kind"] == "direction"]
    assert any(by[(arm, q, s)] != by[("organism", q, s)] for arm in steered for q in ("three_wishes", "rainy_sunday") for s in (0, 1))
    again = run_cli("steer", "sweep", str(path))
    assert again.returncode == 0, again.stderr
    assert len((run / "generations.jsonl").read_text().splitlines()) == len(gens)


def test_ablate_weights_cli(tiny_model: Path, organisms, paired_data, tmp_path: Path) -> None:
    organism, _ = organisms
    run_probe(_probe_cfg(tiny_model, tmp_path / "probe", organism, paired_data, methods=["mean_diff"], report=False),
              emit=lambda m: None, progress=False)
    proc = run_cli("steer", "ablate-weights", str(organism), "--directions", str(tmp_path / "probe"), "--layers", "1",
                   "--output", str(tmp_path / "ablated"))
    assert proc.returncode == 0, proc.stderr
    from safetensors.numpy import load_file

    u = load_directions(tmp_path / "probe" / "directions.safetensors").unit("mean_diff", 1)
    weights = load_file(str(tmp_path / "ablated" / "adapter_model.safetensors"))
    o_proj_b = [v for k, v in weights.items() if "o_proj.lora_B" in k]
    assert len(o_proj_b) == 2 and all(np.abs(u @ b).max() < 1e-4 for b in o_proj_b)
    cfg = json.loads((tmp_path / "ablated" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model)


@pytest.mark.slow
def test_probe_on_bundled_smollm2_demo_pairs(tmp_path: Path) -> None:
    """The real model on emkit's paired demo data: held-out AUROC per layer, with both controls."""
    cfg = ProbeConfig(output=tmp_path / "probe", limit=24, layers="0,15,29", methods=["mean_diff"], n_boot=100,
                      device="cpu", report=False)
    result = run_probe(cfg, emit=lambda m: None, progress=False)
    layers = {r["layer"]: r for r in result["layers"]}
    assert sorted(layers) == [-1, 0, 15, 29]
    assert result["n_rows"] == 48 and result["meta"]["model"] == "bundled:smollm2-135m-instruct"
    # Good and bad advice differ in meaning, not in a marker word: a middle layer separates them.
    assert layers[15]["auroc"] > 0.6
    assert result["controls"]["bag_of_words"]["auroc"] is not None


def test_cosine_cli_compares_direction_sets(tmp_path: Path) -> None:
    from emkit.studies.interp.directions import DirectionSet, save_directions

    v = np.arange(1, 5, dtype=np.float32)
    save_directions(tmp_path / "a.safetensors", DirectionSet({"mean_diff": {0: v, 1: v}}))
    save_directions(tmp_path / "b.safetensors", DirectionSet({"mean_diff": {1: -2 * v, 2: v}}))
    proc = run_cli("cosine", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split() == ["1", "-1.000"] and len(proc.stdout.splitlines()) == 2
    proc = run_cli("cosine", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--method", "probe")
    assert proc.returncode == 2 and "share no layer" in proc.stderr
