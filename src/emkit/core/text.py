"""Open user text files (plain or gzip) and locate bytes that are not UTF-8 by exact line and byte column.

A file decoded while it is streamed reports a bad byte against the decoding chunk (8 KB), not the
line that holds it. Readers here open files with `errors="surrogateescape"`, which turns each bad
byte into a lone surrogate in the line it belongs to, and check every line with `utf8_problem`.
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

# surrogateescape maps each undecodable byte 0x80-0xff to U+DC80-U+DCFF; valid UTF-8 never decodes to
# a lone surrogate, so any of these marks a bad byte.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def open_text(path: Path, errors: str = "strict") -> io.TextIOBase:
    """Open a UTF-8 text file that may be gzipped (by magic bytes); `errors` as for `open`."""
    with open(path, "rb") as handle:
        gz = handle.read(2) == b"\x1f\x8b"
    if gz:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def utf8_problem(text: str) -> tuple[int, str] | None:
    """For text read with errors="surrogateescape": None if it was UTF-8, else (line in `text`, problem)."""
    found = _ESCAPED_BYTE.search(text)
    if found is None:
        return None
    start = text.rfind("\n", 0, found.start()) + 1
    line = text.count("\n", 0, start) + 1
    # Everything before the first escaped byte decoded cleanly, so it re-encodes to the file's bytes.
    column = len(text[start : found.start()].encode("utf-8")) + 1
    byte = ord(found.group()) - 0xDC00
    return line, f"not UTF-8 text (byte {byte:#04x} at byte column {column})"
