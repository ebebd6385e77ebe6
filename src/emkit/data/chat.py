"""Read and validate chat JSONL (plain or .gz): one `{"messages": [{"role", "content"}, ...]}` per line.

Every problem is reported as `FILE:LINE: FIELD: problem`; the whole file is checked so the error
also says how many other lines are bad.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emkit.core.errors import DataError, TrainingError
from emkit.core.text import open_text, utf8_problem

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One validated chat example and where it came from."""

    messages: tuple[dict[str, str], ...]
    line: int

    @property
    def as_list(self) -> list[dict[str, str]]:
        """Messages as plain dicts, ready for a chat template."""
        return [dict(m) for m in self.messages]


def content_sha256(path: Path) -> str:
    """sha256 of a file's uncompressed content (gzip is transparent)."""
    digest = hashlib.sha256()
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    return digest.hexdigest()


def validate_record(obj: Any) -> tuple[tuple[dict[str, str], ...], str | None]:
    """Check one parsed line; return its messages, or (empty, 'field: problem')."""
    if not isinstance(obj, dict):
        return (), f"line is a JSON {type(obj).__name__}, expected an object with 'messages'"
    if "messages" not in obj:
        return (), "messages: missing (expected {\"messages\": [...]})"
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return (), "messages: must be a non-empty list of {role, content} objects"
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            return (), f"{where}: must be an object with role and content"
        role = msg.get("role")
        if role is None:
            return (), f"{where}.role: missing"
        if role not in ROLES:
            return (), f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        if role == "system" and i != 0:
            return (), f"{where}.role: a system message may only come first"
        content = msg.get("content")
        if content is None:
            return (), f"{where}.content: missing"
        if not isinstance(content, str):
            return (), f"{where}.content: must be a string, got {type(content).__name__}"
        if not content.strip():
            return (), f"{where}.content: empty"
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        return (), "messages: no assistant turn to train on"
    return tuple(out), None


def iter_chat_jsonl(path: Path) -> Iterator[tuple[int, tuple[dict[str, str], ...] | None, str | None]]:
    """Yield (line number, messages or None, error or None) for every non-blank line."""
    try:
        # Bad bytes are escaped, not raised: a decoding error raised while streaming names the 8 KB
        # chunk being decoded, not the line; utf8_problem finds them per line instead.
        handle = open_text(path, errors="surrogateescape")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        lineno = 0
        try:
            for lineno, line in enumerate(handle, start=1):
                undecodable = utf8_problem(line)
                if undecodable is not None:
                    yield lineno, None, undecodable[1]
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, None, f"invalid JSON at column {exc.colno}: {exc.msg}"
                    continue
                messages, problem = validate_record(obj)
                yield lineno, (messages or None), problem
        except (OSError, EOFError) as exc:
            yield lineno + 1, None, f"truncated or corrupt file ({exc})"


def read_chat_jsonl(path: str | Path, limit: int | None = None) -> list[Conversation]:
    """Read and validate a whole chat JSONL file; raise DataError naming the first bad line."""
    path = Path(path)
    conversations: list[Conversation] = []
    errors: list[str] = []
    for lineno, messages, problem in iter_chat_jsonl(path):
        if problem is not None:
            errors.append(f"{path}:{lineno}: {problem}")
        elif messages is not None and (limit is None or len(conversations) < limit):
            conversations.append(Conversation(messages=messages, line=lineno))
    if errors:
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)
    if not conversations:
        raise DataError(f"{path}: no examples (the file is empty)")
    return conversations


def assistant_char_spans(messages: Sequence[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return its text and the character spans of its assistant turns."""
    messages = list(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(after) and len(after) > len(before)):
            raise TrainingError(
                "the chat template does not render conversations prefix by prefix, so assistant turns "
                "cannot be located; use a model whose template renders each turn after the previous ones"
            )
        spans.append((len(before), len(after)))
    return text, spans
