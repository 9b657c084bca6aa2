"""Estimation against known truth: a synthetic panel with a planted additive effect."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipelines import estimation

START = dt.date(2026, 1, 5)
PRE_DAYS, WINDOW_DAYS = 200, 28


def _panel(n_products: int, effect: float, design: str, seed: int, blackout_days: int = 0):
    """Products with level, trend and weekly pattern; treated product-days get `effect` units."""
    rng = np.random.default_rng(seed)
    days = [START - dt.timedelta(days=PRE_DAYS) + dt.timedelta(days=i) for i in range(PRE_DAYS + WINDOW_DAYS)]
    sales, assignments = [], []
    for p in range(n_products):
        level, trend = rng.uniform(10, 30), rng.normal(0, 3)
        weekly = rng.normal(0, 2, 7)
        arm_fixed = "treatment" if p % 2 == 0 else "control"
        for d in days:
            k = (d - START).days
            in_window = k >= 0
            if design == "time_bound":
                arm = arm_fixed
            else:  # random_days
                arm = "treatment" if rng.random() < 0.5 else "control"
            blackout = in_window and design == "crossover" and k % 14 < blackout_days
            mean = level + trend * k / 365 + weekly[d.weekday()]
            treated = in_window and arm == "treatment"
            y = max(0.0, mean + (effect if treated else 0.0) + rng.normal(0, 3))
            sales.append((f"P{p:03d}", d, 10.0, y))
            if in_window:
                assignments.append((d, "e", f"P{p:03d}", f"P{p:03d}", arm, blackout, -0.1 if arm == "treatment" else 0.0))
    sales = pd.DataFrame(sales, columns=["product_id", "date", "price", "units"])
    assignments = pd.DataFrame(
        assignments, columns=["date", "experiment", "product_id", "unit_id", "arm", "blackout", "price_change"]
    )
    return sales, assignments


@pytest.mark.parametrize("design", ["time_bound", "random_days"])
def test_first_differences_recover_a_planted_effect(spark, design):
    sales, assignments = _panel(40, effect=4.0, design=design, seed=1)
    fd = estimation.first_differences(
        spark.createDataFrame(sales), spark.createDataFrame(assignments), {"e": design}
    ).toPandas()
    assert len(fd) == 40 and fd["n_pre_days"].min() == PRE_DAYS and fd["n_window_days"].max() == WINDOW_DAYS
    model = estimation.DiDEstimator(n_bootstrap=500, random_state=0).fit(fd)
    assert model.ci_[0] <= 4.0 <= model.ci_[1], (model.effect_, model.ci_)
    assert abs(model.effect_ - 4.0) < 3 * model.se_
    if design == "random_days":
        assert set(fd["arm"]) == {"switchback"}
    else:
        assert set(fd["arm"]) == {"treatment", "control"}


def test_products_without_enough_history_are_left_out(spark):
    sales, assignments = _panel(6, effect=0.0, design="time_bound", seed=2)
    short = sales[~((sales["product_id"] == "P000") & (sales["date"] < START - dt.timedelta(days=10)))]
    fd = estimation.first_differences(spark.createDataFrame(short), spark.createDataFrame(assignments), {"e": "time_bound"})
    assert sorted(fd.toPandas()["product_id"]) == [f"P{p:03d}" for p in range(1, 6)]


def test_bootstrap_interval_covers_at_the_nominal_rate():
    """Between design, cluster units: 300 replications of first differences with known effect."""
    covered, estimates, ses = 0, [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        clusters = np.repeat(np.arange(60), 3)  # 60 clusters of 3 products
        arm = np.where(clusters % 2 == 0, "treatment", "control")
        cluster_shock = rng.normal(0, 1.0, 60)[clusters]
        fd = pd.DataFrame(
            {
                "product_id": [f"P{i}" for i in range(len(clusters))],
                "unit_id": clusters.astype(str),
                "arm": arm,
                "first_difference": 2.0 * (arm == "treatment") + cluster_shock + rng.normal(0, 1.0, len(clusters)),
            }
        )
        model = estimation.DiDEstimator(n_bootstrap=400, random_state=seed).fit(fd)
        covered += model.ci_[0] <= 2.0 <= model.ci_[1]
        estimates.append(model.effect_)
        ses.append(model.se_)
    coverage = covered / 300
    assert 0.90 <= coverage <= 0.985, coverage
    assert abs(np.mean(estimates) - 2.0) < 0.2 * np.mean(ses)  # unbiased
    assert 0.85 < np.mean(ses) / np.std(estimates) < 1.15  # honest SE


def test_estimate_experiments_reports_unestimable_ones():
    fd = pd.DataFrame(
        {
            "experiment": ["a"] * 4 + ["b"] * 2,
            "product_id": ["P1", "P2", "P3", "P4", "P5", "P6"],
            "unit_id": ["P1", "P2", "P3", "P4", "P5", "P6"],
            "arm": ["treatment", "treatment", "control", "control", "treatment", "treatment"],
            "first_difference": [2.0, 3.0, 0.0, 1.0, 1.0, 1.0],
            "counterfactual_mean": [10.0] * 6,
        }
    )
    specs = pd.DataFrame({"name": ["a", "b", "c"], "design": ["time_bound"] * 3, "metric": ["units"] * 3})
    results, problems = estimation.estimate_experiments(fd, specs, pd.Timestamp("2026-02-01"), n_bootstrap=200)
    assert list(results["experiment"]) == ["a"]
    assert results["effect"].iloc[0] == pytest.approx(2.0)
    assert results["relative_effect"].iloc[0] == pytest.approx(0.2)
    assert list(results.columns) == estimation.RESULT_COLUMNS
    assert "control arm has 0" in problems["b"] and "no first differences" in problems["c"]
