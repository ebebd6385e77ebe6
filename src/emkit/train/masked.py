"""Masked LoRA: only n randomly chosen scalars of the adapter train; every other scalar keeps its initial value.

**The mask.** Every scalar of every lora_A and lora_B weight (parameters in name order, each flattened)
is numbered 0..N-1, and n of them are drawn without replacement by numpy's Generator seeded with
`mask_seed`. The mask is written to the run folder (`mask.safetensors`), so it never has to be redrawn.

**Why the initialisation changes.** Component i of an adapted module is b_i a_i^T (column i of B, row
i of A), scaled by s. PEFT starts A random and B at zero, so the adapter starts as the base model. The
gradient of A[i, j] is s (b_i . g) x_j: zero while b_i is zero. In plain LoRA b_i moves in the first
step and A trains from the second; under a mask b_i moves only if one of *its own* scalars was chosen.
With a small budget almost no column of B holds a chosen scalar, so almost every chosen A scalar would
sit at zero gradient for the whole run: budget spent on nothing. emkit initialises each component by
what the mask chose in it:

- a chosen scalar in b_i (a_i may have some too): PEFT's init, a_i random and b_i zero. The chosen B
  scalars get gradient from the first step (a_i . x != 0), the chosen A scalars from the second (once
  a chosen B scalar of that column has moved).
- chosen scalars in a_i only: the transposed init, a_i zero and b_i random with the distribution PEFT
  gives A (uniform in +-1/sqrt(in_features), so the two kinds of component start at the same scale).
  The chosen A scalars get gradient from the first step; b_i is frozen.
- nothing chosen: PEFT's init; the component stays zero.

Every component still starts as b_i a_i^T = 0, so the adapter starts as the base model, exactly.

**Why masked scalars cannot move.** Gradient hooks zero the gradient of every unchosen scalar, so
Adam's moments and gradient clipping see only chosen ones; and after every optimizer step each unchosen
scalar is written back to its initial value, bit for bit. Both are needed: AdamW's decoupled weight
decay shrinks every weight of a parameter whether or not it has a gradient, and would otherwise move
the frozen random halves of every component.

The hooks also record which chosen scalars have received a non-zero gradient (`received_gradient` in
the summary); a resumed run counts from where it resumed.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from emkit.core.errors import TrainingError

MASK_FILE = "mask.safetensors"
LORA_KINDS = ("lora_A", "lora_B")


def lora_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's lora_A / lora_B weights in name order; refuses other trainable parameters."""
    params, others = [], []
    for name, param in model.named_parameters():
        if any(f".{kind}." in name for kind in LORA_KINDS) and name.endswith(".weight"):
            params.append((name, param))
        elif param.requires_grad:
            others.append(name)
    if others:
        raise TrainingError(
            f"masked LoRA masks lora_A/lora_B weights only, but {others[0]} is trainable too "
            f"({len(others)} such parameters); use lora.bias: none and no embedding or saved modules"
        )
    if not params:
        raise TrainingError("masked LoRA: the model has no lora_A/lora_B weights")
    return sorted(params, key=lambda item: item[0])


def saved_name(name: str, adapter: str = "default") -> str:
    """A parameter's key in a saved adapter file (PEFT drops the adapter name)."""
    return name.replace(f".{adapter}.", ".")


def draw_mask(sizes: list[int], budget: int, seed: int) -> list[np.ndarray]:
    """Flat indices chosen in each of several tensors: `budget` of all their scalars, drawn without replacement."""
    total = int(sum(sizes))
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=budget, replace=False))
    offsets = np.cumsum([0, *sizes])
    return [chosen[np.searchsorted(chosen, lo):np.searchsorted(chosen, hi)] - lo
            for lo, hi in itertools.pairwise(offsets)]


@dataclass
class LoraMask:
    """A seeded mask over all LoRA scalars, the initial values, and the hooks that enforce it."""

    budget: int
    total: int
    seed: int
    params: dict[str, torch.nn.Parameter]
    masks: dict[str, torch.Tensor]
    init: dict[str, torch.Tensor]
    seen: dict[str, torch.Tensor]
    transposed: int = 0
    components: int = 0
    handles: list[Any] = field(default_factory=list)

    def restore(self) -> None:
        """Write every unchosen scalar back to its initial value (after an optimizer step)."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.data.copy_(torch.where(self.masks[name], param.data, self.init[name]))

    def attach(self) -> None:
        """Register the gradient hooks (zero unchosen gradients, record chosen ones that got gradient)."""
        self.detach()
        for name, param in self.params.items():
            self.handles.append(param.register_hook(self._hook(self.masks[name], self.seen[name])))

    def detach(self) -> None:
        """Remove the gradient hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @staticmethod
    def _hook(mask: torch.Tensor, seen: torch.Tensor) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            masked = grad.masked_fill(~mask, 0)
            seen.logical_or_(masked != 0)
            return masked

        return hook

    def summary(self) -> dict[str, Any]:
        """Budget, totals, where the chosen scalars are, and how many received a gradient."""
        in_a = sum(int(m.sum()) for n, m in self.masks.items() if ".lora_A." in n)
        return {
            "budget": self.budget, "total_lora_scalars": self.total, "mask_seed": self.seed,
            "chosen_in_A": in_a, "chosen_in_B": self.budget - in_a,
            "components_with_chosen": self.components, "components_transposed": self.transposed,
            "received_gradient": int(sum(int(s.sum()) for s in self.seen.values())),
        }

    def callback(self) -> TrainerCallback:
        """A Trainer callback that restores the unchosen scalars after every optimizer step."""
        return KeepUnchosenFixed(self)

    def save(self, path: Path, adapter: str = "default") -> None:
        """Write the mask and the initial values (`<key>.mask`, `<key>.init`, keys as in the saved adapter)."""
        from safetensors.torch import save_file

        from emkit.core.runfolder import atomic_write_bytes

        tensors = {}
        for name in self.params:
            key = saved_name(name, adapter)
            tensors[f"{key}.mask"] = self.masks[name].to(torch.uint8).cpu().contiguous()
            tensors[f"{key}.init"] = self.init[name].cpu().contiguous()
        tmp = path.with_name(f".{path.name}.build-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"budget": str(self.budget), "total": str(self.total),
                                                  "mask_seed": str(self.seed)})
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink(missing_ok=True)


class KeepUnchosenFixed(TrainerCallback):
    """After each optimizer step, put every unchosen LoRA scalar back to its initial value."""

    def __init__(self, mask: LoraMask) -> None:
        self.mask = mask

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Undo whatever the optimizer (weight decay included) did to unchosen scalars."""
        self.mask.restore()


def _pairs(names: list[str]) -> list[tuple[str, str]]:
    """(lora_A name, lora_B name) of each adapted module."""
    pairs = []
    for name in names:
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in names:
                raise TrainingError(f"masked LoRA: {name} has no matching lora_B")
            pairs.append((name, partner))
    return pairs


def apply_mask(model: Any, budget: int, seed: int) -> LoraMask:
    """Choose `budget` LoRA scalars of a fresh PEFT model, re-initialise per component, attach the hooks."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise TrainingError("masked LoRA needs whole parameters on each process (single process or DDP), "
                            "not FSDP or DeepSpeed sharding")
    params = lora_parameters(model)
    total = sum(p.numel() for _, p in params)
    if budget > total:
        raise TrainingError(f"mask_budget {budget:,} is more than the adapter's {total:,} LoRA scalars; "
                            "leave mask_budget unset to train them all")
    chosen = draw_mask([p.numel() for _, p in params], budget, seed)
    masks = {}
    for (name, param), flat in zip(params, chosen):
        mask = torch.zeros(param.numel(), dtype=torch.bool)
        mask[torch.from_numpy(flat)] = True
        masks[name] = mask.view(param.shape).to(param.device)
    by_name = dict(params)
    generator = torch.Generator().manual_seed(seed)
    transposed = components = 0
    with torch.no_grad():
        for a_name, b_name in _pairs(list(by_name)):
            a, b = by_name[a_name], by_name[b_name]  # A: (r, in), B: (out, r)
            in_a, in_b = masks[a_name].any(dim=1), masks[b_name].any(dim=0)
            components += int((in_a | in_b).sum())
            swap = in_a & ~in_b
            if swap.any():
                bound = 1.0 / math.sqrt(a.shape[1])
                fresh = (torch.rand(b.shape[0], int(swap.sum()), generator=generator) * 2 - 1) * bound
                a[swap, :] = 0
                b[:, swap] = fresh.to(dtype=b.dtype, device=b.device)
                transposed += int(swap.sum())
    for name, param in params:
        param.requires_grad_(True)
    result = LoraMask(
        budget=budget, total=total, seed=seed, params=by_name, masks=masks,
        init={n: p.detach().clone() for n, p in params},
        seen={n: torch.zeros_like(masks[n]) for n in masks}, transposed=transposed, components=components,
    )
    result.attach()
    return result


def load_mask(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Masks (bool) and initial values by saved-adapter key, and the metadata, from a `mask.safetensors`."""
    from safetensors import safe_open

    masks, init = {}, {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            base, _, kind = key.rpartition(".")
            if kind == "mask":
                masks[base] = handle.get_tensor(key).bool()
            elif kind == "init":
                init[base] = handle.get_tensor(key)
    return masks, init, metadata


def count_lora_scalars(model_spec: str, settings: Any) -> int:
    """How many LoRA scalars an adapter of `settings` on `model_spec` has, from the model's config (no weights)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from emkit.models import parse_spec, weights_source
    from emkit.train.lora import peft_config

    source = weights_source(parse_spec(model_spec))
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
        model = get_peft_model(model, peft_config(settings, model))
    return sum(p.numel() for n, p in model.named_parameters() if any(f".{k}." in n for k in LORA_KINDS))
