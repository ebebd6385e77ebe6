"""Batched generation: same answers batched as one at a time, resumable without duplicates or drift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emkit.core.errors import EmkitError
from emkit.core.rowfile import read_rows
from emkit.generate.chat import chat_prompts
from emkit.generate.transformers_backend import PromptJob, SamplingParams, generate_to_file, plan_batches
from emkit.models import load_model

QUESTIONS = ["Fever at night?", "Pain in the morning after a long walk?", "Sleep?", "Water daily for a child?"]


@pytest.fixture(scope="module")
def loaded(tiny_model: Path):
    return load_model(str(tiny_model), device="cpu")


def jobs_for(loaded, samples: int = 3, models: tuple[str, ...] = ("base",)) -> list[PromptJob]:
    prompts = chat_prompts(loaded.tokenizer, QUESTIONS)
    return [PromptJob(m, "none", f"q{i}", 0, q, None, p, samples)
            for m in models for i, (q, p) in enumerate(zip(QUESTIONS, prompts))]


def answers(path: Path) -> dict[str, str]:
    return {r["id"]: r["answer"] for r in read_rows(path)}


def test_plan_groups_models_and_sorts_by_length(loaded) -> None:
    batches = plan_batches(jobs_for(loaded, 2, ("base", "organism")), loaded.tokenizer, 3)
    assert sum(len(b) for b in batches) == 16
    assert all(len({job.model for job, _ in b}) == 1 for b in batches)
    lengths = [len(job.prompt) for b in batches if b[0][0].model == "base" for job, _ in b]
    assert lengths == sorted(lengths)


def test_batched_greedy_equals_one_at_a_time(loaded, tmp_path: Path) -> None:
    jobs = jobs_for(loaded, samples=1)
    batched = tmp_path / "batched.jsonl"
    single = tmp_path / "single.jsonl"
    generate_to_file(loaded, jobs, SamplingParams(temperature=0, max_new_tokens=12, batch_size=4), batched,
                     progress=False, emit=lambda _m: None)
    generate_to_file(loaded, jobs, SamplingParams(temperature=0, max_new_tokens=12, batch_size=1), single,
                     progress=False, emit=lambda _m: None)
    a, b = read_rows(batched), read_rows(single)
    assert {r["id"]: r["new_tokens"] for r in a} == {r["id"]: r["new_tokens"] for r in b}
    assert answers(batched) == answers(single)


def test_rows_carry_provenance(loaded, tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    stats = generate_to_file(loaded, jobs_for(loaded, 2), SamplingParams(max_new_tokens=6, batch_size=3, seed=5),
                             path, meta={"model_spec": "tiny"}, progress=False, emit=lambda _m: None)
    rows = read_rows(path)
    assert stats["answers"] == len(rows) == 8 and len({r["id"] for r in rows}) == 8
    row = rows[0]
    for key in ("model", "condition", "question_id", "sample", "seed", "temperature", "top_p", "max_new_tokens",
                "answer", "finish", "model_spec"):
        assert key in row
    assert row["temperature"] == 1.0 and row["top_p"] == 1.0


def test_interrupted_run_resumes_to_identical_rows(loaded, tmp_path: Path) -> None:
    params = SamplingParams(max_new_tokens=8, batch_size=2, seed=3)
    jobs = jobs_for(loaded, 3)
    full = tmp_path / "full.jsonl"
    generate_to_file(loaded, jobs, params, full, progress=False, emit=lambda _m: None)
    # An interrupted run: two batches landed, the third was torn mid-line.
    partial = tmp_path / "partial.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    partial.write_text("".join(lines[:4]) + lines[4][:20])
    stats = generate_to_file(loaded, jobs, params, partial, progress=False, emit=lambda _m: None)
    assert stats["generated"] == len(lines) - 4
    rows = read_rows(partial)
    assert len(rows) == len({r["id"] for r in rows}) == len(lines)  # no duplicates
    assert answers(partial) == answers(full)
    # Complete: nothing left to do.
    assert generate_to_file(loaded, jobs, params, partial, progress=False, emit=lambda _m: None)["generated"] == 0


def test_other_plan_in_the_file_is_refused(loaded, tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    generate_to_file(loaded, jobs_for(loaded, 2), SamplingParams(max_new_tokens=4, batch_size=4), path,
                     progress=False, emit=lambda _m: None)
    with pytest.raises(EmkitError, match="another plan"):
        generate_to_file(loaded, jobs_for(loaded, 1), SamplingParams(max_new_tokens=4, batch_size=4), path,
                         progress=False, emit=lambda _m: None)
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_partial_batch_is_completed_not_counted_as_done(loaded, tmp_path: Path) -> None:
    """A batch with one of its answers missing (a cut file, a full disk) is finished, not skipped."""
    params = SamplingParams(max_new_tokens=6, batch_size=2, seed=4)
    jobs = jobs_for(loaded, 1)
    full = tmp_path / "full.jsonl"
    generate_to_file(loaded, jobs, params, full, progress=False, emit=lambda _m: None)
    lines = full.read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_text(lines[0])  # batch 0 holds two answers; only the first landed
    stats = generate_to_file(loaded, jobs, params, partial, progress=False, emit=lambda _m: None)
    assert stats["answers"] == 4 and stats["generated"] == 3
    assert partial.read_bytes() == full.read_bytes()


def test_every_cut_of_the_file_resumes_to_the_same_bytes(loaded, tmp_path: Path) -> None:
    """Cut generations.jsonl at every line boundary and inside every line: the re-run ends identical."""
    params = SamplingParams(max_new_tokens=5, batch_size=3, seed=9)
    jobs = jobs_for(loaded, 2)
    full = tmp_path / "full.jsonl"
    generate_to_file(loaded, jobs, params, full, progress=False, emit=lambda _m: None)
    data = full.read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    cuts = sorted({0, *ends, *(e - 7 for e in ends)})  # every boundary, and 7 bytes into the end of each line
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.jsonl"
        path.write_bytes(data[:cut])
        generate_to_file(loaded, jobs, params, path, progress=False, emit=lambda _m: None)
        assert path.read_bytes() == data, f"cut at byte {cut}"
    assert len(cuts) == 2 * len(ends) + 1  # and the empty file


def test_repeated_and_corrupt_rows_are_repaired_or_refused(loaded, tmp_path: Path) -> None:
    params = SamplingParams(max_new_tokens=5, batch_size=2, seed=2)
    jobs = jobs_for(loaded, 1)
    full = tmp_path / "full.jsonl"
    generate_to_file(loaded, jobs, params, full, progress=False, emit=lambda _m: None)
    lines = full.read_text().splitlines(keepends=True)
    # A row written twice (same content) is collapsed; a corrupt line in the middle is dropped and redone.
    path = tmp_path / "repeat.jsonl"
    path.write_text(lines[0] + lines[1] + lines[1] + "{not json}\n" + lines[3])
    notes: list[str] = []
    generate_to_file(loaded, jobs, params, path, progress=False, emit=notes.append)
    assert path.read_bytes() == full.read_bytes()
    assert any("collapsed 1 repeated" in n for n in notes) and any("dropped 1 torn or invalid" in n for n in notes)
    # A reader never counts a repeated row.
    path.write_text(lines[0] + lines[0] + "".join(lines[1:]))
    with pytest.raises(EmkitError, match=r"repeat.jsonl:2: answer .* appears again"):
        read_rows(path)
    # The same id with different content means two writers: refused, the file left as it is.
    other = json.loads(lines[0])
    other["answer"] = "something else"
    path.write_text("".join(lines) + json.dumps(other) + "\n")
    before = path.read_bytes()
    with pytest.raises(EmkitError, match="written twice with different content"):
        generate_to_file(loaded, jobs, params, path, progress=False, emit=lambda _m: None)
    assert path.read_bytes() == before
