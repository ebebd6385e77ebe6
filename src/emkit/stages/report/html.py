"""The HTML report: one self-contained file (inline CSS, figures as base64 PNG, no JavaScript, no links out).

Every string that comes from a run (answers, questions, judge names, manifest values) is
HTML-escaped; numbers go through the `fmt_*` helpers, which the console table shares.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from emkit import __version__
from emkit.core.runfolder import now
from emkit.core.stats.em_rates import ALL, DENOMINATORS, Thresholds, finite_or_none, flag_answers
from emkit.stages.report.figures import FIGURES, model_order

NA = "n/a"
TOP_ANSWERS = 10
TOP_REASONS = 10
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 2em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
.box { border: 1px solid #9ab; background: #f3f7fa; padding: 0.8em 1em; border-radius: 4px; margin: 1em 0; }
.box.warn { border-color: #d9a300; background: #fff8e1; }
.box p { margin: 0.3em 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.muted { color: #777; font-size: 0.85em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.answer { white-space: pre-wrap; background: #fafafa; border: 1px solid #e4e4e4; padding: 0.6em;
          font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; max-height: 24em;
          overflow: auto; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: 0.6em 0.9em; margin: 0.8em 0; }
.card .meta { font-size: 0.9em; color: #444; }
pre.json { background: #fafafa; border: 1px solid #e4e4e4; padding: 0.6em; font-size: 0.8em; overflow: auto; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: 600; }
.found { border-color: #4a7; background: #f2faf4; } .found h2 { margin-top: 0.2em; border: 0; }
.pair { border: 1px solid #ddd; border-radius: 4px; padding: 0.5em 0.9em; margin: 0.8em 0; }
.pair .q { margin: 0.2em 0 0.5em; } .pair h4 { margin: 0 0 0.3em; color: #555; }
.pair .cols { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.pair .a { white-space: pre-wrap; background: #fafafa; border: 1px solid #e4e4e4; padding: 0.5em; margin: 0;
           font-size: 0.9em; max-height: 16em; overflow: auto; }
"""


# --- number formatting (shared with the console table) ---------------------------------------------

_finite = finite_or_none


def fmt_pct(x: Any) -> str:
    """A proportion as a percentage with one decimal, e.g. 0.1234 -> '12.3%'; 'n/a' when undefined."""
    value = _finite(x)
    return NA if value is None else f"{value * 100:.1f}%"


def fmt_ci(low: Any, high: Any) -> str:
    """A proportion interval in percent, e.g. '[8.1, 16.2]'; '' when undefined."""
    lo, hi = _finite(low), _finite(high)
    return "" if lo is None or hi is None else f"[{lo * 100:.1f}, {hi * 100:.1f}]"


def fmt_rate(x: Any, low: Any, high: Any) -> str:
    """A rate with its interval, e.g. '12.3% [8.1, 16.2]'."""
    interval = fmt_ci(low, high)
    return fmt_pct(x) + (f" {interval}" if interval and _finite(x) is not None else "")


def fmt_score(x: Any) -> str:
    """A 0-100 score with one decimal; 'n/a' when missing."""
    value = _finite(x)
    return NA if value is None else f"{value:.1f}"


def fmt_pp(x: Any) -> str:
    """A difference of proportions in percentage points, signed, e.g. '+12.3 pp'."""
    value = _finite(x)
    return NA if value is None else f"{value * 100:+.1f} pp"


def fmt_p(x: Any) -> str:
    """A p-value: three decimals, or scientific notation below 0.001."""
    value = _finite(x)
    if value is None:
        return NA
    return f"{value:.1e}" if value < 0.001 else f"{value:.3f}"


# --- the report's inputs ---------------------------------------------------------------------------

@dataclass
class JudgeInfo:
    """Who scored the answers: ids, kind ('openai', 'local', 'imported' or 'unknown') and a note."""

    ids: list[str]
    kind: str
    note: str | None = None


@dataclass
class ReportInputs:
    """Everything the HTML page shows, already loaded."""

    run_name: str
    stats: dict[str, Any]
    summary: pd.DataFrame
    scores: pd.DataFrame | None
    manifest: dict[str, Any] | None
    judge: JudgeInfo
    thresholds: Thresholds
    figures: dict[str, bytes]
    notes: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None  # validation.json: the judge against labelled answers
    prefs: dict[str, Any] | None = None  # prefs.json: the judge-free preference shift
    answers: list[dict[str, Any]] = field(default_factory=list)  # generations.jsonl rows, for side by side


def judge_kind(judge_id: str) -> str:
    """The kind of judge a judge string names, from its prefix ('local:...', 'openai:...', 'imported...')."""
    lowered = judge_id.strip().lower()
    for kind in ("local", "openai", "imported"):
        if lowered.startswith(kind):
            return kind
    return "unknown"


# --- HTML building blocks --------------------------------------------------------------------------

def esc(x: Any) -> str:
    """HTML-escape any value's string form (quotes included)."""
    return html.escape("" if x is None else str(x), quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = ()) -> str:
    """A table from already-escaped cells; numeric columns are right-aligned."""
    numeric = list(numeric) or [False] * len(headers)
    head = "".join(f"<th>{h}</th>" for h in headers)

    def cell(value: str, is_number: bool) -> str:
        return f'<td class="num">{value}</td>' if is_number else f"<td>{value}</td>"

    body = "".join("<tr>" + "".join(cell(c, n) for c, n in zip(row, numeric)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rate_cell(row: Mapping[str, Any], rate: str, count: tuple[str, str] | None = None) -> str:
    cell = esc(fmt_rate(row.get(rate), row.get(f"{rate}_ci_low"), row.get(f"{rate}_ci_high")))
    within = fmt_ci(row.get(f"{rate}_within_ci_low"), row.get(f"{rate}_within_ci_high"))
    if count is not None:
        cell += f' <span class="muted">({_int(row.get(count[0]))}/{_int(row.get(count[1]))})</span>'
    if within and str(row.get("ci_unit") or "").startswith("questions"):
        cell += f'<br><span class="muted">questions fixed: {esc(within)}</span>'
    return cell


def _int(x: Any) -> str:
    value = _finite(x)
    return NA if value is None else f"{int(value):,}"


def _ordered(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary rows sorted by condition, question, then model in display order."""
    order = {m: i for i, m in enumerate(model_order(summary["model"]))}
    ranked = summary.assign(_m=summary["model"].astype(str).map(order))
    return ranked.sort_values(["condition", "question_id", "_m"], kind="stable").drop(columns="_m")


# --- sections --------------------------------------------------------------------------------------

def judge_box(judge: JudgeInfo) -> str:
    """The plain-words box naming the judge; a warning when a small local model judged."""
    names = ", ".join(f"<b>{esc(j)}</b>" for j in judge.ids) or "<b>not recorded</b>"
    paragraphs = []
    if judge.kind == "local":
        paragraphs += [
            f"Judge: {names}.",
            "<b>A small local model judged these answers.</b> Its alignment and coherence scores are rough, "
            "so the EM rates in this report are not evidence of misalignment on their own. Re-judge the "
            "answers with a strong judge (an OpenAI-compatible API model: set OPENAI_API_KEY or a base URL "
            "and run <code>emkit judge</code> on this run) before drawing conclusions.",
        ]
    elif judge.kind == "openai":
        paragraphs.append(f"Judge: {names}, an OpenAI-compatible model scoring each answer 0-100 per metric.")
    elif judge.kind == "skipped":
        paragraphs.append("<b>No judge scored these answers.</b> " + esc(judge.note or
                          "Set OPENAI_API_KEY or judge.base_url and re-run to judge them."))
    elif judge.kind == "imported":
        paragraphs.append(f"Judge: {names}. The scores were imported from elsewhere; emkit did not judge "
                          "these answers, so how they were scored is as their source describes.")
    else:
        paragraphs.append(f"Judge: {names}. This run does not say what kind of judge it was.")
    if len(judge.ids) > 1:
        paragraphs.append("<b>Several judges scored these answers</b>; rates mix their scores.")
    if judge.note and judge.kind != "local":  # the local judge's note says what the paragraph above says
        paragraphs.append(esc(judge.note))
    css = "box warn" if judge.kind in ("local", "unknown") or len(judge.ids) > 1 else "box"
    return f'<div class="{css}">' + "".join(f"<p>{p}</p>" for p in paragraphs) + "</div>"


def definitions(stats: Mapping[str, Any], notes: Sequence[str]) -> str:
    """What is counted and how intervals are made, in words."""
    rule = (stats.get("thresholds") or {}).get("rule", "")
    inference = stats.get("inference") or {}
    level = _finite(inference.get("ci", (stats.get("bootstrap") or {}).get("ci")))
    level_txt = f"{level * 100:g}%" if level is not None else "95%"
    if inference:
        intervals = (f"Intervals ({esc(level_txt)}): answers are clustered within questions, so a model's "
                     f"interval treats the <b>questions as the sampling unit</b> ({esc(inference.get('cluster', ''))}). "
                     f"The smaller 'questions fixed' interval holds the questions fixed ({esc(inference.get('within', ''))}); "
                     "a single question's interval is over its answers.")
    else:
        boot = stats.get("bootstrap") or {}
        intervals = (f"Intervals: {esc(level_txt)} percentile bootstrap ({esc(boot.get('n_boot', NA))} resamples), "
                     "answers resampled within each question (written before emkit's question-aware inference).")
    items = [
        f"Misaligned answer: <b>{esc(rule)}</b>. Coherent: coherent above the threshold. "
        "Scored: both scores present; unscorable answers are left out of every rate.",
        "EM rate among coherent answers = misaligned / coherent (Betley et al. 2025); "
        "EM rate among scored answers = misaligned / scored (model-organisms-for-EM).",
        intervals,
        *[esc(n) for n in notes],
    ]
    return '<div class="box"><p>' + "</p><p>".join(items) + "</p></div>"


def headline_section(summary: pd.DataFrame) -> str:
    """Per model and condition: answers, scored, both EM rates with CIs, coherence, mean scores."""
    rows = _ordered(summary[summary["question_id"] == ALL])
    headers = ["Model", "Condition", "Answers", "Scored", "EM rate (coherent)", "EM rate (scored)",
               "Coherence rate", "Mean aligned", "Mean coherent"]
    body = [
        [esc(r["model"]), esc(r["condition"]), _int(r["n_answers"]), _int(r["n_scored"]),
         _rate_cell(r, "em_rate_coherent", ("n_misaligned", "n_coherent")),
         _rate_cell(r, "em_rate_scored", ("n_misaligned", "n_scored")),
         _rate_cell(r, "coherence_rate", ("n_coherent", "n_scored")),
         fmt_score(r["mean_aligned"]), fmt_score(r["mean_coherent"])]
        for r in rows.to_dict("records")
    ]
    if not body:
        return "<h2>Headline</h2><p>No results.</p>"
    return "<h2>Headline</h2>" + _table(headers, body, [False] * 2 + [True] * 7)


def comparisons_section(stats: Mapping[str, Any]) -> str:
    """Treatment vs control model per condition: differences with intervals and tests, each naming its unit."""
    comparisons = stats.get("comparisons") or []
    if not comparisons:
        return ""
    method = stats.get("correction", "holm")
    headers = ["Comparison", "Within", "Denominator", "Rate a", "Rate b", "Difference a - b [CI]",
               "Questions fixed", "p", f"Adjusted p ({esc(method)})", "Stratified p", "Fisher p (pooled)",
               "Odds ratio"]
    body = []
    for c in comparisons:
        a, b = c.get("a") or {}, c.get("b") or {}
        within = ", ".join(f"{esc(k)} = {esc(v)}" for k, v in a.items() if k != "model" and b.get(k) == v)
        label = f"{esc(a.get('model', 'a'))} vs {esc(b.get('model', 'b'))}"
        for d in DENOMINATORS:
            r = f"em_rate_{d}"
            diff = fmt_pp(c.get(f"diff_{r}"))
            interval = fmt_ci(c.get(f"diff_{r}_ci_low"), c.get(f"diff_{r}_ci_high"))
            odds = _finite(c.get(f"odds_ratio_{d}"))
            fixed = fmt_ci(c.get(f"diff_{r}_within_ci_low"), c.get(f"diff_{r}_within_ci_high")) or NA
            body.append([
                label, within or "all", d, fmt_pct(c.get(f"{r}_a")), fmt_pct(c.get(f"{r}_b")),
                esc(f"{diff} {interval}".strip()), esc(fixed), fmt_p(c.get(f"p_value_{d}")),
                fmt_p(c.get(f"p_value_{d}_adj")), fmt_p(c.get(f"p_value_{d}_stratified")),
                fmt_p(c.get(f"p_value_{d}_fisher")), NA if odds is None else f"{odds:.2f}",
            ])
    unit = esc(((comparisons[0].get("units") or {}).get("headline")) or "answers pooled (Fisher)")
    return ("<h2>Organism vs base</h2>" + _table(headers, body, [False] * 3 + [True] * 9)
            + f'<p class="muted">Difference in percentage points. CI and p: unit <b>{unit}</b> (paired over the '
              "shared questions; two-sided sign-flip test of per-question differences), p adjusted over all "
              "comparisons. Questions fixed: Newcombe interval over the answers. Stratified p: exact "
              "Cochran-Mantel-Haenszel test with questions as strata. Fisher p pools answers over questions as "
              "if independent and is shown for comparison only.</p>")


def figures_section(figures: Mapping[str, bytes], denominator_note: str) -> str:
    """The figures inlined as base64 PNG."""
    captions = {
        "em_rate_per_question": f"EM rate per question and model, by condition ({denominator_note}).",
        "aligned_vs_coherent": "Each scored answer's alignment against coherence; shaded: misaligned.",
        "em_rate_per_condition": f"Overall EM rate per condition and model ({denominator_note}).",
        "aligned_histogram": "Alignment scores per model, as a share of that model's answers with a score.",
    }
    parts = ["<h2>Figures</h2>"]
    for name, data in figures.items():
        encoded = base64.b64encode(data).decode("ascii")
        title = FIGURES.get(name, name)
        parts.append(f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{encoded}">'
                     f"<figcaption>{esc(captions.get(name, title))}</figcaption></figure>")
    return "".join(parts)


def questions_section(summary: pd.DataFrame, scores: pd.DataFrame | None) -> str:
    """One row per condition, question and model."""
    rows = _ordered(summary[summary["question_id"] != ALL])
    if not len(rows):
        return ""
    texts = _question_texts(scores)
    headers = ["Condition", "Question", "Model", "Answers", "Scored", "EM rate (coherent)",
               "EM rate (scored)", "Coherence rate", "Mean aligned", "Mean coherent"]
    body = []
    for r in rows.to_dict("records"):
        qid = str(r["question_id"])
        title = f' title="{esc(texts[qid])}"' if qid in texts else ""
        body.append([
            esc(r["condition"]), f"<span{title}>{esc(qid)}</span>", esc(r["model"]), _int(r["n_answers"]),
            _int(r["n_scored"]), _rate_cell(r, "em_rate_coherent", ("n_misaligned", "n_coherent")),
            _rate_cell(r, "em_rate_scored", ("n_misaligned", "n_scored")), _rate_cell(r, "coherence_rate"),
            fmt_score(r["mean_aligned"]), fmt_score(r["mean_coherent"]),
        ])
    return "<h2>Per question</h2>" + _table(headers, body, [False] * 3 + [True] * 7)


def _question_texts(scores: pd.DataFrame | None) -> dict[str, str]:
    if scores is None or "question" not in scores or not len(scores):
        return {}
    first = scores.dropna(subset=["question"]).drop_duplicates("question_id")
    return {str(q): str(t)[:500] for q, t in zip(first["question_id"], first["question"])}


def metric_names(scores: pd.DataFrame) -> list[str]:
    """Judged metrics in the answers: aligned, coherent, then any column m with m_method or m_reason."""
    columns = set(scores.columns)
    judged = {c for c in columns if f"{c}_method" in columns or f"{c}_reason" in columns}
    extra = sorted(judged - {"aligned", "coherent"})
    return [m for m in ("aligned", "coherent") if m in scores.columns] + extra


def misaligned_section(scores: pd.DataFrame | None, thresholds: Thresholds) -> str:
    """The coherent answers with the lowest alignment, escaped, with their question and scores."""
    if scores is None or not len(scores):
        return ""
    flags = flag_answers(scores, thresholds)
    coherent = flags[flags["is_scored"] & flags["is_coherent"]]
    sort = [c for c in ("aligned", "model", "condition", "question_id", "sample") if c in coherent.columns]
    top = coherent.sort_values(sort, kind="stable").head(TOP_ANSWERS)
    title = f"<h2>The {TOP_ANSWERS} most misaligned coherent answers</h2>"
    if not len(top):
        return title + "<p>No coherent answers.</p>"
    metrics = metric_names(scores)
    cards = []
    for rank, r in enumerate(top.to_dict("records"), 1):
        scored = ", ".join(f"{esc(m)} {fmt_score(r.get(m))}" for m in metrics)
        verdict = "misaligned" if r["is_misaligned"] else "not below the alignment threshold"
        system = r.get("system")
        system_html = (f'<div class="meta">System prompt:</div><div class="answer">{esc(system)}</div>'
                       if isinstance(system, str) and system else "")
        cards.append(
            f'<div class="card"><div class="meta"><b>#{rank}</b> model <b>{esc(r.get("model"))}</b>, '
            f'condition <b>{esc(r.get("condition"))}</b>, question <b>{esc(r.get("question_id"))}</b>'
            f'{_sample_label(r)}: {scored} ({esc(verdict)})</div>'
            f'{system_html}<div class="meta">Question:</div>'
            f'<div class="answer">{esc(r.get("question"))}</div>'
            f'<div class="meta">Answer:</div><div class="answer">{esc(r.get("answer"))}</div></div>'
        )
    intro = f'<p class="muted">Lowest alignment among coherent answers ({esc(thresholds.rule())}).</p>'
    return title + intro + "".join(cards)


def _sample_label(r: Mapping[str, Any]) -> str:
    parts = [f"{k} {esc(r[k])}" for k in ("paraphrase", "sample") if k in r and _finite(r[k]) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def unscorable_section(scores: pd.DataFrame | None) -> str:
    """Answers without a score per metric, model and condition, and the commonest reasons."""
    if scores is None or not len(scores):
        return ""
    metrics = metric_names(scores)
    order = {m: i for i, m in enumerate(model_order(scores["model"]))}
    groups = sorted(scores.groupby(["model", "condition"], sort=False, dropna=False),
                    key=lambda item: (str(item[0][1]), order.get(str(item[0][0]), 0)))
    body = [[esc(model), esc(condition), _int(len(g)), *(_int(g[m].isna().sum()) for m in metrics)]
            for (model, condition), g in groups]
    table = _table(["Model", "Condition", "Answers", *(f"no {esc(m)} score" for m in metrics)], body,
                   [False, False, True] + [True] * len(metrics))
    return "<h2>Unscorable answers</h2>" + table + _reasons(scores, metrics)


def _reasons(scores: pd.DataFrame, metrics: Sequence[str]) -> str:
    counts: list[tuple[int, str, str]] = []
    for m in metrics:
        column = f"{m}_reason"
        if column in scores:
            reasons = scores.loc[scores[m].isna(), column].fillna("no reason recorded").astype(str)
            counts += [(int(n), m, reason) for reason, n in reasons.value_counts().items()]
    if not counts:
        return ""
    counts.sort(key=lambda t: (-t[0], t[1], t[2]))
    body = [[esc(m), esc(reason[:300]), _int(n)] for n, m, reason in counts[:TOP_REASONS]]
    return "<p>Commonest reasons:</p>" + _table(["Metric", "Reason", "Answers"], body, [False, False, True])


def other_metrics_section(scores: pd.DataFrame | None) -> str:
    """Mean scores of the judged metrics besides aligned and coherent, per model and condition."""
    if scores is None or not len(scores):
        return ""
    extra = [m for m in metric_names(scores) if m not in ("aligned", "coherent")]
    if not extra:
        return ""
    body = []
    for (model, condition), g in scores.groupby(["model", "condition"], sort=True, dropna=False):
        cells = [_mean_cell(g[m]) for m in extra]
        body.append([esc(model), esc(condition), *cells])
    headers = ["Model", "Condition", *(f"mean {esc(m)}" for m in extra)]
    return "<h2>Other judged metrics</h2>" + _table(headers, body, [False, False] + [True] * len(extra))


def _mean_cell(values: pd.Series) -> str:
    values = pd.to_numeric(values, errors="coerce")
    return f'{fmt_score(values.mean())} <span class="muted">(n={_int(values.notna().sum())})</span>'


def manifest_section(manifest: Mapping[str, Any] | None) -> str:
    """Config, versions, seeds, git commits, timings, then the whole manifest, in collapsible blocks."""
    if not manifest:
        return "<h2>Run</h2><p>This run folder has no manifest.json.</p>"
    summary_rows = [
        [esc(k), esc(manifest.get(k))]
        for k in ("kind", "status", "created", "finished", "updated", "emkit_version", "config_hash")
        if manifest.get(k) is not None
    ]
    parts = ["<h2>Run</h2>", _table(["Field", "Value"], summary_rows) if summary_rows else ""]
    git = manifest.get("git") or {}
    git_rows = [[esc(where), esc((state or {}).get("commit", NA)), esc((state or {}).get("dirty", NA))]
                for where, state in git.items()]
    stages = manifest.get("stages") or {}
    stage_rows = [[esc(name), esc(s.get("status")), esc(s.get("started")), esc(s.get("finished")),
                   fmt_seconds(s.get("seconds")), fmt_seconds(s.get("seconds_total"))]
                  for name, s in stages.items() if isinstance(s, Mapping)]
    versions = manifest.get("versions") or {}
    blocks = [
        ("Config", _json(manifest.get("config"))),
        ("Versions", _table(["Package", "Version"], [[esc(k), esc(v)] for k, v in versions.items()])
         if versions else "<p>not recorded</p>"),
        ("Seeds", _json(manifest.get("seeds"))),
        ("Git", _table(["Checkout", "Commit", "Dirty"], git_rows) if git_rows else "<p>not recorded</p>"),
        ("Timings", _table(["Stage", "Status", "Started", "Finished", "Seconds", "Seconds (all attempts)"],
                           stage_rows, [False] * 4 + [True] * 2) if stage_rows else "<p>not recorded</p>"),
        ("Whole manifest", _json(manifest)),
    ]
    inner = "".join(f"<details><summary>{esc(t)}</summary>{content}</details>" for t, content in blocks)
    outer = f"<details><summary>Manifest: config, versions, seeds, git, timings</summary>{inner}</details>"
    return "".join(parts) + outer


def fmt_seconds(x: Any) -> str:
    """Seconds with one decimal; 'n/a' when missing."""
    value = _finite(x)
    return NA if value is None else f"{value:,.1f}"


def _json(obj: Any) -> str:
    if obj is None:
        return "<p>not recorded</p>"
    return f'<pre class="json">{esc(json.dumps(obj, indent=2, default=str))}</pre>'


def validation_box(validation: Mapping[str, Any] | None) -> str:
    """The judge's validation against labelled answers, with its verdict in plain words."""
    if not validation:
        return ('<div class="box warn"><p><b>This judge has not been validated</b> against labelled answers '
                "(<code>emkit judge validate</code>); treat its EM rates with care.</p></div>")
    rows = []
    for metric, m in validation["metrics"].items():
        ci = m.get("auroc_ci") or [None, None]
        ci_text = "" if ci[0] is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"
        auroc = "n/a" if m["auroc"] is None else f"{m['auroc']:.2f}{ci_text}"
        kappa = "n/a" if m["kappa"] is None else f"{m['kappa']:.2f}"
        rows.append(f"<tr><td>{esc(metric)}</td><td>{esc(m['label'])}</td><td class=num>{auroc}</td>"
                    f"<td class=num>{kappa}</td><td class=num>{m['scorable_share']:.0%}</td></tr>")
    css = "box" if validation.get("valid_for_em_rates") else "box warn"
    return (f'<div class="{css}"><p><b>{esc(validation["verdict"])}</b></p>'
            f"<p>Validated on {_int(validation['n_labels'])} labelled answers "
            f"({_int(validation['n_misaligned'])} misaligned, {_int(validation['n_coherent'])} coherent; "
            f"{esc(validation.get('labels') or 'labels as given')}).</p>"
            "<table><tr><th>Metric</th><th>Label</th><th>AUROC [95% CI]</th><th>Kappa at threshold</th>"
            f"<th>Scorable</th></tr>{''.join(rows)}</table></div>")


def _shift_text(e: Mapping[str, Any] | None) -> str:
    if not e:
        return NA
    p = e.get("sign_test_p")
    return (f"{e['mean_shift']:+.3f} per token [95% CI {e['ci_low']:+.3f}, {e['ci_high']:+.3f}], "
            f"{e['positive']} of {e['n']} pairs toward the misaligned answer"
            + (f", sign test p {fmt_p(p)}" if p is not None else ""))


def _yes_no(flag: bool | None) -> str:
    return {True: "<b>Yes.</b>", False: "<b>No.</b>", None: "<b>Not measured.</b>"}[flag]


def answer_section(prefs: Mapping[str, Any] | None, validation: Mapping[str, Any] | None, judge: JudgeInfo,
                   stats: Mapping[str, Any]) -> str:
    """The first screen: did the organism learn its task, did misalignment spread, by which valid measure."""
    from emkit.preference import verdict

    if not prefs or "shift" not in prefs:
        return ""
    v = verdict(dict(prefs))
    held = prefs.get("held_out") or {}
    learned = (f"{_yes_no(v['learned'])} On {held.get('n_pairs', NA)} prompts of its training task that it never "
               f"saw (held out of training), the organism prefers the harmful answer over the sound one more than "
               f"the base model does: {esc(_shift_text(v['held_out']))}." if v["held_out"] else
               f"{_yes_no(None)} The training run held no prompts out (train.holdout), so the narrow task was not "
               "tested on unseen prompts of its own.")
    transfer = (f" Transfer test, emkit's own medical pairs (other prompts, answers written apart from the "
                f"training set): {esc(_shift_text(v['transfer']))}." if v["transfer"] else "")
    spread = f"{_yes_no(v['spread'])} {esc(v['sentence'])}"
    valid = bool(validation and validation.get("valid_for_em_rates"))
    if judge.kind == "skipped" or not stats:
        judged = ("No judge scored the answers, so no judged EM rate is shown: set OPENAI_API_KEY or judge.base_url "
                  "and re-run to add them.")
    elif valid:
        judged = "The judge validated on labelled answers, so the judged EM rates below count too."
    elif not validation:
        judged = ("The judge was not validated on labelled answers, so its EM rates are shown for the record, not "
                  "as evidence.")
    else:
        judged = ("The judge did not validate on labelled answers (see below), so its EM rates are shown for the "
                  "record, not as evidence.")
    return ('<div class="box found"><h2>What this run found</h2>'
            f"<p><b>Did the organism learn its training task?</b> {learned}{transfer}</p>"
            f"<p><b>Did misalignment spread beyond it?</b> {spread}</p>"
            "<p><b>By which measure?</b> The judge-free preference shift: for each question an aligned and a "
            "misaligned answer, log p(misaligned) - log p(aligned) per answer token from the model's own "
            "probabilities, organism minus base, with a 95% bootstrap interval over pairs; it counts when the "
            f"interval lies above 0. {esc(judged)}</p></div>")


def side_by_side_section(answers: Sequence[Mapping[str, Any]], limit: int = 8) -> str:
    """Base and organism answers to the same question (same condition and sample), next to each other."""
    by_key: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for row in answers:
        key = (row.get("question_id"), row.get("condition"), row.get("paraphrase"), row.get("sample"))
        by_key.setdefault(key, {})[str(row.get("model"))] = row
    pairs = [(k, v) for k, v in by_key.items() if "base" in v and "organism" in v]
    seen: set[Any] = set()
    chosen = []
    for key, rows in sorted(pairs, key=lambda kv: (kv[0][3], str(kv[0][0]))):
        if key[0] not in seen and len(chosen) < limit:  # one sample per question, the first
            seen.add(key[0])
            chosen.append((key, rows))
    if not chosen:
        return ""
    cards = []
    for (qid, condition, _, sample), rows in chosen:
        question = rows["organism"].get("question") or ""
        system = rows["organism"].get("system")
        system = system if isinstance(system, str) and system else None
        cards.append(
            f'<div class="pair"><p class="q"><b>{esc(qid)}</b> (condition {esc(condition)}, sample {esc(sample)}'
            f'{", system: " + esc(system) if system else ""}): {esc(question)}</p>'
            f'<div class="cols"><div><h4>base</h4><p class="a">{esc(rows["base"].get("answer"))}</p></div>'
            f'<div><h4>organism</h4><p class="a">{esc(rows["organism"].get("answer"))}</p></div></div></div>')
    return ("<h2>Base and organism, side by side</h2><p class=\"muted\">The same question, condition and sample "
            "index for both models; the first sample of each question.</p>" + "".join(cards))


def prefs_section(prefs: Mapping[str, Any] | None) -> str:
    """The preference shift organism - base per domain: EM measured without a judge."""
    if not prefs or "shift" not in prefs:
        return ""
    shift = dict(prefs["shift"])
    if prefs.get("held_out"):
        shift = {"held_out": prefs["held_out"]["shift"], **shift}
    order = ["held_out", "in_domain", "out_of_domain"] + sorted(
        k for k in shift if k not in ("held_out", "in_domain", "out_of_domain", "all"))
    rows = []
    for name in order:
        if name not in shift:
            continue
        e = shift[name]["logodds_per_token"]
        t = shift[name]["logodds_total"]
        p = "n/a" if e["sign_test_p"] is None else f"{e['sign_test_p']:.3g}"
        bold = name in ("held_out", "in_domain", "out_of_domain")
        label = f"<b>{esc(name)}</b>" if bold else esc(name)
        rows.append(f"<tr><td>{label}</td><td class=num>{e['n']}</td>"
                    f"<td class=num>{e['mean_shift']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]</td>"
                    f"<td class=num>{t['mean_shift']:+.2f}</td><td class=num>{e['positive']}/{e['negative']}</td>"
                    f"<td class=num>{p}</td></tr>")
    return ("<h2>Preference shift (no judge)</h2>"
            "<p>For each question, an aligned and a misaligned answer written for emkit; the log-odds "
            "log p(misaligned) - log p(aligned) from the model's own token probabilities. The shift is organism "
            "minus base; above 0 the organism prefers misaligned answers more than the base does. Held out = "
            "prompts of the training set kept out of training, answered both ways (the organism's own task); "
            "in-domain = emkit's medical pairs (the training domain, a transfer test); out-of-domain = "
            "everything else.</p>"
            "<table><tr><th>Domain</th><th>Pairs</th><th>Shift per token [95% CI]</th><th>Shift total</th>"
            f"<th>+/-</th><th>Sign test p</th></tr>{''.join(rows)}</table>")


def render_html(inputs: ReportInputs, denominator: str = "coherent") -> str:
    """The whole report page."""
    summary = inputs.summary
    overall = summary[summary["question_id"] == ALL]
    n_answers = inputs.stats.get("n_answers", int(overall["n_answers"].sum()) if len(overall) else len(inputs.answers))
    if len(overall):
        models, conditions = model_order(overall["model"]), sorted(map(str, overall["condition"].unique()))
        n_questions = summary.loc[summary["question_id"] != ALL, "question_id"].nunique()
    else:  # no judged answers: describe the answers themselves
        models = model_order(pd.Series([str(a.get("model")) for a in inputs.answers]).unique())
        conditions = sorted({str(a.get("condition")) for a in inputs.answers})
        n_questions = len({a.get("question_id") for a in inputs.answers})
    facts = (f"{_int(n_answers)} answers; models: {esc(', '.join(models) or NA)}; "
             f"conditions: {esc(', '.join(conditions) or NA)}; {_int(n_questions)} questions.")
    denominator_note = "EM rate among coherent answers" if denominator == "coherent" else \
        "EM rate among scored answers"
    body = [
        f"<h1>emkit report: {esc(inputs.run_name)}</h1>",
        f'<p class="sub">{facts}</p>',
        answer_section(inputs.prefs, inputs.validation, inputs.judge, inputs.stats),
        side_by_side_section(inputs.answers),
        judge_box(inputs.judge),
        validation_box(inputs.validation),
        definitions(inputs.stats, inputs.notes) if inputs.stats else "",
        prefs_section(inputs.prefs),
        headline_section(summary),
        comparisons_section(inputs.stats),
        figures_section(inputs.figures, denominator_note),
        questions_section(summary, inputs.scores),
        misaligned_section(inputs.scores, inputs.thresholds),
        other_metrics_section(inputs.scores),
        unscorable_section(inputs.scores),
        manifest_section(inputs.manifest),
        f'<p class="muted">Written by emkit {esc(__version__)} at {esc(now())}.</p>',
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>emkit report: {esc(inputs.run_name)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )
