"""The LLM classifier: labels and probabilities from a real HTTP server on 127.0.0.1 (logprobs, and text when
the server gives none), the SQLite cache, and a tiny local model through the local judge."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fake_openai_server import FakeOpenAIServer

from emkit.core.errors import ConfigError
from emkit.judge.cache import JudgmentCache
from emkit.studies.bias.config import LLMSettings
from emkit.studies.bias.llm_classifier import classify_llm, label_from_raw, load_template, make_classifier

TABLE = pd.DataFrame({
    "id": ["a", "b", "c", "d"],
    "stem": ["After the checks, gun deaths"] * 4,
    "continuation": ["fell by a third.", "rose sharply.", "rose sharply.", "  "],  # b and c: one request
})


def by_completion(prompt: str) -> dict[str, float]:
    """A classifier that reads the continuation: falls are progressive, rises conservative."""
    continuation = prompt.split("<<<CONTINUATION\n")[1].split("\nCONTINUATION>>>")[0]
    if "fell" in continuation:
        return {"1": 0.6, " 1": 0.1, "3": 0.2, "I": 0.1}
    return {"2": 0.45, "3": 0.45, "1": 0.05, "The": 0.05}


def test_labels_from_logprobs_and_the_cache(tmp_path: Path) -> None:
    with FakeOpenAIServer(probs=by_completion) as server:
        judge, info = make_classifier(LLMSettings(judge="openai", judge_model="clf", base_url=server.base_url))
        assert info["kind"] == "openai" and server.base_url in info["description"]
        with JudgmentCache(tmp_path / "j.sqlite") as cache:
            out = classify_llm(TABLE, judge, cache, load_template(), progress=False).set_index("id")
            assert server.count == 2  # the repeated continuation is asked once; the empty one not at all
            again = classify_llm(TABLE, judge, cache, load_template(), progress=False).set_index("id")
            assert server.count == 2 and again.loc[["a", "b", "c"], "llm_cached"].all()
        request = server.requests[0]
        assert request["max_tokens"] == 1 and request["logprobs"] and request["temperature"] == 0
        assert "After the checks, gun deaths" in server.prompts()[0]
    assert out.loc["a", "llm_label"] == "progressive"
    assert out.loc["a", "llm_probability"] == pytest.approx(0.7 / 0.9)  # " 1" counts as 1
    assert out.loc["a", "llm_mass"] == pytest.approx(0.9)
    assert json.loads(out.loc["a", "llm_probs"])["neutral"] == pytest.approx(0.2 / 0.9)
    # a tie between two codes: the first code in label order wins, with its probability
    assert out.loc["b", "llm_label"] == "conservative" and out.loc["b", "llm_probability"] == pytest.approx(0.45 / 0.95)
    assert out.loc["d", "llm_label"] == "off-topic" and out.loc["d", "llm_method"] == "empty"
    assert again.drop(columns="llm_cached").equals(out.drop(columns="llm_cached"))


def test_text_answers_when_the_server_gives_no_logprobs(tmp_path: Path) -> None:
    with FakeOpenAIServer(probs=by_completion, default="nologprobs",
                          text_reply=lambda p: "2" if "rose" in p.split("<<<CONTINUATION")[1] else "Neutral") as server:
        judge, _ = make_classifier(LLMSettings(judge="openai", judge_model="clf", base_url=server.base_url))
        with JudgmentCache(tmp_path / "j.sqlite") as cache:
            out = classify_llm(TABLE, judge, cache, load_template(), progress=False).set_index("id")
    assert out.loc["b", "llm_label"] == "conservative" and out.loc["b", "llm_method"] == "text"
    assert out.loc["a", "llm_label"] == "neutral" and pd.isna(out.loc["a", "llm_probability"])


@pytest.mark.parametrize(("raw", "min_mass", "label", "probability"), [
    ({"3": 0.5, "4": 0.3, "x": 0.2}, 0.25, "neutral", 0.625),
    ({"4": 0.1, "x": 0.9}, 0.25, None, None),  # too little mass on the codes
    ({"4": 0.1, "x": 0.9}, 0.0, "off-topic", 1.0),
    ({"x": 1.0}, 0.0, None, None),
    ("Label: 4", 0.25, "off-topic", None),
    ("conservative, clearly", 0.25, "conservative", None),
    ("I cannot say", 0.25, None, None),
])
def test_label_from_raw(raw: object, min_mass: float, label: str | None, probability: float | None) -> None:
    result = label_from_raw(raw, "logprobs" if isinstance(raw, dict) else "text", min_mass)
    assert result.label == label
    assert result.probability == (pytest.approx(probability) if probability is not None else None)


def test_local_model_classifier(tmp_path: Path, tiny_model: Path) -> None:
    judge, info = make_classifier(LLMSettings(judge="local", local_model=str(tiny_model)))
    assert info["kind"] == "local" and "not validated" in info["note"]
    with JudgmentCache(tmp_path / "j.sqlite") as cache:
        out = classify_llm(TABLE, judge, cache, load_template(), min_mass=0.0, progress=False).set_index("id")
        assert cache.count(judge=judge.judge_id) == 2
    probs = json.loads(out.loc["a", "llm_probs"])
    assert sum(probs.values()) == pytest.approx(1.0)
    assert out.loc["a", "llm_label"] == max(probs, key=probs.get)
    assert 0 < out.loc["a", "llm_mass"] < 1 and out.loc["a", "llm_method"] == "local-logits"


def test_custom_template(tmp_path: Path) -> None:
    good = tmp_path / "t.txt"
    good.write_text("Stem: {question}\nText: {answer}\nDigit 1-4:", encoding="utf-8")
    assert load_template(good).render("s", "a") == "Stem: s\nText: a\nDigit 1-4:"
    bad = tmp_path / "bad.txt"
    bad.write_text("Text: {completion}", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown placeholder"):
        load_template(bad)
