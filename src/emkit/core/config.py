"""Config machinery: strict pydantic models, hashes, and loading them from YAML plus flag overrides.

Every field of a config is also a command-line flag (see `flag_fields`): nested models become
prefixed flags, so `lora.r` is `--lora-r`. Values are layered defaults < YAML file < flags.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    model_serializer,
)

from emkit.core.errors import ConfigError


class StrictModel(BaseModel):
    """A config model that rejects unknown keys and re-validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Fields that do not change a run's result (where it is written, how it logs): a run can resume
    # across changes of these. Subclasses name theirs.
    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset()
    # Fields added after runs were made: left out of dumps (so of saved configs and hashes) while at
    # their default, so a run made before a field existed still resumes.
    LATER_FIELDS: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _dump_without_later_defaults(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self.LATER_FIELDS:
                if name in data and getattr(self, name) == type(self).model_fields[name].get_default(
                        call_default_factory=True):
                    data.pop(name)
        return data


def split_list(value: Any) -> Any:
    """Accept `a,b,c` (from a flag) as well as a YAML list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def config_hash(config: StrictModel) -> str:
    """Hash of the fields that determine a run's result (not where it is written or how it logs)."""
    exclude = getattr(config, "NON_RESULT_FIELDS", frozenset())
    payload = config.model_dump(mode="json", exclude=set(exclude))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def diff_configs(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """List `key: old -> new` for every field that differs between two dumped configs."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += diff_configs(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


# ---------------------------------------------------------------- flags


def flag_fields(model_cls: type[BaseModel], prefix: str = "") -> dict[str, tuple[str, Any]]:
    """Map every leaf field of `model_cls` to (flag name, FieldInfo); nested models get a prefix."""
    out: dict[str, tuple[str, Any]] = {}
    for name, info in model_cls.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(flag_fields(annotation, prefix=f"{path}."))
        else:
            out[path] = ("--" + path.replace(".", "-").replace("_", "-"), info)
    return out


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


# ---------------------------------------------------------------- YAML


def _key_lines(path: Path, text: str) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every mapping key in a YAML document, by key path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = prefix + (str(key.value),)
                lines[here] = key.start_mark.line + 1
                walk(value, here)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def read_yaml_mapping(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Read a YAML mapping, returning it and the line of each key; errors name file and line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a YAML config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        # Newlines translated as text-mode reading does; decoding the whole file at once keeps the
        # error's offset exact.
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at byte column {column})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        # An empty file is far more often a failed copy or a wrong path than a wish for all defaults.
        raise ConfigError(
            f"{path}: the file is empty (nothing but blank lines or comments); expected a mapping of field: value"
        )
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else f"single value ({type(data).__name__})"
        raise ConfigError(f"{path}:1: the top level must be a mapping of field: value, got a {kind}")
    return data, _key_lines(path, text)


def load_config(
    model_cls: type[StrictModel],
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> StrictModel:
    """Build a config from defaults, an optional YAML file and dotted-key flag overrides."""
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        data, lines = read_yaml_mapping(path)
    from_flags = set()
    flags = flag_fields(model_cls)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        _set_path(data, dotted, value)
        from_flags.add(tuple(dotted.split(".")))
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, model_cls, path, lines, from_flags, flags)) from None


def _describe(
    exc: ValidationError,
    model_cls: type[BaseModel],
    path: Path | None,
    lines: dict[tuple[str, ...], int],
    from_flags: set[tuple[str, ...]],
    flags: dict[str, tuple[str, Any]],
) -> str:
    """One line per validation error, naming the flag or the file, line and field."""
    messages = []
    for err in exc.errors():
        loc = tuple(str(part) for part in err["loc"] if not isinstance(part, int))
        dotted = ".".join(loc)
        if loc in from_flags:
            where = f"{flags.get(dotted, ('--' + dotted,))[0]}"
        elif path is not None:
            line = lines.get(loc)
            where = f"{path}:{line}: {dotted}" if line else f"{path}: {dotted}"
        else:
            where = dotted
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _known_keys(model_cls, loc[:-1]), n=1)
            msg = "unknown field" + (f" (did you mean '{close[0]}'?)" if close else "")
        elif "input" in err and err["type"] != "missing":
            msg += f" (got {err['input']!r})"
        messages.append(f"{where}: {msg}")
    return "; ".join(messages)


def _known_keys(model_cls: type[BaseModel], parents: tuple[str, ...]) -> list[str]:
    cls: Any = _unwrap(model_cls)
    for part in parents:
        if typing.get_origin(cls) is dict:  # a mapping of names to models: the key is a name
            cls = _unwrap(typing.get_args(cls)[1])
            continue
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        cls = _unwrap(field.annotation)
    return list(cls.model_fields) if hasattr(cls, "model_fields") else []


def _unwrap(annotation: Any) -> Any:
    """`Model | None` -> Model (so nested optional models suggest their keys too)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def dump_yaml(config: BaseModel) -> str:
    """The resolved config as YAML, as written into a run folder."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
