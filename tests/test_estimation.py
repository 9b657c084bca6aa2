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
    twin = estimation.first_differences_pandas(sales, assignments, {"e": design})  # the pandas path agrees
    twin, fd = (frame.sort_values("product_id").reset_index(drop=True) for frame in (twin, fd))
    arrays = [c for c in fd.columns if c.startswith("candidate_")]
    pd.testing.assert_frame_equal(twin.drop(columns=arrays), fd.drop(columns=arrays), check_dtype=False)
    for column in arrays:
        np.testing.assert_allclose(np.array(twin[column].tolist(), float), np.array(fd[column].tolist(), float))
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
            # observed level of the treated days: 12 = counterfactual 10 + effect 2
            "treated_mean": [12.0, 12.0, np.nan, np.nan, 12.0, 12.0],
        }
    )
    specs = pd.DataFrame({"name": ["a", "b", "c"], "design": ["time_bound"] * 3, "metric": ["units"] * 3})
    results, problems = estimation.estimate_experiments(fd, specs, pd.Timestamp("2026-02-01"), n_bootstrap=200)
    assert list(results["experiment"]) == ["a", "a"] and list(results["estimator"]) == ["did", "hpte"]
    assert results["effect"].iloc[0] == pytest.approx(2.0)
    assert results["relative_effect"].iloc[0] == pytest.approx(0.2)
    assert results["n_trimmed"].iloc[1] == 0  # k / N = 2 / 4 -> floor(0.25 * 2) = 0 per arm tail
    assert list(results.columns) == estimation.RESULT_COLUMNS
    assert "control arm has 0" in problems["b"] and "no first differences" in problems["c"]


# ------------------------------------------------------------------------------------------------
# HPTE
# ------------------------------------------------------------------------------------------------

def _between_fd(seed: int, n_products: int = 200, effect_by_tier=(1.0, 3.0), n_clusters: int | None = None):
    """First differences of a between design whose effect depends on a catalogue attribute."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i:03d}" for i in range(n_products)]
    tier = np.where(np.arange(n_products) % 4 < 2, "a", "b")
    if n_clusters:  # clusters randomised: arm and a shared shock per cluster
        cluster = np.arange(n_products) % n_clusters
        arm = np.where(cluster % 2 == 0, "treatment", "control")
        shock = rng.normal(0, 1.0, n_clusters)[cluster]
        units = [f"C{c}" for c in cluster]
    else:
        arm = np.where(rng.permutation(n_products) % 2 == 0, "treatment", "control")
        shock, units = 0.0, ids
    effect = np.where(tier == "a", *effect_by_tier)
    fd = pd.DataFrame({
        "experiment": "e", "product_id": ids, "unit_id": units, "arm": arm,
        "first_difference": effect * (arm == "treatment") + shock + rng.normal(0, 1.0, n_products),
        "counterfactual_mean": 10.0, "pre_mean": rng.uniform(5, 15, n_products), "pre_sd": 1.0,
        "pre_trend": 0.0, "n_pre_days": 365,
    })
    catalog = pd.DataFrame({"product_id": ids, "category": "c", "subclass": "s", "tier": tier,
                            "rating": rng.uniform(3, 5, n_products), "is_private_label": rng.random(n_products) < 0.3})
    return fd, catalog


def test_trim_outliers_cuts_k_over_n_per_tail_within_each_arm():
    fd, _ = _between_fd(0, n_products=200)
    fd.loc[0, "first_difference"] = 1e6  # planted outliers
    fd.loc[1, "first_difference"] = -1e6
    plain = estimation.trim_outliers(fd, k=2.0, outlier_sd=None)  # q = 2/200 = 1% of each arm's 100 -> 1 per tail
    assert (~plain).sum() == 4 and not plain[0] and not plain[1]
    for arm in ("treatment", "control"):
        dropped = fd[~plain & (fd["arm"] == arm)]["first_difference"]
        kept = fd[plain & (fd["arm"] == arm)]["first_difference"]
        assert dropped.min() < kept.min() and dropped.max() > kept.max()
    guarded = estimation.trim_outliers(fd, k=2.0)  # only the planted ones are > 4 robust sd out
    assert (~guarded).sum() == 2 and not guarded[0] and not guarded[1]
    assert estimation.trim_outliers(fd, k=0).all()


def test_hpte_recovers_the_average_and_finds_who_responds_more():
    fd, catalog = _between_fd(1, n_products=400)
    model = estimation.HPTEEstimator(n_bootstrap=300, n_estimators=48, random_state=0).fit(fd, catalog)
    assert model is not None and model.ci_[0] <= 2.0 <= model.ci_[1], (model.effect_, model.ci_)
    assert model.n_trimmed_ == int((~estimation.trim_outliers(fd, 2.0)).sum()) and model.n_products_ == 400 - model.n_trimmed_
    het = model.heterogeneity_.set_index(["attribute", "group"])
    assert het.loc[("tier", "b"), "effect"] > het.loc[("tier", "a"), "effect"] + 0.5
    assert model.heterogeneity_["attribute"].iloc[0] == "tier"  # the most important attribute first
    assert {"fold", "tree", "leaf", "n_treated", "n_control", "effect", "skipped"} <= set(model.leaf_effects_.columns)
    assert model.n_leaves_skipped_ == int(model.leaf_effects_["skipped"].sum())
    assert model.leaf_effects_.loc[model.leaf_effects_["skipped"], "effect"].isna().all()


def test_hpte_does_not_depend_on_row_order():
    """Spark hands rows over in no fixed order: the same data in another order gives the same figures."""
    fd, catalog = _between_fd(5, n_products=160)
    first = estimation.HPTEEstimator(n_bootstrap=100, n_estimators=16, random_state=3).fit(fd, catalog)
    shuffled = fd.sample(frac=1.0, random_state=9).reset_index(drop=True)
    second = estimation.HPTEEstimator(n_bootstrap=100, n_estimators=16, random_state=3).fit(shuffled, catalog.iloc[::-1])
    assert (first.effect_, first.se_, tuple(first.ci_)) == (second.effect_, second.se_, tuple(second.ci_))
    did = [estimation.DiDEstimator(n_bootstrap=100, random_state=3).fit(frame) for frame in (fd, shuffled)]
    assert (did[0].effect_, did[0].se_) == (did[1].effect_, did[1].se_)


def test_hpte_figures_do_not_depend_on_its_threads():
    """Forests and bootstrap chunks run on `n_jobs` threads; every figure is the same bit for bit."""
    fd, catalog = _between_fd(6, n_products=200, n_clusters=50)
    fits = [estimation.HPTEEstimator(n_bootstrap=120, n_estimators=12, random_state=1, n_jobs=n).fit(fd, catalog)
            for n in (1, 2)]
    assert np.array_equal(fits[0].bootstrap_, fits[1].bootstrap_)
    assert (fits[0].effect_, fits[0].se_) == (fits[1].effect_, fits[1].se_)
    assert fits[0].product_effects_.equals(fits[1].product_effects_)


def test_hpte_forests_in_processes_give_the_same_figures(monkeypatch):
    """Large forests grow in one process per fold (`FOREST_PROCESSES_MIN_ROW_TREES`): the same trees,
    so the same figures bit for bit as growing them in this process."""
    fd, catalog = _between_fd(7, n_products=200)
    in_process = estimation.HPTEEstimator(n_bootstrap=60, n_estimators=10, random_state=2, n_jobs=1).fit(fd, catalog)
    monkeypatch.setattr(estimation, "FOREST_PROCESSES_MIN_ROW_TREES", 0)
    in_processes = estimation.HPTEEstimator(n_bootstrap=60, n_estimators=10, random_state=2, n_jobs=2).fit(fd, catalog)
    assert np.array_equal(in_process.bootstrap_, in_processes.bootstrap_)
    assert (in_process.effect_, in_process.se_) == (in_processes.effect_, in_processes.se_)
    assert in_process.product_effects_.equals(in_processes.product_effects_)
    assert in_process.feature_importances_.equals(in_processes.feature_importances_)


def test_hpte_caps_the_products_each_tree_is_grown_on():
    """Each tree grows on econml's default share (0.45) of its fold's products, capped at
    `max_tree_rows`: below the cap the figures are those without one, above it the trees are
    grown on that many products (and keep the average within a small fraction of its SE)."""
    model = estimation.HPTEEstimator(max_tree_rows=100)
    assert model._tree_sample(200) == estimation.TREE_SAMPLE_SHARE and model._tree_sample(1000) == 100
    assert estimation.HPTEEstimator(max_tree_rows=None)._tree_sample(10**7) == estimation.TREE_SAMPLE_SHARE
    fd, catalog = _between_fd(8, n_products=400)
    uncapped, below, capped = [estimation.HPTEEstimator(n_bootstrap=80, n_estimators=10, random_state=3, max_tree_rows=cap).fit(fd, catalog)
                               for cap in (None, 10_000, 40)]
    assert (uncapped.effect_, uncapped.se_) == (below.effect_, below.se_)
    assert np.array_equal(uncapped.bootstrap_, below.bootstrap_)
    assert capped.n_leaves_ < uncapped.n_leaves_
    assert abs(capped.effect_ - uncapped.effect_) < 0.5 * uncapped.se_


def test_leaf_bootstrap_equals_recomputing_every_draw():
    """The leaf bootstrap's per-row shortcut gives each draw's leaf-weighted effect as computed
    from scratch (per-leaf sums of the resampled units), including leaves one arm leaves empty."""
    rng = np.random.default_rng(0)
    n_rows, n_trees, n_draws, n_columns = 60, 3, 7, 15
    leaf_column = np.column_stack([t * 5 + rng.integers(0, 5, n_rows) for t in range(n_trees)])
    treated = rng.random(n_rows) < 0.5
    units = np.array([f"u{i // 2}" for i in range(n_rows)])  # two rows per unit, like a cluster
    values = rng.normal(size=(n_rows, 2))
    arms, draws = [], []
    for mask in (treated, ~treated):
        arm_units, unit_row = np.unique(units[mask], return_inverse=True)
        d = rng.integers(0, 3, size=(len(arm_units), n_draws)).astype(float)
        draws.append((unit_row, d))
        arms.append(estimation._BootstrapArm(
            counts=estimation._membership(unit_row, leaf_column[mask], np.ones(mask.sum()), len(arm_units), n_columns).T.tocsr(),
            members=estimation._membership(np.arange(mask.sum()), leaf_column[mask], np.ones(mask.sum()), mask.sum(), n_columns),
            unit_row=unit_row, values=values[mask], draws=d))
    for n_jobs in (1, 2):
        numerator, denominator = estimation._bootstrap_leaf_sums(arms, n_draws, n_jobs)
        for b in range(n_draws):
            sums = []
            for mask, (unit_row, d) in zip((treated, ~treated), draws):
                w = np.repeat(d[unit_row, b], n_trees)
                leaves = leaf_column[mask].ravel()
                sums.append([np.bincount(leaves, weights=w * np.repeat(values[mask, j], n_trees), minlength=n_columns)
                             for j in range(2)] + [np.bincount(leaves, weights=w, minlength=n_columns)])
            for j in range(2):
                effect, _, weight = estimation._leaf_weighted_effect(sums[0][j][None], sums[0][2][None], sums[1][j][None],
                                                                     sums[1][2][None], False)
                assert np.isclose(numerator[j, b] / denominator[b], effect[0], rtol=1e-12, atol=1e-12)
                assert np.isclose(denominator[b], weight.sum())


def test_hpte_bootstrap_resamples_clusters():
    """With a shared cluster shock, the cluster bootstrap SE matches the spread across replications."""
    estimates, ses, covered = [], [], 0
    for seed in range(40):
        fd, catalog = _between_fd(100 + seed, n_products=240, effect_by_tier=(2.0, 2.0), n_clusters=60)
        model = estimation.HPTEEstimator(n_bootstrap=300, n_estimators=16, trim_k=0, random_state=seed).fit(fd, catalog)
        estimates.append(model.effect_)
        ses.append(model.se_)
        covered += model.ci_[0] <= 2.0 <= model.ci_[1]
    assert model.n_units_ == 60
    assert 0.7 < np.mean(ses) / np.std(estimates) < 1.4, (np.mean(ses), np.std(estimates))
    assert covered >= 34  # 40 replications at 95%: P(covered < 34) < 1%


def test_hpte_switchback_is_the_trimmed_mean_of_within_product_differences():
    rng = np.random.default_rng(3)
    fd = pd.DataFrame({"experiment": "e", "product_id": [f"P{i}" for i in range(100)], "arm": "switchback",
                       "first_difference": 1.5 + rng.normal(0, 1, 100), "counterfactual_mean": 10.0})
    fd["unit_id"] = fd["product_id"]
    model = estimation.HPTEEstimator(n_bootstrap=200, n_estimators=16, trim_k=2.0).fit(fd)
    kept = fd[estimation.trim_outliers(fd, 2.0)]["first_difference"]
    assert model.effect_ == pytest.approx(kept.mean()) and model.n_trimmed_ == 100 - len(kept)
    assert model.n_leaves_skipped_ == 0


def _switchback_fd(seed: int, n_clusters: int = 60, size: int = 4, shared_sd: float = 1.0):
    """Within-product differences of a product-randomised switchback: products of one substitute
    cluster share an error (their substitutes' prices), effect 2.0; (fd, clusters)."""
    rng = np.random.default_rng(seed)
    cluster = np.repeat(np.arange(n_clusters), size)
    ids = [f"P{i:04d}" for i in range(len(cluster))]
    fd = pd.DataFrame({"experiment": "e", "product_id": ids, "unit_id": ids, "arm": "switchback",
                       "first_difference": 2.0 + rng.normal(0, shared_sd, n_clusters)[cluster] + rng.normal(0, 1, len(cluster)),
                       "counterfactual_mean": 10.0, "pre_mean": 10.0 + rng.normal(0, 1, len(cluster))})
    return fd, pd.DataFrame({"product_id": ids, "cluster_id": [f"C{c}" for c in cluster]})


def test_switchback_bootstrap_resamples_substitute_clusters_whole():
    """An error shared inside substitute clusters: resampling products misses its covariance and
    under-covers; resampling the clusters whole covers at the nominal rate. Between designs and
    too few clusters keep the unit bootstrap."""
    covered = {"units": 0, "clusters": 0}
    n_rep = 200
    for seed in range(n_rep):
        fd, clusters = _switchback_fd(seed)
        for kind, given in (("units", None), ("clusters", clusters)):
            model = estimation.DiDEstimator(n_bootstrap=200, random_state=seed).fit(fd, given)
            assert model.bootstrap_blocks_ == ("60 clusters" if given is not None else "240 units")
            covered[kind] += model.ci_[0] <= 2.0 <= model.ci_[1]
    # SE from products ~ sqrt(2/240) = 0.091 against a true sqrt(1/60 + 1/240) = 0.144: ~80% coverage
    assert covered["units"] / n_rep < 0.88, covered
    assert 0.91 <= covered["clusters"] / n_rep <= 0.98, covered
    fd, clusters = _switchback_fd(0, n_clusters=estimation.MIN_BOOTSTRAP_BLOCKS - 1)
    assert estimation.BootstrapBlocks(fd, clusters).kind == "units"
    between = fd.assign(arm=np.where(np.arange(len(fd)) % 2 == 0, "treatment", "control"))
    assert estimation.BootstrapBlocks(between, clusters).kind == "units"


def test_hpte_switchback_trims_raw_differences_and_clusters_its_bootstrap():
    """HPTE on a switchback: the filter judges the raw within-product differences (not what is left
    after the adjustment), the estimate is their trimmed mean, and the SE follows the clusters."""
    fd, clusters = _switchback_fd(7)
    fd.loc[fd.index[:2], "first_difference"] = [40.0, -40.0]  # two broken products
    model = estimation.HPTEEstimator(n_bootstrap=300, n_estimators=8, trim_k=2.0, random_state=0).fit(fd, None, clusters)
    kept = fd[estimation.trim_outliers(fd, 2.0)]
    assert model.trimmed_products_ == ["P0000", "P0001"] and model.effect_ == pytest.approx(kept["first_difference"].mean())
    units = estimation.HPTEEstimator(n_bootstrap=300, n_estimators=8, trim_k=2.0, random_state=0).fit(fd)
    assert model.bootstrap_blocks_ == "60 clusters" and model.se_ > 1.2 * units.se_


def test_pooled_counterfactual_for_a_short_history_product():
    """A product with 40 days of history gets its pool's yearly shape scaled to its own level."""
    days = pd.date_range("2025-01-01", "2026-02-11")
    start = pd.Timestamp("2026-01-01")
    season = 1 + 0.3 * np.sin(2 * np.pi * days.dayofyear / 365.25)
    rows, assignments = [], []
    for p, level in enumerate([10, 20, 30, 40, 50, 60, 25]):
        keep = days >= start - pd.Timedelta(days=40) if p == 6 else np.ones(len(days), bool)
        for d, s in zip(days[keep], season[keep]):
            rows.append((f"P{p}", d, 1.0, level * s))
            if d >= start:
                assignments.append((d, "e", f"P{p}", f"P{p}", "control", False, 0.0))
    sales = pd.DataFrame(rows, columns=["product_id", "date", "price", "units"])
    assignments = pd.DataFrame(assignments, columns=["date", "experiment", "product_id", "unit_id", "arm", "blackout", "price_change"])
    catalog = pd.DataFrame({"product_id": [f"P{p}" for p in range(7)], "subclass": "s"})
    fd = estimation.first_differences_pandas(sales, assignments, {"e": "time_bound"}, catalog=catalog).set_index("product_id")
    assert fd.loc["P6", "model"] == "pooled" and fd.loc["P0", "model"] == "trend+weekly+yearly"
    assert abs(fd.loc["P6", "first_difference"]) < 0.05 * 25  # the seasonal swing is +-30%: followed
    alone = estimation.first_differences_pandas(sales[sales["product_id"] == "P6"], assignments[assignments["product_id"] == "P6"],
                                                {"e": "time_bound"}).set_index("product_id")
    assert alone.loc["P6", "model"] == "level+weekly"  # no pool: own level and weekday only


def _benchmark_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "estimators.py"
    spec = importlib.util.spec_from_file_location("benchmark_estimators", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SIMULATOR_SEEDS = range(6)


def test_hpte_on_the_simulator_covers_the_direct_effect():
    """A handful of simulated worlds (the benchmark's replication, smaller): HPTE's intervals hold
    the true direct effect for the designs free of carryover, and random days shows the carryover
    bias the benchmark documents. Tolerances are a little wider than measured on these seeds."""
    bench = _benchmark_module()
    opts = {"products": 500, "subclasses": 10, "weeks": 6, "price_change": -0.08, "bootstrap": 400, "trees": 16, "trim_k": 2.0}
    rows = pd.DataFrame([row for seed in SIMULATOR_SEEDS for row in bench.replicate((seed, opts))])
    hpte = rows[rows["estimator"] == "hpte"].assign(z=lambda f: (f["effect"] - f["true_direct"]) / f["se"])
    hpte = hpte.assign(covered=(hpte["ci_low"] <= hpte["true_direct"]) & (hpte["true_direct"] <= hpte["ci_high"]))
    clean = hpte[hpte["design"].isin(["time_bound", "triggered", "crossover"])]
    print(clean[["seed", "design", "effect", "se", "true_direct", "z", "covered"]].to_string())
    # measured on these seeds: 15 of 18 intervals hold the truth (t intervals on the re-fitted
    # adjustment's bootstrap; 17 with the earlier basic bootstrap interval, which under-covered
    # on the 72-experiment runs of issue 16), mean z = -0.24
    assert clean["covered"].sum() >= len(clean) - 3, clean
    assert abs(clean["z"].mean()) < 0.5, clean["z"].mean()
    carry = hpte[hpte["design"] == "random_days"]
    assert (carry["effect"] < carry["true_direct"]).all()  # carryover into control days shrinks the effect
    assert (carry["carryover_control"] > 0.1).all()


# ------------------------------------------------------------------------------------------------
# Precision against a CUPED reference, carryover, counterfactual choice (issue 18)
# ------------------------------------------------------------------------------------------------

from pipelines import simulation  # noqa: E402

REGIME_NAMES = tuple(getattr(simulation, "REGIMES", {"default": None}))
# measured on these seeds: time_bound 0.73 (default), 0.82 (weak), 0.81 (no_substitutes); random_days
# 0.96, 0.94, 0.94; the ceilings sit a little above; crossover: the target (measured: see the -s output)
CROSSOVER_CEILING = 0.95
SE_RATIO_CEILING = {"time_bound": 0.85, "random_days": 1.0, "crossover": CROSSOVER_CEILING}


def _cuped_reference(window: pd.DataFrame, pre: pd.DataFrame, design: str) -> float:
    """SE of a plain CUPED estimate (numpy): per product the window mean (switchback: treated-day
    minus control-day mean), adjusted on its 8-week pre-period mean with one pooled theta; a
    crossover's two sequences (treated first or not) weighted equally."""
    pre_mean = pre.groupby("product_id")["units"].mean()
    if design == "crossover":
        means = window.groupby(["product_id", "arm"])["units"].mean().unstack().dropna()
        first_day = window.sort_values("day").drop_duplicates("product_id").set_index("product_id")["arm"]
        y = (means["treatment"] - means["control"]).to_numpy()
        x = pre_mean.reindex(means.index).to_numpy()
        sequence = (first_day.reindex(means.index) == "treatment").to_numpy()
        y_within = y - np.where(sequence, y[sequence].mean(), y[~sequence].mean())
        x_within = x - np.where(sequence, x[sequence].mean(), x[~sequence].mean())
        adjusted = y - (x_within @ y_within / (x_within @ x_within)) * (x - x.mean())
        return float(0.5 * np.sqrt(adjusted[sequence].var(ddof=1) / sequence.sum() + adjusted[~sequence].var(ddof=1) / (~sequence).sum()))
    if design == "random_days":
        means = window.groupby(["product_id", "arm"])["units"].mean().unstack().dropna()
        y = (means["treatment"] - means["control"]).to_numpy()
        x = pre_mean.reindex(means.index).to_numpy()
        theta = np.cov(y, x)[0, 1] / np.var(x, ddof=1)
        adjusted = y - theta * (x - x.mean())
        return float(adjusted.std(ddof=1) / np.sqrt(len(adjusted)))
    per = window.groupby("product_id").agg(y=("units", "mean"), arm=("arm", "first"))
    x = pre_mean.reindex(per.index).to_numpy()
    y = per["y"].to_numpy()
    theta = np.cov(y, x)[0, 1] / np.var(x, ddof=1)
    adjusted = y - theta * (x - x.mean())
    treated = (per["arm"] == "treatment").to_numpy()
    return float(np.sqrt(adjusted[treated].var(ddof=1) / treated.sum() + adjusted[~treated].var(ddof=1) / (~treated).sum()))


@pytest.mark.parametrize("regime", REGIME_NAMES)
def test_hpte_se_beats_a_cuped_reference_on_small_worlds(regime):
    """Small seeded worlds of each simulator regime, no carryover: HPTE's bootstrap SE against a
    CUPED reference computed here (numpy), for a between design and two switchback designs. The
    ceilings are a little above the ratios measured on these seeds; HPTE must also hold the truth."""
    bench = _benchmark_module()
    ratios = {"time_bound": [], "random_days": [], "crossover": []}
    for seed in (1, 2):
        config = bench.market_config(regime, n_products=600, n_subclasses=12, seed=700 + seed, carryover_decay=0.0)
        world = simulation.simulate_market(config)
        specs = [s for s in bench.experiment_specs(config, seed, -0.08, 6) if s.name in ("time-bound", "random-days", "crossover")]
        triggers = simulation.simulate_trigger_events(world, config.history_start, specs[0].end)
        assignments = pd.concat([bench.pandas_assignments(s, world.catalog, triggers) for s in specs], ignore_index=True)
        sales = simulation.simulate_sales(world, assignments, config.history_start, specs[0].end)
        truth = simulation.true_effects(world, assignments).set_index("experiment")["true_direct_effect"]
        fds = estimation.first_differences_pandas(sales, assignments, {s.name: s.design for s in specs},
                                                  catalog=world.catalog, events=triggers)
        for spec in specs:
            window, pre = bench.peers.experiment_frames(spec, assignments, sales, triggers)
            reference = _cuped_reference(window, pre, spec.design)
            model = estimation.HPTEEstimator(n_bootstrap=300, n_estimators=16, random_state=seed).fit(
                fds[fds["experiment"] == spec.name], world.catalog)
            ratios[spec.design].append(model.se_ / reference)
            assert abs(model.effect_ - truth[spec.name]) < 4 * model.se_, (spec.name, model.effect_, truth[spec.name])
            assert model.variance_reduction_ > 0
    # random days' SE was above the reference (1.00 / 1.21 on default) while its bootstrap re-centred
    # the covariates on each resample, which undid the adjustment; held at the products' own mean:
    # 0.97 / 0.95 (default), 0.96 / 0.92 (weak), 0.95 / 0.92 (no_substitutes)
    for design, values in ratios.items():
        print(regime, design, np.round(values, 3))
        assert np.mean(values) <= SE_RATIO_CEILING[design], (regime, design, values)


def test_carryover_check_finds_planted_carryover_and_not_its_absence():
    """Random days on the synthetic panel: control days after a treated day carry 40% of the effect."""
    flags = {}
    for carry in (0.0, 0.4):
        rng = np.random.default_rng(11)
        days = [START - dt.timedelta(days=PRE_DAYS) + dt.timedelta(days=i) for i in range(PRE_DAYS + WINDOW_DAYS)]
        sales, assignments = [], []
        for p in range(120):
            level = rng.uniform(10, 30)
            previous = False
            for d in days:
                in_window = d >= START
                treated = in_window and rng.random() < 0.5
                mean = level + (4.0 if treated else (carry * 4.0 if previous else 0.0))
                sales.append((f"P{p:03d}", d, 10.0, max(0.0, mean + rng.normal(0, 2))))
                if in_window:
                    arm = "treatment" if treated else "control"
                    assignments.append((d, "e", f"P{p:03d}", f"P{p:03d}", arm, False, -0.1 if treated else 0.0))
                previous = treated
        sales = pd.DataFrame(sales, columns=["product_id", "date", "price", "units"])
        assignments = pd.DataFrame(assignments, columns=["date", "experiment", "product_id", "unit_id", "arm", "blackout", "price_change"])
        fd = estimation.first_differences_pandas(sales, assignments, {"e": "random_days"})
        check = estimation.carryover_check(fd)
        flags[carry] = check["carryover_flag"]
        if carry:
            assert abs(check["carryover_estimate"] - 1.6) < 3 * check["carryover_se"], check
            assert check["carryover_bias"] < 0
    assert flags == {0.0: False, 0.4: True}


def test_carryover_check_weights_products_by_level_over_noise():
    """Levels from 2 to 200 units a day with Poisson noise, carryover a third of each product's own
    effect (20% of its level): the weighted check flags it and recovers the average carryover;
    with none planted it does not flag."""
    flags = {}
    for share in (0.0, 1 / 3):
        rng = np.random.default_rng(23)
        days = [START - dt.timedelta(days=PRE_DAYS) + dt.timedelta(days=i) for i in range(PRE_DAYS + WINDOW_DAYS)]
        sales, assignments, planted = [], [], []
        for p in range(150):
            level = float(np.exp(rng.uniform(np.log(2), np.log(200))))
            previous = False
            for d in days:
                in_window = d >= START
                treated = in_window and rng.random() < 0.5
                mean = level * (1.2 if treated else (1 + 0.2 * share if previous else 1.0))
                sales.append((f"P{p:03d}", d, 10.0, float(rng.poisson(mean))))
                if in_window:
                    assignments.append((d, "e", f"P{p:03d}", f"P{p:03d}", "treatment" if treated else "control", False,
                                        -0.1 if treated else 0.0))
                previous = treated
            planted.append(0.2 * share * level)
        sales = pd.DataFrame(sales, columns=["product_id", "date", "price", "units"])
        assignments = pd.DataFrame(assignments, columns=["date", "experiment", "product_id", "unit_id", "arm", "blackout", "price_change"])
        fd = estimation.first_differences_pandas(sales, assignments, {"e": "random_days"})
        assert np.isfinite(fd["carryover_variance"]).all() and (fd["carryover_variance"] > 0).all()
        check = estimation.carryover_check(fd)
        flags[share] = check["carryover_flag"]
        assert abs(check["carryover_estimate"] - np.mean(planted)) < 3 * check["carryover_se"], (check, np.mean(planted))
    assert flags == {0.0: False, 1 / 3: True}


def test_counterfactual_back_test_picks_the_recent_level_under_a_drift():
    """Products whose level random-walks: the back-test prefers a recent level to a year-long fit,
    the choice is per pool, and the chosen candidate's first difference is the one used."""
    rng = np.random.default_rng(5)
    days = pd.date_range(START - dt.timedelta(days=PRE_DAYS), periods=PRE_DAYS + WINDOW_DAYS)
    sales, assignments = [], []
    for p in range(30):
        level = 20 + np.cumsum(rng.normal(0, 0.8, len(days)))
        for d, lv in zip(days, level):
            sales.append((f"P{p:02d}", d, 10.0, max(0.0, lv + rng.normal(0, 1))))
            if d >= pd.Timestamp(START):
                assignments.append((d, "e", f"P{p:02d}", f"P{p:02d}", "treatment" if p % 2 else "control", False, 0.0))
    sales = pd.DataFrame(sales, columns=["product_id", "date", "price", "units"])
    assignments = pd.DataFrame(assignments, columns=["date", "experiment", "product_id", "unit_id", "arm", "blackout", "price_change"])
    catalog = pd.DataFrame({"product_id": [f"P{p:02d}" for p in range(30)], "subclass": ["a"] * 15 + ["b"] * 15})
    fd = estimation.first_differences_pandas(sales, assignments, {"e": "time_bound"}, catalog=catalog)
    assert fd.groupby("pool")["counterfactual"].nunique().eq(1).all()
    assert fd["counterfactual"].str.startswith("level_").all(), fd["counterfactual"].value_counts()
    k = estimation.COUNTERFACTUALS.index(fd["counterfactual"].iloc[0])
    assert np.allclose(fd["first_difference"], np.array(fd["candidate_fd"].tolist())[:, k])


def test_back_test_windows_are_predicted_out_of_sample():
    """A back-test window is forecast as the experiment window is: nothing fitted for it (known
    factors' effects, seasonal shape, level and trend) sees its own days. So adding c units to
    every day of the most recent back-test window moves that window's placebo by exactly c; with
    the promotion effect fitted in sample (as before) it moved by less, and the placebos looked
    better than the window's own forecast errors."""
    rng = np.random.default_rng(11)
    pre, window = 364, 28
    days = pd.date_range(START - dt.timedelta(days=pre), periods=pre + window)
    promo = (np.arange(len(days)) % 37 < 6) | ((days >= pd.Timestamp(START) - pd.Timedelta(days=20)) & (days < pd.Timestamp(START) - pd.Timedelta(days=12)))
    price = np.where(promo, 7.0, 10.0)
    units = 20 + 15 * promo + 2 * np.sin(2 * np.pi * np.arange(len(days)) / 365) + rng.normal(0, 1, len(days))
    sales = pd.DataFrame({"product_id": "P0", "date": days, "price": price, "units": units})
    assignments = pd.DataFrame({"date": days[pre:], "experiment": "e", "product_id": "P0", "unit_id": "P0",
                                "arm": "control", "blackout": False, "price_change": 0.0})
    fd = estimation.first_differences_pandas(sales, assignments, {"e": "time_bound"})
    assert "price" in fd["known_factors"].iloc[0]
    shifted = sales.assign(units=np.where((days >= pd.Timestamp(START) - pd.Timedelta(days=window)) & (days < pd.Timestamp(START)),
                                          units + 5.0, units))
    fd_shifted = estimation.first_differences_pandas(shifted, assignments, {"e": "time_bound"})
    rule_window_1 = lambda f: np.array(f["candidate_placebo_windows"].iloc[0]).reshape(len(estimation.COUNTERFACTUALS), -1)[0, 0]  # noqa: E731
    assert rule_window_1(fd_shifted) - rule_window_1(fd) == pytest.approx(5.0, abs=1e-9)


def test_estimators_follow_scikit_learn_conventions():
    """BaseEstimator parameters (get_params, clone), the numpydoc examples run, and the interval at
    any level comes from the fitted state (a fit with the same parameters gives the same numbers)."""
    import doctest

    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    failures, tried = doctest.testmod(estimation, optionflags=doctest.ELLIPSIS)
    assert tried >= 6 and failures == 0
    fd, catalog = _between_fd(4)
    for model in (estimation.HPTEEstimator(n_bootstrap=100, n_estimators=8, random_state=1),
                  estimation.DiDEstimator(n_bootstrap=100, random_state=1)):
        copy = clone(model)
        assert copy.get_params() == model.get_params() and copy is not model
        with pytest.raises(NotFittedError):
            copy.effect_interval()
        fitted = model.fit(fd, catalog) if isinstance(model, estimation.HPTEEstimator) else model.fit(fd)
        assert fitted.effect_interval() == fitted.ci_
        low, high = fitted.effect_interval(alpha=0.5)
        assert fitted.ci_[0] < low < fitted.effect_ < high < fitted.ci_[1]
        again = clone(model)
        again = again.fit(fd, catalog) if isinstance(again, estimation.HPTEEstimator) else again.fit(fd)
        assert again.effect_ == fitted.effect_ and again.se_ == fitted.se_


def test_between_design_se_is_the_leave_one_unit_out_jackknife_with_the_adjustment_refitted():
    """`jackknife_between` in closed form equals leaving each unit out and re-fitting everything,
    for the effect and for the relative effect (effect over the treated products' level minus it)."""
    rng = np.random.default_rng(4)
    n = 40
    level = rng.lognormal(np.log(30), 0.8, n)
    arm = np.where(rng.permutation(n) < n // 2, "treatment", "control")
    units = np.repeat([f"U{i}" for i in range(n // 2)], 2)  # two products per randomisation unit
    arm = np.repeat(arm[: n // 2], 2)
    fd = pd.DataFrame({"product_id": [f"P{i}" for i in range(n)], "unit_id": units, "arm": arm,
                       "first_difference": rng.normal(0, 1, n) * np.sqrt(level) + 0.1 * level * (arm == "treatment"),
                       "pre_mean": level * rng.lognormal(0, 0.1, n), "recent_mean": level * rng.lognormal(0, 0.2, n),
                       "treated_mean": np.where(arm == "treatment", 1.1 * level, np.nan)})
    model = estimation.DiDEstimator(random_state=0).fit(fd)
    assert model.covariates_  # the adjustment is on, and re-fitted with each unit left out
    leave_one_out = {"treatment": [], "control": []}
    for unit in np.unique(units):
        rest = fd[fd["unit_id"] != unit]
        refit = estimation.DiDEstimator(random_state=0).fit(rest)
        treated_level = rest.loc[rest["arm"] == "treatment", "treated_mean"].mean()
        leave_one_out[fd.loc[fd["unit_id"] == unit, "arm"].iloc[0]].append(
            (refit.effect_, refit.effect_ / (treated_level - refit.effect_)))
    var_effect = var_ratio = 0.0
    for values in leave_one_out.values():
        values, m = np.array(values), len(values)
        var_effect += (m - 1) / m * ((values[:, 0] - values[:, 0].mean()) ** 2).sum()
        var_ratio += (m - 1) / m * ((values[:, 1] - values[:, 1].mean()) ** 2).sum()
    assert model.se_ == pytest.approx(np.sqrt(var_effect), rel=1e-8)
    assert model.relative_se_ == pytest.approx(np.sqrt(var_ratio), rel=1e-8)


@pytest.mark.parametrize("max_groups", [250, 7])
def test_jackknife_weights_leave_each_unit_out_once_and_give_the_textbook_se_of_a_mean_difference(max_groups):
    """Delete-one (every group one unit) the jackknife SE of a difference in means is exactly
    sqrt(s_t^2/n_t + s_c^2/n_c); with fewer groups than units each unit is still left out once."""
    rng = np.random.default_rng(8)
    treated, control = rng.lognormal(0, 1, 40), rng.lognormal(0, 1, 30)
    weights, slices = estimation.jackknife_weights([40, 30], rng, max_groups=max_groups)
    assert [w.shape for w in weights] == [(40, slices[1].stop), (30, slices[1].stop)]
    assert (weights[0][:, slices[0]] == 0).sum(axis=1).tolist() == [1] * 40  # each unit out once, in its own arm's draws
    assert (weights[0][:, slices[1]] == 1).all() and (weights[1][:, slices[0]] == 1).all()
    estimates = treated @ weights[0] / weights[0].sum(axis=0) - control @ weights[1] / weights[1].sum(axis=0)
    se = estimation.jackknife_se(estimates, slices)
    textbook = np.sqrt(treated.var(ddof=1) / 40 + control.var(ddof=1) / 30)
    if max_groups >= 40:
        assert se == pytest.approx(textbook, rel=1e-10)
    else:  # 7 groups an arm: the grouped jackknife, unbiased but noisier
        assert 0.5 * textbook < se < 1.5 * textbook
