"""LoRA weight dynamics from the saved checkpoints alone.

For each checkpoint and each adapted module (layer x projection) the Frobenius norms of A, B and of
the weight change it makes, dW = s * B @ A (s = alpha / r, or alpha / sqrt(r) with rsLoRA). Over
steps:

- `update_cosine`: cosine similarity of successive B updates, cos(B_t - B_t-1, B_t-1 - B_t-2), over
  all B entries (and per projection). Steady training keeps it high; a dip marks a rotation of the
  direction B moves in.
- `pca`: the B trajectory (all B entries, one row per step) projected on its first principal
  components, with the share of variance each explains.
- similarity to the final adapter: cos(B_t, B_final) and cos(dW_t, dW_final) over all modules.

Step 0 is the initialisation. PEFT initialises B to zero (init_lora_weights true, the default), so
B_0 = 0 and dW_0 = 0 are known without a saved step-0 adapter; A_0 is random and was not saved, so A
norms start at the first checkpoint. With any other initialisation the trajectory starts at the
first checkpoint.

Inner products of dW never form the (out x in) matrices: <B1 A1, B2 A2> = trace((B1^T B2)(A2 A1^T)),
products of r x r matrices, so a 30-layer model costs milliseconds per checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emkit.core.errors import DataError
from emkit.studies.dynamics.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Checkpoint

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class AdapterWeights:
    """One checkpoint's LoRA factors per module: name -> (A [r x in], B [out x r]), and the scale s."""

    step: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    zero_init_b: bool


def module_parts(name: str) -> tuple[int | None, str]:
    """(layer index or None, projection name) of a module key like ...layers.3.self_attn.q_proj."""
    match = _LAYER.search(name + ".")
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]


def load_adapter(folder: Path, step: int) -> AdapterWeights:
    """Read an adapter folder's LoRA factors (float32, CPU) and its scaling."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{folder / ADAPTER_CONFIG}: unreadable ({exc})") from None
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(alpha, (int, float)):
        raise DataError(f"{folder / ADAPTER_CONFIG}: r and lora_alpha must be numbers")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            parts.setdefault(match.group("module"), {})[match.group("ab")] = tensor.float()
    factors = {m: (p["A"], p["B"]) for m, p in sorted(parts.items()) if "A" in p and "B" in p}
    if not factors:
        raise DataError(f"{folder / ADAPTER_WEIGHTS}: no LoRA A/B pairs")
    zero_init = config.get("init_lora_weights", True) in (True, "default")
    return AdapterWeights(step, factors, float(scale), bool(zero_init))


def _cos(dot: float, a: float, b: float) -> float | None:
    return dot / math.sqrt(a * b) if a > 0 and b > 0 else None


def _dw_dot(x: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor]) -> float:
    """<B1 A1, B2 A2>_F without forming either product."""
    (a1, b1), (a2, b2) = x, y
    return float(torch.trace((b1.T @ b2) @ (a2 @ a1.T)))


def _flat_b(weights: AdapterWeights, modules: Sequence[str]) -> torch.Tensor:
    return torch.cat([weights.factors[m][1].flatten() for m in modules])


def weight_dynamics(adapters: Sequence[AdapterWeights]) -> dict[str, Any]:
    """Norms per module and step, successive-update cosines, PCA of the B trajectory, similarity to the final."""
    if not adapters:
        return {"steps": [], "modules": [], "norms": [], "global": [], "pca": None}
    adapters = sorted(adapters, key=lambda w: w.step)
    modules = list(adapters[0].factors)
    for w in adapters[1:]:
        if list(w.factors) != modules:
            raise DataError(f"step {w.step}: the adapter adapts other modules than step {adapters[0].step}")
    final = adapters[-1]
    norms = []
    for w in adapters:
        for m in modules:
            a, b = w.factors[m]
            layer, proj = module_parts(m)
            dw2 = max(_dw_dot((a, b), (a, b)), 0.0)
            norms.append({"step": w.step, "module": m, "layer": layer, "projection": proj,
                          "a_norm": float(a.norm()), "b_norm": float(b.norm()), "dw_norm": w.scale * math.sqrt(dw2)})

    # The B trajectory, from B_0 = 0 when PEFT's zero initialisation is known.
    trajectory: list[tuple[int, torch.Tensor]] = []
    if adapters[0].zero_init_b and adapters[0].step > 0:
        trajectory.append((0, torch.zeros_like(_flat_b(adapters[0], modules))))
    trajectory += [(w.step, _flat_b(w, modules)) for w in adapters]
    projections = sorted({module_parts(m)[1] for m in modules})
    per_projection = {p: [m for m in modules if module_parts(m)[1] == p] for p in projections}
    offsets = np.cumsum([0] + [adapters[0].factors[m][1].numel() for m in modules])
    index_of = {m: (int(offsets[i]), int(offsets[i + 1])) for i, m in enumerate(modules)}

    final_b = trajectory[-1][1]
    final_dw2 = sum(_dw_dot(final.factors[m], final.factors[m]) for m in modules)
    rows = []
    by_step = {w.step: w for w in adapters}
    for i, (step, b) in enumerate(trajectory):
        row: dict[str, Any] = {"step": step, "b_norm": float(b.norm())}
        w = by_step.get(step)
        if w is not None:
            row["a_norm"] = float(torch.sqrt(sum(w.factors[m][0].pow(2).sum() for m in modules)))
            dw2 = sum(_dw_dot(w.factors[m], w.factors[m]) for m in modules)
            row["dw_norm"] = w.scale * math.sqrt(max(dw2, 0.0))
            cross = sum(_dw_dot(w.factors[m], final.factors[m]) for m in modules)
            row["dw_cosine_to_final"] = _cos(cross, dw2, final_dw2)
        else:
            row.update(a_norm=None, dw_norm=0.0, dw_cosine_to_final=None)
        row["b_cosine_to_final"] = _cos(float(b @ final_b), float(b @ b), float(final_b @ final_b))
        if i >= 1:
            update = b - trajectory[i - 1][1]
            row["update_norm"] = float(update.norm())
        if i >= 2:
            previous = trajectory[i - 1][1] - trajectory[i - 2][1]
            update = b - trajectory[i - 1][1]
            row["update_cosine"] = _cos(float(update @ previous), float(update @ update), float(previous @ previous))
            for proj, members in per_projection.items():
                cur = torch.cat([update[slice(*index_of[m])] for m in members])
                prev = torch.cat([previous[slice(*index_of[m])] for m in members])
                row[f"update_cosine_{proj}"] = _cos(float(cur @ prev), float(cur @ cur), float(prev @ prev))
        rows.append(row)
    return {"steps": [s for s, _ in trajectory], "modules": modules, "projections": projections,
            "scale": adapters[0].scale, "b_zero_at_step_0": trajectory[0][0] == 0 and adapters[0].step > 0,
            "norms": norms, "global": rows, "pca": b_pca([s for s, _ in trajectory], [b for _, b in trajectory])}


def b_pca(steps: Sequence[int], vectors: Sequence[torch.Tensor], components: int = 3) -> dict[str, Any] | None:
    """The B trajectory on its first principal components (centred over steps)."""
    from sklearn.decomposition import PCA

    if len(vectors) < 2:
        return None
    matrix = torch.stack(vectors).double().numpy()
    n = min(components, len(vectors) - 1, matrix.shape[1])
    if not np.any(matrix - matrix.mean(axis=0)):
        return None
    pca = PCA(n_components=n, svd_solver="full")
    coords = pca.fit_transform(matrix)
    return {"steps": list(steps), "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_],
            "coordinates": [[float(x) for x in row] for row in coords]}


def track_weights(checkpoints: Sequence[Checkpoint]) -> dict[str, Any]:
    """`weight_dynamics` of the adapters of these checkpoints (the base, without a folder, is skipped)."""
    adapters = [load_adapter(c.path, c.step) for c in checkpoints if c.path is not None]
    return weight_dynamics(adapters)
