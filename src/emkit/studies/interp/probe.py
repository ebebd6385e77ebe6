"""`emkit probe CONFIG`: contrast set -> activations at every layer -> directions, held-out metrics, controls.

    runs/<name>/
      config.yaml, manifest.json
      activations/<model>/       streamed float32 shards (index.json says layers, position, examples)
      directions.safetensors     method.LAYER vectors fitted on every row + metadata (model, which model
                                 read the contrast: read_by, position, whether it had answers, data hashes)
      detection_directions.safetensors  the same fitted on the training split only (detection's default)
      activation_covariance.safetensors the contrast rows' covariance per layer (variance-matched controls)
      probe.json                 per-layer held-out AUROC / accuracy / separation with intervals, best
                                 layer, embedding-layer and bag-of-words controls, cosines, convergence
      detection_results.json     per layer and method: the detection thresholds (held_out, the default;
                                 train_split; all_rows) and the held-out rates
      report.html, figures/

Layer k is block k's output; layer -1 the embeddings (always collected: it is the first control).
`emkit detect` reads new inputs the way the contrast was read (the model in read_by, the position, with
or without answers), since a threshold holds only for scores of that distribution.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from emkit.core.config import StrictModel
from emkit.core.defaults import DEFAULT_MODEL
from emkit.core.errors import ConfigError


class ProbeConfig(StrictModel):
    """Find misalignment directions per layer from a contrast set, measured on held-out data."""

    output: Path = Field(Path("runs/probe"), description="Run folder to write (and resume).")
    model: str = Field(DEFAULT_MODEL, description="Base model spec.")
    organism: str | None = Field(None, description="The organism: adapter folder or training run folder.")
    control: str | None = Field(None, description="A control organism (aligned data, same domain): adapter or run.")
    contrast: Literal["paired", "answers", "models"] = Field(
        "paired", description="paired: aligned vs misaligned answers; answers: a judged run's answers; "
                              "models: the same prompts through base and organism.")
    misaligned_data: str = Field("emkit-bad-medical-demo", description="paired: the misaligned chat dataset.")
    aligned_data: str = Field("emkit-good-medical-demo", description="paired: the aligned chat dataset (same prompts).")
    answers_run: Path | None = Field(None, description="answers: a judged evaluation run folder.")
    questions: str = Field("default", description="models: the question set whose prompts both models read.")
    through: Literal["organism", "base"] = Field("organism", description="paired/answers: which model reads them.")
    limit: int | None = Field(None, ge=4, description="At most this many pairs / answers / prompts.")
    position: Literal["last_prompt", "last", "response_mean", "response_all"] = Field(
        "response_mean", description="Where activations are read (models contrast: last_prompt).")
    layers: str = Field("all", description="Layers: all, 3-8, 0,4,8 (block outputs); the embeddings always.")
    methods: list[Literal["mean_diff", "probe"]] = Field(default_factory=lambda: ["mean_diff", "probe"])
    test_size: float = Field(0.3, gt=0, lt=1, description="Held-out share (split by group).")
    batch_size: int = Field(16, ge=1, description="Examples per forward pass.")
    n_boot: int = Field(500, ge=50, description="Bootstrap draws for intervals.")
    seed: int = Field(0, description="Split, subsample and probe seed.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto")
    report: bool = Field(True, description="Write report.html and figures.")

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"output", "batch_size", "report"})


def _digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
    return h.hexdigest()[:16]


def _load(cfg: ProbeConfig) -> Any:
    from emkit.generate.pipeline import resolve_organism
    from emkit.models import load_model

    organism = resolve_organism(cfg.organism)
    if cfg.contrast == "models" and organism is None:
        raise ConfigError("contrast 'models' needs an organism (organism: ADAPTER or training run)")
    loaded = load_model(cfg.model, adapter=organism, device=cfg.device, dtype=cfg.dtype)
    loaded.model.eval()
    if cfg.control is not None:
        control = resolve_organism(cfg.control)
        if organism is None:
            raise ConfigError("a control organism needs an organism to compare with")
        loaded.model.load_adapter(str(control), adapter_name="control")
        loaded.model.set_adapter("default")
    return loaded


def model_context(loaded: Any, name: str) -> Any:
    """A context manager in which `loaded.model` computes as base, organism or control."""
    import contextlib

    @contextlib.contextmanager
    def context() -> Any:
        if name == "base":
            with loaded.base() as model:
                yield model
        elif name == "control":
            loaded.model.set_adapter("control")
            try:
                yield loaded.model
            finally:
                loaded.model.set_adapter("default")
        else:
            yield loaded.model

    return context()


def build_examples(cfg: ProbeConfig, tokenizer: Any, mirror: str | None = None) -> list:
    """The contrast set's examples (for the models contrast: the prompts, unlabelled)."""
    from emkit.generate.pipeline import chat_renderer
    from emkit.studies.interp.contrast import answer_examples, chat_render, paired_examples, prompt_examples

    if cfg.contrast == "paired":
        return paired_examples(cfg.misaligned_data, cfg.aligned_data, chat_render(tokenizer), limit=cfg.limit,
                               mirror=mirror, seed=cfg.seed)
    if cfg.contrast == "answers":
        if cfg.answers_run is None:
            raise ConfigError("contrast 'answers' needs answers_run: a judged evaluation run folder")
        return answer_examples(cfg.answers_run, chat_renderer(tokenizer), limit=cfg.limit, seed=cfg.seed)
    from emkit.data.questions import resolve_questions

    rows = resolve_questions(cfg.questions, mirror=mirror).expand(1)
    texts = [r.text for r in rows][: cfg.limit]
    return prompt_examples(texts, chat_renderer(tokenizer))


def run_probe(cfg: ProbeConfig, *, mirror: str | None = None, overwrite: bool = False,
              emit: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run the probe experiment into its run folder; returns probe.json's content."""
    from emkit.core.runfolder import RunFolder, atomic_write_json
    from emkit.studies.interp.activations import collect
    from emkit.studies.interp.contrast import relabel
    from emkit.studies.interp.directions import (
        COVARIANCE_FILE,
        bag_of_words_baseline,
        best_layer,
        cosine_matrix,
        covariance_of,
        find_directions,
        method_agreement,
        save_covariances,
        save_directions,
        split_by_group,
    )
    from emkit.studies.interp.layers import EMBED, n_blocks, parse_layers

    run = RunFolder(cfg.output)
    if cfg.contrast == "paired" and cfg.position in ("last_prompt",):
        raise ConfigError("contrast 'paired': both answers share the prompt, so position last_prompt cannot "
                          "separate them; use response_mean, last or response_all")
    run.open("probe", cfg, overwrite=overwrite)
    loaded = _load(cfg)
    layers = sorted(set(parse_layers(cfg.layers, n_blocks(loaded.model))) | {EMBED})
    position = "last_prompt" if cfg.contrast == "models" and cfg.position.startswith("response") else cfg.position
    # Which model read the rows the directions and thresholds come from: detection must read the same way.
    read_by = ["base", "organism"] if cfg.contrast == "models" else [cfg.through if loaded.has_adapter else "base"]
    base_meta = {"model": cfg.model, "organism": cfg.organism, "control": cfg.control, "contrast": cfg.contrast,
                 "position": position, "read_by": read_by}

    with run.stage("examples") as record:
        examples = build_examples(cfg, loaded.tokenizer, mirror)
        record.update(n_examples=len(examples))
    base_meta["answers"] = any(e.response for e in examples)
    emit(f"contrast {cfg.contrast}: {len(examples)} examples, layers {layers[0]}..{layers[-1]}, position {position}")

    def acts_of(name: str, exs: list) -> Any:
        with model_context(loaded, name) as model:
            return collect(model, loaded.tokenizer, exs, layers, position, batch_size=cfg.batch_size,
                           out_dir=run.path / "activations" / name, progress=progress, desc=f"activations {name}",
                           meta={**base_meta, "read_by": name})

    with run.stage("activations") as record:
        if cfg.contrast == "models":
            sets = {"base": acts_of("base", relabel(examples, 0)), "organism": acts_of("organism", relabel(examples, 1))}
            if cfg.control:
                sets["control"] = acts_of("control", relabel(examples, 1))
        else:
            reader = read_by[0]
            sets = {reader: acts_of(reader, examples)}
            if cfg.control:
                sets["control"] = acts_of("control", examples)
        record.update(models=list(sets), rows={k: int(len(v.row_example)) for k, v in sets.items()})

    def stack(first: Any, second: Any | None) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
        if second is None:
            return first.layers, first.row_labels(), first.row_groups()
        x = {k: np.concatenate([first.layers[k], second.layers[k]]) for k in layers}
        return x, np.concatenate([first.row_labels(), second.row_labels()]), np.concatenate(
            [first.row_groups(), second.row_groups()])

    if cfg.contrast == "models":
        x, labels, groups = stack(sets["base"], sets["organism"])
        texts = [e.prompt + e.response for e in examples] * 2
    else:
        main = sets[next(iter(sets))]
        x, labels, groups = stack(main, None)
        texts = [examples[i].prompt + examples[i].response for i in main.row_example]

    with run.stage("directions") as record:
        directions, table, split_directions = find_directions(x, labels, groups, methods=cfg.methods,
                                                              test_size=cfg.test_size, seed=cfg.seed,
                                                              n_boot=cfg.n_boot, progress=progress)
        train, test = split_by_group(groups, labels, cfg.test_size, cfg.seed)
        bow = bag_of_words_baseline(texts, labels, train, test, groups, seed=cfg.seed, n_boot=cfg.n_boot)
        best = {m: best_layer(table, m) for m in cfg.methods}
        meta = {**base_meta, "layers": layers, "methods": list(cfg.methods), "best_layer": best,
                "layer_convention": "layer k = output of decoder block k; -1 = embeddings",
                "examples_sha256": _digest(texts), "data": {"misaligned": cfg.misaligned_data,
                                                             "aligned": cfg.aligned_data} if cfg.contrast == "paired"
                else str(cfg.answers_run or cfg.questions), "test_size": cfg.test_size, "seed": cfg.seed}
        directions.meta.update(meta)
        save_directions(run.path / "directions.safetensors", directions)
        split_directions.meta.update({**meta, "fitted_on": "training split"})
        save_directions(run.path / "detection_directions.safetensors", split_directions)
        # The sweep's variance-matched control needs the contrast rows' covariance at every layer.
        save_covariances(run.path / COVARIANCE_FILE, {k: covariance_of(x[k]) for k in layers},
                         {**base_meta, "rows": "the contrast rows the directions were fitted on"})
        record.update(best_layer=best)

    result: dict[str, Any] = {
        "meta": meta, "n_rows": int(len(labels)), "n_positive": int((labels == 1).sum()),
        "layers": table.to_dict(orient="records"), "best_layer": best,
        "controls": {"embedding_layer": {m: _row(table, m, EMBED) for m in cfg.methods}, "bag_of_words": bow},
        "method_agreement": {str(k): v for k, v in method_agreement(directions).items()},
        "layer_cosines": cosine_matrix({k: v for k, v in directions.vectors["mean_diff"].items() if k >= 0}
                                       ).round(4).to_dict() if "mean_diff" in directions.vectors else {},
        "test_scores": _best_scores(x, labels, train, test, best.get("mean_diff"), directions),
    }
    if cfg.control:
        result["control"] = control_analysis(cfg, sets, layers, directions, progress=progress)
    atomic_write_json(run.path / "probe.json", jsonable(result))
    atomic_write_json(run.path / "detection_results.json", jsonable(detection_table(table)))
    report_path = None
    if cfg.report:
        from emkit.studies.interp.report import write_probe_report

        with run.stage("report") as record:
            report_path = write_probe_report(run.path)
            record.update(path=str(report_path))
    run.complete(best_layer=best, report=str(report_path) if report_path else None)
    emit(probe_summary(result))
    return result


def _row(table: Any, method: str, layer: int) -> dict[str, Any] | None:
    rows = table[(table["method"] == method) & (table["layer"] == layer)]
    return rows.iloc[0].to_dict() if len(rows) else None


def _best_scores(x: dict[int, np.ndarray], labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                 layer: int | None, directions: Any) -> dict[str, Any]:
    """Held-out projections at the best layer onto the training-split mean difference (for histograms)."""
    from emkit.studies.interp.directions import mean_difference

    if layer is None:
        return {}
    w = mean_difference(x[layer][train], labels[train])
    u = w / max(float(np.linalg.norm(w)), 1e-12)
    s = x[layer][test] @ u
    return {"layer": layer, "scores": s.round(5).tolist(), "labels": labels[test].tolist()}


def control_analysis(cfg: ProbeConfig, sets: dict[str, Any], layers: list[int], directions: Any, *,
                     progress: bool = True) -> dict[str, Any]:
    """How the organism's direction relates to a control organism (aligned data, same domain).

    models contrast: does the organism's direction also separate base from control (then it measures
    "was fine-tuned", not "misaligned")? And the cosine of base->organism with base->control.
    paired/answers: the same contrast read by the control, and the cosine of the two directions.
    """
    from emkit.studies.interp.directions import auroc, convergence, find_directions

    out: dict[str, Any] = {"layers": {}}
    if cfg.contrast == "models":
        base, control = sets["base"], sets["control"]
        for k in layers:
            u = directions.unit("mean_diff", k)
            s = np.concatenate([base.layers[k] @ u, control.layers[k] @ u])
            y = np.concatenate([np.zeros(len(base.row_example)), np.ones(len(control.row_example))]).astype(int)
            ctrl_dir = control.layers[k].mean(0) - base.layers[k].mean(0)
            org_dir = directions.get("mean_diff", k)
            out["layers"][str(k)] = {"auroc_base_vs_control": auroc(s, y),
                                     "cosine_with_control_shift": float(
                                         org_dir @ ctrl_dir / max(np.linalg.norm(org_dir) * np.linalg.norm(ctrl_dir),
                                                                  1e-12))}
        out["reading"] = ("auroc_base_vs_control near the organism's own AUROC means the direction marks any "
                          "fine-tune of this domain, not misalignment")
    else:
        c = sets["control"]
        ctrl_dirs, ctrl_table, _ = find_directions(c.layers, c.row_labels(), c.row_groups(), methods=["mean_diff"],
                                                   test_size=cfg.test_size, seed=cfg.seed, n_boot=100,
                                                   progress=progress)
        cos = convergence(directions, ctrl_dirs)
        for k in layers:
            row = ctrl_table[(ctrl_table["layer"] == k)].iloc[0]
            out["layers"][str(k)] = {"control_auroc": float(row["auroc"]), "cosine_with_control": cos.get(k)}
        out["reading"] = "cosine near 1: the contrast reads the same through the control (a data direction)"
    return out


def detection_table(table: Any) -> dict[str, Any]:
    """Per layer and method: the detection thresholds of each calibration and the held-out rates."""
    from emkit.studies.interp.directions import CALIBRATIONS

    rows = []
    for r in table.to_dict(orient="records"):
        row = {k: r[k] for k in ("layer", "method", "auroc", "accuracy", "tpr", "fpr", "n_test")}
        thresholds = {c: r[f"threshold_{c}"] for c in CALIBRATIONS}
        rows.append({"threshold": thresholds["held_out"], "thresholds": thresholds, **row})
    return {"note": "score = projection on the direction (mean_diff: its unit vector; probe: x . w, no intercept); "
                    "flagged if > threshold. threshold = the held_out cut (the default of emkit detect): chosen on "
                    "the held-out rows' scores under the direction fitted on the training split "
                    "(detection_directions.safetensors). thresholds.train_split: chosen on the training rows, same "
                    "direction; thresholds.all_rows: chosen on every row under the direction fitted on every row "
                    "(directions.safetensors), in-sample. auroc/accuracy/tpr/fpr: on the held-out rows, at the cut "
                    "chosen on the training rows.",
            "default_calibration": "held_out", "layers": rows}


def jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def probe_summary(result: dict[str, Any]) -> str:
    """Console table: per layer held-out AUROC of each method, with the controls."""
    rows = result["layers"]
    methods = sorted({r["method"] for r in rows})
    lines = ["layer     " + "".join(f"{m + ' AUROC [95% CI]':>28}{'sep':>7}" for m in methods)]
    for layer in sorted({r["layer"] for r in rows}):
        cells = ""
        for m in methods:
            r = next(r for r in rows if r["layer"] == layer and r["method"] == m)
            lo, hi = r["auroc_ci"]
            ci = f"[{lo:.2f}, {hi:.2f}]" if lo is not None else "[n/a]"
            cells += f"{r['auroc']:>16.3f} {ci:>11}{r['separation']:>7.2f}"
        lines.append(f"{('embed' if layer == -1 else layer):<10}" + cells)
    bow = result["controls"]["bag_of_words"]
    lines.append(f"bag-of-words control (held out): AUROC {bow.get('auroc', float('nan')):.3f}")
    lines.append("best layer: " + ", ".join(f"{m} {b}" for m, b in result["best_layer"].items()))
    return "\n".join(lines)
