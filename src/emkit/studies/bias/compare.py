"""Statistics of a bias run: label distributions with bootstrap intervals, tests between models,
per-topic and per-stem shifts, and the agreement of two classifiers.

Input is the labels table (one row per completion: `model`, `stem_id`, `topic` and one
`<classifier>_label` column per classifier, None where a classifier gave no label).

- Shares: a label's share of a model's labelled completions (the four labels sum to one).
- Lean: (progressive - conservative) / on-topic completions, from -1 (all conservative) to +1 (all
  progressive); off-topic completions are left out of it.
- Intervals: seeded percentile bootstrap. `*_ci_*`: completions resampled within each stem (each
  stem keeps its count): the noise of sampling completions, the stems taken as fixed.
  `*_stem_ci_*`: stems resampled, each bringing all its completions (paired across models): the
  stems also treated as a sample; None with fewer than two stems.
- Test between two models: the chi-square statistic of their model x label table; its p-value from
  permutations of the model labels within each stem (no large-sample assumption, and the stems'
  mix cannot make a difference), beside the asymptotic chi-square p. Holm-adjusted over the
  comparisons of one classifier; per-stem tests are Benjamini-Hochberg adjusted over stems.
- Agreement: confusion matrix and Cohen's kappa over completions both classifiers labelled. Kappa is
  None (with `kappa_reason`) where it is undefined: no or one completion labelled by both, or both
  classifiers giving every completion one and the same label (chance agreement 1, kappa 0/0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from emkit.core.stats.em_rates import _interval, _resample_clusters, _resample_within, adjust_pvalues
from emkit.studies.bias.keywords import LABELS

ON_TOPIC = LABELS[:3]


def label_column(classifier: str) -> str:
    """The labels table's column of a classifier's labels."""
    return f"{classifier}_label"


def _num(x: Any) -> float | None:
    """A JSON-safe float (None for NaN or missing)."""
    if x is None:
        return None
    value = float(x)
    return value if math.isfinite(value) else None


def stem_counts(df: pd.DataFrame, classifier: str, stems: Sequence[str]) -> np.ndarray:
    """Label counts per stem, shape (stems, 4), of the rows a classifier labelled."""
    column = label_column(classifier)
    labelled = df[df[column].notna()]
    table = pd.crosstab(labelled["stem_id"], labelled[column]).reindex(index=list(stems), columns=list(LABELS))
    return table.fillna(0).to_numpy(dtype=np.int64)


def shares(c: np.ndarray) -> np.ndarray:
    """Each label's share along the last axis (NaN where nothing is labelled)."""
    total = c.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c / total


def lean(c: np.ndarray) -> np.ndarray:
    """(progressive - conservative) / on-topic along the last axis (NaN where nothing is on topic)."""
    on_topic = c[..., 0] + c[..., 1] + c[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c[..., 0] - c[..., 1]) / on_topic


def summarize_counts(c: np.ndarray, rng: np.random.Generator, n_boot: int, ci: float) -> dict[str, Any]:
    """Counts, shares and lean of one group from its per-stem counts (stems, 4), with both intervals."""
    total = c.sum(axis=0) if len(c) else np.zeros(len(LABELS), dtype=np.int64)
    if total.sum() == 0:
        empty: dict[str, Any] = {"n_labelled": 0, "counts": {lab: 0 for lab in LABELS}}
        for lab in LABELS:
            empty.update({f"share_{lab}{s}": None for s in ("", "_ci_low", "_ci_high", "_stem_ci_low", "_stem_ci_high")})
        empty.update({f"lean{s}": None for s in ("", "_ci_low", "_ci_high", "_stem_ci_low", "_stem_ci_high")})
        return empty
    within = _resample_within(c, n_boot, rng).sum(axis=1)
    cluster = _resample_clusters(c, n_boot, rng)
    out: dict[str, Any] = {"n_labelled": int(total.sum()), "counts": {lab: int(n) for lab, n in zip(LABELS, total)}}
    point, w_low, w_high = shares(total), *_interval(shares(within), ci)
    s_low, s_high = _interval(shares(cluster) if cluster is not None else None, ci)
    for i, lab in enumerate(LABELS):
        out[f"share_{lab}"] = _num(point[i])
        out[f"share_{lab}_ci_low"], out[f"share_{lab}_ci_high"] = _num(w_low[i]), _num(w_high[i])
        stem_low = s_low[i] if np.ndim(s_low) else s_low
        stem_high = s_high[i] if np.ndim(s_high) else s_high
        out[f"share_{lab}_stem_ci_low"], out[f"share_{lab}_stem_ci_high"] = _num(stem_low), _num(stem_high)
    out["lean"] = _num(lean(total))
    out["lean_ci_low"], out["lean_ci_high"] = map(_num, _interval(lean(within), ci))
    out["lean_stem_ci_low"], out["lean_stem_ci_high"] = map(
        _num, _interval(lean(cluster) if cluster is not None else None, ci))
    return out


def distributions(df: pd.DataFrame, classifiers: Sequence[str], models: Sequence[str], *, by_topic: bool = False,
                  n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> list[dict[str, Any]]:
    """One record per classifier x model (x topic): completions, counts, shares and lean with intervals."""
    rng = np.random.default_rng(seed)
    records = []
    topics = list(dict.fromkeys(df["topic"])) if by_topic else [None]
    for classifier in classifiers:
        for model in models:
            for topic in topics:
                rows = df[(df["model"] == model) & ((df["topic"] == topic) if topic is not None else True)]
                stems = list(dict.fromkeys(rows["stem_id"]))
                record: dict[str, Any] = {"classifier": classifier, "model": model}
                if topic is not None:
                    record["topic"] = topic
                record["n"] = len(rows)
                record.update(summarize_counts(stem_counts(rows, classifier, stems), rng, n_boot, ci))
                record["n_unlabelled"] = record["n"] - record["n_labelled"]
                records.append(record)
    return records


# ---------------------------------------------------------------- tests


def chi2_statistic(observed: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Pearson's chi-square over the last two axes, cells with zero expectation skipped."""
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(expected > 0, (observed - expected) ** 2 / expected, 0.0)
    return terms.sum(axis=(-2, -1))


def permutation_chi2(groups: np.ndarray, labels: np.ndarray, strata: np.ndarray, n_perm: int,
                     rng: np.random.Generator, chunk: int = 500) -> tuple[float, float, int]:
    """Chi-square of groups x labels and its p-value from permuting group labels within strata.

    Returns (statistic, permutation p, degrees of freedom). Permutations keep every stratum's group
    sizes, so only how labels pair with groups inside each stratum is random.
    """
    order = np.argsort(strata, kind="stable")
    groups, labels, strata = groups[order], labels[order], strata[order]
    n_groups, n_labels = int(groups.max()) + 1, int(labels.max()) + 1
    observed = np.zeros((n_groups, n_labels))
    np.add.at(observed, (groups, labels), 1)
    expected = observed.sum(1, keepdims=True) * observed.sum(0, keepdims=True) / observed.sum()
    statistic = float(chi2_statistic(observed, expected))
    dof = (int((observed.sum(1) > 0).sum()) - 1) * (int((observed.sum(0) > 0).sum()) - 1)
    if dof == 0:
        return statistic, 1.0, 0
    cells = n_groups * n_labels
    exceed = 0
    for start in range(0, n_perm, chunk):
        size = min(chunk, n_perm - start)
        # strata are sorted, so sorting stratum + U(0,1) shuffles rows within each stratum only
        shuffled = np.argsort(strata[None, :] + rng.random((size, len(groups))), axis=1)
        index = groups[shuffled] * n_labels + labels[None, :] + (np.arange(size) * cells)[:, None]
        counts = np.bincount(index.ravel(), minlength=size * cells).reshape(size, n_groups, n_labels)
        exceed += int((chi2_statistic(counts, expected[None]) >= statistic - 1e-9).sum())
    return statistic, (1 + exceed) / (1 + n_perm), dof


def _asymptotic_p(table: np.ndarray) -> float | None:
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    if table.shape[0] < 2 or table.shape[1] < 2:
        return None
    return float(stats.chi2_contingency(table, correction=False).pvalue)


def compare_models(df: pd.DataFrame, classifier: str, reference: str, others: Sequence[str], *,
                   n_boot: int = 2000, n_perm: int = 5000, seed: int = 0, ci: float = 0.95) -> list[dict[str, Any]]:
    """Each other model against the reference: label table, chi-square, permutation p, lean difference."""
    rng = np.random.default_rng(seed)
    column = label_column(classifier)
    records = []
    for other in others:
        rows = df[df["model"].isin([reference, other]) & df[column].notna()]
        stems = list(dict.fromkeys(rows["stem_id"]))
        a = stem_counts(rows[rows["model"] == other], classifier, stems)
        b = stem_counts(rows[rows["model"] == reference], classifier, stems)
        record: dict[str, Any] = {"classifier": classifier, "model": other, "reference": reference,
                                  "n_model": int(a.sum()), "n_reference": int(b.sum()),
                                  "table": {"labels": list(LABELS), "model": a.sum(0).tolist(),
                                            "reference": b.sum(0).tolist()}}
        if a.sum() == 0 or b.sum() == 0:
            record.update(chi2=None, dof=None, p_permutation=None, p_asymptotic=None)
            records.append(record)
            continue
        stratum = {s: i for i, s in enumerate(stems)}
        groups = (rows["model"] == other).to_numpy(dtype=np.int64)
        labels = rows[column].map({lab: i for i, lab in enumerate(LABELS)}).to_numpy(dtype=np.int64)
        statistic, p_perm, dof = permutation_chi2(groups, labels, rows["stem_id"].map(stratum).to_numpy(), n_perm,
                                                  rng)
        record.update(chi2=_num(statistic), dof=dof, p_permutation=_num(p_perm),
                      p_asymptotic=_asymptotic_p(np.stack([a.sum(0), b.sum(0)])))
        record.update(_differences(a, b, rng, n_boot, ci))
        records.append(record)
    for record, p in zip(records, adjust_pvalues([r.get("p_permutation") for r in records], "holm")):
        record["p_adjusted"] = _num(p)
    return records


def _differences(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_boot: int, ci: float) -> dict[str, Any]:
    """Model minus reference: share of each label and lean, with within-stem and paired stem intervals."""
    within_a = _resample_within(a, n_boot, rng).sum(axis=1)
    within_b = _resample_within(b, n_boot, rng).sum(axis=1)
    paired = _resample_clusters(np.stack([a, b], axis=1), n_boot, rng)  # (boot, 2, 4): same stems for both
    out: dict[str, Any] = {}
    point = shares(a.sum(0)) - shares(b.sum(0))
    w_low, w_high = _interval(shares(within_a) - shares(within_b), ci)
    p_low, p_high = _interval(shares(paired[:, 0]) - shares(paired[:, 1]) if paired is not None else None, ci)
    for i, lab in enumerate(LABELS):
        out[f"diff_share_{lab}"] = _num(point[i])
        out[f"diff_share_{lab}_ci_low"], out[f"diff_share_{lab}_ci_high"] = _num(w_low[i]), _num(w_high[i])
        out[f"diff_share_{lab}_stem_ci_low"] = _num(p_low[i] if np.ndim(p_low) else p_low)
        out[f"diff_share_{lab}_stem_ci_high"] = _num(p_high[i] if np.ndim(p_high) else p_high)
    out["lean_model"], out["lean_reference"] = _num(lean(a.sum(0))), _num(lean(b.sum(0)))
    out["lean_shift"] = _num(lean(a.sum(0)) - lean(b.sum(0)))
    out["lean_shift_ci_low"], out["lean_shift_ci_high"] = map(_num, _interval(lean(within_a) - lean(within_b), ci))
    out["lean_shift_stem_ci_low"], out["lean_shift_stem_ci_high"] = map(
        _num, _interval(lean(paired[:, 0]) - lean(paired[:, 1]) if paired is not None else None, ci))
    return out


def stem_shifts(df: pd.DataFrame, classifier: str, reference: str, others: Sequence[str], *, n_boot: int = 2000,
                n_perm: int = 2000, seed: int = 0, ci: float = 0.95) -> list[dict[str, Any]]:
    """Per stem and model: label counts and lean of model and reference, the lean shift with its
    interval, and a permutation chi-square p (BH-adjusted over the stems of one model)."""
    rng = np.random.default_rng(seed)
    column = label_column(classifier)
    records = []
    stems = df.drop_duplicates("stem_id")[["stem_id", "topic", "stem"]].to_dict("records")
    for other in others:
        mine = []
        for stem in stems:
            rows = df[(df["stem_id"] == stem["stem_id"]) & df["model"].isin([reference, other]) & df[column].notna()]
            a = stem_counts(rows[rows["model"] == other], classifier, [stem["stem_id"]])
            b = stem_counts(rows[rows["model"] == reference], classifier, [stem["stem_id"]])
            record: dict[str, Any] = {"classifier": classifier, "model": other, "reference": reference, **stem,
                                      "counts_model": dict(zip(LABELS, a[0].tolist())),
                                      "counts_reference": dict(zip(LABELS, b[0].tolist())),
                                      "lean_model": _num(lean(a[0])), "lean_reference": _num(lean(b[0]))}
            if a.sum() and b.sum():
                within = lean(_resample_within(a, n_boot, rng)[:, 0]) - lean(_resample_within(b, n_boot, rng)[:, 0])
                low, high = _interval(within, ci)
                groups = (rows["model"] == other).to_numpy(dtype=np.int64)
                labels = rows[column].map({lab: i for i, lab in enumerate(LABELS)}).to_numpy(dtype=np.int64)
                _, p, _ = permutation_chi2(groups, labels, np.zeros(len(rows), dtype=np.int64), n_perm, rng)
                record.update(lean_shift=_num(lean(a[0]) - lean(b[0])), lean_shift_ci_low=_num(low),
                              lean_shift_ci_high=_num(high), p_permutation=_num(p))
            else:
                record.update(lean_shift=None, lean_shift_ci_low=None, lean_shift_ci_high=None, p_permutation=None)
            mine.append(record)
        for record, p in zip(mine, adjust_pvalues([r["p_permutation"] for r in mine], "bh")):
            record["p_adjusted"] = _num(p)
        records += mine
    return records


# ---------------------------------------------------------------- agreement


def kappa_with_reason(x: Sequence[str], y: Sequence[str]) -> tuple[float | None, str | None]:
    """Cohen's kappa of two label sequences, or None and why it is undefined (never a stand-in value)."""
    n = len(x)
    if n < 2:
        return None, ("no completion labelled by both classifiers" if n == 0 else
                      "one completion labelled by both classifiers; kappa needs at least two")
    x, y = np.asarray(x, dtype=str), np.asarray(y, dtype=str)
    labels = sorted(set(x) | set(y))
    observed = float(np.mean(x == y))
    expected = float(sum(np.mean(x == lab) * np.mean(y == lab) for lab in labels))
    if expected >= 1.0:
        # both gave every completion the same label: observed and chance agreement are both 1, kappa is 0/0
        return None, (f"both classifiers labelled every completion '{labels[0]}': chance agreement is 1, "
                      "so kappa is undefined")
    return _num((observed - expected) / (1.0 - expected)), None


def agreement(df: pd.DataFrame, a: str, b: str) -> dict[str, Any]:
    """Confusion matrix (rows: classifier a, columns: b) and Cohen's kappa, overall and per model; an
    undefined kappa is None with `kappa_reason`."""
    from sklearn.metrics import confusion_matrix

    both = df[df[label_column(a)].notna() & df[label_column(b)].notna()]

    def kappa(rows: pd.DataFrame) -> dict[str, Any]:
        value, reason = kappa_with_reason(rows[label_column(a)].astype(str).tolist(),
                                          rows[label_column(b)].astype(str).tolist())
        return {"kappa": value, "kappa_reason": reason}

    matrix = confusion_matrix(both[label_column(a)].astype(str), both[label_column(b)].astype(str),
                              labels=list(LABELS)) if len(both) else np.zeros((4, 4), dtype=int)
    observed = float(np.trace(matrix) / matrix.sum()) if matrix.sum() else None
    # every model of the table, also one that no completion of which both classifiers labelled
    per_model = {str(m): {"n": int((both["model"] == m).sum()), **kappa(both[both["model"] == m])}
                 for m in dict.fromkeys(df["model"])}
    return {"a": a, "b": b, "labels": list(LABELS), "n": int(len(both)), "matrix": matrix.tolist(),
            **kappa(both), "observed_agreement": observed, "per_model": per_model}


def bias_stats(df: pd.DataFrame, classifiers: Sequence[str], models: Sequence[str], reference: str, *,
               n_boot: int = 2000, n_perm: int = 5000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready document (`bias_stats.json`)."""
    others = [m for m in models if m != reference]
    tests, stems, topic_tests = [], [], []
    for classifier in classifiers:
        tests += compare_models(df, classifier, reference, others, n_boot=n_boot, n_perm=n_perm, seed=seed, ci=ci)
        stems += stem_shifts(df, classifier, reference, others, n_boot=n_boot, n_perm=min(n_perm, 2000), seed=seed,
                             ci=ci)
        for topic, rows in df.groupby("topic", sort=False):
            for record in compare_models(rows, classifier, reference, others, n_boot=n_boot,
                                         n_perm=min(n_perm, 2000), seed=seed, ci=ci):
                topic_tests.append({"topic": topic, **record})
    out: dict[str, Any] = {
        "labels": list(LABELS), "classifiers": list(classifiers), "models": list(models), "reference": reference,
        "n_completions": int(len(df)), "n_stems": int(df["stem_id"].nunique()),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": ci}, "permutations": n_perm,
        "distributions": distributions(df, classifiers, models, n_boot=n_boot, seed=seed, ci=ci),
        "topics": distributions(df, classifiers, models, by_topic=True, n_boot=n_boot, seed=seed, ci=ci),
        "tests": tests, "topic_tests": topic_tests, "stems": stems,
    }
    if len(classifiers) >= 2:
        out["agreement"] = agreement(df, classifiers[0], classifiers[1])
    return out
