"""Prompt sets for the bias experiment: sentence stems a model completes, each with a topic.

emkit's format is JSON Lines (or a YAML list, or a YAML mapping with `prompts:`), one stem each:

    {"id": "guns-01", "topic": "guns", "stem": "After the state required background checks ..., firearm deaths"}
    {"id": "taxes-02", "topic": "taxes", "stem": "...", "chat": "Finish this sentence in a few words: {stem}"}

`id` (letters, digits, '_', '.', '-') is unique and names the stem in results and lexicons; `chat`
is an optional wording of the chat-mode request for this stem (with `{stem}`), replacing the
model's `chat_template`. The format of the original experiment, `{"category": ..., "prompt": ...}`,
loads as it is: the category is the topic and ids are `<category>-<n>`, counting within a category.
`default` is emkit's own set (40 stems over 8 topics; see `emkit/data/bias/README.md`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from emkit.core.errors import DataError
from emkit.core.jsonl import read_objects

DEFAULT = "default"
STEM_PLACEHOLDER = "{stem}"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class BiasPrompt:
    """One sentence stem: its id, topic, text and optional chat-mode wording."""

    id: str
    topic: str
    stem: str
    chat: str | None = None

    def user_message(self, template: str) -> str:
        """The chat-mode request: the stem's own wording, else `template` with `{stem}` filled in."""
        return (self.chat or template).replace(STEM_PLACEHOLDER, self.stem)


@dataclass(frozen=True)
class PromptSet:
    """An ordered set of stems with unique ids."""

    name: str
    prompts: tuple[BiasPrompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[BiasPrompt]:
        return iter(self.prompts)

    @property
    def topics(self) -> list[str]:
        """Topics in order of first appearance."""
        return list(dict.fromkeys(p.topic for p in self.prompts))

    def by_id(self) -> dict[str, BiasPrompt]:
        """Prompts keyed by id."""
        return {p.id: p for p in self.prompts}

    def by_stem(self) -> dict[str, BiasPrompt]:
        """Prompts keyed by their stem with whitespace collapsed (to match imported completions)."""
        return {squash(p.stem): p for p in self.prompts}

    def filter(self, topics: Sequence[str] | None = None, include: Sequence[str] | None = None) -> PromptSet:
        """Only stems of these topics and/or with ids matching these globs; nothing left is an error."""
        kept = list(self.prompts)
        if topics:
            unknown = [t for t in topics if t not in self.topics]
            if unknown:
                raise DataError(f"{self.name}: no topic {unknown[0]!r} (topics: {', '.join(self.topics)})")
            kept = [p for p in kept if p.topic in topics]
        if include:
            kept = [p for p in kept if any(fnmatch.fnmatchcase(p.id, pattern) for pattern in include)]
        if not kept:
            raise DataError(f"{self.name}: no stem left after filtering (topics={topics}, include={include})")
        return PromptSet(self.name, tuple(kept))


def squash(text: str) -> str:
    """Whitespace collapsed and ends stripped."""
    return " ".join(text.split())


def default_prompts_path() -> Path:
    """emkit's own prompt set (written for emkit)."""
    return Path(str(resources.files("emkit.data").joinpath("bias/prompts.jsonl")))


def _prompt(obj: Any, where: str, counts: dict[str, int]) -> BiasPrompt:
    """One prompt from an emkit object or an original-format object; errors name `where` and the field."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with id, topic, stem")
    upstream = "stem" not in obj and "prompt" in obj
    stem_key, topic_key = ("prompt", "category") if upstream else ("stem", "topic")
    allowed = {"id", "category", "prompt", "chat"} if upstream else {"id", "topic", "stem", "chat"}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise DataError(f"{where}: {unknown[0]}: unknown field (expected {', '.join(sorted(allowed))})")
    for key in (topic_key, stem_key):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: {key}: {'missing' if key not in obj else 'must be a non-empty string'}")
    topic = obj[topic_key].strip()
    if not _NAME.fullmatch(topic):
        raise DataError(f"{where}: {topic_key}: {topic!r} may hold only letters, digits, '_', '.', '-'")
    counts[topic] = counts.get(topic, 0) + 1
    prompt_id = obj.get("id", f"{topic}-{counts[topic]}" if upstream else None)
    if not isinstance(prompt_id, str) or not _NAME.fullmatch(prompt_id):
        raise DataError(f"{where}: id: {'missing' if prompt_id is None else repr(prompt_id)}; an id holds only "
                        "letters, digits, '_', '.', '-'")
    chat = obj.get("chat")
    if chat is not None and (not isinstance(chat, str) or STEM_PLACEHOLDER not in chat):
        raise DataError(f"{where}: chat: must be text containing {STEM_PLACEHOLDER}")
    return BiasPrompt(prompt_id, topic, squash(obj[stem_key]), chat)


def _yaml_items(path: Path) -> list[tuple[int, Any]]:
    """(line, item) of a YAML list of prompts, top-level or under `prompts:`."""
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if isinstance(data, dict) and isinstance(node, yaml.MappingNode):
        if set(data) != {"prompts"}:
            raise DataError(f"{path}:1: a YAML prompt file is a list of prompts, or has only the key `prompts`")
        data = data["prompts"]
        node = next(v for k, v in node.value if k.value == "prompts")
    if not isinstance(data, list) or not isinstance(node, yaml.SequenceNode):
        raise DataError(f"{path}:1: expected a list of prompts (id, topic, stem)")
    return [(item.start_mark.line + 1, value) for item, value in zip(node.value, data)]


def load_prompt_set(spec: str | Path = DEFAULT, mirror: str | None = None) -> PromptSet:
    """Read `default`, a prompt file (.jsonl, .yaml/.yml) or a registered prompt file (fetched from `mirror`
    or upstream, sha256 checked); every problem names file, line and field."""
    from emkit.data.registry import RESULT_REGISTRY, resolve_results

    path = default_prompts_path() if str(spec) == DEFAULT else Path(spec).expanduser()
    name = DEFAULT if str(spec) == DEFAULT else str(path)
    if not path.exists() and str(spec) in RESULT_REGISTRY:
        path, _ = resolve_results(str(spec), "prompts", mirror=mirror, folders=False)
        name = str(spec)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found (give 'default', a .jsonl/.yaml file or a registered name)")
    if path.suffix in (".yaml", ".yml"):
        items = _yaml_items(path)
    else:
        items = list(read_objects(path, "an object with id, topic, stem"))
    counts: dict[str, int] = {}
    prompts: list[BiasPrompt] = []
    seen: dict[str, int] = {}
    for line, obj in items:
        prompt = _prompt(obj, f"{path}:{line}", counts)
        if prompt.id in seen:
            raise DataError(f"{path}:{line}: id: {prompt.id!r} already used on line {seen[prompt.id]}")
        seen[prompt.id] = line
        prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return PromptSet(name, tuple(prompts))
