"""Trainer callbacks: a progress line (loss, tokens/s, ETA) and export of each checkpoint's adapter."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from emkit.core.runfolder import atomic_dir

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressLine(TrainerCallback):
    """Print `step i/N | loss | lr | tokens/s | ETA` at every logging step (main process only)."""

    def __init__(self, emit: Callable[[str], None] = print) -> None:
        self.emit = emit
        self.t0: float | None = None
        self.step0 = 0
        self.tokens0 = 0
        self.last = (0.0, 0)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remember where this process started (a resumed run starts mid-way)."""
        self.t0 = time.monotonic()
        self.step0 = state.global_step
        self.tokens0 = state.num_input_tokens_seen or 0
        self.last = (self.t0, self.tokens0)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Emit one progress line from the trainer's latest logs."""
        if not state.is_world_process_zero or not logs or "loss" not in logs or self.t0 is None:
            return
        now = time.monotonic()
        tokens = state.num_input_tokens_seen or 0
        elapsed = now - self.t0
        rate = (tokens - self.tokens0) / elapsed if elapsed > 0 else 0.0
        done = state.global_step - self.step0
        left = state.max_steps - state.global_step
        eta = elapsed / done * left if done else 0.0
        pct = 100 * state.global_step / max(state.max_steps, 1)
        logs["tokens_per_second"] = round(rate, 1)
        self.emit(
            f"step {state.global_step}/{state.max_steps} ({pct:.0f}%) | epoch {state.epoch or 0:.2f} | "
            f"loss {logs['loss']:.4f} | lr {logs.get('learning_rate', 0):.2e} | {rate:,.0f} tok/s | "
            f"ETA {_duration(eta)}"
        )


class ExportCheckpoints(TrainerCallback):
    """After each trainer save, copy the adapter into `checkpoints/step-N/`, complete or not at all.

    The trainer's own checkpoints (optimizer state included) are rotated for resuming; these small
    adapter folders are kept for analysis, and appear only once fully written, so a concurrent
    evaluator never reads half a checkpoint.
    """

    def __init__(self, train_state: Path, checkpoints: Path) -> None:
        self.train_state = train_state
        self.checkpoints = checkpoints

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Export the checkpoint just saved."""
        if not state.is_world_process_zero:
            return
        source = self.train_state / f"checkpoint-{state.global_step}"
        if not (source / ADAPTER_FILES[0]).is_file():
            return
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
        with atomic_dir(self.checkpoints / f"step-{state.global_step}") as tmp:
            for name in ADAPTER_FILES:
                shutil.copy2(source / name, tmp / name)
            (tmp / "step.json").write_text(
                json.dumps(
                    {"step": state.global_step, "epoch": state.epoch, "loss": loss,
                     "tokens_seen": state.num_input_tokens_seen, "max_steps": state.max_steps},
                    indent=2,
                ),
                encoding="utf-8",
            )
