"""Multi-arm experiments (`emkit conditions CONFIG`): what changes how much misalignment emerges.

One config names many arms (base models, datasets and their variants, masked-LoRA budgets, full
fine-tuning beside LoRA, the untrained base), each trained and evaluated alike at each seed and under
every system-prompt condition; the result is EM per arm x condition with intervals, Fisher exact
tests against a reference arm (and condition) corrected for multiple comparisons, a logistic fit of
EM rate against log budget for masked LoRA, and an HTML report.

    config.py   the YAML config, its checks (file:line:field), the expansion into (arm, seed) runs
    runner.py   the run folder: data variants, one resumable run folder per arm and seed, combination
    stats.py    rates, per-seed rates, Fisher test families, masked-LoRA fits -> conditions.json
    fit.py      the 4-parameter logistic and its bootstrap
    figures.py  overview, one figure per comparison, budget curves
    report.py   report.html and the console table
"""

from emkit.studies.arms.config import ArmConfig, ConditionsConfig, expand, load_conditions

__all__ = ["ArmConfig", "ConditionsConfig", "expand", "load_conditions"]
