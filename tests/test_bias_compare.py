"""Bias statistics on fixed labels: shares and lean with intervals, the permutation chi-square against scipy,
per-stem shifts, agreement (confusion matrix, Cohen's kappa), and the figures drawn from them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import cohen_kappa_score

from emkit.studies.bias.compare import (
    agreement,
    bias_stats,
    compare_models,
    distributions,
    permutation_chi2,
    stem_shifts,
)
from emkit.studies.bias.figures import render_figures
from emkit.studies.bias.report import agreement_section, headline


def frame(spec: dict[tuple[str, str], dict[str, int]], second: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows from {(model, stem): {label: count}}; topic = the stem's prefix."""
    rows = []
    for (model, stem), counts in spec.items():
        for label, n in counts.items():
            for i in range(n):
                rows.append({"id": f"{model}/{stem}#{label}{i}", "model": model, "stem_id": stem,
                             "topic": stem.split("-")[0], "stem": f"text of {stem}", "keywords_label": label})
    df = pd.DataFrame(rows)
    if second is not None:
        df["llm_label"] = df["keywords_label"].map(second)
    return df


SHIFTED = frame({
    ("base", "guns-1"): {"progressive": 12, "conservative": 4, "neutral": 4},
    ("base", "guns-2"): {"progressive": 10, "conservative": 6, "off-topic": 4},
    ("base", "tax-1"): {"progressive": 8, "conservative": 8, "neutral": 4},
    ("chat", "guns-1"): {"progressive": 4, "conservative": 14, "neutral": 2},
    ("chat", "guns-2"): {"progressive": 3, "conservative": 13, "off-topic": 4},
    ("chat", "tax-1"): {"progressive": 2, "conservative": 16, "neutral": 2},
})


def test_distributions() -> None:
    records = distributions(SHIFTED, ["keywords"], ["base", "chat"], n_boot=500)
    base = records[0]
    assert base["n"] == base["n_labelled"] == 60 and base["n_unlabelled"] == 0
    assert base["counts"] == {"progressive": 30, "conservative": 18, "neutral": 8, "off-topic": 4}
    shares = [base[f"share_{lab}"] for lab in ("progressive", "conservative", "neutral", "off-topic")]
    assert sum(shares) == pytest.approx(1.0) and base["share_progressive"] == pytest.approx(0.5)
    assert base["lean"] == pytest.approx((30 - 18) / 56)
    for key in ("share_progressive", "lean"):
        assert base[f"{key}_ci_low"] <= base[key] <= base[f"{key}_ci_high"]
        assert base[f"{key}_stem_ci_low"] <= base[f"{key}_stem_ci_high"]
    topics = distributions(SHIFTED, ["keywords"], ["base", "chat"], by_topic=True, n_boot=200)
    assert {(r["model"], r["topic"]) for r in topics} == {(m, t) for m in ("base", "chat") for t in ("guns", "tax")}
    one_stem = distributions(SHIFTED[SHIFTED["stem_id"] == "tax-1"], ["keywords"], ["base"], n_boot=200)[0]
    assert one_stem["lean_stem_ci_low"] is None  # stems cannot be resampled from one stem


def test_permutation_chi2_matches_scipy_without_strata() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat([0, 1], 150)
    labels = np.concatenate([rng.choice(4, 150, p=[0.4, 0.2, 0.3, 0.1]), rng.choice(4, 150, p=[0.3, 0.3, 0.3, 0.1])])
    statistic, p, dof = permutation_chi2(groups, labels, np.zeros(300, dtype=int), 4000, np.random.default_rng(0))
    table = np.array([[np.sum((groups == g) & (labels == k)) for k in range(4)] for g in range(2)])
    expected = scipy_stats.chi2_contingency(table, correction=False)
    assert statistic == pytest.approx(expected.statistic) and dof == expected.dof
    assert p == pytest.approx(expected.pvalue, abs=0.03)


def test_permutations_stay_within_stems() -> None:
    # labels depend only on the stem, and both models answered each stem equally often: no difference
    same = frame({(m, s): {lab: 10} for m in ("a", "b") for s, lab in (("x-1", "progressive"), ("x-2", "conservative"))})
    [test] = compare_models(same, "keywords", "a", ["b"], n_perm=500, n_boot=200)
    assert test["chi2"] == 0 and test["p_permutation"] == 1.0
    [test] = compare_models(SHIFTED, "keywords", "base", ["chat"], n_perm=2000, n_boot=500)
    assert test["p_permutation"] < 0.001 and test["p_asymptotic"] < 0.001 and test["dof"] == 3
    assert test["lean_shift"] == pytest.approx(test["lean_model"] - test["lean_reference"]) and test["lean_shift"] < 0
    assert test["lean_shift_ci_high"] < 0 and test["diff_share_conservative"] > 0
    assert test["table"]["reference"] == [30, 18, 8, 4]


def test_stem_shifts() -> None:
    shifts = stem_shifts(SHIFTED, "keywords", "base", ["chat"], n_boot=300, n_perm=500)
    assert [s["stem_id"] for s in shifts] == ["guns-1", "guns-2", "tax-1"]
    for s in shifts:
        assert s["lean_shift"] < 0 and s["lean_shift_ci_low"] <= s["lean_shift"] <= s["lean_shift_ci_high"]
        assert s["p_adjusted"] >= s["p_permutation"]
    assert shifts[0]["counts_model"] == {"progressive": 4, "conservative": 14, "neutral": 2, "off-topic": 0}


def test_agreement() -> None:
    mapping = {"progressive": "progressive", "conservative": "neutral", "neutral": "neutral", "off-topic": "off-topic"}
    df = frame({("a", "s-1"): {"progressive": 5, "conservative": 3, "neutral": 2, "off-topic": 1}}, mapping)
    df.loc[df.index[0], "llm_label"] = None  # unlabelled by one classifier: left out
    result = agreement(df, "keywords", "llm")
    both = df[df["llm_label"].notna()]
    assert result["n"] == 10
    assert result["kappa"] == pytest.approx(cohen_kappa_score(both["keywords_label"], both["llm_label"]))
    assert result["matrix"][1] == [0, 0, 3, 0]  # conservative by keywords, neutral by the LLM
    assert result["observed_agreement"] == pytest.approx(7 / 10)
    assert result["kappa_reason"] is None and result["per_model"]["a"]["kappa_reason"] is None


def test_undefined_kappa_is_none_with_a_reason() -> None:
    # both classifiers gave every completion one label: chance agreement 1, kappa 0/0 (was reported as 1.0)
    constant = frame({("a", "s-1"): {"neutral": 4}, ("b", "s-1"): {"neutral": 3}}, {"neutral": "neutral"})
    result = agreement(constant, "keywords", "llm")
    assert result["kappa"] is None and "chance agreement is 1" in result["kappa_reason"]
    assert result["per_model"]["a"]["kappa"] is None and result["per_model"]["a"]["kappa_reason"]
    # no completion labelled by both: no kappa, and the model still listed with n = 0
    none = frame({("a", "s-1"): {"neutral": 2, "progressive": 2}, ("b", "s-1"): {"neutral": 2}},
                 {"neutral": None, "progressive": "progressive"})
    result = agreement(none, "keywords", "llm")
    nobody = "no completion labelled by both classifiers"
    assert result["per_model"]["b"] == {"n": 0, "kappa": None, "kappa_reason": nobody}
    one = agreement(none[none["llm_label"].notna()].iloc[1:], "keywords", "llm")
    assert one["n"] == 1 and one["kappa"] is None and one["kappa_reason"].startswith("one completion")
    empty = agreement(none.assign(llm_label=None), "keywords", "llm")
    assert (empty["n"], empty["kappa"], empty["kappa_reason"]) == (0, None, nobody)
    # constant but different labels: chance agreement 0, kappa is defined and 0 (the formula, not a stand-in)
    apart = frame({("a", "s-1"): {"neutral": 4}}, {"neutral": "progressive"})
    assert agreement(apart, "keywords", "llm")["kappa"] == 0.0
    # null in JSON, "n/a" and the reason in the console and the report
    stats = bias_stats(constant, ["keywords", "llm"], ["a", "b"], "a", n_boot=50, n_perm=50)
    assert json.loads(json.dumps(stats, allow_nan=False))["agreement"]["kappa"] is None
    assert "kappa n/a (both classifiers labelled every completion 'neutral'" in headline(stats)
    assert "<b>n/a</b> (both classifiers labelled every completion" in agreement_section(stats)


def test_bias_stats_document_and_figures() -> None:
    df = SHIFTED.assign(llm_label=SHIFTED["keywords_label"].where(SHIFTED.index % 3 != 0, "neutral"))
    stats = bias_stats(df, ["keywords", "llm"], ["base", "chat"], "base", n_boot=200, n_perm=300)
    json.dumps(stats, allow_nan=False)  # JSON-ready: no NaN
    assert stats["n_completions"] == 120 and stats["n_stems"] == 3
    assert {t["classifier"] for t in stats["tests"]} == {"keywords", "llm"}
    assert len(stats["stems"]) == 6 and len(stats["topic_tests"]) == 4
    assert stats["agreement"]["n"] == 120
    figures = render_figures(stats)
    assert {"pie_grid", "lean", "topic_bars", "stem_shifts", "agreement", "pie_keywords_chat"} <= set(figures)
    assert all(data.startswith(b"\x89PNG") for data in figures.values())
