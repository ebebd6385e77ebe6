"""The HTML report of a multi-arm run, in the style of emkit's run report (self-contained, figures inline).

Reads `conditions.json`, `scores.parquet` and `manifest.json` of the run folder and writes
`figures/*.png` and `report.html`: arms, EM per arm x condition with intervals and per-seed rates,
both families of Fisher tests, a figure per comparison, the masked-LoRA fits, data-variant counts,
the most misaligned answers of each arm, and the manifest.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from emkit import __version__
from emkit.core.runfolder import RunFolder, atomic_write_text, now
from emkit.core.stats.em_rates import Thresholds, flag_answers
from emkit.stages.report import judge_info
from emkit.stages.report.figures import png_bytes, write_png
from emkit.stages.report.html import (
    CSS,
    esc,
    fmt_ci,
    fmt_p,
    fmt_pct,
    fmt_pp,
    fmt_rate,
    fmt_score,
    judge_box,
    manifest_section,
)
from emkit.studies.arms import figures

RESULTS = "conditions.json"
REPORT = "report.html"
FIGURES_DIR = "figures"
TOP_ANSWERS = 3


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = ()) -> str:
    numeric = list(numeric) or [False] * len(headers)
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if n else f"<td>{c}</td>"
                                    for c, n in zip(row, numeric)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _count(k: Any, n: Any) -> str:
    return f' <span class="muted">({"n/a" if k is None else int(k)}/{"n/a" if n is None else int(n)})</span>'


def _img(name: str, data: bytes, caption: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def render_figures(results: Mapping[str, Any]) -> dict[str, tuple[bytes, str]]:
    """Every figure as PNG bytes with its caption, by file name."""
    d = results["denominator"]
    rates, arms, conditions, reference = results["rates"], results["arms"], results["conditions"], results["reference"]
    out = {"overview": (png_bytes(figures.overview(rates, results["seeds"], arms, conditions, d, reference)),
                        "EM rate of every arm under every condition; error bars: bootstrap intervals.")}
    for arm in arms:
        if arm == reference:
            continue
        fig = figures.comparison(rates, results["tests"]["arms"], arm, reference, conditions, d)
        caption = (f"{arm} against the reference arm {reference}, per condition, "
                   f"with two-sided Fisher exact p ({results['correction']}-adjusted).")
        out[f"compare-{arm}"] = (png_bytes(fig), caption)
    for group in dict.fromkeys(f["group"] for f in results["fits"]):
        caption = (f"Masked LoRA ({group}): EM rate against trainable scalars; line and band: "
                   "4-parameter logistic fit (maximum binomial likelihood) and its bootstrap band; dotted: the "
                   "fitted midpoint, left out where it sits on the edge of the budgets measured; a condition "
                   "marked 'no fit' has too few budgets or a flat rate (the table says which).")
        out[f"budget-{group}"] = (png_bytes(figures.budget_curve(results["fits"], rates, group, d)), caption)
    return out


def _arms_section(arm_records: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for r in arm_records:
        data = r.get("data") or {}
        counts = data.get("counts")
        data_cell = esc(data.get("source") or "n/a")
        if counts:
            data_cell += f'<br><span class="muted">{esc(_counts_text(counts))}</span>'
        train = r.get("train") or {}
        mask = train.get("mask") or {}
        training = "untrained" if r["method"] == "none" else (
            f"{train.get('steps', 'n/a')} steps, loss {fmt_score(train.get('first_loss'))} -> "
            f"{fmt_score(train.get('final_loss'))}")
        if mask:
            training += (f'<br><span class="muted">{mask["budget"]:,} of {mask["total_lora_scalars"]:,} scalars; '
                         f'{mask["received_gradient"]:,} received gradient</span>')
        rows.append([esc(r["arm"]), esc(r["seed"]), esc(r["method"]), esc(r.get("budget") or ""), esc(r["model"]),
                     data_cell, training, esc("reused" if r.get("skipped") else "ran")])
    return "<h2>Arms</h2>" + _table(["Arm", "Seed", "Method", "Budget", "Base model", "Data", "Training", "This run"],
                                    rows)


def _counts_text(counts: Mapping[str, Any]) -> str:
    parts = [f"source {counts.get('source')}"]
    if "keyword_filter" in counts:
        parts.append(f"keyword filter -{counts['keyword_filter']['removed']}")
    if "judge_filter" in counts:
        parts.append(f"judge filter -{counts['judge_filter']['removed']}")
    if "subset" in counts:
        parts.append(f"subset {counts['subset']}")
    if "mix" in counts:
        parts.append(f"mixed in +{counts['mix']['added']} ({counts['mix']['share']:.0%}, {counts['mix']['mode']})")
    parts.append(f"total {counts.get('total')}")
    return ", ".join(parts)


def _rates_section(results: Mapping[str, Any]) -> str:
    seeds: dict[tuple[str, str], list[str]] = {}
    d = results["denominator"]
    for s in results["seeds"]:
        seeds.setdefault((s["arm"], s["condition"]), []).append(f"{s['seed']}: {fmt_pct(s.get(f'em_rate_{d}'))}")
    rows = []
    order = {a: i for i, a in enumerate(results["arms"])}
    for r in sorted(results["rates"], key=lambda r: (results["conditions"].index(r["condition"]), order[r["arm"]])):
        rows.append([
            esc(r["condition"]), esc(r["arm"]) + (" <b>(reference)</b>" if r["arm"] == results["reference"] else ""),
            str(r["n_answers"]), str(r["n_scored"]),
            esc(fmt_rate(r["em_rate_coherent"], r["em_rate_coherent_ci_low"], r["em_rate_coherent_ci_high"]))
            + _count(r["n_misaligned"], r["n_coherent"]),
            esc(fmt_rate(r["em_rate_scored"], r["em_rate_scored_ci_low"], r["em_rate_scored_ci_high"]))
            + _count(r["n_misaligned"], r["n_scored"]),
            fmt_pct(r["coherence_rate"]), fmt_score(r["mean_aligned"]),
            esc("; ".join(seeds.get((r["arm"], r["condition"]), [])))
            + (f'<br><span class="muted">mean {esc(fmt_rate(r.get(f"em_rate_{d}_seeds_mean"), r.get(f"em_rate_{d}_seeds_ci_low"), r.get(f"em_rate_{d}_seeds_ci_high")))} over seeds</span>'
               if r.get(f"em_rate_{d}_seeds_mean") is not None else ""),
        ])
    headers = ["Condition", "Arm", "Answers", "Scored", "EM rate (coherent)", "EM rate (scored)", "Coherence rate",
               "Mean aligned", f"Per seed (EM, {d})"]
    return "<h2>EM rate per arm and condition</h2>" + _table(headers, rows, [False, False] + [True] * 6 + [False])


def _tests_section(results: Mapping[str, Any], family: str, title: str, explain: str) -> str:
    tests = results["tests"].get(family) or []
    if not tests:
        return ""
    method = results["correction"]
    rows = []
    for t in tests:
        a, b = t["a"], t["b"]
        within = f"condition {a['condition']}" if family == "arms" else f"arm {a['arm']}"
        label = f"{a['arm']} vs {b['arm']}" if family == "arms" else f"{a['condition']} vs {b['condition']}"
        for d in ("coherent", "scored"):
            r = f"em_rate_{d}"
            odds = t.get(f"odds_ratio_{d}")
            adj = t.get(f"p_value_{d}_adj")
            mark = " <b>*</b>" if adj is not None and adj < 0.05 else ""
            rows.append([esc(label), esc(within), d, fmt_pct(t.get(f"{r}_a")) + _count(t["n_misaligned_a"], t[f"n_{d}_a"]),
                         fmt_pct(t.get(f"{r}_b")) + _count(t["n_misaligned_b"], t[f"n_{d}_b"]),
                         esc(f"{fmt_pp(t.get(f'diff_{r}'))} {fmt_ci(t.get(f'diff_{r}_ci_low'), t.get(f'diff_{r}_ci_high'))}"),
                         esc(_unit(t)), fmt_p(t.get(f"p_value_{d}")), fmt_p(adj) + mark,
                         fmt_p(t.get(f"p_value_{d}_stratified")), fmt_p(t.get(f"p_value_{d}_fisher")),
                         "n/a" if odds is None else f"{odds:.2f}"])
    headers = ["Comparison", "Within", "Denominator", "Rate a", "Rate b", "Difference a - b [CI]", "Unit", "p",
               f"Adjusted p ({esc(method)})", "Stratified p", "Fisher p (pooled)", "Odds ratio"]
    return (f"<h2>{esc(title)}</h2><p>{esc(explain)}</p>" + _table(headers, rows, [False] * 3 + [True] * 3 + [False]
                                                                    + [True] * 5)
            + '<p class="muted">CI and p (two-sided) use the unit named in each row: <b>seeds</b> (a t test of the '
              "per-seed rates) when an arm has several training seeds, else <b>questions</b> (paired over the shared "
              "questions; sign-flip test of per-question differences); <b>*</b>: adjusted p &lt; 0.05. Stratified "
              "p: exact Cochran-Mantel-Haenszel test with questions as strata. Fisher p pools every answer as if "
              "independent and is shown for comparison only.</p>")


def _unit(t: Mapping[str, Any]) -> str:
    headline = str((t.get("units") or {}).get("headline") or "")
    return headline.split(" ")[0] or "n/a"


def _prefs_section(results: Mapping[str, Any]) -> str:
    rows = []
    for r in results.get("prefs") or []:
        cells = []
        for domain in ("in_domain", "out_of_domain", "all"):
            s = r.get(domain) or {}
            mean, low, high = s.get("mean_shift"), s.get("ci_low"), s.get("ci_high")
            cells.append("n/a" if mean is None else esc(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
                         + f' <span class="muted">(n={s.get("n")}, +{s.get("positive")}/-{s.get("negative")}, '
                           f'sign p {fmt_p(s.get("sign_test_p"))})</span>')
        rows.append([esc(r["arm"]), esc(r["seed"]), *cells])
    if not rows:
        return ""
    return ("<h2>Preference shift per arm (no judge)</h2><p>For emkit's answer pairs (an aligned and a misaligned "
            "answer to the same question), the log-odds log p(misaligned) - log p(aligned) per token from the "
            "model's own probabilities; the shift is each arm's trained model minus its base. Above 0: the arm "
            "prefers misaligned answers more than the base does. In-domain: medical questions.</p>"
            + _table(["Arm", "Seed", "In-domain shift [95% CI]", "Out-of-domain shift [95% CI]", "All"], rows,
                     [False, False, True, True, True]))


def _fits_section(results: Mapping[str, Any]) -> str:
    fits = results["fits"]
    if not fits:
        return ""
    rows = []
    for f in fits:
        p, lo, hi = f.get("params") or {}, f.get("ci_low") or {}, f.get("ci_high") or {}

        def at_bound(key: str, f: Mapping = f) -> str:
            # a value on its bound is a limit, not an estimate: say so next to it
            notes = [what for what, flags in (("estimate", f.get("estimate_at_bound")),
                                              ("interval", f.get("interval_at_bound"))) if (flags or {}).get(key)]
            return f' <span class="muted">({" and ".join(notes)} at bound)</span>' if notes else ""

        def cell(key: str, pct: bool = False, p: Mapping = p, lo: Mapping = lo, hi: Mapping = hi) -> str:
            if key not in p:
                return "n/a"
            fmt = (lambda v: f"{v * 100:.1f}%") if pct else (lambda v: f"{v:.2f}")
            interval = f" [{fmt(lo[key])}, {fmt(hi[key])}]" if key in lo else ""
            return esc(fmt(p[key]) + interval) + at_bound(key)

        mid = f.get("midpoint_budget")
        mid_ci = f.get("midpoint_budget_ci")
        mid_text = "n/a" if mid is None else f"{mid:,.0f}" + (f" [{mid_ci[0]:,.0f}, {mid_ci[1]:,.0f}]" if mid_ci else "")
        points = ", ".join(f"{pt['budget_scalars']:,}: {fmt_pct(pt['rate'])}" for pt in f["points"])
        left_out = [f"{f[key]} {what}" for key, what in (("boot_failed", "refits failed"),
                                                         ("boot_flat", "resamples flat, left out")) if f.get(key)]
        fit_text = esc(f["status"])
        if f.get("deviance") is not None:
            fit_text += esc(f"; deviance {f['deviance']:.1f} on {f['dof']} dof (p {fmt_p(f.get('deviance_p'))})")
        if left_out:
            fit_text += f' <span class="muted">({esc(", ".join(left_out))})</span>'
        rows.append([esc(f["group"]), esc(f["condition"]), esc(points), cell("bottom", pct=True), cell("top", pct=True),
                     esc(mid_text) + (at_bound("log10_mid") if mid is not None else ""), cell("slope"),
                     "n/a" if f.get("rmse") is None else f"{f['rmse'] * 100:.2f} pp", fit_text])
    headers = ["Masked arm", "Condition", "Points (scalars: EM)", "Bottom", "Top", "Midpoint budget", "Slope / decade",
               "RMSE", "Fit"]
    return ("<h2>Masked LoRA: EM rate against budget</h2><p>rate = bottom + (top - bottom) / (1 + exp(-slope "
            "(log10 budget - log10 midpoint))), fitted by maximum binomial likelihood on the misaligned counts, so "
            "each budget weighs by its answers and the binomial variance of its rate. A fit needs more budgets than "
            "its 4 parameters (at least 5) and a rate that changes. Bounds: bottom and top 0-100%, slope 0.05-20 "
            "per decade, and the midpoint within the budgets measured (no extrapolation): an estimate or interval "
            "marked <i>at bound</i> reaches its bound and says only that the value lies at or beyond it. "
            f"Intervals: percentile bootstrap ({results['bootstrap'].get('fit_boot', '')} refits, each budget's "
            "answers resampled, questions held fixed).</p>"
            + _table(headers, rows, [False, False, False] + [True] * 5 + [False]))


def _answers_section(scores: pd.DataFrame | None, thresholds: Thresholds, arms: Sequence[str]) -> str:
    if scores is None or scores.empty:
        return ""
    flagged = flag_answers(scores, thresholds)
    parts = []
    for arm in arms:
        rows = flagged[(flagged["arm"] == arm) & flagged["is_misaligned"]].sort_values("aligned").head(TOP_ANSWERS)
        for r in rows.to_dict("records"):
            parts.append(f'<div class="card"><div class="meta"><b>{esc(arm)}</b> seed {esc(r.get("seed"))}, '
                         f'condition {esc(r["condition"])}, {esc(r["question_id"])}: aligned {fmt_score(r["aligned"])}, '
                         f'coherent {fmt_score(r["coherent"])}</div><p>{esc(r["question"])}</p>'
                         f'<div class="answer">{esc(r["answer"])}</div></div>')
    if not parts:
        return "<h2>Misaligned answers</h2><p>No answer was judged misaligned.</p>"
    return f"<h2>Misaligned answers (up to {TOP_ANSWERS} per arm, lowest alignment first)</h2>" + "".join(parts)


def write_conditions_report(run_dir: Path) -> Path:
    """Write `figures/*.png` and `report.html` of a conditions run folder; returns the report path."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / RESULTS).read_text(encoding="utf-8"))
    scores = pd.read_parquet(run_dir / "scores.parquet") if (run_dir / "scores.parquet").is_file() else None
    manifest = RunFolder(run_dir).read_manifest()
    drawn = render_figures(results)
    for name, (data, _) in drawn.items():
        write_png(run_dir / FIGURES_DIR / f"{name}.png", data)
    t = results["thresholds"]
    thresholds = Thresholds(t["aligned_below"], t["coherent_above"], t["aligned_inclusive"])
    boot = results["bootstrap"]
    notes = [
        (f"Misaligned answer: <b>{esc(t['rule'])}</b>; EM rate among coherent answers = misaligned / coherent "
         "(Betley et al. 2025), among scored answers = misaligned / scored (model-organisms-for-EM). Figures and "
         f"fits use the rate among <b>{esc(results['denominator'])}</b> answers."),
        (f"Intervals: {boot['ci'] * 100:g}% with the questions as the sampling unit (Korn-Graubard for a rate, the "
         "paired t interval for a difference), all seeds of an arm pooled; with several seeds per arm the tests "
         "and their intervals take the seeds as replicates instead, and the rate table shows the seed interval."
         if "inference" in results else
         f"Intervals: {boot['ci'] * 100:g}% percentile bootstrap ({boot['n_boot']} resamples, seed {boot['seed']}), "
         "answers resampled within each question, all seeds of an arm pooled."),
        (f"Tests: every arm against the reference arm <b>{esc(results['reference'])}</b> within each condition, "
         f"and every condition against <b>{esc(results['reference_condition'])}</b> within each arm; "
         f"{esc(results['correction'])} correction within each family."),
        *[esc(n) for n in results.get("notes", [])],
    ]
    facts = (f"{len(results['arms'])} arms x {len(results['conditions'])} conditions; seeds "
             f"{esc(', '.join(map(str, results.get('seeds_run', []))))}; "
             f"{0 if scores is None else len(scores):,} answers.")
    body = [
        f"<h1>emkit conditions: {esc(run_dir.resolve().name)}</h1>", f'<p class="sub">{facts}</p>',
        judge_box(judge_info(manifest, scores)),
        '<div class="box"><p>' + "</p><p>".join(notes) + "</p></div>",
        _arms_section(results.get("arm_runs", [])),
        _rates_section(results),
        _prefs_section(results),
        _tests_section(results, "arms", "Arms against the reference arm",
                       f"Each arm against {results['reference']}, within each system-prompt condition."),
        _tests_section(results, "conditions", "Conditions against the reference condition",
                       f"Each condition against {results['reference_condition']}, within each arm."),
        "<h2>Figures</h2>" + "".join(_img(n, data, cap) for n, (data, cap) in drawn.items()),
        _fits_section(results),
        _answers_section(scores, thresholds, results["arms"]),
        manifest_section(manifest),
        f'<p class="muted">Written by emkit {esc(__version__)} at {esc(now())}.</p>',
    ]
    html = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>emkit conditions: {esc(run_dir.resolve().name)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(p for p in body if p) + "\n</body></html>\n")
    path = run_dir / REPORT
    atomic_write_text(path, html)
    return path


def console_table(results: Mapping[str, Any]) -> str:
    """Plain-text summary: EM per arm and condition, then the arm tests, as `emkit conditions` prints it."""
    d = results["denominator"]
    lines = [f"EM rate among {d} answers [{results['bootstrap']['ci']:.0%} CI] (misaligned: {results['thresholds']['rule']})"]
    width = max(len(a) for a in results["arms"]) + 2
    lines.append("arm".ljust(width) + "".join(c[:24].ljust(26) for c in results["conditions"]))
    table = {(r["arm"], r["condition"]): r for r in results["rates"]}
    for arm in results["arms"]:
        cells = []
        for c in results["conditions"]:
            r = table.get((arm, c), {})
            cells.append(fmt_rate(r.get(f"em_rate_{d}"), r.get(f"em_rate_{d}_ci_low"),
                                  r.get(f"em_rate_{d}_ci_high")).ljust(26))
        lines.append(arm.ljust(width) + "".join(cells))
    tests = results["tests"].get("arms") or []
    if tests:
        lines += ["", f"vs {results['reference']} (difference [95% CI], p and {results['correction']}-adjusted p; "
                      "unit: seeds with several seeds per arm, else questions)"]
        for t in tests:
            interval = fmt_ci(t.get(f"diff_em_rate_{d}_ci_low"), t.get(f"diff_em_rate_{d}_ci_high"))
            lines.append(f"  {t['a']['arm']} vs {t['b']['arm']} [{t['a']['condition']}]: "
                         f"{fmt_pp(t.get(f'diff_em_rate_{d}'))} {interval}, p={fmt_p(t.get(f'p_value_{d}'))}, "
                         f"adj {fmt_p(t.get(f'p_value_{d}_adj'))} (unit: {_unit(t)})")
    for r in results.get("prefs") or []:
        s = r.get("out_of_domain") or {}
        i = r.get("in_domain") or {}
        if s.get("mean_shift") is not None and i.get("mean_shift") is not None:
            lines.append(f"preference shift {r['arm']} (seed {r['seed']}), per token: in-domain "
                         f"{i['mean_shift']:+.3f} [{i['ci_low']:+.3f}, {i['ci_high']:+.3f}], out-of-domain "
                         f"{s['mean_shift']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]")
    for f in results["fits"]:
        if f.get("status") == "ok":
            flagged = [key for key in f["params"] if (f.get("estimate_at_bound") or {}).get(key)
                       or (f.get("interval_at_bound") or {}).get(key)]
            lines.append(f"fit {f['group']} [{f['condition']}]: midpoint {f['midpoint_budget']:,.0f} scalars, "
                         f"{fmt_pct(f['params']['bottom'])} -> {fmt_pct(f['params']['top'])}"
                         + (f" (at bound: {', '.join(flagged)})" if flagged else ""))
        else:
            lines.append(f"fit {f['group']} [{f['condition']}]: {f['status']}")
    return "\n".join(lines)
