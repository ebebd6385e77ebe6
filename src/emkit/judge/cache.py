"""The judgment cache, one SQLite file (a run's `judgments.sqlite`) so no answer is judged twice,
and the bookkeeping every judge shares: items, the jobs of a pass, results, pass errors.

A judgment is keyed by the sha256 of (judge model id, endpoint identity, scoring method, metric,
fully rendered prompt), so the same answer judged by another judge, metric or prompt wording is a
different entry, and so is the same model id served elsewhere (another base URL or provider, another
local dtype) or scored another way (a text reply instead of logprobs). The endpoint identity never
holds a key: it is the base URL without credentials or query (see `endpoint_identity`).

Caches written by emkit before the endpoint and method were part of the key (schema 1) are
upgraded in place to schema 2 (an `endpoint` column; NULL on old rows). Their old keys are a
documented cache miss: they cannot be told apart by endpoint or method, so they are never reused and
those answers are judged again (`JudgmentCache.legacy_count` says how many such rows there are).
They stay in the file, counted in `usage` (they were paid for). Every judgment is
committed as soon as it arrives; an interrupted pass loses at most the requests in flight, and a
re-run skips every key already here. WAL mode and a busy timeout make concurrent writers (tasks
of one process, or several processes) safe; WAL needs a local filesystem, not NFS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emkit.core.errors import EmkitError
from emkit.core.runfolder import now
from emkit.judge.aggregate import JudgeScore, score_from_probs
from emkit.judge.prompts import JudgePrompt

SCHEMA_VERSION = 2  # 2: keys include endpoint and method; the `endpoint` column
_CHUNK = 500  # below SQLite's limit on bound parameters per statement
_KEY_VERSION = "v2"  # in every key's payload, so no new key can equal a schema-1 key
_COLUMNS = (
    "key", "judge", "metric", "score", "mass", "method", "reason", "raw",
    "prompt_tokens", "completion_tokens", "cost", "attempts", "created", "endpoint",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    metric TEXT NOT NULL,
    score REAL,
    mass REAL,
    method TEXT NOT NULL,
    reason TEXT,
    raw TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost REAL,
    attempts INTEGER NOT NULL,
    created TEXT NOT NULL,
    endpoint TEXT
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class JudgeError(EmkitError):
    """A judging pass that cannot go on (endpoint down, key refused, budget used up); cached work is kept."""


class JudgeBudgetExceeded(JudgeError):
    """The judge's request budget is used up."""


def judgment_key(judge: str, metric: str, prompt: str, *, endpoint: str, method: str) -> str:
    """sha256 of (judge model id, endpoint identity, scoring method, metric, rendered prompt): one judgment's key."""
    payload = json.dumps([_KEY_VERSION, judge, endpoint, method, metric, prompt], ensure_ascii=False,
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def endpoint_identity(url: str) -> str:
    """A base URL as an endpoint identity: scheme, host, port and path only.

    Credentials in the URL (user:password@), its query (some providers take `?api-key=`) and
    fragment are dropped, so no secret reaches a cache key or a file; host and scheme are
    lower-cased and a trailing slash removed, so spellings of one endpoint are one identity.
    """
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if port is None or port == default else f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class Judgment:
    """A stored judgment: the score and how it was obtained (tokens, cost, attempts, time)."""

    key: str
    judge: str
    metric: str
    score: float | None
    mass: float | None
    method: str
    reason: str | None
    raw: Any
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = None
    attempts: int = 1
    created: str = field(default_factory=now)
    endpoint: str | None = None  # the endpoint identity of the key; None on rows of a schema-1 cache

    @classmethod
    def from_score(cls, key: str, judge: str, metric: str, score: JudgeScore, **usage: Any) -> Judgment:
        """A judgment from an aggregated score plus usage fields (tokens, cost, attempts)."""
        s = score
        return cls(key, judge, metric, s.score, s.mass, s.method, s.reason, s.raw, **usage)

    def rescored(self, min_mass: float) -> Judgment:
        """The same judgment aggregated under another mass threshold, from its stored probabilities.

        The cache key does not include the threshold, so a cached judgment is re-aggregated for the
        judge asking; judgments without a probability dict (text, rule) are returned as they are.
        """
        if self.method not in ("logprobs", "local-logits") or not isinstance(self.raw, dict):
            return self
        score = score_from_probs(self.raw, min_mass)
        return dataclasses.replace(self, score=score.score, mass=score.mass, reason=score.reason)

    def to_score(self) -> JudgeScore:
        """The judgment as a JudgeScore."""
        return JudgeScore(self.score, self.mass, self.method, self.reason, self.raw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge: an id of the caller's choosing, the question and the answer."""

    id: str
    question: str
    answer: str


@dataclass(frozen=True)
class JudgeResult:
    """The outcome of one (item, metric): a judgment (fresh or cached) or the error that prevented it."""

    item_id: str
    metric: str
    key: str
    judgment: Judgment | None
    cached: bool = False
    error: str | None = None

    @property
    def score(self) -> float | None:
        """The 0-100 score, or None when unscorable or failed."""
        return self.judgment.score if self.judgment is not None else None

    def as_row(self) -> dict[str, Any]:
        """A flat dict for a table (Parquet/JSONL): ids, score, mass, method, reason, usage, error."""
        j = self.judgment
        return {
            "item_id": self.item_id, "metric": self.metric, "key": self.key,
            "judge": j.judge if j else None, "score": self.score, "mass": j.mass if j else None,
            "method": j.method if j else "error", "reason": j.reason if j else None,
            "prompt_tokens": j.prompt_tokens if j else None,
            "completion_tokens": j.completion_tokens if j else None,
            "cost": j.cost if j else None, "attempts": j.attempts if j else None, "cached": self.cached,
            "error": self.error,
        }


@dataclass(frozen=True)
class Job:
    """One judgment a pass needs: which item and metric, its rendered prompt and cache key."""

    item_id: str
    metric: str
    prompt: str
    key: str


def as_item(item: JudgeItem | tuple | Mapping[str, Any]) -> JudgeItem:
    """A JudgeItem from itself, a tuple (id, question, answer) or a mapping with those keys."""
    if isinstance(item, JudgeItem):
        return item
    if isinstance(item, Mapping):
        return JudgeItem(str(item["id"]), str(item["question"]), str(item["answer"]))
    item_id, question, answer = item
    return JudgeItem(str(item_id), str(question), str(answer))


def plan_jobs(judge: str, items: Iterable[Any], prompts: Mapping[str, JudgePrompt], *, endpoint: str,
              method: str) -> list[Job]:
    """Every (item, metric) of a pass, item-major, with its rendered prompt and cache key."""
    jobs = []
    for raw in items:
        item = as_item(raw)
        for metric, prompt in prompts.items():
            text = prompt.render(item.question, item.answer)
            jobs.append(Job(item.id, metric, text, judgment_key(judge, metric, text, endpoint=endpoint, method=method)))
    return jobs


def _nearly_full(path: Path) -> bool:
    """Whether the cache's filesystem has under 1 MiB free (SQLite then reports a bare 'disk I/O error')."""
    try:
        stat = os.statvfs(path.parent)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < 1 << 20


def _cache_error(path: Path, exc: sqlite3.DatabaseError, message: str) -> EmkitError:
    """The error to show for a failed cache operation; a full disk is named as such, not as a broken cache."""
    if isinstance(exc, sqlite3.OperationalError) and ("full" in str(exc) or _nearly_full(path)):
        return EmkitError(f"{path}: disk full while writing judgments; those stored before are kept — free space "
                          "and re-run to resume")
    return EmkitError(f"{path}: {message.format(exc=exc)}")


class JudgmentCache:
    """The SQLite judgment cache; usable from several tasks, threads and processes at once."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one connection shared by the threads of this process
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across crashes of the process
            self._conn.executescript(_SCHEMA)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            version = self._conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0]
            if version == "1":
                version = self._upgrade_from_1()
        except sqlite3.DatabaseError as exc:
            raise _cache_error(self.path, exc, "not a usable judgment cache ({exc}); move the file away") from None
        except OSError as exc:
            raise EmkitError(f"{self.path}: cannot open judgment cache ({exc.strerror or exc})") from None
        if version != str(SCHEMA_VERSION):
            self._conn.close()
            raise EmkitError(
                f"{self.path}: judgment cache schema {version}, this emkit reads {SCHEMA_VERSION}"
            )

    def _upgrade_from_1(self) -> str:
        """Add the `endpoint` column to a schema-1 cache; its rows keep their old keys (never hit again)."""
        # IMMEDIATE: two processes opening the same old file must not both add the column
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0]
            if version == "1":
                columns = {row[1] for row in self._conn.execute("PRAGMA table_info(judgments)")}
                if "endpoint" not in columns:
                    self._conn.execute("ALTER TABLE judgments ADD COLUMN endpoint TEXT")
                self._conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION),))
                version = str(SCHEMA_VERSION)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return version

    def close(self) -> None:
        """Close the connection (the file stays)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JudgmentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _cache_error(self.path, exc, "judgment cache error ({exc})") from None

    def get(self, key: str) -> Judgment | None:
        """The judgment stored under `key`, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, Judgment]:
        """The stored judgments among `keys`, as key -> Judgment (missing keys are absent)."""
        unique = list(dict.fromkeys(keys))
        found: dict[str, Judgment] = {}
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._run(f"SELECT {', '.join(_COLUMNS)} FROM judgments WHERE key IN ({marks})", chunk)
            for row in rows:
                judgment = _from_row(row)
                found[judgment.key] = judgment
        return found

    def put(self, judgment: Judgment) -> None:
        """Store a judgment, replacing any under the same key."""
        self.put_many([judgment])

    def put_many(self, judgments: Iterable[Judgment]) -> None:
        """Store several judgments in one transaction (upsert)."""
        rows = [_to_row(j) for j in judgments]
        if not rows:
            return
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
        sql = (
            f"INSERT INTO judgments ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
            f"ON CONFLICT(key) DO UPDATE SET {updates}"
        )
        try:
            with self._lock:
                # IMMEDIATE takes the write lock up front, so two writers wait instead of deadlocking
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany(sql, rows)
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:  # a failed COMMIT (e.g. a full disk) has rolled back already
                        self._conn.execute("ROLLBACK")
                    raise
        except sqlite3.DatabaseError as exc:
            raise _cache_error(self.path, exc, "cannot store judgments ({exc})") from None

    def count(self, judge: str | None = None, metric: str | None = None) -> int:
        """Number of stored judgments, optionally of one judge and/or metric."""
        where, params = _filters(judge, metric)
        return int(self._run(f"SELECT COUNT(*) FROM judgments{where}", params)[0][0])

    def __len__(self) -> int:
        return self.count()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._run("SELECT 1 FROM judgments WHERE key = ?", (key,)))

    def iter_all(self, judge: str | None = None, metric: str | None = None) -> Iterator[Judgment]:
        """Every stored judgment, optionally of one judge and/or metric, oldest first."""
        where, params = _filters(judge, metric)
        rows = self._run(f"SELECT {', '.join(_COLUMNS)} FROM judgments{where} ORDER BY created, key", params)
        return (_from_row(row) for row in rows)

    def legacy_count(self, judge: str | None = None) -> int:
        """Rows written under schema-1 keys (no endpoint, no method in the key): kept, never reused."""
        where, params = _filters(judge, None)
        where += (" AND" if where else " WHERE") + " endpoint IS NULL"
        return int(self._run(f"SELECT COUNT(*) FROM judgments{where}", params)[0][0])

    def identities(self, judge: str | None = None) -> list[tuple[str, str, str, int]]:
        """(judge, endpoint, method, count) of every judge identity with keyed rows, most rows first."""
        where, params = _filters(judge, None)
        where += (" AND" if where else " WHERE") + " endpoint IS NOT NULL"
        rows = self._run(f"SELECT judge, endpoint, method, COUNT(*) FROM judgments{where} "
                         "GROUP BY judge, endpoint, method ORDER BY COUNT(*) DESC, judge, endpoint, method", params)
        return [(str(j), str(e), str(m), int(n)) for j, e, m, n in rows]

    def usage(self, judge: str | None = None) -> dict[str, float]:
        """Summed prompt/completion tokens, cost and attempts of stored judgments."""
        where, params = _filters(judge, None)
        row = self._run(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            f"COALESCE(SUM(cost), 0), COALESCE(SUM(attempts), 0) FROM judgments{where}",
            params,
        )[0]
        return dict(zip(("judgments", "prompt_tokens", "completion_tokens", "cost", "attempts"), row))


def _filters(judge: str | None, metric: str | None) -> tuple[str, list[str]]:
    clauses, params = [], []
    if judge is not None:
        clauses.append("judge = ?")
        params.append(judge)
    if metric is not None:
        clauses.append("metric = ?")
        params.append(metric)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _to_row(j: Judgment) -> tuple:
    return (
        j.key, j.judge, j.metric, j.score, j.mass, j.method, j.reason, json.dumps(j.raw, ensure_ascii=False),
        j.prompt_tokens, j.completion_tokens, j.cost, j.attempts, j.created, j.endpoint,
    )


def _from_row(row: tuple) -> Judgment:
    values = dict(zip(_COLUMNS, row))
    values["raw"] = json.loads(values["raw"])
    return Judgment(**values)


@dataclass
class JudgingPass:
    """The jobs of one judging pass split into cached ones and those to ask (each distinct prompt once)."""

    jobs: list[Job]
    known: dict[str, Judgment]
    todo: list[Job]

    @classmethod
    def plan(cls, judge: str, items: Iterable[Any], prompts: Mapping[str, JudgePrompt],
             cache: JudgmentCache, min_mass: float | None = None, *, endpoint: str, method: str) -> JudgingPass:
        """Plan every (item, metric) and look each up in the cache (rescored under `min_mass`, if given)."""
        jobs = plan_jobs(judge, items, prompts, endpoint=endpoint, method=method)
        known = cache.get_many(job.key for job in jobs)
        if min_mass is not None:
            known = {key: j.rescored(min_mass) for key, j in known.items()}
        todo: dict[str, Job] = {}
        for job in jobs:
            if job.key not in known:
                todo.setdefault(job.key, job)  # an answer repeated verbatim is asked once
        return cls(jobs, known, list(todo.values()))

    def results(self, fresh: Mapping[str, Judgment], errors: Mapping[str, str] | None = None,
                reused: Collection[str] = ()) -> list[JudgeResult]:
        """One result per planned job, from the cache, this pass, or the error that stopped it.

        `fresh` maps a job's key to its judgment, whose own key may differ when the judge scored it
        another way than planned (a text reply where logprobs were planned); `reused` names the jobs
        whose judgment came from the cache after all (under that other method's key).
        """
        errors = errors or {}
        out = []
        for job in self.jobs:
            if job.key in self.known:
                out.append(JudgeResult(job.item_id, job.metric, job.key, self.known[job.key], cached=True))
                continue
            judgment = fresh.get(job.key)
            key = judgment.key if judgment is not None else job.key
            out.append(JudgeResult(job.item_id, job.metric, key, judgment, job.key in reused, errors.get(job.key)))
        return out
