"""What the judge did is what the run says: an endpoint without logprobs is recorded as text scoring."""

from __future__ import annotations

import json
from pathlib import Path

from fake_openai_server import FakeOpenAIServer

from emkit.judge.config import JudgeConfig
from emkit.stages.judge import judge_stage


def _run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = [{"id": f"base/none/q{i}/0#0", "model": "base", "condition": "none", "question_id": f"q{i}",
             "paraphrase": 0, "sample": 0, "question": "Any tips for sleeping better?", "system": None,
             "answer": f"Answer {i}."} for i in range(3)]
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_text_fallback_is_what_stats_and_note_say(tmp_path: Path) -> None:
    with FakeOpenAIServer(default="nologprobs", text_reply=lambda prompt: "85") as server:
        cfg = JudgeConfig(judge="openai", judge_model="m", base_url=server.base_url, concurrency=1)
        record = judge_stage(_run(tmp_path / "text"), cfg, emit=lambda _m: None, progress=False)
    info = json.loads((tmp_path / "text" / "stats.json").read_text())["judge"]
    assert info["methods"] == {"text": 6} and record["judge"]["methods"] == {"text": 6}
    assert "top-20 logprobs" not in info["note"] and "text reply" in info["note"] and "text reply" in info["method"]
    with FakeOpenAIServer() as server:
        cfg = JudgeConfig(judge="openai", judge_model="m", base_url=server.base_url, concurrency=1)
        judge_stage(_run(tmp_path / "logprobs"), cfg, emit=lambda _m: None, progress=False)
    info = json.loads((tmp_path / "logprobs" / "stats.json").read_text())["judge"]
    assert info["methods"] == {"logprobs": 6} and "top-20 logprobs" in info["note"]
