"""Question-aware intervals and tests for rates pooled over questions, on per-question counts.

Every EM rate of emkit is a pooled ratio `R = sum_q m_q / sum_q n_q` over the questions q of a group
(m_q misaligned among the n_q answers of question q that count for the rate). Answers are clustered
within questions, so each interval and test here names its *unit*:

- `answers` (`UNIT_ANSWERS`): the questions are held fixed and only the sampling of answers within
  each question is noise. Interval: Wilson score interval on the effective sample size
  `R(1-R) / V_w` with the stratified variance `V_w = sum_q n_q r_q (1 - r_q) / N^2`
  (`r_q = m_q / n_q`, `N = sum_q n_q`); a single question gets the plain Wilson interval.
  Test: the exact conditional Cochran-Mantel-Haenszel test (questions as strata).
- `questions` (`UNIT_QUESTIONS`): the questions are a sample too, each bringing all its answers.
  Interval: Korn & Graubard's (1998) interval for a clustered proportion: Clopper-Pearson on the
  effective sample size `R(1-R) / V_c`, `V_c = G/(G-1) sum_q (m_q - R n_q)^2 / N^2` over the G
  questions, shrunk by `(z / t_{G-1})^2` for the G-1 degrees of freedom. Differences of two groups on
  shared questions: the paired linearised difference with a t interval on G-1 degrees of freedom
  (never narrower than the answers-unit interval). Test: the paired sign-flip randomisation test of
  the per-question differences (exact over all 2^G sign patterns up to 16 questions; Monte Carlo
  beyond), so the smallest attainable two-sided p-value is 2^(1-G).
- `seeds` (`UNIT_SEEDS`): training seeds as replicates: the pooled two-sample t interval and test
  on per-seed rates.

Everything is vectorised: count arrays may carry leading axes (e.g. thousands of simulated runs),
with questions on the last axis. Calibration of these intervals is checked by simulation in
tests/test_calibration.py (coverage of the truth near the nominal 95%).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
from scipy import stats

UNIT_ANSWERS = "answers within questions (questions held fixed)"
UNIT_QUESTIONS = "questions (resampled as units, each with all its answers)"
UNIT_SEEDS = "training seeds (per-seed rates as replicates)"
UNIT_POOLED = "answers pooled over questions, as if independent"
EXACT_SIGNFLIP_MAX = 16  # 2^16 sign patterns: exact enumeration is still cheap

Alternative = Literal["two-sided", "greater", "less"]


def _z(ci: float) -> float:
    return float(stats.norm.ppf((1 + ci) / 2))


def _arrays(*xs: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(x, dtype=float) for x in xs)


def wilson(k: np.ndarray, n: np.ndarray, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of k successes in n (n may be an effective, non-integer size); NaN where n is 0."""
    k, n = _arrays(k, n)
    z = _z(ci)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        centre = p + z * z / (2 * n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        den = 1 + z * z / n
        low, high = (centre - half) / den, (centre + half) / den
    bad = ~(n > 0)
    return np.where(bad, np.nan, np.clip(low, 0, 1)), np.where(bad, np.nan, np.clip(high, 0, 1))


def clopper_pearson(k: np.ndarray, n: np.ndarray, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson interval (beta quantiles; k and n may be non-integer); NaN where n is 0."""
    k, n = _arrays(k, n)
    alpha = 1 - ci
    ok = n > 0
    k, n_safe = np.where(ok, k, 0.0), np.where(ok, n, 1.0)
    with np.errstate(invalid="ignore"):
        low = np.where(k > 0, stats.beta.ppf(alpha / 2, np.maximum(k, 1e-12), n_safe - k + 1), 0.0)
        high = np.where(k < n_safe, stats.beta.ppf(1 - alpha / 2, k + 1, np.maximum(n_safe - k, 1e-12)), 1.0)
    return np.where(ok, low, np.nan), np.where(ok, high, np.nan)


def _pooled(m: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = n.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return m.sum(axis=-1) / total, total


def n_clusters(n: np.ndarray) -> np.ndarray:
    """Questions that have at least one answer counting for the rate (the clusters)."""
    return (np.asarray(n) > 0).sum(axis=-1)


def within_variance(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Variance of the pooled rate with the questions held fixed: sum_q n_q r_q (1 - r_q) / N^2."""
    m, n = _arrays(m, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(n > 0, m / n, 0.0)
        return (n * r * (1 - r)).sum(axis=-1) / n.sum(axis=-1) ** 2


def cluster_variance(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Linearised variance of the pooled rate with questions as the sampling unit (G/(G-1) correction)."""
    m, n = _arrays(m, n)
    rate, total = _pooled(m, n)
    g = n_clusters(n)
    resid = np.where(n > 0, m - np.nan_to_num(rate)[..., None] * n, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(g >= 2, g / (g - 1) * (resid**2).sum(axis=-1) / total**2, np.nan)


def _effective_n(rate: np.ndarray, var: np.ndarray, total: np.ndarray) -> np.ndarray:
    """R(1-R)/V, the sample size of independent answers with the same variance; N where R is 0 or 1 or V is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        neff = rate * (1 - rate) / var
    return np.where(np.isfinite(neff) & (neff > 0), neff, total)


def rate_interval_answers(m: np.ndarray, n: np.ndarray, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Interval of the pooled rate, unit `answers` (questions fixed): Wilson on the stratified effective n."""
    m, n = _arrays(m, n)
    rate, total = _pooled(m, n)
    neff = _effective_n(rate, within_variance(m, n), total)
    return wilson(rate * neff, neff, ci)


def rate_interval_questions(m: np.ndarray, n: np.ndarray, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Interval of the pooled rate, unit `questions`: Korn-Graubard; NaN under two questions."""
    m, n = _arrays(m, n)
    rate, total = _pooled(m, n)
    g = n_clusters(n)
    neff = _effective_n(rate, cluster_variance(m, n), total)
    df = np.maximum(g - 1, 1)
    neff = neff * (_z(ci) / stats.t.ppf((1 + ci) / 2, df)) ** 2
    low, high = clopper_pearson(np.nan_to_num(rate) * neff, neff, ci)
    ok = (g >= 2) & (total > 0)
    return np.where(ok, low, np.nan), np.where(ok, high, np.nan)


def diff_interval_answers(ma: np.ndarray, na: np.ndarray, mb: np.ndarray, nb: np.ndarray, ci: float = 0.95
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Interval of rate_a - rate_b, unit `answers`: Newcombe's hybrid score interval of the two Wilson intervals."""
    ma, na, mb, nb = _arrays(ma, na, mb, nb)
    (pa, _), (pb, _) = _pooled(ma, na), _pooled(mb, nb)
    la, ua = rate_interval_answers(ma, na, ci)
    lb, ub = rate_interval_answers(mb, nb, ci)
    d = pa - pb
    return d - np.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + np.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


def diff_interval_questions(ma: np.ndarray, na: np.ndarray, mb: np.ndarray, nb: np.ndarray, ci: float = 0.95
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Interval of rate_a - rate_b on shared questions, unit `questions`: paired linearised t interval.

    Both groups are indexed by the same questions (last axis), so a question's effect on both rates
    cancels in the difference. The interval is never narrower than the answers-unit one: with
    questions as a sample there is at least the noise of the answers.
    """
    ma, na, mb, nb = _arrays(ma, na, mb, nb)
    (pa, ta), (pb, tb) = _pooled(ma, na), _pooled(mb, nb)
    used = (na > 0) | (nb > 0)
    g = used.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(na > 0, (ma - np.nan_to_num(pa)[..., None] * na) / ta[..., None], 0.0) - np.where(
            nb > 0, (mb - np.nan_to_num(pb)[..., None] * nb) / tb[..., None], 0.0)
        var = np.where(g >= 2, g / (g - 1) * (z**2).sum(axis=-1), np.nan)
    t = stats.t.ppf((1 + ci) / 2, np.maximum(g - 1, 1))
    d = pa - pb
    low, high = d - t * np.sqrt(var), d + t * np.sqrt(var)
    wl, wh = diff_interval_answers(ma, na, mb, nb, ci)
    low, high = np.fmin(low, wl), np.fmax(high, wh)
    ok = (g >= 2) & np.isfinite(d)
    return np.where(ok, low, np.nan), np.where(ok, high, np.nan)


def _signs(g: int, n_perm: int, rng: np.random.Generator | None) -> np.ndarray:
    if g <= EXACT_SIGNFLIP_MAX:
        return np.array(list(itertools.product((1.0, -1.0), repeat=g)))
    rng = rng or np.random.default_rng(0)
    draws = rng.choice((1.0, -1.0), size=(n_perm, g))
    return np.vstack([np.ones(g), draws])  # the observed pattern counts once, as in (b + 1) / (B + 1)


def signflip_pvalue(ma: np.ndarray, na: np.ndarray, mb: np.ndarray, nb: np.ndarray, *,
                    alternative: Alternative = "two-sided", n_perm: int = 20000,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Paired sign-flip randomisation test of rate_a vs rate_b with questions as the unit.

    Statistic: sum_q w_q (r_aq - r_bq) with w_q = n_aq + n_bq, over questions where both groups have
    answers that count. Under the null the two groups' labels are exchangeable within each question,
    so every sign pattern of the per-question differences is equally likely. Exact over all patterns
    up to 16 questions, Monte Carlo (`n_perm` patterns, (b+1)/(B+1)) beyond. NaN with no usable question.
    """
    ma, na, mb, nb = _arrays(ma, na, mb, nb)
    both = (na > 0) & (nb > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(both, (na + nb) * (ma / na - mb / nb), 0.0)
    lead = d.shape[:-1]
    d2 = d.reshape(-1, d.shape[-1])
    usable = both.reshape(-1, d.shape[-1]).any(axis=-1)
    out = np.full(d2.shape[0], np.nan)
    g = d.shape[-1]
    signs = _signs(g, n_perm, rng)
    tol = 1e-9 * np.maximum(np.abs(d2).sum(axis=-1), 1e-300)[:, None]
    chunk = max(1, 2_000_000 // len(signs))  # bounds the (rows x patterns) matrix to ~16 MB
    for start in range(0, d2.shape[0], chunk):
        block, t = d2[start:start + chunk], tol[start:start + chunk]
        perm = block @ signs.T  # (rows, patterns); the all-plus pattern gives the observed statistic
        obs = block.sum(axis=-1)[:, None]
        if alternative == "greater":
            hits = perm >= obs - t
        elif alternative == "less":
            hits = perm <= obs + t
        else:
            hits = np.abs(perm) >= np.abs(obs) - t
        out[start:start + chunk] = hits.mean(axis=-1)
    out[~usable] = np.nan
    return out.reshape(lead) if lead else out.reshape(())


def cmh_exact_pvalue(ma: np.ndarray, na: np.ndarray, mb: np.ndarray, nb: np.ndarray,
                     alternative: Alternative = "two-sided") -> float:
    """Exact conditional Cochran-Mantel-Haenszel test (questions as strata), for one comparison.

    Conditional on each question's margins, group a's misaligned count in question q is
    hypergeometric; the statistic is their sum, whose exact distribution is the convolution of the
    strata's. Two-sided: the probability of sums no more likely than the observed one. NaN with no
    informative stratum.
    """
    ma, na, mb, nb = (np.asarray(x, dtype=np.int64).ravel() for x in (ma, na, mb, nb))
    dist, low, observed = np.ones(1), 0, 0
    for a, n1, b, n2 in zip(ma, na, mb, nb):
        total, k = int(n1 + n2), int(a + b)
        if n1 == 0 or n2 == 0 or k == 0 or k == total:
            continue  # this question carries no information about the difference
        lo, hi = max(0, k - int(n2)), min(k, int(n1))
        pmf = stats.hypergeom.pmf(np.arange(lo, hi + 1), total, k, int(n1))
        dist, low, observed = np.convolve(dist, pmf), low + lo, observed + int(a)
    if len(dist) == 1:
        return float("nan")
    idx = observed - low
    if alternative == "greater":
        return float(min(1.0, dist[idx:].sum()))
    if alternative == "less":
        return float(min(1.0, dist[: idx + 1].sum()))
    return float(min(1.0, dist[dist <= dist[idx] * (1 + 1e-7)].sum()))


def fisher_pvalue(ma: int, na: int, mb: int, nb: int, alternative: Alternative = "two-sided"
                  ) -> tuple[float, float]:
    """Fisher's exact test on the pooled 2x2 table (answers as independent): (odds ratio, p); NaN without data."""
    if not na or not nb:
        return float("nan"), float("nan")
    test = stats.fisher_exact([[ma, na - ma], [mb, nb - mb]], alternative=alternative)
    return float(test.statistic), float(test.pvalue)


def seed_comparison(rates_a: np.ndarray, rates_b: np.ndarray, ci: float = 0.95) -> dict[str, float | int | None]:
    """Pooled two-sample t interval and test of mean per-seed rates (a - b); None without 2 seeds on a side."""
    a = np.asarray([r for r in rates_a if math.isfinite(r)], dtype=float)
    b = np.asarray([r for r in rates_b if math.isfinite(r)], dtype=float)
    df = max(len(a) - 1, 0) + max(len(b) - 1, 0)
    out: dict[str, float | int | None] = {"n_seeds_a": len(a), "n_seeds_b": len(b), "df": df, "difference": None,
                                           "ci_low": None, "ci_high": None, "p_value": None}
    if not len(a) or not len(b):
        return out
    out["difference"] = float(a.mean() - b.mean())
    if df < 1:
        return out
    ss = (((a - a.mean()) ** 2).sum() if len(a) > 1 else 0.0) + (((b - b.mean()) ** 2).sum() if len(b) > 1 else 0.0)
    se = math.sqrt(ss / df * (1 / len(a) + 1 / len(b)))
    t = float(stats.t.ppf((1 + ci) / 2, df))
    out["ci_low"], out["ci_high"] = out["difference"] - t * se, out["difference"] + t * se
    if se > 0:
        out["p_value"] = float(2 * stats.t.sf(abs(out["difference"]) / se, df))
    else:
        out["p_value"] = 1.0 if out["difference"] == 0 else 0.0
    return out


def mean_interval_questions(sums: np.ndarray, counts: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """t interval of a pooled mean (sum of values / count) with questions as the unit; NaN under two questions."""
    sums, counts = _arrays(sums, counts)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    g = len(counts)
    if g < 2:
        return float("nan"), float("nan")
    mean = sums.sum() / counts.sum()
    var = g / (g - 1) * ((sums - mean * counts) ** 2).sum() / counts.sum() ** 2
    half = float(stats.t.ppf((1 + ci) / 2, g - 1)) * math.sqrt(var)
    return float(mean - half), float(mean + half)


def mean_interval_answers(values: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """t interval of a mean of independent values (one question's answers); NaN under two values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan"), float("nan")
    half = float(stats.t.ppf((1 + ci) / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)
