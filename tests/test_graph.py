"""Substitution graph: planted substitutes are found, unrelated pairs mostly not, contract holds."""
from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from pipelines.graph import (
    _bh_threshold,
    _masked_cross_correlation,
    block_pair_statistics,
    build_substitution_graph,
    graph_summary,
)


START = date(2024, 1, 1)
N_DAYS = 200
SNAPSHOT = START + timedelta(days=N_DAYS)  # the day after the last sales day
CROSS_ELASTICITY = 2.0


def synthetic_market(seed: int = 0):
    """3 subclasses x 12 products x 200 days; multi-day price promotions; known cross effects.

    Substitutes: products 0-1, 2-3, 4-5 in every subclass, one pair across subclasses
    (s0-p10, s1-p10), and s2-p10 with s2-p11, which only sells 40 days. Demand also has a shared
    weekday pattern, a yearly wave, its own price effect and noise; ~5% of days are missing.
    """
    rng = np.random.default_rng(seed)
    products = [f"s{s}-p{k:02d}" for s in range(3) for k in range(12)]
    catalog = pd.DataFrame(
        {"product_id": products, "category": "grocery", "subclass": [f"sub{p[1]}" for p in products]}
    )
    planted = [(f"s{s}-p{a:02d}", f"s{s}-p{b:02d}") for s in range(3) for a, b in [(0, 1), (2, 3), (4, 5)]]
    across = ("s0-p10", "s1-p10")
    short_lived = ("s2-p10", "s2-p11")
    partners: dict[str, list[str]] = {}
    for a, b in planted + [across, short_lived]:
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)

    t = np.arange(N_DAYS)
    dates = np.array([START + timedelta(days=int(d)) for d in t], dtype=object)
    weekday = np.array([d.weekday() for d in dates])
    log_price = {}
    for pid in products:
        promo = np.zeros(N_DAYS)
        day = 0
        while day < N_DAYS:
            if rng.random() < 0.06:
                length = int(rng.integers(3, 8))
                promo[day : day + length] = np.log(1 - rng.uniform(0.15, 0.3))
                day += length + 2
            else:
                day += 1
        log_price[pid] = np.log(rng.uniform(5, 50)) + 0.1 * t / N_DAYS + promo
    weekly = rng.normal(0, 0.15, 7)
    frames = []
    for pid in products:
        log_mean = (
            np.log(rng.uniform(10, 40))
            + weekly[weekday]
            + 0.3 * np.sin(2 * np.pi * t / N_DAYS)
            - 2.0 * (log_price[pid] - log_price[pid].max())
            + rng.normal(0, 0.1, N_DAYS)
        )
        for other in partners.get(pid, []):
            log_mean = log_mean + CROSS_ELASTICITY * (log_price[other] - log_price[other].max())
        units = rng.poisson(np.exp(log_mean)).astype(float)
        sold = rng.random(N_DAYS) > 0.05
        if pid == short_lived[1]:
            sold &= (t >= 100) & (t < 140)
        frames.append(
            pd.DataFrame({"product_id": pid, "date": dates[sold], "price": np.exp(log_price[pid][sold]), "units": units[sold]})
        )
    sales = pd.concat(frames, ignore_index=True)
    return sales, catalog, planted, across, short_lived


LEAK_PAIR = ("s1-p06", "s1-p07")


def rows_outside_the_window() -> pd.DataFrame:
    """30 days before the window and 30 from the snapshot date on, where LEAK_PAIR looks like
    perfect substitutes (daily alternating price of one, demand of the other following it).
    Read by mistake, they would make an edge and push n_days past 200."""
    days = [START - timedelta(days=k) for k in range(30, 0, -1)] + [SNAPSHOT + timedelta(days=k) for k in range(30)]
    high = np.arange(len(days)) % 2 == 0
    return pd.concat(
        [
            pd.DataFrame({"product_id": LEAK_PAIR[0], "date": days, "price": np.where(high, 20.0, 10.0), "units": 20.0}),
            pd.DataFrame({"product_id": LEAK_PAIR[1], "date": days, "price": 15.0, "units": np.where(high, 200.0, 5.0)}),
        ],
        ignore_index=True,
    )


@pytest.fixture(scope="module")
def market(spark):
    sales, catalog, planted, across, short_lived = synthetic_market(seed=0)
    sales = pd.concat([sales, rows_outside_the_window()], ignore_index=True)
    return {
        "sales_pd": sales,
        "catalog_pd": catalog,
        "sales": spark.createDataFrame(sales),
        "catalog": spark.createDataFrame(catalog),
        "planted": set(planted),
        "across": across,
        "short_lived": short_lived,
    }


@pytest.fixture(scope="module")
def default_edges(market):
    edges = build_substitution_graph(market["sales"], market["catalog"], SNAPSHOT, window_days=N_DAYS)
    return edges, edges.toPandas()


def test_planted_substitutes_found_and_unrelated_pairs_mostly_not(market, default_edges):
    _, edges = default_edges
    found = set(zip(edges["src"], edges["dst"]))
    true_found = found & market["planted"]
    recall = len(true_found) / len(market["planted"])
    precision = len(true_found) / len(found)
    # measured on this seed: recall 1.0, precision 0.9 (9 of 10 edges); ~396 directions tested
    assert recall >= 0.85, f"recall {recall:.2f}; missing {sorted(market['planted'] - found)}"
    assert precision >= 0.75, f"precision {precision:.2f}; extra {sorted(found - market['planted'])}"


def test_no_edge_across_subclasses_by_default(market, default_edges):
    _, edges = default_edges
    subclass = market["catalog_pd"].set_index("product_id")["subclass"]
    assert len(edges) > 0
    assert (subclass.loc[edges["src"]].to_numpy() == subclass.loc[edges["dst"]].to_numpy()).all()
    assert tuple(market["across"]) not in set(zip(edges["src"], edges["dst"]))


def test_output_schema_and_edge_contract(default_edges):
    spark_edges, edges = default_edges
    types = dict(spark_edges.dtypes)
    assert list(spark_edges.columns) == ["src", "dst", "weight", "corr", "n_days", "evidence", "snapshot_date"]
    assert set(edges["evidence"]) <= {"pair_test", "block_shrinkage"}
    assert types == {
        "src": "string",
        "dst": "string",
        "weight": "double",
        "corr": "double",
        "n_days": "int",
        "evidence": "string",
        "snapshot_date": "date",
    }
    assert (edges["src"] < edges["dst"]).all()
    assert not edges.duplicated(["src", "dst"]).any()
    assert (edges["weight"] > 0).all() and (edges["weight"] >= edges["corr"] - 1e-12).all()
    assert (edges["corr"] >= 0.1).all()
    assert (edges["n_days"] >= 60).all() and (edges["n_days"] <= N_DAYS).all()
    assert (edges["snapshot_date"] == SNAPSHOT).all()


def test_related_pairs_restrict_candidates(spark, market):
    planted = sorted(market["planted"])
    listed = planted[:4] + [tuple(reversed(market["across"]))] + [("s0-p06", "s0-p07"), ("s1-p08", "s0-p09")]
    related = spark.createDataFrame(pd.DataFrame(listed, columns=["product_id_a", "product_id_b"]))
    edges = build_substitution_graph(
        market["sales"], market["catalog"], SNAPSHOT, related_pairs=related, window_days=N_DAYS
    ).toPandas()
    found = set(zip(edges["src"], edges["dst"]))
    allowed = {tuple(sorted(pair)) for pair in listed}
    assert found <= allowed, f"edges outside related_pairs: {sorted(found - allowed)}"
    assert market["across"] in found  # across subclasses, allowed because listed (reversed, even)
    assert set(planted[:4]) <= found


def test_min_overlap_drops_a_product_with_few_days(market, default_edges):
    _, edges = default_edges
    short_product = market["short_lived"][1]
    assert short_product not in set(edges["src"]) | set(edges["dst"])

    # The kernel itself: the short product's pairs exist below the threshold and vanish above it.
    sales = market["sales_pd"].merge(market["catalog_pd"][["product_id", "subclass"]], on="product_id")
    block = sales[sales["subclass"] == "sub2"].rename(columns={"subclass": "block"})
    block = block.assign(day=[(d - START).days for d in block["date"]])
    lenient = block_pair_statistics(block, None, START, N_DAYS, min_overlap=20)
    strict = block_pair_statistics(block, None, START, N_DAYS, min_overlap=60)
    touches = lambda frame: (frame["src"] == short_product) | (frame["dst"] == short_product)  # noqa: E731
    assert touches(lenient).sum() == 11 and (lenient.loc[touches(lenient), "n_days"] < 40).all()
    assert touches(strict).sum() == 0
    assert len(strict) == 55  # the other 11 products: every pair kept


def test_only_the_window_before_the_snapshot_date_is_read(default_edges):
    _, edges = default_edges
    assert LEAK_PAIR not in set(zip(edges["src"], edges["dst"]))
    assert (edges["n_days"] <= N_DAYS).all()  # common days inside the 200-day window


def test_masked_correlation_uses_only_days_both_products_have():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 3))
    y = 0.5 * x[:, [1, 2, 0]] + rng.normal(size=(50, 3))
    mask = rng.random((50, 3)) > 0.3
    corr, overlap = _masked_cross_correlation(np.where(mask, x, 0.0), np.where(mask, y, 0.0), mask)
    for i in range(3):
        for j in range(3):
            both = mask[:, i] & mask[:, j]
            assert overlap[i, j] == both.sum()
            assert corr[i, j] == pytest.approx(np.corrcoef(x[both, i], y[both, j])[0, 1], abs=1e-10)


def test_benjamini_hochberg_threshold_matches_reference(spark):
    rng = np.random.default_rng(5)
    p = np.concatenate([rng.uniform(0, 1, 300), rng.uniform(0, 0.002, 25)])
    rng.shuffle(p)
    pairs = pd.DataFrame({"p_src_dst": p[:163], "p_dst_src": np.append(p[163:], np.nan)})  # a NaN: untested
    stats = spark.createDataFrame(pairs.astype(float))
    # reference: sort all p-values, largest p_(k) with p_(k) <= k q / m
    finite = np.sort(p)
    m = len(finite)
    passing = finite <= np.arange(1, m + 1) * 0.05 / m
    expected = finite[np.flatnonzero(passing).max()]
    # and scipy's adjusted p-values reject exactly the p-values at or below that threshold
    assert finite[false_discovery_control(finite, method="bh") <= 0.05].max() == expected
    both = ("p_src_dst", "p_dst_src")
    assert _bh_threshold(stats, 0.05, both) == pytest.approx(expected)
    assert _bh_threshold(stats.limit(0), 0.05, both) is None


def test_graph_summary(default_edges):
    spark_edges, edges = default_edges
    summary = graph_summary(spark_edges)
    nodes = set(edges["src"]) | set(edges["dst"])
    assert summary["edges"] == len(edges)
    assert summary["nodes_with_edge"] == len(nodes)
    assert summary["mean_degree"] == pytest.approx(2 * len(edges) / len(nodes))
    assert summary["weight_quantiles"]["max"] == pytest.approx(edges["weight"].max())
    assert summary["weight_quantiles"]["median"] == pytest.approx(edges["weight"].median())


# ------------------------------------------------------------------------------------------------
# Against the simulator's true substitution graph
# ------------------------------------------------------------------------------------------------

STATED_STRENGTH = 0.4  # recall is judged on true edges with cross elasticity >= this


def test_recovers_the_simulators_true_graph_and_clusters_keep_its_weight(spark):
    """A seeded 300-product world (10 subclasses, 365 days, views present as in the demo data).

    Measured (pipelines.graph_validation; seed 1, the one used here): precision 0.906, recall at
    cross elasticity >= 0.4 0.877 (>= 0.3: 0.816), true weight kept inside clusters 0.899.
    Seeds 1-5: precision 0.906-0.951, recall 0.864-0.885, kept 0.881-0.945. Floors a little below.
    """
    from pipelines.clustering import cluster_products
    from pipelines.graph_validation import edge_recovery, weight_kept_inside
    from pipelines.simulation import MarketConfig, simulate_history, simulate_market

    config = MarketConfig(n_products=300, n_subclasses=10, seed=1)
    world = simulate_market(config)
    sales, _ = simulate_history(world)
    edges = build_substitution_graph(
        spark.createDataFrame(sales),
        spark.createDataFrame(world.catalog[["product_id", "subclass"]]),
        config.history_end + timedelta(days=1),
    ).localCheckpoint(eager=True)
    clusters = cluster_products(edges, spark.createDataFrame(world.catalog[["product_id"]])).toPandas()
    recovery = edge_recovery(edges.toPandas(), world.true_edges, STATED_STRENGTH)
    kept = weight_kept_inside(clusters, world.true_edges)
    assert recovery["precision"] >= 0.87, recovery
    assert recovery["recall"] >= 0.83, recovery
    assert kept >= 0.85, f"true cross-elasticity weight kept inside clusters: {kept:.3f}"


def test_edge_recovery_and_weight_kept_definitions():
    from pipelines.graph_validation import edge_recovery, weight_kept_inside

    true = pd.DataFrame({"src": ["a", "a", "c"], "dst": ["b", "c", "d"], "cross_elasticity": [0.6, 0.1, 0.5]})
    found = pd.DataFrame({"src": ["b", "a"], "dst": ["a", "d"]})  # (b, a) is the true (a, b)
    result = edge_recovery(found, true, 0.4)
    assert result["precision"] == 0.5 and result["recall"] == 0.5 and result["recall_all"] == pytest.approx(1 / 3)
    clusters = pd.DataFrame({"product_id": ["a", "b", "c"], "cluster_id": ["a", "a", "c"]})  # d missing
    assert weight_kept_inside(clusters, true) == pytest.approx(0.6 / 1.2)


def test_snapshot_dates_needed_gives_every_experiment_a_snapshot_in_force_at_its_start():
    from datetime import date as d

    from pipelines.graph import snapshot_dates_needed

    # default after the experiments: the earliest start gets one, which is in force for the later ones
    assert snapshot_dates_needed(d(2025, 7, 1), [], [d(2025, 6, 9), d(2025, 6, 2)]) == [d(2025, 6, 2), d(2025, 7, 1)]
    # an existing snapshot before every start: only the default is added
    assert snapshot_dates_needed(d(2025, 7, 1), [d(2025, 5, 1)], [d(2025, 6, 2)]) == [d(2025, 7, 1)]
    # everything exists: nothing to build
    assert snapshot_dates_needed(d(2025, 7, 1), [d(2025, 7, 1), d(2025, 6, 2)], [d(2025, 6, 2)]) == []
    # an experiment before the only existing snapshot gets its own
    assert snapshot_dates_needed(d(2025, 7, 1), [d(2025, 7, 1)], [d(2025, 3, 3)]) == [d(2025, 3, 3)]
