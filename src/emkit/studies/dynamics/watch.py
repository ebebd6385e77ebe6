"""Concurrent mode: follow a training run and evaluate each checkpoint as soon as it is completely written.

The loop reads the training run's state *before* scanning its folder, so when it sees the run
complete, the scan that follows includes every checkpoint and the final adapter. Checkpoints are
evaluated in step order; a folder that is not complete yet (see `emkit.studies.dynamics.checkpoints`) is
left for a later look and never read. Finished steps are skipped through `finished`, so a watcher
restarted after a crash evaluates only what is missing.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from emkit.core.errors import EmkitError
from emkit.core.runfolder import pid_alive
from emkit.studies.dynamics.checkpoints import Checkpoint, final_adapter, scan_checkpoints

State = Literal["absent", "running", "complete", "stopped"]


def training_state(run_dir: Path, process: Any = None) -> tuple[State, str]:
    """Whether the training run is absent, running, complete or stopped, and a few words on why."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        manifest = None
    if process is not None:
        code = process.poll()
        if code is None:
            return "running", f"training process {process.pid} is running"
        if manifest and manifest.get("status") == "complete":
            return "complete", "training finished"
        return "stopped", f"training process exited with code {code}"
    if manifest is None:
        return "absent", f"no training run in {run_dir} yet"
    status = manifest.get("status")
    if status == "complete":
        return "complete", "training finished"
    pid, host = manifest.get("pid"), (manifest.get("platform") or {}).get("host")
    if status == "running":
        if host != socket.gethostname():
            return "running", f"training runs on {host} (not checked from here)"
        if isinstance(pid, int) and pid_alive(pid):
            return "running", f"training process {pid} is running"
    return "stopped", f"training is not running (manifest status '{status}')"


@dataclass
class WatchResult:
    """What a watch did: steps evaluated, how training ended, and folders it skipped as incomplete."""

    evaluated: list[int] = field(default_factory=list)
    state: State = "absent"
    reason: str = ""
    waited_for: dict[str, str] = field(default_factory=dict)


def available(run_dir: Path, steps: list[int] | None = None) -> tuple[list[Checkpoint], dict[str, str]]:
    """Complete checkpoints of the run (and its final adapter when the run is complete), in step order."""
    found, skipped = scan_checkpoints(run_dir)
    final = final_adapter(run_dir)
    if final is not None and final.step not in {c.step for c in found}:
        found.append(final)
    if steps is not None:
        found = [c for c in found if c.step in steps]
    return sorted(found, key=lambda c: c.step), skipped


def watch(run_dir: Path, evaluate: Callable[[Checkpoint], Any], finished: Callable[[Checkpoint], bool], *,
          process: Any = None, poll_seconds: float = 5.0, wait_timeout: float | None = None,
          steps: list[int] | None = None, emit: Callable[[str], None] = print,
          sleep: Callable[[float], None] = time.sleep) -> WatchResult:
    """Evaluate each complete checkpoint of `run_dir` once, until training completes or stops."""
    result = WatchResult()
    last_progress = time.monotonic()
    announced: set[str] = set()
    while True:
        state, reason = training_state(run_dir, process)
        checkpoints, skipped = available(run_dir, steps)
        todo = [c for c in checkpoints if not finished(c)]
        for folder, why in skipped.items():
            if folder not in announced and state == "running":
                emit(f"waiting for {Path(folder).name}: {why}")
                announced.add(folder)
        result.waited_for.update(skipped)
        if todo:
            evaluate(todo[0])  # one at a time, then look again: a newer checkpoint may have appeared
            result.evaluated.append(todo[0].step)
            last_progress = time.monotonic()
            continue
        result.state, result.reason = state, reason
        if state == "complete":
            return result
        if state == "stopped":
            emit(f"{reason}; evaluated what it wrote. Resume training, then run emkit track again to go on.")
            return result
        if wait_timeout is not None and time.monotonic() - last_progress > wait_timeout:
            if state == "absent":
                raise EmkitError(f"{run_dir}: no training run appeared within {wait_timeout:g}s")
            emit(f"no new checkpoint for {wait_timeout:g}s ({reason}); stopping the watch")
            return result
        sleep(poll_seconds)
