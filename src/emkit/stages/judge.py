"""The judging stage: `generations.jsonl` -> `judgments.sqlite` (cache) -> `scores.parquet`, `stats.json`.

The judge is chosen by `JudgeConfig.judge`: `auto` takes an OpenAI-compatible judge when a base URL
or an API key is configured, and otherwise the local model, and says so in plain words. The judge
prompts are chosen by `JudgeConfig.prompts`; which prompts judged which questions is written to
`judge_prompts.json` (templates included), and their name to the judge info in `stats.json`, so
validation and `emkit judge compare` use the very prompts the run was judged with.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emkit.core.endpoint import api_key_for
from emkit.core.errors import EmkitError
from emkit.core.rowfile import read_rows
from emkit.core.runfolder import atomic_write_json, atomic_write_parquet
from emkit.core.stats.em_rates import Thresholds, stats_json
from emkit.data.questions import QuestionSet
from emkit.judge.cache import JudgmentCache
from emkit.judge.config import JudgeConfig
from emkit.judge.prompts import JudgePrompt, default_prompts, prompt_set, prompts_from

SCORES = "scores.parquet"
STATS = "stats.json"
CACHE = "judgments.sqlite"
PROMPTS_RECORD = "judge_prompts.json"
LOCAL_NOTE = (
    "No judge endpoint or API key was configured, so a small local model ({spec}) judged the answers "
    "by the probability it gives each number 0-100. Its scores are not validated; the EM rates below are "
    "not evidence of misalignment on their own. Set OPENAI_API_KEY or judge.base_url for a real judge."
)


METHOD_WORDS = {
    "logprobs": "top-20 logprobs of one token, expected value over 0-100",
    "text": "the number in a short text reply (the endpoint gave no logprobs)",
    "local-logits": "the local model's probabilities of the numbers 0-100, expected value",
}


def describe_methods(methods: Mapping[str, int]) -> str:
    """How the answers were actually scored, in words, with counts when more than one way was used."""
    if len(methods) == 1:
        return METHOD_WORDS.get(next(iter(methods)), next(iter(methods)))
    return "; ".join(f"{METHOD_WORDS.get(m, m)} for {n} judgments" for m, n in sorted(methods.items()))


SKIPPED_NOTE = (
    "No judge endpoint or API key was configured, and this run skips the local judge (judge.without_endpoint: "
    "skip): a small local model is not a valid judge of EM rates, so no judged EM rate was measured. Set "
    "OPENAI_API_KEY or judge.base_url and re-run to judge the answers; the judge-free preference shift leads."
)


def judge_kind(cfg: JudgeConfig) -> str:
    """The judge a config resolves to here and now: openai, local, or skip (no endpoint, local not wanted)."""
    if cfg.judge != "auto":
        return cfg.judge
    configured = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or api_key_for(None, cfg.api_key_env)
    if configured:
        return "openai"
    return "local" if cfg.without_endpoint == "local" else "skip"


def make_judge(cfg: JudgeConfig) -> tuple[Any, dict[str, str]]:
    """The judge `cfg` asks for, and a record of it (id, kind, description, plain-words note)."""
    kind = judge_kind(cfg)
    if kind == "skip":
        kind = "local"  # asked for a judge anyway (e.g. `emkit judge RUN`): the local one, with its warning
    if kind == "openai":
        from emkit.judge.openai_judge import OpenAIJudge

        judge = OpenAIJudge(model=cfg.judge_model, base_url=cfg.base_url, api_key_env=cfg.api_key_env,
                            concurrency=cfg.concurrency, timeout=cfg.timeout, max_requests=cfg.max_requests,
                            min_mass=cfg.min_mass)
        note = f"Judged by {judge.describe()}: {METHOD_WORDS['logprobs']}."
    else:
        from emkit.judge.local_judge import LocalJudge

        judge = LocalJudge(cfg.local_model, min_mass=cfg.min_mass)
        note = LOCAL_NOTE.format(spec=cfg.local_model)
    return judge, {"id": judge.judge_id, "kind": kind, "endpoint": judge.endpoint_id, "description": judge.describe(),
                   "note": note}


def thresholds_of(cfg: JudgeConfig) -> Thresholds:
    """The EM thresholds of a judge config."""
    return Thresholds(cfg.aligned_below, cfg.coherent_above, cfg.aligned_inclusive)


def prompts_for(question_id: str, questions: QuestionSet | None, metrics: list[str], prompts: str = "auto", *,
                base: Mapping[str, JudgePrompt] | None = None) -> dict[str, JudgePrompt]:
    """Judge prompts of one question under the prompt choice `prompts` (see `JudgeConfig.prompts`)."""
    return _question_prompts(question_id, questions, metrics, prompts, base)[0]


def _question_prompts(question_id: str, questions: QuestionSet | None, metrics: list[str], prompts: str,
                      base: Mapping[str, JudgePrompt] | None) -> tuple[dict[str, JudgePrompt], str]:
    """A question's prompts and the name of where they come from."""
    if prompts == "auto":
        available: dict[str, JudgePrompt] = dict(base if base is not None else default_prompts())
        label = "emkit"
        if questions is not None and question_id in questions.ids:
            own = questions[question_id].judges
            if own:
                available.update(prompts_from(own, source=f"{questions.name}:{question_id}"))
                taken = [m for m in metrics if m in own]
                label = f"question file {questions.name}" + ("" if len(taken) == len(metrics) else " + emkit")
    else:
        # a named set is used for every question, whatever prompts its file gives
        available, label = dict(base if base is not None else prompt_set(prompts)), prompts
    missing = [m for m in metrics if m not in available]
    if missing:
        raise EmkitError(f"judge prompts '{label}': no judge prompt for metric(s) {', '.join(missing)} "
                         f"(available: {', '.join(available)})")
    return {m: available[m] for m in metrics}, label


@dataclass
class PromptGroup:
    """Answers judged with one set of prompts, and the name of that set."""

    label: str
    prompts: dict[str, JudgePrompt]
    rows: list[dict[str, Any]] = field(default_factory=list)


def prompt_groups(rows: list[dict[str, Any]], questions: QuestionSet | None, cfg: JudgeConfig,
                  metrics: list[str] | None = None, mirror: str | None = None) -> list[PromptGroup]:
    """The run's answers grouped by the judge prompts `cfg` gives them (one group per distinct set)."""
    metrics = list(metrics or cfg.metrics)
    base = default_prompts() if cfg.prompts == "auto" else prompt_set(cfg.prompts, mirror=mirror)
    groups: dict[tuple, PromptGroup] = {}
    for row in rows:
        prompts, label = _question_prompts(row["question_id"], questions, metrics, cfg.prompts, base)
        signature = tuple((m, p.template) for m, p in prompts.items())
        groups.setdefault(signature, PromptGroup(label, prompts)).rows.append(row)
    return list(groups.values())


def describe_prompts(groups: list[PromptGroup]) -> str:
    """The name of the prompts that judged a run, e.g. 'betley', or 'mixed: a (10 answers), b (4 answers)'."""
    counts: Counter[str] = Counter()
    for group in groups:
        counts[group.label] += len(group.rows)
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed: " + ", ".join(f"{label} ({n} answers)" for label, n in counts.most_common())


def write_prompt_record(run_dir: Path, groups: list[PromptGroup], cfg: JudgeConfig) -> None:
    """Write `judge_prompts.json`: the prompt choice, and each set's templates and questions."""
    record = {
        "prompts": cfg.prompts, "label": describe_prompts(groups),
        "sets": [{"label": g.label, "answers": len(g.rows),
                  "question_ids": sorted({str(r["question_id"]) for r in g.rows}),
                  "templates": {m: p.template for m, p in g.prompts.items()}} for g in groups],
    }
    atomic_write_json(run_dir / PROMPTS_RECORD, record)


def read_prompt_record(run_dir: Path) -> dict[str, Any] | None:
    """`judge_prompts.json` of a judged run, or None when the run was judged before it was written."""
    path = run_dir / PROMPTS_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise EmkitError(f"{path}: unreadable ({exc}); re-run `emkit judge run` to write it again") from None
    if not isinstance(record, dict) or not isinstance(record.get("sets"), list):
        raise EmkitError(f"{path}: sets: missing; re-run `emkit judge run` to write it again")
    return record


def recorded_groups(record: Mapping[str, Any], rows: list[dict[str, Any]], metrics: list[str],
                    source: str = PROMPTS_RECORD) -> list[PromptGroup]:
    """The answers `rows` grouped by the prompts the record says judged their questions."""
    by_question: dict[str, PromptGroup] = {}
    for index, entry in enumerate(record["sets"]):
        templates = entry.get("templates") or {}
        missing = [m for m in metrics if m not in templates]
        if missing:
            raise EmkitError(f"{source}: sets[{index}].templates: no prompt for {', '.join(missing)}")
        group = PromptGroup(str(entry.get("label", f"set {index}")),
                            {m: JudgePrompt(m, templates[m], True, f"{source}: sets[{index}]") for m in metrics})
        for qid in entry.get("question_ids") or []:
            by_question[str(qid)] = group
    groups: dict[int, PromptGroup] = {}
    for row in rows:
        group = by_question.get(str(row["question_id"]))
        if group is None:
            raise EmkitError(f"{source}: no judge prompts recorded for question '{row['question_id']}'")
        groups.setdefault(id(group), group).rows.append(row)
    return list(groups.values())


def run_judge_config(run_dir: Path) -> JudgeConfig | None:
    """The judge config a run folder was judged under (from its manifest), or None when it records none."""
    from emkit.core.runfolder import RunFolder

    manifest = RunFolder(run_dir).read_manifest() or {}
    data = manifest.get("judge_config") or (manifest.get("config") or {}).get("judge")
    if not isinstance(data, dict):
        return None
    try:
        return JudgeConfig.model_validate(data)
    except ValueError as exc:
        raise EmkitError(f"{run_dir / 'manifest.json'}: judge config: {exc}") from None


def judge_stage(run_dir: Path, cfg: JudgeConfig, questions: QuestionSet | None = None, *,
                emit: Callable[[str], None] = print, progress: bool = True,
                mirror: str | None = None) -> dict[str, Any]:
    """Judge every answer of the run on every metric (cached), then write scores and statistics."""
    import pandas as pd

    rows = read_rows(run_dir / "generations.jsonl")
    if not rows:
        raise EmkitError(f"{run_dir}: no answers to judge (generations.jsonl is missing or empty)")
    judge, info = make_judge(cfg)
    emit(info["note"])
    groups = prompt_groups(rows, questions, cfg, mirror=mirror)
    info["prompts"] = describe_prompts(groups)
    # the note is what reports print about the judge: it names the prompts, since the same answers
    # scored under another project's prompts can give a very different EM rate
    info["note"] += f" Judge prompts: {info['prompts']}."
    emit(f"Judge prompts: {info['prompts']}.")
    results = []
    with JudgmentCache(run_dir / CACHE) as cache:
        legacy = cache.legacy_count(judge.judge_id)
        if legacy:
            emit(f"{run_dir / CACHE} holds {legacy} judgments of {judge.judge_id} cached by an older emkit, whose "
                 "keys lack the endpoint and scoring method; they are not reused, and those answers are judged again.")
        for group in groups:
            items = [(r["id"], r["question"], r["answer"]) for r in group.rows]
            results += judge.judge_many_sync(items, group.prompts, cache, progress=progress)
        usage = cache.usage(judge.judge_id)
    write_prompt_record(run_dir, groups, cfg)
    methods = Counter(res.judgment.method for res in results if res.judgment is not None)
    info["methods"] = dict(methods)
    if info["kind"] == "openai" and methods:
        # Say what the judge did, not what it was asked to do: an endpoint without logprobs is read as text.
        info["note"] = info["note"].replace(f"{METHOD_WORDS['logprobs']}.", describe_methods(methods) + ".")
        info["method"] = describe_methods(methods)
    if len(methods) > 1:
        # e.g. an endpoint that gave logprobs for some answers and text for others: the scores are
        # not of one kind, and the reader must know (scores.parquet has each answer's method)
        info["methods_note"] = ("Scores of this run come from more than one scoring method (" +
                                ", ".join(f"{m}: {n}" for m, n in methods.most_common()) +
                                "); the columns <metric>_method of scores.parquet say which answer got which.")
        info["note"] += " " + info["methods_note"]
        emit("WARNING: " + info["methods_note"])
    by_id: dict[str, dict[str, Any]] = {}
    failed = []
    for res in results:
        out = by_id.setdefault(res.item_id, {})
        j = res.judgment
        out[res.metric] = j.score if j and j.score is not None else float("nan")
        out[f"{res.metric}_mass"] = j.mass if j and j.mass is not None else float("nan")
        out[f"{res.metric}_method"] = j.method if j else "error"
        out[f"{res.metric}_reason"] = (j.reason if j else res.error)
        if j is None:
            failed.append(res)
    keep = ["id", "model", "condition", "question_id", "paraphrase", "sample", "question", "system", "answer"]
    table = pd.DataFrame([{**{k: r.get(k) for k in keep}, **by_id[r["id"]], "judge": info["id"]} for r in rows])
    atomic_write_parquet(run_dir / SCORES, table)
    stats = stats_json(table, thresholds_of(cfg))
    stats["judge"] = info
    atomic_write_json(run_dir / STATS, stats)
    if failed:
        raise EmkitError(f"{len(failed)} judgments failed (e.g. {failed[0].error}); scores so far are saved and "
                         "cached; re-run to retry only those")
    scored = {m: int(table[m].notna().sum()) for m in cfg.metrics}
    return {"judge": info, "answers": len(table), "scored": scored, "usage": usage,
            "judgments": len(results)}


def load_stats(run_dir: Path) -> dict[str, Any]:
    """The statistics written by the judging stage."""
    try:
        return json.loads((run_dir / STATS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmkitError(f"{run_dir}: no {STATS} yet (run `emkit judge {run_dir}` first)") from None
