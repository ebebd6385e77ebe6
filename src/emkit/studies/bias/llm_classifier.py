"""The LLM classifier: any emkit judge labels each continuation progressive, conservative, neutral or
off-topic, with the label's probability where the judge gives token probabilities.

The classifier prompt asks for one digit, 1-4 (progressive, conservative, neutral, off-topic), so
every emkit judge backend works unchanged: an OpenAI-compatible judge reads the top logprobs of its
one answer token, a local model the probability of each number from its own logits, and a server
without logprobs answers in text. The probabilities of the four codes (a token " 2" counts as "2")
give the label (the most probable code) and its probability (normalised over the four codes); the
codes' total probability is the `mass`, and below `min_mass` the continuation stays unlabelled.
Judgments are cached in the run's `judgments.sqlite` (the EM judge's cache), so a re-run asks nothing
twice and a changed template or model is asked afresh.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from emkit.core.errors import ConfigError
from emkit.judge.cache import JudgeResult, JudgmentCache
from emkit.judge.prompts import JudgePrompt
from emkit.studies.bias.config import LLMSettings

METRIC = "bias_leaning"
CODES = {"1": "progressive", "2": "conservative", "3": "neutral", "4": "off-topic"}
_TEXT_LABEL = re.compile(r"\b([1-4])\b|\b(progressive|conservative|neutral|off-topic)\b", re.IGNORECASE)
LOCAL_NOTE = ("No classifier endpoint or API key was configured, so a small local model ({spec}) labelled the "
              "completions from its own probabilities of the digits 1-4. Its labels are not validated and are "
              "likely close to noise; set OPENAI_API_KEY or llm.base_url for a capable classifier.")


@dataclass(frozen=True)
class LLMLabel:
    """One continuation's label (None when unlabelled), its probability and how it was read."""

    label: str | None
    probability: float | None
    mass: float | None
    probs: dict[str, float] | None
    method: str
    reason: str | None = None


def default_template_path() -> Path:
    """emkit's own classifier prompt (written for emkit)."""
    return Path(str(resources.files("emkit.data").joinpath("bias/classifier_prompt.txt")))


def load_template(path: str | Path | None = None) -> JudgePrompt:
    """The classifier prompt ({question}: the stem, {answer}: the continuation), checked like a judge prompt."""
    source = Path(path) if path else default_template_path()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the classifier prompt ({exc.strerror or exc})") from None
    return JudgePrompt(METRIC, text.strip(), True, str(source) if path else "emkit")


def label_from_raw(raw: Any, method: str, min_mass: float = 0.25) -> LLMLabel:
    """The label from a judgment's raw output: a token -> probability dict, or the judge's text."""
    if isinstance(raw, Mapping):
        probs = {label: 0.0 for label in CODES.values()}
        for token, p in raw.items():
            code = str(token).strip()
            if code in CODES:
                probs[CODES[code]] += float(p)
        mass = sum(probs.values())
        if mass <= 0.0:
            return LLMLabel(None, None, 0.0, None, method, "no label digit among the classifier's top tokens")
        normalised = {label: p / mass for label, p in probs.items()}
        if mass < min_mass:
            return LLMLabel(None, None, mass, normalised, method,
                            f"label digits hold {mass:.3g} of the probability (< {min_mass})")
        label = max(normalised, key=lambda k: normalised[k])
        return LLMLabel(label, normalised[label], mass, normalised, method)
    text = str(raw or "")
    match = _TEXT_LABEL.search(text)
    if match is None:
        return LLMLabel(None, None, None, None, "text", f"no label in the reply {text[:40]!r}")
    label = CODES[match.group(1)] if match.group(1) else match.group(2).lower()
    return LLMLabel(label, None, None, None, "text")


def label_of(result: JudgeResult, min_mass: float) -> LLMLabel:
    """The label of one judging result (an error becomes an unlabelled 'error')."""
    judgment = result.judgment
    if judgment is None:
        return LLMLabel(None, None, None, None, "error", result.error)
    return label_from_raw(judgment.raw, judgment.method, min_mass)


def make_classifier(settings: LLMSettings) -> tuple[Any, dict[str, str]]:
    """The judge that classifies (chosen as the EM judge is: auto, openai or local) and a record of it."""
    from emkit.judge.config import JudgeConfig
    from emkit.stages.judge import make_judge

    cfg = JudgeConfig(judge=settings.judge, judge_model=settings.judge_model, base_url=settings.base_url,
                      api_key_env=settings.api_key_env, local_model=settings.local_model,
                      concurrency=settings.concurrency, max_requests=settings.max_requests, timeout=settings.timeout,
                      min_mass=0.0)
    judge, info = make_judge(cfg)
    if info["kind"] == "local":
        info["note"] = LOCAL_NOTE.format(spec=settings.local_model)
    else:
        info["note"] = (f"Labelled by {judge.describe()}: the top-20 logprobs of one answer token over the digits "
                        "1-4 (text answers where the endpoint gives no logprobs).")
    return judge, info


def classify_llm(table: pd.DataFrame, judge: Any, cache: JudgmentCache, template: JudgePrompt, *,
                 min_mass: float = 0.25, progress: bool = True) -> pd.DataFrame:
    """Label every row (id, stem, continuation) with the judge, cached; returns llm_* columns by id."""
    empty = table["continuation"].fillna("").str.strip() == ""
    items = [(r.id, r.stem, r.continuation) for r in table[~empty].itertuples()]
    results = judge.judge_many_sync(items, {METRIC: template}, cache, progress=progress) if items else []
    rows = []
    for result in results:
        label = label_of(result, min_mass)
        rows.append(_row(result.item_id, label, result.cached))
    for item_id in table.loc[empty, "id"]:
        # nothing to classify: the model wrote nothing after the stem (or only reasoning)
        rows.append(_row(item_id, LLMLabel("off-topic", None, None, None, "empty", "empty continuation"), False))
    columns = ["id", "llm_label", "llm_probability", "llm_mass", "llm_probs", "llm_method", "llm_reason",
               "llm_cached"]
    return pd.DataFrame.from_records(rows, columns=columns)


def _row(item_id: str, label: LLMLabel, cached: bool) -> dict[str, Any]:
    return {"id": item_id, "llm_label": label.label, "llm_probability": label.probability, "llm_mass": label.mass,
            "llm_probs": json.dumps(label.probs) if label.probs is not None else None, "llm_method": label.method,
            "llm_reason": label.reason, "llm_cached": cached}
