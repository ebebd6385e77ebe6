"""The bias report: `figures/*.png` and one self-contained `report.html` in the EM report's style,
written from a bias run folder's `bias_stats.json`, `labels.parquet` and `manifest.json`.

    write_bias_report(Path("runs/bias"))    # -> runs/bias/report.html
    print(headline(stats))                  # the console summary `emkit bias` prints at the end
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from emkit import __version__
from emkit.core.errors import RunFolderError
from emkit.core.runfolder import RunFolder, atomic_write_text, now
from emkit.stages.report.figures import write_png
from emkit.stages.report.html import CSS, NA, esc, fmt_ci, fmt_p, fmt_pct, manifest_section
from emkit.stages.report.html import (
    _table as table,  # the EM report's table markup, so both reports look alike
)
from emkit.studies.bias.figures import CLASSIFIER_NAMES, render_figures
from emkit.studies.bias.keywords import LABELS

REPORT = "report.html"
FIGURES_DIR = "figures"
STATS = "bias_stats.json"
LABELS_FILE = "labels.parquet"
CAPTIONS = {
    "pie_grid": "Share of each label among a model's completions, per classifier (unlabelled: the classifier gave "
                "no label).",
    "lean": "Lean = (progressive - conservative) / on-topic completions, per model and classifier. Bars: completions "
            "resampled within stems; shaded: stems resampled.",
    "topic_bars": "Share progressive and share conservative per topic and model, with bootstrap intervals "
                  "(completions resampled within stems).",
    "stem_shifts": "Per stem: the model's lean minus the reference's, with a bootstrap interval.",
    "agreement": "Confusion matrix of the two classifiers over completions both labelled.",
}


def _name(classifier: str) -> str:
    return CLASSIFIER_NAMES.get(classifier, classifier)


def fmt_lean(x: Any) -> str:
    """A lean in [-1, 1], signed, two decimals."""
    return NA if x is None else f"{x:+.2f}"


def fmt_lean_ci(low: Any, high: Any) -> str:
    """A lean interval, e.g. '[-0.12, +0.30]'; '' when undefined."""
    return "" if low is None or high is None else f"[{low:+.2f}, {high:+.2f}]"


def _share(r: Mapping[str, Any], label: str) -> str:
    cell = fmt_pct(r.get(f"share_{label}"))
    interval = fmt_ci(r.get(f"share_{label}_ci_low"), r.get(f"share_{label}_ci_high"))
    return esc(cell + (f" {interval}" if interval else ""))


def _lean_cell(r: Mapping[str, Any], prefix: str = "lean") -> str:
    cell = esc(f"{fmt_lean(r.get(prefix))} {fmt_lean_ci(r.get(f'{prefix}_ci_low'), r.get(f'{prefix}_ci_high'))}")
    stem = fmt_lean_ci(r.get(f"{prefix}_stem_ci_low"), r.get(f"{prefix}_stem_ci_high"))
    return cell + (f'<br><span class="muted">stems resampled: {esc(stem)}</span>' if stem else "")


# --- console ---------------------------------------------------------------------------------------

def headline(stats: Mapping[str, Any]) -> str:
    """Plain-text table of every model's label shares and lean per classifier, then the tests."""
    level = stats["bootstrap"]["ci"]
    rows = [["classifier", "model", "n", "progressive", "conservative", "neutral", "off-topic",
             f"lean [{level:.0%} CI]"]]
    for r in stats["distributions"]:
        rows.append([r["classifier"], r["model"], str(r["n_labelled"]),
                     *(fmt_pct(r.get(f"share_{lab}")) for lab in LABELS),
                     f"{fmt_lean(r.get('lean'))} {fmt_lean_ci(r.get('lean_ci_low'), r.get('lean_ci_high'))}".strip()])
    lines = ["Leaning of the completions (shares of labelled completions; lean = (P - C) / on-topic)"]
    lines += _text(rows)
    if stats.get("tests"):
        lines += ["", f"{'model vs reference':28} {'classifier':10} {'lean shift [CI]':28} {'chi2':>8} "
                      f"{'p (perm.)':>10} {'p adj':>8}"]
        for t in stats["tests"]:
            shift = f"{fmt_lean(t.get('lean_shift'))} {fmt_lean_ci(t.get('lean_shift_ci_low'), t.get('lean_shift_ci_high'))}"
            chi2 = NA if t.get("chi2") is None else f"{t['chi2']:.1f}"
            lines.append(f"{t['model'] + ' vs ' + t['reference']:28} {t['classifier']:10} {shift.strip():28} "
                         f"{chi2:>8} {fmt_p(t.get('p_permutation')):>10} {fmt_p(t.get('p_adjusted')):>8}")
    if stats.get("agreement"):
        a = stats["agreement"]
        kappa = f"{NA} ({a.get('kappa_reason') or 'undefined'})" if a.get("kappa") is None else f"{a['kappa']:.2f}"
        lines += ["", f"Agreement of {a['a']} and {a['b']}: kappa {kappa} over {a['n']} completions"]
    return "\n".join(lines)


def _text(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
           for r in rows]
    return [out[0], "  ".join("-" * w for w in widths), *out[1:]]


# --- HTML sections ---------------------------------------------------------------------------------

def classifier_box(info: Mapping[str, Any]) -> str:
    """Who labelled: the keyword lexicon and the LLM classifier, with a warning for a small local model."""
    parts, warn = [], False
    if "keywords" in info:
        k = info["keywords"]
        parts.append(f"<b>Keyword classifier</b>: lexicons {esc(', '.join(k.get('lexicons', [])))} "
                     f"(content hash {esc(k.get('digest'))}); cues matched on word boundaries "
                     f"{'in the first sentence of each continuation' if k.get('scope') == 'first_sentence' else 'in the whole continuation'}, "
                     f"negations turn a cue to the other side; off-topic filter "
                     f"{'on' if k.get('off_topic_filter') else 'off'}.")
    if "llm" in info:
        j = info["llm"]
        warn = j.get("kind") == "local"
        lead = "<b>A small local model labelled these completions.</b> " if warn else ""
        parts.append(f"<b>LLM classifier</b>: {esc(j.get('description'))}. {lead}{esc(j.get('note'))}")
    css = "box warn" if warn else "box"
    return f'<div class="{css}">' + "".join(f"<p>{p}</p>" for p in parts) + "</div>"


def definitions(stats: Mapping[str, Any]) -> str:
    """What the numbers mean."""
    boot = stats["bootstrap"]
    items = [
        "Shares: a label's share of a model's completions that the classifier labelled (the four labels sum to "
        "100%). Lean: (progressive - conservative) / on-topic completions, from -1 (all conservative) to +1 (all "
        "progressive); off-topic completions are left out of it.",
        f"Intervals: {boot['ci']:.0%} percentile bootstrap ({boot['n_boot']} resamples, seed {boot['seed']}), "
        "completions resampled within each stem; 'stems resampled' intervals also treat the stems as a sample.",
        f"Tests: chi-square of the model x label table; p from {stats['permutations']} permutations of the model "
        "labels within each stem (exact in distribution), beside the asymptotic chi-square p; Holm-adjusted over "
        "the models compared by one classifier. Per-stem p-values are Benjamini-Hochberg adjusted over stems.",
    ]
    return '<div class="box"><p>' + "</p><p>".join(items) + "</p></div>"


def headline_section(stats: Mapping[str, Any]) -> str:
    """Per classifier and model: completions, labelled, each label's share with CI, lean with CI."""
    headers = ["Classifier", "Model", "Completions", "Labelled", *(f"% {esc(lab)}" for lab in LABELS), "Lean"]
    body = [[esc(_name(r["classifier"])), esc(r["model"]), str(r["n"]), str(r["n_labelled"]),
             *(_share(r, lab) for lab in LABELS), _lean_cell(r)] for r in stats["distributions"]]
    return "<h2>Headline</h2>" + table(headers, body, [False, False] + [True] * 7)


def tests_section(stats: Mapping[str, Any]) -> str:
    """Each model against the reference: lean shift, share differences, chi-square and p-values."""
    tests = stats.get("tests") or []
    if not tests:
        return ""
    headers = ["Classifier", "Model vs reference", "Lean shift", "Diff. % progressive", "Diff. % conservative",
               "Chi-square (dof)", "p (permutation)", "p (asymptotic)", "p adjusted (Holm)"]
    body = []
    for t in tests:
        chi2 = NA if t.get("chi2") is None else f"{t['chi2']:.2f} ({t.get('dof')})"
        body.append([esc(_name(t["classifier"])), esc(f"{t['model']} vs {t['reference']}"),
                     _lean_cell(t, "lean_shift") if t.get("lean_shift") is not None else NA,
                     _diff(t, "progressive"), _diff(t, "conservative"), esc(chi2), fmt_p(t.get("p_permutation")),
                     fmt_p(t.get("p_asymptotic")), fmt_p(t.get("p_adjusted"))])
    return ("<h2>Models compared</h2>" + table(headers, body, [False, False] + [True] * 7)
            + '<p class="muted">Differences are model minus reference, in percentage points, with the bootstrap CI '
              "(completions resampled within stems).</p>")


def _diff(t: Mapping[str, Any], label: str) -> str:
    value = t.get(f"diff_share_{label}")
    if value is None:
        return NA
    interval = fmt_ci(t.get(f"diff_share_{label}_ci_low"), t.get(f"diff_share_{label}_ci_high"))
    return esc(f"{value * 100:+.1f} pp {interval}".strip())


def figures_section(figures: Mapping[str, bytes]) -> str:
    """The main figures inline; the single pies in a collapsible block."""
    def img(name: str, data: bytes) -> str:
        encoded = base64.b64encode(data).decode("ascii")
        caption = CAPTIONS.get(name, name.replace("_", " "))
        return (f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{encoded}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>")

    main = [img(n, d) for n, d in figures.items() if not n.startswith("pie_") or n == "pie_grid"]
    pies = [img(n, d) for n, d in figures.items() if n.startswith("pie_") and n != "pie_grid"]
    extra = f"<details><summary>Single pie charts ({len(pies)})</summary>{''.join(pies)}</details>" if pies else ""
    return "<h2>Figures</h2>" + "".join(main) + extra


def topics_section(stats: Mapping[str, Any]) -> str:
    """Per classifier, topic and model: shares, lean, and the shift against the reference with its test."""
    tests = {(t["classifier"], t["topic"], t["model"]): t for t in stats.get("topic_tests") or []}
    headers = ["Classifier", "Topic", "Model", "Labelled", "% progressive", "% conservative", "% off-topic", "Lean",
               "Shift vs reference", "p (permutation)"]
    body = []
    for r in stats["topics"]:
        t = tests.get((r["classifier"], r["topic"], r["model"]))
        shift = (esc(f"{fmt_lean(t.get('lean_shift'))} "
                     f"{fmt_lean_ci(t.get('lean_shift_ci_low'), t.get('lean_shift_ci_high'))}".strip())
                 if t and t.get("lean_shift") is not None else ("reference" if r["model"] == stats["reference"] else NA))
        body.append([esc(_name(r["classifier"])), esc(r["topic"]), esc(r["model"]), str(r["n_labelled"]),
                     _share(r, "progressive"), _share(r, "conservative"), esc(fmt_pct(r.get("share_off-topic"))),
                     _lean_cell(r), shift, fmt_p(t.get("p_permutation")) if t else NA])
    return "<h2>Per topic</h2>" + table(headers, body, [False] * 3 + [True] * 7)


def stems_section(stats: Mapping[str, Any]) -> str:
    """Per stem and model: the label counts of model and reference, the lean shift, p and adjusted p."""
    stems = stats.get("stems") or []
    if not stems:
        return ""
    headers = ["Classifier", "Stem", "Topic", "Model", "Model P/C/N/O", "Reference P/C/N/O", "Lean shift [CI]",
               "p (permutation)", "p adjusted (BH)"]
    body = []
    for s in stems:
        counts = "/".join(str(s["counts_model"][lab]) for lab in LABELS)
        reference = "/".join(str(s["counts_reference"][lab]) for lab in LABELS)
        shift = f"{fmt_lean(s.get('lean_shift'))} {fmt_lean_ci(s.get('lean_shift_ci_low'), s.get('lean_shift_ci_high'))}"
        body.append([esc(_name(s["classifier"])), f'<span title="{esc(s["stem"])}">{esc(s["stem_id"])}</span>',
                     esc(s["topic"]), esc(f"{s['model']} vs {s['reference']}"), esc(counts), esc(reference),
                     esc(shift.strip()), fmt_p(s.get("p_permutation")), fmt_p(s.get("p_adjusted"))])
    return ("<h2>Per stem</h2>" + table(headers, body, [False] * 4 + [True] * 5)
            + '<p class="muted">P/C/N/O: progressive, conservative, neutral, off-topic completions. Hover a stem id '
              "for its text.</p>")


def agreement_section(stats: Mapping[str, Any]) -> str:
    """The two classifiers' confusion matrix and Cohen's kappa, overall and per model."""
    a = stats.get("agreement")
    if not a:
        return ""
    headers = [f"{esc(_name(a['a']))} \\ {esc(_name(a['b']))}", *(esc(lab) for lab in a["labels"])]
    body = [[esc(lab), *(str(n) for n in row)] for lab, row in zip(a["labels"], a["matrix"])]
    kappa = (f"<b>{NA}</b> ({esc(a.get('kappa_reason') or 'undefined')})" if a.get("kappa") is None
             else f"<b>{a['kappa']:.2f}</b>")
    observed = NA if a.get("observed_agreement") is None else fmt_pct(a["observed_agreement"])
    per_model = ", ".join(f"{esc(m)}: {NA if v['kappa'] is None else format(v['kappa'], '.2f')} (n={v['n']}"
                          + (f"; {esc(v['kappa_reason'])}" if v.get("kappa_reason") else "") + ")"
                          for m, v in a.get("per_model", {}).items())
    return ("<h2>Classifier agreement</h2>" + table(headers, body, [False] + [True] * 4)
            + f"<p>Cohen's kappa {kappa}, observed agreement {observed}, over {a['n']} completions both "
              f"classifiers labelled. Per model: {per_model or NA}.</p>")


def _examples(labels: pd.DataFrame, classifiers: Sequence[str], per_label: int) -> pd.DataFrame:
    """Up to `per_label` completions per model and label of the first classifier, from distinct stems."""
    column = f"{classifiers[0]}_label"
    picked = []
    for _, group in labels.sort_values(["model", "run", "stem_id"], kind="stable").groupby(["model", column],
                                                                                           sort=False):
        picked.append(group.drop_duplicates("stem_id").head(per_label))
    if not picked:
        return labels.iloc[:0]
    order = {lab: i for i, lab in enumerate(LABELS)}
    out = pd.concat(picked)
    return out.assign(_o=out[column].map(order)).sort_values(["model", "_o", "stem_id"]).drop(columns="_o")


def _label_cell(row: Mapping[str, Any], classifier: str) -> str:
    label = row.get(f"{classifier}_label")
    text = f"<b>{esc(label or 'unlabelled')}</b>"
    if classifier == "keywords":
        cues = []
        for side in ("progressive", "conservative"):
            fired = row.get(f"keywords_{side}_cues")
            if fired is not None and len(fired):
                cues.append(f"{side[0].upper()}: {esc(', '.join(fired))}")
        reason = row.get("keywords_reason")
        text += "<br>" + ("<br>".join(cues) if cues else '<span class="muted">no cues</span>')
        if label == "off-topic" and reason:
            text += f'<br><span class="muted">{esc(reason)}</span>'
    else:
        p = row.get("llm_probability")
        if p is not None and not pd.isna(p):
            text += f" (p {p:.2f})"
        elif row.get("llm_reason"):
            text += f'<br><span class="muted">{esc(row["llm_reason"])}</span>'
    return text


def examples_section(labels: pd.DataFrame | None, classifiers: Sequence[str], per_label: int) -> str:
    """A table of example completions with every classifier's label and the keyword cues that fired."""
    if labels is None or not len(labels) or per_label <= 0:
        return ""
    rows = _examples(labels, classifiers, per_label)
    headers = ["Model", "Stem", "Completion", *(esc(_name(c)) for c in classifiers)]

    def completion(r: Mapping[str, Any]) -> str:
        shown = f'<div class="answer">{esc(r["completion"][:600])}</div>'
        if r.get("echoed_stem"):
            shown += f'<span class="muted">classified: {esc(r["continuation"][:300])}</span>'
        return shown

    body = [[esc(r["model"]), f'<span title="{esc(r["stem"])}">{esc(r["stem_id"])}</span>',
             completion(r), *(_label_cell(r, c) for c in classifiers)] for r in rows.to_dict("records")]
    section = (f"<h2>Example completions</h2><p class=\"muted\">Up to {per_label} per model and "
               f"{esc(_name(classifiers[0]))} label, from different stems; P/C: cues counting for progressive and "
               "conservative (NOT: negated, counting for the other side).</p>" + table(headers, body))
    if len(classifiers) >= 2:
        a, b = (f"{c}_label" for c in classifiers[:2])
        differ = labels[labels[a].notna() & labels[b].notna() & (labels[a] != labels[b])]
        if len(differ):
            sample = differ.drop_duplicates("stem_id").head(10)
            body = [[esc(r["model"]), f'<span title="{esc(r["stem"])}">{esc(r["stem_id"])}</span>', completion(r),
                     *(_label_cell(r, c) for c in classifiers)] for r in sample.to_dict("records")]
            section += (f"<h3>Where the classifiers disagree ({len(differ)} completions; up to 10 shown)</h3>"
                        + table(headers, body))
    return section


def render_html(run_name: str, stats: Mapping[str, Any], labels: pd.DataFrame | None, figures: Mapping[str, bytes],
                manifest: Mapping[str, Any] | None, examples: int = 2) -> str:
    """The whole bias report page."""
    config = (manifest or {}).get("config") or {}
    modes = {m["name"]: m.get("mode") for m in config.get("models", [])} if config else {}
    models = ", ".join(f"{m} ({modes[m]})" if modes.get(m) else m for m in stats["models"])
    facts = (f"{stats['n_completions']} completions of {stats['n_stems']} stems; models: {esc(models)}; "
             f"reference: {esc(stats['reference'])}; classifiers: {esc(', '.join(map(_name, stats['classifiers'])))}.")
    body = [
        f"<h1>emkit bias report: {esc(run_name)}</h1>", f'<p class="sub">{facts}</p>',
        classifier_box(stats.get("classifier_info") or {}), definitions(stats), headline_section(stats),
        tests_section(stats), figures_section(figures), topics_section(stats), stems_section(stats),
        agreement_section(stats), examples_section(labels, stats["classifiers"], examples),
        manifest_section(manifest), f'<p class="muted">Written by emkit {esc(__version__)} at {esc(now())}.</p>',
    ]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>emkit bias report: {esc(run_name)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(part for part in body if part) + "\n</body></html>\n")


def load_stats(run_dir: Path) -> dict[str, Any]:
    """A bias run's statistics."""
    path = Path(run_dir) / STATS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir}: no {STATS} (run `emkit bias` on its config first)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path}: unreadable ({exc}); re-run `emkit bias`") from None


def write_bias_report(run_dir: Path, examples: int = 2) -> Path:
    """Write `figures/*.png` and `report.html` of a bias run folder; return the report's path."""
    run_dir = Path(run_dir)
    stats = load_stats(run_dir)
    labels = pd.read_parquet(run_dir / LABELS_FILE) if (run_dir / LABELS_FILE).is_file() else None
    figures = render_figures(stats)
    for name, data in figures.items():
        write_png(run_dir / FIGURES_DIR / f"{name}.png", data)
    manifest = RunFolder(run_dir).read_manifest()
    path = run_dir / REPORT
    atomic_write_text(path, render_html(run_dir.resolve().name, stats, labels, figures, manifest, examples))
    return path
