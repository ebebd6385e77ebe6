"""`emkit detect`: score new prompts or answers by projection on a direction, with calibrated thresholds.

Inputs are JSONL, one object per line: `question` (or `prompt`, already rendered), optional `answer`,
optional `label` (0/1, to measure detection), optional `id`. The threshold of each layer and method is
the one the probe run calibrated on its training split (detection_results.json beside the directions).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from emkit.errors import DataError


def load_inputs(path: Path, render: Callable[[str, str | None], str]) -> tuple[list, list[dict[str, Any]]]:
    """Examples and their records from a JSONL file (errors name the line and field)."""
    from emkit.data.jsonl import read_objects
    from emkit.interp.activations import Example

    examples, records = [], []
    for line, obj in read_objects(path):
        if "prompt" in obj:
            prompt = obj["prompt"]
        elif "question" in obj:
            prompt = render(obj["question"], obj.get("system"))
        else:
            raise DataError(f"{path}:{line}: question: missing (give question, or prompt already rendered)")
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{path}:{line}: question: must be a non-empty string")
        label = obj.get("label")
        if label not in (None, 0, 1):
            raise DataError(f"{path}:{line}: label: must be 0 or 1")
        answer = obj.get("answer", "")
        if not isinstance(answer, str):
            raise DataError(f"{path}:{line}: answer: must be a string")
        examples.append(Example(prompt, answer, label=label, group=str(obj.get("id", line))))
        records.append({"id": obj.get("id", line), "line": line, "label": label})
    if not examples:
        raise DataError(f"{path}: no inputs")
    return examples, records


def thresholds_for(directions_path: Path) -> dict[tuple[int, str], float]:
    """Calibrated thresholds from the probe run's detection_results.json (empty when there is none)."""
    path = directions_path.parent / "detection_results.json"
    if not path.is_file():
        return {}
    table = json.loads(path.read_text(encoding="utf-8"))
    return {(r["layer"], r["method"]): r["threshold"] for r in table["layers"]}


def run_detect(inputs: Path, directions_path: Path, output: Path, *, model: str | None = None,
               adapter: str | None = None, method: str = "mean_diff", layers: str | None = None,
               position: str | None = None, batch_size: int = 16, device: str = "auto",
               progress: bool = True) -> dict[str, Any]:
    """Score every input at every layer; write detection_results.json (per input and per layer)."""
    from emkit.generate.pipeline import chat_renderer, resolve_organism
    from emkit.interp.activations import collect
    from emkit.interp.directions import auroc, load_directions
    from emkit.interp.layers import parse_layers
    from emkit.models import load_model
    from emkit.runs import atomic_write_json

    if directions_path.is_dir():
        directions_path = directions_path / "directions.safetensors"
    directions = load_directions(directions_path)
    meta = directions.meta
    spec = model or meta.get("model")
    if spec is None:
        raise DataError(f"{directions_path}: no model in the metadata; pass --model")
    organism = resolve_organism(adapter if adapter is not None else meta.get("organism"))
    loaded = load_model(spec, adapter=organism, device=device)
    loaded.model.eval()
    examples, records = load_inputs(inputs, chat_renderer(loaded.tokenizer))
    have = directions.layers(method)
    wanted = have if layers is None else [k for k in parse_layers(layers, max(have) + 1, embed=True) if k in have]
    if not wanted:
        raise DataError(f"{directions_path}: no {method} direction at the requested layers (have {have})")
    pos = position or meta.get("position", "last")
    if pos.startswith("response") and not all(e.response for e in examples):
        pos = "last_prompt"  # prompts without answers: read the state that starts the answer
    acts = collect(loaded.model, loaded.tokenizer, examples, wanted, pos, batch_size=batch_size, progress=progress)
    thresholds = thresholds_for(directions_path)
    labels = np.array([-1 if r["label"] is None else r["label"] for r in records])
    per_layer = []
    for k in wanted:
        w = directions.get(method, k)
        score = acts.layers[k] @ (w / np.linalg.norm(w)) if method == "mean_diff" else acts.layers[k] @ w
        # Rows of response_all belong to examples: score an example by its mean.
        if len(score) != len(examples):
            score = np.bincount(acts.row_example, weights=score) / np.bincount(acts.row_example)
        threshold = thresholds.get((k, method))
        for r, s in zip(records, score):
            r.setdefault("scores", {})[str(k)] = float(s)
            if threshold is not None:
                r.setdefault("flagged", {})[str(k)] = bool(s > threshold)
        entry = {"layer": k, "method": method, "threshold": threshold, "mean_score": float(score.mean()),
                 "flagged_share": float((score > threshold).mean()) if threshold is not None else None}
        if set(labels.tolist()) >= {0, 1}:
            known = labels >= 0
            entry["auroc"] = auroc(score[known], labels[known])
            if threshold is not None:
                entry["accuracy"] = float(((score[known] > threshold) == (labels[known] == 1)).mean())
        per_layer.append(entry)
    result = {"inputs": str(inputs), "directions": str(directions_path), "model": spec,
              "adapter": str(organism) if organism else None, "method": method, "position": pos,
              "calibrated": bool(thresholds), "layers": per_layer, "items": records}
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / "detection_results.json", result)
    return result


def detect_table(result: dict[str, Any]) -> str:
    """Console table: per layer, mean score, share flagged and (with labels) AUROC and accuracy."""
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"{'layer':<8}{'threshold':>11}{'mean score':>12}{'flagged':>9}{'AUROC':>8}{'accuracy':>10}"]
    for r in result["layers"]:
        lines.append(f"{('embed' if r['layer'] == -1 else r['layer']):<8}{f(r['threshold']):>11}{f(r['mean_score']):>12}"
                     f"{f(r['flagged_share']):>9}{f(r.get('auroc')):>8}{f(r.get('accuracy')):>10}")
    return "\n".join(lines)
