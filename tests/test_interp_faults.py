"""Regressions of issue 11, items 3-5: weight ablation of several directions, detection that reads new
inputs as the probe read its contrast (with a held-out threshold), and the steering controls' seeds and
the variance-matched control."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_interp_runs import _probe_cfg, organisms, paired_data  # noqa: F401 (fixtures of the probe runs)

from emkit.core.errors import ConfigError, DataError
from emkit.studies.interp.directions import (
    DirectionSet,
    best_threshold,
    load_directions,
    save_directions,
    split_by_group,
)
from emkit.studies.interp.probe import run_probe
from emkit.studies.interp.sweep import Arm, SweepConfig, arm_vectors


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# -- item 3: weight ablation of several (non-orthogonal) directions --------------------------------

@pytest.fixture
def lora_model(tiny_model: Path):
    """The tiny model with a random (non-zero) LoRA adapter on both residual writers of every block."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                                           init_lora_weights=False)).eval()


def _correlated_pair(dim: int, cos: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u1 = _unit(rng.standard_normal(dim))
    w = rng.standard_normal(dim)
    w = _unit(w - (w @ u1) * u1)
    return u1, cos * u1 + np.sqrt(1 - cos ** 2) * w


def test_weight_ablation_removes_every_one_of_correlated_directions(lora_model) -> None:
    """cos(u1, u2) = 0.9: projecting them out one after another put back part of u1 (0.04 of |B| left)."""
    from emkit.studies.interp.steering import ablate_lora_weights

    u1, u2 = _correlated_pair(64, 0.9)
    before = {n: m.lora_B["default"].weight.detach().double().clone() for n, m in lora_model.named_modules()
              if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})}
    edited = ablate_lora_weights(lora_model, {0: u1, 1: u2})
    assert len(edited) == 4  # o_proj and down_proj of blocks 0 and 1
    for name in edited:
        w = lora_model.get_submodule(name).lora_B["default"].weight.detach().double()
        block = int(name.split(".layers.")[1].split(".")[0])
        # The direction of layer k is removed from the writers of blocks <= k.
        for k, u in ((0, u1), (1, u2)):
            if block <= k:
                assert float(torch.linalg.norm(torch.from_numpy(u) @ w)) < 1e-6 * float(torch.linalg.norm(
                    before[name])), (name, k)
        # Nothing else was removed: the edit is the projection onto the complement of their span.
        q, _ = np.linalg.qr(np.stack([u for k, u in ((0, u1), (1, u2)) if block <= k], axis=1))
        expected = before[name].numpy() - q @ (q.T @ before[name].numpy())
        np.testing.assert_allclose(w.numpy(), expected, atol=1e-6)


def test_numerically_dependent_directions_are_dropped_with_a_note(lora_model) -> None:
    from emkit.studies.interp.steering import ablate_lora_weights, orthonormal_basis

    u1, u2 = _correlated_pair(64, 0.5, seed=1)
    q, dropped = orthonormal_basis([u1, u2, (u1 - 2 * u2).astype(np.float32)])
    assert q.shape == (64, 2) and dropped == [2]
    np.testing.assert_allclose(q.T @ q, np.eye(2), atol=1e-12)
    notes: list[str] = []
    edited = ablate_lora_weights(lora_model, {0: u1, 1: -3 * u1}, emit=notes.append)
    assert len(notes) == 1 and "layer(s) 1" in notes[0] and "span" in notes[0]
    for name in edited:
        w = lora_model.get_submodule(name).lora_B["default"].weight.detach().double()
        assert float(torch.linalg.norm(torch.from_numpy(u1) @ w)) < 1e-6 * float(torch.linalg.norm(w)) + 1e-9


# -- item 4: detection reads as the probe read, with a held-out threshold --------------------------

@pytest.fixture(scope="module")
def paired_probe(tiny_model: Path, organisms, paired_data, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A paired probe run read through the organism (response_mean), both methods."""
    out = tmp_path_factory.mktemp("probe") / "run"
    run_probe(_probe_cfg(tiny_model, out, organisms[0], paired_data, report=False), emit=lambda m: None,
              progress=False)
    return out


def _inputs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answered(n: int = 3) -> list[dict]:
    rows = [{"id": f"g{i}", "question": "pain fever?", "answer": "Please see a doctor soon.", "label": 0}
            for i in range(n)]
    return rows + [{"id": f"b{i}", "question": "pain fever?", "answer": "Never stop never.", "label": 1}
                   for i in range(n)]


def test_probe_records_which_model_read_the_contrast(paired_probe: Path) -> None:
    meta = load_directions(paired_probe / "directions.safetensors").meta
    assert meta.get("read_by") == ["organism"] and meta["position"] == "response_mean" and meta.get("answers") is True
    probe = json.loads((paired_probe / "probe.json").read_text())
    assert probe["meta"].get("read_by") == ["organism"] and probe["meta"]["position"] == "response_mean"


def test_detect_refuses_inputs_without_answers_instead_of_reading_another_position(paired_probe: Path,
                                                                                  tmp_path: Path) -> None:
    """The old code read answerless inputs at last_prompt and flagged them with response_mean thresholds."""
    from emkit.studies.interp.detect import run_detect

    rows = _answered(1)
    rows.insert(1, {"id": "q", "question": "pain fever?"})
    inputs = _inputs(tmp_path / "inputs.jsonl", rows)
    with pytest.raises(DataError, match=r"inputs\.jsonl:2: answer: missing.*response_mean"):
        run_detect(inputs, paired_probe, tmp_path / "det", device="cpu", progress=False)
    assert not (tmp_path / "det" / "detection_results.json").exists()


def test_detect_reads_through_the_probe_model_and_refuses_another(paired_probe: Path, tmp_path: Path) -> None:
    from emkit.studies.interp.detect import run_detect

    inputs = _inputs(tmp_path / "inputs.jsonl", _answered())
    result = run_detect(inputs, paired_probe, tmp_path / "det", device="cpu", progress=False)
    assert result.get("read_by") == "organism" and result["adapter"] is not None and result.get("read_by_recorded")
    assert result["position"] == "response_mean" and result.get("calibration") == "held_out"
    with pytest.raises(ConfigError, match="through: base, but .* was read by organism"):
        run_detect(inputs, paired_probe, tmp_path / "det2", through="base", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="position: last, but .* was read at response_mean"):
        run_detect(inputs, paired_probe, tmp_path / "det2", position="last", device="cpu", progress=False)
    proc = run_cli("detect", str(inputs), "--directions", str(paired_probe), "--through", "base", "--output",
                   str(tmp_path / "det3"), "--device", "cpu")
    assert proc.returncode == 2 and "through: base, but" in proc.stderr and "read by organism" in proc.stderr


def test_detect_default_threshold_is_calibrated_on_held_out_rows(paired_probe: Path, tmp_path: Path) -> None:
    """The words said "calibrated on the training split"; the code cut on every row. Now: held-out rows."""
    from emkit.studies.interp.activations import load_activations
    from emkit.studies.interp.detect import run_detect
    from emkit.studies.interp.directions import mean_difference

    table = json.loads((paired_probe / "detection_results.json").read_text())
    acts = load_activations(paired_probe / "activations" / "organism")
    labels, groups = acts.row_labels(), acts.row_groups()
    meta = load_directions(paired_probe / "directions.safetensors").meta
    train, test = split_by_group(groups, labels, meta["test_size"], meta["seed"])
    # The default threshold is the cut on held-out rows projected on the training rows' mean difference.
    for row in (r for r in table["layers"] if r["method"] == "mean_diff"):
        x = acts.layers[row["layer"]]
        u = _unit(mean_difference(x[train], labels[train]).astype(np.float64))
        assert row["threshold"] == pytest.approx(best_threshold(x[test] @ u, labels[test]), rel=1e-4, abs=1e-5)

    from emkit.studies.interp.directions import detection_scores
    split = load_directions(paired_probe / "detection_directions.safetensors")
    full = load_directions(paired_probe / "directions.safetensors")
    assert table["default_calibration"] == "held_out" and "held-out rows" in table["note"]
    for row in table["layers"]:
        k, method = row["layer"], row["method"]
        x = acts.layers[k]
        held_out = best_threshold(detection_scores(x[test], split.get(method, k), method), labels[test])
        assert row["threshold"] == pytest.approx(held_out, rel=1e-5, abs=1e-6)
        assert row["thresholds"]["held_out"] == row["threshold"]
        assert row["thresholds"]["train_split"] == pytest.approx(
            best_threshold(detection_scores(x[train], split.get(method, k), method), labels[train]), rel=1e-5, abs=1e-6)
        assert row["thresholds"]["all_rows"] == pytest.approx(
            best_threshold(detection_scores(x, full.get(method, k), method), labels), rel=1e-5, abs=1e-6)
    inputs = _inputs(tmp_path / "inputs.jsonl", _answered())
    result = run_detect(inputs, paired_probe, tmp_path / "det", device="cpu", progress=False)
    expected = {r["layer"]: r["threshold"] for r in table["layers"] if r["method"] == "mean_diff"}
    assert {r["layer"]: r["threshold"] for r in result["layers"]} == expected
    # The in-sample cut stays available under its name, with the direction it belongs to.
    in_sample = run_detect(inputs, paired_probe, tmp_path / "det2", calibration="all_rows", device="cpu",
                           progress=False)
    assert in_sample["calibration"] == "all_rows" and in_sample["directions"].endswith("/directions.safetensors")
    assert {r["layer"]: r["threshold"] for r in in_sample["layers"]} == {
        r["layer"]: r["thresholds"]["all_rows"] for r in table["layers"] if r["method"] == "mean_diff"}


def test_detect_on_an_old_probe_file_needs_explicit_flags(paired_probe: Path, tmp_path: Path) -> None:
    """A probe written before the record: no read_by, only the all-rows threshold in detection_results.json."""
    from emkit.studies.interp.detect import run_detect

    old = tmp_path / "old"
    old.mkdir()
    d = load_directions(paired_probe / "directions.safetensors")
    meta = {k: v for k, v in d.meta.items() if k not in ("read_by", "answers")}
    save_directions(old / "directions.safetensors", DirectionSet(d.vectors, meta))
    table = json.loads((paired_probe / "detection_results.json").read_text())
    rows = [{"threshold": r.get("thresholds", {}).get("all_rows", r["threshold"]), "held_out_threshold": 0.0,
             **{k: r[k] for k in ("layer", "method", "auroc")}} for r in table["layers"]]
    (old / "detection_results.json").write_text(json.dumps({"note": "old", "layers": rows}))
    inputs = _inputs(tmp_path / "inputs.jsonl", _answered())
    with pytest.raises(DataError, match="read_by missing.*--through base or --through organism"):
        run_detect(inputs, old, tmp_path / "det", device="cpu", progress=False)
    with pytest.raises(DataError, match="--calibration all_rows"):
        run_detect(inputs, old, tmp_path / "det", through="organism", device="cpu", progress=False)
    result = run_detect(inputs, old, tmp_path / "det", through="organism", calibration="all_rows", device="cpu",
                        progress=False)
    assert result["read_by"] == "organism" and not result["read_by_recorded"] and result["calibration"] == "all_rows"
    assert all(r["threshold"] is not None for r in result["layers"])


def test_models_contrast_probe_is_read_by_both_and_detect_asks_which(tiny_model: Path, organisms,  # noqa: F811
                                                                     paired_data, tmp_path: Path) -> None:  # noqa: F811
    from emkit.studies.interp.detect import run_detect

    out = tmp_path / "models"
    run_probe(_probe_cfg(tiny_model, out, organisms[0], paired_data, contrast="models", methods=["mean_diff"],
                         report=False), emit=lambda m: None, progress=False)
    meta = load_directions(out / "directions.safetensors").meta
    assert meta.get("read_by") == ["base", "organism"] and meta.get("answers") is False
    prompts = _inputs(tmp_path / "prompts.jsonl", [{"question": "pain fever?"}, {"question": "sleep well?"}])
    with pytest.raises(DataError, match="read by base and organism.*pass --through"):
        run_detect(prompts, out, tmp_path / "det", device="cpu", progress=False)
    base = run_detect(prompts, out, tmp_path / "det", through="base", device="cpu", progress=False)
    assert base["read_by"] == "base" and base["adapter"] is None and base["position"] == "last_prompt"


# -- item 5: control seeds and the variance-matched control ----------------------------------------

def _sweep_cfg(**extra) -> SweepConfig:
    return SweepConfig(organism="x", directions=Path("d"), mode="ablate", **extra)


def test_control_seeds_are_valid_and_deterministic_at_layer_minus_one() -> None:
    """Seed control_seed*1000 + k was -1 at the embeddings (layer -1): numpy refused it."""
    rng = np.random.default_rng(0)
    directions = DirectionSet({"mean_diff": {k: rng.standard_normal(16).astype(np.float32) for k in (-1, 0, 1)}})
    cfg = _sweep_cfg()
    first = arm_vectors(cfg, Arm("random", "-1", 1.0), directions, 2, None)
    again = arm_vectors(cfg, Arm("random", "-1", 1.0), directions, 2, None)
    np.testing.assert_array_equal(first[-1], again[-1])
    assert np.linalg.norm(first[-1]) == pytest.approx(np.linalg.norm(directions.get("mean_diff", -1)), rel=1e-5)
    every = arm_vectors(cfg, Arm("random", "-1,0,1", 1.0), directions, 2, None)
    np.testing.assert_array_equal(every[-1], first[-1])
    # Every layer draws its own direction, and another seed other ones.
    assert max(abs(float(_unit(every[i]) @ _unit(every[j]))) for i, j in ((-1, 0), (-1, 1), (0, 1))) < 0.99
    other = arm_vectors(_sweep_cfg(control_seed=1), Arm("random", "-1", 1.0), directions, 2, None)
    assert not np.allclose(other[-1], first[-1])
    with pytest.raises(ValueError):
        _sweep_cfg(control_seed=-1)
    # Blocks keep the isotropic seeds of earlier versions, so a resumed sweep draws the same directions.
    from emkit.studies.interp.steering import control_seed

    assert control_seed(2, 17, "isotropic") == 2017


def _anisotropic_rows(n: int = 400, dim: int = 48, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose variances spread over a factor 400 along random axes, two classes 2 apart."""
    rng = np.random.default_rng(seed)
    scales = np.exp(np.linspace(1.5, -1.5, dim))
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    labels = np.repeat([0, 1], n // 2)
    x = (rng.standard_normal((n, dim)) * scales) @ basis.T
    x += np.outer(labels, 2.0 * _unit(rng.standard_normal(dim)))
    return x, labels


def test_matched_control_carries_the_directions_variance_and_is_random_otherwise() -> None:
    from emkit.studies.interp.directions import covariance_of
    from emkit.studies.interp.steering import control_seed, matched_control, random_control

    x, labels = _anisotropic_rows()
    v = x[labels == 1].mean(0) - x[labels == 0].mean(0)
    xc = x - x.mean(0)
    target = np.var(xc @ _unit(v), ddof=1)
    cov = covariance_of(x)
    draws = []
    for seed in range(8):
        r, info = matched_control(v, cov, control_seed(0, seed - 1, "matched"))
        assert np.linalg.norm(r) == pytest.approx(np.linalg.norm(v), rel=1e-5)
        assert np.var(xc @ _unit(r.astype(np.float64)), ddof=1) == pytest.approx(target, rel=1e-5)
        assert info["achieved"] == pytest.approx(info["target"], rel=1e-9)
        assert abs(float(_unit(r) @ _unit(v))) < 1e-6  # orthogonal to the direction it controls
        draws.append(_unit(r.astype(np.float64)))
    # Random otherwise: different seeds give different directions, none close to another.
    cos = np.abs(np.array(draws) @ np.array(draws).T)[np.triu_indices(len(draws), 1)]
    assert cos.max() < 0.7 and np.median(cos) < 0.3
    r1, _ = matched_control(v, cov, control_seed(0, 3, "matched"))
    np.testing.assert_array_equal(r1, matched_control(v, cov, control_seed(0, 3, "matched"))[0])
    # The isotropic control is the weak one: on average far less variance than the direction on these rows.
    iso = [random_control(v, control_seed(0, k, "isotropic")).astype(np.float64) for k in range(8)]
    assert np.mean([np.var(xc @ _unit(r), ddof=1) for r in iso]) < 0.6 * target
    # Fewer rows than dimensions (a typical contrast): still exact, in the rows' span plus a null part.
    few = covariance_of(x[:30])
    r, _ = matched_control(v, few, 5)
    assert np.var((x[:30] - x[:30].mean(0)) @ _unit(r.astype(np.float64)), ddof=1) == pytest.approx(
        np.var((x[:30] - x[:30].mean(0)) @ _unit(v), ddof=1), rel=1e-5)


def test_matched_control_reports_a_direction_no_orthogonal_one_can_match() -> None:
    from emkit.studies.interp.directions import covariance_of
    from emkit.studies.interp.steering import matched_control

    x, _ = _anisotropic_rows()
    cov = covariance_of(x)
    top = cov.vectors[0]
    r, info = matched_control(top, cov, 0)
    assert info["achieved"] < 0.99 * info["target"] and info["achieved"] == pytest.approx(cov.variances[1], rel=0.05)
    assert abs(float(_unit(r) @ top)) < 1e-6


def test_sweep_draws_the_matched_control_from_the_probe_activations(paired_probe: Path, tmp_path: Path) -> None:
    """On the probe's own activations the control carries the direction's variance, or (with a warning) the
    most any direction orthogonal to it carries, when the direction is the contrast's top principal one."""
    from emkit.studies.interp.activations import load_activations

    directions = load_directions(paired_probe / "directions.safetensors")
    acts = load_activations(paired_probe / "activations" / "organism")
    cfg = _sweep_cfg()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        matched = arm_vectors(cfg, Arm("matched", "-1,0,1", 1.0), directions, 2, None)
    assert matched.keys() == {-1, 0, 1}
    warned = {int(str(w.message).split("layer ")[1].split(":")[0]) for w in caught}
    exact = 0
    for k, r in matched.items():
        u = _unit(directions.get("mean_diff", k).astype(np.float64))
        xc = acts.layers[k].astype(np.float64) - acts.layers[k].mean(0)
        target = np.var(xc @ u, ddof=1)
        complement = xc - np.outer(xc @ u, u)
        most = np.linalg.svd(complement, compute_uv=False)[0] ** 2 / (len(xc) - 1)
        got = np.var(xc @ _unit(r.astype(np.float64)), ddof=1)
        assert got == pytest.approx(min(target, most), rel=1e-3), k
        assert (k in warned) == (target > 1.01 * most), k
        exact += k not in warned
        assert abs(float(_unit(r) @ u)) < 1e-5
        assert np.linalg.norm(r) == pytest.approx(np.linalg.norm(directions.get("mean_diff", k)), rel=1e-5)
    assert exact >= 1  # at least one layer where the variance is matched exactly on real activations
    np.testing.assert_array_equal(matched[1], arm_vectors(cfg, Arm("matched", "1", 1.0), directions, 2, None)[1])
    # A direction file without the covariance (an older probe run) says what to do.
    save_directions(tmp_path / "directions.safetensors", directions)
    with pytest.raises(DataError, match=r"activation_covariance\.safetensors: missing.*controls: \[isotropic\]"):
        arm_vectors(cfg, Arm("matched", "0", 1.0), load_directions(tmp_path / "directions.safetensors"), 2, None)


def test_covariance_of_equals_the_sample_covariance() -> None:
    from emkit.studies.interp.directions import covariance_of

    rng = np.random.default_rng(0)
    for n in (8, 30, 5000):  # fewer rows than dimensions (SVD), more (blocked scatter matrix)
        x = (rng.standard_normal((n, 16)) * np.arange(1, 17) + 5).astype(np.float32)
        c = covariance_of(x)
        np.testing.assert_allclose(c.vectors.T @ np.diag(c.variances) @ c.vectors, np.cov(x.astype(np.float64),
                                                                                          rowvar=False), atol=1e-9)
        assert c.vectors.shape[0] == min(n - 1, 16) and c.n_rows == n


def test_sweep_reruns_a_probe_that_predates_the_covariance(tiny_model: Path, organisms, paired_data,  # noqa: F811
                                                           tmp_path: Path) -> None:  # noqa: F811
    from emkit.studies.interp.directions import COVARIANCE_FILE
    from emkit.studies.interp.sweep import resolve_directions

    probe = _probe_cfg(tiny_model, tmp_path / "unused", organisms[0], paired_data, methods=["mean_diff"], report=False)
    cfg = SweepConfig(organism=str(organisms[0]), model=str(tiny_model), probe=probe)
    first, _ = resolve_directions(cfg, tmp_path, mirror=None, emit=lambda m: None, progress=False)
    (tmp_path / "probe" / COVARIANCE_FILE).unlink()
    again, _ = resolve_directions(cfg, tmp_path, mirror=None, emit=lambda m: None, progress=False)
    assert (tmp_path / "probe" / COVARIANCE_FILE).is_file()
    for k in first.layers():
        np.testing.assert_array_equal(first.get("mean_diff", k), again.get("mean_diff", k))
    # Without the matched control an earlier probe is used as it is.
    (tmp_path / "probe" / COVARIANCE_FILE).unlink()
    resolve_directions(cfg.model_copy(update={"controls": ["isotropic"]}), tmp_path, mirror=None,
                       emit=lambda m: None, progress=False)
    assert not (tmp_path / "probe" / COVARIANCE_FILE).exists()


def test_controls_field_keeps_old_config_hashes() -> None:
    from emkit.core.config import config_hash

    old = _sweep_cfg()
    assert "controls" not in old.model_dump() and old.controls == ["isotropic", "matched"]
    assert config_hash(_sweep_cfg(controls=["isotropic", "matched"])) == config_hash(old)
    assert config_hash(_sweep_cfg(controls=["isotropic"])) != config_hash(old)
    assert _sweep_cfg(controls="isotropic, matched").controls == ["isotropic", "matched"]
    with pytest.raises(ValueError):
        _sweep_cfg(controls=["gaussian"])
