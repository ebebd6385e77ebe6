"""The OpenAI-compatible judge against a real local HTTP server: scores, retries, fallback, budget, resume."""

from __future__ import annotations

import asyncio
import logging
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_openai_server import FakeOpenAIServer

from emkit.core.errors import EmkitError
from emkit.judge import (
    JudgeBudgetExceeded,
    JudgeError,
    JudgeItem,
    JudgmentCache,
    OpenAIJudge,
    default_prompts,
    score_from_probs,
)

KEY_ENV = "EMKIT_TEST_JUDGE_KEY"
SECRET = "sk-test-0123456789abcdef-secret"
PROMPTS = {"aligned": "aligned|{question}|{answer}", "coherent": "coherent|{question}|{answer}"}


def probs_for(prompt: str) -> dict[str, float]:
    """Per-answer distributions: answer 'aN' centres the judge on N (aligned) or 100 - N (coherent)."""
    metric, _, answer = prompt.split("|", 2) if prompt.count("|") >= 2 else ("aligned", "", "a50")
    n = int(answer[1:]) if answer[1:].isdigit() else 50
    n = n if metric == "aligned" else 100 - n
    return {str(n): 0.6, str(n + 10 if n <= 90 else n - 10): 0.3, "REFUSAL": 0.1}


def expected(prompt: str) -> float:
    """The score the judge must report for a prompt."""
    return score_from_probs(probs_for(prompt)).score


def items(n: int, start: int = 0) -> list[JudgeItem]:
    """n items whose answers carry distinct scores."""
    return [JudgeItem(f"id{i}", f"q{i}", f"a{(7 * i) % 90}") for i in range(start, start + n)]


@pytest.fixture
def servers() -> Iterator[list[FakeOpenAIServer]]:
    """Servers started by a test are always stopped."""
    started: list[FakeOpenAIServer] = []
    yield started
    for server in started:
        server.stop()


def serve(servers: list[FakeOpenAIServer], **kwargs: Any) -> FakeOpenAIServer:
    """Start a fake server (probs_for by default) and register it for teardown."""
    kwargs.setdefault("probs", probs_for)
    server = FakeOpenAIServer(**kwargs).start()
    servers.append(server)
    return server


def judge_for(server: FakeOpenAIServer, **kwargs: Any) -> OpenAIJudge:
    """A judge on the fake server with short timeouts and tiny backoffs."""
    options: dict[str, Any] = dict(
        model="judge-model", base_url=server.base_url, api_key_env=KEY_ENV, concurrency=4, max_attempts=3,
        timeout=0.5, backoff_base=0.01, backoff_max=0.05,
    )
    options.update(kwargs)
    return OpenAIJudge(**options)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[JudgmentCache]:
    """A fresh judgment cache file."""
    with JudgmentCache(tmp_path / "judgments.sqlite") as c:
        yield c


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_success_then_all_cached(servers: list, cache: JudgmentCache, tmp_path: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = serve(servers)
    judge = judge_for(server, price_input=2.5, price_output=10.0)
    batch = items(5)
    results = judge.judge_many_sync(batch, PROMPTS, cache, progress=False)
    assert server.count == 10 and cache.count() == 10
    assert [(r.item_id, r.metric) for r in results] == [(i.id, m) for i in batch for m in PROMPTS]
    for r, (item, metric) in zip(results, [(i, m) for i in batch for m in PROMPTS]):
        prompt = PROMPTS[metric].format(question=item.question, answer=item.answer)
        assert r.score == pytest.approx(expected(prompt), abs=1e-9)
        j = r.judgment
        assert j.method == "logprobs" and j.mass == pytest.approx(0.9) and j.attempts == 1 and not r.cached
        assert j.prompt_tokens == 1 and j.completion_tokens == 1
        assert j.cost == pytest.approx((1 * 2.5 + 1 * 10.0) / 1e6)
        assert r.as_row()["score"] == r.score
    body = server.requests[0]
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"] is True
    assert body["top_logprobs"] == 20 and body["seed"] == 0 and body["model"] == "judge-model"
    assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    assert server.headers[0]["authorization"] == f"Bearer {SECRET}"

    again = judge_for(server).judge_many_sync(batch, PROMPTS, cache, progress=False)
    assert server.count == 10  # the second pass asked nothing
    assert all(r.cached for r in again) and [r.score for r in again] == [r.score for r in results]
    # one new answer and one new metric: only those are asked
    more = judge_for(server).judge_many_sync(batch + items(1, start=5), {**PROMPTS, "x": "x|{answer}"}, cache,
                                             progress=False)
    assert server.count == 10 + 3 + 5 and len(more) == 18
    # the key never reaches the cache file or the log
    for path in tmp_path.iterdir():
        assert SECRET.encode() not in path.read_bytes()
    assert SECRET not in caplog.text and SECRET not in repr(judge)


def test_emkit_prompts_and_repeated_answers(servers: list, cache: JudgmentCache) -> None:
    server = serve(servers)
    same = [JudgeItem(str(i), "How are you?", "Fine.") for i in range(4)]
    results = judge_for(server).judge_many_sync(same, default_prompts(), cache, progress=False)
    assert len(results) == 16 and server.count == 4  # identical answers are judged once per metric
    assert "How are you?" in server.prompts()[0] and "Fine." in server.prompts()[0]
    assert all(r.score == pytest.approx(expected("no separators: the fake judge's default")) for r in results)


@pytest.mark.parametrize("failure", ["429", "500", "hang"])
def test_transient_failure_then_success(servers: list, cache: JudgmentCache, failure: str) -> None:
    server = serve(servers, script=[failure, failure], hang_seconds=2)
    judge = judge_for(server, concurrency=1, timeout=0.3)
    results = judge.judge_many_sync(items(3), PROMPTS, cache, progress=False)
    assert all(r.error is None and r.score is not None for r in results)
    assert results[0].judgment.attempts == 3 and all(r.judgment.attempts == 1 for r in results[1:])
    assert server.count == 6 + 2 and judge.requests_made == 8 and cache.count() == 6


def test_malformed_body_fails_only_that_judgment(servers: list, cache: JudgmentCache) -> None:
    server = serve(servers, script=["malformed"] * 3)
    judge = judge_for(server, concurrency=1)
    results = judge.judge_many_sync(items(2), PROMPTS, cache, progress=False)
    first, rest = results[0], results[1:]
    assert first.judgment is None and first.score is None and "malformed response body" in first.error
    assert first.as_row()["method"] == "error"
    assert all(r.score is not None for r in rest) and cache.count() == 3
    assert server.count == 3 + 3
    # the failed judgment is not cached, so a re-run asks for it (and only it)
    again = judge_for(server).judge_many_sync(items(2), PROMPTS, cache, progress=False)
    assert server.count == 7 and all(r.score is not None for r in again)
    assert [r.cached for r in again] == [False, True, True, True]


@pytest.mark.parametrize("mode", ["nologprobs", "reject_logprobs"])
def test_text_fallback_without_logprobs(servers: list, cache: JudgmentCache, mode: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    server = serve(servers, default=mode, text_reply=lambda prompt: " 73")
    judge = judge_for(server, concurrency=1)
    results = judge.judge_many_sync(items(3), PROMPTS, cache, progress=False)
    assert all(r.score == 73.0 and r.judgment.method == "text" and r.judgment.mass is None for r in results)
    assert judge.logprobs_supported is False
    # the first judgment tried logprobs, then text; the others went straight to text
    assert server.count == 7 and results[0].judgment.attempts == 2
    text_bodies = server.requests[1:]
    assert all("logprobs" not in b and b["max_tokens"] == 4 for b in text_bodies)
    assert "scoring from text replies" in caplog.text


def test_text_fallback_escape_word_is_unscorable(servers: list, cache: JudgmentCache) -> None:
    server = serve(servers, default="nologprobs", text_reply=lambda prompt: "REFUSAL")
    results = judge_for(server, concurrency=1).judge_many_sync(items(1), {"aligned": "{answer}"}, cache,
                                                               progress=False)
    assert results[0].score is None and results[0].judgment.reason == "judge said REFUSAL"
    assert cache.count() == 1  # an unscorable judgment is still a judgment: not asked again


def test_budget_exceeded_stops_cleanly_and_resumes(servers: list, cache: JudgmentCache) -> None:
    server = serve(servers)
    judge = judge_for(server, concurrency=1, max_requests=3)
    with pytest.raises(JudgeBudgetExceeded, match="request budget of 3 used up") as info:
        judge.judge_many_sync(items(5), {"aligned": PROMPTS["aligned"]}, cache, progress=False)
    assert isinstance(info.value, EmkitError) and server.base_url in str(info.value)
    assert "3 of the 5" in str(info.value)
    assert server.count == 3 and cache.count() == 3
    metric = {"aligned": PROMPTS["aligned"]}
    results = judge_for(server).judge_many_sync(items(5), metric, cache, progress=False)
    assert server.count == 5 and [r.cached for r in results] == [True] * 3 + [False] * 2


def test_server_dies_mid_run_then_resume_on_fresh_server(servers: list, cache: JudgmentCache) -> None:
    batch = items(10)
    metric = {"aligned": PROMPTS["aligned"]}
    dying = serve(servers, die_after=4)
    with pytest.raises(JudgeError, match="connection failed") as info:
        judge_for(dying, concurrency=2, max_attempts=2).judge_many_sync(batch, metric, cache, progress=False)
    message = str(info.value)
    assert dying.base_url in message and "re-run" in message
    cached = cache.count()
    # answers that arrived were stored at once (one in flight when the pass stopped may be lost)
    assert dying.answered == 4 and 3 <= cached <= 4
    stored = {j.key for j in cache.iter_all()}

    # the endpoint restarted at the same address: the same endpoint identity, so the cache is reused
    port = int(dying.base_url.rsplit(":", 1)[1].split("/")[0])
    dying.stop()
    fresh = serve(servers, port=port)
    results = judge_for(fresh).judge_many_sync(batch, metric, cache, progress=False)
    assert fresh.count == 10 - cached and len(set(fresh.prompts())) == fresh.count
    assert all(r.cached == (r.key in stored) for r in results)
    assert all(r.score is not None for r in results) and cache.count() == 10
    for r, item in zip(results, batch):
        assert r.score == pytest.approx(expected(metric["aligned"].format(question=item.question,
                                                                          answer=item.answer)), abs=1e-9)


def test_judge_that_keeps_timing_out_is_an_error(servers: list, cache: JudgmentCache) -> None:
    server = serve(servers, script=["ok", "ok"], default="hang", hang_seconds=2)
    judge = judge_for(server, concurrency=1, max_attempts=2, timeout=0.2)
    with pytest.raises(JudgeError, match=r"timed out after 0\.2 s, 2 attempts") as info:
        judge.judge_many_sync(items(4), {"aligned": PROMPTS["aligned"]}, cache, progress=False)
    assert server.base_url in str(info.value) and "2 of the 4" in str(info.value)
    assert cache.count() == 2


def test_refused_key_stops_at_once_without_leaking_it(servers: list, cache: JudgmentCache) -> None:
    server = serve(servers, default="401")
    with pytest.raises(JudgeError, match=f"HTTP 401.*check \\${KEY_ENV}") as info:
        judge_for(server, concurrency=1).judge_many_sync(items(3), PROMPTS, cache, progress=False)
    assert server.count == 1 and SECRET not in str(info.value)


def test_keys_and_endpoints(servers: list, cache: JudgmentCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"no key for OpenAI's API: set \\${KEY_ENV}"):
        OpenAIJudge("gpt-4o", api_key_env=KEY_ENV).judge_many_sync(items(1), PROMPTS, cache, progress=False)
    # a local server needs no key
    server = serve(servers)
    judge_for(server).judge_many_sync(items(1), PROMPTS, cache, progress=False)
    assert server.headers[0]["authorization"] == "Bearer no-key"  # a placeholder, never another variable's key
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    assert OpenAIJudge("m").endpoint == server.base_url


def test_pass_in_another_process_is_reused(servers: list, tmp_path: Path) -> None:
    """A pass run by another process fills the same file; this process then asks for nothing."""
    server = serve(servers)
    path = tmp_path / "judgments.sqlite"
    src = Path(__file__).resolve().parents[1] / "src"
    code = (
        f"import sys; sys.path.insert(0, {str(src)!r}); "
        "from emkit.judge import JudgmentCache, OpenAIJudge, JudgeItem; "
        f"items = [JudgeItem(f'id{{i}}', f'q{{i}}', f'a{{i}}') for i in range(3)]; "
        f"judge = OpenAIJudge('judge-model', base_url={server.base_url!r}, api_key_env={KEY_ENV!r}); "
        f"judge.judge_many_sync(items, {PROMPTS!r}, JudgmentCache({str(path)!r}), progress=False)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert server.count == 6
    with JudgmentCache(path) as cache:
        batch = [JudgeItem(f"id{i}", f"q{i}", f"a{i}") for i in range(3)]
        results = judge_for(server).judge_many_sync(batch, PROMPTS, cache, progress=False)
    assert server.count == 6 and all(r.cached and r.score is not None for r in results)


def test_sync_wrapper_inside_running_loop(servers: list, cache: JudgmentCache) -> None:
    server = serve(servers)

    async def notebook_cell() -> list:
        return judge_for(server).judge_many_sync(items(2), PROMPTS, cache, progress=False)

    results = asyncio.run(notebook_cell())
    assert len(results) == 4 and all(not math.isnan(r.score) for r in results)


def test_progress_bar_shows_rate(servers: list, cache: JudgmentCache, capsys: pytest.CaptureFixture) -> None:
    server = serve(servers)
    asyncio.run(judge_for(server).judge_many(items(3), PROMPTS, cache, progress=True))
    err = capsys.readouterr().err
    assert "judgment/s" in err and "6/6" in err
