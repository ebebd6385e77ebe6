"""Judgment cache keys name the endpoint and the scoring method: no collision between two servers of
one model name, no text judgment taken for a logprob one, old caches upgraded with their keys a miss,
and a judging stage that says when a run's scores mix methods."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_openai_server import FakeOpenAIServer

from emkit.core.rowfile import append_rows
from emkit.judge import JudgeItem, JudgmentCache, OpenAIJudge, judgment_key
from emkit.judge.cache import endpoint_identity
from emkit.judge.config import JudgeConfig

KEY_ENV = "EMKIT_TEST_JUDGE_KEY"
PROMPTS = {"aligned": "aligned|{question}|{answer}"}


def centred(n: int) -> dict[str, float]:
    """A judge distribution whose score is exactly n."""
    return {str(n): 1.0}


@pytest.fixture
def servers() -> Iterator[list[FakeOpenAIServer]]:
    """Servers started by a test are always stopped."""
    started: list[FakeOpenAIServer] = []
    yield started
    for server in started:
        server.stop()


def serve(servers: list[FakeOpenAIServer], **kwargs: Any) -> FakeOpenAIServer:
    """Start a fake server and register it for teardown."""
    server = FakeOpenAIServer(**kwargs).start()
    servers.append(server)
    return server


def judge_for(server: FakeOpenAIServer, model: str = "judge-model", **kwargs: Any) -> OpenAIJudge:
    """A judge on the fake server with short timeouts."""
    return OpenAIJudge(model=model, base_url=server.base_url, api_key_env=KEY_ENV, concurrency=1, max_attempts=2,
                       timeout=2.0, backoff_base=0.01, backoff_max=0.02, **kwargs)


def items(n: int) -> list[JudgeItem]:
    """n distinct answers."""
    return [JudgeItem(f"id{i}", f"q{i}", f"a{i}") for i in range(n)]


def test_same_model_on_two_endpoints_does_not_collide(servers: list, tmp_path: Path) -> None:
    # e.g. one model name served in full precision and quantised: their scores must stay apart
    full = serve(servers, probs=lambda prompt: centred(80))
    quantised = serve(servers, probs=lambda prompt: centred(20))
    with JudgmentCache(tmp_path / "judgments.sqlite") as cache:
        first = judge_for(full).judge_many_sync(items(3), PROMPTS, cache, progress=False)
        second = judge_for(quantised).judge_many_sync(items(3), PROMPTS, cache, progress=False)
        again = judge_for(full).judge_many_sync(items(3), PROMPTS, cache, progress=False)
        assert cache.count() == 6
        assert {(e, m) for _, e, m, _ in cache.identities("judge-model")} == {
            (endpoint_identity(full.base_url), "logprobs"), (endpoint_identity(quantised.base_url), "logprobs")}
    assert [r.score for r in first] == [80.0] * 3 and [r.score for r in again] == [80.0] * 3
    assert quantised.count == 3 and not any(r.cached for r in second)
    assert [r.score for r in second] == [20.0] * 3
    assert full.count == 3 and all(r.cached for r in again)


def test_text_fallback_is_not_reused_by_a_logprob_pass(servers: list, tmp_path: Path) -> None:
    server = serve(servers, probs=lambda prompt: centred(70), default="nologprobs", text_reply=lambda p: "40")
    with JudgmentCache(tmp_path / "judgments.sqlite") as cache:
        text = judge_for(server).judge_many_sync(items(3), PROMPTS, cache, progress=False)
        assert all(r.judgment.method == "text" and r.score == 40.0 for r in text)
        server.default = "ok"  # the endpoint now gives logprobs (e.g. a server upgraded between passes)
        before = server.count
        logprob = judge_for(server).judge_many_sync(items(3), PROMPTS, cache, progress=False)
        assert server.count - before == 3 and not any(r.cached for r in logprob)
        assert all(r.judgment.method == "logprobs" and r.score == 70.0 for r in logprob)
        # both kinds are kept, under their own keys
        assert {r.key for r in text}.isdisjoint({r.key for r in logprob}) and cache.count() == 6


def test_text_only_endpoint_reuses_its_text_judgments_on_resume(servers: list, tmp_path: Path) -> None:
    server = serve(servers, probs=lambda prompt: centred(70), default="reject_logprobs", text_reply=lambda p: "40")
    with JudgmentCache(tmp_path / "judgments.sqlite") as cache:
        judge_for(server).judge_many_sync(items(4), PROMPTS, cache, progress=False)
        asked = server.count
        assert asked == 5  # one refused logprob request, then four text requests
        # a fresh judge learns again that the endpoint gives no logprobs (one request), then reads the cache
        again = judge_for(server).judge_many_sync(items(4), PROMPTS, cache, progress=False)
    assert server.count - asked == 1
    assert all(r.cached and r.judgment.method == "text" and r.score == 40.0 for r in again)


def test_endpoint_identity_drops_credentials_and_query() -> None:
    same = {endpoint_identity(u) for u in ("https://API.example.com/v1/", "https://api.example.com:443/v1",
                                           "https://user:secret@api.example.com/v1?api-key=secret#x")}
    assert same == {"https://api.example.com/v1"}
    assert endpoint_identity("http://127.0.0.1:8000/v1") != endpoint_identity("http://127.0.0.1:8001/v1")
    key = judgment_key("m", "aligned", "p", endpoint="https://api.example.com/v1", method="logprobs")
    assert key != judgment_key("m", "aligned", "p", endpoint="https://api.example.com/v1", method="text")


SCHEMA_1 = """
CREATE TABLE judgments (key TEXT PRIMARY KEY, judge TEXT NOT NULL, metric TEXT NOT NULL, score REAL, mass REAL,
    method TEXT NOT NULL, reason TEXT, raw TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,
    cost REAL, attempts INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_schema_1_cache_is_upgraded_and_its_old_keys_are_judged_again(servers: list, tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "judgments.sqlite"
    server = serve(servers, probs=lambda prompt: centred(80))
    old_rows = []
    for item in items(2):
        prompt = PROMPTS["aligned"].format(question=item.question, answer=item.answer)
        # the key an emkit before endpoint and method keyed judgments: sha256 of (judge, metric, prompt)
        payload = json.dumps(["judge-model", "aligned", prompt], ensure_ascii=False, separators=(",", ":"))
        old_rows.append((hashlib.sha256(payload.encode()).hexdigest(), "judge-model", "aligned", 5.0, 1.0, "text",
                         None, '"5"', None, None, None, 1, "2024-01-01T00:00:00"))
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA_1)
        conn.executemany("INSERT INTO judgments VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", old_rows)
    with JudgmentCache(path) as cache:
        assert cache.legacy_count() == 2 and cache.count() == 2  # kept, readable
        assert cache._conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == "2"
        results = judge_for(server).judge_many_sync(items(2), PROMPTS, cache, progress=False)
        assert server.count == 2 and [r.score for r in results] == [80.0, 80.0]  # not the old text scores
        assert cache.count() == 4 and cache.legacy_count() == 2
    with JudgmentCache(path) as reopened:  # a second open of the upgraded file changes nothing
        assert reopened.count() == 4 and reopened.legacy_count() == 2


def write_run(run: Path, n: int) -> None:
    """A run folder with n answers to two questions."""
    append_rows(run / "generations.jsonl", [
        {"id": f"r{i}", "model": "organism", "condition": "none", "question_id": f"q{i % 2}", "paraphrase": 0,
         "sample": i, "question": f"question {i % 2}", "system": None, "answer": f"answer {i}"}
        for i in range(n)])


def test_judge_stage_says_when_scores_mix_methods(servers: list, tmp_path: Path) -> None:
    from emkit.stages.judge import judge_stage, load_stats

    # the endpoint gives logprobs, except once: that answer is scored from text
    server = serve(servers, probs=lambda prompt: centred(60), script=["ok", "nologprobs"], text_reply=lambda p: "55")
    run = tmp_path / "run"
    write_run(run, 3)
    cfg = JudgeConfig(judge="openai", judge_model="judge-model", base_url=server.base_url, api_key_env=KEY_ENV,
                      concurrency=1)
    messages: list[str] = []
    result = judge_stage(run, cfg, emit=messages.append, progress=False)
    info = load_stats(run)["judge"]
    assert info["methods"] == {"logprobs": 5, "text": 1} == result["judge"]["methods"]
    assert "more than one scoring method" in info["methods_note"] and "more than one scoring method" in info["note"]
    assert any(m.startswith("WARNING:") and "text: 1" in m for m in messages)
    assert info["endpoint"] == endpoint_identity(server.base_url)
