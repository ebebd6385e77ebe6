"""HTML reports of the probe and steering-sweep runs, in the style of the EM report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emkit import __version__
from emkit.core.runfolder import atomic_write_text, now
from emkit.stages.report.figures import png_bytes, write_png
from emkit.stages.report.html import CSS, _table, esc


def _img(data: bytes, caption: str) -> str:
    import base64

    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(ci: Any, digits: int = 2) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _page(title: str, body: list[str]) -> str:
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(b for b in body if b)
            + f'\n<p class="muted">Written by emkit {esc(__version__)} at {esc(now())}.</p>\n</body></html>\n')


def _save_fig(run_dir: Path, name: str, fig: Any) -> bytes:
    data = png_bytes(fig)
    write_png(run_dir / "figures" / f"{name}.png", data)
    return data


def write_probe_report(run_dir: Path) -> Path:
    """report.html of a probe run: per-layer AUROC and separation, controls, histogram, cosines."""
    from emkit.studies.interp.figures import cosine_heatmap, per_layer_metric, projection_histogram

    result = json.loads((run_dir / "probe.json").read_text(encoding="utf-8"))
    meta, rows = result["meta"], result["layers"]
    bow = result["controls"]["bag_of_words"].get("auroc")
    figs = [
        (_save_fig(run_dir, "auroc_per_layer", per_layer_metric(rows, "auroc", chance=0.5, bow=bow,
                                                                ylabel="held-out AUROC")),
         "Held-out AUROC per layer (bands: 95% group-bootstrap intervals); dashed: bag-of-words control"),
        (_save_fig(run_dir, "separation_per_layer", per_layer_metric(rows, "separation", chance=0.0,
                                                                     ylabel="separation (pooled SD)")),
         "Held-out separation of the class means along the direction, in pooled standard deviations"),
    ]
    ts = result.get("test_scores") or {}
    if ts.get("scores"):
        names = ("base", "organism") if meta["contrast"] == "models" else ("aligned", "misaligned")
        figs.append((_save_fig(run_dir, "projection_histogram",
                               projection_histogram(ts["scores"], ts["labels"], ts["layer"], names)),
                     f"Held-out projections at the best layer ({ts['layer']})"))
    if result.get("layer_cosines"):
        figs.append((_save_fig(run_dir, "layer_cosines", cosine_heatmap(result["layer_cosines"])),
                     "Cosine similarity of the mean-difference directions across layers"))
    emb = result["controls"]["embedding_layer"]
    emb_auroc = max((r["auroc"] for r in emb.values() if r and r.get("auroc") is not None), default=None)
    best = result["best_layer"]
    best_rows = [r for r in rows if r["method"] in best and r["layer"] == best[r["method"]]]
    top = max((r["auroc"] for r in best_rows), default=None)
    warn = ""
    if top is not None and ((emb_auroc is not None and emb_auroc >= top - 0.05) or (bow is not None and bow >= top - 0.05)):
        warn = ('<div class="box warn"><p><b>Surface wording separates this contrast about as well as the best layer.'
                f"</b> Embedding-layer AUROC {_f(emb_auroc)}, bag-of-words AUROC {_f(bow)}, best layer {_f(top)}: "
                "the direction may read wording, not a deep misalignment feature.</p></div>")
    table_rows = [[("emb" if r["layer"] == -1 else str(r["layer"])), r["method"], _f(r["auroc"]), _ci(r["auroc_ci"]),
                   _f(r["accuracy"]), _f(r["separation"], 2), _ci(r["separation_ci"]), str(r["n_test"])]
                  for r in sorted(rows, key=lambda r: (r["layer"], r["method"]))]
    control = ""
    if "control" in result:
        c = result["control"]
        keys = sorted(c["layers"], key=int)
        cols = sorted({k for v in c["layers"].values() for k in v})
        control = ("<h2>Control organism</h2>" + f'<p class="sub">{esc(c.get("reading", ""))}</p>'
                   + _table(["layer", *cols], [[k, *[_f(c["layers"][k].get(col)) for col in cols]] for k in keys],
                            [False] + [True] * len(cols)))
    agreement = result.get("method_agreement") or {}
    body = [
        f"<h1>emkit probe: {esc(run_dir.name)}</h1>",
        f'<p class="sub">contrast <b>{esc(meta["contrast"])}</b>, position {esc(meta["position"])}, model '
        f'{esc(meta["model"])}, organism {esc(meta.get("organism"))}; {result["n_rows"]} rows '
        f'({result["n_positive"]} label 1). Layer k = output of decoder block k; emb = embeddings. All metrics on '
        "held-out groups.</p>",
        '<div class="box"><p>Best layer: ' + ", ".join(f"{esc(m)} {b}" for m, b in best.items())
        + f". Best held-out AUROC {_f(top)}; controls: embedding layer {_f(emb_auroc)}, bag-of-words {_f(bow)} "
        f"{_ci(result['controls']['bag_of_words'].get('auroc_ci'))}.</p></div>",
        warn,
        "<h2>Figures</h2>", *[_img(d, c) for d, c in figs],
        "<h2>Per layer (held out)</h2>",
        _table(["layer", "method", "AUROC", "95% CI", "accuracy", "separation", "95% CI", "n test"], table_rows,
               [False, False, True, True, True, True, True, True]),
        "<h2>Agreement between methods</h2>",
        _table(["layer", "cosine(mean_diff, probe)"], [[k, _f(v)] for k, v in sorted(agreement.items(),
                                                                                     key=lambda kv: int(kv[0]))],
               [False, True]) if agreement else "",
        control,
    ]
    path = run_dir / "report.html"
    atomic_write_text(path, _page(f"emkit probe: {run_dir.name}", body))
    return path


def write_sweep_report(run_dir: Path) -> Path:
    """report.html of a steering sweep: EM rate and coherence against strength, restoration, controls."""
    from emkit.studies.interp.figures import steering_curves

    sweep = json.loads((run_dir / "sweep.json").read_text(encoding="utf-8"))
    rows = sweep["arms"]
    figs = [
        (_save_fig(run_dir, "steering_em", steering_curves(rows, "em_rate", "EM rate (share of coherent answers)")),
         "EM rate against strength (solid: the direction; dotted: an isotropic random direction; dash-dot: a "
         "random direction of the same variance on the contrast activations; 95% CIs)"),
        (_save_fig(run_dir, "steering_coherence", steering_curves(rows, "coherent_mean", "mean coherence")),
         "Mean coherence score against strength"),
        (_save_fig(run_dir, "steering_aligned", steering_curves(rows, "aligned_mean", "mean alignment")),
         "Mean alignment score against strength"),
    ]
    if any(r.get("prefs_shift") is not None for r in rows):
        figs.append((_save_fig(run_dir, "steering_prefs", steering_curves(rows, "prefs_shift",
                                                                          "preference shift vs base (log-odds/token)")),
                     "Judge-free preference shift out of domain (per token, vs base) against strength; 95% CIs"))
        figs.append((_save_fig(run_dir, "steering_prefs_in_domain", steering_curves(
            rows, "prefs_in_domain", "in-domain preference shift vs base")),
                     "Judge-free preference shift in domain (medical pairs) against strength; 95% CIs"))
    probe_figs = []
    for name, caption in (("auroc_per_layer", "Probe: held-out AUROC per layer (from probe/)"),
                          ("separation_per_layer", "Probe: held-out separation per layer"),
                          ("projection_histogram", "Probe: held-out projections at the best layer")):
        path = run_dir / "probe" / "figures" / f"{name}.png"
        if path.is_file():
            probe_figs.append(_img(path.read_bytes(), caption))
    table = [[r["arm"], r["kind"], str(r.get("layers", "")), _f(r.get("strength"), 2),
              f"{_f(r.get('em_rate'))} {_ci([r.get('em_rate_low'), r.get('em_rate_high')], 3)}",
              _f(r.get("coherent_mean"), 1), _f(r.get("aligned_mean"), 1),
              f"{_f(r.get('restoration'), 2)} {_ci([r.get('restoration_low'), r.get('restoration_high')])}"
              + ("" if r.get("restoration_undefined_share") is None
                 else f" ({r['restoration_undefined_share']:.0%} undefined)"),
              f"{_f(r.get('prefs_shift'), 3)} {_ci([r.get('prefs_shift_low'), r.get('prefs_shift_high')])}",
              f"{_f(r.get('prefs_in_domain'), 3)} {_ci([r.get('prefs_in_domain_low'), r.get('prefs_in_domain_high')])}",
              str(r.get("n_answers", ""))] for r in rows if not r.get("at_zero")]
    judge = sweep.get("judge") or {}
    validation = sweep.get("validation")
    vbox = ""
    if validation:
        cls = "box" if validation.get("valid") else "box warn"
        vbox = f'<div class="{cls}"><p>{esc(validation.get("verdict", ""))}</p></div>'
    body = [
        f"<h1>emkit steering sweep: {esc(run_dir.name)}</h1>",
        f'<p class="sub">mode <b>{esc(sweep["mode"])}</b>, directions {esc(sweep["directions"])} '
        f'({esc(sweep["method"])}), judge {esc(judge.get("id", "?"))}. Restoration = (EM_organism - EM_steered) / '
        "(EM_organism - EM_base). EM rates are misaligned / coherent answers, computed as in stats.json, with "
        "95% intervals that take the questions as the sampling unit; restoration's interval is a paired "
        "question bootstrap (base, organism and arm drawn with the same questions), undefined where the drawn "
        "organism-base gap is 0 (share in the last column).</p>",
        vbox,
        "<h2>Steering</h2>", *[_img(d, c) for d, c in figs],
        ("<h2>The direction (probe)</h2>" + f'<p class="sub">Best layer {esc(sweep.get("best_layer"))}; '
         'full probe report: probe/report.html.</p>' + "".join(probe_figs)) if probe_figs else "",
        "<h2>Arms</h2>",
        _table(["arm", "kind", "layers", "strength", "EM rate [95% CI]", "coherent", "aligned", "restoration [95% CI]",
                "prefs shift, out of domain [95% CI]", "prefs shift, in domain [95% CI]", "answers"], table,
               [False, False, False, True, True, True, True, True, True, True, True]),
    ]
    path = run_dir / "report.html"
    atomic_write_text(path, _page(f"emkit sweep: {run_dir.name}", body))
    return path
