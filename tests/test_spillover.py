"""Spillover: exposure mapping, the numpy redraw of the design, IPW estimates against the simulator."""
from __future__ import annotations

import itertools
import warnings
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from pipelines import assignment, estimation, simulation, spillover
from pipelines.experiments import ExperimentSpec

START = date(2026, 1, 5)


def _spec(unit="product", seed=7, design="time_bound", days=14, name="spill-test", fraction=0.5):
    return ExperimentSpec(name=name, design=design, start=START, end=START + timedelta(days=days - 1), unit=unit,
                          treated_fraction=fraction, price_change=-0.1, seed=seed)


def _rows(spec, units, treated_units, days=None):
    """Contract rows for every day of `spec` from a set of treated unit ids."""
    days = days or [spec.start + timedelta(days=i) for i in range(spec.n_days)]
    frames = []
    for day in days:
        treated = units["unit_id"].isin(treated_units).to_numpy()
        frames.append(pd.DataFrame({"date": day, "experiment": spec.name, "product_id": units["product_id"],
                                    "unit_id": units["unit_id"], "arm": np.where(treated, "treatment", "control"),
                                    "blackout": False, "price_change": np.where(treated, spec.price_change, 0.0)}))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------------
# exposure mapping
# ------------------------------------------------------------------------------------------------

def test_exposure_is_the_weighted_share_of_treated_neighbours():
    # a path A - B - C with weights 1 and 3, plus D isolated; B and C treated on day 1, only C on day 2
    edges = pd.DataFrame({"src": ["A", "B"], "dst": ["B", "C"], "weight": [1.0, 3.0]})
    day1, day2 = date(2026, 1, 1), date(2026, 1, 2)
    arms = {day1: {"B", "C"}, day2: {"C"}}
    rows = pd.DataFrame([
        {"date": d, "product_id": p, "arm": "treatment" if p in arms[d] else "control", "blackout": False}
        for d in (day1, day2) for p in "ABCD"
    ])
    out = spillover.exposure_mapping(rows, edges).set_index(["date", "product_id"])
    assert out.loc[(day1, "A"), "exposure"] == pytest.approx(1.0)
    assert out.loc[(day1, "B"), "exposure"] == pytest.approx(0.75)  # C (weight 3) of 1 + 3
    assert out.loc[(day1, "C"), "exposure"] == pytest.approx(1.0)
    assert out.loc[(day2, "B"), "exposure"] == pytest.approx(0.75)
    assert out.loc[(day2, "C"), "exposure"] == pytest.approx(0.0)
    assert out.loc[(day1, "D"), "exposure"] == 0.0 and not out.loc[(day1, "D"), "has_neighbours"]
    assert out.loc[(day1, "A"), "condition"] == "control_some_treated"
    assert out.loc[(day1, "B"), "condition"] == "treated_mostly_treated"
    assert out.loc[(day2, "C"), "condition"] == "treated_few_treated"
    assert out.loc[(day2, "A"), "condition"] == "control_none_treated"
    assert out.loc[(day2, "D"), "condition"] == "control_none_treated"


def test_bad_edge_weight_is_refused_with_the_pair():
    rows = pd.DataFrame({"date": [START], "product_id": ["A"], "arm": ["control"], "blackout": [False]})
    with pytest.raises(ValueError, match="src=A, dst=B"):
        spillover.exposure_mapping(rows, pd.DataFrame({"src": ["A"], "dst": ["B"], "weight": [0.0]}))


# ------------------------------------------------------------------------------------------------
# the redraw reproduces the Spark assignment and gives the design's probabilities
# ------------------------------------------------------------------------------------------------

def test_numpy_draw_reproduces_assign_days(spark):
    world = simulation.simulate_market(simulation.MarketConfig(n_products=90, n_subclasses=4, seed=11))
    catalog = spark.createDataFrame(world.catalog)
    clusters = spark.createDataFrame(pd.DataFrame({
        "product_id": world.product_ids,
        "cluster_id": "g" + world.products["true_group"].astype(str).to_numpy(),
    }))
    for unit, seed in (("product", 3), ("cluster", 5)):
        spec = _spec(unit=unit, seed=seed, fraction=0.4)
        units = assignment.enrolment_units(spec, catalog, clusters if unit == "cluster" else None)
        published = assignment.assign_days(spec, units, [spec.start]).toPandas()
        table, arms = spillover.draw_arms(spec, units.toPandas(), [spec.seed])
        drawn = pd.Series(arms[0], index=table["unit_id"])
        expected = published.groupby("unit_id")["arm"].first().eq("treatment")
        assert len(expected) == len(drawn)
        assert (drawn.reindex(expected.index) == expected).all(), unit
        # another seed gives another assignment (the draw really depends on the seed)
        _, other = spillover.draw_arms(spec, units.toPandas(), [spec.seed + 1])
        assert (other[0] != arms[0]).any()


def test_redrawn_probabilities_match_exact_enumeration():
    # one stratum of 4 products, half treated: every pair of treated products is equally likely (1/6)
    units = pd.DataFrame({"product_id": list("ABCD"), "unit_id": list("ABCD"), "stratum": "s"})
    edges = pd.DataFrame({"src": ["A", "B", "C"], "dst": ["B", "C", "D"], "weight": [1.0, 1.0, 1.0]})
    spec = _spec(seed=1)
    table, arms = spillover.draw_arms(spec, units, [spec.seed])
    rows = _rows(spec, units, set(table["unit_id"][arms[0]]))
    probs = spillover.exposure_probabilities(spec, rows, edges, units, n_redraws=3000).set_index("product_id")
    neighbours = {"A": "B", "B": "AC", "C": "BD", "D": "C"}
    for product, near in neighbours.items():
        pairs = list(itertools.combinations("ABCD", 2))
        exact_none = np.mean([product not in p and not set(near) & set(p) for p in pairs])
        exact_some = np.mean([product not in p and bool(set(near) & set(p)) for p in pairs])
        # binomial sd with 3000 redraws <= 0.0092: 4 sd
        assert probs.loc[product, "p_control_none_treated"] == pytest.approx(exact_none, abs=0.037)
        assert probs.loc[product, "p_control_some_treated"] == pytest.approx(exact_some, abs=0.037)
    assert np.allclose(probs[[f"p_{c}" for c in spillover.CONDITIONS]].sum(axis=1), 1.0)


def test_refuses_switchback_designs_and_assignments_the_seed_does_not_reproduce():
    units = pd.DataFrame({"product_id": list("ABCDEF"), "unit_id": list("ABCDEF"), "stratum": "s"})
    edges = pd.DataFrame({"src": ["A"], "dst": ["B"], "weight": [1.0]})
    fd = pd.DataFrame({"product_id": list("ABCDEF"), "first_difference": np.zeros(6)})
    spec = _spec(seed=2)
    table, arms = spillover.draw_arms(spec, units, [spec.seed])
    wrong = set(table["unit_id"][~arms[0]])  # the complement: not what seed 2 draws
    with pytest.raises(ValueError, match="does not reproduce the published arms"):
        spillover.estimate_spillover(fd, _rows(spec, units, wrong), edges, spec, units=units, n_redraws=100)
    with pytest.raises(ValueError, match="switches arms over time"):
        spillover.estimate_spillover(fd, _rows(spec, units, wrong), edges, _spec(design="random_days"), units=units)


# ------------------------------------------------------------------------------------------------
# estimates against the simulator's truth, a few seeds
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def market():
    world = simulation.simulate_market(simulation.MarketConfig(n_products=180, n_subclasses=5, seed=21, carryover_decay=0.1))
    history, _ = simulation.simulate_history(world)
    first_day = world.config.history_end + timedelta(days=1)
    start = first_day + timedelta(days=(7 - first_day.weekday()) % 7)
    return world, history, start


_INPUTS: dict = {}


def _run(market, unit: str, seed: int, **kwargs):
    """(estimate_spillover result, truth row, plain DiD estimate); inputs computed once per (unit, seed)."""
    world = market[0]
    if (unit, seed) not in _INPUTS:
        _INPUTS[(unit, seed)] = _inputs(market, unit, seed)
    spec, rows, fd, truth, plain = _INPUTS[(unit, seed)]
    edges = world.true_edges.rename(columns={"cross_elasticity": "weight"})
    result = spillover.estimate_spillover(fd, rows, edges, spec, catalog=world.catalog, n_redraws=300, **kwargs)
    return result, truth, plain


def _inputs(market, unit: str, seed: int):
    world, history, start = market
    spec = ExperimentSpec(name=f"spill-{unit}", design="time_bound", start=start, end=start + timedelta(days=27),
                          unit=unit, treated_fraction=0.5, price_change=-0.1, seed=seed)
    group = "g" + world.products["true_group"].astype(str)
    units = pd.DataFrame({"product_id": world.product_ids,
                          "unit_id": world.product_ids if unit == "product" else group.to_numpy(),
                          "stratum": world.catalog["subclass"].to_numpy()})
    units = spillover.units_from_catalog(units, world.catalog)
    table, arms = spillover.draw_arms(spec, units, [spec.seed])
    days = [spec.start + timedelta(days=i) for i in range(spec.n_days)]
    rows = _rows(spec, units, set(table["unit_id"][arms[0]]), days)
    sales = pd.concat([history, simulation.simulate_sales(world, rows, spec.start, spec.end)], ignore_index=True)
    truth = simulation.true_effects(world, rows).iloc[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fd = estimation.first_differences_pandas(sales, rows, {spec.name: spec.design}, catalog=world.catalog)
    plain = estimation.DiDEstimator(n_bootstrap=50).fit(fd).effect_
    return spec, rows, fd, truth, plain


def test_spillover_estimate_and_clustering_against_the_truth(market):
    """Key figures on three seeds (the benchmark runs hundreds): the spillover estimate is within
    its 95% interval of the truth, on average unbiased within its SE; randomising the true groups
    (clusters) cuts the plain estimate's bias against the global effect by more than 37%."""
    errors, ses, product_bias, cluster_bias = [], [], [], []
    for seed in (1, 2, 3):
        result, truth, plain = _run(market, "product", seed)
        assert result["message"] == ""
        assert sum(result["exposure_counts"][c] for c in spillover.CONDITIONS) == result["n_products"]
        assert truth["true_spillover_effect"] < 0  # price cut on substitutes: controls lose units
        errors.append(result["spillover_effect"] - truth["true_spillover_effect"])
        ses.append(result["spillover_se"])
        product_bias.append(plain - truth["true_global_effect"])
        clustered, truth_c, plain_c = _run(market, "cluster", seed)
        cluster_bias.append(plain_c - truth_c["true_global_effect"])
        # clusters hold their true substitutes: few controls are exposed, and the truth is small
        assert clustered["exposure_counts"]["control_some_treated"] < result["exposure_counts"]["control_some_treated"] / 2
    errors, ses = np.array(errors), np.array(ses)
    assert np.all(np.abs(errors) <= spillover.Z_95 * ses)
    assert abs(errors.mean()) <= 2 * ses.mean() / np.sqrt(len(errors))
    reduction = 1 - abs(np.mean(cluster_bias)) / abs(np.mean(product_bias))
    assert np.mean(product_bias) > 0  # plain comparison ignores the units lost by the controls
    assert reduction >= 0.37


def test_stabilisation_rule_is_applied_and_counted(market):
    loose, _, _ = _run(market, "product", 1, min_probability=0.001)
    strict, _, _ = _run(market, "product", 1, min_probability=0.3)
    assert loose["n_stabilised"] < strict["n_stabilised"]
    assert strict["n_stabilised"] > 0
    assert strict["min_probability"] == 0.3


def test_few_exposed_controls_are_reported_not_estimated(market):
    # fewer exposed controls than required: NaN and a message, never a number
    result, _, _ = _run(market, "cluster", 1, min_exposed_controls=10_000)
    assert np.isnan(result["spillover_effect"]) and np.isnan(result["spillover_se"])
    assert "spillover not estimable" in result["message"]


def test_block_share_exposure_under_product_randomisation_is_not_estimable(market):
    """Every control has about half its block treated: none is ever unexposed, so no number."""
    world = market[0]
    spec, rows, fd, _, _ = _INPUTS.get(("product", 1)) or _inputs(market, "product", 1)
    blocks = pd.DataFrame({"block": world.catalog["subclass"].unique(), "exposure_by_block": True})
    edges = spillover.exposure_edges(world.true_edges.rename(columns={"cross_elasticity": "weight"}), blocks, world.catalog)
    result = spillover.estimate_spillover(fd, rows, edges, spec, catalog=world.catalog, n_redraws=100)
    assert np.isnan(result["spillover_effect"])
    assert "unexposed in none of 100 redraws" in result["message"]


# ------------------------------------------------------------------------------------------------
# spillover from the controls' forecasts
# ------------------------------------------------------------------------------------------------

def _forecast_world(rng, truth: float, common_sd: float, n: int = 400, windows: int = 3) -> pd.DataFrame:
    """First differences with a known spillover on the controls, idiosyncratic noise and an error
    common to every product (window and placebo windows alike)."""
    arm = np.where(np.arange(n) < n // 2, "control", "treatment")
    y = np.where(arm == "control", truth, 3.0) + rng.normal(0, common_sd) + rng.normal(0, 2.0, n)
    placebo = rng.normal(0, common_sd, windows)[None, :] + rng.normal(0, 2.0, (n, windows))
    return pd.DataFrame({"arm": arm, "first_difference": y, "n_window_days": 28, "placebo_windows": list(placebo)})


@pytest.mark.parametrize("common_sd", [0.0, 0.3])
def test_forecast_spillover_covers_with_and_without_a_common_error(common_sd):
    """Known truth, 400 worlds: 95% intervals cover 88-99% of the time, and the reported SE tracks the
    realised one even when a market-wide error (invisible to the spread of the controls) dominates; with
    three placebo windows its variance is known roughly, so coverage then sits a little below 95%."""
    rng = np.random.default_rng(11)
    found = [spillover.spillover_from_forecasts(_forecast_world(rng, -0.5, common_sd)) for _ in range(400)]
    estimates = np.array([f["estimate"] for f in found])
    covered = np.mean([f["ci_low"] <= -0.5 <= f["ci_high"] for f in found])
    ratio = np.mean([f["se"] for f in found]) / np.std(estimates + 0.5)
    assert 0.88 <= covered <= 0.99, covered  # measured 0.90-0.92 with a dominant common error (3 windows)
    assert 0.8 <= ratio <= 1.3, ratio
    assert abs(estimates.mean() + 0.5) < 3 * np.std(estimates) / np.sqrt(len(estimates))


def test_forecast_spillover_variance_is_robust_to_errors_shared_inside_a_pool():
    """Errors shared by the products of a pool (a subclass's season misfit) do not average out over
    its products: the cluster-robust variance sees them where the product-level one does not."""
    rng = np.random.default_rng(5)
    frame = _forecast_world(rng, -0.5, 0.0)
    frame["pool"] = np.arange(len(frame)) % 10
    shared = rng.normal(0, 1.0, 10)[frame["pool"]]
    frame["first_difference"] += shared
    by_pool = spillover.spillover_from_forecasts(frame)
    by_product = spillover.spillover_from_forecasts(frame, group_column="no-such-column")
    assert by_pool["se"] > 2 * by_product["se"]
    assert by_pool["df"] < 12  # ten pools: Student t with few degrees of freedom


def test_forecast_spillover_says_why_it_cannot_estimate():
    few = _forecast_world(np.random.default_rng(1), -0.5, 0.0, n=20)
    assert "need >= 20" in spillover.spillover_from_forecasts(few)["message"]
    no_placebo = _forecast_world(np.random.default_rng(1), -0.5, 0.0).drop(columns="placebo_windows")
    result = spillover.spillover_from_forecasts(no_placebo)
    assert np.isnan(result["se"]) and "no placebo window" in result["message"]


@pytest.fixture(scope="module")
def regime_worlds():
    """One small seeded world per simulator regime, product-randomised, 4 weeks at -10%."""
    out = {}
    for regime in ("default", "weak", "no_substitutes"):
        config = simulation.regime_config(regime, n_products=200, n_subclasses=8, seed=31)
        world = simulation.simulate_market(config)
        history, _ = simulation.simulate_history(world)
        first_day = config.history_end + timedelta(days=1)
        start = first_day + timedelta(days=(7 - first_day.weekday()) % 7)
        out[regime] = _inputs((world, history, start), "product", 3)
    return out


@pytest.mark.parametrize("regime", ["default", "weak", "no_substitutes"])
def test_forecast_spillover_against_the_truth_in_every_regime(regime_worlds, regime):
    """On each regime's world the interval holds the true spillover; where substitutes exist the
    truth is negative and the estimate finds it below zero, beside the IPW on the true graph."""
    spec, rows, fd, truth, _ = regime_worlds[regime]
    found = spillover.experiment_spillover(fd, spec)
    true_spill = truth["true_spillover_effect"]
    assert found["spillover_ci_low"] <= true_spill <= found["spillover_ci_high"], (found, true_spill)
    if regime == "no_substitutes":
        assert true_spill == 0.0
    else:
        assert true_spill < 0 and found["spillover_effect"] < 0
    assert found["spillover_se"] < 0.5 * max(abs(truth["true_direct_effect"]), 1.0)  # informative, not a wide shrug


def test_switchback_designs_get_no_forecast_spillover():
    with pytest.raises(ValueError, match="switches arms over time"):
        spillover.experiment_spillover(pd.DataFrame({"arm": [], "first_difference": []}), _spec(design="random_days"))
