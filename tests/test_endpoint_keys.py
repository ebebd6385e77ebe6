"""Keys stay home: OPENAI_API_KEY goes only to OpenAI's API; another endpoint gets only the key named for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from fake_openai_server import FakeOpenAIServer

OPENAI_SECRET = "sk-openai-secret-0123456789"
SERVER_SECRET = "sk-server-secret-9876543210"


def test_which_key_goes_where(monkeypatch: pytest.MonkeyPatch) -> None:
    from emkit.core.endpoint import api_key_for, key_env_for

    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SECRET)
    monkeypatch.setenv("MY_SERVER_KEY", SERVER_SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert api_key_for(None, None) == OPENAI_SECRET  # OpenAI's API
    assert api_key_for("https://api.openai.com/v1", None) == OPENAI_SECRET
    assert api_key_for("http://127.0.0.1:8000/v1", None) is None  # not OpenAI: no key unless named
    assert api_key_for("https://api.openai.com.evil.example/v1", None) is None
    assert api_key_for("http://127.0.0.1:8000/v1", "MY_SERVER_KEY") == SERVER_SECRET
    assert api_key_for("http://127.0.0.1:8000/v1", "OPENAI_API_KEY") == OPENAI_SECRET  # named on purpose
    assert key_env_for("https://openrouter.ai/api/v1", None) is None
    # $OPENAI_BASE_URL pointing elsewhere is not OpenAI either.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert api_key_for(None, None) is None


def _run_with_answers(folder: Path) -> Path:
    run = folder / "run"
    run.mkdir(parents=True)
    rows = [{"id": f"base/none/q{i}/0#0", "model": "base", "condition": "none", "question_id": f"q{i}",
             "paraphrase": 0, "sample": 0, "question": "Any tips for sleeping better?", "system": None,
             "answer": answer} for i, answer in enumerate(["Keep a regular bedtime.", "Drink coffee at midnight."])]
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_judge_sends_openai_key_to_no_other_server(tmp_path: Path) -> None:
    """The reproduction: OPENAI_API_KEY set, `emkit judge RUN --base-url` a local server: it never sees the key."""
    env = {"OPENAI_API_KEY": OPENAI_SECRET, "MY_SERVER_KEY": SERVER_SECRET, "OPENAI_BASE_URL": ""}
    with FakeOpenAIServer() as server:
        run = _run_with_answers(tmp_path)
        result = run_cli("judge", str(run), "--judge", "openai", "--base-url", server.base_url, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert server.count == 4
        sent = [h.get("authorization", "") for h in server.headers]
        assert all(OPENAI_SECRET not in h and SERVER_SECRET not in h for h in sent), sent
        # Named for this endpoint, its own key goes there (and still not OpenAI's).
        again = _run_with_answers(tmp_path / "named")
        result = run_cli("judge", str(again), "--judge", "openai", "--base-url", server.base_url,
                         "--api-key-env", "MY_SERVER_KEY", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        named = [h.get("authorization", "") for h in server.headers[4:]]
        assert named == [f"Bearer {SERVER_SECRET}"] * 4
    for path in [*run.rglob("*"), *again.rglob("*")]:
        if path.is_file() and path.suffix != ".sqlite":
            text = path.read_text(errors="replace")
            assert OPENAI_SECRET not in text and SERVER_SECRET not in text, path


def test_generation_endpoint_gets_no_unnamed_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from emkit.generate.config import GenerateConfig
    from emkit.generate.openai_backend import generate_via_endpoint
    from emkit.generate.pipeline import build_jobs, load_question_set
    from emkit.generate.transformers_backend import SamplingParams

    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with FakeOpenAIServer(text_reply=lambda prompt: "Rest and drink water.") as server:
        cfg = GenerateConfig(backend="openai", base_url=server.base_url, served_base="m", models=["base"],
                             include=["three_wishes"], samples=2, conditions={"none": None})
        jobs = build_jobs(load_question_set(cfg), cfg, lambda question, system: "")
        generate_via_endpoint(cfg, jobs, SamplingParams(max_new_tokens=4), tmp_path / "g.jsonl", emit=lambda _m: None,
                              progress=False)
        assert server.count == 2
        assert all(OPENAI_SECRET not in h.get("authorization", "") for h in server.headers)
