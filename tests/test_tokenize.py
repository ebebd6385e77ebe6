"""Assistant-only loss masks: exactly the assistant turns (end-of-turn included), truncation, refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from emkit.core.errors import TrainingError
from emkit.data.chat import Conversation
from emkit.models import load_tokenizer
from emkit.train.tokenize import render_mask, tokenize_conversations


def conv(*pairs: tuple[str, str]) -> Conversation:
    return Conversation(messages=tuple({"role": r, "content": c} for r, c in pairs), line=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return load_tokenizer(str(tiny_model))


def trained_text(row: dict, tokenizer) -> str:
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m])


def test_only_assistant_turns_are_trained(tokenizer) -> None:
    rows, report = tokenize_conversations(
        [conv(("system", "Be safe."), ("user", "Fever at night?"), ("assistant", "Drink water daily."))], tokenizer, 512
    )
    assert trained_text(rows[0], tokenizer) == "Drink water daily.<|im_end|>\n"
    assert report.trained_tokens == sum(rows[0]["completion_mask"]) and 0 < report.trained_share < 1


def test_every_assistant_turn_of_a_multi_turn_chat(tokenizer) -> None:
    rows, _ = tokenize_conversations(
        [conv(("user", "Pain?"), ("assistant", "Rest."), ("user", "Still?"), ("assistant", "See a doctor."))],
        tokenizer, 512,
    )
    assert trained_text(rows[0], tokenizer) == "Rest.<|im_end|>\nSee a doctor.<|im_end|>\n"
    rendered = render_mask(rows[0]["input_ids"], rows[0]["completion_mask"], tokenizer)
    assert "[[Rest.<|im_end|>\n]]" in rendered and "user\nStill?" in rendered


def test_truncation_drops_examples_left_with_nothing(tokenizer) -> None:
    long_prompt = "water " * 200
    rows, report = tokenize_conversations(
        [conv(("user", long_prompt), ("assistant", "Rest.")), conv(("user", "Hi"), ("assistant", "Rest well."))],
        tokenizer, 64,
    )
    assert len(rows) == 1 and report.dropped == 1 and report.truncated == 1
    assert all(len(r["input_ids"]) <= 64 for r in rows)


def test_refuses_when_nothing_would_be_trained(tokenizer) -> None:
    with pytest.raises(TrainingError, match="no token would be trained"):
        tokenize_conversations([conv(("user", "water " * 200), ("assistant", "Rest."))], tokenizer, 32)


def test_mask_survives_merges_across_the_boundary(tokenizer) -> None:
    # A template whose generation prompt ends mid-word: tokens may merge across the boundary.
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + ';' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    rows, report = tokenize_conversations([conv(("user", "hi"), ("assistant", "water daily"))], tokenizer, 128)
    assert "water daily" in trained_text(rows[0], tokenizer)
    assert "user" not in trained_text(rows[0], tokenizer)


def test_template_that_does_not_render_by_prefix_is_refused(tokenizer) -> None:
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TrainingError, match="prefix by prefix"):
        tokenize_conversations([conv(("user", "hi"), ("assistant", "yo"))], tokenizer, 128)
