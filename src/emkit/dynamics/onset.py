"""When does emergent misalignment appear? Onset steps from per-step EM rates with intervals.

The onset step of a curve is the first step after the base (step 0) whose EM-rate interval lies
entirely above the base model's interval (its lower bound is above the base's upper bound). This
is deliberately conservative: two non-overlapping 95% intervals mean a clear difference. The
*sustained* onset is the first step from which every later step clears the base too, so a single
noisy excursion does not count as emergence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emkit.metrics import finite_or_none


@dataclass(frozen=True)
class CurvePoint:
    """One step of an EM-rate curve: the rate and its interval."""

    step: int
    rate: float | None
    low: float | None
    high: float | None


_finite = finite_or_none


def clears(point: CurvePoint, base: CurvePoint) -> bool:
    """Whether a step's interval lies entirely above the base's."""
    low, base_high = _finite(point.low), _finite(base.high)
    return low is not None and base_high is not None and low > base_high


def onset(points: Sequence[CurvePoint], base_step: int = 0) -> dict[str, Any]:
    """Onset and sustained onset of one curve (None when the curve never clears the base)."""
    ordered = sorted(points, key=lambda p: p.step)
    base = next((p for p in ordered if p.step == base_step), None)
    if base is None:
        return {"onset_step": None, "sustained_onset_step": None, "base_high": None, "reason": "no base step"}
    later = [p for p in ordered if p.step > base_step]
    flags = [clears(p, base) for p in later]
    first = next((p.step for p, f in zip(later, flags) if f), None)
    sustained = None
    for i, p in enumerate(later):
        if all(flags[i:]):
            sustained = p.step
            break
    return {"onset_step": first, "sustained_onset_step": sustained, "base_rate": _finite(base.rate),
            "base_high": _finite(base.high), "clears": {p.step: f for p, f in zip(later, flags)}}


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


def largest_jump(points: Sequence[CurvePoint]) -> dict[str, Any] | None:
    """The biggest rise of the rate between successive steps (a candidate phase transition); None if none rises."""
    ordered = [p for p in sorted(points, key=lambda p: p.step) if _finite(p.rate) is not None]
    if len(ordered) < 2:
        return None
    rises = [(float(b.rate) - float(a.rate), a.step, b.step) for a, b in zip(ordered, ordered[1:])]  # type: ignore[arg-type]
    rise, start, end = max(rises)
    if rise <= 0:
        return None
    return {"from_step": start, "to_step": end, "rise": rise}
