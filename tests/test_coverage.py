"""Honest intervals with few randomisation units (issues 16, 18): small seeded synthetic
experiments with known truth, fast (no Spark, no simulator)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines import estimation
from pipelines import metrics as metric_rules


def _between_experiment(rng: np.random.Generator, n_per_arm: int = 12, effect: float = 1.0) -> pd.DataFrame:
    """A time-bound experiment of 2 x n_per_arm products: first difference = level-driven noise
    plus the effect on treated products; the four adjustment covariates carry little signal."""
    n = 2 * n_per_arm
    level = rng.lognormal(np.log(15), 0.5, n)
    arm = np.array(["treatment"] * n_per_arm + ["control"] * n_per_arm)
    fd = rng.normal(0, 1, n) * np.sqrt(level) + 0.05 * (level - 15) + effect * (arm == "treatment")
    return pd.DataFrame({
        "experiment": "e", "product_id": [f"p{i:03d}" for i in range(n)], "unit_id": [f"p{i:03d}" for i in range(n)],
        "arm": arm, "first_difference": fd, "pre_mean": level * rng.lognormal(0, 0.1, n),
        "recent_mean": level * rng.lognormal(0, 0.2, n), "placebo": rng.normal(0, 1, n), "recent_gap": rng.normal(0, 1, n),
        "treated_mean": np.where(arm == "treatment", level + effect, np.nan), "counterfactual_mean": level,
    })


def test_did_interval_covers_with_few_units_and_an_adjustment():
    """24 products, 4 covariates: the bootstrap must carry the adjustment's own error and the t
    quantile. Measured (400 experiments, seed 16): coverage 0.980, mean SE / empirical SE 1.045;
    the fixed-slope bootstrap with a basic interval (before, commit 16b5212) gave 0.833 and 0.734."""
    rng = np.random.default_rng(16)
    errors, ses, covered = [], [], []
    for _ in range(400):
        model = estimation.DiDEstimator(n_bootstrap=200, random_state=int(rng.integers(1 << 30))).fit(_between_experiment(rng))
        errors.append(model.effect_ - 1.0)
        ses.append(model.se_)
        covered.append(model.ci_[0] <= 1.0 <= model.ci_[1])
    coverage, ratio = np.mean(covered), np.mean(ses) / np.std(errors, ddof=1)
    print(f"coverage {coverage:.3f}, SE ratio {ratio:.3f}")
    assert coverage >= 0.95, coverage
    assert ratio >= 0.97, ratio


def test_adjusted_effect_equals_the_fixed_adjustment_point_estimate():
    rng = np.random.default_rng(3)
    fd = estimation._in_product_order(_between_experiment(rng))
    groups = estimation.comparison_groups(fd)
    adjusted, _, columns = estimation.regression_adjustment(fd, groups, 1, rng)
    x = estimation.covariate_matrix(fd, columns)[0]
    effect, draws = estimation.adjusted_effect(fd["unit_id"].to_numpy(), fd["first_difference"].to_numpy(float), x,
                                               groups, False, 50, rng)
    expected = adjusted[groups == "treatment"].mean() - adjusted[groups == "control"].mean()
    assert abs(effect - expected) < 1e-9
    assert len(draws) == 50 and np.isfinite(draws).all()


def test_resample_counts_draw_k_minus_one_units():
    counts = estimation.resample_counts(10, 2000, np.random.default_rng(0))
    assert (counts.sum(axis=1) == 9).all()
    values = np.random.default_rng(1).normal(0, 1, 10)
    means = counts @ values / 9
    # the resampled mean's variance is s^2 / k (unbiased), not (k - 1)/k of it
    assert abs(means.var() / (values.var(ddof=1) / 10) - 1) < 0.1


def test_relative_and_p_value_use_student_t():
    wide = metric_rules.p_value(2.0, 1.0, df=10)
    assert wide > metric_rules.p_value(2.0, 1.0) > 0.04
    fd = _between_experiment(np.random.default_rng(5))
    model = estimation.DiDEstimator(n_bootstrap=200).fit(fd)
    t = metric_rules.relative_effect(model.effect_, model.se_, model.analysed_, df=model.df_)
    z = metric_rules.relative_effect(model.effect_, model.se_, model.analysed_)
    assert t["ci_high_rel"] - t["ci_low_rel"] > z["ci_high_rel"] - z["ci_low_rel"]
    assert 15 < model.df_ < 24
