"""The report stage: figures and one self-contained HTML page from a run folder's evaluation results.

Reads `scores.parquet` (one row per judged answer), `stats.json` (`emkit.core.stats.em_rates.stats_json`) and
`manifest.json`, and writes, each file atomically, `figures/*.png` and then `report.html`:

    write_report(Path("runs/x"))        # -> runs/x/report.html
    print(headline_table(stats))        # the console summary `emkit run` prints at the end

Either results file may be missing (imported results may come without stats, a stats-only run
without answers); the report shows what there is. Given `thresholds` that differ from those of
`stats.json`, the statistics are recomputed from the answers (stats.json itself is left alone).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd

from emkit.core.errors import EmkitError, RunFolderError
from emkit.core.runfolder import RunFolder, atomic_write_text
from emkit.core.stats.em_rates import ALL, BETLEY, COUNTS, DENOMINATORS, RATES, Thresholds, stats_json
from emkit.stages.report.figures import FIGURES, model_order, render_figures, write_png
from emkit.stages.report.html import (
    JudgeInfo,
    ReportInputs,
    fmt_ci,
    fmt_p,
    fmt_pp,
    fmt_rate,
    fmt_score,
    judge_kind,
    render_html,
)

SCORES = "scores.parquet"
STATS = "stats.json"
REPORT = "report.html"
FIGURES_DIR = "figures"
SUMMARY_KEYS = ("model", "condition", "question_id")

__all__ = [
    "FIGURES",
    "FIGURES_DIR",
    "REPORT",
    "headline_table",
    "judge_info",
    "load_scores",
    "load_stats",
    "stats_frame",
    "write_report",
]


def load_scores(run_dir: Path) -> pd.DataFrame | None:
    """The run's judged answers (`scores.parquet`), or None when it has none."""
    path = Path(run_dir) / SCORES
    if not path.exists():
        return None
    try:
        scores = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"{path}: unreadable ({exc}); re-run the judge stage") from None
    if "id" in scores and not scores["id"].is_unique:
        repeated = scores.loc[scores["id"].duplicated(), "id"].iloc[0]
        raise RunFolderError(f"{path}: answer {repeated} appears more than once; re-run the judge stage")
    # Results imported without these columns still draw, as one model under one condition.
    for column in ("model", "condition"):
        if column not in scores:
            scores[column] = "all"
    scores["model"] = scores["model"].astype(str)
    scores["condition"] = scores["condition"].astype(str)
    return scores


def load_stats(run_dir: Path) -> dict[str, Any] | None:
    """The run's statistics (`stats.json`), or None when it has none."""
    path = Path(run_dir) / STATS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path}: unreadable ({exc}); re-run `emkit stats`") from None


def _group_keys(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in ("overall", "questions")}


def _labels(keys: Mapping[str, Any]) -> dict[str, str]:
    """A group's model and condition labels; extra grouping columns join the condition label."""
    others = [f"{v}" for k, v in keys.items() if k != "model"]
    return {"model": str(keys.get("model", "all")), "condition": " / ".join(others) or "all"}


def stats_frame(stats: Mapping[str, Any]) -> pd.DataFrame:
    """`stats.json` groups as a table laid out like `emkit.core.stats.em_rates.summarize` (None becomes NaN)."""
    rows = []
    for group in stats.get("groups") or []:
        labels = _labels(_group_keys(group))
        rows.append({**labels, "question_id": ALL, **(group.get("overall") or {})})
        for qid, record in (group.get("questions") or {}).items():
            rows.append({**labels, "question_id": str(qid), **record})
    suffixes = ("", "_ci_low", "_ci_high", "_within_ci_low", "_within_ci_high", "_cluster_ci_low", "_cluster_ci_high")
    rates = [f"{r}{s}" for r in RATES for s in suffixes]
    means = [f"mean_{s}{x}" for s in ("aligned", "coherent") for x in ("", "_ci_low", "_ci_high")]
    numeric = ["n_questions", *COUNTS, *rates, *means]
    frame = pd.DataFrame(rows).reindex(columns=[*SUMMARY_KEYS, *numeric, "ci_unit"])
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    for column in SUMMARY_KEYS:
        frame[column] = frame[column].astype(str)
    return frame


def stats_thresholds(stats: Mapping[str, Any]) -> Thresholds:
    """The Thresholds a stats document was computed with (the defaults where it does not say)."""
    recorded = stats.get("thresholds") or {}
    return Thresholds(**{f.name: recorded[f.name] for f in fields(Thresholds) if f.name in recorded})


def _resolve_stats(
    stats: dict[str, Any] | None, scores: pd.DataFrame | None, thresholds: Thresholds | None
) -> tuple[dict[str, Any], Thresholds, list[str]]:
    """The statistics to show, the thresholds they use, and notes on anything recomputed."""
    if stats is None and scores is None:
        raise RunFolderError(f"no evaluation results: neither {SCORES} nor {STATS}; run the evaluation first")
    if stats is None:
        used = thresholds or BETLEY
        return stats_json(scores, used), used, [f"{STATS} is missing; statistics computed from {SCORES}."]
    recorded = stats_thresholds(stats)
    outdated = "inference" not in stats  # written before intervals and tests named their unit
    if (thresholds is None or thresholds == recorded) and not outdated:
        return stats, recorded, []
    if scores is None:
        if outdated and (thresholds is None or thresholds == recorded):
            return stats, recorded, [f"{STATS} predates question-aware inference and {SCORES} is missing: its "
                                     "intervals hold the questions fixed and its p-values pool answers (Fisher)."]
        raise EmkitError(
            f"{STATS} uses {recorded.rule()}; applying {thresholds.rule()} needs {SCORES}, which is missing"
        )
    used = thresholds or recorded
    level = (stats.get("inference") or stats.get("bootstrap") or {}).get("ci", 0.95)
    by = list(_group_keys((stats.get("groups") or [{}])[0])) or ["model", "condition"]
    recomputed = stats_json(scores, used, by=by, ci=float(level), method=stats.get("correction", "holm"))
    if outdated and used == recorded:
        note = f"Statistics recomputed from {SCORES} with question-aware intervals and tests ({STATS} predates them)."
    else:
        note = f"Statistics recomputed with {used.rule()} ({STATS} uses {recorded.rule()})."
    return recomputed, used, [note]


def judge_info(manifest: Mapping[str, Any] | None, scores: pd.DataFrame | None) -> JudgeInfo:
    """Who judged: the answers' `judge` values, with kind and note from the manifest's `judge` entry."""
    recorded = (manifest or {}).get("judge")
    recorded = recorded if isinstance(recorded, Mapping) else {}
    ids: list[str] = []
    if scores is not None and "judge" in scores:
        ids = sorted(scores["judge"].dropna().astype(str).unique())
    if not ids and recorded.get("id"):
        ids = [str(recorded["id"])]
    kinds = {judge_kind(i) for i in ids}
    # With mixed judges, the most cautious reading wins: any local judge gets the local warning.
    inferred = "local" if "local" in kinds else (kinds.pop() if len(kinds) == 1 else "unknown")
    kind = str(recorded.get("kind") or inferred)
    if inferred == "local":
        kind = "local"
    return JudgeInfo(ids=ids, kind=kind, note=recorded.get("note"))


def _optional_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _answers(run_dir: Path) -> list[dict[str, Any]]:
    """The run's answers (generations.jsonl), or none; a damaged file is left to the stages that own it."""
    from emkit.core.errors import EmkitError
    from emkit.core.rowfile import read_rows

    try:
        return read_rows(run_dir / "generations.jsonl")
    except EmkitError:
        return []


def write_report(run_dir: Path, *, thresholds: Thresholds | None = None) -> Path:
    """Write `figures/*.png` and the self-contained `report.html` of a run folder; return the report path.

    A run without judged answers (its judge skipped) still gets a report: the preference shift and the
    answers side by side, without the judged sections.
    """
    run_dir = Path(run_dir)
    scores = load_scores(run_dir)
    recorded = load_stats(run_dir)
    prefs = _optional_json(run_dir / "prefs.json")
    answers = _answers(run_dir)
    manifest = RunFolder(run_dir).read_manifest()
    if recorded is None and scores is None and (prefs is not None or answers):
        stats: dict[str, Any] = {}
        used, notes = thresholds or BETLEY, []
        summary = stats_frame(stats)
        figures: dict[str, bytes] = {}
        judge = JudgeInfo(ids=[], kind="skipped", note=((manifest or {}).get("judge") or {}).get("note"))
    else:
        stats, used, notes = _resolve_stats(recorded, scores, thresholds)
        summary = stats_frame(stats)
        no_answers = pd.DataFrame(columns=["model", "condition", "aligned", "coherent"])
        drawable = scores if scores is not None else no_answers
        figures = render_figures(summary, drawable, used)
        judge = judge_info(manifest, scores)
    for name, data in figures.items():
        write_png(run_dir / FIGURES_DIR / f"{name}.png", data)
    inputs = ReportInputs(
        run_name=run_dir.resolve().name, stats=stats, summary=summary, scores=scores, manifest=manifest,
        judge=judge, thresholds=used, figures=figures, notes=notes,
        validation=_optional_json(run_dir / "validation.json"), prefs=prefs, answers=answers,
    )
    path = run_dir / REPORT
    atomic_write_text(path, render_html(inputs))  # last, so a report on disk always has its figures
    return path


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def headline_table(stats: Mapping[str, Any]) -> str:
    """Plain-text table of each model and condition's EM rates with CIs, then the comparisons."""
    frame = stats_frame(stats)
    overall = frame[frame["question_id"] == ALL]
    order = {m: i for i, m in enumerate(model_order(overall["model"]))}
    overall = overall.assign(_m=overall["model"].map(order)).sort_values(["condition", "_m"], kind="stable")
    level = float((stats.get("inference") or stats.get("bootstrap") or {}).get("ci", 0.95) or 0.95)
    headers = ["model", "condition", "answers", "questions", f"EM|coherent [{level:.0%} CI]",
               f"EM|scored [{level:.0%} CI]", "coherence rate", "mean aligned", "mean coherent"]
    rows = [
        [r["model"], r["condition"], _count(r["n_answers"]), _count(r["n_questions"]),
         fmt_rate(r["em_rate_coherent"], r["em_rate_coherent_ci_low"], r["em_rate_coherent_ci_high"]),
         fmt_rate(r["em_rate_scored"], r["em_rate_scored_ci_low"], r["em_rate_scored_ci_high"]),
         fmt_rate(r["coherence_rate"], None, None), fmt_score(r["mean_aligned"]),
         fmt_score(r["mean_coherent"])]
        for r in overall.to_dict("records")
    ]
    rule = (stats.get("thresholds") or {}).get("rule", BETLEY.rule())
    lines = [f"EM rates (misaligned: {rule}; EM|coherent divides by coherent answers, EM|scored by scored answers;",
             f"{level:.0%} CI with questions as the sampling unit, answers within a question for one question)"]
    lines += _text_table(headers, rows, [False, False, True, True, True, True, True, True, True])
    comparisons = _comparison_rows(stats)
    if comparisons:
        method = stats.get("correction", "holm")
        lines += ["", f"Comparisons (difference a - b with {level:.0%} CI and p, questions as the sampling unit: paired "
                      f"interval, sign-flip test; p adj: {method} over the comparisons; Fisher p: answers pooled as "
                      "if independent, for comparison only)"]
        lines += _text_table(["comparison", "within", "denominator", "difference [CI]", "p", "p adj", "Fisher p"],
                             comparisons, [False, False, False, True, True, True, True])
    return "\n".join(lines)


def _count(x: Any) -> str:
    return "n/a" if pd.isna(x) else f"{int(x)}"


def _comparison_rows(stats: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for c in stats.get("comparisons") or []:
        a, b = c.get("a") or {}, c.get("b") or {}
        within = ", ".join(f"{k}={v}" for k, v in a.items() if k != "model" and b.get(k) == v) or "all"
        for d in DENOMINATORS:
            r = f"em_rate_{d}"
            interval = fmt_ci(c.get(f"diff_{r}_ci_low"), c.get(f"diff_{r}_ci_high"))
            diff = f"{fmt_pp(c.get(f'diff_{r}'))} {interval}"
            rows.append([f"{a.get('model', 'a')} vs {b.get('model', 'b')}", within, d, diff.strip(),
                         fmt_p(c.get(f"p_value_{d}")), fmt_p(c.get(f"p_value_{d}_adj")),
                         fmt_p(c.get(f"p_value_{d}_fisher", c.get(f"p_value_{d}") if "units" not in c else None))])
    return rows
