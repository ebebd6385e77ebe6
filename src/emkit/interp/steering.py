"""Steering and ablation at inference: forward hooks on block outputs, always removed.

Every edit acts on the output of the hooked module (layer k = block k's output, see `layers`), at
every position of every forward pass. Under KV-cached decoding each new token is its own forward
pass through the same blocks, so generated tokens are edited exactly like prompt tokens, and the
cached keys/values were computed from edited states. Left padding needs nothing special: pad
positions are edited too, but no real token attends to them.

    with ablate(model, {8: u}):            h <- h - (h.u)u          (u unit)
    with project_out(model, {8: u}, 0.5):  h <- h - 0.5 (h.u)u
    with add(model, {8: v}, -2.0):         h <- h - 2.0 v           (v as given, raw or unit)

The context managers remove their hooks in `finally`, also when the block raises; `Steering` is the
manual handle (`.remove()`) for code that cannot use a `with`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emkit.interp.layers import EMBED, block_output, layer_module, replace_block_output

Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Steering:
    """Handles of installed hooks; `remove()` takes them all out (idempotent)."""

    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        """Remove every hook this handle installed."""
        while self.handles:
            self.handles.pop().remove()


def _as_tensor(vector: Any) -> torch.Tensor:
    if isinstance(vector, torch.Tensor):
        return vector.detach().float().flatten()
    return torch.as_tensor(np.asarray(vector, dtype=np.float32)).flatten()


def install(model: nn.Module, edits: Mapping[int, Edit]) -> Steering:
    """Install one edit per layer on the module whose output is that layer; returns the handle."""
    handle = Steering()
    try:
        for layer, edit in edits.items():
            module = layer_module(model, layer)

            def hook(_module: nn.Module, _inputs: Any, output: Any, edit: Edit = edit) -> Any:
                hidden = block_output(output)
                return replace_block_output(output, edit(hidden))

            handle.handles.append(module.register_forward_hook(hook))
    except BaseException:
        handle.remove()
        raise
    return handle


@contextlib.contextmanager
def hooks(model: nn.Module, edits: Mapping[int, Edit]) -> Iterator[Steering]:
    """Edits active inside the block only; hooks are removed on exit and on error."""
    handle = install(model, edits)
    try:
        yield handle
    finally:
        handle.remove()


def projection_edit(direction: Any, strength: float = 1.0) -> Edit:
    """h <- h - strength (h.u)u with u the unit direction (strength 1: full ablation)."""
    u = _as_tensor(direction)
    u = u / u.norm().clamp_min(1e-12)
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def edit(h: torch.Tensor) -> torch.Tensor:
        key = (h.device, h.dtype)
        if key not in cache:
            cache[key] = u.to(h.device)
        uu = cache[key]
        # The projection is computed in float32 so that bf16 states are ablated to bf16 precision.
        coeff = h.float() @ uu
        return (h.float() - strength * coeff.unsqueeze(-1) * uu).to(h.dtype)

    return edit


def addition_edit(vector: Any, coefficient: float) -> Edit:
    """h <- h + coefficient * v (v as given: a raw mean difference or a unit vector)."""
    v = _as_tensor(vector)

    def edit(h: torch.Tensor) -> torch.Tensor:
        if coefficient == 0:
            return h
        return (h.float() + coefficient * v.to(h.device)).to(h.dtype)

    return edit


def ablate(model: nn.Module, directions: Mapping[int, Any]) -> contextlib.AbstractContextManager[Steering]:
    """Project each layer's direction out of that layer's output (h - (h.u)u)."""
    return hooks(model, {layer: projection_edit(d, 1.0) for layer, d in directions.items()})


def project_out(model: nn.Module, directions: Mapping[int, Any], strength: float
                ) -> contextlib.AbstractContextManager[Steering]:
    """Remove `strength` times each direction's projection (0: nothing, 1: ablation, >1: flips it)."""
    return hooks(model, {layer: projection_edit(d, strength) for layer, d in directions.items()})


def add(model: nn.Module, directions: Mapping[int, Any], coefficient: float
        ) -> contextlib.AbstractContextManager[Steering]:
    """Add `coefficient` times each layer's vector to that layer's output (negative: subtract)."""
    return hooks(model, {layer: addition_edit(d, coefficient) for layer, d in directions.items()})


def random_control(direction: Any, seed: int = 0) -> np.ndarray:
    """A random direction of the same norm as `direction` (seeded; the control of every steering arm)."""
    d = np.asarray(direction, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(d.shape[0])
    return (r / np.linalg.norm(r) * np.linalg.norm(d)).astype(np.float32)


def steering_edits(mode: str, directions: Mapping[int, Any], strength: float) -> dict[int, Edit]:
    """Edits for a named mode: 'ablate' (project out x strength), 'add' (+strength v), 'subtract' (-strength v)."""
    if mode == "ablate":
        return {k: projection_edit(v, strength) for k, v in directions.items()}
    if mode == "add":
        return {k: addition_edit(v, strength) for k, v in directions.items()}
    if mode == "subtract":
        return {k: addition_edit(v, -strength) for k, v in directions.items()}
    raise ValueError(f"unknown steering mode '{mode}' (accepted: ablate, add, subtract)")


# -- weight-level ablation -------------------------------------------------------------------------

RESIDUAL_WRITERS = ("o_proj", "down_proj", "dense", "c_proj", "out_proj", "fc2", "dense_4h_to_h")


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def ablate_lora_weights(model: nn.Module, directions: Mapping[int, Any], *, adapter_name: str = "default",
                        all_blocks_from: int | None = None) -> list[str]:
    """Project directions out of the LoRA B matrices that write to the residual stream; returns edited names.

    A LoRA update on a residual writer (o_proj, down_proj ...) adds B(Ax) to the stream; replacing B by
    (I - uu^T)B makes that update orthogonal to u. The direction of layer k is removed from the writers
    of blocks <= k (everything that can have put it there); with `all_blocks_from` set, one direction
    (the single one given) is removed from every block >= that index instead.
    """
    edited = []
    units = {k: _as_tensor(v) / _as_tensor(v).norm().clamp_min(1e-12) for k, v in directions.items()}
    with torch.no_grad():
        for name, module in model.named_modules():
            lora_b = getattr(module, "lora_B", None)
            if not isinstance(lora_b, nn.ModuleDict) or adapter_name not in lora_b:
                continue
            if not any(name.endswith(w) for w in RESIDUAL_WRITERS):
                continue
            block = _block_index(name)
            if block is None:
                continue
            if all_blocks_from is not None:
                us = list(units.values())[:1] if block >= all_blocks_from else []
            else:
                us = [u for k, u in units.items() if k != EMBED and block <= k]
            weight = lora_b[adapter_name].weight  # (out_features, rank): columns live in the residual space
            if not us or weight.shape[0] != us[0].shape[0]:
                continue
            w = weight.float()
            for u in us:
                u = u.to(w.device)
                w = w - torch.outer(u, u @ w)
            weight.copy_(w.to(weight.dtype))
            edited.append(name)
    return edited


def save_ablated_adapter(adapter_dir: Path, directions: Mapping[int, Any], out_dir: Path, *,
                         base_spec: str | None = None, device: str = "cpu") -> list[str]:
    """Write a copy of an adapter with the directions projected out of its residual-writing B matrices."""
    from emkit.models import load_model
    from emkit.runs import atomic_dir

    loaded = load_model(base_spec, adapter=adapter_dir, device=device) if base_spec else load_model(
        str(adapter_dir), device=device)
    edited = ablate_lora_weights(loaded.model, directions)
    with atomic_dir(out_dir) as tmp:
        loaded.model.save_pretrained(tmp)
    return edited
