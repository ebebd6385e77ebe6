"""The validation stage: a run's judge against emkit's labelled answers, under the run's own rule and prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emkit.core.errors import EmkitError
from emkit.judge.config import JudgeConfig
from emkit.judge.prompts import JudgePrompt, default_prompts, prompt_set
from emkit.judge.validate import EM_METRICS


def stratified(labels: list, n: int) -> list:
    """Up to n labels, half misaligned and half not where possible, in file order (deterministic)."""
    bad = [lab for lab in labels if lab.misaligned]
    good = [lab for lab in labels if not lab.misaligned]
    take_bad = min(len(bad), n // 2)
    return bad[:take_bad] + good[: n - take_bad]


def validate_stage(run_dir: Path, judge_cfg: JudgeConfig, n: int, *, progress: bool = True) -> dict[str, Any]:
    """Validate the run's judge on n of emkit's labelled answers, under the run's own EM rule and judge
    prompts (those the judge stage recorded); writes validation.json."""
    from emkit.core.runfolder import atomic_write_json
    from emkit.judge.cache import JudgmentCache
    from emkit.judge.validate import load_labels, validate_judge
    from emkit.stages.judge import CACHE, make_judge, thresholds_of

    judge, _info = make_judge(judge_cfg)
    prompts, label, note = run_validation_prompts(run_dir, judge_cfg)
    with JudgmentCache(run_dir / CACHE) as cache:
        report = validate_judge(judge, stratified(load_labels(), n), cache, thresholds=thresholds_of(judge_cfg),
                                prompts=prompts, prompts_label=label, prompts_note=note,
                                min_scorable=judge_cfg.min_scorable, progress=progress)
    report["labels"] = "emkit's labelled answers (written and labelled for emkit by its authors)"
    atomic_write_json(run_dir / "validation.json", report)
    aligned = report["metrics"]["aligned"]
    return {"n_labels": report["n_labels"], "auroc_aligned": aligned["auroc"],
            "auroc_coherent": report["metrics"]["coherent"]["auroc"], "scorable_share": report["scorable_share"],
            "prompts": label, "rule": report["rule"], "valid": report["valid_for_em_rates"],
            "verdict": report["verdict"]}


def run_validation_prompts(run_dir: Path, cfg: JudgeConfig,
                           mirror: str | None = None) -> tuple[dict[str, JudgePrompt], str, str | None]:
    """The judge prompts to validate a run's judge with: those that judged the run (most of its answers,
    when several sets did), their name, and a note when that is not the whole story."""
    from emkit.stages.judge import PROMPTS_RECORD, read_prompt_record

    record = read_prompt_record(run_dir)
    if record is not None and record["sets"]:
        sets = sorted(record["sets"], key=lambda entry: -int(entry.get("answers") or 0))
        chosen = sets[0]
        templates = chosen.get("templates") or {}
        missing = [m for m in EM_METRICS if m not in templates]
        if missing:
            raise EmkitError(f"{run_dir / PROMPTS_RECORD}: the run was judged without a prompt for "
                             f"{', '.join(missing)}; its judge cannot be validated for EM rates")
        label = str(chosen.get("label"))
        prompts = {m: JudgePrompt(m, templates[m], True, label) for m in EM_METRICS}
        note = None
        if len(sets) > 1:
            total = sum(int(entry.get("answers") or 0) for entry in sets)
            note = (f"the run was judged with {len(sets)} sets of judge prompts; validated with '{label}', which "
                    f"judged {chosen.get('answers')} of its {total} answers")
        return prompts, label, note
    # judged before the prompts were recorded, or not judged yet: the prompts its config chooses
    if cfg.prompts == "auto":
        note = (f"{run_dir / PROMPTS_RECORD} is missing, so the run's own prompts are unknown; validated with emkit's, "
                "which judge every question that has none of its own")
        return {m: default_prompts()[m] for m in EM_METRICS}, "emkit", note
    chosen_set = prompt_set(cfg.prompts, mirror=mirror)
    missing = [m for m in EM_METRICS if m not in chosen_set]
    if missing:
        raise EmkitError(f"judge prompts '{cfg.prompts}' have no prompt for {', '.join(missing)}")
    return {m: chosen_set[m] for m in EM_METRICS}, cfg.prompts, None
