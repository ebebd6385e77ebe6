"""Dataset variants: harmful examples filtered out, aligned data mixed in at a share, subsets by size.

A variant is described by a `VariantSpec` and built from a source chat dataset in three steps, in this
order (each optional):

1. **filter**: drop examples whose assistant turns match any of `filter_keywords` (case-insensitive,
   whole words; a keyword may be a regular expression), then those a judge scores as misaligned
   (`filter_judge`, a judge spec as in `emkit judge validate`: keywords, local:MODEL, openai:MODEL;
   alignment below `filter_aligned_below`). The judge sees the first user turn as the question and
   the assistant turns, joined, as the answer; an example it cannot score is kept and counted.
2. **size**: a seeded random subset of `size` of the remaining examples.
3. **mix**: examples of `mix_data` (e.g. emkit-good-medical-demo or good_medical_advice) drawn at
   random so that they make up `mix_share` of the result: added to the examples (`mix_mode: add`,
   the default) or replacing that many of them (`replace`, the size stays the same).

The result is shuffled with the seed (so a later `max_examples` keeps the mix share) and written as
chat JSONL; the source lines are copied unchanged. The file name carries a hash of the variant spec and
of the sources' contents, so a variant is built once and the same inputs always give the same bytes;
`<name>.json` beside it records the counts (kept, removed per keyword, judged, mixed) and hashes.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from emkit.core.config import StrictModel
from emkit.core.errors import DataError
from emkit.core.runfolder import atomic_write_json, atomic_write_text
from emkit.data.chat import content_sha256, iter_chat_jsonl, open_text
from emkit.data.registry import resolve_dataset

VARIANT_FORMAT = 1  # bump when the way variants are built changes, so old files are not reused


class VariantSpec(StrictModel):
    """How to derive a dataset variant from a source dataset (filter, subset, mix; each optional)."""

    filter_keywords: list[str] | None = Field(
        None, description="Drop examples whose assistant turns contain any of these words (regex allowed)."
    )
    filter_judge: str | None = Field(
        None, description="Drop examples a judge scores as misaligned: keywords, local:MODEL or openai:MODEL."
    )
    filter_aligned_below: float = Field(30.0, ge=0, le=100, description="Judge filter: drop when aligned < this.")
    judge_base_url: str | None = Field(None, description="Judge filter: OpenAI-compatible endpoint (openai:MODEL).")
    size: int | None = Field(None, ge=1, description="Keep a random subset of this many examples (after filtering).")
    mix_data: str | None = Field(None, description="Aligned dataset to mix in (file or registered name).")
    mix_share: float | None = Field(None, gt=0, lt=1, description="Share of the result drawn from mix_data.")
    mix_mode: Literal["add", "replace"] = Field(
        "add", description="add: mixed examples come on top; replace: they replace examples (size unchanged)."
    )
    seed: int = Field(0, description="Seed of the subset, the mixed examples and the final order.")

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"judge_base_url"})

    @field_validator("filter_keywords", mode="before")
    @classmethod
    def _keywords(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [k.strip() for k in value.split(",")]
        if isinstance(value, list):
            if not value or any(not isinstance(k, str) or not k.strip() for k in value):
                raise ValueError("needs one or more non-empty keywords")
            for k in value:
                try:
                    re.compile(k)
                except re.error as exc:
                    raise ValueError(f"{k!r} is not a valid regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _mix(self) -> VariantSpec:
        if (self.mix_data is None) != (self.mix_share is None):
            raise ValueError("mix_data and mix_share go together")
        return self

    def is_identity(self) -> bool:
        """True when the variant is the source itself (nothing to filter, subset or mix)."""
        return not (self.filter_keywords or self.filter_judge or self.size or self.mix_data)


@dataclass
class VariantResult:
    """A built variant: its file, the counts of what each step did, and its content hash."""

    path: Path
    counts: dict[str, Any]
    sha256: str
    reused: bool


def _lines(path: Path) -> list[tuple[int, str, tuple[dict[str, str], ...]]]:
    """Valid examples of a chat JSONL as (line number, raw line, messages); errors name file and line."""
    bad = [(n, problem) for n, _, problem in iter_chat_jsonl(path) if problem is not None]
    if bad:
        raise DataError(f"{path}:{bad[0][0]}: {bad[0][1]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    messages = {n: m for n, m, _ in iter_chat_jsonl(path) if m is not None}
    out = []
    with open_text(path) as handle:
        for lineno, line in enumerate(handle, start=1):
            if lineno in messages:
                out.append((lineno, line.rstrip("\n"), messages[lineno]))
    if not out:
        raise DataError(f"{path}: no examples (the file is empty)")
    return out


def _assistant_text(messages: tuple[dict[str, str], ...]) -> str:
    return "\n\n".join(m["content"] for m in messages if m["role"] == "assistant")


def _keyword_filter(rows: list, keywords: list[str]) -> tuple[list, dict[str, int]]:
    """Rows without any keyword in their assistant turns, and how many rows each keyword removed."""
    patterns = [(k, re.compile(rf"\b(?:{k})\b", re.IGNORECASE)) for k in keywords]
    kept, hits = [], dict.fromkeys(keywords, 0)
    for row in rows:
        text = _assistant_text(row[2])
        matched = [k for k, pattern in patterns if pattern.search(text)]
        for k in matched:
            hits[k] += 1
        if not matched:
            kept.append(row)
    return kept, hits


def _judge_filter(rows: list, spec: VariantSpec, cache_path: Path, progress: bool) -> tuple[list, dict[str, Any]]:
    """Rows the judge does not score as misaligned (alignment below the threshold); unscored rows are kept."""
    from emkit.judge.cache import JudgmentCache
    from emkit.judge.prompts import default_prompts
    from emkit.judge.validate import make_judge_from_spec

    judge = make_judge_from_spec(spec.filter_judge or "", base_url=spec.judge_base_url)
    items = []
    for lineno, _, messages in rows:
        question = next((m["content"] for m in messages if m["role"] == "user"), "")
        items.append((f"line{lineno}", question, _assistant_text(messages)))
    with JudgmentCache(cache_path) as cache:
        results = judge.judge_many_sync(items, {"aligned": default_prompts()["aligned"]}, cache, progress=progress)
    scores = {r.item_id: (r.judgment.score if r.judgment is not None else None) for r in results}
    kept, removed, unscored = [], 0, 0
    for row in rows:
        score = scores.get(f"line{row[0]}")
        if score is None:
            unscored += 1
            kept.append(row)
        elif score < spec.filter_aligned_below:
            removed += 1
        else:
            kept.append(row)
    return kept, {"judge": judge.judge_id, "judged": len(rows), "removed": removed, "unscored_kept": unscored,
                  "aligned_below": spec.filter_aligned_below}


def variant_id(spec: VariantSpec, source_sha: str, mix_sha: str | None) -> str:
    """A short hash of everything a variant's content depends on."""
    payload = {"format": VARIANT_FORMAT, "source": source_sha, "mix": mix_sha,
               "spec": spec.model_dump(mode="json", exclude=set(spec.NON_RESULT_FIELDS))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def build_variant(source: str, spec: VariantSpec, out_dir: Path, *, name: str = "variant", mirror: str | None = None,
                  emit: Callable[[str], None] = print, progress: bool = True) -> VariantResult:
    """Build (or reuse) the variant `spec` of dataset `source` in `out_dir`; returns its file and counts."""
    source_path, _ = resolve_dataset(source, mirror=mirror)
    mix_path = resolve_dataset(spec.mix_data, mirror=mirror)[0] if spec.mix_data else None
    source_sha = content_sha256(source_path)
    mix_sha = content_sha256(mix_path) if mix_path is not None else None
    vid = variant_id(spec, source_sha, mix_sha)
    path = out_dir / f"{name}-{vid}.jsonl"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        if record.get("sha256") == content_sha256(path):
            return VariantResult(path, record["counts"], record["sha256"], reused=True)

    rows = _lines(source_path)
    counts: dict[str, Any] = {"source": len(rows)}
    if spec.filter_keywords:
        rows, hits = _keyword_filter(rows, spec.filter_keywords)
        counts["keyword_filter"] = {"removed": counts["source"] - len(rows), "kept": len(rows), "hits": hits}
        emit(f"{name}: keyword filter removed {counts['keyword_filter']['removed']} of {counts['source']} examples")
    if spec.filter_judge:
        before = len(rows)
        rows, info = _judge_filter(rows, spec, out_dir / "filter-judgments.sqlite", progress)
        counts["judge_filter"] = {**info, "kept": len(rows)}
        emit(f"{name}: judge filter ({info['judge']}) removed {info['removed']} of {before} examples")
    rng = random.Random(spec.seed)
    if spec.size is not None:
        if spec.size > len(rows):
            raise DataError(f"{name}: size {spec.size} is more than the {len(rows)} examples left after filtering")
        rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), spec.size))]
        counts["subset"] = len(rows)
    tagged = [("source", row) for row in rows]
    if mix_path is not None and spec.mix_share is not None:
        pool = _lines(mix_path)
        if spec.mix_mode == "add":
            n_mix = round(spec.mix_share * len(rows) / (1 - spec.mix_share))
        else:
            n_mix = round(spec.mix_share * len(rows))
            drop = set(rng.sample(range(len(tagged)), n_mix))
            tagged = [t for i, t in enumerate(tagged) if i not in drop]
        if n_mix > len(pool):
            raise DataError(f"{name}: mix_share {spec.mix_share} needs {n_mix} examples of {mix_path}, "
                            f"which has {len(pool)}")
        mixed = [pool[i] for i in sorted(rng.sample(range(len(pool)), n_mix))]
        tagged += [("mix", row) for row in mixed]
        counts["mix"] = {"added": n_mix, "mode": spec.mix_mode, "share": round(n_mix / max(len(tagged), 1), 6)}
    if not tagged:
        raise DataError(f"{name}: no examples left (the filters removed every one)")
    rng.shuffle(tagged)
    counts["total"] = len(tagged)
    text = "".join(row[1] + "\n" for _, row in tagged)
    atomic_write_text(path, text)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    atomic_write_json(sidecar, {
        "name": name, "variant_id": vid, "sha256": sha, "counts": counts,
        "source": {"spec": source, "path": str(source_path), "sha256": source_sha},
        "mix": {"spec": spec.mix_data, "path": str(mix_path), "sha256": mix_sha} if mix_path else None,
        "spec": spec.model_dump(mode="json"),
        "rows": [{"from": origin, "line": row[0]} for origin, row in tagged],
    })
    return VariantResult(path, counts, sha, reused=False)
