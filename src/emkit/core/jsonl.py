"""Read JSON Lines of objects, failing on the first bad line with its file and line number."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emkit.core.errors import DataError
from emkit.core.text import open_text, utf8_problem


def read_objects(path: Path, expected: str = "an object") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for every non-blank line; bad JSON, bad bytes or a non-object raise DataError."""
    try:
        # Streamed line by line (plain or gzip); bad bytes are escaped so they are found on their own line.
        handle = open_text(path, errors="surrogateescape")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a JSONL file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        try:
            for lineno, line in enumerate(handle, start=1):
                undecodable = utf8_problem(line)
                if undecodable is not None:
                    raise DataError(f"{path}:{lineno}: {undecodable[1]}")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected {expected}")
                yield lineno, obj
        except (OSError, EOFError) as exc:  # a cut-off or corrupt gzip stream
            raise DataError(f"{path}: truncated or corrupt file ({exc})") from None
