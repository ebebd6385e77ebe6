"""Judges: score answers 0-100 per metric (aligned, coherent, ...) and cache every judgment.

- `aggregate`: the original protocol's score from a judge's number-token probabilities.
- `prompts`: emkit's own judge prompts, an upstream project's named set, or those a question file gives.
- `cache`: the SQLite judgment cache (`judgments.sqlite`, keyed by judge, endpoint and scoring method),
  the jobs and results of a judging pass.
- `openai_judge`: a judge on any OpenAI-compatible endpoint.
- `validate`: a judge against labelled answers; `compare`: several judges on the same answers of a run;
  `agreement`: kappa and Spearman between two raters, None where undefined.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emkit.judge.aggregate import MIN_MASS, JudgeScore, score_from_logprobs, score_from_probs, score_from_text
from emkit.judge.cache import (
    JudgeBudgetExceeded,
    JudgeError,
    JudgeItem,
    JudgeResult,
    Judgment,
    JudgmentCache,
    endpoint_identity,
    judgment_key,
    plan_jobs,
)
from emkit.judge.prompts import (
    PROMPT_SETS,
    JudgePrompt,
    default_prompts,
    load_prompts,
    prompt_set,
    prompts_from,
)

if TYPE_CHECKING:
    from emkit.judge.openai_judge import OpenAIJudge


def __getattr__(name: str) -> Any:
    # importing openai takes about a second; the cache and a local judge should not pay for it
    if name == "OpenAIJudge":
        from emkit.judge import openai_judge

        return openai_judge.OpenAIJudge
    raise AttributeError(f"module 'emkit.judge' has no attribute {name!r}")


__all__ = [
    "MIN_MASS",
    "PROMPT_SETS",
    "JudgeBudgetExceeded",
    "JudgeError",
    "JudgeItem",
    "JudgePrompt",
    "JudgeResult",
    "JudgeScore",
    "Judgment",
    "JudgmentCache",
    "OpenAIJudge",
    "default_prompts",
    "endpoint_identity",
    "judgment_key",
    "load_prompts",
    "plan_jobs",
    "prompt_set",
    "prompts_from",
    "score_from_logprobs",
    "score_from_probs",
    "score_from_text",
]
