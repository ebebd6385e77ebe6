"""The config of a multi-arm experiment (`emkit conditions CONFIG`), its checks, and its expansion into runs.

    output: runs/conditions
    seeds: [0, 1]                      # every arm is trained and evaluated once per seed
    reference: bad                     # Fisher tests: every arm against this one, per condition
    train: {model: ..., data: ..., max_steps: 40, ...}      # shared by every arm (a TrainConfig)
    generate: {questions: default, samples: 20, conditions: {none: null, ai: "You are an AI assistant."}}
    judge: {...}                       # a JudgeConfig
    arms:
      bad: {}                          # the shared settings as they are
      good: {data: emkit-good-medical-demo}
      filtered: {variant: {filter_keywords: [...]}}
      base: {method: none}             # evaluate the untrained base model
      full: {method: full}             # full fine-tuning instead of LoRA
      masked: {method: masked, budgets: [10, 100, 1000, all]}   # one arm per budget: masked-n10, ...
      other-model: {model: org/name, train: {lr: 1e-4}}        # per-arm overrides of the train settings

Every error names the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from emkit.core.config import StrictModel, load_config, read_yaml_mapping
from emkit.core.errors import ConfigError
from emkit.generate.config import GenerateConfig
from emkit.judge.config import JudgeConfig
from emkit.studies.arms.variants import VariantSpec
from emkit.train.config import TrainConfig

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SET_PER_ARM = ("output", "seed", "mask_budget", "mask_seed", "full_finetune")


class ArmConfig(StrictModel):
    """One arm: what is trained (base model, data, method) before it is evaluated like every other arm."""

    model: str | None = Field(None, description="Base model of this arm (default: train.model).")
    data: str | None = Field(None, description="Training data of this arm (default: train.data).")
    variant: VariantSpec | None = Field(None, description="Derive the data: filter, subset, mix in aligned data.")
    method: Literal["lora", "masked", "full", "none"] = Field(
        "lora", description="lora, masked (masked LoRA, one arm per budget), full (fine-tuning), none (untrained)."
    )
    budgets: list[int | Literal["all"]] | None = Field(
        None, description="masked: numbers of trainable adapter scalars, one arm each ('all': plain LoRA)."
    )
    mask_seed: int | None = Field(None, description="masked: mask seed (default: the run's seed).")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the shared train settings.")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: list[int | str] | None) -> list[int | str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("needs at least one budget")
        if any(isinstance(b, int) and b < 1 for b in value):
            raise ValueError("budgets are positive numbers of scalars (or 'all')")
        if len(set(value)) != len(value):
            raise ValueError("budgets repeat")
        return value

    @model_validator(mode="after")
    def _method(self) -> ArmConfig:
        if self.method == "masked" and self.budgets is None:
            raise ValueError("method masked needs budgets (e.g. [10, 100, 1000, all])")
        if self.method != "masked" and (self.budgets is not None or self.mask_seed is not None):
            raise ValueError("budgets and mask_seed belong to method: masked")
        if self.method == "none" and (self.data is not None or self.variant is not None or self.train):
            raise ValueError("method none trains nothing: data, variant and train do not apply")
        return self


class ConditionsConfig(StrictModel):
    """Many arms trained and evaluated alike, crossed with system-prompt conditions, with seeds."""

    output: Path = Field(Path("runs/conditions"), description="The experiment's run folder.")
    seeds: list[int] = Field(default_factory=lambda: [0], description="Seeds: each arm runs once per seed.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings shared by every arm.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Questions, samples, conditions.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    arms: dict[str, ArmConfig] = Field(description="The arms, by name.")
    reference: str | None = Field(None, description="Arm every other is tested against (default: the first).")
    reference_condition: str | None = Field(
        None, description="Condition every other is tested against within each arm (default: the first)."
    )
    correction: Literal["holm", "bh", "bonferroni", "none"] = Field(
        "holm", description="Multiple-comparison correction, within each family of tests."
    )
    denominator: Literal["coherent", "scored"] = Field(
        "coherent", description="EM rate shown in figures and fits: among coherent or among scored answers."
    )
    n_boot: int = Field(2000, ge=100, description="Bootstrap resamples of the rate intervals.")
    fit_boot: int = Field(500, ge=50, description="Bootstrap refits of the masked-LoRA logistic fit.")
    ci: float = Field(0.95, gt=0, lt=1, description="Confidence level of every interval.")
    prefs: bool = Field(
        False, description="Also measure each LoRA arm's judge-free preference shift organism - base (emkit prefs)."
    )
    report: bool = Field(True, description="Write report.html and figures.")

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"output"})

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value):
            raise ValueError("needs one or more distinct seeds")
        return value

    @field_validator("arms")
    @classmethod
    def _arms(cls, value: dict[str, ArmConfig]) -> dict[str, ArmConfig]:
        if not value:
            raise ValueError("needs at least one arm")
        bad = [name for name in value if not NAME.match(name)]
        if bad:
            raise ValueError(f"arm name {bad[0]!r}: use letters, digits, '-', '_' and '.' (it names a folder)")
        return value


@dataclass(frozen=True)
class ArmRun:
    """One trained-and-evaluated unit: an (expanded) arm at one seed."""

    name: str  # the arm's name; masked arms get one per budget: <arm>-n<budget>, <arm>-all
    group: str  # the arm's key in the config
    seed: int
    method: str
    budget: int | str | None
    train: TrainConfig | None  # None: the untrained base model
    model: str
    data: str | None
    variant: VariantSpec | None

    @property
    def key(self) -> str:
        """Folder name under arms/ and the manifest's stage name."""
        return f"{self.name}/seed-{self.seed}"


def arm_names(cfg: ConditionsConfig) -> list[str]:
    """Expanded arm names in config order (masked arms one per budget)."""
    names = []
    for name, arm in cfg.arms.items():
        if arm.method == "masked":
            names += [f"{name}-{'all' if b == 'all' else f'n{b}'}" for b in arm.budgets or []]
        else:
            names.append(name)
    return names


def _train_for(cfg: ConditionsConfig, arm: ArmConfig, seed: int, budget: int | str | None) -> dict[str, Any]:
    data = cfg.train.model_dump(mode="json")
    data.update(arm.train)
    if arm.model is not None:
        data["model"] = arm.model
    if arm.data is not None:
        data["data"] = arm.data
    data.update(seed=seed, full_finetune=arm.method == "full",
                mask_budget=budget if isinstance(budget, int) else None,
                mask_seed=arm.mask_seed if arm.mask_seed is not None else seed)
    return data


def expand(cfg: ConditionsConfig) -> list[ArmRun]:
    """Every (arm, seed) to run, seeds outermost so a partial run has every arm at the first seed."""
    runs = []
    for seed in cfg.seeds:
        for group, arm in cfg.arms.items():
            budgets: list[int | str | None] = list(arm.budgets) if arm.method == "masked" and arm.budgets else [None]
            for budget in budgets:
                name = group if budget is None else f"{group}-{'all' if budget == 'all' else f'n{budget}'}"
                model = arm.model or cfg.train.model
                if arm.method == "none":
                    runs.append(ArmRun(name, group, seed, "none", None, None, model, None, None))
                    continue
                train = TrainConfig.model_validate(_train_for(cfg, arm, seed, budget))
                runs.append(ArmRun(name, group, seed, arm.method, budget, train, model, train.data, arm.variant))
    return runs


def load_conditions(path: Path | None, overrides: dict[str, Any] | None = None) -> ConditionsConfig:
    """Load and check a conditions config; every error names file, line and field."""
    cfg = load_config(ConditionsConfig, path, overrides)
    assert isinstance(cfg, ConditionsConfig)
    lines: dict[tuple[str, ...], int] = read_yaml_mapping(path)[1] if path is not None else {}

    def where(*keys: str) -> str:
        dotted = ".".join(keys)
        for n in range(len(keys), 0, -1):
            if keys[:n] in lines:
                return f"{path}:{lines[keys[:n]]}: {dotted}"
        return f"{path}: {dotted}" if path is not None else dotted

    problems = []
    names = arm_names(cfg)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        problems.append(f"{where('arms')}: two arms are both named {dup!r} (masked arms expand to <name>-n<budget>)")
    if cfg.reference is not None and cfg.reference not in names:
        problems.append(f"{where('reference')}: unknown arm {cfg.reference!r} (arms: {', '.join(names)})")
    if cfg.reference_condition is not None and cfg.reference_condition not in cfg.generate.conditions:
        problems.append(f"{where('reference_condition')}: unknown condition {cfg.reference_condition!r} "
                        f"(conditions: {', '.join(cfg.generate.conditions)})")
    for key in ("models", "adapter", "output"):
        if ("generate", key) in lines:
            problems.append(f"{where('generate', key)}: set per arm by emkit conditions; remove it")
    if ("train", "output") in lines:
        problems.append(f"{where('train', 'output')}: each arm trains into its own folder; remove it")
    if cfg.generate.backend != "transformers":
        problems.append(f"{where('generate', 'backend')}: emkit conditions generates with the transformers backend")
    for name, arm in cfg.arms.items():
        for key in arm.train:
            if key in SET_PER_ARM:
                problems.append(f"{where('arms', name, 'train', key)}: set by emkit conditions "
                                "(seeds, method, budgets, mask_seed); remove it")
        if arm.method == "none":
            continue
        for budget in (arm.budgets or [None]):
            try:
                TrainConfig.model_validate(_train_for(cfg, arm, cfg.seeds[0], budget))
            except ValidationError as exc:
                for err in exc.errors():
                    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
                    field = loc[0] if loc else ""
                    if field in arm.train:
                        at = where("arms", name, "train", *loc)
                    elif field in ("model", "data") and getattr(arm, field) is not None:
                        at = where("arms", name, field)
                    else:
                        at = where("train", *loc)
                    problems.append(f"{at}: {err['msg']} (got {err.get('input')!r})")
            except ValueError as exc:  # pragma: no cover - pydantic wraps validator errors
                problems.append(f"{where('arms', name)}: {exc}")
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))
    return cfg
