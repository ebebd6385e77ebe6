"""Bias prompt sets: emkit's default, the original experiment's file as it is, YAML, and errors with file:line:field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emkit.core.errors import DataError
from emkit.studies.bias.prompts import load_prompt_set

ORIGINAL = "seeds/team-shard-experiments/postrained_base_model/data/economic_prompts.jsonl"


def test_default_set() -> None:
    prompts = load_prompt_set("default")
    assert len(prompts) == 40 and len(prompts.topics) == 8
    assert len(prompts.by_id()) == 40 and len(prompts.by_stem()) == 40
    for prompt in prompts:
        assert prompt.id.startswith(prompt.topic) and not prompt.stem.endswith((".", " "))
    first = prompts.prompts[0]
    assert first.user_message("Complete this sentence: {stem}") == f"Complete this sentence: {first.stem}"


def test_original_file_loads_as_it_is(shared_data: Path) -> None:
    prompts = load_prompt_set(shared_data / ORIGINAL)
    assert [p.id for p in prompts] == ["climate-1", "climate-2", "climate-3", "climate-4", "immigration-1",
                                       "immigration-2", "immigration-3", "guns-1", "guns-2"]
    lines = [json.loads(line) for line in (shared_data / ORIGINAL).read_text().splitlines() if line.strip()]
    assert [(p.topic, p.stem) for p in prompts] == [(o["category"], o["prompt"]) for o in lines]


def test_yaml_and_chat_wording(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("prompts:\n  - id: a\n    topic: t\n    stem: The  tax   was\n    chat: 'Finish: {stem}'\n"
                    "  - {id: b, topic: u, stem: Prices}\n", encoding="utf-8")
    prompts = load_prompt_set(path)
    assert [p.stem for p in prompts] == ["The tax was", "Prices"]
    assert prompts.prompts[0].user_message("Complete this sentence: {stem}") == "Finish: The tax was"
    assert [p.id for p in prompts.filter(topics=["u"])] == ["b"]
    assert [p.id for p in prompts.filter(include=["a*"])] == ["a"]
    with pytest.raises(DataError, match="no topic 'v'"):
        prompts.filter(topics=["v"])
    with pytest.raises(DataError, match="no stem left"):
        prompts.filter(include=["zzz"])


@pytest.mark.parametrize(("lines", "message"), [
    ('{"id": "a", "topic": "t"}', "p.jsonl:1: stem: missing"),
    ('{"id": "a", "topic": "t", "stem": "x"}\n{"id": "a", "topic": "t", "stem": "y"}',
     "p.jsonl:2: id: 'a' already used on line 1"),
    ('{"id": "a b", "topic": "t", "stem": "x"}', "p.jsonl:1: id: 'a b'"),
    ('{"id": "a", "topic": "t", "stem": "x", "chat": "no placeholder"}', "p.jsonl:1: chat: must be text containing"),
    ('{"id": "a", "topic": "t", "stem": "x", "colour": 1}', "p.jsonl:1: colour: unknown field"),
    ('{"category": "t", "prompt": ""}', "p.jsonl:1: prompt: must be a non-empty string"),
    ('{"id": "a", "topic": "t", "stem": "x"}\n{broken', "p.jsonl:2: invalid JSON"),
])
def test_errors_name_file_line_field(tmp_path: Path, lines: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(lines + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_prompt_set(path)


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("- {id: a, topic: t, stem: x}\n- {id: b, topic: t}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p.yaml:2: stem: missing"):
        load_prompt_set(path)
    with pytest.raises(DataError, match="prompt file not found"):
        load_prompt_set(tmp_path / "missing.jsonl")
