"""`emkit detect`: score new prompts or answers by projection on a direction, with calibrated thresholds.

Inputs are JSONL, one object per line: `question` (or `prompt`, already rendered), optional `answer`,
optional `label` (0/1, to measure detection), optional `id`.

A threshold holds only for scores drawn the way it was calibrated, so new inputs are read exactly as the
probe read its contrast: through the same model (`read_by` in the directions' metadata: base or organism),
at the same position, with answers when the contrast had answers (and without when it had none).
Anything else is refused with an error naming the input file and line. Direction files written before
emkit recorded the reading model need it given (`through`); the position is taken from the file.

Calibrations (the probe's detection_results.json, see `emkit.studies.interp.directions`):
  held_out     (default) the direction fitted on the probe's training split, cut chosen on its held-out rows
  train_split  the same direction, cut chosen on the training rows
  all_rows     the direction fitted on every row (directions.safetensors), cut chosen on every row (in-sample)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from emkit.core.errors import ConfigError, DataError

READERS = ("base", "organism")
DETECTION_DIRECTIONS = "detection_directions.safetensors"


def load_inputs(path: Path, render: Callable[[str, str | None], str]) -> tuple[list, list[dict[str, Any]]]:
    """Examples and their records from a JSONL file (errors name the line and field)."""
    from emkit.core.jsonl import read_objects
    from emkit.studies.interp.activations import Example

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


def calibration_of(directions_path: Path, calibration: str) -> tuple[Path, dict[tuple[int, str], float]]:
    """The direction file and thresholds of a calibration (from the probe run's detection_results.json).

    Without detection_results.json there are no thresholds (empty). A probe run written before the
    held-out calibration has only the all-rows thresholds: asking for another one is refused.
    """
    from emkit.studies.interp.directions import CALIBRATIONS

    if calibration not in CALIBRATIONS:
        raise ConfigError(f"calibration: unknown '{calibration}' (accepted: {', '.join(CALIBRATIONS)})")
    path = directions_path.parent / "detection_results.json"
    if not path.is_file():
        return directions_path, {}
    table = json.loads(path.read_text(encoding="utf-8"))
    rows = table["layers"]
    if rows and "thresholds" not in rows[0]:
        # Written before emkit kept the training-split directions: its `threshold` is the all-rows cut.
        if calibration != "all_rows":
            raise DataError(f"{path}: has only the in-sample thresholds of an older probe (cut on every row); "
                            "pass --calibration all_rows to use them, or re-run the probe for held-out ones")
        return directions_path, {(r["layer"], r["method"]): r["threshold"] for r in rows}
    vectors = directions_path if calibration == "all_rows" else directions_path.parent / DETECTION_DIRECTIONS
    if not vectors.is_file():
        raise DataError(f"{vectors}: missing; the {calibration} thresholds belong to these directions")
    return vectors, {(r["layer"], r["method"]): r["thresholds"][calibration] for r in rows}


def thresholds_for(directions_path: Path, calibration: str = "held_out") -> dict[tuple[int, str], float]:
    """The thresholds of a calibration from the probe run's detection_results.json (empty when there is none)."""
    return calibration_of(directions_path, calibration)[1]


def reading_of(meta: dict[str, Any], directions_path: Path, through: str | None, position: str | None
               ) -> tuple[str, str, bool | None]:
    """How to read new inputs (model, position, with answers): the probe's record, or refused.

    `through`/`position` given must agree with the record; where the record is missing they are required.
    Returns the reading model, the position, and whether the contrast had answers (None: unknown).
    """
    recorded = meta.get("read_by")
    if through is not None and through not in READERS:
        raise ConfigError(f"through: unknown '{through}' (accepted: {', '.join(READERS)})")
    if recorded is None:
        if through is None:
            raise DataError(f"{directions_path}: metadata: read_by missing (written before emkit recorded which "
                            "model read the contrast); pass --through base or --through organism: the model that "
                            "read the probe's contrast (its config's `through`; base if it had no organism; for "
                            "the models contrast either one)")
    elif through is None:
        if len(recorded) != 1:
            raise DataError(f"{directions_path}: read_by: the contrast was read by {' and '.join(recorded)} (models "
                            "contrast) and the thresholds were set on both; pass --through to choose which model "
                            f"reads the inputs ({' or '.join(recorded)})")
        through = recorded[0]
    elif through not in recorded:
        raise ConfigError(f"through: {through}, but {directions_path} was read by {' and '.join(recorded)} (read_by): "
                          "its thresholds do not hold for another model's activations")
    pos = meta.get("position")
    if pos is None:
        if position is None:
            raise DataError(f"{directions_path}: metadata: position missing; pass --position (where the probe read)")
        pos = position
    elif position is not None and position != pos:
        raise ConfigError(f"position: {position}, but {directions_path} was read at {pos} (position): its "
                          "thresholds do not hold at another position")
    answers = meta.get("answers")
    if answers is None and "contrast" in meta:
        answers = meta["contrast"] != "models"  # paired and answers contrasts read answers; models, prompts
    return through, pos, answers


def check_answers(examples: list, records: list[dict[str, Any]], inputs: Path, position: str,
                  answers: bool | None) -> None:
    """Refuse inputs whose answer (or lack of one) puts them at another reading than the probe's."""
    if position == "last_prompt":
        return  # the state before the answer: an answer after it changes nothing (causal attention)
    for example, record in zip(examples, records):
        where = f"{inputs}:{record['line']}: answer"
        if not example.response and (answers or position.startswith("response")):
            raise DataError(f"{where}: missing, but the probe read its contrast at {position} over answers; give "
                            "every input an answer, or use a probe read at last_prompt to score prompts alone")
        if example.response and answers is False:
            raise DataError(f"{where}: given, but the probe read prompts without answers at {position}; drop the "
                            "answers, or use a probe whose contrast had answers")


def run_detect(inputs: Path, directions_path: Path, output: Path, *, model: str | None = None,
               adapter: str | None = None, method: str = "mean_diff", layers: str | None = None,
               through: str | None = None, position: str | None = None, calibration: str = "held_out",
               batch_size: int = 16, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Score every input at every layer, read as the probe read; write detection_results.json (per input and layer)."""
    from emkit.core.runfolder import atomic_write_json
    from emkit.generate.pipeline import chat_renderer, resolve_organism
    from emkit.models import load_model
    from emkit.studies.interp.activations import collect
    from emkit.studies.interp.directions import auroc, detection_scores, load_directions
    from emkit.studies.interp.layers import parse_layers

    if directions_path.is_dir():
        directions_path = directions_path / "directions.safetensors"
    meta = load_directions(directions_path).meta
    reader, pos, answers = reading_of(meta, directions_path, through, position)
    vectors_path, thresholds = calibration_of(directions_path, calibration)
    directions = load_directions(vectors_path)
    spec = model or meta.get("model")
    if spec is None:
        raise DataError(f"{directions_path}: metadata: model missing; pass --model")
    if reader == "base":
        if adapter is not None:
            raise ConfigError(f"adapter: given, but the inputs are read through the base model (as {directions_path} "
                              "was); drop --adapter")
        organism = None
    else:
        organism = resolve_organism(adapter if adapter is not None else meta.get("organism"))
        if organism is None:
            raise DataError(f"{directions_path}: metadata: organism missing, but the inputs are read through the "
                            "organism; pass --adapter")
    loaded = load_model(spec, adapter=organism, device=device)
    loaded.model.eval()
    examples, records = load_inputs(inputs, chat_renderer(loaded.tokenizer))
    check_answers(examples, records, inputs, pos, answers)
    have = directions.layers(method)
    wanted = have if layers is None else [k for k in parse_layers(layers, max(have) + 1, embed=True) if k in have]
    if not wanted:
        raise DataError(f"{vectors_path}: no {method} direction at the requested layers (have {have})")
    acts = collect(loaded.model, loaded.tokenizer, examples, wanted, pos, batch_size=batch_size, progress=progress)
    labels = np.array([-1 if r["label"] is None else r["label"] for r in records])
    per_layer = []
    for k in wanted:
        score = detection_scores(acts.layers[k], directions.get(method, k), method)
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
    result = {"inputs": str(inputs), "directions": str(vectors_path), "model": spec,
              "adapter": str(organism) if organism else None, "read_by": reader,
              "read_by_recorded": meta.get("read_by") is not None, "method": method, "position": pos,
              "calibrated": bool(thresholds), "calibration": calibration if thresholds else None,
              "layers": per_layer, "items": records}
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / "detection_results.json", result)
    return result


def detect_table(result: dict[str, Any]) -> str:
    """Console table: per layer, mean score, share flagged and (with labels) AUROC and accuracy."""
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"read through {result.get('read_by', '?')} at {result['position']}; thresholds: "
             f"{result.get('calibration') or 'none (uncalibrated)'}",
             f"{'layer':<8}{'threshold':>11}{'mean score':>12}{'flagged':>9}{'AUROC':>8}{'accuracy':>10}"]
    for r in result["layers"]:
        lines.append(f"{('embed' if r['layer'] == -1 else r['layer']):<8}{f(r['threshold']):>11}{f(r['mean_score']):>12}"
                     f"{f(r['flagged_share']):>9}{f(r.get('auroc')):>8}{f(r.get('accuracy')):>10}")
    return "\n".join(lines)
