"""`generations.jsonl`: one row per answer, planned by id, complete only when every planned id is there once.

A generation stage knows the ids it owes. Writers append rows (one `write` and fsync per batch) and
resume from what is on disk *by content*: rows are valid JSON objects with a planned id; a torn or
invalid line (a crash or a full disk in the middle of a write, a cut file) is dropped and its answer
generated again; an id written twice with the same content is collapsed (with a warning), with
different content refused. When the stage ends, `finalize` checks that every planned id is on disk
exactly once and rewrites the file in plan order, so a resumed run leaves the same file as an
uninterrupted one. Readers (`read_rows`) refuse a file with torn lines or repeated ids instead of
counting it.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emkit.core.errors import EmkitError


class IncompleteError(EmkitError):
    """A stage file lacks planned rows, or holds torn or repeated ones."""


@dataclass
class Scan:
    """What a generations file holds: its valid rows (first of each id) and what was wrong with the rest."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)  # torn or invalid lines (1-based)
    duplicates: list[tuple[str, int, int]] = field(default_factory=list)  # (id, first line, repeat line), same content
    conflicts: list[tuple[str, int, int]] = field(default_factory=list)  # (id, first line, repeat line), differing

    @property
    def clean(self) -> bool:
        """Whether every line is a valid row with an id of its own."""
        return not (self.bad_lines or self.duplicates or self.conflicts)


def scan(path: Path) -> Scan:
    """Read every line of `path`: valid rows with an id, torn/invalid lines, and repeated ids."""
    out = Scan()
    if not path.is_file():
        return out
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn")  # the last write was cut
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                    raise ValueError("no id")
            except (ValueError, UnicodeDecodeError):
                out.bad_lines.append(lineno)
                continue
            seen = first.get(row["id"])
            if seen is None:
                first[row["id"]] = (lineno, row)
                out.rows.append(row)
            elif seen[1] == row:
                out.duplicates.append((row["id"], seen[0], lineno))
            else:
                out.conflicts.append((row["id"], seen[0], lineno))
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a finished generations file; torn lines or repeated ids are an error, never counted."""
    found = scan(path)
    if found.bad_lines:
        raise IncompleteError(f"{path}:{found.bad_lines[0]}: torn or invalid row ({len(found.bad_lines)} in all); "
                              "re-run the generation stage to regenerate those answers")
    repeated = found.duplicates + found.conflicts
    if repeated:
        answer, a, b = repeated[0]
        raise IncompleteError(f"{path}:{b}: answer {answer} appears again (first at line {a}; {len(repeated)} repeats "
                              "in all); re-run the generation stage to collapse them")
    return found.rows


def problem(path: Path, expected: int | None = None) -> str | None:
    """Why a finished generations file is not whole (torn lines, repeats, a count other than expected); None if whole."""
    if not path.is_file():
        return f"{path} is missing"
    found = scan(path)
    if found.bad_lines:
        return f"{path}:{found.bad_lines[0]}: torn or invalid row ({len(found.bad_lines)} in all)"
    repeated = found.duplicates + found.conflicts
    if repeated:
        return f"{path}:{repeated[0][2]}: answer {repeated[0][0]} appears again ({len(repeated)} repeats)"
    if expected is not None and len(found.rows) != expected:
        return f"{path}: holds {len(found.rows)} answers, the finished stage recorded {expected}"
    return None


def resume_rows(path: Path, planned: Iterable[str], emit: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The valid rows already in `path` for a resumed stage; the file is repaired on disk first.

    Torn or invalid lines are dropped (their answers are owed again), repeats of an identical row are
    collapsed, and the file is rewritten without them. Rows of ids outside the plan, or an id written
    twice with different content, are refused: the folder holds another plan or two writers.
    """
    planned = set(planned)
    found = scan(path)
    stray = [r["id"] for r in found.rows if r["id"] not in planned]
    if stray:
        raise EmkitError(f"{path}: holds answers of another plan (e.g. {stray[0]}); questions, conditions or "
                         "samples changed — use a new output folder")
    if found.conflicts:
        answer, a, b = found.conflicts[0]
        raise EmkitError(f"{path}:{b}: answer {answer} was written twice with different content (first at line {a}); "
                         "two processes wrote this folder — move the file away and generate again")
    if found.bad_lines:
        emit(f"{path.name}: dropped {len(found.bad_lines)} torn or invalid line(s) (line {found.bad_lines[0]}"
             f"{' ...' if len(found.bad_lines) > 1 else ''}); their answers are generated again")
    if found.duplicates:
        emit(f"{path.name}: collapsed {len(found.duplicates)} repeated row(s) (e.g. {found.duplicates[0][0]})")
    if not found.clean:
        write_rows(path, found.rows)
    return found.rows


def finalize(path: Path, planned: Sequence[str]) -> int:
    """Check that every planned id is in `path` exactly once, then order the file as planned; returns the count."""
    found = scan(path)
    if not found.clean:
        raise IncompleteError(f"{path}: torn or repeated rows after writing (lines {found.bad_lines[:3]}, "
                              f"repeats {[d[0] for d in (found.duplicates + found.conflicts)[:3]]}); re-run to repair")
    by_id = {r["id"]: r for r in found.rows}
    missing = [i for i in planned if i not in by_id]
    if missing:
        raise IncompleteError(f"{path}: {len(missing)} of {len(planned)} planned answers are missing "
                              f"(e.g. {missing[0]}); re-run to generate them")
    extra = [i for i in by_id if i not in set(planned)]
    if extra:
        raise IncompleteError(f"{path}: holds {len(extra)} answers outside the plan (e.g. {extra[0]})")
    if [r["id"] for r in found.rows] != list(planned):
        write_rows(path, [by_id[i] for i in planned])
    return len(planned)


def _payload(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with exactly these rows (atomic: a temporary file renamed into place)."""
    from emkit.core.runfolder import atomic_write_bytes

    atomic_write_bytes(path, _payload(rows))


def repair(path: Path) -> None:
    """Cut a torn last line left by an interrupted write."""
    if not path.is_file():
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            handle.truncate(end)


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows in one write and fsync; a failed write is cut back off, so the file never keeps half a batch."""
    payload = _payload(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise EmkitError(f"{path}: cannot open for appending answers: {exc.strerror or exc}") from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(payload)
            while view:  # unbuffered, so nothing is left in a buffer to land after a failure
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # a partial write would leave a torn row behind
            raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise EmkitError(f"{path}: disk full while appending answers; the answers written before are kept — "
                             "free space and re-run to resume") from None
        raise EmkitError(f"{path}: cannot append answers: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
