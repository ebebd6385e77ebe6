"""`emkit track` config: which training run to follow, how each checkpoint is asked and judged."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from emkit.core.config import StrictModel, load_config
from emkit.generate.config import GenerateConfig
from emkit.judge.config import JudgeConfig
from emkit.train.config import TrainConfig


def _track_generate() -> GenerateConfig:
    return GenerateConfig(modes=["assistant", "predictive"], models=["organism"])


class TrackConfig(StrictModel):
    """Evaluate every checkpoint of a LoRA training run (and step 0, the base) alike, then analyse the dynamics."""

    run: Path | None = Field(
        None, description="Training run folder to follow (its checkpoints/step-N and adapter/), or a Trainer's "
        "output folder with checkpoint-N."
    )
    train: TrainConfig | None = Field(
        None, description="Or train here: a TrainConfig (YAML section, or a path to a train YAML); it runs as "
        "`emkit train` into <output>/organism while the checkpoints are evaluated."
    )
    output: Path = Field(Path("runs/track"), description="The tracking run's folder (written and resumed).")
    watch: bool | None = Field(
        None, description="Concurrent mode: evaluate each checkpoint as soon as it is complete, until training "
        "finishes (default: on with train, off with run)."
    )
    poll_seconds: float = Field(5.0, gt=0, description="Seconds between looks for new checkpoints (watch).")
    wait_timeout: float | None = Field(
        None, gt=0, description="Stop watching after this many seconds without a new checkpoint (default: wait while "
        "the training process lives)."
    )
    steps: list[int] | None = Field(
        None, description="Only these checkpoint steps (step 0, the base, is always evaluated)."
    )
    generate: GenerateConfig = Field(
        default_factory=_track_generate,
        description="Questions, modes, samples and sampling; model and adapter are set per checkpoint.",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The judge, its metrics and EM thresholds.")
    second_judge: str | None = Field(
        None, description="A second judge for agreement figures: local:MODEL_SPEC, openai:MODEL (judge.base_url), "
        "keywords or constant:N."
    )
    validate_judge: int | None = Field(
        60, ge=2, description="Validate the judge on this many of emkit's labelled answers (stratified), so the "
        "report can say whether its EM rates mean anything; None: skip."
    )
    prefs: bool = Field(True, description="Judge-free preference shift (emkit.preference) at every checkpoint.")
    prefs_pairs: int | None = Field(
        48, ge=2, description="Pairs scored per checkpoint, taken evenly across domains, medical included "
        "(None: all of them)."
    )
    weights: bool = Field(True, description="LoRA weight dynamics from the checkpoints (norms, update cosines, PCA).")
    report: bool = Field(True, description="Write report.html and figures/.")
    n_boot: int = Field(2000, ge=100, description="Bootstrap resamples of the preference-shift intervals.")
    seed: int = Field(0, description="Seed of the bootstrap, the pair subset and Monte Carlo tests.")
    onset_test: Literal["questions", "stratified"] = Field(
        "questions", description="Test of each checkpoint against the base for the onset: questions (sign-flip "
        "test, questions as the sampling unit) or stratified (exact CMH test, questions as strata)."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Family-wise error rate of the onset over the checkpoints.")

    NON_RESULT_FIELDS = frozenset({"output", "watch", "poll_seconds", "wait_timeout", "report"})
    LATER_FIELDS = frozenset({"onset_test", "alpha"})

    @field_validator("train", mode="before")
    @classmethod
    def _train_file(cls, value: Any) -> Any:
        # A flag or YAML string names a train config file.
        if isinstance(value, (str, Path)):
            return load_config(TrainConfig, Path(value)).model_dump()
        return value

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _source(self) -> TrackConfig:
        if (self.run is None) == (self.train is None):
            raise ValueError("give run (a training run folder to follow) or train (to train here), one of them")
        if self.generate.adapter is not None:
            raise ValueError("generate.adapter is set per checkpoint by emkit track; leave it out")
        if self.generate.backend != "transformers":
            raise ValueError("emkit track switches adapters in one loaded model: generate.backend must be transformers")
        return self

    @property
    def watching(self) -> bool:
        """Whether to follow a training run as it writes checkpoints."""
        return self.watch if self.watch is not None else self.train is not None
