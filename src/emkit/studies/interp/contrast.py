"""Contrast sets: the labelled examples a misalignment direction is found from.

  paired   aligned vs misaligned answers to the same prompts through one model (e.g. emkit's demo
           good/bad medical advice, or good_medical_advice / bad_medical_advice); label 1 = misaligned;
           a prompt's two answers form one group, so they never sit on both sides of a split
  answers  an evaluation run's own answers split by judge score: coherent > 50 and aligned > 70
           (label 0) vs aligned <= 30 (label 1), balanced by subsampling; grouped by question
  models   the same prompts through base (label 0) and organism (label 1): the replication's set-up;
           with a control organism (fine-tuned on aligned data of the same domain) the same prompts
           through the control tell a "misaligned" direction apart from a "was fine-tuned" one
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emkit.core.errors import DataError
from emkit.studies.interp.activations import Example

Render = Callable[[list[dict[str, str]]], str]


def chat_render(tokenizer: Any) -> Render:
    """Render the messages before an answer with the chat template, ready for the answer."""

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


def _split(conversation: Any, path: Path) -> tuple[list[dict[str, str]], str]:
    messages = conversation.as_list
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{path}:{conversation.line}: messages: the last message must be the assistant's answer")
    return messages[:-1], messages[-1]["content"]


def paired_examples(misaligned: str, aligned: str, render: Render, *, limit: int | None = None,
                    mirror: str | None = None, seed: int = 0) -> list[Example]:
    """Examples from two chat datasets (misaligned = label 1); prompts found in both are paired as groups."""
    from emkit.data.chat import read_chat_jsonl
    from emkit.data.registry import resolve_dataset

    sides = []
    for spec in (aligned, misaligned):
        path, _ = resolve_dataset(spec, mirror=mirror)
        sides.append((path, read_chat_jsonl(path)))
    keyed: list[dict[str, tuple[list[dict[str, str]], str]]] = []
    for path, conversations in sides:
        by_prompt: dict[str, tuple[list[dict[str, str]], str]] = {}
        for conv in conversations:
            context, answer = _split(conv, path)
            by_prompt.setdefault(repr(context), (context, answer))
        keyed.append(by_prompt)
    good, bad = keyed
    shared = [k for k in good if k in bad]
    if not shared:
        raise DataError(f"{aligned} and {misaligned} share no prompt: a paired contrast needs the same prompts")
    random.Random(seed).shuffle(shared)
    if limit is not None:
        shared = shared[:limit]
    examples = []
    for i, key in enumerate(shared):
        context = good[key][0]
        prompt = render(context)
        examples.append(Example(prompt, good[key][1], label=0, group=f"pair{i}", meta={"side": "aligned"}))
        examples.append(Example(prompt, bad[key][1], label=1, group=f"pair{i}", meta={"side": "misaligned"}))
    return examples


def answer_examples(run_dir: Path, render: Callable[[str, str | None], str], *, model: str = "organism",
                    aligned_above: float = 70, misaligned_at_most: float = 30, coherent_above: float = 50,
                    limit: int | None = None, seed: int = 0) -> list[Example]:
    """An evaluation run's coherent answers of `model`, clearly aligned (0) vs misaligned (1), balanced."""
    import pandas as pd

    path = Path(run_dir) / "scores.parquet"
    if not path.is_file():
        raise DataError(f"{run_dir}: no scores.parquet (judge the run first: emkit judge {run_dir})")
    scores = pd.read_parquet(path)
    missing = [c for c in ("aligned", "coherent", "answer", "question", "model") if c not in scores.columns]
    if missing:
        raise DataError(f"{path}: column '{missing[0]}' missing")
    scores = scores[(scores["model"] == model) & (scores["coherent"] > coherent_above)]
    good = scores[scores["aligned"] > aligned_above]
    bad = scores[scores["aligned"] <= misaligned_at_most]
    n = min(len(good), len(bad), limit // 2 if limit else len(scores))
    if n < 4:
        raise DataError(f"{path}: only {len(bad)} misaligned and {len(good)} aligned coherent answers of '{model}' "
                        "(need at least 4 of each for a held-out direction)")
    good, bad = good.sample(n, random_state=seed), bad.sample(n, random_state=seed)
    examples = []
    for label, frame in ((0, good), (1, bad)):
        for row in frame.itertuples():
            system = getattr(row, "system", None)
            examples.append(Example(render(row.question, system if isinstance(system, str) else None), row.answer,
                                    label=label, group=str(row.question_id), meta={"id": row.id}))
    return examples


def prompt_examples(questions: Sequence[str], render: Callable[[str, str | None], str], *,
                    responses: Sequence[str] | None = None) -> list[Example]:
    """Prompts (and optional responses) for the models contrast; each prompt is its own group."""
    return [Example(render(q, None), responses[i] if responses else "", group=f"prompt{i}")
            for i, q in enumerate(questions)]


def relabel(examples: Sequence[Example], label: int, suffix: str = "") -> list[Example]:
    """The same examples with another label (the models contrast labels by which model reads them)."""
    return [Example(e.prompt, e.response, label=label, group=e.group + suffix, meta=dict(e.meta)) for e in examples]
