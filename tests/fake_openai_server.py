"""A real HTTP server on 127.0.0.1 that speaks OpenAI chat completions (and plain completions), for tests.

It answers with configurable top logprobs and can be scripted to fail: 429, 500, hang past the
client's timeout, refuse the key (401, echoing it as some servers do), send a malformed body,
omit logprobs, reject logprobs with a 400, or die after K requests (further requests, even on
kept-alive connections, are dropped without an answer). It counts and records every request.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ACTIONS = ("ok", "401", "429", "500", "hang", "malformed", "nologprobs", "reject_logprobs")
Probs = dict[str, float]


def default_probs(prompt: str) -> Probs:
    """A fixed distribution over number tokens (score 86.0) with a little non-number mass."""
    return {"90": 0.5, "80": 0.3, "85": 0.1, "I": 0.1}


class FakeOpenAIServer:
    """Chat-completions server in a background thread; use as a context manager."""

    def __init__(
        self,
        probs: Callable[[str], Probs] = default_probs,
        script: Iterable[str] = (),
        default: str = "ok",
        die_after: int | None = None,
        text_reply: Callable[[str], str] | None = None,
        hang_seconds: float = 5.0,
        port: int = 0,
    ) -> None:
        self.probs = probs
        self.script = list(script)
        self.default = default
        self.die_after = die_after
        self.text_reply = text_reply or (lambda prompt: _best_token(probs(prompt)))
        self.hang_seconds = hang_seconds
        self.requests: list[dict[str, Any]] = []  # bodies of all requests, in arrival order
        self.headers: list[dict[str, str]] = []  # lower-cased names
        self.answered = 0  # requests answered with a valid completion
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.dead = False
        # port 0: any free port; a given port lets a test restart "the same" endpoint
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (ending in /v1)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def count(self) -> int:
        """Requests received so far (including failed and dropped ones)."""
        with self._lock:
            return len(self.requests)

    def prompts(self) -> list[str]:
        """The user message of every request received."""
        with self._lock:
            return [_prompt_of(body) for body in self.requests]

    def start(self) -> FakeOpenAIServer:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port; hanging handlers are released."""
        self.dead = True
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next_action(self, body: dict[str, Any]) -> str:
        with self._lock:
            self.requests.append(body)
            n = len(self.requests)
            if self.die_after is not None and n > self.die_after:
                self.dead = True
            if self.dead:
                return "drop"
            return self.script.pop(0) if self.script else self.default

    def _kill_soon(self) -> None:
        # shutdown() blocks until serve_forever returns, so it cannot run on a handler thread;
        # closing the listening socket makes new connections fail at once instead of queueing
        def kill() -> None:
            self._httpd.shutdown()
            self._httpd.server_close()

        threading.Thread(target=kill, daemon=True).start()


def _prompt_of(body: dict[str, Any]) -> str:
    if isinstance(body.get("prompt"), str):  # the plain completions endpoint
        return body["prompt"]
    try:
        return str(body["messages"][-1]["content"])
    except (KeyError, IndexError, TypeError):
        return ""


def _best_token(probs: Probs) -> str:
    return max(probs.items(), key=lambda kv: kv[1])[0] if probs else "0"


def completion_body(model: str, content: str, top: Probs | None, prompt_tokens: int) -> dict[str, Any]:
    """An OpenAI chat.completion object; `top` None means no logprobs field content."""
    logprobs = None
    if top is not None:
        ranked = sorted(top.items(), key=lambda kv: -kv[1])
        entries = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in ranked]
        logprobs = {"content": [{**entries[0], "top_logprobs": entries}], "refusal": None}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": logprobs,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    }


def _handler_for(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers: a dead server must also drop those

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            body = {"error": {"message": message, "type": "fake", "code": status}}
            self._send(status, json.dumps(body).encode(), headers)

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                body = {}
            with server._lock:
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
            action = server._next_action(body)
            try:
                self._act(action, body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout) before we answered

        def _act(self, action: str, body: dict[str, Any]) -> None:
            if action == "drop":
                server._kill_soon()
                self.close_connection = True
                return
            if action == "401":
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                return self._error(401, f"Incorrect API key provided: {key}")
            if action == "429":
                return self._error(429, "rate limited", {"Retry-After": "0"})
            if action == "500":
                return self._error(500, "internal error")
            if action == "hang":
                server._release.wait(server.hang_seconds)
                self.close_connection = True
                return
            if action == "malformed":
                return self._send(200, b'{"id": "chatcmpl-fake", "choices": [{"index": 0, "mess')
            wants_logprobs = bool(body.get("logprobs"))
            if action == "reject_logprobs" and wants_logprobs:
                return self._error(400, "logprobs are not supported by this model")
            prompt = _prompt_of(body)
            top = server.probs(prompt)
            k = int(body.get("top_logprobs") or 0)
            give = wants_logprobs and action == "ok"
            top_k = dict(sorted(top.items(), key=lambda kv: -kv[1])[:k]) if give else None
            content = server.text_reply(prompt) if not give else _best_token(top)
            model = str(body.get("model", "fake"))
            if self.path.rstrip("/").endswith("/completions") and "/chat/" not in self.path:
                # /v1/completions: text, cut at the first stop string as real servers do
                stops = [s for s in body.get("stop") or [] if s and s in content]
                first = min(stops, key=content.index) if stops else None
                text = content[: content.index(first)] if first else content
                reply = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model,
                         "choices": [{"index": 0, "text": text, "logprobs": None,  # stop_reason: as vLLM says
                                      "finish_reason": "stop" if first else "length", "stop_reason": first}],
                         "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                                   "total_tokens": len(prompt.split()) + len(text.split())}}
                self._send(200, json.dumps(reply).encode())
            else:
                self._send(200, json.dumps(completion_body(model, content, top_k, len(prompt.split()))).encode())
            with server._lock:
                server.answered += 1

    return Handler
