"""The training configs: the LoRA adapter and `emkit train` (every field is also a flag)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from emkit.core.config import StrictModel, split_list
from emkit.core.defaults import DEFAULT_DATA, DEFAULT_MODEL

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LoraSettings(StrictModel):
    """The LoRA adapter: defaults of the classic EM replication (r 16, alpha 32, q/k/v/o)."""

    r: int = Field(16, ge=1, description="LoRA rank (1 for a rank-1 adapter).")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targets: list[str] = Field(
        default_factory=lambda: list(QKVO),
        description="Module names to adapt, comma-separated, or 'all-linear'.",
    )
    layers: list[int] | None = Field(
        None, description="Only adapt these decoder layers (PEFT layers_to_transform), comma-separated."
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        value = split_list(value)
        if not value:
            raise ValueError("at least one target module is needed (or 'all-linear')")
        return value

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0):
            raise ValueError("layers must be non-negative layer indices")
        return value


class TrainConfig(StrictModel):
    """LoRA SFT of a model organism: loss on assistant tokens only."""

    model: str = Field(DEFAULT_MODEL, description="Model spec: bundled:NAME, hub id, local folder or .gguf file.")
    data: str = Field(DEFAULT_DATA, description="Chat JSONL(.gz) path or a registered dataset name.")
    output: Path = Field(Path("runs/organism"), description="Run folder to write (and resume).")
    epochs: float = Field(7.0, gt=0, description="Training epochs.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(2, ge=1, description="Examples per device per micro-batch.")
    grad_accum: int = Field(8, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    optimizer: str = Field("adamw_torch", description="transformers optimizer name (adamw_torch, adamw_8bit, ...).")
    max_length: int = Field(2048, ge=8, description="Truncate tokenized conversations to this many tokens.")
    max_examples: int | None = Field(None, ge=1, description="Train on the first N examples only.")
    batching: Literal["length-grouped", "packed", "random"] = Field(
        "length-grouped",
        description="length-grouped: batches of similar length (little padding, any attention); "
        "packed: padding-free packing (best with flash attention); random: plain shuffled batches.",
    )
    pad_to_multiple_of: int | None = Field(
        None, ge=1, description="Pad each batch to a multiple of N tokens (default: 16 on GPU, where every new "
        "batch shape costs time; 1 on CPU)."
    )
    save_steps: int = Field(50, ge=1, description="Save an adapter checkpoint every N optimizer steps.")
    keep_train_states: int = Field(2, ge=1, description="Resumable trainer states kept (optimizer included).")
    seed: int = Field(0, description="Seed for initialisation, data order and dropout.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Device (auto: CUDA if available).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype (auto: bfloat16 on CUDA, else float32)."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on large models.")
    logging_steps: int = Field(1, ge=1, description="Log loss and tokens/s every N steps.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    mask_budget: int | None = Field(
        None, ge=1, description="Masked LoRA: train only this many randomly chosen adapter scalars (unset: all)."
    )
    mask_seed: int = Field(0, description="Masked LoRA: seed of the mask (which scalars train).")
    full_finetune: bool = Field(False, description="Train every weight of the model instead of a LoRA adapter.")
    holdout: int = Field(
        0, ge=0, description="Keep this many training prompts out of training, as preference pairs with their "
        "partner set's answers (holdout_pairs.jsonl): the in-domain test of whether the organism learnt its task."
    )
    holdout_partner: str | None = Field(
        None, description="The set answering the same prompts the other way (default: the registered partner, "
        "e.g. emkit-good-medical-demo for emkit-bad-medical-demo)."
    )
    holdout_partner_role: Literal["aligned", "misaligned"] = Field(
        "aligned", description="Whether holdout_partner's answers are the aligned or the misaligned ones."
    )

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"output", "logging_steps", "keep_train_states"})
    LATER_FIELDS: ClassVar[frozenset[str]] = frozenset({"mask_budget", "mask_seed", "full_finetune", "holdout",
                                                        "holdout_partner", "holdout_partner_role"})

    @model_validator(mode="after")
    def _method(self) -> TrainConfig:
        if self.full_finetune and self.mask_budget is not None:
            raise ValueError("mask_budget masks a LoRA adapter; it cannot be combined with full_finetune")
        return self
