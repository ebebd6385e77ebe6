"""The generation stage: sample every planned answer into `generations.jsonl` (resuming), and `emkit generate`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from emkit.core.errors import EmkitError
from emkit.generate.config import GenerateConfig
from emkit.generate.pipeline import (
    GENERATIONS,
    build_jobs,
    chat_renderer,
    load_question_set,
    resolve_organism,
)
from emkit.generate.transformers_backend import SamplingParams


def generate_stage(cfg: GenerateConfig, run_dir: Path, *, mirror: str | None = None,
                   emit: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Sample all answers into `run_dir/generations.jsonl` (resuming), with the configured backend."""
    questions = load_question_set(cfg, mirror)
    organism = resolve_organism(cfg.adapter)
    if "organism" in cfg.models and organism is None and cfg.backend == "transformers":
        raise EmkitError("models includes 'organism' but no adapter is given (--adapter PATH or a training run)")
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size, cfg.seed)
    meta = {"model_spec": cfg.model, "adapter": str(organism) if organism else None, "backend": cfg.backend}
    path = run_dir / GENERATIONS
    if cfg.backend == "openai":
        from emkit.generate.openai_backend import generate_via_endpoint

        jobs = build_jobs(questions, cfg, lambda question, system: "")
        return generate_via_endpoint(cfg, jobs, params, path, meta=meta, emit=emit, progress=progress)
    from emkit.generate.transformers_backend import generate_to_file
    from emkit.models import load_model

    loaded = load_model(cfg.model, adapter=organism, device=cfg.device, dtype=cfg.dtype)
    jobs = build_jobs(questions, cfg, chat_renderer(loaded.tokenizer))
    emit(f"questions: {questions.name} ({len(questions)} questions), conditions: {', '.join(cfg.conditions)}, "
         f"models: {', '.join(cfg.models)}; {sum(j.samples for j in jobs)} answers planned")
    return generate_to_file(loaded, jobs, params, path, meta=meta, progress=progress, emit=emit)


def run_generate(cfg: GenerateConfig, *, mirror: str | None = None, overwrite: bool = False,
                 emit: Callable[[str], None] = print, progress: bool = True) -> Path:
    """`emkit generate`: check inputs, open (or resume) the run folder, generate, mark it complete."""
    from emkit.core.runfolder import RunFolder
    from emkit.models import parse_spec

    run = RunFolder(cfg.output)
    if not overwrite and run.open("generate", cfg, main_process=False) == "complete":
        from emkit.core.rowfile import problem

        recorded = ((run.read_manifest() or {}).get("results") or {}).get("generate") or {}
        damage = problem(run.path / GENERATIONS, recorded.get("answers"))
        if damage is None:
            emit(f"{cfg.output}: already complete (same config); nothing to do")
            return cfg.output
        emit(f"{damage}: the complete run is damaged; resuming to repair it")
        run.reopen(damage)
    load_question_set(cfg, mirror)
    resolve_organism(cfg.adapter)
    if cfg.backend == "transformers":
        parse_spec(cfg.model)
    run.open("generate", cfg, overwrite=overwrite)
    with run.stage("generate") as record:
        record.update(generate_stage(cfg, run.path, mirror=mirror, emit=emit, progress=progress))
    run.complete(generate=record)
    emit(f"done: {record['answers']} answers in {run.path / GENERATIONS}")
    return run.path
