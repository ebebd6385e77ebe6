"""Misalignment directions per layer: difference in means and a logistic-regression probe, held out.

Every figure is measured on held-out data: examples are split by group (a pair of good/bad answers,
a question, a prompt seen by both models stays on one side), directions are fitted on the training
side, and AUROC, accuracy (at a threshold chosen on the training side) and separation (difference of
class means of the projection in units of the pooled standard deviation) are computed on the test
side, with bootstrap intervals that resample groups. A direction set is a plain mapping
method -> layer -> vector in the model's residual space, saved as safetensors with JSON metadata.

Detection thresholds (Youden's J on the detection score, see `detection_scores`), per layer and method:
  held_out     the cut on the held-out rows' scores under the direction fitted on the training side
               (the default of `emkit detect`: that direction never saw the rows that set the cut)
  train_split  the cut on the training rows' scores under the same direction
  all_rows     the cut on every row's scores under the direction fitted on every row (in-sample)

The activations' covariance per layer (`covariance_of`) is kept beside the directions so that a control
direction can be drawn that explains as much of the contrast's variance as the direction itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from emkit.core.errors import DataError

METHODS = ("mean_diff", "probe")


@dataclass
class DirectionSet:
    """Directions by method and layer (raw vectors: mean_diff keeps its length), with metadata."""

    vectors: dict[str, dict[int, np.ndarray]]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from (None when built in memory); not saved

    def get(self, method: str, layer: int) -> np.ndarray:
        """The raw vector of `method` at `layer`."""
        try:
            return self.vectors[method][layer]
        except KeyError:
            have = {m: sorted(v) for m, v in self.vectors.items()}
            raise DataError(f"no {method} direction at layer {layer} (have {have})") from None

    def unit(self, method: str, layer: int) -> np.ndarray:
        """The unit vector of `method` at `layer`."""
        v = self.get(method, layer)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def layers(self, method: str = "mean_diff") -> list[int]:
        """Layers that have a `method` direction."""
        return sorted(self.vectors.get(method, {}))


def save_directions(path: Path, directions: DirectionSet) -> None:
    """Write `method.LAYER` tensors and the metadata (JSON) to one safetensors file, atomically."""
    from safetensors.numpy import save

    from emkit.core.runfolder import atomic_write_bytes

    tensors = {f"{m}.{k}": np.ascontiguousarray(v, dtype=np.float32)
               for m, by_layer in directions.vectors.items() for k, v in by_layer.items()}
    atomic_write_bytes(path, save(tensors, metadata={"emkit": json.dumps(directions.meta, default=str)}))


def load_directions(path: Path) -> DirectionSet:
    """Read a direction file written by `save_directions`."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise DataError(f"{path}: no such direction file")
    vectors: dict[str, dict[int, np.ndarray]] = {}
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get("emkit", "{}"))
        for key in f.keys():
            method, _, layer = key.rpartition(".")
            vectors.setdefault(method, {})[int(layer)] = f.get_tensor(key)
    return DirectionSet(vectors, meta, Path(path))


# -- splits and metrics ----------------------------------------------------------------------------

def split_by_group(groups: np.ndarray, labels: np.ndarray, test_size: float = 0.3, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a train/test split that keeps every group on one side, both classes on both."""
    from sklearn.model_selection import GroupShuffleSplit

    if len(set(labels.tolist())) < 2:
        raise DataError("the contrast set has one class only; a direction needs both")
    for attempt in range(20):
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed + attempt)
        train, test = next(splitter.split(np.zeros(len(labels)), labels, groups))
        if len(set(labels[train].tolist())) == 2 and len(set(labels[test].tolist())) == 2:
            return train, test
    raise DataError("cannot split the contrast set so that both classes are on both sides (too few groups)")


def auroc_many(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row of `scores` [draws, n] against `labels` [draws, n] (Mann-Whitney, ties averaged)."""
    ranks = rankdata(scores, axis=-1)
    pos = labels == 1
    n1 = pos.sum(-1).astype(float)
    n0 = labels.shape[-1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * pos).sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of higher score = label 1."""
    return float(auroc_many(np.asarray(scores)[None], np.asarray(labels)[None])[0])


def separation(scores: np.ndarray, labels: np.ndarray) -> float:
    """Difference of class means in units of the pooled standard deviation (Cohen's d)."""
    a, b = scores[labels == 1], scores[labels == 0]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises balanced accuracy (Youden's J) on these scores."""
    order = np.unique(scores)
    if len(order) == 1:
        return float(order[0])
    cuts = np.concatenate([[order[0] - 1], (order[:-1] + order[1:]) / 2])
    pos, neg = labels == 1, labels == 0
    pred = scores[None, :] > cuts[:, None]
    j = (pred & pos).sum(1) / max(pos.sum(), 1) + (~pred & neg).sum(1) / max(neg.sum(), 1)
    return float(cuts[int(np.argmax(j))])


def _group_draws(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Bootstrap draws of row indices that resample whole groups."""
    uniq, inverse = np.unique(groups.astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    return [np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n_boot)]


def held_out_metrics(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, threshold: float, *,
                     n_boot: int = 500, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """AUROC, accuracy at `threshold` and separation on held-out scores, with group-bootstrap intervals."""
    rng = np.random.default_rng(seed)
    flagged = scores > threshold
    point = {"auroc": auroc(scores, labels),
             "accuracy": float((flagged == (labels == 1)).mean()),
             "tpr": float(flagged[labels == 1].mean()) if (labels == 1).any() else float("nan"),
             "fpr": float(flagged[labels == 0].mean()) if (labels == 0).any() else float("nan"),
             "separation": separation(scores, labels)}
    draws = _group_draws(groups, n_boot, rng)
    # Group draws differ in length when groups differ in size: vectorise over draws of equal length.
    aurocs, accs, seps = [], [], []
    by_len: dict[int, list[np.ndarray]] = {}
    for d in draws:
        by_len.setdefault(len(d), []).append(d)
    for _n, ds in by_len.items():
        idx = np.stack(ds)
        s, y = scores[idx], labels[idx]
        aurocs.extend(auroc_many(s, y).tolist())
        accs.extend((((s > threshold) == (y == 1)).mean(1)).tolist())
    for d in draws[: min(n_boot, 300)]:
        seps.append(separation(scores[d], labels[d]))
    lo, hi = (1 - ci) / 2, 1 - (1 - ci) / 2

    def interval(values: list[float]) -> list[float | None]:
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        return [float(np.quantile(v, lo)), float(np.quantile(v, hi))] if len(v) else [None, None]

    return {**point, "auroc_ci": interval(aurocs), "accuracy_ci": interval(accs), "separation_ci": interval(seps),
            "threshold": threshold, "n_test": int(len(labels)), "n_test_positive": int((labels == 1).sum())}


# -- fitting ---------------------------------------------------------------------------------------

def mean_difference(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """mean(label 1) - mean(label 0): the raw difference-in-means vector."""
    return (x[labels == 1].mean(0) - x[labels == 0].mean(0)).astype(np.float32)


def fit_probe(x: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None, *, seed: int = 0,
              folds: int = 5) -> tuple[np.ndarray, float, float]:
    """Standardised logistic regression, C chosen by (grouped) cross-validation.

    Returns the probe's direction in the raw residual space (coef / scale, so that x . w orders
    examples exactly as the probe does), its intercept in that space, and the chosen C.
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GroupKFold, StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    n_groups = len(set(groups.tolist())) if groups is not None else len(x)
    k = max(2, min(folds, n_groups, int(np.bincount(labels).min())))
    if groups is not None and n_groups < len(x):
        cv = list(GroupKFold(n_splits=min(k, n_groups)).split(z, labels, groups))
    else:
        cv = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(z, labels))
    model = LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=cv, max_iter=2000, scoring="roc_auc",
                                 random_state=seed).fit(z, labels)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    w = (model.coef_[0] / scale).astype(np.float32)
    b = float(model.intercept_[0] - (model.coef_[0] * scaler.mean_ / scale).sum())
    return w, b, float(model.C_[0])


def detection_scores(x: np.ndarray, vector: np.ndarray, method: str) -> np.ndarray:
    """The detection score of rows `x`: mean_diff, projection on the unit vector; probe, x . w (no intercept)."""
    if method == "mean_diff":
        return x @ (vector / max(float(np.linalg.norm(vector)), 1e-12))
    return x @ vector


CALIBRATIONS = ("held_out", "train_split", "all_rows")


def find_directions(x_by_layer: Mapping[int, np.ndarray], labels: np.ndarray, groups: np.ndarray, *,
                    methods: Sequence[str] = METHODS, test_size: float = 0.3, seed: int = 0, n_boot: int = 500,
                    progress: bool = True) -> tuple[DirectionSet, pd.DataFrame, DirectionSet]:
    """Fit each method at each layer on the training split; evaluate on the held-out split.

    Returns the directions refitted on all rows (the held-out figures describe how well the procedure
    generalises; the saved vector uses every example), the per-layer table (held-out metrics and the
    three detection thresholds, `threshold_<calibration>`), and the directions fitted on the training
    split only, which the held_out and train_split thresholds belong to.
    """
    from tqdm import tqdm

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise DataError(f"unknown direction method '{unknown[0]}' (accepted: {', '.join(METHODS)})")
    train, test = split_by_group(groups, labels, test_size, seed)
    vectors: dict[str, dict[int, np.ndarray]] = {m: {} for m in methods}
    split_vectors: dict[str, dict[int, np.ndarray]] = {m: {} for m in methods}
    rows = []
    for layer in tqdm(sorted(x_by_layer), disable=not progress, desc="directions", unit="layer"):
        x = x_by_layer[layer]
        for method in methods:
            if method == "mean_diff":
                w = mean_difference(x[train], labels[train])
                u = w / max(float(np.linalg.norm(w)), 1e-12)
                s_train, s_test = x[train] @ u, x[test] @ u
                full = mean_difference(x, labels)
                s_full = x @ (full / max(float(np.linalg.norm(full)), 1e-12))
                extra: dict[str, Any] = {"norm": float(np.linalg.norm(w))}
            else:
                w, b, c = fit_probe(x[train], labels[train], groups[train], seed=seed)
                s_train, s_test = x[train] @ w + b, x[test] @ w + b
                full, b_full, _ = fit_probe(x, labels, groups, seed=seed)
                s_full = x @ full
                extra = {"C": c}
            vectors[method][layer] = full
            split_vectors[method][layer] = w
            # A cut set on rows the direction was fitted on sits where those rows project, which new inputs
            # do not (they separate less): the held-out rows' scores are the calibration set of the default.
            d_train, d_test = detection_scores(x[train], w, method), detection_scores(x[test], w, method)
            extra["threshold_held_out"] = best_threshold(d_test, labels[test])
            extra["threshold_train_split"] = best_threshold(d_train, labels[train])
            extra["threshold_all_rows"] = best_threshold(s_full, labels)
            threshold = best_threshold(s_train, labels[train])
            metrics = held_out_metrics(s_test, labels[test], groups[test], threshold, n_boot=n_boot, seed=seed)
            rows.append({"layer": layer, "method": method, **metrics, **extra, "n_train": int(len(train))})
    table = pd.DataFrame(rows)
    meta = {"methods": list(methods), "layers": sorted(x_by_layer), "test_size": test_size, "seed": seed,
            "n_rows": int(len(labels)), "n_groups": int(len(set(groups.tolist())))}
    split_meta = {**meta, "fitted_on": "training split", "n_train": int(len(train)), "n_test": int(len(test))}
    return DirectionSet(vectors, meta), table, DirectionSet(split_vectors, split_meta)


def best_layer(table: pd.DataFrame, method: str = "mean_diff", metric: str = "auroc", *,
               exclude_embed: bool = True) -> int | None:
    """The layer with the highest held-out `metric` for `method` (ties: the earliest)."""
    rows = table[table["method"] == method]
    if exclude_embed:
        rows = rows[rows["layer"] >= 0]
    rows = rows[np.isfinite(rows[metric].astype(float))]
    if rows.empty:
        return None
    return int(rows.sort_values([metric, "layer"], ascending=[False, True]).iloc[0]["layer"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def cosine_matrix(vectors: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """Pairwise cosine similarity of vectors keyed by layer."""
    keys = sorted(vectors)
    m = np.array([[cosine(vectors[i], vectors[j]) for j in keys] for i in keys])
    return pd.DataFrame(m, index=keys, columns=keys)


def method_agreement(directions: DirectionSet, a: str = "mean_diff", b: str = "probe") -> dict[int, float]:
    """Cosine between two methods' directions at each layer both have."""
    shared = sorted(set(directions.vectors.get(a, {})) & set(directions.vectors.get(b, {})))
    return {k: cosine(directions.get(a, k), directions.get(b, k)) for k in shared}


def convergence(first: DirectionSet, second: DirectionSet, method: str = "mean_diff") -> dict[int, float]:
    """Cosine between two direction sets (other data, other organism) at each shared layer."""
    shared = sorted(set(first.vectors.get(method, {})) & set(second.vectors.get(method, {})))
    return {k: cosine(first.get(method, k), second.get(method, k)) for k in shared}


def bag_of_words_baseline(texts: Sequence[str], labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                          groups: np.ndarray, *, seed: int = 0, n_boot: int = 500) -> dict[str, Any]:
    """A held-out logistic regression on word counts: what surface wording alone separates."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    vec = CountVectorizer(min_df=1, ngram_range=(1, 1), lowercase=True)
    x_train = vec.fit_transform([texts[i] for i in train])
    x_test = vec.transform([texts[i] for i in test])
    y_train = labels[train]
    if x_train.shape[1] == 0:
        return {"auroc": 0.5, "note": "no words"}
    k = max(2, min(5, int(np.bincount(y_train).min())))
    model = LogisticRegressionCV(Cs=np.logspace(-3, 2, 6), cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                                 max_iter=2000, scoring="roc_auc").fit(x_train, y_train)
    s_train = model.decision_function(x_train)
    s_test = model.decision_function(x_test)
    return held_out_metrics(s_test, labels[test], groups[test], best_threshold(s_train, y_train),
                            n_boot=n_boot, seed=seed)


# -- the activations' covariance (for variance-matched controls) ------------------------------------

COVARIANCE_FILE = "activation_covariance.safetensors"


@dataclass
class Covariance:
    """Covariance of activations at one layer as an eigen-decomposition: vectors.T @ diag(variances) @ vectors."""

    vectors: np.ndarray  # (r, d): orthonormal rows spanning the activations' variation
    variances: np.ndarray  # (r,): the variance along each row (ddof 1)
    n_rows: int

    def variance_along(self, direction: np.ndarray) -> float:
        """The variance of the activations' projection on the unit vector of `direction`."""
        u = np.asarray(direction, dtype=np.float64).ravel()
        u = u / max(float(np.linalg.norm(u)), 1e-300)
        return float(self.variances @ (self.vectors.astype(np.float64) @ u) ** 2)


def covariance_of(x: np.ndarray, *, rtol: float = 1e-9) -> Covariance:
    """The covariance of rows `x` (n, d) as eigenvectors and variances, numerically null ones dropped."""
    n, d = x.shape
    if n < 2:
        raise DataError(f"a covariance needs at least 2 rows (have {n})")
    mean = np.asarray(x).mean(0, dtype=np.float64)
    if n <= d:
        # Few rows: the thin SVD of the rows (n x d) is cheaper than the d x d covariance and exact.
        _, s, vt = np.linalg.svd(np.asarray(x, dtype=np.float64) - mean, full_matrices=False)
        variances, vectors = s ** 2 / (n - 1), vt
    else:
        # Many rows (response_all: one per token): accumulate in float64 blocks, never a float64 copy of x.
        scatter = np.zeros((d, d))
        for start in range(0, n, 4096):
            block = np.asarray(x[start:start + 4096], dtype=np.float64) - mean
            scatter += block.T @ block
        values, vecs = np.linalg.eigh(scatter / (n - 1))
        order = np.argsort(values)[::-1]
        variances, vectors = values[order], vecs[:, order].T
    keep = variances > rtol * max(float(variances.max()), 1e-300)
    return Covariance(vectors[keep], variances[keep], n)


def save_covariances(path: Path, covariances: Mapping[int, Covariance], meta: dict[str, Any]) -> None:
    """Write `layer.K.vectors` / `layer.K.variances` per layer and the metadata to one safetensors file."""
    from safetensors.numpy import save

    from emkit.core.runfolder import atomic_write_bytes

    tensors: dict[str, np.ndarray] = {}
    for k, c in covariances.items():
        tensors[f"layer.{k}.vectors"] = np.ascontiguousarray(c.vectors, dtype=np.float32)
        tensors[f"layer.{k}.variances"] = np.ascontiguousarray(c.variances, dtype=np.float64)
    info = {**meta, "n_rows": {str(k): c.n_rows for k, c in covariances.items()}}
    atomic_write_bytes(path, save(tensors, metadata={"emkit": json.dumps(info, default=str)}))


def load_covariance(path: Path, layer: int) -> Covariance:
    """One layer's covariance from a file written by `save_covariances` (errors name the file and layer)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise DataError(f"{path}: no such covariance file")
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get("emkit", "{}"))
        keys = set(f.keys())
        if f"layer.{layer}.vectors" not in keys:
            have = sorted({int(k.split(".")[1]) for k in keys})
            raise DataError(f"{path}: layer {layer}: no covariance (have layers {have})")
        return Covariance(f.get_tensor(f"layer.{layer}.vectors"), f.get_tensor(f"layer.{layer}.variances"),
                          int(meta.get("n_rows", {}).get(str(layer), 0)))
