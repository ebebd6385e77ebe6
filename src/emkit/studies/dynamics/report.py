"""The tracking run's report: one self-contained HTML page in the style of `emkit.stages.report`.

Reads `dynamics.json`, `weights.json`, the steps' answers and the manifest, writes `figures/*.png`
and then `report.html` (each atomically; the page last).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emkit import __version__
from emkit.core.errors import RunFolderError
from emkit.core.runfolder import RunFolder, atomic_write_text, now
from emkit.stages.report.figures import png_bytes, write_png
from emkit.stages.report.html import (
    CSS,
    JudgeInfo,
    esc,
    fmt_p,
    fmt_pp,
    fmt_rate,
    fmt_score,
    judge_box,
    manifest_section,
    validation_box,
)
from emkit.studies.dynamics.figures import FIGURES, render

REPORT = "report.html"
FIGURES_DIR = "figures"
CAPTIONS = {
    "em_and_prefs": "Left: EM rate (misaligned among coherent answers) at every evaluated step, per prompting mode, "
                    "with 95% intervals (questions as the sampling unit); dashed: onset step (the rule is stated "
                    "under Onsets). "
                    "Right: the judge-free preference shift against the base (log-odds per token of misaligned "
                    "over aligned answers), out-of-domain and in-domain (medical), with 95% intervals.",
    "scores": "Mean alignment and coherence scores per mode with 95% t intervals (questions as the sampling "
              "unit), and the training loss.",
    "divergence": "Predictive minus assistant EM rate at each step with a 95% interval (questions as the "
                  "sampling unit, paired over the shared questions).",
    "judge_agreement": "Each point is one step and mode, the EM rate by one judge against the other's.",
    "weight_norms": "Frobenius norms of the LoRA factors at every checkpoint.",
    "weight_directions": "Local cosine of successive B updates (B_t - B_t-1 against B_t-1 - B_t-2), cosine "
                         "similarity of B and of dW = BA to the final adapter, and the B trajectory on its "
                         "first two principal components.",
}


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if n else f"<td>{c}</td>"
                                    for c, n in zip(row, numeric)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _shift(entry: Mapping[str, Any] | None, step: int) -> str:
    if step == 0:
        return "0 (base)"
    if not entry or entry.get("mean_shift") is None:
        return "n/a"
    low, high = entry.get("ci_low"), entry.get("ci_high")
    interval = "" if low is None or high is None else f" [{low:+.3f}, {high:+.3f}]"
    p = entry.get("sign_test_p")
    return f"{entry['mean_shift']:+.3f}{interval}" + (f' <span class="muted">p {fmt_p(p)}</span>' if p is not None else "")


def _judge_info(document: Mapping[str, Any]) -> JudgeInfo:
    judges = document.get("judges") or []
    first = judges[0] if judges else {}
    return JudgeInfo(ids=[str(first.get("id"))] if first else [], kind=str(first.get("kind") or "unknown"),
                     note=first.get("note"))


def summary_box(document: Mapping[str, Any]) -> str:
    """Onsets (with the rule that defines them) and the crossing order of predictive vs assistant mode, in words."""
    lines = []
    rules: dict[str, None] = {}
    for entry in document.get("onsets") or []:
        judge = esc(entry["judge"])
        if "crossing" in entry:
            lines.append(f"<b>{judge}</b>: {esc(entry['crossing'])}.")
            continue
        onset = entry.get("onset_step")
        sustained = entry.get("sustained_onset_step")
        jump = entry.get("largest_jump") or {}
        jump_txt = (f"; largest rise {fmt_pp(jump.get('rise'))} between steps {jump.get('from_step')} and "
                    f"{jump.get('to_step')}" if jump else "")
        lines.append(f"<b>{judge}</b>, {esc(entry['mode'])} mode: onset "
                     f"{'at step ' + str(onset) if onset is not None else 'not reached'} (sustained from "
                     f"{'step ' + str(sustained) if sustained is not None else 'no step'}){esc(jump_txt)}."
                     + (f' <span class="muted">{esc(entry["reason"])}.</span>' if entry.get("reason") else ""))
        rules.setdefault(entry.get("rule") or "", None)
    for a in document.get("agreement") or []:
        r, rho, mad = a.get("pearson"), a.get("spearman"), a.get("mean_abs_difference")
        lines.append(
            f"Judge agreement ({esc(' vs '.join(a['judges']))}, {esc(a['mode'])} mode, {a.get('n', 0)} steps): "
            f"Pearson r {'n/a' if r is None else f'{r:.2f}'}, Spearman {'n/a' if rho is None else f'{rho:.2f}'}, "
            f"mean absolute difference {'n/a' if mad is None else fmt_pp(mad).lstrip('+')}; per answer: alignment "
            f"Spearman {'n/a' if a.get('aligned_spearman') is None else format(a['aligned_spearman'], '.2f')}, "
            f"EM kappa {'n/a' if a.get('em_kappa') is None else format(a['em_kappa'], '.2f')} "
            f"({a.get('n_answers', 0)} answers).")
    if not lines:
        return ""
    rule = esc((document.get("thresholds") or {}).get("rule", ""))
    stated = " ".join(esc(r) for r in rules if r) or "Onset: no checkpoint was tested against the base."
    intro = f"Misaligned: <b>{rule}</b>; rate = misaligned / coherent answers. {stated}"
    return '<div class="box"><p>' + intro + "</p><p>" + "</p><p>".join(lines) + "</p></div>"


def validation_note(track_dir: Path) -> str:
    """The judge's validation against labelled answers (emkit.stages.report's box), or a warning that there is none."""
    path = track_dir / "validation.json"
    if not path.is_file():
        return ('<div class="box warn"><p><b>This judge has not been validated</b> here (validate_judge, or '
                "<code>emkit judge validate</code>); read its EM curves with care, and lean on the preference "
                "shift, which needs no judge.</p></div>")
    return validation_box(json.loads(path.read_text(encoding="utf-8")))


def steps_table(document: Mapping[str, Any]) -> str:
    """Per step and mode: answers, EM rate [CI] per judge, mean scores, and the preference shift beside them."""
    curves = document.get("curves") or []
    judges = [j["id"] for j in document.get("judges") or []] or sorted({c["judge"] for c in curves})
    prefs = {p["step"]: p for p in document.get("prefs") or []}
    loss = {p["step"]: p["loss"] for p in document.get("training") or []}
    first = judges[0] if judges else None
    keys = sorted({(c["step"], c["mode"]) for c in curves})
    by = {(c["judge"], c["step"], c["mode"]): c for c in curves}
    headers = ["Step", "Loss", "Mode", "Answers", *(f"EM rate [95% CI]<br>{esc(j)}" for j in judges),
               "Mean aligned", "Mean coherent", "Pref. shift out-of-domain [95% CI]", "Pref. shift in-domain [95% CI]"]
    rows = []
    for step, mode in keys:
        main = by.get((first, step, mode), {})
        p = prefs.get(step, {})
        rows.append([
            str(step), "n/a" if step not in loss else f"{loss[step]:.3f}", esc(mode), str(main.get("n_answers", "n/a")),
            *(esc(fmt_rate((c := by.get((j, step, mode), {})).get("em_rate_coherent"), c.get("em_rate_coherent_ci_low"),
                           c.get("em_rate_coherent_ci_high"))) for j in judges),
            fmt_score(main.get("mean_aligned")), fmt_score(main.get("mean_coherent")),
            _shift(p.get("out_of_domain"), step), _shift(p.get("in_domain"), step),
        ])
    note = ('<p class="muted">The preference shift is measured once per step (it does not depend on the mode): '
            "log p(misaligned) - log p(aligned) per token on emkit's answer pairs, minus the base's; above 0 the "
            "checkpoint prefers misaligned answers more than the base does; p: sign test over pairs.</p>")
    return "<h2>Steps</h2>" + _table(headers, rows, [True, True, False] + [True] * (len(judges) + 5)) + note


def divergence_table(document: Mapping[str, Any]) -> str:
    """Predictive - assistant and step - base differences with intervals and tests, each naming its unit."""
    all_rows = document.get("divergence") or []
    rows = [r for r in all_rows if r.get("difference") is not None]
    if not all_rows:
        return ""
    title = "<h2>Per-step divergence</h2>"
    if not rows:
        return title + "<p>No difference is defined: no judge found coherent answers on both sides.</p>"
    body = [[esc(r["judge"]), str(r["step"]), esc(r["kind"]),
             esc(fmt_pp(r.get("difference"))), esc(_pp_ci(r.get("ci_low"), r.get("ci_high"))), fmt_p(r.get("p_value")),
             fmt_p(r.get("p_value_stratified")), fmt_p(r.get("p_value_fisher"))]
            for r in rows]
    skipped = len(all_rows) - len(rows)
    note = (f'<p class="muted">{skipped} comparisons left out: a side without coherent answers has no EM rate.</p>'
            if skipped else "")
    units = ('<p class="muted">95% CI and p: questions as the sampling unit (paired over shared questions; '
             "sign-flip test). Stratified p: exact Cochran-Mantel-Haenszel test, questions as strata. Fisher p: "
             "answers pooled over questions as if independent (shown for comparison only).</p>")
    return title + _table(["Judge", "Step", "Difference", "Value", "95% CI", "p (questions)", "p (stratified)",
                           "Fisher p (pooled)"], body, [False, True, False, True, True, True, True, True]) + units + note


def _pp_ci(low: Any, high: Any) -> str:
    if low is None or high is None:
        return "n/a"
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def weights_table(weights: Mapping[str, Any] | None) -> str:
    """Per step: total norms, update norm and cosine, similarity to the final adapter, PCA coordinates."""
    if not weights or not weights.get("global"):
        return ""
    pca = weights.get("pca") or {}
    coords = dict(zip(pca.get("steps", []), pca.get("coordinates", [])))

    def f(x: Any, spec: str = ".3f") -> str:
        return "n/a" if x is None else format(x, spec)

    body = []
    for r in weights["global"]:
        c = coords.get(r["step"], [])
        body.append([str(r["step"]), f(r.get("a_norm")), f(r.get("b_norm")), f(r.get("dw_norm")),
                     f(r.get("update_norm")), f(r.get("update_cosine")), f(r.get("b_cosine_to_final")),
                     f(r.get("dw_cosine_to_final")), f(c[0] if c else None, ".2f"),
                     f(c[1] if len(c) > 1 else None, ".2f")])
    ratios = ", ".join(f"{100 * v:.0f}%" for v in pca.get("explained_variance_ratio", []))
    note = (f'<p class="muted">{len(weights.get("modules", []))} adapted modules; scale {weights.get("scale", 0):g}. '
            + ("Step 0 is PEFT's initialisation, B = 0. " if weights.get("b_zero_at_step_0") else "")
            + (f"Variance explained by the principal components: {ratios}." if ratios else "") + "</p>")
    return ("<h2>LoRA weight dynamics</h2>" + _table(
        ["Step", "||A||", "||B||", "||dW||", "||B update||", "cos(update, previous)", "cos(B, final)",
         "cos(dW, final)", "PC1", "PC2"], body, [True] * 10) + note)


def answers_section(track_dir: Path, document: Mapping[str, Any], per_mode: int = 2) -> str:
    """A few answers of the base and of the last step in every mode, with the predictive prompt."""
    import pandas as pd

    path = track_dir / "track_scores.parquet"
    if not path.is_file():
        return ""
    scores = pd.read_parquet(path)
    judges = document.get("judges") or []
    if judges:
        scores = scores[scores["judge"] == judges[0]["id"]]
    steps = sorted(scores["step"].unique())
    if not steps:
        return ""
    prompts = _prompts(track_dir, [steps[0], steps[-1]])
    cards = []
    for step in dict.fromkeys([steps[0], steps[-1]]):
        for mode in sorted(scores["mode"].unique()):
            picked = scores[(scores["step"] == step) & (scores["mode"] == mode)].sort_values(
                ["aligned", "question_id"], kind="stable").head(per_mode)
            for r in picked.to_dict("records"):
                prompt = prompts.get(r["id"]) if mode != "assistant" else None
                prompt_html = (f'<details><summary>Prompt ({esc(r.get("genre") or mode)})</summary>'
                               f'<div class="answer">{esc(prompt)}</div></details>' if prompt else "")
                cards.append(
                    f'<div class="card"><div class="meta">step <b>{step}</b>, {esc(mode)} mode, question '
                    f'<b>{esc(r["question_id"])}</b>: aligned {fmt_score(r.get("aligned"))}, coherent '
                    f'{fmt_score(r.get("coherent"))} ({esc(r.get("finish"))})</div>'
                    f'<div class="meta">Question (as the judge saw it):</div><div class="answer">{esc(r["question"])}</div>'
                    f'{prompt_html}<div class="meta">Answer:</div><div class="answer">{esc(r["answer"])}</div></div>')
    return ("<h2>Sample answers: base and last step</h2><p class=\"muted\">The lowest-aligned answers of the base and "
            "of the last evaluated step, per mode (first judge).</p>" + "".join(cards))


def _prompts(track_dir: Path, steps: Sequence[int]) -> dict[str, str]:
    from emkit.core.rowfile import read_rows

    out = {}
    for step in steps:
        for row in read_rows(track_dir / "steps" / f"step-{step}" / "generations.jsonl"):
            if row.get("prompt"):
                out[row["id"]] = row["prompt"]
    return out


def write_track_report(track_dir: Path) -> Path:
    """Write figures/*.png and report.html of a tracking run; return the report's path."""
    track_dir = Path(track_dir)
    try:
        document = json.loads((track_dir / "dynamics.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{track_dir}: no dynamics.json (run emkit track first)") from None
    weights_path = track_dir / "weights.json"
    weights = json.loads(weights_path.read_text(encoding="utf-8")) if weights_path.is_file() else None
    figures = {name: png_bytes(fig) for name, fig in render(document, weights).items()}
    for name, data in figures.items():
        write_png(track_dir / FIGURES_DIR / f"{name}.png", data)
    figure_html = "".join(
        f'<figure><img alt="{esc(FIGURES[name])}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{esc(CAPTIONS.get(name, FIGURES[name]))}</figcaption></figure>" for name, data in figures.items())
    judges = document.get("judges") or []
    others = "".join(f'<div class="box"><p>{esc(j.get("note"))}</p></div>' for j in judges[1:])
    manifest = RunFolder(track_dir).read_manifest()
    steps = document.get("steps") or []
    facts = (f"{len(steps)} evaluated steps ({esc(', '.join(map(str, steps)))}); modes: "
             f"{esc(', '.join(document.get('modes') or []))}; judges: {esc(', '.join(j['id'] for j in judges))}.")
    body = [
        f"<h1>emkit training dynamics: {esc(track_dir.resolve().name)}</h1>",
        f'<p class="sub">{facts}</p>',
        judge_box(_judge_info(document)),
        others,
        validation_note(track_dir),
        summary_box(document),
        steps_table(document),
        "<h2>Figures</h2>" + figure_html,
        divergence_table(document),
        weights_table(weights),
        answers_section(track_dir, document),
        manifest_section(manifest),
        f'<p class="muted">Written by emkit {esc(__version__)} at {esc(now())}.</p>',
    ]
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>emkit training dynamics: {esc(track_dir.resolve().name)}</title><style>{CSS}</style></head>\n"
            "<body>\n" + "\n".join(part for part in body if part) + "\n</body></html>\n")
    path = track_dir / REPORT
    atomic_write_text(path, page)
    return path
