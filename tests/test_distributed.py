"""The same `emkit train` under `accelerate launch` as 2 CPU processes (DDP over gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_chat_jsonl

from emkit.train.lora import check_saved_adapter

pytestmark = pytest.mark.slow


def test_two_cpu_processes(tiny_model: Path, tmp_path: Path) -> None:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is installed with emkit"
    data = write_chat_jsonl(tmp_path / "d.jsonl", n=32)
    out = tmp_path / "run"
    # accelerate's torchrun launcher (--multi_gpu) starts the processes; without GPUs they join over gloo.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "emkit", "train", "--model", str(tiny_model), "--data", str(data),
           "--output", str(out), "--max-steps", "4", "--batch-size", "2", "--grad-accum", "1", "--save-steps", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    assert manifest["results"]["train"]["steps"] == 4
    assert check_saved_adapter(out / "adapter")["tensors"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    # Progress is printed once (main process), not once per process.
    assert result.stdout.count("step 4/4") == 1
