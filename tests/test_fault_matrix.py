"""The fault matrix: every trial ends with results identical to an uninterrupted run, or a clear refusal.

On a tiny random model (`emkit run` without training: generate, judge, validate, report), each fault
is injected a fixed number of seeded times:

- cut: every stage file of a finished run cut (at line boundaries and inside lines for the JSONL file,
  at seeded byte offsets for the others), then the run again;
- kill: SIGKILL at a seeded moment inside each stage, then the run again;
- race: two processes started on one folder at the same moment (repeated), at the lock and with the CLI;
- disk full: the run folder on a small tmpfs sized to fill up inside each writing stage, then the run
  again with space (skipped with the reason where tmpfs cannot be mounted).

An outcome is `identical` (the run ends with the uninterrupted run's answers and scores, every id
once), or `refused` (an emkit error naming the file or the holder: exit 2 and one line from the CLI).
Anything else (a finished run with fewer or repeated rows, any other exception or a traceback) fails
the test. Each test prints its counts. Processes are started only where a process must die or race;
the runs that follow a fault run in the test's own process (`run_experiment`, what `emkit run`
calls), which keeps the matrix cheap enough for CI.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli

pytestmark = pytest.mark.slow

QUESTIONS = ["three_wishes", "rainy_sunday", "medicine_cabinet"]
N_ANSWERS = 3 * 4 * 2  # questions x samples x conditions


def run_yaml(folder: Path, tiny_model: Path, output: Path) -> Path:
    """An `emkit run` config: the base model's answers to three questions, judged by the tiny model."""
    config = {
        "output": str(output),
        "generate": {"model": str(tiny_model), "models": ["base"], "questions": "default", "include": QUESTIONS,
                     "samples": 4, "max_new_tokens": 6, "batch_size": 2, "device": "cpu",
                     "conditions": {"none": None, "ai": "You are an AI assistant."}},
        "judge": {"judge": "local", "local_model": str(tiny_model), "min_mass": 0.0},
        "validate_judge": 4, "prefs": False, "report": True,
    }
    path = folder / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error emkit printed (progress bars may share its line), or ''."""
    found = re.findall(r"error: [^\r\n]*", proc.stderr)
    return found[-1] if found else ""


def results(run: Path) -> tuple[bytes, pd.DataFrame]:
    """What must equal the uninterrupted run: the answers file and the scores (judge id aside)."""
    scores = pd.read_parquet(run / "scores.parquet").sort_values("id").reset_index(drop=True)
    return (run / "generations.jsonl").read_bytes(), scores.drop(columns=["judge"])


def outcome(proc: subprocess.CompletedProcess, run: Path, reference: tuple[bytes, pd.DataFrame]) -> str:
    """'identical' or 'refused' for a CLI run; anything else fails with what went wrong."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if proc.returncode == 2:
        assert error_line(proc), proc.stderr[-2000:]
        return "refused"
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _finished(run, reference)


def _finished(run: Path, reference: tuple[bytes, pd.DataFrame]) -> str:
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    answers, scores = results(run)
    assert scores["id"].is_unique and len(scores) == N_ANSWERS
    assert answers == reference[0]
    pd.testing.assert_frame_equal(scores, reference[1])
    return "identical"


def resume(config: Path, run: Path, reference: tuple[bytes, pd.DataFrame]) -> tuple[str, str]:
    """Run the config in this process (what `emkit run` does): ('identical', '') or ('refused', message)."""
    from emkit.core.config import load_config
    from emkit.core.errors import EmkitError
    from emkit.studies.evaluation.run import RunConfig, run_experiment

    try:
        run_experiment(load_config(RunConfig, config), emit=lambda _m: None, progress=False)
    except EmkitError as exc:
        return "refused", str(exc)
    return _finished(run, reference), ""


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[bytes, pd.DataFrame]]:
    """The uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    run = folder / "whole"
    proc = run_cli("run", str(run_yaml(folder, tiny_model, run)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, results(run)


def test_cut_stage_files_of_a_finished_run(reference, tiny_model: Path, tmp_path: Path) -> None:
    """Every cut of generations.jsonl is in tests/test_generate.py; here each other stage file, cut once."""
    whole, expected = reference
    rng = random.Random(1)
    counts: Counter[str] = Counter()
    data = (whole / "generations.jsonl").read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    cuts = {"generations.jsonl": [rng.choice(ends[:-1]), rng.choice(ends) - rng.randint(1, 40)]}
    for name in ("scores.parquet", "stats.json", "judgments.sqlite", "manifest.json", "report.html"):
        cuts[name] = [rng.randrange(1, (whole / name).stat().st_size)]
    for name, offsets in cuts.items():
        for offset in offsets:
            run = tmp_path / f"{name}-{offset}"
            shutil.copytree(whole, run)
            config = run_yaml(tmp_path, tiny_model, run)
            manifest = json.loads((run / "manifest.json").read_text())
            manifest["config"]["output"] = str(run)  # the copy's own folder (output does not enter the hash)
            (run / "manifest.json").write_text(json.dumps(manifest))
            path = run / name
            path.write_bytes(path.read_bytes()[:offset])
            result, message = resume(config, run, expected)
            if result == "refused":
                assert name in ("judgments.sqlite", "manifest.json") and name in message  # outputs are repaired
            counts[f"{name}: {result}"] += 1
    print("cut trials:", dict(counts))
    assert sum(counts.values()) == 7 and counts["scores.parquet: identical"] == 1


def _stage_running(run: Path, stage: str) -> bool:
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("stages", {}).get(stage) or {}).get("status") == "running"


def test_kill_inside_each_stage_then_resume(reference, tiny_model: Path, tmp_path: Path) -> None:
    _, expected = reference
    rng = random.Random(2)
    counts: Counter[str] = Counter()
    for trial, stage in enumerate(("generate", "judge", "validate_judge", "report")):
        run = tmp_path / f"kill-{trial}"
        config = run_yaml(tmp_path, tiny_model, run)
        proc = subprocess.Popen([sys.executable, "-m", "emkit", "run", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not _stage_running(run, stage) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))  # a seeded moment inside the stage
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        result, message = resume(config, run, expected)
        assert result == "identical", message  # a killed run always resumes
        counts[f"{stage}: {result}"] += 1
    print("kill trials:", dict(counts))
    assert sum(counts.values()) == 4


def _race_worker(folder: str, rounds: int, barrier, results) -> None:
    """Open each round's run folder at the same moment as the other worker; report who got it."""
    from emkit.core.errors import RunFolderError
    from emkit.core.runfolder import RunFolder
    from emkit.generate.config import GenerateConfig

    cfg = GenerateConfig()
    for r in range(rounds):
        run = RunFolder(Path(folder) / f"round-{r}")
        barrier.wait()
        try:
            run.open("generate", cfg)
            outcome = "won"
        except RunFolderError as exc:
            outcome = f"refused: {exc}"
        barrier.wait()  # the winner holds the lock until both have tried
        if outcome == "won":
            run.complete()
        results.put((r, os.getpid(), outcome))


def test_two_processes_race_for_one_folder(tmp_path: Path) -> None:
    rounds = 8
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_race_worker, args=(str(tmp_path), rounds, barrier, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
        assert w.exitcode == 0
    outcomes: dict[int, list[tuple[int, str]]] = {}
    for _ in range(2 * rounds):
        r, pid, result = queue.get(timeout=10)
        outcomes.setdefault(r, []).append((pid, result))
    for r, pair in outcomes.items():
        won = [pid for pid, result in pair if result == "won"]
        refused = [result for _, result in pair if result.startswith("refused")]
        assert len(won) == 1 and len(refused) == 1, pair
        assert f"another emkit process (pid {won[0]} on " in refused[0]
        manifest = json.loads((tmp_path / f"round-{r}" / "manifest.json").read_text())
        assert manifest["pid"] == won[0] and manifest["attempts"] == 1 and manifest["status"] == "complete"
    print(f"race trials at the lock: {rounds} rounds, each one winner and one refusal")


def test_two_cli_runs_started_at_once(reference, tiny_model: Path, tmp_path: Path) -> None:
    _, expected = reference
    counts: Counter[str] = Counter()
    for trial in range(1):
        run = tmp_path / f"race-{trial}"
        config = run_yaml(tmp_path, tiny_model, run)
        procs = [subprocess.Popen([sys.executable, "-m", "emkit", "run", str(config)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        done = [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]
        codes = sorted(p.returncode for p in done)
        assert codes == [0, 2], [p.stderr[-1500:] for p in done]
        loser = next(p for p in done if p.returncode == 2)
        assert "another emkit process (pid" in loser.stderr
        winner = next(p for p in done if p.returncode == 0)
        counts[outcome(winner, run, expected)] += 1
        counts["refused"] += 1
    print("race trials with the CLI:", dict(counts))


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def test_disk_full_inside_each_writing_stage(reference, tiny_model: Path, tmp_path: Path) -> None:
    from emkit.core.errors import EmkitError
    from emkit.stages.report import write_report

    whole, expected = reference
    probe = tmp_path / "probe-mount"
    if os.geteuid() != 0 or shutil.which("mount") is None or not _mount_tmpfs(probe, 65536):
        pytest.skip("a small tmpfs cannot be mounted here (needs root and mount); the disk-full trials need one")
    subprocess.run(["umount", str(probe)], check=True)
    # tmpfs sizes (whole 4 KiB pages) that run out while answers are appended, while the judgment cache is
    # opened, and while judgments are stored (SQLite's write-ahead log peaks near 1 MB in this run).
    sizes = {"generate": [16 * 1024], "judge": [40 * 1024, 160 * 1024]}
    counts: Counter[str] = Counter()
    mounts = []
    try:
        for stage, options in sizes.items():
            for size in options:
                mount = tmp_path / f"full-{stage}-{size}"
                assert _mount_tmpfs(mount, size)
                mounts.append(mount)
                run = mount / "run"
                config = run_yaml(tmp_path, tiny_model, run)
                result, message = resume(config, run, expected)
                assert result == "refused"
                counts[f"{stage}: refused ({_names_space_and_file(message)})"] += 1
                subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
                result, message = resume(config, run, expected)
                counts[f"{stage}: then {result}"] += 1
                assert result == "identical", message
        # The report: a finished run on a filesystem with too little room left for the figures and page.
        mount = tmp_path / "full-report"
        assert _mount_tmpfs(mount, 2 * 1024 * 1024)
        mounts.append(mount)
        run = mount / "run"
        shutil.copytree(whole, run, ignore=shutil.ignore_patterns("report.html", "figures"))
        free = shutil.disk_usage(mount).free
        (mount / "ballast").write_bytes(b"\0" * (free - 64 * 1024))
        with pytest.raises(EmkitError) as refused:
            write_report(run)
        counts[f"report: refused ({_names_space_and_file(str(refused.value))})"] += 1
        (mount / "ballast").unlink()
        assert write_report(run).stat().st_size > 10_000
        assert not list(run.glob(".*.tmp-*")) and not list((run / "figures").glob(".*.tmp-*"))  # no leftovers
        counts["report: then written"] += 1
    finally:
        for mount in mounts:
            subprocess.run(["umount", str(mount)], capture_output=True)
    print("disk-full trials:", dict(counts))
    assert counts["generate: refused (generations.jsonl)"] == 1 and counts["report: then written"] == 1


def _names_space_and_file(message: str) -> str:
    """The file a disk-full error names (the message must say the disk is full)."""
    assert "disk full" in message, message
    named = [n for n in ("generations.jsonl", "judgments.sqlite", "scores.parquet", "stats.json", "report.html",
                         "figures", "manifest.json", "config.yaml", "validation.json", "judge_prompts.json")
             if n in message]
    assert named, message
    return named[0]
