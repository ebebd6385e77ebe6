"""A judge on any OpenAI-compatible endpoint (OpenAI, OpenRouter, Azure v1, vLLM, llama.cpp server).

Each judgment is one chat completion of one token at temperature 0 with the top 20 logprobs,
aggregated by `score_from_logprobs`. An endpoint that returns no logprobs (or refuses them) is
asked for a few tokens of text instead, read by `score_from_text` and recorded as method "text".
A judgment's cache key holds the model, the endpoint (base URL without credentials or query) and
the method, so the same model name on another server is judged afresh, and a text judgment is
never reused by a pass that gets logprobs.

A pass skips every judgment already in the cache and stores each new one the moment it arrives.
Rate limits, server errors, timeouts and dropped connections are retried with exponential
backoff and jitter; when they persist, or the request budget is used up, the pass stops with a
`JudgeError` naming the endpoint and the cause, and a re-run resumes where it stopped. A reply
that stays malformed after the retries fails only its own judgment.

The API key is read from the environment when a pass starts and handed to the client only; it
is never stored on the judge, logged, or written to the cache.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import openai

from emkit.core.endpoint import EndpointError, key_env_for, make_client, resolve_base_url, scrub
from emkit.core.errors import EmkitError
from emkit.judge.aggregate import MIN_MASS, JudgeScore, score_from_logprobs, score_from_text
from emkit.judge.cache import (
    Job,
    JudgeBudgetExceeded,
    JudgeError,
    JudgeResult,
    JudgingPass,
    Judgment,
    JudgmentCache,
    endpoint_identity,
    judgment_key,
)
from emkit.judge.prompts import JudgePrompt, as_prompts

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
_FATAL_STATUS = frozenset({401, 403, 404})  # wrong key, no access, no such model: no judgment can succeed


class _Transient(Exception):
    """A failure worth retrying: rate limit, 5xx, timeout, connection error."""


class _Malformed(Exception):
    """A reply body that is not a usable chat completion."""


class _ItemFailed(Exception):
    """This judgment cannot be had (e.g. a 400 for its prompt); the pass goes on."""


class _NoLogprobs(Exception):
    """The endpoint refused the logprobs parameters."""


class _BudgetHit(Exception):
    """No request budget left for another request."""


@dataclass
class _Reply:
    text: str | None
    top: list[Any] | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass
class OpenAIJudge:
    """Judge answers with a model behind an OpenAI-compatible chat-completions endpoint."""

    model: str
    base_url: str | None = None  # None: $OPENAI_BASE_URL, else OpenAI
    api_key_env: str | None = None  # None: OPENAI_API_KEY for OpenAI's API, no key elsewhere (emkit.core.endpoint)
    concurrency: int = 16
    max_attempts: int = 6
    timeout: float = 60.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_requests: int | None = None  # budget over this judge's lifetime, retries and fallbacks included
    price_input: float | None = None  # USD per million prompt tokens
    price_output: float | None = None  # USD per million completion tokens
    min_mass: float = MIN_MASS
    top_logprobs: int = 20
    text_max_tokens: int = 4
    seed: int | None = 0
    extra_headers: Mapping[str, str] | None = None
    extra_query: Mapping[str, str] | None = None
    requests_made: int = field(default=0, init=False)
    logprobs_supported: bool | None = field(default=None, init=False)  # learnt from the first reply
    _budget_hit: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_attempts < 1:
            raise EmkitError("judge concurrency and max_attempts must be at least 1")
        if self.max_requests is not None and self.max_requests < 0:
            raise EmkitError("judge max_requests must be >= 0")

    @property
    def judge_id(self) -> str:
        """The model id that cache keys are made from."""
        return self.model

    @property
    def endpoint(self) -> str:
        """The base URL requests go to."""
        return resolve_base_url(self.base_url)

    @property
    def endpoint_id(self) -> str:
        """The endpoint identity in cache keys: the base URL without credentials or query (never the key)."""
        return endpoint_identity(self.endpoint)

    @property
    def method(self) -> str:
        """How the next pass plans to score: logprobs, or text once the endpoint has shown it gives none."""
        return "text" if self.logprobs_supported is False else "logprobs"

    def _key(self, job: Job, method: str) -> str:
        return judgment_key(self.judge_id, job.metric, job.prompt, endpoint=self.endpoint_id, method=method)

    def describe(self) -> str:
        """One line naming the judge for logs and reports (never the key)."""
        return f"{self.model} at {self.endpoint}"

    def _client(self) -> openai.AsyncOpenAI:
        try:
            return make_client(self.base_url, self.api_key_env, timeout=self.timeout,
                               default_headers=dict(self.extra_headers) if self.extra_headers else None,
                               default_query=dict(self.extra_query) if self.extra_query else None)
        except EndpointError as exc:
            raise JudgeError(f"judge {self.model}: {exc}") from None

    async def judge_many(
        self,
        items: Iterable[Any],
        metric_prompts: Mapping[str, str | JudgePrompt] | Iterable[JudgePrompt],
        cache: JudgmentCache,
        progress: bool = True,
    ) -> list[JudgeResult]:
        """Judge every item (JudgeItem or (id, question, answer)) on every metric, asking only uncached ones."""
        plan = JudgingPass.plan(self.judge_id, items, as_prompts(metric_prompts), cache, self.min_mass,
                                endpoint=self.endpoint_id, method=self.method)
        fresh: dict[str, Judgment] = {}
        errors: dict[str, str] = {}
        reused: set[str] = set()
        if plan.todo:
            log.info("judge %s: %d judgments to ask, %d cached", self.describe(), len(plan.todo),
                     sum(job.key in plan.known for job in plan.jobs))
            await self._run(plan.todo, cache, fresh, errors, progress, len({j.key for j in plan.jobs}), reused)
        results = plan.results(fresh, errors, reused)
        if errors:
            example = next(iter(errors.values()))
            log.warning("judge %s: %d judgments failed (e.g. %s); re-run to retry them", self.describe(),
                        len(errors), example)
        return results

    def judge_many_sync(
        self,
        items: Iterable[Any],
        metric_prompts: Mapping[str, str | JudgePrompt] | Iterable[JudgePrompt],
        cache: JudgmentCache,
        progress: bool = True,
    ) -> list[JudgeResult]:
        """Blocking `judge_many`; also works where an event loop is already running (notebooks)."""
        coro = self.judge_many(items, metric_prompts, cache, progress)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = asyncio.run(coro)
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=run, name="emkit-judge")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    async def _run(
        self,
        todo: list[Job],
        cache: JudgmentCache,
        fresh: dict[str, Judgment],
        errors: dict[str, str],
        progress: bool,
        total: int,
        reused: set[str],
    ) -> None:
        from tqdm import tqdm

        client = self._client()
        gate = asyncio.Semaphore(self.concurrency)
        self._budget_hit = False
        stopping = False  # a fatal error: queued judgments must not send another request
        bar = tqdm(total=len(todo), unit="judgment", desc=f"judge {self.model}", disable=not progress,
                   dynamic_ncols=True)

        async def one(job: Job) -> None:
            nonlocal stopping
            async with gate:
                if self._budget_hit or stopping:
                    return
                try:
                    judgment, from_cache = await self._judge(client, job, cache)
                except JudgeError:
                    stopping = True
                    raise
                except _BudgetHit:
                    self._budget_hit = True
                    return
                except _ItemFailed as exc:
                    errors[job.key] = str(exc)
                else:
                    if from_cache:
                        reused.add(job.key)
                    else:
                        cache.put(judgment)  # at once: a crash later loses nothing that was answered
                    fresh[job.key] = judgment
                bar.update(1)

        try:
            async with asyncio.TaskGroup() as group:
                for job in todo:
                    group.create_task(one(job))
        except ExceptionGroup as eg:
            fatal = _first_judge_error(eg)
            if fatal is None:
                raise
            raise JudgeError(f"{fatal}; {self._progress_note(cache, todo, fresh, total)}") from None
        finally:
            bar.close()
            await client.close()
        if self._budget_hit:
            raise JudgeBudgetExceeded(
                f"judge {self.describe()}: request budget of {self.max_requests} used up; "
                f"{self._progress_note(cache, todo, fresh, total, 'with a larger budget ')}"
            )

    def _progress_note(
        self, cache: JudgmentCache, todo: list[Job], fresh: dict[str, Judgment], total: int, how: str = ""
    ) -> str:
        missing = len(todo) - len(fresh)
        return (f"{total - missing} of the {total} distinct judgments of this pass are in {cache.path}; "
                f"re-run {how}to judge the other {missing}")

    async def _judge(self, client: openai.AsyncOpenAI, job: Job, cache: JudgmentCache) -> tuple[Judgment, bool]:
        """One judgment, and whether it came from the cache (a text judgment once logprobs proved absent)."""
        attempts, usage = 0, _Usage()
        score: JudgeScore | None = None
        if self.logprobs_supported is not False:
            try:
                reply, n = await self._ask(client, job.prompt, logprobs=True)
                attempts += n
                usage.add(reply)
                if reply.top:
                    self.logprobs_supported = True
                    score = score_from_logprobs(reply.top, self.min_mass)
                elif self.logprobs_supported is None:
                    self._switch_to_text("returned no logprobs")
            except _NoLogprobs as exc:
                attempts += exc.args[0]
                self._switch_to_text("refused logprobs")
        key = job.key
        if score is None:
            # Scored from text, so stored under the text method's key: a later pass that gets logprobs
            # must not take it for a logprob judgment. A text judgment of this endpoint already cached
            # (an earlier pass that fell back too) is what asking again would give, so it is reused.
            key = self._key(job, "text")
            if key != job.key:
                cached = cache.get(key)
                if cached is not None:
                    return cached, True
            reply, n = await self._ask(client, job.prompt, logprobs=False)
            attempts += n
            usage.add(reply)
            score = score_from_text(reply.text or "")
        return Judgment.from_score(
            key, self.judge_id, job.metric, score,
            prompt_tokens=usage.prompt, completion_tokens=usage.completion,
            cost=self._cost(usage), attempts=attempts, endpoint=self.endpoint_id,
        ), False

    def _switch_to_text(self, why: str) -> None:
        if self.logprobs_supported is not False:
            log.warning("judge %s %s; scoring from text replies instead (method 'text')",
                        self.describe(), why)
        self.logprobs_supported = False

    def _cost(self, usage: _Usage) -> float | None:
        if self.price_input is None and self.price_output is None:
            return None
        if usage.prompt is None and usage.completion is None:
            return None
        spent = (usage.prompt or 0) * (self.price_input or 0.0)
        spent += (usage.completion or 0) * (self.price_output or 0.0)
        return spent / 1e6

    def _take_request(self) -> None:
        if self.max_requests is not None and self.requests_made >= self.max_requests:
            raise _BudgetHit
        self.requests_made += 1

    def _request_args(self, prompt: str, logprobs: bool) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 1 if logprobs else self.text_max_tokens,
        }
        if logprobs:
            args.update(logprobs=True, top_logprobs=self.top_logprobs)
        if self.seed is not None:
            args["seed"] = self.seed
        return args

    async def _ask(self, client: openai.AsyncOpenAI, prompt: str, logprobs: bool) -> tuple[_Reply, int]:
        """One judgment request with retries; returns the reply and the number of attempts."""
        last, last_kind = "", ""
        for attempt in range(1, self.max_attempts + 1):
            self._take_request()
            retry_after = None
            try:
                completion = await client.chat.completions.create(**self._request_args(prompt, logprobs))
                return _parse(completion), attempt
            except openai.APIStatusError as exc:
                status = exc.status_code
                detail = f"HTTP {status}: {self._scrub(_message(exc))}"
                if status in _FATAL_STATUS:
                    hint = f"; check ${key_env_for(self.base_url, self.api_key_env) or 'a key variable (api_key_env)'}" \
                        if status in (401, 403) else ""
                    raise JudgeError(
                        f"judge endpoint {self.endpoint} ({self.model}) answered {detail}{hint}"
                    ) from None
                if logprobs and status in (400, 422) and "logprob" in detail.lower():
                    raise _NoLogprobs(attempt) from None
                if status not in _RETRY_STATUS and status < 500:
                    raise _ItemFailed(detail) from None
                last, last_kind = detail, "transient"
                retry_after = _retry_after(exc)
            except openai.APITimeoutError:
                last, last_kind = f"request timed out after {self.timeout:g} s", "transient"
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc.__context__
                last, last_kind = f"connection failed ({self._scrub(str(cause or exc))})", "transient"
            except (_Malformed, openai.APIResponseValidationError, ValueError) as exc:
                # ValueError covers JSONDecodeError and pydantic's errors on a broken body
                last, last_kind = f"malformed response body ({str(exc).splitlines()[0][:200]})", "malformed"
            if attempt < self.max_attempts:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        if last_kind == "malformed":
            raise _ItemFailed(f"{last}, {self.max_attempts} attempts")
        raise JudgeError(
            f"judge endpoint {self.endpoint} ({self.model}) failed: {last}, {self.max_attempts} attempts"
        )

    def _scrub(self, text: str) -> str:
        # servers may echo (part of) the key in an error message; it must not reach logs or files
        return scrub(text, self.api_key_env)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        delay *= random.uniform(0.5, 1.0)  # jitter: concurrent requests must not retry in lockstep
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay


@dataclass
class _Usage:
    prompt: int | None = None
    completion: int | None = None

    def add(self, reply: _Reply) -> None:
        if reply.prompt_tokens is not None:
            self.prompt = (self.prompt or 0) + reply.prompt_tokens
        if reply.completion_tokens is not None:
            self.completion = (self.completion or 0) + reply.completion_tokens


def _parse(completion: Any) -> _Reply:
    try:
        choice = completion.choices[0]
        text = choice.message.content
        top = None
        logprobs = getattr(choice, "logprobs", None)
        content = getattr(logprobs, "content", None) if logprobs is not None else None
        if content:
            top = list(content[0].top_logprobs or []) or None
            if top is not None:
                for entry in top:  # touch every field now, so a broken entry is a malformed reply
                    float(entry.logprob), str(entry.token)
        usage = getattr(completion, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None) if usage is not None else None
        completion_tokens = getattr(usage, "completion_tokens", None) if usage is not None else None
    except (AttributeError, TypeError, IndexError, KeyError, ValueError) as exc:
        raise _Malformed(f"{type(exc).__name__}: {exc}") from None
    if text is not None and not isinstance(text, str):
        raise _Malformed("message content is not text")
    return _Reply(text, top, _int_or_none(prompt_tokens), _int_or_none(completion_tokens))


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(exc.message)[:300]


def _retry_after(exc: openai.APIStatusError) -> float | None:
    try:
        value = exc.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def _first_judge_error(eg: BaseExceptionGroup) -> JudgeError | None:
    for exc in eg.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_judge_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, JudgeError):
            return exc
    return None
