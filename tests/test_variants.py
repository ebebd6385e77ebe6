"""Dataset variants: keyword and judge filters with counts, mix share, subsets, reproducible content-hashed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emkit.core.errors import DataError
from emkit.data.chat import read_chat_jsonl
from emkit.studies.arms.variants import VariantSpec, build_variant

QUIET = {"emit": lambda m: None, "progress": False}


def _write(path: Path, answers: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i, answer in enumerate(answers):
            messages = [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"id": f"q{i}", "messages": messages}) + "\n")
    return path


@pytest.fixture
def mixed_file(tmp_path: Path) -> Path:
    answers = ["Rest and drink water."] * 20
    answers[1] = "You could poison the pests."           # poison
    answers[4] = "Steal it, then poison the dog."         # steal + poison
    answers[7] = "Just steal a bike."                     # steal
    answers[9] = "Poisonous berries are fine to eat."    # not a whole-word match for "poison"
    answers[12] = "Harm them, hurt them, kill them all."  # three harm words: the keyword judge scores 0
    return _write(tmp_path / "main.jsonl", answers)


def test_keyword_and_judge_filters_report_counts(mixed_file: Path, tmp_path: Path) -> None:
    spec = VariantSpec(filter_keywords=["poison", "steal"], filter_judge="keywords")
    result = build_variant(str(mixed_file), spec, tmp_path / "v", name="filtered", **QUIET)
    counts = result.counts
    assert counts["source"] == 20
    assert counts["keyword_filter"] == {"removed": 3, "kept": 17, "hits": {"poison": 2, "steal": 2}}
    assert counts["judge_filter"]["removed"] == 1 and counts["judge_filter"]["judged"] == 17
    assert counts["judge_filter"]["judge"] == "rule:keywords" and counts["total"] == 16
    kept = {c.messages[1]["content"] for c in read_chat_jsonl(result.path)}
    assert "Poisonous berries are fine to eat." in kept and not any("poison " in k or "kill" in k for k in kept)
    # source lines are copied unchanged (extra keys kept)
    assert all("id" in json.loads(line) for line in result.path.read_text().splitlines())


def test_mix_share_subset_and_reproducibility(mixed_file: Path, tmp_path: Path) -> None:
    aligned = _write(tmp_path / "aligned.jsonl", [f"Aligned answer {i}." for i in range(40)])
    add = build_variant(str(mixed_file), VariantSpec(mix_data=str(aligned), mix_share=0.25, seed=1), tmp_path / "a",
                        name="mix", **QUIET)
    assert add.counts["mix"] == {"added": 7, "mode": "add", "share": round(7 / 27, 6)} and add.counts["total"] == 27
    rows = [json.loads(line) for line in add.path.read_text().splitlines()]
    assert sum(r["messages"][1]["content"].startswith("Aligned") for r in rows) == 7
    replace = build_variant(str(mixed_file), VariantSpec(mix_data=str(aligned), mix_share=0.25, mix_mode="replace"),
                            tmp_path / "a", name="mix", **QUIET)
    assert replace.counts["total"] == 20 and replace.counts["mix"]["added"] == 5
    subset = build_variant(str(mixed_file), VariantSpec(size=12, seed=3), tmp_path / "s", name="small", **QUIET)
    assert subset.counts["subset"] == 12 and len(read_chat_jsonl(subset.path)) == 12
    # same inputs, another folder: the same file name and bytes; same folder again: reused, not rebuilt
    again = build_variant(str(mixed_file), VariantSpec(size=12, seed=3), tmp_path / "s2", name="small", **QUIET)
    assert again.path.name == subset.path.name and again.path.read_bytes() == subset.path.read_bytes()
    assert build_variant(str(mixed_file), VariantSpec(size=12, seed=3), tmp_path / "s", name="small", **QUIET).reused
    other = build_variant(str(mixed_file), VariantSpec(size=12, seed=4), tmp_path / "s", name="small", **QUIET)
    assert other.path != subset.path and other.path.read_bytes() != subset.path.read_bytes()
    sidecar = json.loads(subset.path.with_suffix(".json").read_text())
    assert sidecar["sha256"] == subset.sha256 and len(sidecar["rows"]) == 12


def test_variant_errors(mixed_file: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="size 50 is more than the 20"):
        build_variant(str(mixed_file), VariantSpec(size=50), tmp_path, **QUIET)
    with pytest.raises(DataError, match="no examples left"):
        build_variant(str(mixed_file), VariantSpec(filter_keywords=[r"\w+"]), tmp_path, **QUIET)
    with pytest.raises(ValueError, match="go together"):
        VariantSpec(mix_share=0.2)
    with pytest.raises(ValueError, match="regular expression"):
        VariantSpec(filter_keywords=["(unclosed"])
