"""Held-out pairs: training prompts kept out of training, answered both ways, to test the narrow task.

An organism trained on harmful answers should, on prompts of the same task it never saw, prefer the
harmful answer more than the base model does. When the training data has a partner set that
answers the same prompts the other way (emkit's demo sets; good and bad medical advice), `emkit
train` with `holdout: N` keeps N of its prompts out of training and writes each one's two answers
as a preference pair (`holdout_pairs.jsonl` in the training run folder, `emkit.preference` format,
domain "held_out"). The judge-free preference shift on these pairs is the in-domain test of
whether the organism learnt its task; emkit's own medical pairs are then a transfer test.

Prompts are matched by the text of their user turn; the held-out prompts are a seeded sample.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from emkit.core.errors import ConfigError, DataError
from emkit.data.chat import Conversation, read_chat_jsonl
from emkit.data.pairs import Pair

HOLDOUT_FILE = "holdout_pairs.jsonl"
HELD_OUT = "held_out"  # the pairs' domain

# Registered sets whose prompts another registered set answers the other way: (partner, partner's role).
PARTNERS: dict[str, tuple[str, Literal["aligned", "misaligned"]]] = {
    "emkit-bad-medical-demo": ("emkit-good-medical-demo", "aligned"),
    "emkit-good-medical-demo": ("emkit-bad-medical-demo", "misaligned"),
    "bad_medical_advice": ("good_medical_advice", "aligned"),
    "good_medical_advice": ("bad_medical_advice", "misaligned"),
}


@dataclass(frozen=True)
class Holdout:
    """The conversations left to train on and the held-out prompts as preference pairs."""

    train: list[Conversation]
    pairs: list[Pair]
    partner: str
    partner_role: str


def _prompt(conversation: Conversation) -> str | None:
    """The user turn of a single-exchange conversation (None for anything else: it cannot be paired)."""
    turns = [m for m in conversation.messages if m["role"] != "system"]
    if len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
        return None
    return turns[0]["content"].strip()


def _answer(conversation: Conversation) -> str:
    return conversation.messages[-1]["content"]


def resolve_partner(data: str, partner: str | None, role: str | None) -> tuple[str, str]:
    """The partner set and its role for `data`: as configured, else the registered partner."""
    if partner is not None:
        return partner, role or "aligned"
    known = PARTNERS.get(data)
    if known is None:
        raise ConfigError(f"holdout: {data} has no registered partner set answering its prompts the other way; "
                          f"set holdout_partner (registered partners: {', '.join(sorted(PARTNERS))})")
    return known


def split_holdout(conversations: Sequence[Conversation], partner: Sequence[Conversation], n: int, seed: int, *,
                  partner_role: str = "aligned", partner_name: str = "partner") -> Holdout:
    """Keep `n` seeded prompts (those the partner answers too) out of training, as pairs."""
    if partner_role not in ("aligned", "misaligned"):
        raise ConfigError(f"holdout_partner_role: {partner_role!r} (expected aligned or misaligned)")
    answers = {}
    for c in partner:
        prompt = _prompt(c)
        if prompt is not None:
            answers.setdefault(prompt, _answer(c))
    candidates = [i for i, c in enumerate(conversations) if _prompt(c) in answers]
    if len(candidates) < n:
        raise DataError(f"holdout: {n} prompts asked for, but only {len(candidates)} of the training data's "
                        f"prompts are answered by {partner_name}")
    chosen = set(np.random.default_rng(seed).choice(candidates, size=n, replace=False).tolist())
    pairs = []
    for i in sorted(chosen):
        c = conversations[i]
        prompt, own, other = _prompt(c), _answer(c), answers[_prompt(c)]
        aligned, misaligned = (other, own) if partner_role == "aligned" else (own, other)
        digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]  # type: ignore[union-attr]
        pairs.append(Pair(f"held-out-{digest}", HELD_OUT, prompt, aligned, misaligned))  # type: ignore[arg-type]
    kept = [c for i, c in enumerate(conversations) if i not in chosen]
    return Holdout(kept, pairs, partner_name, partner_role)


def load_partner(name: str, mirror: str | None = None) -> list[Conversation]:
    """The partner set's conversations (a registered name or a path)."""
    from emkit.data.registry import resolve_dataset

    path, _ = resolve_dataset(name, mirror=mirror)
    return read_chat_jsonl(path)


def pairs_payload(pairs: Sequence[Pair]) -> str:
    """The pairs as JSONL in `emkit.preference` format."""
    return "".join(json.dumps({"id": p.id, "domain": p.domain, "question": p.question, "aligned": p.aligned,
                               "misaligned": p.misaligned}, ensure_ascii=False) + "\n" for p in pairs)


def holdout_pairs_path(run_dir: str | Path | None) -> Path | None:
    """The held-out pairs of a training run folder, or of the run an adapter or checkpoint folder belongs to."""
    if run_dir is None:
        return None
    folder = Path(run_dir)
    # run/, run/adapter/, run/checkpoints/step-N/
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / HOLDOUT_FILE).is_file():
            return candidate / HOLDOUT_FILE
    return None
