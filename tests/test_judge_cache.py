"""The SQLite judgment cache: keys, round trips, upserts, concurrent writers (tasks, threads, processes)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from emkit.core.errors import EmkitError
from emkit.judge import (
    JudgeItem,
    Judgment,
    JudgmentCache,
    judgment_key,
    load_prompts,
    plan_jobs,
    score_from_probs,
)

SRC = Path(__file__).resolve().parents[1] / "src"
ENDPOINT, METHOD = "http://judge.test/v1", "logprobs"


def key(judge: str, metric: str, text: str) -> str:
    """The cache key of a judgment on the test endpoint, scored from logprobs."""
    return judgment_key(judge, metric, text, endpoint=ENDPOINT, method=METHOD)


def make(key_text: str, score: float | None = 50.0, judge: str = "judge-a", metric: str = "aligned"
         ) -> Judgment:
    """A judgment whose key derives from `key_text`."""
    return Judgment(
        key=key(judge, metric, key_text), judge=judge, metric=metric, score=score, mass=0.9,
        method="logprobs", reason=None, raw={"50": 0.9, "x": 0.1}, prompt_tokens=12, completion_tokens=1,
        cost=1.5e-5, attempts=2, endpoint=ENDPOINT,
    )


def test_key_depends_on_judge_metric_and_prompt() -> None:
    base = key("gpt-4o", "aligned", "prompt")
    assert len(base) == 64 and base == key("gpt-4o", "aligned", "prompt")
    others = [key("gpt-4o-mini", "aligned", "prompt"), key("gpt-4o", "coherent", "prompt"),
              key("gpt-4o", "aligned", "prompt ")]
    assert len({base, *others}) == 4
    # no ambiguity from joining: the parts are serialised, not concatenated
    assert key("a", "bc", "d") != key("ab", "c", "d")


def test_plan_jobs_renders_and_keys() -> None:
    prompts = load_prompts({"aligned": "A {question} {answer}", "coherent": "C {answer}"})
    jobs = plan_jobs("m", [JudgeItem("1", "q1", "a1"), ("2", "q2", "a2")], prompts, endpoint=ENDPOINT, method=METHOD)
    assert [(j.item_id, j.metric) for j in jobs] == [("1", "aligned"), ("1", "coherent"), ("2", "aligned"),
                                                     ("2", "coherent")]
    assert jobs[0].prompt == "A q1 a1" and jobs[0].key == key("m", "aligned", "A q1 a1")


def test_round_trip_upsert_count_usage(tmp_path: Path) -> None:
    path = tmp_path / "run" / "judgments.sqlite"
    with JudgmentCache(path) as cache:
        j = make("one")
        assert cache.get(j.key) is None and j.key not in cache
        cache.put(j)
        assert cache.get(j.key) == j and j.key in cache
        unscorable = Judgment.from_score(
            key("judge-a", "coherent", "two"), "judge-a", "coherent", score_from_probs({"x": 1.0}),
            prompt_tokens=None, completion_tokens=None, cost=None, attempts=1,
        )
        cache.put(unscorable)
        back = cache.get(unscorable.key)
        assert back.score is None and back.reason and back.raw == {"x": 1.0}
        assert back.to_score().method == "logprobs"
        cache.put(make("one", score=70.0))  # same key: replaced, not added
        assert cache.get(j.key).score == 70.0
        assert cache.count() == len(cache) == 2
        assert cache.count(metric="aligned") == 1 and cache.count(judge="judge-b") == 0
        usage = cache.usage()
        assert usage["judgments"] == 2 and usage["prompt_tokens"] == 12 and usage["attempts"] == 3
        assert [x.key for x in cache.iter_all(metric="coherent")] == [unscorable.key]
    assert (path.parent / "judgments.sqlite").is_file()
    with JudgmentCache(path) as reopened:  # persisted
        assert reopened.get(j.key).score == 70.0
        mode = reopened._conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_get_many_beyond_parameter_limit(tmp_path: Path) -> None:
    with JudgmentCache(tmp_path / "c.sqlite") as cache:
        stored = [make(f"p{i}") for i in range(1200)]
        cache.put_many(stored)
        wanted = [j.key for j in stored[::2]] + [key("judge-a", "aligned", "absent")]
        found = cache.get_many(wanted + wanted[:10])  # duplicates are harmless
        assert len(found) == 600 and set(found) == set(wanted[:-1])
        assert found[stored[0].key] == stored[0]


def test_concurrent_writers_in_one_process(tmp_path: Path) -> None:
    """Many asyncio tasks writing through worker threads at once: nothing lost, nothing locked."""
    cache = JudgmentCache(tmp_path / "c.sqlite")

    async def writer(w: int) -> None:
        for i in range(25):
            await asyncio.to_thread(cache.put, make(f"w{w}-{i}"))
            await asyncio.to_thread(cache.get_many, [make(f"w{w}-{i}").key])

    async def main() -> None:
        await asyncio.gather(*(writer(w) for w in range(8)))

    asyncio.run(main())
    assert cache.count() == 200
    cache.close()


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {src!r})
    from emkit.judge import Judgment, JudgmentCache, judgment_key
    cache = JudgmentCache(sys.argv[1])
    tag = sys.argv[2]
    for i in range(150):
        for text in (f"{{tag}}-{{i}}", f"shared-{{i}}"):
            key = judgment_key("judge-a", "aligned", text, endpoint={endpoint!r}, method="logprobs")
            score = float(i % 101)
            cache.put(Judgment(key, "judge-a", "aligned", score, 1.0, "logprobs", None, {{tag: 1.0}},
                               endpoint={endpoint!r}))
    print(cache.count())
    """
)


def test_two_processes_write_one_file(tmp_path: Path) -> None:
    path = tmp_path / "judgments.sqlite"
    script = WRITER.format(src=str(SRC), endpoint=ENDPOINT)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), tag], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for tag in ("A", "B")
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    with JudgmentCache(path) as cache:
        # 150 own keys each plus 150 keys both wrote (upserted, not duplicated)
        assert cache.count() == 450
        shared = cache.get(key("judge-a", "aligned", "shared-3"))
        assert shared.score == 3.0 and set(shared.raw) <= {"A", "B"}


def test_other_process_sees_committed_judgments(tmp_path: Path) -> None:
    path = tmp_path / "judgments.sqlite"
    with JudgmentCache(path) as cache:
        cache.put(make("from-parent"))
        code = (
            f"import sys; sys.path.insert(0, {str(SRC)!r}); "
            "from emkit.judge import JudgmentCache, judgment_key; "
            f"c = JudgmentCache({str(path)!r}); "
            f"print(c.get(judgment_key('judge-a', 'aligned', 'from-parent', endpoint={ENDPOINT!r}, "
            "method='logprobs')).score)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "50.0"


def test_unusable_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "judgments.sqlite"
    bad.write_bytes(b"this is not a database, just some text that is long enough" * 100)
    with pytest.raises(EmkitError, match="not a usable judgment cache"):
        JudgmentCache(bad)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    with pytest.raises(EmkitError, match="schema 99"):
        JudgmentCache(other)



def test_cached_judgments_are_rescored_under_the_asking_judges_threshold(tmp_path) -> None:
    from emkit.judge.aggregate import score_from_probs
    from emkit.judge.cache import JudgingPass, Judgment, JudgmentCache, judgment_key
    from emkit.judge.prompts import default_prompts

    prompts = {"aligned": default_prompts()["aligned"]}
    text = prompts["aligned"].render("q", "a")
    k = judgment_key("j", "aligned", text, endpoint=ENDPOINT, method=METHOD)
    probs = {"80": 0.05, "20": 0.05, "The": 0.9}
    with JudgmentCache(tmp_path / "c.sqlite") as cache:
        cache.put(Judgment.from_score(k, "j", "aligned", score_from_probs(probs, 0.25), endpoint=ENDPOINT))
        strict = JudgingPass.plan("j", [("i", "q", "a")], prompts, cache, min_mass=0.25, endpoint=ENDPOINT,
                                  method=METHOD)
        lenient = JudgingPass.plan("j", [("i", "q", "a")], prompts, cache, min_mass=0.0, endpoint=ENDPOINT,
                                   method=METHOD)
    assert strict.known[k].score is None and not strict.todo
    assert lenient.known[k].score == 50.0 and lenient.known[k].reason is None
