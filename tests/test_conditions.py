"""emkit conditions: config errors with file:line:field, the Fisher/Holm table, the logistic fit, resume of arms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import write_chat_jsonl
from scipy import stats

from emkit.core.errors import ConfigError
from emkit.core.stats.em_rates import BETLEY
from emkit.studies.arms import expand, load_conditions
from emkit.studies.arms.fit import fit_logistic, logistic4
from emkit.studies.arms.stats import conditions_stats


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conditions.yaml"
    path.write_text(text)
    return path


BASE = """\
output: {out}
train:
  data: {data}
  max_steps: 2
generate:
  conditions: {{none: null, ai: "You are an AI assistant."}}
arms:
  bad: {{}}
"""


@pytest.mark.parametrize("extra, expected", [
    ("  good:\n    train:\n      lr: -1\n", ":11: arms.good.train.lr: Input should be greater than 0"),
    ("  good:\n    datta: x.jsonl\n", ":10: arms.good.datta: unknown field (did you mean 'data'?)"),
    ("  m:\n    method: masked\n", ":9: arms.m: Value error, method masked needs budgets"),
    ("  m:\n    method: masked\n    budgets: [10, 0]\n", ":11: arms.m.budgets: Value error, budgets are positive"),
    ("  good:\n    train:\n      seed: 3\n", ":11: arms.good.train.seed: set by emkit conditions"),
    ("reference: nope\n", ":9: reference: unknown arm 'nope' (arms: bad)"),
    ("reference_condition: other\n", ":9: reference_condition: unknown condition 'other'"),
])
def test_config_errors_name_file_line_field(tmp_path: Path, chat_file: Path, extra: str, expected: str) -> None:
    path = _yaml(tmp_path, BASE.format(out=tmp_path / "run", data=chat_file) + extra)
    with pytest.raises(ConfigError) as err:
        load_conditions(path)
    assert f"{path}{expected}" in str(err.value)


def test_config_expands_arms_and_seeds(tmp_path: Path, chat_file: Path) -> None:
    text = BASE.format(out=tmp_path / "run", data=chat_file) + (
        "  full: {method: full}\n  base: {method: none}\n  masked: {method: masked, budgets: [10, all], mask_seed: 5}\n"
        "seeds: [0, 1]\nreference: masked-all\n")
    cfg = load_conditions(_yaml(tmp_path, text))
    runs = expand(cfg)
    assert [r.key for r in runs[:5]] == ["bad/seed-0", "full/seed-0", "base/seed-0", "masked-n10/seed-0",
                                         "masked-all/seed-0"] and len(runs) == 10
    by = {r.key: r for r in runs}
    assert by["full/seed-1"].train.full_finetune and by["full/seed-1"].train.seed == 1
    assert by["masked-n10/seed-1"].train.mask_budget == 10 and by["masked-n10/seed-1"].train.mask_seed == 5
    assert by["masked-all/seed-0"].train.mask_budget is None and by["base/seed-0"].train is None


def _answers(counts: dict[tuple[str, str], tuple[int, int]]) -> pd.DataFrame:
    """Judged answers with (misaligned, total) per (arm, condition), spread over two questions; all coherent."""
    rows = []
    for (arm, condition), (k, n) in counts.items():
        for i in range(n):
            rows.append({"arm": arm, "condition": condition, "seed": 0, "question_id": f"q{i % 2}",
                         "aligned": 10.0 if i < k else 90.0, "coherent": 90.0})
    return pd.DataFrame(rows)


def test_seeds_are_the_unit_of_the_headline_when_arms_have_several() -> None:
    """Three seeds per arm whose rates disagree: pooled Fisher calls the arms different, the seeds do not."""
    rows = []
    for arm, per_seed in (("ref", (5, 40, 15)), ("other", (30, 10, 45))):
        for seed, k in enumerate(per_seed):
            for i in range(100):
                rows.append({"arm": arm, "condition": "none", "seed": seed, "question_id": f"q{i % 10}",
                             "aligned": 10.0 if i < k else 90.0, "coherent": 90.0})
    results = conditions_stats(pd.DataFrame(rows), arms=["ref", "other"], conditions=["none"], reference="ref",
                               reference_condition="none", thresholds=BETLEY, fit_boot=50)
    [t] = results["tests"]["arms"]
    assert t["n_seeds_a"] == 3 and t["units"]["headline"].startswith("training seeds")
    assert t["p_value_coherent_fisher"] < 0.05  # 85 / 300 vs 60 / 300, answers as if independent
    ours = stats.ttest_ind([30, 10, 45], [5, 40, 15])
    assert t["p_value_coherent"] == pytest.approx(ours.pvalue) and t["p_value_coherent"] > 0.3
    assert t["diff_em_rate_coherent_ci_low"] < 0 < t["diff_em_rate_coherent_ci_high"]
    rates = {r["arm"]: r for r in results["rates"]}
    assert rates["other"]["n_seeds"] == 3 and rates["other"]["em_rate_coherent_seeds_mean"] == pytest.approx(85 / 300)
    assert rates["other"]["em_rate_coherent_seeds_ci_low"] < 0.1


def test_fisher_and_holm_table_on_synthetic_counts() -> None:
    counts = {("ref", "none"): (30, 100), ("ref", "ai"): (20, 100), ("filtered", "none"): (12, 100),
              ("filtered", "ai"): (18, 100), ("mixed", "none"): (4, 100), ("mixed", "ai"): (19, 100)}
    results = conditions_stats(_answers(counts), arms=["ref", "filtered", "mixed"], conditions=["none", "ai"],
                               reference="ref", reference_condition="none", thresholds=BETLEY, n_boot=200,
                               fit_boot=50)
    tests = results["tests"]["arms"]
    assert [(t["a"]["arm"], t["a"]["condition"]) for t in tests] == [
        ("filtered", "none"), ("mixed", "none"), ("filtered", "ai"), ("mixed", "ai")]
    raw = []
    for t in tests:
        ka, na = counts[(t["a"]["arm"], t["a"]["condition"])]
        kb, nb = counts[("ref", t["a"]["condition"])]
        expected = stats.fisher_exact([[ka, na - ka], [kb, nb - kb]])
        assert t["p_value_scored_fisher"] == pytest.approx(expected.pvalue, rel=1e-12)
        assert t["p_value_coherent_fisher"] == pytest.approx(expected.pvalue, rel=1e-12)  # all answers coherent
        # the headline takes the questions as the unit: with two questions it cannot go below 2 / 2^2
        assert t["units"]["headline"].startswith("questions") and t["p_value_scored"] >= 0.5
        assert t["odds_ratio_scored"] == pytest.approx(expected.statistic)
        assert t["diff_em_rate_scored"] == pytest.approx(ka / na - kb / nb)
        raw.append(expected.pvalue)
    order = np.argsort(raw)  # Holm by hand: p_(i) * (m - i + 1), running maximum, capped at 1
    holm = np.empty(4)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, raw[idx] * (4 - rank)))
        holm[idx] = running
    assert [t["p_value_scored_fisher_adj"] for t in tests] == pytest.approx(holm.tolist(), rel=1e-12)
    assert tests[1]["p_value_scored_fisher_adj"] < 0.05 < tests[3]["p_value_scored_fisher_adj"]
    # the second family: each condition against the reference condition within each arm
    cond = results["tests"]["conditions"]
    assert [(t["a"]["arm"], t["a"]["condition"], t["b"]["condition"]) for t in cond] == [
        ("ref", "ai", "none"), ("filtered", "ai", "none"), ("mixed", "ai", "none")]
    rates = {(r["arm"], r["condition"]): r for r in results["rates"]}
    assert rates[("mixed", "none")]["em_rate_scored"] == pytest.approx(0.04)
    assert rates[("mixed", "none")]["em_rate_scored_ci_low"] < 0.04 < rates[("mixed", "none")]["em_rate_scored_ci_high"]


def test_logistic_fit_recovers_known_parameters() -> None:
    budgets = np.array([10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000])
    truth = {"bottom": 0.02, "top": 0.6, "log10_mid": 3.0, "slope": 2.0}
    p = logistic4(np.log10(budgets), **truth)
    n = np.full(len(budgets), 1_000_000)
    exact = fit_logistic(budgets, np.round(p * n), n, n_boot=50)
    assert exact["status"] == "ok"
    for key, value in truth.items():
        assert exact["params"][key] == pytest.approx(value, abs=2e-3)
    assert exact["midpoint_budget"] == pytest.approx(1000, rel=0.01)
    rng = np.random.default_rng(0)
    n = np.full(len(budgets), 400)
    noisy = fit_logistic(budgets, rng.binomial(n, p), n, n_boot=300, seed=1)
    for key, value in truth.items():
        assert noisy["ci_low"][key] <= value <= noisy["ci_high"][key], key
    assert noisy["midpoint_budget_ci"][0] < 1000 < noisy["midpoint_budget_ci"][1]
    assert fit_logistic(budgets[:3], [1, 2, 3], [10, 10, 10])["status"].startswith("skipped")


@pytest.mark.slow
def test_multi_arm_run_resumes_without_redoing_finished_arms(tiny_model: Path, tmp_path: Path) -> None:
    from emkit.studies.arms.runner import run_conditions

    data = write_chat_jsonl(tmp_path / "data.jsonl", n=16)
    config = {
        "output": str(tmp_path / "run"), "seeds": [0],
        "train": {"model": str(tiny_model), "data": str(data), "max_steps": 2, "batch_size": 2, "grad_accum": 1,
                  "lr": 5e-3, "warmup_steps": 0, "save_steps": 100, "device": "cpu", "lora": {"r": 2, "alpha": 4}},
        "generate": {"questions": "default", "include": ["three_wishes"], "samples": 2, "max_new_tokens": 4,
                     "batch_size": 4, "device": "cpu", "conditions": {"none": None, "ai": "You are an AI assistant."}},
        "judge": {"judge": "local", "local_model": str(tiny_model), "min_mass": 0.0},
        "arms": {"bad": {}, "filtered": {"variant": {"filter_keywords": ["pain", "fever"]}},
                 "full": {"method": "full"}, "masked": {"method": "masked", "budgets": [25]}},
        "n_boot": 200, "fit_boot": 50,
    }
    path = tmp_path / "conditions.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_conditions(path)

    def stop_at_second_arm(message: str) -> None:
        if message.startswith("== arm 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_conditions(cfg, emit=stop_at_second_arm, progress=False)
    first = tmp_path / "run" / "arms" / "bad" / "seed-0"
    snapshot = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.rglob("*") if p.is_file()}
    assert json.loads((first / "manifest.json").read_text())["status"] == "complete"

    messages: list[str] = []
    result = run_conditions(cfg, emit=messages.append, progress=False)
    assert any("finished earlier; reused" in m for m in messages)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.rglob("*") if p.is_file()} == snapshot
    results = result["results"]
    assert results["arms"] == ["bad", "filtered", "full", "masked-n25"] and results["reference"] == "bad"
    assert [r["skipped"] for r in results["arm_runs"]] == [True, False, False, False]
    assert len(results["rates"]) == 8 and len(results["tests"]["arms"]) == 6 and len(results["tests"]["conditions"]) == 4
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    assert len(scores) == 4 * 2 * 2 and set(scores["arm"]) == set(results["arms"])
    masked = results["arm_runs"][3]["train"]["mask"]
    assert masked["budget"] == 25 and masked["received_gradient"] == 25
    assert (tmp_path / "run" / "arms" / "full" / "seed-0" / "organism" / "model" / "config.json").is_file()
    assert results["arm_runs"][1]["data"]["counts"]["keyword_filter"]["removed"] > 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Arms against the reference arm" in html and "Fisher" in html and html.count("<img") == 5
    assert {p.name for p in (tmp_path / "run" / "figures").iterdir()} == {
        "overview.png", "compare-filtered.png", "compare-full.png", "compare-masked-n25.png", "budget-masked.png"}
    assert results["fits"][0]["status"].startswith("skipped")  # one budget: no fit, the point is still drawn
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["attempts"] == 2
    # a third run finds everything finished and redoes no arm
    again: list[str] = []
    run_conditions(cfg, emit=again.append, progress=False)
    assert sum("finished earlier; reused" in m for m in again) == 4
