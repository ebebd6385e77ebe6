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
from emkit.generate.transformers_backend import PromptJob

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
