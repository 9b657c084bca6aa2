"""Decision metrics (issue 16): metric parsing, revenue and profit, the relative effect's
delta-method interval, Holm, guardrails, one results row per metric."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines import estimation, experiments, metrics
from tests.test_estimation import _panel

BASE = """name: m
design: time_bound
start: 2025-06-01
end: 2025-07-12
treatment: {price_change: -0.05}
seed: 1
"""
CATALOG = pd.DataFrame({"product_id": ["p1", "p2", "p3"], "category": ["kitchen", "kitchen", "garden"],
                        "subclass": ["knives", "pans", "tools"]})


def _load(tmp_path, extra: str, catalog=CATALOG):
    (tmp_path / "m.yaml").write_text(BASE + extra)
    return experiments.load_experiments(tmp_path, catalog)


def test_metrics_list_primary_first_and_metric_stays_a_one_metric_list(tmp_path):
    specs, refused = _load(tmp_path, "metrics: [revenue, units, profit]\ncosts: {kitchen: {margin_rate: 0.3}, garden: {unit_cost: 2}}\n")
    assert not refused and specs[0].all_metrics == ("revenue", "units", "profit") and specs[0].metric == "revenue"
    one = experiments.parse_experiment_file(_write(tmp_path, "one.yaml", BASE + "metric: units\n"))
    assert one.all_metrics == ("units",) and one.metrics == ()
    assert experiments.frame_to_specs(experiments.specs_to_frame(specs)) == specs


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("extra, field, reason", [
    ("metric: units\nmetrics: [units]\n", "metrics", "not both"),
    ("metrics: []\n", "metrics", "non-empty list"),
    ("metrics: [units, units]\n", "metrics", "listed twice"),
    ("metrics: [units]\nguardrails: [{metric: profit, direction: must_not_fall, tolerance: 0.02}]\n",
     "guardrails[0].metric", "add it to `metrics`"),
    ("metrics: [units]\nguardrails: [{metric: units, direction: down, tolerance: 0.02}]\n", "guardrails[0].direction", "not a direction"),
    ("metrics: [units]\nguardrails: [{metric: units, direction: must_not_fall, tolerance: 2}]\n", "guardrails[0].tolerance", "relative change"),
    ("costs: {kitchen: {unit_cost: -1}}\n", "costs.kitchen.unit_cost", "negative"),
    ("costs: {kitchen: {price: 1}}\n", "costs.kitchen", "exactly one of"),
])
def test_bad_metric_fields_are_refused_naming_file_and_field(tmp_path, extra, field, reason):
    with pytest.raises(experiments.ExperimentFileError) as caught:
        experiments.parse_experiment_file(_write(tmp_path, "bad.yaml", BASE + extra))
    assert caught.value.field == field and reason in caught.value.reason
    assert str(caught.value).startswith(f"{tmp_path / 'bad.yaml'}: field '{field}'")


def test_profit_without_a_unit_cost_is_refused_in_one_line(tmp_path):
    specs, refused = _load(tmp_path, "metrics: [units, profit]\n")
    assert not specs and len(refused) == 1
    message = str(refused[0])
    assert "\n" not in message and message.startswith(f"{tmp_path / 'm.yaml'}: field 'metrics': profit needs a unit cost")
    # a catalogue unit_cost covers it; a cost for one category only does not cover the other
    specs, refused = _load(tmp_path, "metrics: [units, profit]\n", CATALOG.assign(unit_cost=[1.0, 2.0, 3.0]))
    assert specs and not refused
    specs, refused = _load(tmp_path, "metrics: [units, profit]\ncosts: {kitchen: {unit_cost: 1}}\n")
    assert not specs and "1 product(s) (p3)" in refused[0].reason
    specs, refused = _load(tmp_path, "metrics: [units]\ncosts: {toys: {unit_cost: 1}}\n")
    assert refused[0].field == "costs.toys" and "unknown category" in refused[0].reason


def test_analysis_fields_leave_the_fingerprint_and_old_tables_load(tmp_path):
    plain = experiments.parse_experiment_file(_write(tmp_path, "a.yaml", BASE))
    rich = experiments.parse_experiment_file(_write(tmp_path, "b.yaml", BASE + "metrics: [units, revenue]\n"
                                                    "guardrails: [{metric: revenue, direction: must_not_fall, tolerance: 0.01}]\n"))
    assert experiments.spec_fingerprint(plain) == experiments.spec_fingerprint(rich)
    old = experiments.specs_to_frame([plain]).drop(columns=["metrics", "guardrails", "costs"])  # before issue 16
    assert experiments.frame_to_specs(old) == [plain]


def test_revenue_is_price_times_units_and_profit_uses_the_untreated_price_for_a_margin_rate():
    rows = pd.DataFrame({"price": [9.0, 10.0], "units": [2.0, 3.0], "price_change": [-0.1, 0.0],
                         "unit_cost": [np.nan, 4.0], "margin_rate": [0.3, np.nan]})
    np.testing.assert_allclose(metrics.metric_values_pandas(rows, "revenue"), [18.0, 30.0])
    # margin 30% of the untreated price 10 -> cost 7; the treated price 9 leaves 2 per unit
    np.testing.assert_allclose(metrics.metric_values_pandas(rows, "profit"), [4.0, 18.0])
    np.testing.assert_allclose(metrics.metric_values_pandas(rows.assign(revenue=[1.0, 2.0]), "revenue"), [1.0, 2.0])


def test_revenue_and_profit_first_differences_agree_between_spark_and_pandas(spark):
    sales, assignments = _panel(16, effect=4.0, design="time_bound", seed=3)
    sales["price"] = np.where(pd.to_datetime(sales["date"]).dt.dayofweek == 5, 9.0, 10.0)  # some price variation
    costs = pd.DataFrame({"experiment": "e", "product_id": sales["product_id"].unique()})
    costs["unit_cost"] = np.where(np.arange(len(costs)) % 2 == 0, 6.0, np.nan)
    costs["margin_rate"] = np.where(np.arange(len(costs)) % 2 == 0, np.nan, 0.4)
    wanted = {"e": ["units", "revenue", "profit"]}
    twin = estimation.first_differences_pandas(sales, assignments, {"e": "time_bound"}, wanted, unit_costs=costs)
    found = estimation.first_differences(spark.createDataFrame(sales), spark.createDataFrame(assignments), {"e": "time_bound"},
                                         wanted, unit_costs=spark.createDataFrame(costs)).toPandas()
    key = ["metric", "product_id"]
    twin, found = (f.sort_values(key).reset_index(drop=True) for f in (twin, found))
    assert sorted(found["metric"].unique()) == ["profit", "revenue", "units"] and len(found) == 48
    for column in ("first_difference", "treated_mean", "counterfactual_mean"):
        np.testing.assert_allclose(twin[column].to_numpy(float), found[column].to_numpy(float), rtol=1e-9)
    revenue = found[found["metric"] == "revenue"].set_index("product_id")
    units = found[found["metric"] == "units"].set_index("product_id")
    treated = units["arm"] == "treatment"
    # the treated days' observed revenue is price x units there (price 10 on weekdays, 9 on Saturdays)
    assert (revenue.loc[treated, "treated_mean"] > 8.9 * units.loc[treated, "treated_mean"]).all()
    assert (revenue.loc[treated, "treated_mean"] < 10.0 * units.loc[treated, "treated_mean"]).all()


def _ratio_world(rng, n_units=120, products_per_unit=1, effect=0.1):
    """A between design with lognormal levels: the effect is proportional to the level."""
    level = np.repeat(rng.lognormal(np.log(20), 0.8, n_units), products_per_unit) * rng.lognormal(0, 0.1, n_units * products_per_unit)
    unit = np.repeat([f"U{i}" for i in range(n_units)], products_per_unit)
    arm = np.repeat(np.where(rng.permutation(n_units) < n_units // 2, "treatment", "control"), products_per_unit)
    treated = arm == "treatment"
    noise = rng.normal(0, 1, len(level)) * np.sqrt(level) + rng.normal(0, 0.1, n_units).repeat(products_per_unit) * level
    fd = noise + effect * level * treated
    return pd.DataFrame({"experiment": "r", "product_id": [f"P{i}" for i in range(len(level))], "unit_id": unit,
                         "arm": arm, "first_difference": fd, "counterfactual_mean": level,
                         "treated_mean": np.where(treated, level * (1 + effect) + noise, np.nan)})


@pytest.mark.parametrize("products_per_unit", [1, 4])
def test_delta_method_matches_a_bootstrap_of_the_ratio_over_units(products_per_unit):
    rng = np.random.default_rng(7)
    fd = _ratio_world(rng, products_per_unit=products_per_unit)
    model = estimation.DiDEstimator(n_bootstrap=400, random_state=0, adjust=False).fit(fd)
    found = metrics.relative_effect(model.effect_, model.se_, model.analysed_)
    # the same ratio on units resampled within arm (the unit bootstrap), by brute force
    draws = []
    for b in range(400):
        parts = []
        for arm in ("treatment", "control"):
            units = fd.loc[fd["arm"] == arm, "unit_id"].unique()
            pick = rng.choice(units, len(units))
            parts.append(pd.concat([fd[fd["unit_id"] == u] for u in pick]))
        t, c = parts
        effect = t["first_difference"].mean() - c["first_difference"].mean()
        draws.append(effect / (t["treated_mean"].mean() - effect))
    assert found["se_rel"] == pytest.approx(np.std(draws, ddof=1), rel=0.15)
    assert found["ci_low_rel"] < found["relative_effect"] < found["ci_high_rel"]


def test_relative_interval_covers_at_about_95_percent_over_many_draws():
    rng = np.random.default_rng(11)
    covered = []
    for _ in range(150):
        fd = _ratio_world(rng)
        model = estimation.DiDEstimator(n_bootstrap=300, random_state=0, adjust=False).fit(fd)
        found = metrics.relative_effect(model.effect_, model.se_, model.analysed_)
        covered.append(found["ci_low_rel"] <= 0.1 <= found["ci_high_rel"])
    assert 0.89 <= np.mean(covered) <= 0.99, np.mean(covered)


def _revenue_world(rng, n=100, effect=-0.05):
    """A between design on a price-weighted metric: levels are units x price, both lognormal, so a
    few expensive products carry the spread; each product drifts since its pre-period (which the
    last-weeks covariate partly sees) and has its own relative effect around `effect`.
    Returns (first differences, true effect, true relative effect)."""
    level = rng.lognormal(np.log(5), 0.9, n) * rng.lognormal(np.log(20), 0.7, n)
    arm = np.where(rng.permutation(n) < n // 2, "treatment", "control")
    treated = arm == "treatment"
    drift = rng.normal(0, 0.15, n) * level
    noise = rng.normal(0, 1, n) * np.sqrt(level) * 2
    relative = rng.normal(effect, 0.05, n)
    ids = [f"P{i}" for i in range(n)]
    frame = pd.DataFrame({"experiment": "r", "product_id": ids, "unit_id": ids, "arm": arm,
                          "first_difference": drift + noise + relative * level * treated,
                          "pre_mean": level * rng.lognormal(0, 0.05, n), "recent_mean": level + 0.6 * drift + rng.normal(0, 0.05, n) * level,
                          "treated_mean": np.where(treated, level * (1 + relative) + drift + noise, np.nan)})
    return frame, float((relative * level).mean()), float((relative * level).sum() / level.sum())


def test_between_design_intervals_cover_a_price_weighted_metric():
    """Known truth over 300 draws of a 100-product between design on revenue-like first
    differences: the jackknife intervals (absolute, and relative from the jackknife of the ratio)
    cover at about 95%, and the SEs match the estimates' spread. Measured: coverage 0.953
    absolute, 0.957 relative; mean SE / empirical SE 0.99 absolute, 0.98 relative. (The unit
    bootstrap gets 0.94 here too; where it fell short, in the simulator's heavier-tailed revenue
    and profit, is in `estimation.jackknife_between`'s docstring.)"""
    rng = np.random.default_rng(5)
    errors, ses, covered, rel_errors, rel_ses, rel_covered = [], [], [], [], [], []
    for _ in range(300):
        fd, effect, relative = _revenue_world(rng)
        model = estimation.DiDEstimator(random_state=0).fit(fd)
        found = metrics.relative_effect(model.effect_, model.se_, model.analysed_, df=model.df_, se_rel=model.relative_se_)
        assert found["se_rel"] == model.relative_se_
        errors.append(model.effect_ - effect)
        ses.append(model.se_)
        covered.append(model.ci_[0] <= effect <= model.ci_[1])
        rel_errors.append(found["relative_effect"] - relative)
        rel_ses.append(found["se_rel"])
        rel_covered.append(found["ci_low_rel"] <= relative <= found["ci_high_rel"])
    assert 0.92 <= np.mean(covered) <= 0.98, np.mean(covered)
    assert 0.92 <= np.mean(rel_covered) <= 0.98, np.mean(rel_covered)
    assert 0.9 <= np.mean(ses) / np.std(errors, ddof=1) <= 1.15
    assert 0.9 <= np.mean(rel_ses) / np.std(rel_errors, ddof=1) <= 1.15


HETEROGENEITY = 0.02  # sd of the products' relative effects around 0.15


def _switchback_world(rng, n_products=100, days=42):
    """Random days on a fixed set of products: every product is treated on about half its days.
    Relative effects differ between products (0.15 +- HETEROGENEITY); the level is known from the
    pre-period (`pre_mean`) up to noise. Returns (first differences, true relative effect)."""
    level = rng.lognormal(np.log(20), 0.8, n_products)
    relative = rng.normal(0.15, HETEROGENEITY, n_products)
    treated_days = rng.binomial(days, 0.5, n_products)
    control_days = days - treated_days
    noise_t = rng.normal(0, 1, n_products) * np.sqrt(level * (1 + relative) / treated_days)
    noise_c = rng.normal(0, 1, n_products) * np.sqrt(level / control_days)
    fd = relative * level + noise_t - noise_c
    ids = [f"P{i}" for i in range(n_products)]
    frame = pd.DataFrame({"experiment": "s", "product_id": ids, "unit_id": ids, "arm": "switchback", "first_difference": fd,
                          "pre_mean": level * rng.lognormal(0, 0.1, n_products), "recent_mean": level * rng.lognormal(0, 0.2, n_products),
                          "treated_mean": level * (1 + relative) + noise_t, "counterfactual_mean": level})
    return frame, float((relative * level).sum() / level.sum())


def test_switchback_relative_interval_holds_the_products_level_fixed():
    """In a switchback design every product is treated, so the level B is the population's: its
    only error is the effect's. Known truth over 200 draws (each its own products). Measured:
    coverage 0.990, mean SE / empirical SE 1.22; adding the level's sampling variance, as a
    between design must, gave 1.000 and 2.72 (the first 150 draws). What is left of the width is the
    effect's own SE: the product bootstrap counts the products' differing effects as error
    (1.16 with none, 1.64 at +- 0.05), though every product is in the estimand."""
    rng = np.random.default_rng(21)
    errors, ses, covered = [], [], []
    for _ in range(200):
        fd, truth = _switchback_world(rng)
        model = estimation.DiDEstimator(n_bootstrap=200, random_state=0).fit(fd)
        found = metrics.relative_effect(model.effect_, model.se_, model.analysed_, df=model.df_)
        errors.append(found["relative_effect"] - truth)
        ses.append(found["se_rel"])
        covered.append(found["ci_low_rel"] <= truth <= found["ci_high_rel"])
        assert found["se_rel"] == pytest.approx(
            (found["baseline"] + model.effect_) * model.se_ / found["baseline"] ** 2, rel=1e-9)
    ratio = np.mean(ses) / np.std(errors, ddof=1)
    print(f"switchback relative: coverage {np.mean(covered):.3f}, mean SE / empirical SE {ratio:.3f}")
    assert np.mean(covered) >= 0.93 and 0.9 <= ratio <= 1.4, (np.mean(covered), ratio)


def test_holm_and_guardrails():
    np.testing.assert_allclose(metrics.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    adjusted = metrics.holm([0.2, np.nan, 0.01])
    assert np.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.2) and adjusted[2] == pytest.approx(0.02)
    assert metrics.guardrail_status("must_not_fall", 0.02, -0.01, 0.03) == "held"
    assert metrics.guardrail_status("must_not_fall", 0.02, -0.08, -0.03) == "breached"
    assert metrics.guardrail_status("must_not_fall", 0.02, -0.05, 0.01) == "inconclusive"
    assert metrics.guardrail_status("must_not_rise", 0.02, 0.03, 0.05) == "breached"


def test_results_have_one_row_per_estimator_and_metric_with_holm_and_guardrail():
    rng = np.random.default_rng(5)
    fd = pd.concat([_ratio_world(rng, effect=e).assign(metric=m) for m, e in (("units", 0.1), ("revenue", 0.03), ("profit", -0.1))])
    specs = pd.DataFrame({"name": ["r"], "design": ["time_bound"], "metric": ["units"],
                          "metrics": [json.dumps(["units", "revenue", "profit"])],
                          "guardrails": [json.dumps([["profit", "must_not_fall", 0.02]])]})
    results, problems = estimation.estimate_experiments(fd, specs, pd.Timestamp("2026-02-01"), n_bootstrap=200,
                                                        hpte_params={"n_estimators": 20})
    assert not problems and len(results) == 6 and list(results.columns) == estimation.RESULT_COLUMNS
    assert list(results["metric"]) == ["units", "units", "revenue", "revenue", "profit", "profit"]
    assert list(results["role"]) == ["primary"] * 2 + ["secondary"] * 2 + ["guardrail"] * 2
    for _, rows in results.groupby("estimator"):
        np.testing.assert_allclose(rows["p_holm"], metrics.holm(rows["p_value"]))
    profit = results[results["metric"] == "profit"].iloc[0]
    assert profit["guardrail_status"] == metrics.guardrail_status("must_not_fall", 0.02, profit["ci_low_rel"], profit["ci_high_rel"])
    assert (results["ci_low_rel"] < results["relative_effect"]).all() and (results["relative_effect"] < results["ci_high_rel"]).all()
