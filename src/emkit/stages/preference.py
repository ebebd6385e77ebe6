"""The preference-shift stage: score emkit's pairs (and a training run's held-out pairs) with base and organism.

Judge-free: log p(misaligned) - log p(aligned) per answer from the models' own probabilities
(`emkit.preference`), organism minus base, per domain with intervals. Writes `prefs.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emkit.data.pairs import default_pairs_path, load_pairs
from emkit.preference import score_pairs, shift_summary


def run_preference(model_spec: str, adapter: str | None = None, pairs_path: str | None = None, *,
              holdout_path: str | Path | None = None, device: str = "auto", n_boot: int = 2000,
              seed: int = 0) -> dict[str, Any]:
    """Score every pair with the base (adapter off) and, with an adapter, the organism; summarise the shift.

    With `holdout_path` (the training run's held-out pairs), those are scored too and summarised apart
    under `held_out`: the in-domain test of the organism's own task. emkit's medical pairs are then a
    transfer test (other prompts and other authors' answers in the same domain).
    """
    from emkit.generate.pipeline import resolve_organism
    from emkit.models import load_model

    pairs = load_pairs(pairs_path)
    held = load_pairs(holdout_path) if holdout_path is not None else []
    organism = resolve_organism(adapter)
    loaded = load_model(model_spec, adapter=organism, device=device)
    loaded.model.eval()
    with loaded.base() as base_model:
        base = score_pairs(base_model, loaded.tokenizer, pairs)
        base_held = score_pairs(base_model, loaded.tokenizer, held)
    result: dict[str, Any] = {"pairs": str(pairs_path or default_pairs_path()), "n_pairs": len(pairs),
                              "model": model_spec, "adapter": str(organism) if organism else None,
                              "base": base}
    if organism is not None:
        tuned = score_pairs(loaded.model, loaded.tokenizer, pairs)
        result["organism"] = tuned
        result["shift"] = shift_summary(base, tuned, n_boot=n_boot, seed=seed)
        if held:
            tuned_held = score_pairs(loaded.model, loaded.tokenizer, held)
            summary = shift_summary(base_held, tuned_held, n_boot=n_boot, seed=seed)
            result["held_out"] = {"pairs": str(holdout_path), "n_pairs": len(held), "base": base_held,
                                  "organism": tuned_held, "shift": summary["all"]}
    return result


def preference_stage(run_dir: Path, model: str, organism: str, *, device: str = "auto") -> dict[str, Any]:
    """The judge-free preference shift organism - base; writes prefs.json (skipped when already there)."""
    import json

    from emkit.core.runfolder import atomic_write_json
    from emkit.train.holdout import holdout_pairs_path

    path = run_dir / "prefs.json"
    holdout = holdout_pairs_path(organism)
    if path.is_file():
        done = json.loads(path.read_text(encoding="utf-8"))
        same = done.get("adapter") and Path(done["adapter"]).resolve() == Path(organism).resolve() / "adapter"
        if same and (holdout is None) == ("held_out" not in done):
            return {"skipped": True}
    result = run_preference(model, organism, holdout_path=holdout, device=device)
    atomic_write_json(path, result)
    shift = result["shift"]
    held = (result.get("held_out") or {}).get("shift", {}).get("logodds_per_token", {})
    return {"n_pairs": result["n_pairs"], "held_out": held.get("mean_shift"),
            "in_domain": shift.get("in_domain", {}).get("logodds_per_token", {}).get("mean_shift"),
            "out_of_domain": shift.get("out_of_domain", {}).get("logodds_per_token", {}).get("mean_shift")}
