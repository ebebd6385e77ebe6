"""The bias experiment's config (`emkit bias CONFIG`): models and their modes, sampling, classifiers.

Every field is also a flag (`--runs 3`, `--llm-judge local`); the model list as a flag is
`--models "chat=bundled:smollm2-135m-instruct@chat;raw=bundled:smollm2-135m-instruct@raw"`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from emkit.core.config import StrictModel, split_list
from emkit.core.defaults import DEFAULT_MODEL

DEFAULT_CHAT_TEMPLATE = "Complete this sentence: {stem}"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class BiasModel(StrictModel):
    """One model that completes the stems, in its own mode, or completions imported from a file."""

    name: str = Field(..., description="Label of the model in results and figures (letters, digits, _ . -).")
    model: str = Field(DEFAULT_MODEL, description="Model spec (transformers) or served model name (openai).")
    adapter: str | None = Field(None, description="A LoRA adapter folder (or training run) on top of the model.")
    mode: Literal["raw", "chat"] = Field(
        "chat", description="raw: continue the stem as plain text (no template); chat: ask with the chat template."
    )
    chat_template: str = Field(DEFAULT_CHAT_TEMPLATE, description="Chat-mode request; {stem} is the stem.")
    system: str | None = Field(None, description="System prompt in chat mode (none: no system message).")
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra chat-template arguments, e.g. enable_thinking: false (transformers)."
    )
    backend: Literal["transformers", "openai"] = Field(
        "transformers", description="Local batched transformers, or an OpenAI-compatible server (vLLM, llama.cpp)."
    )
    base_url: str | None = Field(None, description="Server URL (openai backend).")
    api_key_env: str | None = Field(None, description="Environment variable holding its API key (unset: OPENAI_API_KEY for OpenAI's API only, no key for any other endpoint).")
    completions: str | None = Field(
        None, description="Import completions from this file instead of generating (emkit JSONL or the original "
        "experiment's *_all_runs.json), or from a registered name (emkit data list), e.g. bias-qwen3-base-completions."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("a model name holds only letters, digits, '_', '.', '-'")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if "{stem}" not in value:
            raise ValueError("the chat template needs the placeholder {stem}")
        return value


class KeywordSettings(StrictModel):
    """The keyword classifier: which lexicons, and whether to filter off-topic completions."""

    lexicons: list[str] = Field(
        default_factory=lambda: ["default"],
        description="Lexicons, merged in order: 'default' (emkit's), folders of YAML files or YAML files.",
    )
    off_topic_filter: bool = Field(True, description="Label math word problems and number lists off-topic.")
    scope: Literal["first_sentence", "all"] = Field(
        "first_sentence", description="Count cues in the continuation's first sentence (the stem's completion) or all."
    )

    @field_validator("lexicons", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return split_list(value)


class LLMSettings(StrictModel):
    """The LLM classifier: any emkit judge backend asked for one label code (1-4)."""

    judge: Literal["auto", "openai", "local"] = Field(
        "auto", description="auto: an OpenAI-compatible judge when a base URL or API key is set, else local."
    )
    judge_model: str = Field("gpt-4o-2024-08-06", description="Classifier model name on the endpoint (openai).")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint of the classifier.")
    api_key_env: str | None = Field(None, description="Environment variable holding its API key (unset: OPENAI_API_KEY for OpenAI's API only, no key for any other endpoint).")
    local_model: str = Field(DEFAULT_MODEL, description="Model spec of the local classifier.")
    template: str | None = Field(
        None, description="A text file with the classifier prompt ({question}: stem, {answer}: completion)."
    )
    min_mass: float = Field(0.25, ge=0, le=1, description="Least probability on the four label codes for a label.")
    concurrency: int = Field(8, ge=1, description="Requests in flight.")
    max_requests: int | None = Field(None, ge=1, description="Stop after this many requests (a budget).")
    timeout: float = Field(60.0, gt=0, description="Seconds before a request is retried.")


def _default_models() -> list[BiasModel]:
    # No base model is bundled: the instruct model answering in chat stands for the post-trained model
    # and the same weights continuing the bare stem for the base model, as the original did with Qwen3.
    return [BiasModel(name="chat", mode="chat"), BiasModel(name="raw", mode="raw")]


def parse_models(value: Any) -> Any:
    """`name=SPEC@mode;name2=SPEC@mode` from a flag into model entries (a YAML list passes through)."""
    if not isinstance(value, str):
        return value
    models = []
    for part in value.split(";"):
        if not part.strip():
            continue
        name, _, rest = part.partition("=")
        spec, at, mode = rest.strip().rpartition("@")
        entry: dict[str, Any] = {"name": name.strip(), "model": spec if at else mode}
        if at:
            entry["mode"] = mode.strip()
        models.append(entry)
    return models


class BiasConfig(StrictModel):
    """Complete sentence stems with several models, classify each completion's leaning, compare, report."""

    output: Path = Field(Path("runs/bias"), description="Run folder to write (and resume).")
    prompts: str = Field("default", description="Prompt set: 'default' (emkit's), a .jsonl/.yaml file, or a "
                         "registered name (emkit data list), e.g. bias-economic-prompts.")
    mirror: str | None = Field(None, description="Mirror folder or URL for registered prompts and completions "
                               "(also $EMKIT_DATA_MIRROR).")
    topics: list[str] | None = Field(None, description="Only these topics, comma-separated.")
    include: list[str] | None = Field(None, description="Only these stem ids (globs, comma-separated).")
    models: list[BiasModel] = Field(default_factory=_default_models,
                                    description="The models: name=SPEC@mode;name2=SPEC@mode (mode raw or chat).")
    reference: str | None = Field(None, description="Model the others are compared with (default: the first).")
    runs: int = Field(5, ge=1, description="Completions per stem and model.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(60, ge=1, description="Longest completion in tokens.")
    batch_size: int = Field(16, ge=1, description="Completions per batch (transformers).")
    seed: int = Field(0, description="Sampling seed.")
    concurrency: int = Field(16, ge=1, description="Requests in flight (openai backend).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Device (auto: CUDA if available).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Model dtype.")
    classifiers: list[Literal["keywords", "llm"]] = Field(
        default_factory=lambda: ["keywords", "llm"], description="Classifiers to run: keywords, llm or both."
    )
    keywords: KeywordSettings = Field(default_factory=KeywordSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    n_boot: int = Field(2000, ge=100, description="Bootstrap resamples for intervals.")
    permutations: int = Field(5000, ge=100, description="Permutations for the test between models.")
    ci: float = Field(0.95, gt=0, lt=1, description="Interval level.")
    examples: int = Field(2, ge=0, description="Example completions per model and label in the report.")
    report: bool = Field(True, description="Write report.html and figures.")

    # mirror: where registered files come from; their sha256 is pinned, so it does not change the result
    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"output", "concurrency", "examples", "report", "mirror"})

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        return parse_models(value)

    @field_validator("topics", "include", "classifiers", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("models")
    @classmethod
    def _unique(cls, value: list[BiasModel]) -> list[BiasModel]:
        names = [m.name for m in value]
        if not names:
            raise ValueError("at least one model is needed")
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ValueError(f"the name {duplicate!r} is used twice")
        return value

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: str | None, info: ValidationInfo) -> str | None:
        names = [m.name for m in info.data.get("models") or []]
        if value is not None and names and value not in names:
            raise ValueError(f"{value!r} is not one of the models ({', '.join(names)})")
        return value

    @field_validator("classifiers")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one of keywords, llm")
        return value

    @property
    def reference_model(self) -> str:
        """The model the others are compared with."""
        return self.reference or self.models[0].name
