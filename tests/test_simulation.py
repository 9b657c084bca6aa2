"""The market simulator: determinism, contract shape, closed loop, exact truth, persistence, demo."""
from __future__ import annotations

import dataclasses
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines import simulation as sim
from pipelines.simulation import (
    MarketConfig,
    demo_experiments,
    expected_sales,
    load_world,
    save_world,
    simulate_history,
    simulate_market,
    simulate_sales,
    true_effects,
    write_demo_inputs,
)

SMALL = MarketConfig(n_products=60, n_subclasses=4, history_days=120, seed=7)
PRICE_CUT = -0.1


@pytest.fixture(scope="module")
def world():
    return simulate_market(SMALL)


@pytest.fixture(scope="module")
def history(world):
    return simulate_history(world)


def _assignments(world, start: date, days: int, design: str, seed: int = 1,
                 experiment: str = "exp", price_change: float = PRICE_CUT) -> pd.DataFrame:
    """Every catalogue product enrolled; 'time_bound' splits products once, 'random_days' daily,
    'clusters' splits true substitute groups once."""
    rng = np.random.default_rng(seed)
    ids = world.catalog["product_id"].to_numpy()
    n = len(ids)
    if design == "time_bound":
        treated = np.tile(rng.permutation(np.arange(n) % 2 == 0), (days, 1))
    elif design == "clusters":
        group = world.products["true_group"].to_numpy()
        treated_groups = rng.random(group.max() + 1) < 0.5
        treated = np.tile(treated_groups[group], (days, 1))
    elif design == "random_days":
        treated = rng.random((days, n)) < 0.5
    else:
        raise AssertionError(design)
    dates = [start + timedelta(days=k) for k in range(days)]
    return pd.DataFrame(
        {
            "date": np.repeat(np.array(dates, dtype=object), n),
            "experiment": experiment,
            "product_id": np.tile(ids, days),
            "arm": np.where(treated.ravel(), "treatment", "control"),
            "blackout": False,
            "price_change": np.where(treated.ravel(), price_change, 0.0),
        }
    )


# ---------------------------------------------------------------- world and determinism


def test_same_seed_same_world_and_history(world, history):
    again = simulate_market(SMALL)
    for name in ("catalog", "products", "weekly_profile", "category_phase", "true_edges"):
        pd.testing.assert_frame_equal(getattr(world, name), getattr(again, name))
    sales, triggers = simulate_history(again)
    pd.testing.assert_frame_equal(sales, history[0])
    pd.testing.assert_frame_equal(triggers, history[1])
    other, _ = simulate_history(simulate_market(dataclasses.replace(SMALL, seed=8)))
    assert not np.array_equal(other["units"].to_numpy()[:500], sales["units"].to_numpy()[:500])


def test_catalog_contract(world):
    cat = world.catalog
    assert list(cat.columns[:3]) == ["product_id", "category", "subclass"]
    assert cat["product_id"].is_unique and cat["product_id"].str.fullmatch(r"P\d{5}").all()
    assert set(cat["brand_tier"]) <= {"value", "standard", "premium"}
    assert cat["pack_size"].between(1, 12).all() and cat["rating"].between(3, 5).all()
    assert cat["is_private_label"].dtype == bool
    # subclasses belong to one category and are named after it; sizes are even (60 / 4)
    assert (cat.groupby("subclass")["category"].nunique() == 1).all()
    assert cat.apply(lambda r: r["subclass"].startswith(r["category"] + "-"), axis=1).all()
    assert cat["subclass"].value_counts().tolist() == [15] * 4
    assert world.products["elasticity"].between(-4, -0.3).all()


def test_true_edges_only_within_subclasses_and_symmetric_matrix(world):
    edges = world.true_edges
    assert list(edges.columns) == ["src", "dst", "cross_elasticity"]
    assert (edges["src"] < edges["dst"]).all()
    assert not edges.duplicated(["src", "dst"]).any()
    subclass = world.catalog.set_index("product_id")["subclass"]
    assert (subclass[edges["src"]].to_numpy() == subclass[edges["dst"]].to_numpy()).all()
    group = world.products.set_index("product_id")["true_group"]
    strong = group[edges["src"]].to_numpy() == group[edges["dst"]].to_numpy()
    assert strong.sum() > 20
    assert edges.loc[strong, "cross_elasticity"].between(0.3, 0.8).all()
    assert edges.loc[~strong, "cross_elasticity"].between(0.05, 0.15).all()
    sizes = world.products["true_group"].value_counts()
    assert sizes.min() >= 3
    c = world.cross_elasticity
    assert (c != c.T).nnz == 0 and c.nnz == 2 * len(edges)


def test_sales_and_trigger_contract(world, history):
    sales, triggers = history
    assert list(sales.columns) == ["product_id", "date", "price", "units", "views", "revenue"]
    assert all(isinstance(d, date) for d in sales["date"].iloc[:: 997])
    assert sales["date"].min() == SMALL.history_start and sales["date"].max() == SMALL.history_end
    assert (sales["price"] > 0).all() and (sales["units"] >= 0).all()
    assert sales["units"].dtype == float and (sales["units"] == np.round(sales["units"])).all()
    assert (sales["views"] >= sales["units"]).all()
    np.testing.assert_allclose(sales["revenue"], sales["price"] * sales["units"])
    assert not sales.duplicated(["product_id", "date"]).any()
    # missing product-days exist but are rare; late entrants have no rows before entry
    share = len(sales) / (SMALL.n_products * SMALL.history_days)
    assert 0.9 < share < 0.995
    first_seen = sales.groupby("product_id")["date"].min()
    entry = world.products.set_index("product_id")["entry_date"]
    assert (first_seen >= entry[first_seen.index]).all()
    assert list(triggers.columns) == ["product_id", "date", "event"]
    assert set(triggers["event"]) == {"competitor_discount"}
    rate = len(triggers) / (SMALL.n_products * SMALL.history_days)
    assert 1 / 90 < rate < 1 / 25


def test_units_are_unbiased_for_expected_units(world, history):
    sales, _ = history
    truth = expected_sales(world, None, SMALL.history_start, SMALL.history_end)
    both = sales.merge(truth, on=["product_id", "date"], suffixes=("", "_truth"))
    assert len(both) == len(sales)
    np.testing.assert_array_equal(both["price"], both["price_truth"])
    ratio = both["units"].sum() / both["expected_units"].sum()
    assert abs(ratio - 1) < 0.02, ratio  # 3% off without the mean correction
    # the weekly profile is real: weekend days sell more than weekdays
    weekday = pd.to_datetime(both["date"]).dt.weekday
    assert both.loc[weekday >= 5, "expected_units"].mean() > both.loc[weekday < 5, "expected_units"].mean()


def test_no_assignments_reproduces_history(world, history):
    start, end = date(2025, 2, 10), date(2025, 3, 5)
    sales = simulate_sales(world, None, start, end)
    expected = history[0]
    expected = expected[(expected["date"] >= start) & (expected["date"] <= end)].reset_index(drop=True)
    pd.testing.assert_frame_equal(sales, expected)


def test_chunked_simulate_sales_equals_one_shot(world):
    start = SMALL.history_end + timedelta(days=1)
    assignments = _assignments(world, start, 20, "random_days")
    one_shot = simulate_sales(world, assignments, start, start + timedelta(days=19))
    first = simulate_sales(world, assignments, start, start + timedelta(days=8))
    second = simulate_sales(world, assignments, start + timedelta(days=9), start + timedelta(days=19))
    pd.testing.assert_frame_equal(pd.concat([first, second], ignore_index=True), one_shot)


def test_bad_assignments_are_refused_with_reason(world):
    start = SMALL.history_end + timedelta(days=1)
    bad = _assignments(world, start, 2, "time_bound")
    bad.loc[3, "product_id"] = "P99999"
    with pytest.raises(ValueError, match="P99999"):
        simulate_sales(world, bad, start, start)
    bad = _assignments(world, start, 2, "time_bound")
    bad.loc[0, "arm"] = "treated"
    with pytest.raises(ValueError, match="arm"):
        simulate_sales(world, bad, start, start)
    with pytest.raises(ValueError, match="before"):
        simulate_sales(world, None, start, start - timedelta(days=1))


# ---------------------------------------------------------------- closed loop and truth


def test_closed_loop_prices_and_units_respond(world):
    start = SMALL.history_end + timedelta(days=1)
    end = start + timedelta(days=27)
    assignments = _assignments(world, start, 28, "clusters")
    treated_sales = simulate_sales(world, assignments, start, end)
    baseline = simulate_sales(world, None, start, end)
    both = treated_sales.merge(baseline, on=["product_id", "date"], suffixes=("", "_base"))
    assert len(both) == len(treated_sales) == len(baseline)
    arm = assignments.set_index(["product_id", "date"])["arm"]
    keys = pd.MultiIndex.from_frame(both[["product_id", "date"]])
    is_treated = (arm.reindex(keys) == "treatment").to_numpy()
    assert 0.2 < is_treated.mean() < 0.8
    np.testing.assert_allclose(
        both.loc[is_treated, "price"], both.loc[is_treated, "price_base"] * (1 + PRICE_CUT), rtol=1e-12
    )
    np.testing.assert_array_equal(both.loc[~is_treated, "price"], both.loc[~is_treated, "price_base"])
    assert both.loc[is_treated, "units"].mean() > 1.03 * both.loc[is_treated, "units_base"].mean()


def test_true_effects_signs_and_exact_identities(world):
    start = SMALL.history_end + timedelta(days=1)
    end = start + timedelta(days=20)
    assignments = _assignments(world, start, 21, "time_bound")
    truth = true_effects(world, assignments).set_index("experiment").loc["exp"]
    assert truth["metric"] == "units" and truth["n_product_days"] == len(assignments)
    assert truth["true_direct_effect"] > 0  # a price cut with negative own elasticity
    assert truth["true_spillover_effect"] < 0  # a substitute's price cut takes my sales

    assigned = expected_sales(world, assignments, start, end)
    untreated = expected_sales(world, None, start, end)
    everyone = assignments.assign(arm="treatment", price_change=PRICE_CUT)
    all_treated = expected_sales(world, everyone, start, end)
    is_treated = (assignments["arm"] == "treatment").to_numpy()  # same row order: date, product
    assert (assigned["product_id"].to_numpy() == assignments["product_id"].to_numpy()).all()
    lam = assigned["expected_units"].to_numpy()
    g = np.log1p(PRICE_CUT) * np.tile(world.products["elasticity"].to_numpy(), 21)
    # lambda(D = 0, neighbours as assigned): treated rows carry D = g, controls D = 0
    control_world = np.where(is_treated, lam * np.exp(-g), lam)
    direct = np.mean(control_world * np.expm1(g))
    assert truth["true_direct_effect"] == pytest.approx(direct, rel=1e-9)
    assert truth["true_relative_effect"] == pytest.approx(direct / control_world.mean(), rel=1e-9)
    glob = np.mean(all_treated["expected_units"] - untreated["expected_units"])
    assert truth["true_global_effect"] == pytest.approx(glob, rel=1e-9)
    spill = np.mean((lam - untreated["expected_units"].to_numpy())[~is_treated])
    assert truth["true_spillover_effect"] == pytest.approx(spill, rel=1e-9)


def test_true_effects_skip_blackout_days_and_name_experiments(world):
    start = SMALL.history_end + timedelta(days=1)
    a = _assignments(world, start, 10, "random_days", experiment="first")
    b = _assignments(world, start + timedelta(days=10), 10, "time_bound", experiment="second",
                     price_change=0.05)
    a.loc[a["date"] < start + timedelta(days=3), "blackout"] = True
    truth = true_effects(world, pd.concat([a, b], ignore_index=True)).set_index("experiment")
    assert truth.loc["first", "n_product_days"] == 7 * SMALL.n_products
    assert truth.loc["second", "n_product_days"] == 10 * SMALL.n_products
    assert truth.loc["first", "true_direct_effect"] > 0 > truth.loc["second", "true_direct_effect"]


def test_carryover_decays_by_rho_after_treatment_ends(world):
    start = SMALL.history_end + timedelta(days=1)
    assignments = _assignments(world, start, 14, "random_days", seed=3)
    truth = expected_sales(world, assignments, start, start + timedelta(days=14))
    own = truth["own_log_effect"].to_numpy().reshape(15, -1)
    treated = (assignments["arm"] == "treatment").to_numpy().reshape(14, -1)
    treated = np.vstack([treated, np.zeros((1, treated.shape[1]), bool)])  # day 15: nobody
    g = world.products["elasticity"].to_numpy() * np.log1p(PRICE_CUT)
    np.testing.assert_allclose(own[treated], np.broadcast_to(g, own.shape)[treated])
    after = ~treated[1:] & treated[:-1]
    assert after.sum() > 100
    np.testing.assert_allclose(own[1:][after], SMALL.carryover_decay * own[:-1][after])
    twice = ~treated[2:] & ~treated[1:-1] & treated[:-2]
    np.testing.assert_allclose(own[2:][twice], SMALL.carryover_decay**2 * own[:-2][twice])
    assert (own[0][~treated[0]] == 0).all()  # nothing before the first treatment


# ---------------------------------------------------------------- persistence and demo


def test_save_load_round_trip(world, tmp_path):
    save_world(world, tmp_path / "world")
    loaded = load_world(tmp_path / "world")
    assert loaded.config == world.config
    for name in ("catalog", "products", "weekly_profile", "category_phase", "true_edges"):
        pd.testing.assert_frame_equal(getattr(loaded, name), getattr(world, name))
    assert (loaded.cross_elasticity != world.cross_elasticity).nnz == 0
    day = date(2025, 3, 1)
    pd.testing.assert_frame_equal(
        simulate_sales(loaded, None, day, day), simulate_sales(world, None, day, day)
    )


def test_demo_experiments_are_contract_yaml_on_distinct_categories():
    files = demo_experiments(MarketConfig())
    assert set(files) == {"time-bound-kitchen.yaml", "triggered-garden.yaml",
                          "random-days-toys.yaml", "crossover-pets.yaml"}
    parsed = {name: yaml.safe_load(text) for name, text in files.items()}
    categories = [p["population"]["categories"] for p in parsed.values()]
    assert all(len(c) == 1 for c in categories)
    assert sorted(c[0] for c in categories) == ["garden", "kitchen", "pets", "toys"]
    assert len({p["seed"] for p in parsed.values()}) == 4
    for name, p in parsed.items():
        assert p["name"] + ".yaml" == name
        assert (p["start"], p["end"]) == (date(2026, 1, 5), date(2026, 2, 15))
        assert p["treated_fraction"] == 0.5 and p["treatment"] == {"price_change": -0.08}
        assert p["metrics"] == ["units", "revenue", "profit"] and p["guardrails"][0]["metric"] == "profit"
    assert {p["design"]: p["unit"] for p in parsed.values()} == {
        "time_bound": "cluster", "triggered": "product", "random_days": "product", "crossover": "cluster"}
    cross = parsed["crossover-pets.yaml"]
    assert (cross["phase_days"], cross["blackout_days"]) == (14, 7)
    trig = parsed["triggered-garden.yaml"]
    assert (trig["trigger_event"], trig["duration_days"]) == ("competitor_discount", 21)
    with pytest.raises(ValueError, match="4 categories"):
        demo_experiments(MarketConfig(categories=("a", "b", "c")))


def test_write_demo_inputs_and_cli(tmp_path, capsys):
    config = MarketConfig(n_products=40, n_subclasses=5, history_days=30, seed=3)
    root = write_demo_inputs(tmp_path / "data", config)
    catalog = pd.read_parquet(root / "input" / "catalog.parquet")
    world = simulate_market(config)
    pd.testing.assert_frame_equal(catalog.drop(columns="unit_cost"), world.catalog)
    # the catalogue carries the world's unit costs, below each base price (margins 30-50%)
    assert np.allclose(catalog["unit_cost"], world.products["unit_cost"])
    assert (catalog["unit_cost"] < world.products["base_price"] * 0.71).all()
    sales = pd.read_parquet(root / "input" / "sales" / "history.parquet")
    assert sales["date"].max() == config.history_end
    triggers = pd.read_parquet(root / "input" / "trigger_events.parquet")
    experiments = sorted(p.name for p in (root / "input" / "experiments").glob("*.yaml"))
    assert experiments == sorted(demo_experiments(config))
    last_end = max(yaml.safe_load(t)["end"] for t in demo_experiments(config).values())
    assert config.history_end < triggers["date"].max() <= last_end
    assert load_world(root / "simulator").config == config
    assert not list(root.rglob(".*tmp*"))

    cli_dir = tmp_path / "cli"
    assert sim.main(["generate", "--data-dir", str(cli_dir), "--products", "30", "--seed", "5"]) == 0
    assert load_world(cli_dir / "simulator").config.n_products == 30
    capsys.readouterr()
    stamp = (cli_dir / "input" / "catalog.parquet").stat().st_mtime_ns
    assert sim.main(["generate", "--data-dir", str(cli_dir)]) == 0
    assert "already exists" in capsys.readouterr().out
    assert (cli_dir / "input" / "catalog.parquet").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name", sorted(sim.REGIMES))
def test_regimes_have_the_market_they_promise(name):
    """Each regime's world has the substitution, noise and columns its comment states."""
    config = sim.regime_config(name, n_products=200, n_subclasses=8, history_days=120, seed=5)
    world = sim.simulate_market(config)
    sales, _ = sim.simulate_history(world)
    assert ("views" in sales.columns) == config.observe_views
    if name == "no_substitutes":
        assert world.true_edges.empty
        return
    assert len(world.true_edges) > 50
    if config.cross_elasticity_cap is not None:
        total = np.asarray(world.cross_elasticity.sum(axis=1)).ravel()
        own = np.abs(world.products["elasticity"].to_numpy())
        assert (total <= config.cross_elasticity_cap * own + 1e-9).all()
    if config.demand_noise == "gamma":  # overdispersed beyond Poisson: Var > mean on average
        per_product = sales.groupby("product_id")["units"].agg(["mean", "var"])
        assert (per_product["var"] > per_product["mean"]).mean() > 0.9


def test_regime_config_refuses_unknown_names_and_applies_overrides():
    assert sim.regime_config("weak", carryover_decay=0.0).carryover_decay == 0.0
    with pytest.raises(ValueError, match="unknown simulator regime 'strong'"):
        sim.regime_config("strong")


def test_true_effects_per_metric_follow_price_and_cost(world):
    """Revenue and profit truth: the same expected units valued at the actual price (and minus the
    unit cost); a price cut lifts units more than revenue, and lowers profit per unit."""
    ids = world.catalog["product_id"].tolist()[:40]
    day = world.config.history_end + timedelta(days=1)
    assignments = pd.DataFrame({"date": day, "experiment": "exp", "product_id": ids,
                                "arm": ["treatment", "control"] * 20, "blackout": False,
                                "price_change": [-0.1, 0.0] * 20})
    truth = true_effects(world, assignments, metrics=("units", "revenue", "profit")).set_index("metric")
    assert list(truth.index) == ["units", "revenue", "profit"]
    units, revenue, profit = (truth.loc[m, "true_relative_effect"] for m in ("units", "revenue", "profit"))
    assert units > 0 and revenue < units and profit < revenue
    # for a single treated product-day: revenue's relative effect is (1 + units') x (1 - 10%) - 1
    one = assignments.iloc[:1]
    t1 = true_effects(world, one, metrics=("units", "revenue")).set_index("metric")
    assert t1.loc["revenue", "true_relative_effect"] == pytest.approx((1 + t1.loc["units", "true_relative_effect"]) * 0.9 - 1)
