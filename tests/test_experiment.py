"""`emkit run`: the whole experiment on a tiny model, and interrupted runs that resume to the same result."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli, write_chat_jsonl

pytestmark = pytest.mark.slow


def experiment_yaml(tmp_path: Path, tiny_model: Path, output: Path) -> Path:
    data = write_chat_jsonl(tmp_path / "organism-data.jsonl", n=48)
    config = {
        "output": str(output),
        "train": {"model": str(tiny_model), "data": str(data), "max_steps": 30, "batch_size": 2, "grad_accum": 1,
                  "lr": 5e-3, "warmup_steps": 0, "save_steps": 5, "device": "cpu"},
        "generate": {"questions": "default", "include": ["three_wishes", "rainy_sunday", "medicine_cabinet"],
                     "samples": 4, "max_new_tokens": 6, "batch_size": 2, "device": "cpu",
                     "conditions": {"none": None, "ai": "You are an AI assistant."}},
        "judge": {"judge": "local", "local_model": str(tiny_model), "min_mass": 0.0},
        "validate_judge": 6,
        "prefs": True,
        "report": True,
    }
    path = tmp_path / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start `emkit ARGS`, SIGKILL it as soon as `ready()` holds (or it exits)."""
    proc = subprocess.Popen([sys.executable, "-m", "emkit", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def cached(path: Path) -> int:
    if not path.is_file():
        return 0
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return db.execute("select count(*) from judgments").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_interrupted_run_resumes_to_the_same_results(tiny_model: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    result = run_cli("run", str(experiment_yaml(tmp_path, tiny_model, whole)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EM rate" in result.stdout and "report: " in result.stdout
    for name in ("generations.jsonl", "judgments.sqlite", "scores.parquet", "stats.json", "report.html", "prefs.json",
                 "organism/adapter/adapter_config.json"):
        assert (whole / name).exists(), name
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["judge"]["kind"] == "local"
    assert set(manifest["stages"]) == {"train", "generate", "judge", "validate_judge", "prefs", "report"}
    assert (whole / "validation.json").is_file() and (whole / "prefs.json").is_file()
    assert "Preference shift organism - base" in result.stdout and "VALID" in result.stdout

    broken = tmp_path / "broken"
    args = ["run", str(experiment_yaml(tmp_path, tiny_model, broken))]
    kill_when(args, lambda: (broken / "organism" / "train_state" / "checkpoint-10" / "trainer_state.json").exists())
    kill_when(args, lambda: lines(broken / "generations.jsonl") >= 8)
    assert 8 <= lines(broken / "generations.jsonl") < 48
    kill_when(args, lambda: cached(broken / "judgments.sqlite") >= 10)
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]

    a = pd.read_parquet(whole / "scores.parquet").sort_values("id").reset_index(drop=True)
    b = pd.read_parquet(broken / "scores.parquet").sort_values("id").reset_index(drop=True)
    assert len(b) == len(a) == 48 and b["id"].is_unique
    pd.testing.assert_frame_equal(a.drop(columns=["judge"]), b.drop(columns=["judge"]))
    assert lines(broken / "generations.jsonl") == 48  # no duplicated rows

    # A complete run re-run: every stage skips or is recomputed from files, nothing is asked again.
    before = cached(broken / "judgments.sqlite")
    assert run_cli(*args).returncode == 0
    assert cached(broken / "judgments.sqlite") == before and lines(broken / "generations.jsonl") == 48


def test_bad_config_fails_before_any_folder(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"output: {tmp_path / 'out'}\ngenerate:\n  questions: default\n  include: [no_such_question]\n")
    result = run_cli("run", str(config))
    assert result.returncode == 2 and "no_such_question" in result.stderr
    assert not (tmp_path / "out").exists()
    config.write_text(f"output: {tmp_path / 'out'}\ngenerate:\n  samplez: 3\n")
    result = run_cli("run", str(config))
    assert result.returncode == 2 and "bad.yaml:3: generate.samplez: unknown field" in result.stderr
