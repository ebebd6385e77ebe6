"""`emkit run CONFIG.yaml`: the whole EM experiment in one command, every stage resumable.

    runs/<name>/
      config.yaml, manifest.json   the experiment's config; stages, timings, judge, versions
      organism/                    the training run (adapter/, checkpoints/, its own manifest)
      generations.jsonl            answers of base and organism under every condition
      judgments.sqlite             every judgment, cached (a re-run never asks twice)
      scores.parquet, stats.json   one row per answer with its scores; EM statistics
      report.html, figures/        the report

Each stage reads the previous stage's files: training skips when its run is complete and resumes
when partial, generation skips the batches already written, judging skips cached judgments, and
statistics and the report are recomputed from the files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from emkit.core.config import StrictModel
from emkit.core.errors import EmkitError
from emkit.generate.config import GenerateConfig
from emkit.judge.config import JudgeConfig
from emkit.train.config import TrainConfig


class RunConfig(StrictModel):
    """A whole experiment: train (or reuse) an organism, generate, judge, report."""

    output: Path = Field(Path("runs/experiment"), description="The experiment's run folder.")
    train: TrainConfig | None = Field(None, description="Train the organism (its output is <run>/organism).")
    organism: str | None = Field(None, description="Or reuse an organism: an adapter or training run folder.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    prefs: bool = Field(True, description="Measure the judge-free preference shift organism - base (prefs.json).")
    validate_judge: int | None = Field(
        60, ge=2, description="Validate the judge on this many of emkit's labelled answers (stratified); None: skip."
    )
    report: bool = Field(True, description="Write report.html and figures.")

    NON_RESULT_FIELDS = frozenset({"output"})


def run_experiment(cfg: RunConfig, *, mirror: str | None = None, overwrite: bool = False,
                   emit: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run every stage of `cfg` in its run folder; returns the statistics and the report path."""
    from emkit.core.runfolder import RunFolder
    from emkit.generate.pipeline import load_question_set, resolve_organism
    from emkit.stages.generate import generate_stage
    from emkit.stages.judge import judge_stage, load_stats

    if cfg.train is not None and cfg.organism is not None:
        raise EmkitError("give either train (to train the organism) or organism (to reuse one), not both")
    run = RunFolder(cfg.output)
    questions = load_question_set(cfg.generate, mirror)  # bad question files fail before any folder exists
    if cfg.organism is not None:
        resolve_organism(cfg.organism)
    run.open("run", cfg, overwrite=overwrite)

    organism = cfg.organism
    if cfg.train is not None:
        from emkit.train.sft import train

        train_cfg = cfg.train.model_copy(update={"output": run.path / "organism"})
        emit(f"== train: {train_cfg.model} on {train_cfg.data} -> {train_cfg.output}")
        with run.stage("train") as record:
            result = train(train_cfg, mirror=mirror, emit=emit)
            record.update(skipped=result.skipped, steps=result.metrics.get("steps"))
        organism = str(result.run_dir)

    gen_cfg = cfg.generate.model_copy(update={"output": run.path, "adapter": organism})
    if cfg.train is not None:
        gen_cfg = gen_cfg.model_copy(update={"model": cfg.train.model})
    emit(f"== generate: {', '.join(gen_cfg.models)} x conditions {', '.join(gen_cfg.conditions)}")
    with run.stage("generate") as record:
        record.update(generate_stage(gen_cfg, run.path, mirror=mirror, emit=emit, progress=progress))

    from emkit.stages.judge import SKIPPED_NOTE, judge_kind
    from emkit.stages.preference import preference_stage
    from emkit.stages.validate import validate_stage

    stats = None
    judged = judge_kind(cfg.judge) != "skip"
    if judged:
        emit("== judge")
        with run.stage("judge") as record:
            record.update(judge_stage(run.path, cfg.judge, questions, emit=emit, progress=progress, mirror=mirror))
        run.update(judge=record["judge"])
        stats = load_stats(run.path)
    else:
        emit("== judge: skipped. " + SKIPPED_NOTE)
        run.update(judge={"id": None, "kind": "skipped", "note": SKIPPED_NOTE})

    if cfg.validate_judge and judged:
        emit(f"== validate the judge on {cfg.validate_judge} labelled answers")
        with run.stage("validate_judge") as record:
            record.update(validate_stage(run.path, cfg.judge, cfg.validate_judge, progress=progress))
        emit(record["verdict"])
    if cfg.prefs and organism is not None and "organism" in gen_cfg.models:
        emit("== preference shift (no judge)")
        with run.stage("prefs") as record:
            record.update(preference_stage(run.path, gen_cfg.model, organism, device=gen_cfg.device))

    report_path = None
    if cfg.report:
        from emkit.stages.report import write_report

        emit("== report")
        with run.stage("report") as record:
            report_path = write_report(run.path)
            record.update(path=str(report_path))
    run.complete(report=str(report_path) if report_path else None)
    return {"stats": stats, "report": report_path, "run": run.path}
