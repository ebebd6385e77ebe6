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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from emkit.studies.interp.layers import EMBED, block_output, layer_module, replace_block_output

if TYPE_CHECKING:
    from emkit.studies.interp.directions import Covariance

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


CONTROL_KINDS = ("isotropic", "matched")


def control_seed(seed: int, layer: int, kind: str) -> int | np.random.SeedSequence:
    """The seed of one control direction: independent streams per (seed, layer, kind), valid for layer -1.

    The isotropic control of a block (layer >= 0) keeps the seed earlier emkit versions used
    (seed * 1000 + layer), so a sweep resumed across versions draws the same random directions; layer -1,
    where that seed was negative and crashed, and the matched control get their own streams.
    """
    if seed < 0:
        raise ValueError(f"control seed {seed}: must be >= 0")
    if layer < -1:
        raise ValueError(f"layer {layer}: layers are -1 (embeddings) or block indices >= 0")
    if kind not in CONTROL_KINDS:
        raise ValueError(f"unknown control '{kind}' (accepted: {', '.join(CONTROL_KINDS)})")
    if kind == "isotropic" and layer >= 0:
        return seed * 1000 + layer
    # SeedSequence mixes the words (no arithmetic collisions such as seed*1000 + layer) and needs them >= 0.
    # The last word tags these streams: a plain integer seed (numpy pads it with zero words) never equals one.
    return np.random.SeedSequence([seed, layer + 1, CONTROL_KINDS.index(kind), 1])


def random_control(direction: Any, seed: int | np.random.SeedSequence | np.random.Generator = 0) -> np.ndarray:
    """An isotropic random direction of the same norm as `direction` (seeded).

    Under projection ablation its norm does not matter, and a random unit direction carries about 1/d of
    the activations' variance: a weak control; `matched_control` is the strong one.
    """
    d = np.asarray(direction, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(d.shape[0])
    return (r / np.linalg.norm(r) * np.linalg.norm(d)).astype(np.float32)


def matched_control(direction: Any, covariance: Covariance, seed: int | np.random.SeedSequence | np.random.Generator = 0,
                    *, rtol: float = 1e-9) -> tuple[np.ndarray, dict[str, float]]:
    """A random direction orthogonal to `direction` whose projection has the same variance, and the same norm.

    `covariance` is the activations' covariance S at the layer where the vector acts (see
    `emkit.studies.interp.directions.covariance_of`). Let P remove `direction`, S' = PSP, z a Gaussian draw in that
    complement. The
    family u(t) ~ S'^(t/2) z runs from low-variance (t -> -inf) through isotropic (t = 0) and "drawn from
    the covariance" (t = 1) to the top principal direction (t -> +inf), and its variance u'Su rises with t
    (log z'S^t z is convex in t), so bisection finds the t that matches the direction's variance. The
    result is as random as z wherever the variance allows. When the direction carries more variance than
    any direction orthogonal to it can, the closest one is returned; the returned figures say so
    (`achieved` / `target`).
    """
    v = np.asarray(direction, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(v))
    u = v / max(norm, 1e-300)
    vecs = np.asarray(covariance.vectors, dtype=np.float64)
    lam = np.asarray(covariance.variances, dtype=np.float64)
    if vecs.shape[1] != u.shape[0]:
        raise ValueError(f"direction has {u.shape[0]} dimensions, the covariance {vecs.shape[1]}")
    target = covariance.variance_along(u)
    # The covariance restricted to the complement of u, as its own eigen-decomposition (rows of w).
    b = (vecs - np.outer(vecs @ u, u)) * np.sqrt(lam)[:, None]
    _, sing, w = np.linalg.svd(b, full_matrices=False)
    mu = sing ** 2
    keep = mu > rtol * max(float(mu.max(initial=0.0)), 1e-300)
    mu, w = mu[keep], w[keep]
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(u.shape[0])
    z -= (z @ u) * u
    c = w @ z
    null = z - w.T @ c  # the part of z where the activations do not vary (outside S's span)
    top = float(mu.max(initial=0.0))
    if top <= 0:
        r = z / np.linalg.norm(z)
        return (r * norm).astype(np.float32), {"target": target, "achieved": 0.0, "t": 0.0}
    # Log-space weights: S'^(t/2) z over eigen-components, the null part given variance eps, so that
    # t < 0 stays finite; eps is far below any variance that matters.
    log_mu = np.log(mu / top)
    log_eps = np.log(1e-12)
    with np.errstate(divide="ignore"):
        log_c2 = np.log(c ** 2)
        log_n2 = np.log(float(null @ null))

    def variance(t: float) -> float:
        logs = np.append(log_c2 + t * log_mu, log_n2 + t * log_eps)
        p = np.exp(logs - logs.max())
        return float((p[:-1] @ mu) / p.sum())

    # At |t| = 1000 the weights are one component's alone unless eigenvalues agree to ~1e-3 (then either does).
    lo, hi = -1000.0, 1000.0
    if target >= variance(hi):
        t = hi
    elif target <= variance(lo):
        t = lo
    else:
        for _ in range(200):
            t = (lo + hi) / 2
            g = variance(t)
            if abs(g - target) <= 1e-13 * target:
                break
            lo, hi = (t, hi) if g < target else (lo, t)
    exps = np.append(0.5 * t * log_mu, 0.5 * t * log_eps)
    scale = np.exp(exps - exps.max())
    r = w.T @ (c * scale[:-1]) + scale[-1] * null
    r -= (r @ u) * u
    r /= np.linalg.norm(r)
    achieved = covariance.variance_along(r)
    return (r * norm).astype(np.float32), {"target": target, "achieved": achieved, "t": float(t)}


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


def orthonormal_basis(vectors: Sequence[Any], *, rtol: float = 1e-6) -> tuple[torch.Tensor, list[int]]:
    """Orthonormal columns (float64) spanning `vectors`, and the indices of those dropped as dependent.

    Projecting directions out one after another is wrong when they are not orthogonal: removing u2
    puts back part of u1. Projecting onto the complement of their span, (I - QQ^T), removes all of them
    at once. A vector whose part outside the others' span is below `rtol` of its length adds nothing
    to the span but a numerically arbitrary direction, so it is dropped (it is still removed: it lies
    in the span of the rest to within `rtol`).
    """
    units = []
    for v in vectors:
        t = v.detach().double().flatten() if isinstance(v, torch.Tensor) else torch.as_tensor(
            np.asarray(v, dtype=np.float64)).flatten()
        units.append(t / t.norm().clamp_min(1e-300))
    if not units:
        raise ValueError("no directions to orthonormalise")
    kept: list[int] = []
    dropped: list[int] = []
    # Gram-Schmidt with re-orthogonalisation, in the given order, so the dropped ones are the later
    # duplicates and the kept ones name which given direction each column came from.
    basis: list[torch.Tensor] = []
    for i, u in enumerate(units):
        r = u.clone()
        for _ in range(2):
            for q in basis:
                r = r - (q @ r) * q
        if float(r.norm()) <= rtol:
            dropped.append(i)
            continue
        basis.append(r / r.norm())
        kept.append(i)
    return torch.stack(basis, dim=1), dropped


def ablate_lora_weights(model: nn.Module, directions: Mapping[int, Any], *, adapter_name: str = "default",
                        all_blocks_from: int | None = None, emit: Callable[[str], None] | None = None) -> list[str]:
    """Project directions out of the LoRA B matrices that write to the residual stream; returns edited names.

    A LoRA update on a residual writer (o_proj, down_proj ...) adds B(Ax) to the stream; replacing B by
    (I - QQ^T)B, Q an orthonormal basis of the directions, makes that update orthogonal to every one of
    them. The direction of layer k is removed from the writers of blocks <= k (everything that can have
    put it there); with `all_blocks_from` set, one direction (the single one given) is removed from every
    block >= that index instead. Directions that are numerically dependent on earlier ones are noted
    through `emit` (they are removed all the same, being in the others' span).
    """
    edited = []
    given = {k: v for k, v in directions.items()}
    bases: dict[tuple[int, ...], torch.Tensor] = {}

    def basis_of(keys: tuple[int, ...]) -> torch.Tensor:
        if keys not in bases:
            q, dropped = orthonormal_basis([given[k] for k in keys])
            if dropped and emit is not None:
                emit(f"directions of layer(s) {', '.join(str(keys[i]) for i in dropped)} lie in the span of the "
                     f"others (layers {', '.join(str(k) for k in keys)}); removing the span removes them too")
            bases[keys] = q
        return bases[keys]

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
                keys = tuple(list(given)[:1]) if block >= all_blocks_from else ()
            else:
                keys = tuple(sorted(k for k in given if k != EMBED and block <= k))
            weight = lora_b[adapter_name].weight  # (out_features, rank): columns live in the residual space
            if not keys:
                continue
            q = basis_of(keys)
            if weight.shape[0] != q.shape[0]:
                continue
            # In float64: the residual left along each direction is then float32 rounding of the result.
            w = weight.double()
            q = q.to(w.device)
            w = w - q @ (q.T @ w)
            weight.copy_(w.to(weight.dtype))
            edited.append(name)
    return edited


def save_ablated_adapter(adapter_dir: Path, directions: Mapping[int, Any], out_dir: Path, *,
                         base_spec: str | None = None, device: str = "cpu",
                         emit: Callable[[str], None] | None = None) -> list[str]:
    """Write a copy of an adapter with the directions projected out of its residual-writing B matrices."""
    from emkit.core.runfolder import atomic_dir
    from emkit.models import load_model

    loaded = load_model(base_spec, adapter=adapter_dir, device=device) if base_spec else load_model(
        str(adapter_dir), device=device)
    edited = ablate_lora_weights(loaded.model, directions, emit=emit)
    with atomic_dir(out_dir) as tmp:
        loaded.model.save_pretrained(tmp)
    return edited
