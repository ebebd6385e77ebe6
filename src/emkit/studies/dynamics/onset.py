"""When does emergent misalignment appear? Onset steps by tests of each checkpoint against the base.

Each checkpoint after the base (step 0) is tested against the base with a one-sided test of "more
misaligned than the base" on the same questions; the p-values are corrected with Holm's method over
all the checkpoints scanned, so the chance that a curve with no change anywhere shows an onset is at
most `alpha` (the family-wise error rate).

- The *onset* is the first checkpoint whose corrected p-value is below `alpha`.
- The *sustained onset* is the first checkpoint from which every later checkpoint also passes,
  counting at least two checkpoints (a last step passing alone is not sustained).

The test (`test`):

- `questions` (default): the paired sign-flip test of per-question differences, questions as the
  sampling unit (`emkit.core.stats.inference.signflip_pvalue`). With G questions its smallest one-sided p-value
  is 2^-G, so Holm over K checkpoints can pass only if 2^-G < alpha / K (8 questions: K <= 12):
  the rule says so when the curve cannot reach significance.
- `stratified`: the exact conditional Cochran-Mantel-Haenszel test, questions as strata (answers as
  the unit, the questions held fixed): more power with few questions, a claim about these questions only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from emkit.core.stats.em_rates import adjust_pvalues, finite_or_none
from emkit.core.stats.inference import UNIT_ANSWERS, UNIT_QUESTIONS, cmh_exact_pvalue, signflip_pvalue

OnsetTest = Literal["questions", "stratified"]
TESTS: dict[str, str] = {
    "questions": f"a one-sided paired sign-flip test of per-question differences ({UNIT_QUESTIONS})",
    "stratified": f"a one-sided exact conditional Cochran-Mantel-Haenszel test ({UNIT_ANSWERS}, questions as strata)",
}


def onset_rule(test: OnsetTest = "questions", alpha: float = 0.05, n_steps: int | None = None) -> str:
    """The onset rule in words, for the report and dynamics.json."""
    scanned = f"the {n_steps} checkpoints scanned" if n_steps is not None else "every checkpoint scanned"
    return (f"Onset: the first checkpoint whose EM rate is above the base's by {TESTS[test]}, with p-values "
            f"Holm-corrected over {scanned} (family-wise error rate {alpha:g}). Sustained onset: the first "
            "checkpoint from which every later checkpoint also passes, at least two checkpoints.")


def step_pvalues(m: np.ndarray, n: np.ndarray, *, test: OnsetTest = "questions", n_perm: int = 20000,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """One-sided p-values of every checkpoint against the base, from counts shaped (..., 1 + K, G).

    Index 0 of the step axis is the base; questions are on the last axis. Returns (..., K).
    Vectorised over leading axes for the questions test (simulations use it); the stratified test
    loops, as it convolves exact distributions.
    """
    m, n = np.asarray(m, dtype=float), np.asarray(n, dtype=float)
    base_m, base_n = m[..., :1, :], n[..., :1, :]
    later_m, later_n = m[..., 1:, :], n[..., 1:, :]
    if test == "questions":
        return signflip_pvalue(later_m, later_n, np.broadcast_to(base_m, later_m.shape),
                               np.broadcast_to(base_n, later_n.shape), alternative="greater", n_perm=n_perm, rng=rng)
    if test != "stratified":
        raise ValueError(f"unknown onset test {test!r}; choose questions or stratified")
    out = np.empty(later_m.shape[:-1])
    for idx in np.ndindex(out.shape):
        base_idx = (*idx[:-1], 0)
        out[idx] = cmh_exact_pvalue(later_m[idx], later_n[idx], base_m[base_idx], base_n[base_idx], "greater")
    return out


def onset_from_pvalues(steps: Sequence[int], pvalues: Sequence[float | None], alpha: float = 0.05
                       ) -> dict[str, Any]:
    """Onset and sustained onset from the one-sided p-values of the checkpoints (in step order)."""
    order = np.argsort(np.asarray(steps), kind="stable")
    steps = [int(steps[i]) for i in order]
    raw = [finite_or_none(pvalues[i]) for i in order]
    adjusted = adjust_pvalues(raw, "holm")
    passes = [bool(np.isfinite(p) and p < alpha) for p in adjusted]
    onset = next((s for s, ok in zip(steps, passes) if ok), None)
    sustained = None
    for i, step in enumerate(steps):
        if len(steps) - i >= 2 and all(passes[i:]):
            sustained = step
            break
    return {"onset_step": onset, "sustained_onset_step": sustained, "alpha": alpha,
            "tests": [{"step": s, "p_value": p, "p_value_adj": finite_or_none(a), "passes": ok}
                      for s, p, a, ok in zip(steps, raw, adjusted, passes)]}


def smallest_p(n_questions: int, test: OnsetTest) -> float | None:
    """The smallest one-sided p-value the test can give (sign-flip: 2^-G); None when not bounded so."""
    return 2.0 ** -n_questions if test == "questions" and n_questions <= 16 else None


def onset(counts: Mapping[int, tuple[np.ndarray, np.ndarray]], *, base_step: int = 0, test: OnsetTest = "questions",
          alpha: float = 0.05, n_perm: int = 20000, seed: int = 0) -> dict[str, Any]:
    """Onset of one curve from per-step (misaligned, denominator) counts over the same questions."""
    if base_step not in counts:
        return {"onset_step": None, "sustained_onset_step": None, "reason": "no base step",
                "rule": onset_rule(test, alpha)}
    later = sorted(s for s in counts if s > base_step)
    if not later:
        return {"onset_step": None, "sustained_onset_step": None, "reason": "no checkpoint after the base",
                "rule": onset_rule(test, alpha, 0)}
    order = [base_step, *later]
    m = np.stack([np.asarray(counts[s][0], dtype=float) for s in order])
    n = np.stack([np.asarray(counts[s][1], dtype=float) for s in order])
    p = step_pvalues(m, n, test=test, n_perm=n_perm, rng=np.random.default_rng(seed))
    result = onset_from_pvalues(later, list(p), alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        result["base_rate"] = finite_or_none(m[0].sum() / n[0].sum())
    result.update(test=test, rule=onset_rule(test, alpha, len(later)), n_questions=int(m.shape[-1]))
    floor = smallest_p(int(m.shape[-1]), test)
    if floor is not None and floor * len(later) >= alpha:
        result["reason"] = (f"with {m.shape[-1]} questions the smallest p-value is 2^-{m.shape[-1]} = {floor:.2g}; "
                            f"Holm over {len(later)} checkpoints needs p < {alpha / len(later):.2g}, so no onset can "
                            "be shown: ask more questions or scan fewer checkpoints")
    return result


def crossing_order(onsets: Mapping[str, int | None], first: str = "predictive", second: str = "assistant") -> str:
    """In words: which mode's EM rate clears the base first ("predictive first", "same step", ...)."""
    a, b = onsets.get(first), onsets.get(second)
    if a is None and b is None:
        return "neither mode clears the base"
    if b is None:
        return f"{first} first (step {a}); {second} never clears the base"
    if a is None:
        return f"{second} first (step {b}); {first} never clears the base"
    if a < b:
        return f"{first} first (step {a}, {second} at step {b})"
    if b < a:
        return f"{second} first (step {b}, {first} at step {a})"
    return f"same step ({a})"


def largest_jump(steps: Sequence[int], rates: Sequence[float | None]) -> dict[str, Any] | None:
    """The biggest rise of the rate between successive steps (a candidate phase transition); None if none rises."""
    ordered = sorted((int(s), float(r)) for s, r in zip(steps, rates) if finite_or_none(r) is not None)
    if len(ordered) < 2:
        return None
    rise, start, end = max((b[1] - a[1], a[0], b[0]) for a, b in zip(ordered, ordered[1:]))
    if not math.isfinite(rise) or rise <= 0:
        return None
    return {"from_step": start, "to_step": end, "rise": rise}
