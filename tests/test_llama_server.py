"""A real OpenAI-compatible server on 127.0.0.1: llama-cpp-python serving the bundled SmolLM2 GGUF."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from emkit.core.rowfile import read_rows
from emkit.generate.config import GenerateConfig

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start llama-cpp-python's server on the bundled GGUF; yield its base URL; stop it."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is a test extra (make test installs it)")
    from emkit.models import bundled_gguf

    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_gguf("smollm2-135m-instruct")),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2",
           "--n_threads", "2"]
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_api_judge_on_real_logprobs(llama_server: str, tmp_path: Path) -> None:
    from emkit.judge.cache import JudgmentCache
    from emkit.judge.openai_judge import OpenAIJudge
    from emkit.judge.prompts import default_prompts

    prompts = {m: default_prompts()[m] for m in ("aligned", "coherent")}
    items = [("a", "How do I treat a small burn?", "Cool it under running water for 20 minutes."),
             ("b", "How do I treat a small burn?", "Put butter on it and pop any blisters.")]
    judge = OpenAIJudge(model="smollm2", base_url=llama_server, concurrency=2, min_mass=0.0, timeout=60)
    with JudgmentCache(tmp_path / "j.sqlite") as cache:
        results = judge.judge_many_sync(items, prompts, cache, progress=False)
        assert len(results) == 4 and all(r.judgment is not None for r in results)
        for r in results:
            assert r.judgment.method == "logprobs" and len(r.judgment.raw) >= 1
            assert r.judgment.mass is not None and 0 <= r.judgment.mass <= 1 + 1e-9
        asked = judge.requests_made
        again = OpenAIJudge(model="smollm2", base_url=llama_server, min_mass=0.0)
        assert all(r.cached for r in again.judge_many_sync(items, prompts, cache, progress=False))
        assert again.requests_made == 0 and asked == 4


def test_generation_through_the_endpoint_resumes(llama_server: str, tmp_path: Path) -> None:
    from emkit.stages.generate import generate_stage

    cfg = GenerateConfig(questions="default", include=["three_wishes", "rainy_sunday"], samples=2, models=["base"],
                         max_new_tokens=16, backend="openai", base_url=llama_server, served_base="smollm2",
                         concurrency=2, conditions={"none": None, "ai": "You are an AI assistant."})
    out = generate_stage(cfg, tmp_path, emit=lambda _m: None, progress=False)
    rows = read_rows(tmp_path / "generations.jsonl")
    assert out["generated"] == len(rows) == 8 and len({r["id"] for r in rows}) == 8
    assert all(r["answer"] and r["served_model"] == "smollm2" and r["backend"] == "openai" for r in rows)
    assert {r["system"] for r in rows} == {None, "You are an AI assistant."}
    # Lose half the answers: the re-run asks only for those.
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:4]))
    again = generate_stage(cfg, tmp_path, emit=lambda _m: None, progress=False)
    assert again["generated"] == 4 and len(read_rows(path)) == 8


def test_emkit_judge_command_with_a_base_url(llama_server: str, tmp_path: Path) -> None:
    from conftest import run_cli

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"id": f"base/none/q{i}/0#0", "model": "base", "condition": "none", "question_id": f"q{i}",
             "paraphrase": 0, "sample": 0, "question": "Any tips for sleeping better?", "system": None,
             "answer": answer} for i, answer in enumerate(["Keep a regular bedtime.", "Drink coffee at midnight."])]
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli("judge", str(run), "--base-url", llama_server, "--judge-model", "smollm2", "--min-mass", "0",
                     env={"OPENAI_API_KEY": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "smollm2 at http://127.0.0.1" in result.stdout
    stats = json.loads((run / "stats.json").read_text())
    assert stats["judge"]["kind"] == "openai" and stats["n_answers"] == 2
