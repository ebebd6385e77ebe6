"""Finding a training run's checkpoints and deciding whether each one is completely written.

A LoRA checkpoint holds an adapter: `adapter_config.json` and `adapter_model.safetensors` (never a
`pytorch_model.bin` or `model.safetensors`; waiting for those waits forever). emkit's trainer exports
`<run>/checkpoints/step-N/` with a `step.json` beside the adapter, through a temporary folder renamed
into place (`emkit.core.runfolder.atomic_dir`); a plain transformers Trainer writes `checkpoint-N/` in place and
writes `trainer_state.json` last. Either layout is accepted, and neither is trusted on its name alone:
a checkpoint counts as complete only when

- its step marker parses and names the folder's step (`step.json` "step", or `trainer_state.json`
  "global_step"),
- `adapter_config.json` parses as a JSON object, and
- `adapter_model.safetensors` is whole: its header parses and the file is exactly as long as the
  header's last tensor ends, with at least one lora_A and one lora_B tensor, every lora_A paired with
  its lora_B.

Anything less (a folder being copied into, a truncated tensor file, a missing marker, the hidden
`.step-N.tmp-PID` folder of an export in progress) is skipped until a later look finds it complete.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_EMKIT = re.compile(r"step-(\d+)")
_TRAINER = re.compile(r"checkpoint-(\d+)")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class Checkpoint:
    """One adapter to evaluate: its training step and folder (step 0 is the base model, no folder)."""

    step: int
    path: Path | None
    label: str = ""

    @property
    def name(self) -> str:
        """Folder name of its evaluation results, e.g. step-40."""
        return f"step-{self.step}"


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def safetensors_problem(path: Path) -> str | None:
    """Why a LoRA safetensors file is not whole, or None when it is."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                return "header runs past the end of the file"
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        return f"no {path.name}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "header without data offsets"
    if size != 8 + length + end:
        return f"{size} bytes, expected {8 + length + end} (still being written?)"
    a = {k.replace("lora_A", "#") for k in tensors if "lora_A" in k}
    b = {k.replace("lora_B", "#") for k in tensors if "lora_B" in k}
    if not a or not b:
        return "no lora_A / lora_B tensors"
    if a != b:
        return f"unpaired LoRA tensors (e.g. {sorted(a ^ b)[0].replace('#', 'lora_A/B')})"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a completely written LoRA checkpoint, or None when it is (see the module doc)."""
    emkit, trainer = _EMKIT.fullmatch(folder.name), _TRAINER.fullmatch(folder.name)
    if not (emkit or trainer):
        return "not a step-N or checkpoint-N folder"
    step = int((emkit or trainer).group(1))  # type: ignore[union-attr]
    if emkit:
        marker = _json_object(folder / "step.json")
        if marker is None or marker.get("step") != step:
            return "no step.json naming this step"
    else:
        marker = _json_object(folder / "trainer_state.json")
        if marker is None or marker.get("global_step") != step:
            return "no trainer_state.json naming this step"
    if _json_object(folder / ADAPTER_CONFIG) is None:
        return f"no readable {ADAPTER_CONFIG}"
    return safetensors_problem(folder / ADAPTER_WEIGHTS)


def scan_checkpoints(run_dir: Path) -> tuple[list[Checkpoint], dict[str, str]]:
    """Complete checkpoints of a run, by step, and why each other candidate folder was skipped.

    Looks in `<run>/checkpoints/step-N` (emkit), then `<run>/checkpoint-N` (a Trainer's output folder);
    a step found in both is taken from the first.
    """
    found: dict[int, Checkpoint] = {}
    skipped: dict[str, str] = {}
    candidates = [p for p in sorted((run_dir / "checkpoints").glob("step-*")) if p.is_dir()]
    candidates += [p for p in sorted(run_dir.glob("checkpoint-*")) if p.is_dir()]
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is not None:
            skipped[str(folder)] = problem
            continue
        step = int(folder.name.rsplit("-", 1)[1])
        found.setdefault(step, Checkpoint(step, folder))
    return [found[s] for s in sorted(found)], skipped


def final_adapter(run_dir: Path) -> Checkpoint | None:
    """The finished run's adapter (`<run>/adapter`) at its last step, when the run is complete."""
    manifest = _json_object(run_dir / "manifest.json")
    if not manifest or manifest.get("status") != "complete":
        return None
    steps = ((manifest.get("results") or {}).get("train") or {}).get("steps")
    folder = run_dir / "adapter"
    if not isinstance(steps, int) or _json_object(folder / ADAPTER_CONFIG) is None:
        return None
    if safetensors_problem(folder / ADAPTER_WEIGHTS) is not None:
        return None
    return Checkpoint(steps, folder, "final")
