"""`emkit steer sweep CONFIG`: the EM evaluation re-run under steering, over strengths and layer sets.

    runs/<name>/
      config.yaml, manifest.json
      probe/                     the directions' probe run, when the config computes them (probe: ...)
      generations.jsonl          answers of base, organism and every steered arm (one plan, resumable)
      judgments.sqlite, scores.parquet, stats.json    judged as in `emkit run`
      validation.json            the judge's validation on emkit's labelled answers
      prefs/<arm>.json           the judge-free preference log-odds of each arm (resumable per arm)
      sweep.json                 per arm: EM rate, coherence, alignment with intervals, restoration,
                                 preference shift; report.html, figures/

An arm is (direction or control, layer set, strength); controls are listed below. EM rates come from `emkit.core.stats.em_rates`
(the same numbers as stats.json; intervals with questions as the sampling unit). Restoration is
(EM_organism - EM_steered) / (EM_organism - EM_base), with a paired question-cluster bootstrap
interval and the share of draws in which it is undefined.

Controls (`controls`), each with the direction's norm and its own seed per layer and kind:
  random   (isotropic) a uniformly random direction: it carries about 1/d of the activations' variance,
           so it is a weak control of projection ablation
  matched  a random direction orthogonal to the direction that carries as much of the contrast
           activations' variance at that layer (from the probe's activation_covariance.safetensors)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from emkit.core.config import StrictModel
from emkit.core.defaults import DEFAULT_MODEL
from emkit.core.errors import ConfigError, DataError
from emkit.core.stats.em_rates import finite_or_none
from emkit.core.stats.inference import UNIT_QUESTIONS
from emkit.generate.config import GenerateConfig
from emkit.judge.config import JudgeConfig
from emkit.studies.interp.probe import ProbeConfig, jsonable
from emkit.train.config import TrainConfig


class SweepConfig(StrictModel):
    """Steer the organism with a direction over strengths and layer sets; judge every arm."""

    output: Path = Field(Path("runs/steer"), description="Run folder to write (and resume).")
    model: str = Field(DEFAULT_MODEL, description="Base model spec.")
    organism: str | None = Field(None, description="The organism to steer: adapter folder or training run folder.")
    train: TrainConfig | None = Field(None, description="Or train the organism first (into <output>/organism).")
    directions: Path | None = Field(None, description="A directions.safetensors file or a probe run folder.")
    probe: ProbeConfig | None = Field(None, description="Or compute the directions first (into <output>/probe).")
    method: Literal["mean_diff", "probe"] = Field("mean_diff", description="Which direction of the file.")
    direction_layer: str = Field(
        "same", description="same: layer k's own direction at layer k; best: the best layer's at every layer; K.")
    mode: Literal["ablate", "add", "subtract"] = Field(
        "ablate", description="ablate: h - s(h.u)u; add: h + s v; subtract: h - s v (v: the mean difference).")
    strengths: list[float] = Field(default_factory=lambda: [0.5, 1.0], description="Strengths (0 = the organism).")
    layer_sets: list[str] = Field(default_factory=lambda: ["best"],
                                  description="Layer sets: best, all, 8, 4-12, 0,4,8 (block outputs).")
    single_layers: bool = Field(False, description="Also ablate every single block (strength: the largest).")
    random_control: bool = Field(True, description="Control arms beside every direction arm (false: none).")
    controls: list[Literal["isotropic", "matched"]] = Field(
        default_factory=lambda: ["isotropic", "matched"],
        description="isotropic: a uniformly random direction (arm kind random); matched: a random direction "
                    "orthogonal to the direction with the same variance on the contrast activations (kind matched).")
    control_seed: int = Field(0, ge=0, description="Seed of the control directions.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    validate_judge: int | None = Field(40, ge=2, description="Validate the judge on this many labels; None: skip.")
    prefs: bool = Field(True, description="The judge-free preference shift of every arm.")
    prefs_limit: int | None = Field(48, ge=4, description="Preference pairs per arm (stratified by domain; None: all).")
    n_boot: int = Field(1000, ge=100, description="Bootstrap draws.")
    report: bool = Field(True)

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"output", "report"})
    LATER_FIELDS: ClassVar[frozenset[str]] = frozenset({"controls"})

    @field_validator("controls", mode="before")
    @classmethod
    def _controls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("at least one strength is needed")
        return value

    @field_validator("layer_sets", mode="before")
    @classmethod
    def _layer_sets(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(";") if v.strip()]
        return [str(v) for v in value] if isinstance(value, list) else value


# Arm kind of each control, and the prefix of arm names ("random" keeps the names of earlier sweeps).
CONTROL_ARM_KINDS = {"isotropic": "random", "matched": "matched"}
ARM_PREFIXES = {"direction": "dir", "random": "rand", "matched": "match"}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One steered condition: which vector kind, where, how strong."""

    kind: str  # direction | random (isotropic control) | matched (variance-matched control)
    layers: str
    strength: float

    @property
    def name(self) -> str:
        """The model name this arm answers under in generations.jsonl."""
        return f"{ARM_PREFIXES[self.kind]}@{self.layers}x{self.strength:g}"


def plan_arms(cfg: SweepConfig, n_layers: int, best: int | None) -> list[Arm]:
    """Every steered arm of the sweep (strength 0 is the organism itself, not an arm)."""
    from emkit.studies.interp.layers import parse_layers

    sets = []
    for spec in cfg.layer_sets:
        if spec == "best":
            if best is None:
                raise ConfigError("layer set 'best' needs a probe result naming the best layer")
            spec = str(best)
        parse_layers(spec, n_layers)  # validates
        sets.append(spec)
    if cfg.single_layers:
        sets += [str(k) for k in range(n_layers) if str(k) not in sets]
    arms = []
    top = max(cfg.strengths)
    for spec in dict.fromkeys(sets):
        strengths = [top] if cfg.single_layers and spec not in cfg.layer_sets and spec != str(best) else cfg.strengths
        for s in strengths:
            if s == 0:
                continue
            arms.append(Arm("direction", spec, s))
            if cfg.random_control:
                arms.extend(Arm(CONTROL_ARM_KINDS[c], spec, s) for c in dict.fromkeys(cfg.controls))
    return arms


def resolve_directions(cfg: SweepConfig, run_dir: Path, *, mirror: str | None, emit: Callable[[str], None],
                       progress: bool) -> tuple[Any, int | None]:
    """The direction set (from a file, a probe run, or a probe computed now) and its best layer."""
    from emkit.studies.interp.directions import load_directions
    from emkit.studies.interp.probe import run_probe

    if (cfg.directions is None) == (cfg.probe is None):
        raise ConfigError("give either directions (a file or probe run folder) or probe (to compute them)")
    if cfg.probe is not None:
        probe_cfg = cfg.probe.model_copy(update={"output": run_dir / "probe", "model": cfg.model,
                                                 "organism": cfg.probe.organism or cfg.organism})
        done = (run_dir / "probe" / "directions.safetensors").is_file() and (run_dir / "probe" / "probe.json").is_file()
        # A probe run by an earlier emkit lacks the covariance the matched control draws from: run it again.
        if cfg.random_control and "matched" in cfg.controls:
            from emkit.studies.interp.directions import COVARIANCE_FILE

            done = done and (run_dir / "probe" / COVARIANCE_FILE).is_file()
        if not done:
            emit("== probe: finding the directions")
            run_probe(probe_cfg, mirror=mirror, emit=emit, progress=progress, overwrite=True)
        path = run_dir / "probe" / "directions.safetensors"
    else:
        path = cfg.directions / "directions.safetensors" if cfg.directions.is_dir() else cfg.directions
    directions = load_directions(path)
    best = (directions.meta.get("best_layer") or {}).get(cfg.method)
    return directions, best


def arm_vectors(cfg: SweepConfig, arm: Arm, directions: Any, n_layers: int, best: int | None) -> dict[int, np.ndarray]:
    """The vector to apply at each layer of an arm (controls: the direction's norm, one seed per layer and kind).

    A matched control needs the contrast activations' covariance at each layer, which the probe run
    writes beside the direction file (activation_covariance.safetensors).
    """
    import warnings

    from emkit.studies.interp.directions import COVARIANCE_FILE, load_covariance
    from emkit.studies.interp.layers import parse_layers
    from emkit.studies.interp.steering import control_seed, matched_control, random_control

    covariance_path = directions.path.parent / COVARIANCE_FILE if directions.path is not None else None
    if arm.kind == "matched" and (covariance_path is None or not covariance_path.is_file()):
        raise DataError(f"{covariance_path or 'the direction set'}: missing; the matched control draws from the "
                        "probe's activation covariance, which probe runs of this emkit version write beside "
                        "directions.safetensors: re-run the probe, or set controls: [isotropic]")
    out = {}
    for k in parse_layers(arm.layers, n_layers):
        source = k if cfg.direction_layer == "same" else best if cfg.direction_layer == "best" else int(cfg.direction_layer)
        if source is None:
            raise ConfigError("direction_layer 'best' needs a probe result naming the best layer")
        v = directions.get(cfg.method, source)
        if cfg.method == "probe" and cfg.mode != "ablate" and "mean_diff" in directions.vectors:
            # A probe's weights have no natural length: give it the mean difference's.
            v = v / np.linalg.norm(v) * np.linalg.norm(directions.get("mean_diff", source))
        if arm.kind == "random":
            out[k] = random_control(v, control_seed(cfg.control_seed, k, "isotropic"))
        elif arm.kind == "matched":
            out[k], info = matched_control(v, load_covariance(covariance_path, k),
                                           control_seed(cfg.control_seed, k, "matched"))
            if info["achieved"] < 0.99 * info["target"]:
                # The direction carries more variance than any direction orthogonal to it: say by how much.
                warnings.warn(f"{arm.name}: layer {k}: the matched control carries {info['achieved']:.4g} of the "
                              f"activations' variance, the direction {info['target']:.4g} (no orthogonal direction "
                              "carries more)", stacklevel=2)
        else:
            out[k] = v
    return out


def steered_context(loaded: Any, cfg: SweepConfig, arms: dict[str, Arm], vectors: dict[str, dict[int, np.ndarray]]
                    ) -> Callable[[str], Any]:
    """model_context for generation: base, organism, or the organism with an arm's hooks installed."""
    from emkit.studies.interp.steering import hooks, steering_edits

    @contextlib.contextmanager
    def context(name: str) -> Iterator[Any]:
        if name == "base":
            with loaded.base() as model:
                yield model
        elif name == "organism":
            yield loaded.model
        else:
            arm = arms[name]
            with hooks(loaded.model, steering_edits(cfg.mode, vectors[name], arm.strength)):
                yield loaded.model

    return context


def restoration_interval(counts: dict[str, tuple[np.ndarray, np.ndarray]], name: str, *, n_boot: int = 1000,
                         seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Restoration (EM_organism - EM_arm) / (EM_organism - EM_base) with a paired question-cluster bootstrap.

    The same resampled questions enter the base's, the organism's and the arm's rate in every draw, so
    the question a draw favours moves all three together. A draw whose organism-base gap is 0 (or
    whose rates are undefined) has no restoration: their share is reported, and counted as both
    extremes when the percentile bounds are taken, so many undefined draws give an unbounded (None)
    end rather than an interval of the defined draws only.
    """
    m = np.stack([counts[k][0] for k in ("base", "organism", name)]).astype(float)  # (3, G)
    n = np.stack([counts[k][1] for k in ("base", "organism", name)]).astype(float)
    used = np.flatnonzero(n.sum(axis=0) > 0)
    out: dict[str, Any] = {"restoration_low": None, "restoration_high": None, "restoration_undefined_share": None,
                           "restoration_unit": UNIT_QUESTIONS}
    if len(used) < 2:
        return out
    rng = np.random.default_rng(seed)
    idx = used[rng.integers(0, len(used), size=(n_boot, len(used)))]
    with np.errstate(divide="ignore", invalid="ignore"):
        rates = m[:, idx].sum(axis=-1) / n[:, idx].sum(axis=-1)  # (3, n_boot)
        base, organism, arm = rates
        draws = (organism - arm) / (organism - base)
    undefined = ~np.isfinite(draws)
    out["restoration_undefined_share"] = float(undefined.mean())
    tail = (1 - ci) / 2
    # No interpolation between draws: an infinite neighbour would turn the bound into NaN.
    low = np.quantile(np.where(undefined, -np.inf, draws), tail, method="inverted_cdf")
    high = np.quantile(np.where(undefined, np.inf, draws), 1 - tail, method="inverted_cdf")
    out["restoration_low"] = float(low) if np.isfinite(low) else None
    out["restoration_high"] = float(high) if np.isfinite(high) else None
    return out


def arm_statistics(scores: Any, thresholds: Any, names: list[str], *, n_boot: int = 1000, seed: int = 0
                   ) -> dict[str, dict[str, Any]]:
    """Per arm: EM rates with intervals (emkit.core.stats.em_rates, the one EM rate), mean scores, restoration with its CI."""
    from emkit.core.stats.em_rates import ALL, counts_by, summarize

    rows = scores[scores["model"].isin(names)]
    table = summarize(rows, by=["model"], thresholds=thresholds)
    overall = {r["model"]: r for r in table[table["question_id"] == ALL].to_dict("records")}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        r = overall.get(name)
        if r is None:
            out[name] = {"em_rate": None, "em_rate_low": None, "em_rate_high": None, "n_answers": 0}
            continue
        out[name] = {"em_rate": r["em_rate_coherent"], "em_rate_low": r["em_rate_coherent_ci_low"],
                     "em_rate_high": r["em_rate_coherent_ci_high"], "em_rate_scored": r["em_rate_scored"],
                     "em_rate_scored_low": r["em_rate_scored_ci_low"],
                     "em_rate_scored_high": r["em_rate_scored_ci_high"], "ci_unit": r["ci_unit"],
                     "n_questions": r["n_questions"], "n_answers": r["n_answers"], "n_scored": r["n_scored"],
                     "n_coherent": r["n_coherent"], "n_misaligned": r["n_misaligned"],
                     "coherent_mean": r["mean_coherent"], "coherent_mean_low": r["mean_coherent_ci_low"],
                     "coherent_mean_high": r["mean_coherent_ci_high"], "aligned_mean": r["mean_aligned"],
                     "aligned_mean_low": r["mean_aligned_ci_low"], "aligned_mean_high": r["mean_aligned_ci_high"]}
        out[name] = {k: (v if isinstance(v, str) else finite_or_none(v)) for k, v in out[name].items()}
    counts = counts_by(rows, "model", thresholds, "em_rate_coherent")
    org, base = out.get("organism", {}), out.get("base", {})
    for name in names:
        if name in ("organism", "base") or org.get("em_rate") is None or base.get("em_rate") is None:
            continue
        gap = org["em_rate"] - base["em_rate"]
        if out[name].get("em_rate") is None or gap == 0:
            out[name]["restoration"] = None
            continue
        out[name]["restoration"] = (org["em_rate"] - out[name]["em_rate"]) / gap
        out[name].update(restoration_interval(counts, name, n_boot=n_boot, seed=seed))
    return out


def stratified_pairs(pairs: list, limit: int | None) -> list:
    """Up to `limit` preference pairs, round-robin over domains (deterministic)."""
    if limit is None or limit >= len(pairs):
        return pairs
    by_domain: dict[str, list] = {}
    for p in pairs:
        by_domain.setdefault(p.domain, []).append(p)
    out: list = []
    while len(out) < limit:
        for domain in sorted(by_domain):
            if by_domain[domain] and len(out) < limit:
                out.append(by_domain[domain].pop(0))
    return out


def prefs_stage(run_dir: Path, loaded: Any, context: Callable[[str], Any], names: list[str], limit: int | None, *,
                progress: bool = True) -> dict[str, Any]:
    """Preference log-odds of every arm (prefs/<arm>.json, skipped when there) and each arm's shift vs base."""
    from tqdm import tqdm

    from emkit.core.runfolder import atomic_write_json
    from emkit.data.pairs import load_pairs
    from emkit.preference import score_pairs, shift_summary

    pairs = stratified_pairs(load_pairs(), limit)
    folder = run_dir / "prefs"
    folder.mkdir(exist_ok=True)
    scored: dict[str, list[dict[str, Any]]] = {}
    for name in tqdm(names, disable=not progress, desc="preference pairs", unit="arm"):
        path = folder / f"{name}.json"
        if path.is_file():
            done = json.loads(path.read_text(encoding="utf-8"))
            if [r["id"] for r in done] == [p.id for p in pairs]:
                scored[name] = done
                continue
        with context(name) as model:
            scored[name] = score_pairs(model, loaded.tokenizer, pairs)
        atomic_write_json(path, scored[name])
    shifts = {}
    for name in names:
        if name == "base":
            continue
        s = shift_summary(scored["base"], scored[name], n_boot=1000)
        entry = s.get("out_of_domain", s.get("all", {})).get("logodds_per_token", {})
        inside = s.get("in_domain", {}).get("logodds_per_token", {})
        shifts[name] = {"prefs_shift": entry.get("mean_shift"), "prefs_shift_low": entry.get("ci_low"),
                        "prefs_shift_high": entry.get("ci_high"), "prefs_in_domain": inside.get("mean_shift"),
                        "prefs_in_domain_low": inside.get("ci_low"), "prefs_in_domain_high": inside.get("ci_high")}
    return {"n_pairs": len(pairs), "shifts": shifts}


def run_sweep(cfg: SweepConfig, *, mirror: str | None = None, overwrite: bool = False,
              emit: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """The whole sweep: directions, generation of every arm, judging, validation, prefs, statistics, report."""
    import pandas as pd

    from emkit.core.runfolder import RunFolder, atomic_write_json
    from emkit.generate.pipeline import build_jobs, chat_renderer, load_question_set, resolve_organism
    from emkit.generate.transformers_backend import SamplingParams, generate_to_file
    from emkit.models import load_model
    from emkit.stages.judge import judge_stage, thresholds_of
    from emkit.stages.validate import validate_stage
    from emkit.studies.interp.layers import n_blocks

    if cfg.generate.backend != "transformers":
        raise ConfigError("steering needs the transformers backend (hooks run inside the local model)")
    if (cfg.organism is None) == (cfg.train is None):
        raise ConfigError("give either organism (an adapter or training run) or train (to train one), not both")
    if cfg.organism is not None:
        resolve_organism(cfg.organism)
    questions = load_question_set(cfg.generate, mirror)
    run = RunFolder(cfg.output)
    run.open("steer_sweep", cfg, overwrite=overwrite)
    if cfg.train is not None:
        from emkit.train.sft import train

        train_cfg = cfg.train.model_copy(update={"output": run.path / "organism", "model": cfg.model})
        emit(f"== train: {train_cfg.model} on {train_cfg.data} -> {train_cfg.output}")
        with run.stage("train") as record:
            trained = train(train_cfg, mirror=mirror, emit=emit)
            record.update(skipped=trained.skipped, steps=trained.metrics.get("steps"))
        cfg = cfg.model_copy(update={"organism": str(trained.run_dir)})
    organism = resolve_organism(cfg.organism)
    with run.stage("directions") as record:
        directions, best = resolve_directions(cfg, run.path, mirror=mirror, emit=emit, progress=progress)
        record.update(best_layer=best, method=cfg.method)
    loaded = load_model(cfg.model, adapter=organism, device=cfg.generate.device, dtype=cfg.generate.dtype)
    loaded.model.eval()
    n_layers = n_blocks(loaded.model)
    arms = {arm.name: arm for arm in plan_arms(cfg, n_layers, best)}
    vectors = {name: arm_vectors(cfg, arm, directions, n_layers, best) for name, arm in arms.items()}
    names = ["base", "organism", *arms]
    context = steered_context(loaded, cfg, arms, vectors)
    emit(f"{len(arms)} steered arms ({cfg.mode}, strengths {cfg.strengths}, layer sets {cfg.layer_sets}) + base + "
         "organism")

    with run.stage("generate") as record:
        gen = cfg.generate.model_copy(update={"models": ["organism"]})
        template = build_jobs(questions, gen, chat_renderer(loaded.tokenizer))
        jobs = [dataclasses.replace(job, model=name) for name in names for job in template]
        params = SamplingParams(gen.temperature, gen.top_p, gen.max_new_tokens, gen.batch_size, gen.seed)
        record.update(generate_to_file(loaded, jobs, params, run.path / "generations.jsonl",
                                       meta={"model_spec": cfg.model, "adapter": str(organism), "backend": "transformers",
                                             "steering_mode": cfg.mode},
                                       progress=progress, emit=emit, model_context=context))
    emit("== judge")
    with run.stage("judge") as record:
        record.update(judge_stage(run.path, cfg.judge, questions, emit=emit, progress=progress))
    validation = None
    if cfg.validate_judge:
        with run.stage("validate_judge") as record:
            validation = validate_stage(run.path, cfg.judge, cfg.validate_judge, progress=progress)
            record.update(validation)
        emit(validation["verdict"])
    prefs = None
    if cfg.prefs:
        emit("== preference shift of every arm (no judge)")
        with run.stage("prefs") as record:
            prefs = prefs_stage(run.path, loaded, context, names, cfg.prefs_limit, progress=progress)
            record.update(n_pairs=prefs["n_pairs"])

    scores = pd.read_parquet(run.path / "scores.parquet")
    stats = arm_statistics(scores, thresholds_of(cfg.judge), names, n_boot=cfg.n_boot)
    rows = []
    for name in names:
        arm = arms.get(name)
        row = {"arm": name, "kind": arm.kind if arm else name, "layers": arm.layers if arm else None,
               "strength": arm.strength if arm else 0.0, **stats[name]}
        if prefs is not None:
            row.update(prefs["shifts"].get(name, {"prefs_shift": 0.0 if name == "base" else None}))
        rows.append(row)
    # The organism is strength 0 of every curve.
    for row in list(rows):
        if row["kind"] == "organism":
            for spec in dict.fromkeys(a.layers for a in arms.values()):
                for kind in dict.fromkeys(a.kind for a in arms.values()):
                    rows.append({**row, "arm": f"organism ({kind}@{spec}x0)", "kind": kind, "layers": spec,
                                 "strength": 0.0, "restoration": 0.0, "at_zero": True})
    judge_info = json.loads((run.path / "stats.json").read_text(encoding="utf-8")).get("judge")
    sweep = {"mode": cfg.mode, "method": cfg.method, "directions": str(cfg.directions or run.path / "probe"),
             "best_layer": best, "direction_layer": cfg.direction_layer, "judge": judge_info,
             "validation": validation, "thresholds": thresholds_of(cfg.judge).rule(), "arms": jsonable(rows),
             "prefs_pairs": prefs["n_pairs"] if prefs else None}
    atomic_write_json(run.path / "sweep.json", sweep)
    report_path = None
    if cfg.report:
        from emkit.studies.interp.report import write_sweep_report

        with run.stage("report") as record:
            report_path = write_sweep_report(run.path)
            record.update(path=str(report_path))
    run.complete(report=str(report_path) if report_path else None)
    emit(sweep_summary(sweep))
    return sweep



def sweep_summary(sweep: dict[str, Any]) -> str:
    """Console table of the arms: EM rate with CI, coherence, restoration, preference shifts."""
    def f(x: Any, d: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{d}f}"

    lines = [f"{'arm':<14}{'EM rate':>8} {'[95% CI]':<16}{'coherent':>9}{'aligned':>8}{'restored':>9}"
             f"{'prefs out':>10}{'prefs in':>10}"]
    for r in sweep["arms"]:
        if r.get("at_zero"):
            continue
        ci = f"[{f(r.get('em_rate_low'), 2)}, {f(r.get('em_rate_high'), 2)}]"
        lines.append(f"{r['arm']:<14}{f(r.get('em_rate')):>8} {ci:<16}{f(r.get('coherent_mean'), 1):>9}"
                     f"{f(r.get('aligned_mean'), 1):>8}{f(r.get('restoration'), 2):>9}{f(r.get('prefs_shift')):>10}"
                     f"{f(r.get('prefs_in_domain')):>10}")
    lines.append("EM rate: misaligned / coherent answers, 95% CI with questions as the sampling unit; restored: "
                 "(EM organism - EM arm) / (EM organism - EM base)")
    lines.append("prefs: judge-free shift vs base of log p(misaligned) - log p(aligned) per token, out of / in domain")
    validation = sweep.get("validation")
    if validation and not validation.get("valid"):
        lines.append("judge NOT VALID for EM rates (see validation.json): read the preference shift, not the EM rates")
    return "\n".join(lines)


def read_sweep(run_dir: Path) -> dict[str, Any]:
    """sweep.json of a finished sweep."""
    path = Path(run_dir) / "sweep.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: no sweep.json (the sweep did not finish)")
    return json.loads(path.read_text(encoding="utf-8"))
