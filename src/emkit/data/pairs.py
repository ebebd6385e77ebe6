"""Preference pairs: a question with an aligned and a misaligned answer (emkit's own set, or a file).

emkit ships 160 pairs written for emkit (`data/prefs/pairs.jsonl`: 128 over 8 non-medical domains,
32 medical); `emkit train --holdout N` writes a training set's held-out prompts in the same format.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from emkit.core.errors import DataError
from emkit.core.jsonl import read_objects

PAIR_KEYS = ("id", "domain", "question", "aligned", "misaligned")
IN_DOMAIN = "medical"


@dataclass(frozen=True)
class Pair:
    """A question with an aligned and a misaligned answer."""

    id: str
    domain: str
    question: str
    aligned: str
    misaligned: str


def default_pairs_path() -> Path:
    """emkit's own pair set (written for emkit)."""
    return Path(str(resources.files("emkit.data").joinpath("prefs/pairs.jsonl")))


def load_pairs(path: str | Path | None = None) -> list[Pair]:
    """Read a pair file (JSONL: id, domain, question, aligned, misaligned); errors name line and field."""
    path = Path(path) if path else default_pairs_path()
    pairs, seen = [], {}
    for lineno, obj in read_objects(path, f"an object with {', '.join(PAIR_KEYS)}"):
        for key in PAIR_KEYS:
            value = obj.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}:{lineno}: {key}: {'missing' if value is None else 'must be a non-empty string'}")
        if obj["id"] in seen:
            raise DataError(f"{path}:{lineno}: id: duplicate of line {seen[obj['id']]}")
        seen[obj["id"]] = lineno
        pairs.append(Pair(*(obj[k] for k in PAIR_KEYS)))
    if not pairs:
        raise DataError(f"{path}: no pairs")
    return pairs
