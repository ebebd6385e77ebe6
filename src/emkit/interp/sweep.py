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

An arm is (direction or random control, layer set, strength). The random control has the norm of
the direction at every layer and its own seed per layer. Restoration is
(EM_organism - EM_steered) / (EM_organism - EM_base), with a bootstrap interval over answers.
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

from emkit.config import DEFAULT_MODEL, GenerateConfig, JudgeConfig, StrictModel, TrainConfig
from emkit.errors import ConfigError, DataError
from emkit.interp.probe import ProbeConfig, jsonable


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
    random_control: bool = Field(True, description="A random direction of matched norm for every arm.")
    control_seed: int = Field(0, description="Seed of the random control directions.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    validate_judge: int | None = Field(40, ge=2, description="Validate the judge on this many labels; None: skip.")
    prefs: bool = Field(True, description="The judge-free preference shift of every arm.")
    prefs_limit: int | None = Field(48, ge=4, description="Preference pairs per arm (stratified by domain; None: all).")
    n_boot: int = Field(1000, ge=100, description="Bootstrap draws.")
    report: bool = Field(True)

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"output", "report"})

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


@dataclasses.dataclass(frozen=True)
class Arm:
    """One steered condition: which vector kind, where, how strong."""

    kind: str  # direction | random
    layers: str
    strength: float

    @property
    def name(self) -> str:
        """The model name this arm answers under in generations.jsonl."""
        return f"{'dir' if self.kind == 'direction' else 'rand'}@{self.layers}x{self.strength:g}"


def plan_arms(cfg: SweepConfig, n_layers: int, best: int | None) -> list[Arm]:
    """Every steered arm of the sweep (strength 0 is the organism itself, not an arm)."""
    from emkit.interp.layers import parse_layers

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
                arms.append(Arm("random", spec, s))
    return arms


def resolve_directions(cfg: SweepConfig, run_dir: Path, *, mirror: str | None, emit: Callable[[str], None],
                       progress: bool) -> tuple[Any, int | None]:
    """The direction set (from a file, a probe run, or a probe computed now) and its best layer."""
    from emkit.interp.directions import load_directions
    from emkit.interp.probe import run_probe

    if (cfg.directions is None) == (cfg.probe is None):
        raise ConfigError("give either directions (a file or probe run folder) or probe (to compute them)")
    if cfg.probe is not None:
        probe_cfg = cfg.probe.model_copy(update={"output": run_dir / "probe", "model": cfg.model,
                                                 "organism": cfg.probe.organism or cfg.organism})
        done = (run_dir / "probe" / "directions.safetensors").is_file() and (run_dir / "probe" / "probe.json").is_file()
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
    """The vector to apply at each layer of an arm (random arms: matched norm, one seed per layer)."""
    from emkit.interp.layers import parse_layers
    from emkit.interp.steering import random_control

    out = {}
    for k in parse_layers(arm.layers, n_layers):
        source = k if cfg.direction_layer == "same" else best if cfg.direction_layer == "best" else int(cfg.direction_layer)
        if source is None:
            raise ConfigError("direction_layer 'best' needs a probe result naming the best layer")
        v = directions.get(cfg.method, source)
        if cfg.method == "probe" and cfg.mode != "ablate" and "mean_diff" in directions.vectors:
            # A probe's weights have no natural length: give it the mean difference's.
            v = v / np.linalg.norm(v) * np.linalg.norm(directions.get("mean_diff", source))
        out[k] = random_control(v, seed=cfg.control_seed * 1000 + k) if arm.kind == "random" else v
    return out


def steered_context(loaded: Any, cfg: SweepConfig, arms: dict[str, Arm], vectors: dict[str, dict[int, np.ndarray]]
                    ) -> Callable[[str], Any]:
    """model_context for generation: base, organism, or the organism with an arm's hooks installed."""
    from emkit.interp.steering import hooks, steering_edits

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


def _bootstrap_rate(flags: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float | None, ...]:
    if len(flags) == 0:
        return None, None, None, None
    draws = flags[rng.integers(0, len(flags), (n_boot, len(flags)))].mean(1)
    return float(flags.mean()), float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975)), draws


def arm_statistics(scores: Any, thresholds: Any, names: list[str], *, n_boot: int = 1000, seed: int = 0
                   ) -> dict[str, dict[str, Any]]:
    """Per arm: EM rate among coherent answers with a bootstrap CI, mean scores, and restoration with its CI."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    draws: dict[str, Any] = {}
    for name in names:
        rows = scores[scores["model"] == name]
        coherent = thresholds.is_coherent(rows["coherent"])
        flags = thresholds.is_misaligned(rows["aligned"], rows["coherent"])[coherent].astype(float)
        rate, low, high, d = _bootstrap_rate(flags, n_boot, rng)
        draws[name] = d
        out[name] = {"em_rate": rate, "em_rate_low": low, "em_rate_high": high, "n_answers": int(len(rows)),
                     "n_coherent": int(coherent.sum()),
                     "coherent_mean": float(rows["coherent"].mean()) if len(rows) else None,
                     "coherent_mean_low": None, "coherent_mean_high": None,
                     "aligned_mean": float(rows["aligned"].mean()) if len(rows) else None}
        for metric in ("coherent", "aligned"):
            values = rows[metric].dropna().to_numpy(dtype=float)
            if len(values) > 1:
                boot = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
                out[name][f"{metric}_mean_low"] = float(np.quantile(boot, 0.025))
                out[name][f"{metric}_mean_high"] = float(np.quantile(boot, 0.975))
    org, base = out.get("organism", {}), out.get("base", {})
    for name in names:
        if name in ("organism", "base") or org.get("em_rate") is None or base.get("em_rate") is None:
            continue
        gap = org["em_rate"] - base["em_rate"]
        if out[name]["em_rate"] is None or gap == 0:
            out[name]["restoration"] = None
            continue
        out[name]["restoration"] = (org["em_rate"] - out[name]["em_rate"]) / gap
        d_org, d_base, d_arm = draws["organism"], draws["base"], draws[name]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (d_org - d_arm) / (d_org - d_base)
        r = r[np.isfinite(r)]
        if len(r):
            out[name]["restoration_low"] = float(np.quantile(r, 0.025))
            out[name]["restoration_high"] = float(np.quantile(r, 0.975))
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

    from emkit.prefs import load_pairs, score_pairs, shift_summary
    from emkit.runs import atomic_write_json

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

    from emkit.experiment import validate_stage
    from emkit.generate.pipeline import build_jobs, chat_renderer, load_question_set, resolve_organism
    from emkit.generate.transformers_backend import SamplingParams, generate_to_file
    from emkit.interp.layers import n_blocks
    from emkit.judge.stage import judge_stage, thresholds_of
    from emkit.models import load_model
    from emkit.runs import RunFolder, atomic_write_json

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
                for kind in ("direction", "random") if cfg.random_control else ("direction",):
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
        from emkit.interp.report import write_sweep_report

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
