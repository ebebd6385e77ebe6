"""The generation stage: questions x conditions x models -> `generations.jsonl` in a run folder.

A question's own system prompt (as in the upstream `_json` questions) takes the place of the
condition's; every row records the system prompt it was actually asked with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from emkit.core.errors import EmkitError
from emkit.data.questions import QuestionSet, resolve_questions
from emkit.generate.config import GenerateConfig
from emkit.generate.transformers_backend import PromptJob, SamplingParams

GENERATIONS = "generations.jsonl"


def resolve_organism(adapter: str | None) -> Path | None:
    """An organism is an adapter folder, or a training run folder holding one in `adapter/`."""
    if adapter is None:
        return None
    path = Path(adapter).expanduser()
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise EmkitError(f"{path}: no LoRA adapter here (expected adapter_config.json, or a run folder with adapter/)")


def build_jobs(questions: QuestionSet, cfg: GenerateConfig, render: Callable[[str, str | None], str]) -> list[PromptJob]:
    """One job per (model, condition, question, paraphrase) in assistant mode, where `render` turns
    (question, system) into a chat prompt; per (model, question, document) in predictive mode and per
    (model, question, paraphrase) in raw mode, whose prompts use no template (see `emkit.generate.modes`)."""
    from emkit.generate.modes import documents_for, render_document, turn_pattern, turn_stops

    jobs = []
    for model in cfg.models:
        for mode in cfg.modes:
            if mode == "assistant":
                for condition, condition_system in cfg.conditions.items():
                    for row in questions.expand(cfg.samples):
                        system = row.system if row.system is not None else condition_system
                        jobs.append(PromptJob(
                            model=model, condition=condition, question_id=row.question_id,
                            paraphrase=row.paraphrase_index, question=row.text, system=system,
                            prompt=render(row.text, system), samples=row.samples,
                        ))
            elif mode == "raw":
                for row in questions.expand(cfg.samples):
                    jobs.append(PromptJob(
                        model=model, condition="raw", question_id=row.question_id, paraphrase=row.paraphrase_index,
                        question=row.text, system=None, prompt=row.text, samples=row.samples, mode="raw",
                    ))
            else:
                for question in questions:
                    # The judge sees the question as asked (its first paraphrase), not the document.
                    for index, document in enumerate(documents_for(question)):
                        prompt = render_document(document, question.text)
                        jobs.append(PromptJob(
                            model=model, condition="predictive", question_id=question.id, paraphrase=index,
                            question=question.text, system=None, prompt=prompt,
                            samples=cfg.samples or question.samples, mode="predictive",
                            stops=turn_stops(document, prompt), stop_pattern=turn_pattern(prompt),
                            genre=document.genre,
                        ))
    return jobs


def chat_renderer(tokenizer: Any) -> Callable[[str, str | None], str]:
    """Render a question (and optional system prompt) with the chat template, ready for the answer."""

    def render(question: str, system: str | None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


def load_question_set(cfg: GenerateConfig, mirror: str | None = None) -> QuestionSet:
    """The configured questions, filtered to `include`."""
    questions = resolve_questions(cfg.questions, mirror=mirror)
    if cfg.include:
        questions = questions.filter(include=cfg.include)
    return questions


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
