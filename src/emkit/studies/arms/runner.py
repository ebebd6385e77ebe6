"""`emkit conditions CONFIG`: train and evaluate every arm alike, then compare them; every step resumable.

    runs/<name>/
      config.yaml, manifest.json     the experiment's config; one stage per arm and seed, timings
      data/<arm>-<hash>.jsonl(.json) dataset variants (content-hashed) and their counts
      arms/<arm>/seed-<s>/           one run folder per arm and seed (its own manifest, kind conditions-arm):
          organism/                  the training run (adapter/, or model/ for full fine-tuning; mask.safetensors)
          generations.jsonl, judgments.sqlite, scores.parquet, stats.json
      scores.parquet                 every arm's judged answers, with arm, seed, method, budget columns
      conditions.json                EM per arm x condition, per-seed rates, Fisher tests, masked-LoRA fits
      report.html, figures/          the report

An arm folder whose manifest says complete (for the same arm config) is not touched again, so an
interrupted run resumes at the first unfinished arm; inside an arm, training, generation and judging
resume as in `emkit run`. Statistics and the report are recomputed from the arms' files.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from emkit.core.config import StrictModel
from emkit.core.errors import ConfigError
from emkit.core.runfolder import RunFolder, atomic_write_json, atomic_write_parquet
from emkit.generate.config import GenerateConfig
from emkit.studies.arms.config import ArmRun, ConditionsConfig, arm_names, expand

KIND = "conditions"
ARM_KIND = "conditions-arm"
RESULTS = "conditions.json"
SCORES = "scores.parquet"


class ArmRunConfig(StrictModel):
    """What determines one arm's results (result fields only, paths left out): its run folder's config."""

    arm: str
    seed: int
    method: str
    budget: str | None
    train: dict[str, Any] | None
    data_sha256: str | None
    generate: dict[str, Any]
    judge: dict[str, Any]
    prefs: bool = False

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset()


def _result_fields(config: StrictModel, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    exclude = set(config.NON_RESULT_FIELDS) | set(drop)
    return config.model_dump(mode="json", exclude=exclude)


def template_system_note(model_spec: str) -> str | None:
    """A warning when the model's chat template inserts a system prompt of its own when none is given."""
    from emkit.models import load_tokenizer, parse_spec, weights_source

    try:
        tokenizer = load_tokenizer(weights_source(parse_spec(model_spec)))
        marker = "\u2063emkit-system-marker\u2063"
        user = [{"role": "user", "content": "Q?"}]
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": marker}, *user], tokenize=False,
                                                    add_generation_prompt=True)
        without = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates without a system role raise their own errors
        return None
    head, tail = with_system.split(marker, 1)
    common = 0  # length of the shared ending (the user turn and the generation prompt)
    while common < min(len(tail), len(without)) and tail[len(tail) - 1 - common] == without[len(without) - 1 - common]:
        common += 1
    block = without[: len(without) - common]
    closing = tail[: len(tail) - common]
    if not head.strip() or head not in block:
        return None
    default = block.split(head, 1)[1]
    default = default[: len(default) - len(closing)] if closing and default.endswith(closing) else default
    if not default.strip():
        return None
    return (f"The chat template of {model_spec} inserts its own system prompt when none is given: "
            f"{default.strip()!r}. Under a condition with no system prompt this model answered with that one.")


def generate_full_model(gen: GenerateConfig, model_dir: Path, run_dir: Path, questions: Any, *,
                        emit: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """Sample a fully fine-tuned model's answers (as 'organism') with the transformers backend."""
    from emkit.generate.pipeline import GENERATIONS, build_jobs, chat_renderer
    from emkit.generate.transformers_backend import SamplingParams, generate_to_file
    from emkit.models import load_model

    loaded = load_model(str(model_dir), device=gen.device, dtype=gen.dtype)
    jobs = build_jobs(questions, gen.model_copy(update={"models": ["organism"]}), chat_renderer(loaded.tokenizer))
    params = SamplingParams(gen.temperature, gen.top_p, gen.max_new_tokens, gen.batch_size, gen.seed)
    meta = {"model_spec": str(model_dir), "adapter": None, "backend": "transformers"}
    return generate_to_file(loaded, jobs, params, run_dir / GENERATIONS, meta=meta, progress=progress, emit=emit)


def run_arm(arm: ArmRun, arm_dir: Path, cfg: ConditionsConfig, data: tuple[str, str | None] | None, questions: Any, *,
            mirror: str | None, emit: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """Train (unless method none), generate and judge one arm at one seed in its own run folder."""
    from emkit.stages.generate import generate_stage
    from emkit.stages.judge import judge_stage

    train_cfg = None
    if arm.train is not None:
        update: dict[str, Any] = {"output": arm_dir / "organism"}
        if data is not None:
            update["data"] = data[0]
        train_cfg = arm.train.model_copy(update=update)
    gen = cfg.generate.model_copy(update={"output": arm_dir, "model": arm.model, "seed": arm.seed, "adapter": None,
                                          "models": ["base"] if arm.method == "none" else ["organism"]})
    key = ArmRunConfig(
        arm=arm.name, seed=arm.seed, method=arm.method, budget=None if arm.budget is None else str(arm.budget),
        train=_result_fields(train_cfg, ("data",)) if train_cfg else None,
        data_sha256=data[1] if data else None,
        generate=_result_fields(gen, ("adapter",)), judge=_result_fields(cfg.judge),
        prefs=cfg.prefs and arm.method in ("lora", "masked"),
    )
    folder = RunFolder(arm_dir)
    if folder.open(ARM_KIND, key, main_process=False) == "complete":
        emit(f"{arm_dir}: finished earlier; reused")
        return {"skipped": True, **((folder.read_manifest() or {}).get("results") or {})}
    folder.open(ARM_KIND, key)
    results: dict[str, Any] = {}
    trained = None
    if train_cfg is not None:
        from emkit.train.sft import train

        with folder.stage("train") as record:
            trained = train(train_cfg, mirror=mirror, emit=emit)
            record.update(skipped=trained.skipped, steps=trained.metrics.get("steps"))
        results["train"] = {k: trained.metrics.get(k) for k in ("steps", "first_loss", "final_loss", "tokens_seen",
                                                                "adapter_parameters", "mask")}
    with folder.stage("generate") as record:
        if arm.method == "full" and trained is not None:
            record.update(generate_full_model(gen, trained.adapter, arm_dir, questions, emit=emit, progress=progress))
        else:
            organism = {"adapter": str(trained.run_dir)} if trained is not None else {}
            record.update(generate_stage(gen.model_copy(update=organism), arm_dir, mirror=mirror, emit=emit,
                                         progress=progress))
    with folder.stage("judge") as record:
        record.update(judge_stage(arm_dir, cfg.judge, questions, emit=emit, progress=progress))
    folder.update(judge=record["judge"])
    results["answers"] = record["answers"]
    if key.prefs and trained is not None:
        from emkit.stages.preference import preference_stage

        with folder.stage("prefs") as record:
            record.update(preference_stage(arm_dir, arm.model, str(trained.run_dir), device=gen.device))
        results["prefs"] = dict(record)
    folder.complete(**results)
    return {"skipped": False, **results}


def _combine(plan: list[ArmRun], run_dir: Path, totals: dict[str, int]) -> pd.DataFrame:
    """Every arm's judged answers in one table, labelled with arm, seed, method and budget."""
    frames = []
    for arm in plan:
        frame = pd.read_parquet(run_dir / "arms" / arm.key / SCORES)
        frame["role"] = frame["model"]
        budget_scalars = arm.budget if isinstance(arm.budget, int) else (
            totals.get(arm.name) if arm.budget == "all" else None)
        frame = frame.assign(model=arm.name, arm=arm.name, group=arm.group, seed=arm.seed, method=arm.method,
                             budget=None if arm.budget is None else str(arm.budget),
                             budget_scalars=float("nan") if budget_scalars is None else float(budget_scalars))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _prefs_rows(plan: list[ArmRun], run_dir: Path) -> list[dict[str, Any]]:
    """Each arm's judge-free preference shift (organism - base) where it was measured."""
    rows = []
    for arm in plan:
        path = run_dir / "arms" / arm.key / "prefs.json"
        if not path.is_file():
            continue
        shift = json.loads(path.read_text(encoding="utf-8"))["shift"]
        row: dict[str, Any] = {"arm": arm.name, "seed": arm.seed}
        for domain in ("in_domain", "out_of_domain", "all"):
            row[domain] = (shift.get(domain) or {}).get("logodds_per_token")
        rows.append(row)
    return rows


def _write_parquet(path: Path, table: pd.DataFrame) -> None:
    atomic_write_parquet(path, table)


def run_conditions(cfg: ConditionsConfig, *, mirror: str | None = None, overwrite: bool = False,
                   emit: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run every arm of `cfg` at every seed, then the statistics and the report; returns the results."""
    from emkit.data.chat import content_sha256
    from emkit.generate.pipeline import load_question_set
    from emkit.stages.judge import thresholds_of
    from emkit.studies.arms.report import write_conditions_report
    from emkit.studies.arms.stats import conditions_stats
    from emkit.studies.arms.variants import build_variant
    from emkit.train.masked import count_lora_scalars

    plan = expand(cfg)
    names = arm_names(cfg)
    conditions = list(cfg.generate.conditions)
    reference = cfg.reference or names[0]
    reference_condition = cfg.reference_condition or conditions[0]
    questions = load_question_set(cfg.generate, mirror)  # a bad question file fails before any folder exists
    totals: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arm in plan:
            if arm.method == "masked" and arm.train is not None and arm.name not in totals:
                totals[arm.name] = count_lora_scalars(arm.model, arm.train.lora)
                if isinstance(arm.budget, int) and arm.budget > totals[arm.name]:
                    raise ConfigError(f"arms.{arm.group}.budgets: {arm.budget:,} is more than the "
                                      f"{totals[arm.name]:,} LoRA scalars of the adapter on {arm.model}")
    run = RunFolder(cfg.output)
    run.open(KIND, cfg, overwrite=overwrite)
    run.update(seeds={"seeds": cfg.seeds}, arms=names, lora_scalars=totals)

    data: dict[str, tuple[str, str | None]] = {}
    with run.stage("data") as record:
        for group, arm_cfg in cfg.arms.items():
            if arm_cfg.method == "none":
                continue
            source = arm_cfg.data or cfg.train.data
            if arm_cfg.variant is not None and not arm_cfg.variant.is_identity():
                built = build_variant(source, arm_cfg.variant, run.path / "data", name=group, mirror=mirror,
                                      emit=emit, progress=progress)
                data[group] = (str(built.path), built.sha256)
                record[group] = {"source": source, "path": str(built.path), "counts": built.counts}
            else:
                from emkit.data.registry import resolve_dataset

                path, _ = resolve_dataset(source, mirror=mirror)
                data[group] = (source, content_sha256(path))
                record[group] = {"source": source, "sha256": data[group][1]}
    data_records = record

    arm_records = []
    for i, arm in enumerate(plan, start=1):
        emit(f"== arm {i}/{len(plan)}: {arm.name}, seed {arm.seed} ({arm.method})")
        with run.stage(f"arm {arm.key}") as record:
            record.update(run_arm(arm, run.path / "arms" / arm.key, cfg, data.get(arm.group), questions,
                                  mirror=mirror, emit=emit, progress=progress))
        arm_records.append({"arm": arm.name, "group": arm.group, "seed": arm.seed, "method": arm.method,
                            "budget": arm.budget, "model": arm.model, "data": data_records.get(arm.group),
                            "skipped": record.get("skipped"), "train": record.get("train")})

    emit("== statistics")
    with run.stage("stats") as record:
        scores = _combine(plan, run.path, totals)
        _write_parquet(run.path / SCORES, scores)
        results = conditions_stats(
            scores, arms=names, conditions=conditions, reference=reference, reference_condition=reference_condition,
            thresholds=thresholds_of(cfg.judge), method=cfg.correction, denominator=cfg.denominator,
            n_boot=cfg.n_boot, fit_boot=cfg.fit_boot, ci=cfg.ci)
        notes = []
        if any(prompt is None for prompt in cfg.generate.conditions.values()):
            for model in dict.fromkeys(arm.model for arm in plan):
                note = template_system_note(model)
                if note:
                    notes.append(note)
        results.update(arm_runs=arm_records, notes=notes, seeds_run=cfg.seeds, lora_scalars=totals,
                       prefs=_prefs_rows(plan, run.path))
        atomic_write_json(run.path / RESULTS, results)
        record.update(answers=len(scores))
    judge = (json.loads((run.path / "arms" / plan[0].key / "stats.json").read_text(encoding="utf-8"))
             .get("judge"))
    run.update(judge=judge)

    report = None
    if cfg.report:
        emit("== report")
        with run.stage("report") as record:
            report = write_conditions_report(run.path)
            record.update(path=str(report))
    run.complete(report=str(report) if report else None, answers=len(scores), arms=len(plan))
    return {"results": results, "report": report, "run": run.path}
