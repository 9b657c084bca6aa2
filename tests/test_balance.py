"""SRM and pre-period balance (issue 16): power on a 55/45 split, false alarms on intact designs,
rows dropped from one arm, tampered assignments."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines import balance


def _per_unit(rng, n_units: int, p_treated: float, days: int = 42, missing: float = 0.03, drop_treated: float = 0.0):
    """(unit_id, arm, published, with_sales) of a between design: each unit treated with p_treated."""
    arm = np.where(rng.random(n_units) < p_treated, "treatment", "control")
    rate = (1 - missing) * np.where(arm == "treatment", 1 - drop_treated, 1.0)
    return pd.DataFrame({"unit_id": np.arange(n_units), "arm": arm, "published": days,
                         "with_sales": rng.binomial(days, rate)})


def test_srm_blocks_a_55_45_split_of_2000_units_and_rarely_an_intact_design():
    rng = np.random.default_rng(0)
    trials = 600
    split = [balance.srm(_per_unit(rng, 2000, 0.55), "time_bound", 0.5)["verdict"] for _ in range(trials)]
    intact = [balance.srm(_per_unit(rng, 2000, 0.5), "time_bound", 0.5)["verdict"] for _ in range(trials)]
    blocked = np.mean([v == "block" for v in split])
    fired = np.mean([v != "ok" for v in intact])  # warn or block
    print(f"55/45 of 2000 units: blocked in {blocked:.1%} of {trials}; intact: fired (warn or block) in {fired:.1%}")
    assert blocked >= 0.80 and fired <= 0.01 + 2 * np.sqrt(0.01 * 0.99 / trials)
    assert np.mean([v == "block" for v in intact]) <= 0.005


def test_rows_dropped_from_one_arm_fail_the_days_test_though_units_are_intact():
    rng = np.random.default_rng(1)
    found = balance.srm(_per_unit(rng, 200, 0.5, drop_treated=0.10), "time_bound", 0.5)
    assert found["verdict"] == "block" and found["p_days"] < 1e-6 and found["p_units"] > 0.001
    # switchback: each unit's treated and control days, 10% of the treated ones lost
    units = np.arange(100)
    rows = pd.concat([
        pd.DataFrame({"unit_id": units, "arm": "treatment", "published": 21, "with_sales": rng.binomial(21, 0.97 * 0.9, 100)}),
        pd.DataFrame({"unit_id": units, "arm": "control", "published": 21, "with_sales": rng.binomial(21, 0.97, 100)}),
    ])
    assert balance.srm(rows, "random_days", 0.5)["verdict"] == "block"
    intact = rows.assign(with_sales=rng.binomial(21, 0.97, 200))
    assert balance.srm(intact, "random_days", 0.5)["verdict"] == "ok"


def test_balance_flags_an_assignment_that_follows_pre_period_sales():
    rng = np.random.default_rng(2)
    level = rng.lognormal(np.log(15), 0.7, 200)
    fd = pd.DataFrame({"experiment": "e", "product_id": [f"P{i}" for i in range(200)], "metric": "units",
                       "arm": np.where(rng.permutation(200) < 100, "treatment", "control"),
                       "pre_mean": level, "pre_price": rng.lognormal(np.log(20), 0.5, 200)})
    fd["unit_id"] = fd["product_id"]
    specs = pd.DataFrame({"name": ["e"], "design": ["time_bound"]})
    random = balance.balance_table(fd, specs).set_index("covariate")
    assert abs(random.loc["pre_mean", "smd"]) < 0.3 and not random["warn"].any()  # chance alone: |SMD| ~ 0.14 sd here
    tampered = fd.assign(arm=np.where(fd["pre_mean"].rank(pct=True) > 0.5, "treatment", "control"))
    table = balance.balance_table(tampered, specs).set_index("covariate")
    assert table.loc["pre_mean", "warn"] and table.loc["pre_mean", "smd"] > 1.0 and table.loc["pre_mean", "p"] < 0.001


def test_balance_rarely_warns_on_small_correctly_randomised_experiments():
    """6 products an arm: chance gives |SMD| ~ 0.6, which a fixed |SMD| >= 0.1 rule called unbalanced
    in ~90% of experiments; the permutation rule warns at about its level (<= 1% + MC error)."""
    rng = np.random.default_rng(3)
    trials, warned, old_rule = 300, 0, 0
    specs = pd.DataFrame({"name": ["e"], "design": ["time_bound"]})
    for _ in range(trials):
        fd = pd.DataFrame({"experiment": "e", "product_id": [f"P{i}" for i in range(12)], "metric": "units",
                           "arm": np.where(rng.permutation(12) < 6, "treatment", "control"),
                           "pre_mean": rng.lognormal(np.log(15), 0.7, 12), "pre_price": rng.lognormal(np.log(20), 0.5, 12)})
        fd["unit_id"] = fd["product_id"]
        table = balance.balance_table(fd, specs)
        warned += bool(table["warn"].any())
        old_rule += bool((table["smd"].abs() >= 0.1).any())
    print(f"12 products: permutation rule warned in {warned}/{trials}, |SMD| >= 0.1 in {old_rule}/{trials}")
    assert warned / trials <= 0.01 + 2 * np.sqrt(0.01 * 0.99 / trials) and old_rule / trials > 0.8


def test_balance_permutes_whole_clusters():
    """A cluster design's units are its clusters: products of one cluster move together, so two
    clusters of 6 that differ are not 'beyond chance' (p = 1/2 of the 2 labelings is the floor)."""
    fd = pd.DataFrame({"experiment": "e", "product_id": [f"P{i}" for i in range(12)], "metric": "units",
                       "arm": ["treatment"] * 6 + ["control"] * 6, "unit_id": ["C1"] * 6 + ["C2"] * 6,
                       "pre_mean": [30.0 + i for i in range(6)] + [10.0 + i for i in range(6)], "pre_price": 20.0})
    table = balance.balance_table(fd, pd.DataFrame({"name": ["e"], "design": ["time_bound"]})).set_index("covariate")
    assert table.loc["pre_mean", "smd"] > 1 and table.loc["pre_mean", "p"] > 0.4 and not table["warn"].any()


def _published_and_sold(design: str, n_products: int = 300, days: int = 42, seed: int = 0):
    """A published design (experiment, product_id, unit_id, date, arm, blackout) and the sales rows
    received for it: 3% of product-days have no row (no sale), as in a real feed."""
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2026-03-02", periods=days).date
    products = np.array([f"P{i:04d}" for i in range(n_products)])
    if design == "time_bound":  # half the products treated on every day
        treated = np.repeat(rng.permutation(n_products) < n_products // 2, days).reshape(n_products, days)
    else:  # random days: half the products treated on each day
        treated = np.column_stack([rng.permutation(n_products) < n_products // 2 for _ in range(days)])
    published = pd.DataFrame({
        "experiment": design, "product_id": np.repeat(products, days), "unit_id": np.repeat(products, days),
        "date": np.tile(dates, n_products), "arm": np.where(treated.ravel(), "treatment", "control"), "blackout": False})
    sold = published.loc[rng.random(len(published)) > 0.03, ["product_id", "date"]].assign(units=1.0)
    return published, sold


@pytest.mark.parametrize("design", ["time_bound", "random_days"])
def test_the_srm_check_fails_when_a_tenth_of_one_arms_sales_rows_go_missing(spark, design):
    """Through the check's own Spark aggregation (`sales_days_per_unit`): intact sales pass, the
    same sales with 10% of the treated arm's rows dropped (a price engine or feed failure) block."""
    published, sold = _published_and_sold(design)
    experiments = pd.DataFrame({"name": [design], "design": [design], "treated_fraction": [0.5]})

    def verdict(sales: pd.DataFrame) -> str:
        per_unit = balance.sales_days_per_unit(spark.createDataFrame(published), spark.createDataFrame(sales))
        assert per_unit["published"].sum() == len(published)
        return balance.srm_table(per_unit, experiments)["verdict"].iloc[0]

    assert verdict(sold) == "ok"
    treated_rows = sold.merge(published, on=["product_id", "date"])["arm"].eq("treatment").to_numpy()
    rng = np.random.default_rng(1)
    dropped = sold[~(treated_rows & (rng.random(len(sold)) < 0.10))]
    assert verdict(dropped) == "block"
