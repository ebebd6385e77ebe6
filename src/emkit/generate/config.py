"""The generation config: which models answer which questions, how they are sampled."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from emkit.core.config import StrictModel, split_list
from emkit.core.defaults import DEFAULT_MODEL


def parse_conditions(value: Any) -> Any:
    """Conditions come as a YAML mapping, or from a flag as `name=system prompt;name2` (no prompt: none)."""
    if isinstance(value, str):
        out: dict[str, str | None] = {}
        for part in value.split(";"):
            if not part.strip():
                continue
            name, _, prompt = part.partition("=")
            out[name.strip()] = prompt.strip() or None
        return out
    return value


class GenerateConfig(StrictModel):
    """Sample answers to a question set from base and organism under named system-prompt conditions."""

    model: str = Field(DEFAULT_MODEL, description="Base model spec (bundled:NAME, hub id, folder, .gguf).")
    adapter: str | None = Field(
        None, description="The organism: a LoRA adapter folder or a training run folder (its adapter/)."
    )
    output: Path = Field(Path("runs/eval"), description="Run folder to write (and resume).")
    questions: str = Field("default", description="Question set: 'default', a YAML file or a registered name.")
    include: list[str] | None = Field(None, description="Only these question ids (globs, comma-separated).")
    samples: int | None = Field(None, ge=1, description="Samples per question paraphrase (overrides the file).")
    models: list[Literal["base", "organism"]] = Field(
        default_factory=lambda: ["base", "organism"], description="Which models answer: base, organism or both."
    )
    conditions: dict[str, str | None] = Field(
        default_factory=lambda: {"none": None},
        description="System-prompt conditions, name=prompt;name2=prompt (no prompt: no system message).",
    )
    modes: list[Literal["assistant", "predictive", "raw"]] = Field(
        default_factory=lambda: ["assistant"],
        description="Prompting modes: assistant (chat template), predictive (the model continues a document that "
        "sets up the question, no template; condition 'predictive'), raw (the question continued with no "
        "template; condition 'raw').",
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(600, ge=1, description="Longest answer in tokens.")
    batch_size: int = Field(32, ge=1, description="Answers sampled per batch (transformers backend).")
    seed: int = Field(0, description="Sampling seed (each batch derives its own from it).")
    backend: Literal["transformers", "openai"] = Field(
        "transformers", description="Local batched transformers, or an OpenAI-compatible server (vLLM, llama.cpp)."
    )
    base_url: str | None = Field(None, description="OpenAI-compatible server URL (openai backend).")
    served_base: str | None = Field(None, description="Served model name answering as the base (openai backend).")
    served_organism: str | None = Field(
        None, description="Served model name answering as the organism, e.g. a vLLM LoRA module (openai backend)."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding this server's API key (unset: OPENAI_API_KEY for OpenAI's API only, no key for any other endpoint).")
    concurrency: int = Field(16, ge=1, description="Requests in flight (openai backend).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Device (auto: CUDA if available).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Model dtype.")

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"output", "concurrency", "api_key_env"})
    LATER_FIELDS: ClassVar[frozenset[str]] = frozenset({"modes"})

    @field_validator("conditions", mode="before")
    @classmethod
    def _conditions(cls, value: Any) -> Any:
        value = parse_conditions(value)
        if isinstance(value, dict) and not value:
            raise ValueError("at least one condition is needed (e.g. none)")
        return value

    @field_validator("include", "models", "modes", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("modes")
    @classmethod
    def _modes(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("give each mode once, and at least one")
        clash = [m for m in value if m != "assistant" and m in (info.data.get("conditions") or {})]
        if clash:
            raise ValueError(f"a condition is named '{clash[0]}', like the prompting mode; rename the condition")
        return value
