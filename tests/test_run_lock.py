"""The run folder's lock: taken before anything is read or written, released when the run ends either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from emkit.core.errors import RunFolderError
from emkit.core.runfolder import LOCK, RunFolder, acquire_lock, holds_lock, release_lock
from emkit.generate.config import GenerateConfig


def test_lock_is_held_while_running_and_released_at_the_end(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    assert run.open("generate", GenerateConfig()) == "new" and holds_lock(run.path)
    with pytest.raises(ValueError), run.stage("generate"):
        raise ValueError("boom")
    assert not holds_lock(run.path)  # a failed stage ends the run: another process may resume it
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "failed"
    assert run.open("generate", GenerateConfig()) == "resume" and holds_lock(run.path)
    run.complete()
    assert not holds_lock(run.path)
    # A folder holding only the lock (a run that died before its manifest) is not "someone else's folder".
    other = RunFolder(tmp_path / "other")
    acquire_lock(other.path)
    release_lock(other.path)
    assert [p.name for p in other.path.iterdir()] == [LOCK]
    assert other.open("generate", GenerateConfig()) == "new"
    other.complete()


def test_config_yaml_without_manifest_resumes(tmp_path: Path) -> None:
    """The manifest is written before config.yaml: a run that died in between is still its own."""
    run = RunFolder(tmp_path / "run")
    run.open("generate", GenerateConfig())
    (run.path / "config.yaml").unlink()
    release_lock(run.path)
    assert run.open("generate", GenerateConfig()) == "resume"
    run.complete()


def test_emkit_judge_waits_for_no_one(tmp_path: Path) -> None:
    """`emkit judge RUN` on a folder another process holds is refused in one line naming the holder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "generations.jsonl").write_text(json.dumps({"id": "a#0", "question_id": "q", "question": "Q?",
                                                       "answer": "A."}) + "\n")
    acquire_lock(run)
    try:
        result = run_cli("judge", str(run), "--judge", "local", "--local-model", "nonexistent-model")
    finally:
        release_lock(run)
    assert result.returncode == 2 and "another emkit process (pid" in result.stderr
    assert not (run / "scores.parquet").exists()


def test_second_open_in_another_process_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    run = RunFolder(tmp_path / "run")
    run.open("generate", GenerateConfig())
    code = ("import sys; from pathlib import Path; from emkit.core.runfolder import RunFolder; from emkit.generate.config import "
            "GenerateConfig; from emkit.core.errors import RunFolderError\n"
            f"try:\n    RunFolder(Path({str(run.path)!r})).open('generate', GenerateConfig())\n"
            "except RunFolderError as exc:\n    print(exc); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "another emkit process (pid" in proc.stdout
    run.complete()
    with pytest.raises(RunFolderError, match="holds a 'generate' run, not 'train'"):
        RunFolder(run.path).open("train", GenerateConfig())
    assert not holds_lock(run.path)  # a refused open keeps nothing


def test_report_refuses_scores_with_a_repeated_answer(tmp_path: Path) -> None:
    import pandas as pd

    from emkit.stages.report import load_scores

    pd.DataFrame({"id": ["a", "a"], "question_id": ["q", "q"], "aligned": [1.0, 1.0], "coherent": [90.0, 90.0]}
                 ).to_parquet(tmp_path / "scores.parquet")
    with pytest.raises(RunFolderError, match="answer a appears more than once"):
        load_scores(tmp_path)
