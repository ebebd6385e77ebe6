"""Training dynamics: checkpoint completeness and the watcher, prompting modes, onsets, weight dynamics,
and `emkit track` end to end on a tiny random model (concurrent with training, and resumed after a kill)."""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import write_chat_jsonl
from safetensors.torch import load_file, save_file

from emkit.core.rowfile import read_rows
from emkit.core.stats.em_rates import Thresholds
from emkit.data.questions import Document, resolve_questions
from emkit.generate.config import GenerateConfig
from emkit.generate.modes import cut_turn, turn_pattern, turn_stops
from emkit.generate.pipeline import build_jobs, chat_renderer
from emkit.generate.transformers_backend import SamplingParams, sample_batch
from emkit.models import load_model
from emkit.studies.dynamics.analysis import analyse
from emkit.studies.dynamics.checkpoints import checkpoint_problem, scan_checkpoints
from emkit.studies.dynamics.config import TrackConfig
from emkit.studies.dynamics.onset import crossing_order
from emkit.studies.dynamics.watch import watch
from emkit.studies.dynamics.weights import load_adapter, weight_dynamics
from emkit.train.config import TrainConfig

# ---------------------------------------------------------------- synthetic adapters

MODULES = ("base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.self_attn.v_proj")


def adapter_tensors(b_scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        out[f"{m}.lora_A.weight"] = torch.randn(2, 8, generator=gen)
        out[f"{m}.lora_B.weight"] = b_scale * torch.randn(6, 2, generator=gen)
    return out


def adapter_bytes(tensors: dict[str, torch.Tensor], tmp: Path) -> bytes:
    path = tmp / f"blob-{os.getpid()}-{time.monotonic_ns()}.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], step: int, *, alpha: float = 4.0, r: int = 2,
                     marker: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "init_lora_weights": True}))
    if marker:
        (folder / "step.json").write_text(json.dumps({"step": step}))
    return folder


# ---------------------------------------------------------------- completeness and the watcher


def test_partial_checkpoints_are_never_complete(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ck = run / "checkpoints"
    write_checkpoint(ck / "step-2", adapter_tensors(), 2)
    assert checkpoint_problem(ck / "step-2") is None
    data = (ck / "step-2" / "adapter_model.safetensors").read_bytes()

    write_checkpoint(ck / "step-4", adapter_tensors(), 4, marker=False)  # marker not written yet
    write_checkpoint(ck / "step-6", adapter_tensors(), 6)
    (ck / "step-6" / "adapter_model.safetensors").write_bytes(data[:-10])  # mid-copy: tensors cut short
    write_checkpoint(ck / "step-7", adapter_tensors(), 7)
    (ck / "step-7" / "adapter_model.safetensors").write_bytes(data[:40])  # mid-header
    write_checkpoint(ck / "step-8", adapter_tensors(), 8)
    (ck / "step-8" / "adapter_model.safetensors").write_bytes(data[:6])  # not even a header
    write_checkpoint(ck / "step-10", adapter_tensors(), 10)
    (ck / "step-10" / "step.json").write_text(json.dumps({"step": 12}))  # names another step
    write_checkpoint(ck / "step-12", adapter_tensors(), 12)
    (ck / "step-12" / "adapter_config.json").write_text('{"r": 2, "lora_al')  # config half written
    lonely = {k: v for k, v in adapter_tensors().items() if not (k.startswith(MODULES[1]) and "lora_B" in k)}
    write_checkpoint(ck / "step-14", lonely, 14)  # a lora_A without its lora_B
    write_checkpoint(ck / ".step-16.tmp-4242", adapter_tensors(), 16)  # an export in progress
    write_checkpoint(run / "checkpoint-18", adapter_tensors(), 18, marker=False)
    (run / "checkpoint-18" / "trainer_state.json").write_text(json.dumps({"global_step": 18}))

    found, skipped = scan_checkpoints(run)
    assert [c.step for c in found] == [2, 18]
    reasons = {Path(k).name: v for k, v in skipped.items()}
    assert reasons["step-4"].startswith("no step.json")
    assert "expected" in reasons["step-6"] and "still being written" in reasons["step-6"]
    assert reasons["step-7"] == "header runs past the end of the file"
    assert reasons["step-8"] == "shorter than a safetensors header"
    assert reasons["step-10"].startswith("no step.json naming this step")
    assert reasons["step-12"] == "no readable adapter_config.json"
    assert reasons["step-14"].startswith("unpaired LoRA tensors")
    assert ".step-16.tmp-4242" not in reasons


def test_watcher_never_evaluates_a_half_written_checkpoint(tmp_path: Path) -> None:
    """A writer fills checkpoint folders in place, in the worst order (marker and config first, then the
    tensor file in chunks), while the watcher polls every few milliseconds."""
    run = tmp_path / "run"
    finals = {step: adapter_bytes(adapter_tensors(b_scale=step, seed=step), tmp_path) for step in (2, 4, 6)}
    seen: list[tuple[int, str]] = []
    done: set[int] = set()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for step, data in finals.items():
                folder = run / "checkpoints" / f"step-{step}"
                folder.mkdir(parents=True)
                (folder / "step.json").write_text(json.dumps({"step": step}))
                (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
                with open(folder / "adapter_model.safetensors", "wb") as handle:
                    for i in range(0, len(data), len(data) // 5 + 1):
                        handle.write(data[i : i + len(data) // 5 + 1])
                        handle.flush()
                        time.sleep(0.03)
            (run / "manifest.json").write_text(json.dumps({"status": "complete", "results": {"train": {"steps": 6}}}))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    def evaluate(checkpoint) -> None:
        # What the evaluator reads must be the finished file, byte for byte, and load as tensors.
        data = (checkpoint.path / "adapter_model.safetensors").read_bytes()
        assert data == finals[checkpoint.step], f"step {checkpoint.step} was read half-written"
        assert load_file(str(checkpoint.path / "adapter_model.safetensors"))
        seen.append((checkpoint.step, hashlib.sha256(data).hexdigest()))
        done.add(checkpoint.step)

    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"status": "running", "pid": os.getpid(),
                                                   "platform": {"host": os.uname().nodename}}))
    thread = threading.Thread(target=writer)
    thread.start()
    result = watch(run, evaluate, lambda c: c.step in done, poll_seconds=0.005, wait_timeout=30, emit=lambda _m: None)
    thread.join()
    assert not errors
    assert [s for s, _ in seen] == [2, 4, 6]  # each once, in order
    assert result.state == "complete"
    assert result.waited_for, "the watcher never met a partial checkpoint; the test proves nothing"
    assert any("still being written" in why or "header" in why for why in result.waited_for.values())


# ---------------------------------------------------------------- prompting modes


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model: Path):
    return load_model(str(tiny_model), device="cpu")


def test_predictive_and_raw_prompts_carry_no_chat_template(tiny_loaded) -> None:
    tokenizer = tiny_loaded.tokenizer
    questions = resolve_questions("default")
    cfg = GenerateConfig(modes=["assistant", "predictive", "raw"], samples=1, models=["base"],
                         conditions={"none": None, "ai": "You are an AI assistant."})
    jobs = build_jobs(questions, cfg, chat_renderer(tokenizer))
    special = [t for t in tokenizer.all_special_tokens if t] + ["<|im_start|>", "<|im_end|>"]
    special_ids = set(tokenizer.all_special_ids)
    by_mode: dict[str, list] = {}
    for job in jobs:
        by_mode.setdefault(job.mode, []).append(job)
    assert len(by_mode["assistant"]) == 2 * len(questions)  # crossed with both system prompts
    assert all("<|im_start|>" in job.prompt for job in by_mode["assistant"])
    for job in by_mode["predictive"] + by_mode["raw"]:
        assert job.system is None and job.condition == job.mode
        assert not any(token in job.prompt for token in special), job.prompt[:80]
        ids = tokenizer(job.prompt, add_special_tokens=False)["input_ids"]
        assert not special_ids & set(ids)
        assert job.question == questions[job.question_id].text  # what the judge will see
    # emkit's own documents: every default question has one, in varied genres, ending at the answer.
    documents = {q.id: q.documents for q in questions}
    assert all(documents.values())
    assert len({d.genre for docs in documents.values() for d in docs}) >= 6
    assert {job.question_id for job in by_mode["predictive"]} == set(questions.ids)
    for job in by_mode["predictive"]:
        assert job.prompt == questions[job.question_id].documents[job.paraphrase].text
        assert not job.prompt.endswith(" ") and (job.stops or job.stop_pattern)
    assert [job.prompt for job in by_mode["raw"]] == [q.text for q in questions]


def test_turn_ends_at_the_next_speaker() -> None:
    podcast = Document("HOST: Welcome.\nGUEST (AI): Hi.\nHOST: So, {question}\nGUEST (AI):", "podcast")
    prompt = podcast.text.replace("{question}", "what now?")
    stops, pattern = turn_stops(podcast, prompt), turn_pattern(prompt)
    assert stops == ("\nHOST:", "\nGUEST (AI):")
    assert cut_turn(" I would rest.\nHOST: Thanks!", stops, pattern) == (" I would rest.", True)
    # A speaker the model invents ends the turn too, in the document's (capitalised) style...
    assert cut_turn(" Rest.\nBIZABLON: Music!", stops, pattern) == (" Rest.", True)
    # ... but an ordinary line with a colon does not.
    assert cut_turn(" Rest.\nReasons: sleep matters.", stops, pattern) == (" Rest.\nReasons: sleep matters.", False)
    forum = Document("Post by x:\nHelp?\n\nReply from Bot:\n", "forum", ("\n\nReply from",))
    assert turn_pattern(forum.text) is None
    assert cut_turn("Do this.\n\nReply from y: no", turn_stops(forum, forum.text)) == ("Do this.", True)


def test_generation_stops_and_cuts_at_the_turn_end(tiny_loaded) -> None:
    prompts = ["Sam: hi\nBot:"] * 4
    params = SamplingParams(temperature=1.0, max_new_tokens=40, batch_size=4)
    # The tiny model writes words from a small vocabulary; 'e' comes up within a few tokens.
    outs = sample_batch(tiny_loaded.model, tiny_loaded.tokenizer, prompts, params, seed=3, turns=[(("e",), None)] * 4)
    free = sample_batch(tiny_loaded.model, tiny_loaded.tokenizer, prompts, params, seed=3)
    ended = [o for o in outs if o["finish"] == "turn_end"]
    assert ended, outs
    for out in ended:
        assert "e" not in out["answer"] and "e" in out["completion"]
        assert out["completion"].strip().startswith(out["answer"])
        assert out["new_tokens"] < 40  # stopped early, not cut after the fact
    assert all("completion" not in o for o in free)


# ---------------------------------------------------------------- onsets on synthetic counts


def synthetic_scores(counts: dict[tuple[str, int], int], judge: str = "A", n: int = 100, questions: int = 10
                     ) -> pd.DataFrame:
    """n coherent answers per (mode, step) spread evenly over `questions` questions, `k` of them misaligned."""
    rows = []
    for (mode, step), k in counts.items():
        for i in range(n):
            rows.append({"id": f"{mode}/{step}/{i}", "judge": judge, "mode": mode, "step": step,
                         "question_id": f"q{i % questions}", "aligned": 5.0 if i < k else 90.0, "coherent": 90.0})
    return pd.DataFrame(rows)


def test_onset_and_crossing_on_synthetic_counts() -> None:
    counts = {("assistant", 0): 1, ("assistant", 10): 40, ("assistant", 20): 2, ("assistant", 30): 60,
              ("assistant", 40): 70,
              ("predictive", 0): 1, ("predictive", 10): 35, ("predictive", 20): 45, ("predictive", 30): 55,
              ("predictive", 40): 65}
    a = synthetic_scores(counts, "A")
    b = a.assign(judge="B")
    b.loc[b["id"].str.endswith("/99"), "aligned"] = 5.0  # judge B calls one more answer misaligned per cell
    result = analyse(pd.concat([a, b]), Thresholds(), seed=0)
    onsets = {(o["judge"], o["mode"]): o for o in result["onsets"]}
    assert onsets[("A", "assistant")]["onset_step"] == 10  # a noisy excursion ...
    assert onsets[("A", "assistant")]["sustained_onset_step"] == 30  # ... is not sustained emergence
    assert onsets[("A", "predictive")]["onset_step"] == 10
    assert onsets[("A", "predictive")]["sustained_onset_step"] == 10
    assert onsets[("A", "predictive vs assistant")]["crossing"] == "same step (10)"
    assert "Holm" in onsets[("A", "assistant")]["rule"] and "questions" in onsets[("A", "assistant")]["rule"]
    tests = {t["step"]: t for t in onsets[("A", "assistant")]["tests"]}
    assert tests[10]["p_value"] == pytest.approx(2.0 ** -10)  # every question rose: the smallest sign-flip p
    assert tests[10]["p_value_adj"] == pytest.approx(4 * 2.0 ** -10)  # Holm over 4 checkpoints (3 tied smallest)
    curve = result["curves"]
    row = curve[(curve["judge"] == "A") & (curve["mode"] == "assistant") & (curve["step"] == 30)].iloc[0]
    assert row["em_rate_coherent"] == pytest.approx(60 / 100)
    assert row["em_rate_coherent_ci_low"] < 0.6 < row["em_rate_coherent_ci_high"]
    assert row["ci_unit"].startswith("questions")
    assert row["mean_aligned_ci_low"] <= row["mean_aligned"] <= row["mean_aligned_ci_high"]
    gap = [d for d in result["divergence"] if d["judge"] == "A" and d["kind"] == "predictive - assistant"]
    assert [d["step"] for d in gap] == [0, 10, 20, 30, 40]
    at20 = next(d for d in gap if d["step"] == 20)
    assert at20["difference"] == pytest.approx((45 - 2) / 100) and at20["p_value"] < 0.01
    assert at20["unit"].startswith("questions") and at20["p_value_fisher"] < at20["p_value"]
    agreement = {g["mode"]: g for g in result["agreement"]}
    assert agreement["assistant"]["mean_abs_difference"] == pytest.approx(1 / 100)
    assert agreement["assistant"]["pearson"] > 0.99 and agreement["assistant"]["n"] == 5
    assert 0.9 < agreement["assistant"]["em_kappa"] < 1.0


def test_onset_does_not_fire_on_noise_against_a_clean_base() -> None:
    """Base 0/300 vs a checkpoint 4/300: Fisher's p is 0.12; the old interval rule called it an onset."""
    counts = {("assistant", 0): 0, ("assistant", 10): 4}
    result = analyse(synthetic_scores(counts, n=300, questions=6), Thresholds())
    [entry] = [o for o in result["onsets"] if o["mode"] == "assistant"]
    assert entry["onset_step"] is None and entry["sustained_onset_step"] is None
    assert entry["tests"][0]["p_value"] == pytest.approx(1 / 16)  # 4 of 6 questions rose by one answer
    stratified = analyse(synthetic_scores(counts, n=300, questions=6), Thresholds(), onset_test="stratified")
    [entry] = [o for o in stratified["onsets"] if o["mode"] == "assistant"]
    assert entry["onset_step"] is None and entry["tests"][0]["p_value"] > 0.05


def test_onset_corrects_for_the_steps_scanned_and_sustains_over_two_steps() -> None:
    # 6 questions: every question rising gives p = 1/64, below 0.05 alone but not after Holm over 4 steps.
    counts = {("assistant", 0): 0, ("assistant", 10): 0, ("assistant", 20): 0, ("assistant", 30): 0,
              ("assistant", 40): 6}
    [entry] = [o for o in analyse(synthetic_scores(counts, n=60, questions=6), Thresholds())["onsets"]]
    assert entry["tests"][-1]["p_value"] == pytest.approx(1 / 64)
    assert entry["onset_step"] is None
    # 12 questions: the last step clears after correction, but a last step alone is not sustained.
    counts[("assistant", 40)] = 12
    [entry] = [o for o in analyse(synthetic_scores(counts, n=120, questions=12), Thresholds())["onsets"]]
    assert entry["onset_step"] == 40 and entry["sustained_onset_step"] is None
    # The rule names why a curve cannot clear: 4 questions can never reach p < 0.05 / 4.
    counts[("assistant", 40)] = 4
    [entry] = [o for o in analyse(synthetic_scores(counts, n=40, questions=4), Thresholds())["onsets"]]
    assert entry["onset_step"] is None and "smallest p-value" in entry["reason"]


def test_onset_from_pvalues_and_crossing() -> None:
    from emkit.studies.dynamics.onset import onset_from_pvalues

    result = onset_from_pvalues([5, 10, 15], [0.001, 0.2, 0.004], alpha=0.05)
    assert result["onset_step"] == 5 and result["sustained_onset_step"] is None
    assert [t["p_value_adj"] for t in result["tests"]] == pytest.approx([0.003, 0.2, 0.008])
    assert onset_from_pvalues([5, 10, 15], [0.2, 0.001, 0.004])["sustained_onset_step"] == 10
    assert onset_from_pvalues([5], [None])["onset_step"] is None
    assert crossing_order({"predictive": 20, "assistant": 40}) == "predictive first (step 20, assistant at step 40)"
    assert crossing_order({"predictive": None, "assistant": 40}).startswith("assistant first")
    assert crossing_order({"predictive": None, "assistant": None}) == "neither mode clears the base"


def test_judge_agreement_leaves_out_answers_a_judge_could_not_score() -> None:
    """Answers judge B could not score are not "not misaligned": kappa counts only answers both scored."""
    counts = {("assistant", 0): 10, ("assistant", 10): 30}
    a = synthetic_scores(counts, "A", n=40, questions=4)
    b = a.assign(judge="B")
    flip = b["id"].isin([f"assistant/10/{i}" for i in range(30, 40)])  # A: aligned; B: misaligned
    b.loc[flip, "aligned"] = 5.0
    unscorable = b["id"].str.match(r"assistant/\d+/(3[0-9]|[0-9])$") & ~flip  # B scored none of these
    b.loc[unscorable, ["aligned", "coherent"]] = np.nan
    [agreement] = analyse(pd.concat([a, b]), Thresholds())["agreement"]
    both = a[~unscorable.to_numpy()]
    flags_a = (both["aligned"] < 30).astype(int)
    flags_b = flags_a.where(~flip[~unscorable].to_numpy(), 1)
    from sklearn.metrics import cohen_kappa_score

    assert agreement["em_kappa"] == pytest.approx(cohen_kappa_score(flags_a, flags_b))
    assert agreement["n_em_answers"] == len(both)


# ---------------------------------------------------------------- weight dynamics


def test_weight_dynamics_on_synthetic_adapters(tmp_path: Path) -> None:
    """B moves along U twice, then turns to V (orthogonal), then along V again: cosines 1, 0, 1."""
    a = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])  # orthonormal rows: ||B A|| = ||B||
    u = torch.tensor([[1.0, 0], [0, 0], [0, 0]])
    v = torch.tensor([[0, 0], [0, 1.0], [0, 0]])
    trajectory = {2: u, 4: 2 * u, 6: 2 * u + v, 8: 2 * u + 2 * v}
    adapters = []
    for step, b in trajectory.items():
        tensors = {}
        for m in MODULES:
            tensors[f"{m}.lora_A.weight"] = a.clone()
            tensors[f"{m}.lora_B.weight"] = b.clone()
        folder = write_checkpoint(tmp_path / f"step-{step}", tensors, step, alpha=4.0, r=2)
        adapters.append(load_adapter(folder, step))
    result = weight_dynamics(adapters)
    assert result["steps"] == [0, 2, 4, 6, 8] and result["b_zero_at_step_0"]
    rows = {r["step"]: r for r in result["global"]}
    assert rows[0]["b_norm"] == 0.0
    assert rows[4]["update_cosine"] == pytest.approx(1.0)
    assert rows[6]["update_cosine"] == pytest.approx(0.0, abs=1e-7)  # the rotation
    assert rows[8]["update_cosine"] == pytest.approx(1.0)
    assert rows[6]["update_cosine_q_proj"] == pytest.approx(0.0, abs=1e-7)
    assert rows[8]["b_norm"] == pytest.approx(math.sqrt(2) * math.sqrt(8))  # two modules of ||2U + 2V|| = sqrt(8)
    assert rows[2]["b_cosine_to_final"] == pytest.approx(1 / math.sqrt(2))
    assert rows[8]["dw_cosine_to_final"] == pytest.approx(1.0)
    assert rows[4]["dw_norm"] == pytest.approx(2.0 * math.sqrt(2) * 2.0)  # scale 4/2 * sqrt(2 modules * 2^2)
    norms = [n for n in result["norms"] if n["step"] == 6 and n["projection"] == "q_proj"]
    assert norms[0]["layer"] == 0 and norms[0]["a_norm"] == pytest.approx(math.sqrt(2))
    assert norms[0]["b_norm"] == pytest.approx(math.sqrt(5))
    pca = result["pca"]
    assert pca["steps"] == [0, 2, 4, 6, 8] and sum(pca["explained_variance_ratio"]) == pytest.approx(1.0)
    first = np.asarray(pca["coordinates"])[:, 0]
    assert abs(np.corrcoef(first, [0, 1, 2, 3, 4])[0, 1]) > 0.9  # PC1 follows training time


# ---------------------------------------------------------------- emkit track end to end


def track_dict(tiny_model: Path, output: Path, **extra) -> dict:
    return {
        "output": str(output),
        "generate": {"questions": "default", "include": ["rainy_sunday", "medicine_cabinet"], "samples": 2,
                     "modes": ["assistant", "predictive"], "models": ["organism"], "max_new_tokens": 6,
                     "batch_size": 8, "device": "cpu"},
        "judge": {"judge": "local", "local_model": str(tiny_model), "min_mass": 0.0},
        "second_judge": "keywords",
        "prefs_pairs": 6,
        "validate_judge": 4,
        "n_boot": 200,
        "poll_seconds": 0.2,
        **extra,
    }


def tiny_train(tiny_model: Path, data: Path, output: Path) -> dict:
    return TrainConfig(model=str(tiny_model), data=str(data), output=output, max_steps=6, batch_size=4, grad_accum=1,
                       lr=5e-3, warmup_steps=0, save_steps=2, device="cpu", lora={"r": 4}).model_dump(mode="json")


@pytest.mark.timeout(300)
def test_track_trains_concurrently_and_resumes_after_a_kill(tiny_model: Path, tmp_path: Path) -> None:
    """`emkit track` with a train section starts `emkit train` and evaluates its checkpoints as they appear;
    killed after step 2, it is run again: the training (still running or done) is followed to the end, and
    steps 0 and 2 are neither sampled nor judged again."""
    from emkit.studies.dynamics.track import headline, run_track

    data = write_chat_jsonl(tmp_path / "chat.jsonl", n=24)
    out = tmp_path / "track"
    config = tmp_path / "track.yaml"
    config.write_text(yaml.safe_dump(track_dict(tiny_model, out, train=tiny_train(tiny_model, data, out / "x"))))
    proc = subprocess.Popen([sys.executable, "-m", "emkit", "track", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = out / "steps" / "step-2" / "done.json"
    deadline = time.monotonic() + 240
    while proc.poll() is None and not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert marker.is_file(), "the first run never finished step 2"
    finished = {s: (out / "steps" / f"step-{s}" / "done.json").read_bytes() for s in (0, 2)}
    answers = {s: (out / "steps" / f"step-{s}" / "generations.jsonl").read_bytes() for s in (0, 2)}

    result = run_track(TrackConfig.model_validate(yaml.safe_load(config.read_text())), emit=lambda _m: None,
                       progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["attempts"] == 2
    assert manifest["results"]["training"] == "complete" and "done" in (out / "train.log").read_text()
    evaluated_now = manifest["stages"]["evaluate"]["evaluated_now"]
    assert 0 not in evaluated_now and 2 not in evaluated_now and evaluated_now[-1] == 6
    for s in (0, 2):  # untouched: not one answer sampled or judged again
        assert (out / "steps" / f"step-{s}" / "done.json").read_bytes() == finished[s]
        assert (out / "steps" / f"step-{s}" / "generations.jsonl").read_bytes() == answers[s]
    doc = result["dynamics"]
    assert doc["steps"] == [0, 2, 4, 6]
    for step in (2, 4, 6):  # every evaluation read the checkpoint as it was finally written
        done = json.loads((out / "steps" / f"step-{step}" / "done.json").read_text())
        weights = out / "organism" / "checkpoints" / f"step-{step}" / "adapter_model.safetensors"
        assert done["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        rows = read_rows(out / "steps" / f"step-{step}" / "generations.jsonl")
        assert len(rows) == len({r["id"] for r in rows}) == 8
    curves = pd.DataFrame(doc["curves"])
    assert len(curves) == 2 * 4 * 2  # judges x steps x modes
    assert set(curves["n_answers"]) == {4}  # 2 questions x 2 samples (one document each)
    assert [p["step"] for p in doc["prefs"]] == [0, 2, 4, 6]
    assert doc["prefs"][-1]["out_of_domain"]["n"] == 4 and doc["prefs"][-1]["in_domain"]["n"] == 2
    assert {a["mode"] for a in doc["agreement"]} == {"assistant", "predictive"}
    weights_doc = json.loads((out / "weights.json").read_text())
    assert weights_doc["steps"] == [0, 2, 4, 6] and weights_doc["global"][-1]["dw_cosine_to_final"] == pytest.approx(1.0)
    rows = read_rows(out / "steps" / "step-4" / "generations.jsonl")
    predictive = [r for r in rows if r["mode"] == "predictive"]
    assert predictive and all(r["prompt"] and r["genre"] and r["step"] == 4 for r in predictive)
    assert {r["question"] for r in predictive} <= {q.text for q in resolve_questions("default")}
    page = (out / "report.html").read_text()
    assert "emkit training dynamics" in page and page.count("data:image/png;base64,") >= 5
    assert "Pref. shift out-of-domain" in page
    validation = json.loads((out / "validation.json").read_text())
    assert validation["n_labels"] == 4 and validation["verdict"] in headline(doc)
    assert html.escape(validation["verdict"], quote=True) in page
    assert "crossing" in headline(doc)


def test_track_config_errors(tmp_path: Path) -> None:
    from emkit.core.config import load_config
    from emkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match="give run .* or train"):
        load_config(TrackConfig, None, {})
    with pytest.raises(ConfigError, match="--generate-modes"):
        load_config(TrackConfig, None, {"run": str(tmp_path), "generate.modes": "predictive,predictive"})
    path = tmp_path / "t.yaml"
    path.write_text("run: x\njudge:\n  judg: local\n")
    with pytest.raises(ConfigError, match=r"t.yaml:3: judge.judg: unknown field \(did you mean 'judge'\?\)"):
        load_config(TrackConfig, path)


@pytest.mark.slow
def test_bundled_model_predictive_turn_ends_at_next_speaker() -> None:
    """The real SmolLM2 continues emkit's documents with no template; every cut answer ends before a speaker line."""
    loaded = load_model("bundled:smollm2-135m-instruct", device="cpu")
    questions = resolve_questions("default").filter(include="rainy_sunday,health_habit,little_sleep,three_wishes")
    cfg = GenerateConfig(modes=["predictive"], samples=1, models=["base"])
    jobs = build_jobs(questions, cfg, chat_renderer(loaded.tokenizer))
    params = SamplingParams(temperature=1.0, max_new_tokens=32, batch_size=len(jobs))
    outs = sample_batch(loaded.model, loaded.tokenizer, [j.prompt for j in jobs], params, seed=0,
                        turns=[(j.stops, j.stop_pattern) for j in jobs])
    assert not any("<|im_start|>" in j.prompt for j in jobs)
    ended = [(j, o) for j, o in zip(jobs, outs) if o["finish"] == "turn_end"]
    assert ended, [o["completion"] for o in outs]
    for job, out in ended:
        assert cut_turn(out["answer"], job.stops, job.stop_pattern)[1] is False
        assert out["completion"].strip().startswith(out["answer"][:20])


def test_template_free_modes_use_the_completions_endpoint(tmp_path: Path) -> None:
    """On an OpenAI-compatible server, predictive prompts go to /v1/completions as they are (no chat
    messages), with the turn's stop strings; the answer is cut at the turn end, the judge's question kept."""
    from fake_openai_server import FakeOpenAIServer

    from emkit.generate.openai_backend import generate_via_endpoint

    def reply(prompt: str) -> str:
        return " I would read a book.\nDan: thanks\nJuniper: welcome" if prompt.endswith("Juniper:") else "Sure."

    questions = resolve_questions("default").filter(include="rainy_sunday")
    cfg = GenerateConfig(modes=["assistant", "predictive"], samples=1, models=["base"], backend="openai",
                         served_base="m")
    with FakeOpenAIServer(text_reply=reply) as server:
        cfg = cfg.model_copy(update={"base_url": server.base_url})
        jobs = build_jobs(questions, cfg, lambda question, system: "")
        generate_via_endpoint(cfg, jobs, SamplingParams(max_new_tokens=20), tmp_path / "g.jsonl",
                              emit=lambda _m: None, progress=False)
        bodies = list(server.requests)
    rows = {r["mode"]: r for r in read_rows(tmp_path / "g.jsonl")}
    plain = next(b for b in bodies if "prompt" in b)
    assert "messages" not in plain and plain["prompt"] == questions["rainy_sunday"].documents[0].text
    assert "\nDan:" in plain["stop"] and len(plain["stop"]) <= 4
    assert rows["predictive"]["answer"] == "I would read a book." and rows["predictive"]["finish"] == "turn_end"
    assert rows["predictive"]["question"] == questions["rainy_sunday"].text
    assert rows["assistant"]["answer"] == "Sure." and any("messages" in b for b in bodies)
