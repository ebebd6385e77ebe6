"""`emkit judge compare`: the same answers of a run scored by several judges, side by side.

The same answers scored by different judges (another model, another endpoint, other prompts) can
give EM rates an order of magnitude apart, so a rate means little without its judge. For every
judge this gives the EM rate with its interval (`emkit.core.stats.em_rates.summarize`, the one implementation
every study uses), once over the answers that judge scored and once over the answers every judge
scored; for every pair of judges, Spearman's correlation of their scores and Cohen's kappa of
their EM flags, each over the answers both scored (an unscorable answer is left out, never read as
"not misaligned"), and the answers whose EM flag they disagree on (all counted, a few listed).

Judges are judge specs (`local:MODEL_SPEC`, `openai:MODEL[@BASE_URL]`, `constant:N`, `keywords`),
which judge what the cache lacks, or names of judges whose judgments are already in the run's
`judgments.sqlite` (`NAME`, or `NAME@ENDPOINT` where several endpoints served that name), which are
only read. Every judge uses the run's own judge prompts and EM rule (`judge_prompts.json`, the run's
judge config), unless other prompts are asked for. Results go to `judge_compare.json`.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emkit.core.errors import EmkitError
from emkit.judge.agreement import cohen_kappa, spearman
from emkit.judge.cache import JudgeResult, JudgingPass, JudgmentCache, as_item, endpoint_identity
from emkit.judge.config import JudgeConfig
from emkit.judge.prompts import JudgePrompt, as_prompts

COMPARE_FILE = "judge_compare.json"
EM_METRICS = ("aligned", "coherent")
# a cached judge with several methods is read in this order; the output counts which method scored what
_METHOD_ORDER = ("logprobs", "local-logits", "rule", "text")
_SPEC_KINDS = ("local", "openai", "constant")


@dataclass
class CachedJudge:
    """A judge known only by its judgments in a cache: they are read, nothing is asked."""

    judge_id: str
    endpoint_id: str
    methods: tuple[str, ...]
    min_mass: float | None = None

    def describe(self) -> str:
        """One line naming the judge."""
        return f"{self.judge_id} at {self.endpoint_id} (judgments read from the cache: {', '.join(self.methods)})"

    def judge_many_sync(self, items: Iterable[Any], metric_prompts: Mapping[str, str | JudgePrompt],
                        cache: JudgmentCache, progress: bool = True) -> list[JudgeResult]:
        """The cached judgment of every (item, metric), or an error result where the cache has none."""
        items = [as_item(item) for item in items]
        prompts = as_prompts(metric_prompts)
        plans = [JudgingPass.plan(self.judge_id, items, prompts, cache, self.min_mass, endpoint=self.endpoint_id,
                                  method=method) for method in self.methods]
        out = []
        for index, job in enumerate(plans[0].jobs):
            for plan in plans:
                key = plan.jobs[index].key
                if key in plan.known:
                    out.append(JudgeResult(job.item_id, job.metric, key, plan.known[key], cached=True))
                    break
            else:
                out.append(JudgeResult(job.item_id, job.metric, job.key, None,
                                       error=f"not in {cache.path} for judge {self.judge_id}"))
        return out


def resolve_judge(spec: str, cache: JudgmentCache, *, base_url: str | None = None,
                  api_key_env: str | None = None, min_mass: float = 0.25) -> Any:
    """A judge from a judge spec, or a `CachedJudge` for the name of a judge in `cache`."""
    from emkit.judge.validate import make_judge_from_spec

    if spec.partition(":")[0] in _SPEC_KINDS or spec == "keywords":
        return make_judge_from_spec(spec, base_url=base_url, api_key_env=api_key_env, min_mass=min_mass)
    name, identities = spec, cache.identities(spec)
    if not identities and "@" in spec:
        name, _, endpoint = spec.rpartition("@")
        wanted = {endpoint, endpoint_identity(endpoint)}
        identities = [i for i in cache.identities(name) if i[1] in wanted]
    if not identities:
        known = sorted({judge for judge, *_ in cache.identities()})
        raise EmkitError(f"judge '{spec}': not a judge spec (local:MODEL_SPEC, openai:MODEL[@BASE_URL], constant:N, "
                         f"keywords) nor a judge with judgments in {cache.path} (there: {', '.join(known) or 'none'})")
    endpoints = sorted({endpoint for _, endpoint, _, _ in identities})
    if len(endpoints) > 1:
        raise EmkitError(f"judge '{spec}': {cache.path} holds its judgments from {len(endpoints)} endpoints "
                         f"({', '.join(endpoints)}); name one as {name}@ENDPOINT")
    found = {method for _, _, method, _ in identities}
    methods = tuple(m for m in _METHOD_ORDER if m in found) + tuple(sorted(found - set(_METHOD_ORDER)))
    return CachedJudge(name, endpoints[0], methods, min_mass)


def _run_questions(run_dir: Path, mirror: str | None) -> Any:
    """The question set a run was generated from (its manifest's config), or None."""
    from emkit.core.runfolder import RunFolder
    from emkit.data.questions import resolve_questions

    config = (RunFolder(run_dir).read_manifest() or {}).get("config") or {}
    spec = config.get("questions") or (config.get("generate") or {}).get("questions")
    return resolve_questions(spec, mirror=mirror) if spec else None


def _groups(run_dir: Path, rows: list[dict[str, Any]], cfg: JudgeConfig, prompts: str | None,
            mirror: str | None) -> tuple[list[Any], str]:
    """The answers grouped by judge prompts: those the run recorded, or those `prompts` names."""
    from emkit.stages.judge import (
        PROMPTS_RECORD,
        describe_prompts,
        prompt_groups,
        read_prompt_record,
        recorded_groups,
    )

    record = read_prompt_record(run_dir) if prompts is None else None
    if record is not None:
        groups = recorded_groups(record, rows, list(EM_METRICS), str(run_dir / PROMPTS_RECORD))
        return groups, str(record.get("label") or describe_prompts(groups))
    chosen = cfg if prompts is None else cfg.model_copy(update={"prompts": prompts})
    questions = _run_questions(run_dir, mirror) if chosen.prompts == "auto" else None
    groups = prompt_groups(rows, questions, chosen, metrics=list(EM_METRICS), mirror=mirror)
    return groups, describe_prompts(groups)


def _number(x: Any) -> Any:
    """A JSON-ready scalar: numpy numbers as Python ones, NaN as None."""
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def _rates(df: Any, by: Sequence[str], thresholds: Any) -> list[dict[str, Any]]:
    """The overall row of every group of `summarize(df, by=["judge", *by])`, as records."""
    from emkit.core.stats.em_rates import ALL, summarize

    if df.empty:
        return []
    table = summarize(df, by=["judge", *by], thresholds=thresholds)
    overall = table[table["question_id"] == ALL]
    wanted = ["judge", *by, "n_questions", "n_answers", "n_scored", "n_coherent", "n_misaligned"]
    for rate in ("em_rate_coherent", "em_rate_scored"):
        wanted += [rate, f"{rate}_ci_low", f"{rate}_ci_high"]
    # the interval's unit, and the other intervals, under whatever names the statistics give them
    wanted += [c for c in table.columns if "unit" in c or c.startswith("em_rate_coherent_")]
    return [{c: _number(row[c]) for c in dict.fromkeys(wanted) if c in table.columns}
            for _, row in overall.iterrows()]


def _pair(a: str, b: str, wide: Any, thresholds: Any, listed: int) -> dict[str, Any]:
    """Agreement of judges a and b over the answers both scored."""
    import pandas as pd

    out: dict[str, Any] = {"a": a, "b": b}
    for metric in EM_METRICS:
        x, y = wide[(metric, a)], wide[(metric, b)]
        both = x.notna() & y.notna()
        out[f"n_{metric}_both"] = int(both.sum())
        out[f"spearman_{metric}"] = spearman(x[both], y[both])
    scored = pd.Series(True, index=wide.index)
    for judge, metric in itertools.product((a, b), EM_METRICS):
        scored &= wide[(metric, judge)].notna()
    flags = {j: pd.Series(thresholds.is_misaligned(wide[("aligned", j)].to_numpy(float),
                                                   wide[("coherent", j)].to_numpy(float)), index=wide.index)
             for j in (a, b)}
    fa, fb = flags[a][scored], flags[b][scored]
    out["n_em_both"] = int(scored.sum())
    out["kappa_em"] = cohen_kappa(fa.to_numpy(int), fb.to_numpy(int))
    out["agreement_em"] = float((fa == fb).mean()) if scored.any() else None
    out["n_em_a"], out["n_em_b"] = int(fa.sum()), int(fb.sum())
    differ = scored & (flags[a] != flags[b])
    out["n_disagree"] = int(differ.sum())
    # the largest gaps in aligned score first: the clearest cases of the judges reading an answer apart
    gap = (wide[("aligned", a)] - wide[("aligned", b)]).abs()[differ]
    shown = gap.sort_values(ascending=False, kind="stable").index[:listed]

    def scores(judge: str, answer_id: str) -> dict[str, Any]:
        return {"aligned": _number(wide.at[answer_id, ("aligned", judge)]),
                "coherent": _number(wide.at[answer_id, ("coherent", judge)]), "em": bool(flags[judge][answer_id])}

    out["disagreements"] = [
        {"id": answer_id, **{k: _number(wide.at[answer_id, (k, "")]) for k in ("question_id", "model", "condition")},
         "answer": str(wide.at[answer_id, ("answer", "")])[:400], a: scores(a, answer_id), b: scores(b, answer_id)}
        for answer_id in shown
    ]
    return out


def compare_judges(run_dir: Path, specs: Sequence[str], *, base_url: str | None = None,
                   api_key_env: str | None = None, min_mass: float | None = None, prompts: str | None = None,
                   by: Sequence[str] = (), mirror: str | None = None, listed: int = 5,
                   progress: bool = True) -> dict[str, Any]:
    """Score a run's answers with every judge of `specs` and compare them; writes `judge_compare.json`."""
    import pandas as pd

    from emkit.core.rowfile import read_rows
    from emkit.core.runfolder import atomic_write_json
    from emkit.stages.judge import CACHE, run_judge_config, thresholds_of

    specs = [s.strip() for s in specs if s.strip()]
    if len(specs) < 2 or len(set(specs)) != len(specs):
        raise EmkitError(f"--judges: give two or more different judges, got {', '.join(specs) or 'none'}")
    rows = read_rows(run_dir / "generations.jsonl")
    if not rows:
        raise EmkitError(f"{run_dir}: no answers to compare judges on (generations.jsonl is missing or empty)")
    recorded = run_judge_config(run_dir)
    cfg = recorded or JudgeConfig()
    thresholds = thresholds_of(cfg)
    mass = cfg.min_mass if min_mass is None else min_mass
    groups, label = _groups(run_dir, rows, cfg, prompts, mirror)
    records, judges_info = [], []
    with JudgmentCache(run_dir / CACHE) as cache:
        for spec in specs:
            judge = resolve_judge(spec, cache, base_url=base_url, api_key_env=api_key_env, min_mass=mass)
            results: list[JudgeResult] = []
            for group in groups:
                items = [(r["id"], r["question"], r["answer"]) for r in group.rows]
                results += judge.judge_many_sync(items, group.prompts, cache, progress=progress)
            scores: dict[str, dict[str, float]] = {}
            for res in results:
                value = res.judgment.score if res.judgment is not None else None
                scores.setdefault(res.item_id, {})[res.metric] = np.nan if value is None else value
            missing = Counter(res.metric for res in results if res.judgment is None)
            judges_info.append({
                "judge": spec, "id": judge.judge_id, "endpoint": judge.endpoint_id, "description": judge.describe(),
                "methods": dict(Counter(res.judgment.method for res in results if res.judgment is not None)),
                "not_judged": dict(missing),
                "example_error": next((res.error for res in results if res.judgment is None), None),
            })
            for row in rows:
                got = scores.get(str(row["id"]), {})
                records.append({"id": str(row["id"]), "question_id": row["question_id"], "model": row.get("model"),
                                "condition": row.get("condition"), "answer": row["answer"], "judge": spec,
                                "aligned": got.get("aligned", np.nan), "coherent": got.get("coherent", np.nan)})
    long = pd.DataFrame(records)
    long[["aligned", "coherent"]] = long[["aligned", "coherent"]].astype(float)
    wide = long.pivot(index="id", columns="judge", values=list(EM_METRICS))
    for column in ("question_id", "model", "condition", "answer"):
        wide[(column, "")] = long.drop_duplicates("id").set_index("id")[column]
    wide = wide.loc[[str(r["id"]) for r in rows]]  # the run's order
    scored_by_all = np.ones(len(wide), dtype=bool)
    for spec in specs:
        for metric in EM_METRICS:
            scored_by_all &= wide[(metric, spec)].notna().to_numpy()
    common_ids = set(wide.index[scored_by_all])
    by = list(by)
    rates = _rates(long, by, thresholds)
    common = _rates(long[long["id"].isin(common_ids)], by, thresholds)
    for info in judges_info:
        info["rates"] = [r for r in rates if r["judge"] == info["judge"]]
        info["rates_common"] = [r for r in common if r["judge"] == info["judge"]]
    result = {
        "run": str(run_dir), "n_answers": len(rows), "n_scored_by_all": int(scored_by_all.sum()),
        "rule": thresholds.rule(), "rule_source": "the run's judge config" if recorded else "emkit's defaults",
        "prompts": label, "min_mass": mass, "by": by,
        "rates_note": ("rates: each judge over the answers it scored on both metrics; rates_common: over the "
                       "answers every judge scored; agreement: over the answers both judges of a pair scored"),
        "judges": judges_info,
        "pairs": [_pair(a, b, wide, thresholds, listed) for a, b in itertools.combinations(specs, 2)],
    }
    atomic_write_json(run_dir / COMPARE_FILE, result)
    return result


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def compare_table(result: Mapping[str, Any]) -> str:
    """Plain-text summary for the console: EM rate per judge with its interval, and pairwise agreement."""
    lines = [(f"{result['n_answers']} answers of {result['run']}; judge prompts: {result['prompts']}; "
              f"EM rule: {result['rule']} ({result['rule_source']})"),
             f"scored on both metrics by every judge: {result['n_scored_by_all']}", ""]
    # answers "own": those the judge scored; "common": those every judge scored
    lines.append(f"{'judge':36} {'answers':7} {'group':16} {'scored':>6} {'EM rate (coherent)':>18} {'95% CI':>17}"
                 "  interval unit")
    for info in result["judges"]:
        for which, rows in (("own", info["rates"]), ("common", info["rates_common"])):
            for r in rows:
                group = "/".join(str(r.get(k)) for k in result["by"]) or "all"
                ci = (f"[{_fmt(r.get('em_rate_coherent_ci_low'), '.1%')}, "
                      f"{_fmt(r.get('em_rate_coherent_ci_high'), '.1%')}]")
                lines.append(f"{info['judge'][:36]:36} {which:7} {group[:16]:16} {r.get('n_scored', 0):>6} "
                             f"{_fmt(r.get('em_rate_coherent'), '.1%'):>18} {ci:>17}  {r.get('ci_unit') or ''}")
        if info["not_judged"]:
            lines.append(f"  {info['judge']}: not judged {info['not_judged']} ({info['example_error']})")
    lines.append("")
    lines.append(f"{'judge a':28} {'judge b':28} {'Spearman al.':>12} {'kappa EM':>9} {'agree':>6} {'differ':>7}")
    for pair in result["pairs"]:
        lines.append(f"{pair['a'][:28]:28} {pair['b'][:28]:28} {_fmt(pair['spearman_aligned']):>12} "
                     f"{_fmt(pair['kappa_em']):>9} {_fmt(pair['agreement_em'], '.0%'):>6} "
                     f"{pair['n_disagree']:>4}/{pair['n_em_both']}")
    return "\n".join(lines)
