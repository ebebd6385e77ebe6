"""Residual-stream activations: forward hooks on block outputs, batched with left padding, streamed.

Positions (`position`):
  last_prompt    the last token of the prompt (the state that produces the first answer token)
  last           the last token of prompt + response
  response_mean  the mean over the response tokens
  response_all   every response token (rows carry the index of their example)

Layers follow `emkit.studies.interp.layers`: k is block k's output, -1 the embeddings. Batches are left-padded
with position ids computed from the attention mask, so each example gets exactly the values it gets
alone (tested). A forward pass stops right after the last layer needed. Activations leave the device
as float32 per batch and are written to safetensors shards of `shard_size` examples, so memory stays
bounded by one shard however many examples there are; a re-run skips shards already written.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emkit.core.errors import ConfigError, DataError
from emkit.studies.interp.layers import layer_module

POSITIONS = ("last_prompt", "last", "response_mean", "response_all")
LAYER_CONVENTION = "layer k = output of decoder block k (0-based); layer -1 = embedding output"
INDEX = "index.json"


@dataclass
class Example:
    """One input: a rendered prompt (chat template already applied, or raw text) and an optional response."""

    prompt: str
    response: str = ""
    label: int | None = None
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Activations:
    """Activations of a set of examples: one float32 array per layer, rows aligned with `row_example`."""

    layers: dict[int, np.ndarray]
    row_example: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    position: str
    meta: dict[str, Any] = field(default_factory=dict)

    def row_labels(self) -> np.ndarray:
        """The label of each row (rows of one example share it)."""
        return self.labels[self.row_example]

    def row_groups(self) -> np.ndarray:
        """The group of each row."""
        return self.groups[self.row_example]


class _Stop(Exception):
    """Raised by the hook of the last layer needed: the rest of the forward pass is skipped."""


def examples_digest(examples: Sequence[Example]) -> str:
    """A content hash of the examples (prompts, responses, labels, groups)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.response, ex.label, ex.group]).encode())
    return h.hexdigest()


def encode(tokenizer: Any, examples: Sequence[Example], *, needs_response: bool) -> list[tuple[list[int], int]]:
    """Token ids of prompt + response (tokenised separately, so the boundary is exact) and the prompt length."""
    out = []
    for i, ex in enumerate(examples):
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] if ex.response else []
        if not prompt:
            raise DataError(f"example {i}: empty prompt")
        if needs_response and not response:
            raise DataError(f"example {i}: this position needs a response, but the response is empty")
        out.append((prompt + response, len(prompt)))
    return out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _gather(hidden: torch.Tensor, pads: torch.Tensor, prompt_lens: torch.Tensor, lengths: torch.Tensor,
            position: str) -> tuple[torch.Tensor, list[int]]:
    """Rows of `hidden` [batch, time, dim] at `position`; returns them and the batch row each came from."""
    b, t, _ = hidden.shape
    rows = torch.arange(b, device=hidden.device)
    if position == "last_prompt":
        return hidden[rows, pads + prompt_lens - 1], list(range(b))
    if position == "last":
        return hidden[:, t - 1], list(range(b))
    starts = pads + prompt_lens
    cols = torch.arange(t, device=hidden.device).unsqueeze(0)
    mask = (cols >= starts.unsqueeze(1)) & (cols < (pads + lengths).unsqueeze(1))
    if position == "response_mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1), list(range(b))
    if position == "response_all":
        picked = hidden[mask]
        owners = rows.unsqueeze(1).expand(b, t)[mask].tolist()
        return picked, owners
    raise ConfigError(f"unknown position '{position}' (accepted: {', '.join(POSITIONS)})")


@torch.inference_mode()
def batch_activations(model: nn.Module, encoded: Sequence[tuple[list[int], int]], layers: Sequence[int],
                      position: str, pad_id: int) -> tuple[dict[int, torch.Tensor], list[int]]:
    """One left-padded forward pass; float32 CPU rows per layer and, per row, its index within `encoded`."""
    device = _device_of(model)
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, _) in enumerate(encoded):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention[i, width - len(ids):] = 1
    lengths = torch.tensor([len(ids) for ids, _ in encoded], device=device)
    prompt_lens = torch.tensor([p for _, p in encoded], device=device)
    pads = width - lengths
    # Position ids from the mask: without them a left-padded row would start at position `pad`, not 0.
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    captured: dict[int, torch.Tensor] = {}
    owners: list[int] = []
    last = max(layers)
    handles = []

    def make_hook(layer: int) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            rows, who = _gather(hidden, pads.to(hidden.device), prompt_lens.to(hidden.device),
                                lengths.to(hidden.device), position)
            captured[layer] = rows.detach().float().cpu()
            owners[:] = who
            if layer == last:
                raise _Stop
        return hook

    try:
        for layer in layers:
            handles.append(layer_module(model, layer).register_forward_hook(make_hook(layer)))
        try:
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                  position_ids=position_ids.to(device), use_cache=False)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    return captured, owners


def _plan(encoded: Sequence[tuple[list[int], int]], start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Indices start..stop-1 in batches of similar length (less padding, same values)."""
    order = sorted(range(start, stop), key=lambda i: len(encoded[i][0]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collect(model: nn.Module, tokenizer: Any, examples: Sequence[Example], layers: Sequence[int], position: str = "last",
            *, batch_size: int = 16, out_dir: Path | None = None, shard_size: int = 512, progress: bool = True,
            desc: str = "activations", meta: dict[str, Any] | None = None) -> Activations:
    """Activations of `examples` at `layers` and `position`; streamed to `out_dir` shards when given (resumable)."""
    from tqdm import tqdm

    if position not in POSITIONS:
        raise ConfigError(f"unknown position '{position}' (accepted: {', '.join(POSITIONS)})")
    if not examples:
        raise DataError("no examples to collect activations for")
    layers = sorted(set(int(k) for k in layers))
    for k in layers:
        layer_module(model, k)  # fail on a bad layer before any work
    encoded = encode(tokenizer, examples, needs_response=position.startswith("response"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    info = {"position": position, "layers": layers, "n_examples": len(examples), "shard_size": shard_size,
            "examples_sha256": examples_digest(examples), "dtype": "float32", "layer_convention": LAYER_CONVENTION,
            **(meta or {})}
    writer = ShardWriter(out_dir, info) if out_dir is not None else None
    n_tokens = sum(len(ids) for ids, _ in encoded)
    bar = tqdm(total=n_tokens, unit="tok", disable=not progress, desc=desc)
    t0 = time.monotonic()
    kept: dict[int, list[np.ndarray]] = {k: [] for k in layers}
    kept_owner: list[np.ndarray] = []
    for shard, start in enumerate(range(0, len(examples), shard_size)):
        stop = min(start + shard_size, len(examples))
        if writer is not None and writer.done(shard):
            bar.update(sum(len(encoded[i][0]) for i in range(start, stop)))
            continue
        rows: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
        owner: list[int] = []
        for batch in _plan(encoded, start, stop, batch_size):
            captured, who = batch_activations(model, [encoded[i] for i in batch], layers, position, pad_id)
            for k in layers:
                rows[k].append(captured[k])
            owner.extend(batch[w] for w in who)
            bar.update(sum(len(encoded[i][0]) for i in batch))
            bar.set_postfix_str(f"{bar.n / max(time.monotonic() - t0, 1e-9):,.0f} tok/s")
        # Rows back in example order (batches were sorted by length); stable keeps token order.
        order = np.argsort(np.asarray(owner), kind="stable")
        arrays = {k: torch.cat(rows[k]).numpy()[order] for k in layers}
        owner_arr = np.asarray(owner, dtype=np.int64)[order]
        if writer is not None:
            writer.write(shard, arrays, owner_arr)
        else:
            for k in layers:
                kept[k].append(arrays[k])
            kept_owner.append(owner_arr)
    bar.close()
    labels = np.asarray([-1 if ex.label is None else ex.label for ex in examples], dtype=np.int64)
    groups = np.asarray([ex.group for ex in examples], dtype=object)
    if writer is not None:
        writer.finish(labels, groups)
        return load_activations(out_dir)
    return Activations({k: np.concatenate(v) for k, v in kept.items()}, np.concatenate(kept_owner), labels, groups,
                       position, info)


class ShardWriter:
    """Writes activation shards atomically under a folder whose index.json describes them."""

    def __init__(self, out_dir: Path, info: dict[str, Any]) -> None:
        from emkit.core.runfolder import atomic_write_json

        self.dir = out_dir
        self.info = info
        out_dir.mkdir(parents=True, exist_ok=True)
        index = out_dir / INDEX
        if index.is_file():
            old = json.loads(index.read_text(encoding="utf-8"))
            same = {k: old.get(k) for k in ("position", "layers", "examples_sha256", "shard_size")}
            if same != {k: info[k] for k in same}:
                raise ConfigError(f"{out_dir}: holds activations of other examples or settings; use a new folder")
        else:
            atomic_write_json(index, {**info, "complete": False})

    def _path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:05d}.safetensors"

    def done(self, shard: int) -> bool:
        """Whether a shard is already on disk (shards are renamed into place only when complete)."""
        return self._path(shard).is_file()

    def write(self, shard: int, arrays: dict[int, np.ndarray], owner: np.ndarray) -> None:
        """Write one shard (layer.K tensors and the example index of each row) atomically."""
        from safetensors.numpy import save

        from emkit.core.runfolder import atomic_write_bytes

        tensors = {f"layer.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        tensors["example"] = owner
        atomic_write_bytes(self._path(shard), save(tensors, metadata={"layer_convention": LAYER_CONVENTION}))

    def finish(self, labels: np.ndarray, groups: np.ndarray) -> None:
        """Mark the folder complete, with the examples' labels and groups."""
        from emkit.core.runfolder import atomic_write_json

        atomic_write_json(self.dir / INDEX, {**self.info, "complete": True, "labels": labels.tolist(),
                                             "groups": [str(g) for g in groups]})


def load_activations(folder: Path, layers: Sequence[int] | None = None) -> Activations:
    """Read a complete activation folder (all shards, or only some layers)."""
    from safetensors.numpy import load_file

    index_path = folder / INDEX
    if not index_path.is_file():
        raise DataError(f"{folder}: no activations here (no {INDEX})")
    info = json.loads(index_path.read_text(encoding="utf-8"))
    if not info.get("complete"):
        raise DataError(f"{folder}: activation collection did not finish (re-run it to resume)")
    wanted = info["layers"] if layers is None else [int(k) for k in layers]
    missing = [k for k in wanted if k not in info["layers"]]
    if missing:
        raise DataError(f"{folder}: layer {missing[0]} was not collected (have {info['layers']})")
    parts: dict[int, list[np.ndarray]] = {k: [] for k in wanted}
    owners = []
    for path in sorted(folder.glob("shard-*.safetensors")):
        data = load_file(path)
        for k in wanted:
            parts[k].append(data[f"layer.{k}"])
        owners.append(data["example"])
    meta = {k: v for k, v in info.items() if k not in ("labels", "groups")}
    return Activations({k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(owners),
                       np.asarray(info["labels"], dtype=np.int64), np.asarray(info["groups"], dtype=object),
                       info["position"], meta)

