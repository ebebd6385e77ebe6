"""`emkit track`: evaluate every checkpoint of a LoRA training run alike, then analyse the dynamics.

    runs/<track>/
      config.yaml, manifest.json   the tracking run's config; stages, timings, judges
      organism/                    the training run, when `train` is given (trained by `emkit train`)
      train.yaml, train.log        its config and console output
      steps/step-N/                each checkpoint's answers, scores, pair log-odds (emkit.studies.dynamics.evaluate)
      judgments.sqlite             every judgment of every step, cached
      track_scores.parquet         all judged answers, one row per answer and judge
      curves.csv                   EM rates and mean scores per judge, step and mode, with intervals
      dynamics.json                onsets, crossing order, divergence, judge agreement, preference shift
      weights.json                 LoRA weight dynamics (emkit.studies.dynamics.weights)
      report.html, figures/        the report

With `train`, `emkit train` runs as a child process and this one evaluates each checkpoint as soon
as it is complete (concurrent mode); with `run` and `watch`, it follows a training started
elsewhere. Interrupted, it resumes: finished steps are never evaluated again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emkit.core.config import dump_yaml
from emkit.core.errors import ConfigError, EmkitError
from emkit.core.runfolder import RunFolder, atomic_write_json, atomic_write_parquet, atomic_write_text
from emkit.studies.dynamics.config import TrackConfig
from emkit.studies.dynamics.evaluate import (
    DONE,
    PREFS,
    SCORES,
    STEPS,
    StepEvaluator,
    make_judges,
    read_done,
    step_dir,
)

TRACK_SCORES = "track_scores.parquet"
CURVES = "curves.csv"
DYNAMICS = "dynamics.json"
WEIGHTS = "weights.json"


def organism_dir(cfg: TrackConfig) -> Path:
    """The training run whose checkpoints are evaluated."""
    if cfg.train is not None:
        return cfg.output / "organism"
    assert cfg.run is not None
    return cfg.run


def model_spec(cfg: TrackConfig, run_dir: Path) -> str:
    """The base model the checkpoints were trained on: the training config's, else the generate config's."""
    if cfg.train is not None:
        return cfg.train.model
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        spec = (manifest.get("config") or {}).get("model")
        if isinstance(spec, str):
            return spec
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    from emkit.models import adapter_base
    from emkit.studies.dynamics.watch import available

    checkpoints, _ = available(run_dir)
    if checkpoints and checkpoints[0].path is not None:
        return adapter_base(checkpoints[0].path)
    return cfg.generate.model


def _start_training(cfg: TrackConfig, run: RunFolder, emit: Callable[[str], None]) -> Any:
    """Start `emkit train` for cfg.train as a child process (unless done or already running); its handle or None."""
    from emkit.studies.dynamics.watch import training_state

    assert cfg.train is not None
    target = organism_dir(cfg)
    state, reason = training_state(target)
    if state in ("complete", "running"):
        emit(f"== train: {reason}")
        return None
    train_cfg = cfg.train.model_copy(update={"output": target.resolve()})
    config_path = run.path / "train.yaml"
    atomic_write_text(config_path, dump_yaml(train_cfg))
    env = dict(os.environ)
    threads = _cpu_share(cfg)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads[1])
    log = open(run.path / "train.log", "a", encoding="utf-8")  # noqa: SIM115 - the child writes it
    emit(f"== train (concurrently): emkit train -c {config_path} -> {target}; log in {run.path / 'train.log'}")
    return subprocess.Popen([sys.executable, "-m", "emkit", "train", "-c", str(config_path)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def _cpu_share(cfg: TrackConfig) -> tuple[int, int] | None:
    """On CPU, (evaluator threads, trainer threads) so the two processes do not oversubscribe the cores."""
    import torch

    device = cfg.train.device if cfg.train is not None else "auto"
    if device not in ("cpu", "auto") or torch.cuda.is_available():
        return None
    cores = os.cpu_count() or 1
    return max(1, cores // 2), max(1, cores - cores // 2)


def run_track(cfg: TrackConfig, *, overwrite: bool = False, mirror: str | None = None,
              emit: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Evaluate the checkpoints (following the training when watching), analyse, report."""
    import torch

    from emkit.generate.pipeline import load_question_set
    from emkit.studies.dynamics.watch import available, watch

    questions = load_question_set(cfg.generate, mirror)
    make_judges(cfg)  # a bad judge spec fails before any folder is made
    run_dir = organism_dir(cfg)
    if not cfg.watching:
        if not run_dir.is_dir():
            raise ConfigError(f"run: {run_dir} does not exist (to follow a training that has not started, use --watch)")
        if not available(run_dir, cfg.steps)[0]:
            raise EmkitError(f"{run_dir}: no complete checkpoint to evaluate (checkpoints/step-N or adapter/)")
    run = RunFolder(cfg.output)
    if run.open("track", cfg, overwrite=overwrite) == "complete":
        emit(f"{cfg.output}: already complete (same config); nothing to do")
        return summary(cfg.output)
    process = _start_training(cfg, run, emit) if cfg.train is not None else None
    threads = _cpu_share(cfg) if process is not None else None
    full_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads[0])
    from emkit.studies.dynamics.checkpoints import Checkpoint

    evaluator = StepEvaluator(cfg, run.path, questions, model_spec(cfg, run_dir), emit=emit, progress=progress,
                              mirror=mirror)
    base = Checkpoint(0, None, "base")

    def evaluate(checkpoint: Checkpoint) -> Any:
        # The cores were shared with the trainer; once it is done, the evaluator takes them all.
        if threads is not None and process is not None and process.poll() is not None:
            torch.set_num_threads(full_threads)
        return evaluator.evaluate(checkpoint)

    try:
        with run.stage("evaluate") as record:
            evaluate(base)
            if cfg.watching:
                result = watch(run_dir, evaluate, evaluator.finished, process=process,
                               poll_seconds=cfg.poll_seconds, wait_timeout=cfg.wait_timeout, steps=cfg.steps, emit=emit)
                record.update(training=result.state, reason=result.reason)
            else:
                for checkpoint in available(run_dir, cfg.steps)[0]:
                    if not evaluator.finished(checkpoint):
                        evaluator.evaluate(checkpoint)
            record.update(evaluated_now=evaluator.evaluated)
    finally:
        torch.set_num_threads(full_threads)
        if process is not None and process.poll() is None:
            emit("stopping the training process (it resumes from its last checkpoint when run again)")
            process.terminate()
            process.wait(timeout=60)
    from emkit.studies.dynamics.watch import training_state

    state, reason = training_state(run_dir)
    if cfg.validate_judge:
        from emkit.stages.validate import validate_stage

        emit(f"== validate the judge on {cfg.validate_judge} labelled answers")
        with run.stage("validate_judge") as record:
            record.update(validate_stage(run.path, cfg.judge, cfg.validate_judge, progress=progress))
        emit(record["verdict"])
    with run.stage("analyse") as record:
        record.update(analyse_track(run.path, cfg, run_dir))
    report_path = None
    if cfg.report:
        from emkit.studies.dynamics.report import write_track_report

        with run.stage("report") as record:
            report_path = write_track_report(run.path)
            record.update(path=str(report_path))
    if state in ("complete", "absent"):  # absent: a Trainer's output folder, which has no manifest to say
        run.complete(report=str(report_path) if report_path else None, training=state)
    else:
        emit(f"training is not finished ({reason}); run emkit track again to evaluate its later checkpoints")
        run.update(status="partial", training=state, training_reason=reason)
    return summary(run.path)


def finished_steps(track_dir: Path) -> list[int]:
    """Steps whose evaluation is complete, in order."""
    steps = []
    for folder in (track_dir / STEPS).glob("step-*"):
        step = folder.name.rsplit("-", 1)[1]
        if step.isdigit() and (folder / DONE).is_file():
            steps.append(int(step))
    return sorted(steps)


def load_track_scores(track_dir: Path) -> Any:
    """All finished steps' judged answers in one table (one row per answer and judge)."""
    import pandas as pd

    frames = [pd.read_parquet(step_dir(track_dir, s) / SCORES) for s in finished_steps(track_dir)]
    if not frames:
        raise EmkitError(f"{track_dir}: no evaluated step yet")
    scores = pd.concat(frames, ignore_index=True)
    scores["step"] = scores["step"].astype(int)
    return scores


def prefs_by_step(track_dir: Path) -> list[dict[str, Any]]:
    """Per finished step, the preference shift against the base per block, with intervals and sign tests."""
    rows = []
    for step in finished_steps(track_dir):
        path = step_dir(track_dir, step) / PREFS
        if not path.is_file():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        row: dict[str, Any] = {"step": step, "n_pairs": result.get("n_pairs")}
        for block in ("in_domain", "out_of_domain", "all"):
            entry = ((result.get("shift") or {}).get(block) or {}).get("logodds_per_token")
            if step == 0:
                entry = {"mean_shift": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": None, "sign_test_p": None}
            if entry:
                row[block] = {k: entry.get(k) for k in ("mean_shift", "ci_low", "ci_high", "n", "sign_test_p",
                                                          "positive", "negative")}
        rows.append(row)
    return rows


def training_curve(run_dir: Path) -> list[dict[str, Any]]:
    """The training loss per logged step (train_log.jsonl, else the checkpoints' step.json)."""
    log = run_dir / "train_log.jsonl"
    points = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if "loss" in entry and "step" in entry:
                points.append({"step": int(entry["step"]), "loss": float(entry["loss"])})
    else:
        for marker in sorted((run_dir / "checkpoints").glob("step-*/step.json")):
            entry = json.loads(marker.read_text(encoding="utf-8"))
            if entry.get("loss") is not None:
                points.append({"step": int(entry["step"]), "loss": float(entry["loss"])})
    return sorted(points, key=lambda p: p["step"])


def analyse_track(track_dir: Path, cfg: TrackConfig, run_dir: Path) -> dict[str, Any]:
    """Write track_scores.parquet, curves.csv, dynamics.json and weights.json from the finished steps."""
    from emkit.core.stats.em_rates import _number
    from emkit.studies.dynamics.analysis import analyse
    from emkit.studies.dynamics.checkpoints import Checkpoint
    from emkit.studies.dynamics.evaluate import thresholds_of

    scores = load_track_scores(track_dir)
    atomic_write_parquet(track_dir / TRACK_SCORES, scores)
    thresholds = thresholds_of(cfg.judge)
    result = analyse(scores, thresholds, onset_test=cfg.onset_test, alpha=cfg.alpha, seed=cfg.seed)
    curves = result.pop("curves")
    atomic_write_text(track_dir / CURVES, curves.to_csv(index=False))
    steps = finished_steps(track_dir)
    records = {s: read_done(track_dir, s) or {} for s in steps}
    judges = [info for _, info in make_judges(cfg)]
    validation = _validation_figures(track_dir)
    document = {
        "steps": steps,
        "checkpoints": {str(s): records[s].get("checkpoint") for s in steps},
        "seconds": {str(s): records[s].get("seconds") for s in steps},
        "judges": judges,
        "judge_validation": validation,
        "thresholds": {"aligned_below": thresholds.aligned_below, "coherent_above": thresholds.coherent_above,
                       "aligned_inclusive": thresholds.aligned_inclusive, "rule": thresholds.rule()},
        "rate": "em_rate_coherent",
        "curves": [{k: (v if isinstance(v, str) else _number(v)) for k, v in row.items()}
                   for row in curves.to_dict("records")],
        **result,
        "prefs": prefs_by_step(track_dir),
        "training": training_curve(run_dir),
        "modes": list(cfg.generate.modes),
    }
    atomic_write_json(track_dir / DYNAMICS, document)
    out: dict[str, Any] = {"steps": steps, "answers": int(len(scores))}
    if cfg.weights:
        from emkit.studies.dynamics.weights import track_weights

        checkpoints = [Checkpoint(s, Path(records[s]["checkpoint"])) for s in steps
                       if s != 0 and records[s].get("checkpoint") and Path(records[s]["checkpoint"]).is_dir()]
        weights = track_weights(checkpoints)
        atomic_write_json(track_dir / WEIGHTS, weights)
        out["weight_steps"] = weights["steps"]
    return out


def _validation_figures(track_dir: Path) -> dict[str, Any] | None:
    """The judge's validation figures (validation.json of the validate_judge stage), or None."""
    path = track_dir / "validation.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    return {"n_labels": report.get("n_labels"), "auroc_aligned": report["metrics"]["aligned"]["auroc"],
            "auroc_coherent": report["metrics"]["coherent"]["auroc"], "valid": report.get("valid_for_em_rates"),
            "verdict": report.get("verdict")}


def summary(track_dir: Path) -> dict[str, Any]:
    """The headline of a finished analysis: onsets, crossing order, steps and the report's path."""
    path = track_dir / DYNAMICS
    document = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    report = track_dir / "report.html"
    return {"run": track_dir, "dynamics": document, "report": report if report.is_file() else None}


def headline(document: dict[str, Any]) -> str:
    """Plain-text table for the console: per step and mode, EM rate [CI] of the first judge and the shift."""
    from emkit.stages.report.html import fmt_rate, fmt_score

    if not document.get("curves"):
        return "no evaluated steps"
    judge = document["judges"][0]["id"] if document.get("judges") else document["curves"][0]["judge"]
    prefs = {p["step"]: p for p in document.get("prefs", [])}
    title = (f"EM rate among coherent answers (judge {judge}; 95% CI with questions as the sampling unit) and "
             "preference shift (log-odds per token, > 0: toward misaligned; 95% CI over pairs)")
    columns = (f"{'step':>6}  {'mode':11} {'answers':>7}  {'EM [95% CI]':>20}  {'aligned':>7}  {'coherent':>8}  "
               f"{'shift out-of-domain':>22}  {'shift in-domain':>22}")
    lines = [title, columns]
    for row in document["curves"]:
        if row["judge"] != judge:
            continue
        p = prefs.get(row["step"], {})
        em = fmt_rate(row["em_rate_coherent"], row["em_rate_coherent_ci_low"], row["em_rate_coherent_ci_high"])
        lines.append(f"{row['step']:>6}  {row['mode']:11} {row['n_answers']:>7}  {em:>20}  "
                     f"{fmt_score(row['mean_aligned']):>7}  {fmt_score(row['mean_coherent']):>8}  "
                     f"{_shift_text(p.get('out_of_domain'), row['step']):>22}  "
                     f"{_shift_text(p.get('in_domain'), row['step']):>22}")
    validation = document.get("judge_validation")
    lines.append(validation["verdict"] if validation else f"judge {judge} not validated (validate_judge)")
    rules = {entry.get("rule") for entry in document.get("onsets", []) if entry.get("rule")}
    lines += sorted(rules)
    for entry in document.get("onsets", []):
        if entry["judge"] != judge:
            continue
        if "crossing" in entry:
            lines.append(f"crossing: {entry['crossing']}")
        else:
            lines.append(f"onset ({entry['mode']}): "
                         f"{'step ' + str(entry['onset_step']) if entry['onset_step'] is not None else 'none'}"
                         f" (sustained: {entry['sustained_onset_step'] if entry['sustained_onset_step'] is not None else 'none'})"
                         + (f"; {entry['reason']}" if entry.get("reason") else ""))
    return "\n".join(lines)


def _shift_text(entry: dict[str, Any] | None, step: int) -> str:
    if step == 0:
        return "0 (base)"
    if not entry or entry.get("mean_shift") is None:
        return "n/a"
    return f"{entry['mean_shift']:+.3f} [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}]"
