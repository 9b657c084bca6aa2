"""Clustering: components on Spark, Leiden inside them, size cap, stable ids, metrics."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import igraph
import numpy as np
import pandas as pd
import pytest

from pipelines.clustering import (
    cluster_component,
    cluster_metrics,
    cluster_products,
    connected_components,
    largest_clusters_png,
)
from pipelines.spark import graphframes_available, graphframes_missing_reason


MAX_SIZE = 12
PROJECT_JARS_DIR = Path(__file__).resolve().parents[1] / "jars"


def _require_graphframes(spark) -> None:
    """Skip a GraphFrames test where the jar is absent, except in CI (CI=true): there it fails.

    `make setup` fetches the jar into ./jars; CI runs `make test`, so a missing jar in CI means the
    setup step or the session's classpath is broken. One exception, stated in the skip reason:
    the Maven registry refused the pinned artifact (jars/UNAVAILABLE, written by setup) and
    PRICELAB_REQUIRE_GRAPHFRAMES is not 1.
    """
    missing = graphframes_missing_reason(spark)
    if missing is None:
        return
    refused = PROJECT_JARS_DIR / "UNAVAILABLE"
    fetched = sorted(p.name for p in PROJECT_JARS_DIR.glob("*.jar"))
    if refused.exists():
        why = f"make setup did not fetch the GraphFrames jar: {refused.read_text().strip()}"
    elif fetched:
        why = f"make setup fetched {fetched} into jars/ but the Spark session does not load them: {missing}"
    else:
        why = f"make setup did not fetch the GraphFrames jar (no jars/*.jar, no jars/UNAVAILABLE): {missing}"
    strict = os.environ.get("PRICELAB_REQUIRE_GRAPHFRAMES") == "1"
    if os.environ.get("CI") == "true" and (strict or not refused.exists()):
        pytest.fail(f"CI must run the GraphFrames tests, but {why}", pytrace=False)
    if strict:
        pytest.fail(f"PRICELAB_REQUIRE_GRAPHFRAMES=1, but {why}", pytrace=False)
    pytest.skip(why)


def _edge_frame(graph: igraph.Graph, prefix: str, weight: float = 1.0) -> pd.DataFrame:
    pairs = graph.get_edgelist()
    return pd.DataFrame(
        {"src": [f"{prefix}{a:03d}" for a, _ in pairs], "dst": [f"{prefix}{b:03d}" for _, b in pairs], "weight": weight}
    )


def _partition(frame: pd.DataFrame, label: str) -> set[frozenset]:
    return {frozenset(group["product_id"]) for _, group in frame.groupby(label)}


@pytest.fixture(scope="module")
def random_graph(spark):
    """80 vertices, 60 random edges: a 35-vertex component, small trees, 20 isolated vertices."""
    rng = np.random.default_rng(18)
    n = 80
    ends = rng.integers(0, n, size=(60, 2))
    edges = pd.DataFrame(
        {"src": [f"v{a:02d}" for a in ends[:, 0]], "dst": [f"v{b:02d}" for b in ends[:, 1]], "weight": 1.0}
    )
    vertices = pd.DataFrame({"product_id": [f"v{i:02d}" for i in range(n)]})
    reference = igraph.Graph(n=n, edges=ends.tolist()).connected_components()
    expected = {frozenset(f"v{i:02d}" for i in members) for members in reference}
    return spark.createDataFrame(edges), spark.createDataFrame(vertices), expected


@pytest.fixture(scope="module")
def mixed_graph(spark):
    """One catalogue with every case: a big dense random component, a clique, two dense groups
    joined by one weak edge, a pair, and products without any edge."""
    random.seed(7)  # igraph draws from Python's random
    dense = igraph.Graph.Erdos_Renyi(n=50, m=400)
    groups = pd.concat(
        [
            _edge_frame(igraph.Graph.Full(8), "a"),
            _edge_frame(igraph.Graph.Full(8), "b"),
            pd.DataFrame({"src": ["a000"], "dst": ["b000"], "weight": [0.05]}),
        ]
    )
    edges = pd.concat(
        [
            _edge_frame(dense, "d", 0.5),
            _edge_frame(igraph.Graph.Full(30), "k"),
            groups,
            pd.DataFrame({"src": ["p1"], "dst": ["p0"], "weight": [0.3]}),  # written dst < src on purpose
        ],
        ignore_index=True,
    )
    names = set(edges["src"]) | set(edges["dst"]) | {f"lonely{i}" for i in range(5)}
    products = pd.DataFrame({"product_id": sorted(names)})
    return edges, products, spark.createDataFrame(edges), spark.createDataFrame(products)


@pytest.fixture(scope="module")
def mixed_clusters(mixed_graph):
    _, _, edges, products = mixed_graph
    return cluster_products(edges, products, max_cluster_size=MAX_SIZE, seed=0).toPandas()


def test_fallback_components_equal_igraph(random_graph):
    edges, vertices, expected = random_graph
    found = connected_components(edges, vertices, use_graphframes=False).toPandas()
    assert len(found) == 80 and found["product_id"].is_unique
    assert max(len(c) for c in expected) == 35 and len(expected) == 26
    assert _partition(found, "component") == expected
    # the label is the smallest product_id of the component
    assert (found.groupby("component")["product_id"].min() == found.groupby("component")["product_id"].min().index).all()


def test_graphframes_components_equal_fallback(spark, random_graph):
    _require_graphframes(spark)
    edges, vertices, _ = random_graph
    fallback = connected_components(edges, vertices, use_graphframes=False).toPandas()
    adaptive_before = spark.conf.get("spark.sql.adaptive.enabled")
    with_graphframes = connected_components(edges, vertices, use_graphframes=True).toPandas()
    assert spark.conf.get("spark.sql.adaptive.enabled") == adaptive_before
    merged = fallback.merge(with_graphframes, on="product_id", suffixes=("_fallback", "_graphframes"))
    assert len(merged) == len(fallback)
    assert (merged["component_fallback"] == merged["component_graphframes"]).all()


def test_default_clustering_uses_graphframes_when_the_jar_is_there(spark, mixed_graph, caplog, tmp_path):
    """The demo's path (use_graphframes=None) really runs GraphFrames, with its checkpoint dir."""
    _require_graphframes(spark)
    _, _, edges, products = mixed_graph
    with caplog.at_level(logging.INFO, logger="pipelines.clustering"):
        clusters = cluster_products(edges, products, max_cluster_size=MAX_SIZE, checkpoint_dir=str(tmp_path)).toPandas()
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connected components:")]
    assert chosen == [
        "connected components: GraphFrames connectedComponents, because the GraphFrames JVM jar is on the Spark classpath"
    ]
    assert str(tmp_path) in spark.sparkContext.getCheckpointDir()  # Spark adds a uuid folder under it
    assert clusters["product_id"].is_unique


def test_the_choice_of_components_implementation_is_logged_with_its_reason(spark, random_graph, caplog):
    edges, vertices, _ = random_graph
    with caplog.at_level(logging.INFO, logger="pipelines.clustering"):
        connected_components(edges, vertices, use_graphframes=False)
        connected_components(edges, vertices)  # detection
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connected components:")]
    assert chosen[0] == (
        "connected components: plain Spark min-label propagation (fallback), because use_graphframes=False was asked for"
    )
    if graphframes_available(spark):
        assert chosen[1].endswith("GraphFrames connectedComponents, because the GraphFrames JVM jar is on the Spark classpath")
    else:
        assert chosen[1] == (
            "connected components: plain Spark min-label propagation (fallback), because the GraphFrames JVM jar "
            "is not on the Spark classpath (org.graphframes.GraphFrame not found)"
        )


def test_requiring_graphframes_without_the_jar_is_a_clear_error(spark, random_graph):
    if graphframes_available(spark):
        pytest.skip("the GraphFrames jar is on the classpath here")
    edges, vertices, _ = random_graph
    with pytest.raises(RuntimeError, match="GraphFrames JVM jar is not on the Spark classpath"):
        connected_components(edges, vertices, use_graphframes=True)


def test_every_product_gets_exactly_one_cluster(mixed_graph, mixed_clusters):
    _, products, _, _ = mixed_graph
    assert list(mixed_clusters.columns) == ["product_id", "cluster_id", "reason"]
    sizes = mixed_clusters.groupby("cluster_id")["product_id"].transform("size")
    assert ((sizes == 1) == (mixed_clusters["reason"] == "singleton")).all()
    assert mixed_clusters["product_id"].is_unique
    assert set(mixed_clusters["product_id"]) == set(products["product_id"])
    lonely = mixed_clusters[mixed_clusters["product_id"].str.startswith("lonely")]
    assert (lonely["cluster_id"] == lonely["product_id"]).all()  # isolated products are singletons
    # the id of a cluster is its smallest product_id
    smallest = mixed_clusters.groupby("cluster_id")["product_id"].min()
    assert (smallest.index == smallest.to_numpy()).all()


def test_max_cluster_size_holds_on_big_dense_components(mixed_clusters):
    sizes = mixed_clusters.groupby("cluster_id").size()
    assert sizes.max() <= MAX_SIZE
    dense = mixed_clusters[mixed_clusters["product_id"].str.startswith("d")].groupby("cluster_id").size()
    clique = mixed_clusters[mixed_clusters["product_id"].str.startswith("k")].groupby("cluster_id").size()
    assert dense.sum() == 50 and len(dense) >= 5  # 50 products, at most 12 a cluster
    # a clique has no inner structure: it is cut into a few big parts, not shattered
    assert sorted(clique) == [6, 12, 12]


def test_size_cap_and_determinism_in_the_component_kernel():
    edges = _edge_frame(igraph.Graph.Lattice([15, 15], circular=False), "g")
    first = cluster_component(edges, 20, 1.0, seed=4)
    shuffled = cluster_component(edges.sample(frac=1.0, random_state=2), 20, 1.0, seed=4)
    assert first.groupby("cluster_id").size().max() <= 20
    assert set(first["product_id"]) == set(edges["src"]) | set(edges["dst"])
    pd.testing.assert_frame_equal(
        first.sort_values("product_id", ignore_index=True), shuffled.sort_values("product_id", ignore_index=True)
    )


def test_cluster_ids_are_deterministic_across_runs(mixed_graph, mixed_clusters):
    _, _, edges, products = mixed_graph
    again = cluster_products(edges, products, max_cluster_size=MAX_SIZE, seed=0).toPandas()
    pd.testing.assert_frame_equal(
        mixed_clusters.sort_values("product_id", ignore_index=True), again.sort_values("product_id", ignore_index=True)
    )


def test_two_dense_groups_joined_by_a_weak_edge_are_separated(mixed_clusters):
    cluster_of = mixed_clusters.set_index("product_id")["cluster_id"]
    group_a = cluster_of[[f"a{i:03d}" for i in range(8)]]
    group_b = cluster_of[[f"b{i:03d}" for i in range(8)]]
    assert group_a.nunique() == 1 and group_b.nunique() == 1
    assert group_a.iloc[0] == "a000" and group_b.iloc[0] == "b000"
    assert cluster_of["p0"] == cluster_of["p1"] == "p0"


def test_cluster_metrics_on_a_hand_made_example(spark):
    edges = spark.createDataFrame(
        pd.DataFrame(
            {"src": ["a", "b", "c", "d"], "dst": ["b", "c", "d", "e"], "weight": [1.0, 1.0, 0.5, 2.0]}
        )
    )
    clusters = spark.createDataFrame(
        pd.DataFrame({"product_id": list("abcdef"), "cluster_id": ["a", "a", "a", "d", "d", "f"]})
    )
    metrics = cluster_metrics(edges, clusters)
    assert metrics["clusters"] == 3
    assert metrics["singletons"] == 1
    assert (metrics["size_min"], metrics["size_median"], metrics["size_max"]) == (1, 2, 3)
    assert metrics["edges_cut"] == 1
    assert metrics["cut_weight_share"] == pytest.approx(0.5 / 4.5)


def test_largest_clusters_png(mixed_graph, mixed_clusters, spark):
    _, _, edges, _ = mixed_graph
    png = largest_clusters_png(edges, spark.createDataFrame(mixed_clusters), k=4)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
