"""A 4-parameter logistic of EM rate against log10(budget), fitted by maximum binomial likelihood on the
counts, with bootstrap intervals.

    rate(x) = bottom + (top - bottom) / (1 + exp(-slope * (log10(x) - log10_mid)))

`bottom` is the rate at small budgets, `top` at large ones, `10**log10_mid` the budget half-way
between them, `slope` how sharp the rise is (per decade).

- Points: one per budget, misaligned answers k out of n. A fit needs more budgets than parameters
  (at least 5), so that the curve is not simply interpolated, and some change in the rate: with the
  same rate at every budget the midpoint and slope are undefined.
- Weighting: the parameters maximise the binomial likelihood of the counts, so each budget weighs
  by its answers and by the binomial variance of its rate (a rate near 0 or 1 is known more
  precisely than one near 0.5; a budget with 400 answers counts more than one with 40). The fit
  reports its deviance against the saturated model with `n_points - 4` degrees of freedom (a
  goodness-of-fit check that assumes independent answers).
- Bounds: bottom and top in 0..1; slope 0.05..20 per decade (rising; a falling curve has bottom >
  top); the midpoint within the budgets actually measured, [log10 min, log10 max]. A midpoint
  outside them is an extrapolation the points cannot support, so the fit stops at the edge and says
  so: `estimate_at_bound` and `interval_at_bound` flag, per parameter, an estimate or an interval
  end that reaches its bound, which then only says the value lies at or beyond it.
- Intervals: `n_boot` resamples, drawn at once, in which each budget's count is redrawn as
  Binomial(n, k / n) (its answers resampled; the questions held fixed, answers treated as
  independent); each resample is refitted and the percentile interval of each parameter and a
  pointwise band of the curve are reported. Resamples whose refit fails, and resamples with the same
  rate at every budget (no midpoint to place), are left out and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PARAMS = ("bottom", "top", "log10_mid", "slope")
MIN_POINTS = len(PARAMS) + 1
SLOPE_BOUNDS = (0.05, 20.0)
INTERVAL_UNIT = "answers within each budget (binomial resample of its count; questions held fixed)"
# Rates are kept this far inside 0..1 in the likelihood, so a curve touching 0 or 1 at a budget with
# answers on the other side costs a large but finite penalty instead of an infinite one.
_EPS = 1e-12
# The start grid (midpoints x slopes) and the solver's iterations: checked against L-BFGS-B from 17
# starts on 675 simulated resamples of 5, 6 and 9 budgets, the same optimum (deviance within 1e-4) in all
# but one (0.07 worse) and better in one; cheap for 500 resamples at once. Rows are gridded in chunks
# so that memory stays bounded (rows x grid x budgets floats per chunk).
_GRID = (25, 15)
_ITERATIONS = 100
_GRID_CHUNK = 1000


def logistic4(log_x: np.ndarray, bottom: float, top: float, log10_mid: float, slope: float) -> np.ndarray:
    """The 4-parameter logistic at log10 budgets `log_x`."""
    return bottom + (top - bottom) / (1.0 + np.exp(-slope * (np.asarray(log_x, dtype=float) - log10_mid)))


def logistic4_curves(log_x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The logistic of each parameter row of `params` (draws, 4) at `log_x`: shape (draws, len(log_x))."""
    p = np.asarray(params, dtype=float)
    return logistic4(np.asarray(log_x, dtype=float)[None, :], p[:, :1], p[:, 1:2], p[:, 2:3], p[:, 3:4])


def _deviance(params: np.ndarray, log_x: np.ndarray, k: np.ndarray, n: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binomial deviance of each row of counts `k` (rows, budgets) under each row of `params` (rows, 4),
    with the curve's sigmoid part and rates, which the solver reuses."""
    from scipy.special import expit, xlogy

    bottom, top, mid, slope = (params[:, i : i + 1] for i in range(4))
    s = expit(slope * (log_x[None, :] - mid))
    p = np.clip(bottom + (top - bottom) * s, _EPS, 1.0 - _EPS)
    m = n - k
    # 2 * (saturated log-likelihood - log-likelihood): 0 for a curve through every point
    dev = 2.0 * (xlogy(k, k / (n * p)) + xlogy(m, m / (n * (1.0 - p)))).sum(axis=1)
    return dev, s, p


def _bounds(log_x: np.ndarray) -> np.ndarray:
    """Lower and upper bound of each parameter, shape (4, 2); the midpoint within the measured budgets."""
    return np.array([(0.0, 1.0), (0.0, 1.0), (float(log_x.min()), float(log_x.max())), SLOPE_BOUNDS])


def _grid_starts(log_x: np.ndarray, k: np.ndarray, n: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """For each row of counts, the best point of a midpoint x slope grid over the whole bounded range,
    with bottom and top from weighted least squares there: a start in the global optimum's basin, so the
    local solver does not stop in another one (the likelihood has several for step-like data)."""
    from scipy.special import expit

    if len(k) > _GRID_CHUNK:
        return np.concatenate([_grid_starts(log_x, k[i : i + _GRID_CHUNK], n, bounds)
                               for i in range(0, len(k), _GRID_CHUNK)])
    mids, slopes = np.meshgrid(np.linspace(*bounds[2], _GRID[0]), np.geomspace(*bounds[3], _GRID[1]), indexing="ij")
    mids, slopes = mids.ravel(), slopes.ravel()
    s = expit(slopes[:, None] * (log_x[None, :] - mids[:, None]))  # (grid, budgets)
    # rate = bottom * (1 - s) + top * s is linear in (bottom, top) at a fixed grid point: solve the
    # 2x2 normal equations, weighted by n / (r (1 - r)) at the row's overall rate r
    rate = np.clip(k.sum(axis=1, keepdims=True) / n.sum(), 0.02, 0.98)
    w = n[None, :] / (rate * (1.0 - rate))
    a, b = 1.0 - s, s
    aa, ab, bb = w @ (a * a).T, w @ (a * b).T, w @ (b * b).T  # (rows, grid)
    ra, rb = (w * k / n) @ a.T, (w * k / n) @ b.T
    det = aa * bb - ab**2
    ok = det > 1e-12 * aa * bb
    det = np.where(ok, det, 1.0)
    bottom = np.where(ok, np.clip((bb * ra - ab * rb) / det, 0.0, 1.0), rate)
    top = np.where(ok, np.clip((aa * rb - ab * ra) / det, 0.0, 1.0), rate)
    p = np.clip(bottom[..., None] * a[None] + top[..., None] * b[None], _EPS, 1.0 - _EPS)  # (rows, grid, budgets)
    loglik = (k[:, None, :] * np.log(p) + (n - k)[:, None, :] * np.log1p(-p)).sum(axis=2)
    best = loglik.argmax(axis=1)
    rows = np.arange(len(k))
    return np.stack([bottom[rows, best], top[rows, best], mids[best], slopes[best]], axis=1)


def _solve(log_x: np.ndarray, k: np.ndarray, n: np.ndarray, starts: np.ndarray, bounds: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Bounded maximum likelihood for every row at once: (params (rows, 4), deviance (rows,)).

    Fisher scoring with Levenberg-Marquardt damping: each step solves (I + damping) step = -gradient,
    I the expected information sum n J J' / (p (1 - p)); a parameter on a bound with the gradient
    pushing outwards is held there (projected Newton), and a step is taken only if it lowers the
    deviance, so every row improves monotonically from its start.
    """
    low, high = bounds[:, 0], bounds[:, 1]
    params = np.clip(starts, low, high)
    dev, s, p = _deviance(params, log_x, k, n)
    damping = np.full(len(params), 1e-3)
    tol = 1e-9 * (high - low)
    for _ in range(_ITERATIONS):
        bottom, top, mid, slope = (params[:, i : i + 1] for i in range(4))
        ds = (top - bottom) * s * (1.0 - s)
        jac = np.stack([1.0 - s, s, -slope * ds, (log_x[None, :] - mid) * ds], axis=2)  # (rows, budgets, 4)
        grad = np.einsum("rm,rmi->ri", -2.0 * (k / p - (n - k) / (1.0 - p)), jac)
        info = np.einsum("rm,rmi,rmj->rij", 2.0 * n / (p * (1.0 - p)), jac, jac)
        held = ((params <= low + tol) & (grad > 0)) | ((params >= high - tol) & (grad < 0))
        free = ~held
        info = np.where(free[:, :, None] & free[:, None, :], info, 0.0)
        diag = np.einsum("rii->ri", info)
        # Marquardt damping on the diagonal, a floor so that a direction the data do not inform (the
        # midpoint of a flat curve) cannot make the system singular, and 1 on held parameters
        floor = 1e-9 * diag.max(axis=1, keepdims=True) + 1e-12
        info[:, np.arange(4), np.arange(4)] = np.where(free, diag * (1.0 + damping[:, None]) + floor, 1.0)
        step = -np.linalg.solve(info, np.where(free, grad, 0.0)[..., None])[..., 0]
        trial = np.clip(params + step, low, high)
        trial_dev, trial_s, trial_p = _deviance(trial, log_x, k, n)
        better = trial_dev < dev  # False for NaN: a failed step is simply not taken
        params = np.where(better[:, None], trial, params)
        dev = np.where(better, trial_dev, dev)
        s, p = np.where(better[:, None], trial_s, s), np.where(better[:, None], trial_p, p)
        damping = np.clip(np.where(better, damping / 3.0, damping * 4.0), 1e-12, 1e12)
    return params, dev


def _fit_rows(log_x: np.ndarray, k: np.ndarray, n: np.ndarray, bounds: np.ndarray,
              extra_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best fit of each row of counts (rows, budgets) from its grid start and every extra start."""
    starts = np.concatenate([_grid_starts(log_x, k, n, bounds)[None],
                             np.broadcast_to(extra_starts[:, None, :], (len(extra_starts), len(k), 4))])
    n_starts, rows = starts.shape[0], len(k)
    params, dev = _solve(log_x, np.tile(k, (n_starts, 1)), n, starts.reshape(-1, 4), bounds)
    params, dev = params.reshape(n_starts, rows, 4), dev.reshape(n_starts, rows)
    best = np.argmin(np.where(np.isfinite(dev), dev, np.inf), axis=0)
    return params[best, np.arange(rows)], dev[best, np.arange(rows)]


def _starts(log_x: np.ndarray, y: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Starts from the data: floor and ceiling at the smallest and largest budget, midpoints spread over
    the measured range, a gentle and a steep slope."""
    order = np.argsort(log_x)
    b0, t0 = float(y[order[0]]), float(y[order[-1]])
    return np.array([(b0, t0, mid, slope) for mid in np.linspace(*bounds[2], 5) for slope in (1.0, 4.0)])


def _at_bound(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Whether each value (last axis: the parameters) lies on its lower or upper bound."""
    low, high = bounds[:, 0], bounds[:, 1]
    tol = 1e-6 * (high - low)
    return (np.abs(values - low) <= tol) | (np.abs(values - high) <= tol)


def fit_logistic(budgets: Any, misaligned: Any, n: Any, *, n_boot: int = 500, seed: int = 0,
                 ci: float = 0.95, grid: int = 60) -> dict[str, Any]:
    """Fit rate = k / n against log10(budget) by maximum binomial likelihood; parameters, bound flags,
    bootstrap intervals and a curve band for drawing, or `status` saying why there is no fit."""
    from scipy import stats

    x = np.asarray(budgets, dtype=float)
    k = np.asarray(misaligned, dtype=float)
    n = np.asarray(n, dtype=float)
    keep = n > 0
    n_budgets = int(np.unique(x[keep]).size)
    out: dict[str, Any] = {"n_points": n_budgets, "n_params": len(PARAMS), "n_boot": n_boot, "ci": ci,
                           "method": "binomial maximum likelihood", "interval_unit": INTERVAL_UNIT}
    if n_budgets < MIN_POINTS:
        out["status"] = (f"skipped: {n_budgets} budget{'' if n_budgets == 1 else 's'} with answers for "
                         f"{len(PARAMS)} parameters: need at least {MIN_POINTS}")
        return out
    x, k, n = x[keep], k[keep], n[keep]
    log_x = np.log10(x)
    y = k / n
    if np.all(k * n[0] == k[0] * n):
        out["status"] = (f"skipped: the EM rate is {y[0]:.1%} at every budget; a flat curve has no midpoint "
                         "or slope")
        return out
    bounds = _bounds(log_x)
    out["bounds"] = dict(zip(PARAMS, bounds.tolist()))
    data_starts = _starts(log_x, y, bounds)
    found, deviance = _fit_rows(log_x, k[None, :], n, bounds, data_starts)
    if not np.isfinite(deviance[0]):
        out["status"] = "failed: no starting point gave a finite likelihood"
        return out
    params = found[0]
    out["status"] = "ok"
    out["params"] = dict(zip(PARAMS, map(float, params)))
    out["estimate_at_bound"] = dict(zip(PARAMS, map(bool, _at_bound(params, bounds))))
    out["midpoint_budget"] = float(10 ** params[2])
    out["rmse"] = float(np.sqrt(np.mean((y - logistic4(log_x, *params)) ** 2)))
    dof = n_budgets - len(PARAMS)
    out["deviance"], out["dof"] = float(deviance[0]), dof
    out["deviance_p"] = float(stats.chi2.sf(deviance[0], dof))

    rng = np.random.default_rng(seed)
    counts = rng.binomial(n.astype(np.int64), y, size=(n_boot, len(n))).astype(float)
    # a resample with the same rate at every budget (compared exactly on the counts) has no midpoint
    flat = np.all(counts * n[0] == counts[:, :1] * n, axis=1)
    # each resample starts from its own grid point and from the point estimate
    draws, boot_dev = _fit_rows(log_x, counts[~flat], n, bounds, params[None, :])
    ok = np.isfinite(boot_dev)
    draws = draws[ok]
    out["boot_failed"] = int((~ok).sum())
    out["boot_flat"] = int(flat.sum())
    xs = np.linspace(log_x.min(), log_x.max(), grid)
    q = [(1 - ci) / 2, (1 + ci) / 2]
    if len(draws):
        low, high = np.quantile(draws, q, axis=0)
        out["ci_low"] = dict(zip(PARAMS, map(float, low)))
        out["ci_high"] = dict(zip(PARAMS, map(float, high)))
        out["interval_at_bound"] = dict(zip(PARAMS, map(bool, _at_bound(low, bounds) | _at_bound(high, bounds))))
        out["boot_share_at_bound"] = dict(zip(PARAMS, map(float, _at_bound(draws, bounds).mean(axis=0))))
        out["midpoint_budget_ci"] = [float(10 ** low[2]), float(10 ** high[2])]
        band_low, band_high = np.quantile(logistic4_curves(xs, draws), q, axis=0)
    else:
        band_low = band_high = np.full(grid, np.nan)
    out["curve"] = {"log10_budget": xs.tolist(), "rate": logistic4(xs, *params).tolist(),
                    "low": band_low.tolist(), "high": band_high.tolist()}
    return out
