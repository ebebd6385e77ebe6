"""Agreement between two raters of the same answers: Cohen's kappa of flags, Spearman of scores.

Both return None where the statistic is undefined or says nothing, never a number by fiat:
- kappa with either rater constant: it is then 0 whatever the raw agreement (or 0/0 when both are
  the same constant), so it carries no information about agreement;
- Spearman with either column constant (no ranks to correlate) or fewer than 3 pairs.
Callers pass only the answers both raters scored; an unscorable answer is not a "no".
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np


def _pairs(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"two raters need equally long 1-d arrays, got shapes {x.shape} and {y.shape}")
    return x, y


def cohen_kappa(a: Any, b: Any) -> float | None:
    """Cohen's kappa of two raters' labels of the same items; None when undefined (no items, a constant rater)."""
    x, y = _pairs(a, b)
    if len(x) == 0 or len(np.unique(x)) < 2 or len(np.unique(y)) < 2:
        return None
    from sklearn.metrics import cohen_kappa_score

    value = float(cohen_kappa_score(x, y))
    return value if np.isfinite(value) else None


def spearman(a: Any, b: Any) -> float | None:
    """Spearman's rank correlation of two raters' scores of the same items; None when undefined."""
    x, y = _pairs(a, b)
    x, y = x.astype(float), y.astype(float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a NaN result is reported as None below
        value = float(spearmanr(x, y).statistic)
    return value if np.isfinite(value) else None
