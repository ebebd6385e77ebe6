"""OpenAI-compatible endpoints: which key goes where, a client, and retries.

Keys stay home. A key comes only from the environment and goes only to the endpoint it belongs to:
`OPENAI_API_KEY` is sent to OpenAI's API and nowhere else; any other base URL (a vLLM or llama.cpp
server, Azure, OpenRouter) gets a key only from a variable the user names for it (`api_key_env` in
the config, `--api-key-env` on the command line), and otherwise none. Keys are never written to disk,
logs, manifests or reports: any text that reaches a message is scrubbed of the key first.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from emkit.core.errors import EmkitError

T = TypeVar("T")
RETRY_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401, 403, 404}
_KEYLIKE = re.compile(r"sk-[A-Za-z0-9_*\-]{4,}")


class EndpointError(EmkitError):
    """An endpoint that refuses, keeps failing, or answers nonsense."""


OPENAI_URL = "https://api.openai.com/v1"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "no-key"  # what the client sends where no key belongs: the openai client insists on some string


def resolve_base_url(base_url: str | None) -> str:
    """The URL requests go to: the given one, else $OPENAI_BASE_URL, else OpenAI's API (no trailing slash)."""
    return (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")


def is_openai(url: str) -> bool:
    """Whether the URL is OpenAI's own API (the only endpoint `OPENAI_API_KEY` is sent to)."""
    return (urllib.parse.urlsplit(url).hostname or "").lower() == "api.openai.com"


def key_env_for(base_url: str | None, api_key_env: str | None) -> str | None:
    """The variable whose key goes to this endpoint: the one named for it, else OPENAI_API_KEY for OpenAI only."""
    if api_key_env:
        return api_key_env
    return OPENAI_KEY_ENV if is_openai(resolve_base_url(base_url)) else None


def api_key_for(base_url: str | None, api_key_env: str | None) -> str | None:
    """The key to send to this endpoint (None: send none)."""
    env = key_env_for(base_url, api_key_env)
    return os.environ.get(env) or None if env else None


def make_client(base_url: str | None, api_key_env: str | None = None, timeout: float = 120.0, **options: Any) -> Any:
    """An AsyncOpenAI client that sends a key only where it belongs (see the module docstring)."""
    import openai

    url = resolve_base_url(base_url)
    key = api_key_for(base_url, api_key_env)
    if key is None and is_openai(url):
        raise EndpointError(f"no key for OpenAI's API: set ${key_env_for(base_url, api_key_env)}, or give the base "
                            "URL of another server")
    # Always an explicit key (a placeholder where none belongs): left empty, the client would read
    # OPENAI_API_KEY itself and send it to whatever base URL it was given.
    return openai.AsyncOpenAI(base_url=url, api_key=key or NO_KEY, timeout=timeout, max_retries=0, **options)


def scrub(text: str, api_key_env: str | None = None) -> str:
    """Remove API keys (the named variable's, OpenAI's, and anything key-shaped) from text bound for logs or files."""
    for env in {api_key_env, OPENAI_KEY_ENV} - {None}:
        key = os.environ.get(env)  # type: ignore[arg-type]
        if key and len(key) >= 4:
            text = text.replace(key, "***")
    return _KEYLIKE.sub("sk-***", text)


async def with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    max_attempts: int = 5,
    backoff_base: float = 1.0,
    backoff_max: float = 30.0,
    api_key_env: str | None = None,
) -> tuple[T, int]:
    """Run `call` until it succeeds; retry 429/5xx/timeouts/connection errors with jittered backoff."""
    import openai

    last = ""
    for attempt in range(1, max_attempts + 1):
        retry_after = None
        try:
            return await call(), attempt
        except openai.APIStatusError as exc:
            status = exc.status_code
            detail = scrub(f"HTTP {status}: {exc.message}", api_key_env)
            if status in FATAL_STATUS or (status < 500 and status not in RETRY_STATUS):
                hint = f"; check ${api_key_env or OPENAI_KEY_ENV}" if status in (401, 403) else ""
                raise EndpointError(f"{what} answered {detail}{hint}") from None
            last = detail
            header = exc.response.headers.get("retry-after") if exc.response is not None else None
            retry_after = float(header) if header and header.replace(".", "", 1).isdigit() else None
        except openai.APITimeoutError:
            last = "request timed out"
        except openai.APIConnectionError as exc:
            last = scrub(f"connection failed ({exc.__cause__ or exc})", api_key_env)
        except (openai.APIResponseValidationError, ValueError) as exc:
            last = f"malformed response ({str(exc).splitlines()[0][:200]})"
        if attempt < max_attempts:
            delay = min(backoff_max, backoff_base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            await asyncio.sleep(max(delay, min(retry_after or 0.0, backoff_max)))
    raise EndpointError(f"{what} failed after {max_attempts} attempts: {last}")
