"""Label propagation (GraphFrames' community primitive) against today's Leiden clustering.

GraphFrames offers `labelPropagation(maxIter)`: GraphX's static, synchronous, unweighted label
propagation (every vertex takes the label most of its neighbours hold, all at once, maxIter
rounds). Is it a better building block for the randomisation clusters than the igraph Leiden that
`cluster_products` runs inside each component? Judged on one simulated world (the demo's
configuration, seed 42) against the simulator's truth:

- kept: share of the TRUE cross-elasticity weight whose two ends share a cluster
  (`graph_validation.weight_kept_inside`; the spillover a cluster design keeps inside its units);
- cut: share of the FOUND graph's edge weight between clusters (what `cluster_metrics` reports);
- clusters, median / max size, and the products in clusters over the pipeline's cap of 40 (such a
  cluster cannot be a randomisation unit as it stands).

The GraphFrames JVM jar is not needed: the same synchronous rule is run here on the driver
(numpy/pandas on the found edge list, ties to the smallest label), beside igraph's asynchronous
label propagation, unweighted and weighted (seeds 0-4). Connected components alone are the upper
bound on `kept` (no cut inside a component). The substitution graph is built once on Spark with
`build_substitution_graph`; Leiden is `cluster_products` as the pipeline runs it.

    .venv/bin/python benchmarks/community_alternatives.py [--products 1000] [--seed 42]
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_CLUSTER_SIZE = 40  # assets/clustering.py
LPA_SEEDS = range(5)


def synchronous_label_propagation(edges: pd.DataFrame, products: np.ndarray, max_iter: int) -> pd.DataFrame:
    """GraphX's rule: each round every vertex adopts its neighbours' most frequent label (unweighted).

    Ties go to the smallest label (GraphX leaves them to map order); vertices without neighbours
    keep their own id. Returns (product_id, cluster_id).
    """
    both = pd.concat(
        [edges[["src", "dst"]], edges[["dst", "src"]].rename(columns={"dst": "src", "src": "dst"})], ignore_index=True
    )
    label = pd.Series(products, index=products)
    for _ in range(max_iter):
        offers = pd.DataFrame({"vertex": both["dst"].to_numpy(), "label": label.reindex(both["src"]).to_numpy()})
        counts = offers.groupby(["vertex", "label"]).size().rename("n").reset_index()
        best = counts.sort_values(["vertex", "n", "label"], ascending=[True, False, True]).drop_duplicates("vertex")
        updated = label.copy()
        updated.loc[best["vertex"].to_numpy()] = best["label"].to_numpy()
        if updated.equals(label):
            break
        label = updated
    return pd.DataFrame({"product_id": products, "cluster_id": label.reindex(products).to_numpy()})


def igraph_label_propagation(edges: pd.DataFrame, products: np.ndarray, weighted: bool, seed: int) -> pd.DataFrame:
    """igraph's asynchronous label propagation on the whole found graph (one seed)."""
    import igraph

    index = pd.Index(products)
    graph = igraph.Graph(
        n=len(products),
        edges=np.column_stack([index.get_indexer(edges["src"]), index.get_indexer(edges["dst"])]).tolist(),
    )
    random.seed(seed)  # igraph draws from Python's random
    membership = graph.community_label_propagation(weights=edges["weight"].tolist() if weighted else None).membership
    return pd.DataFrame({"product_id": products, "cluster_id": np.asarray(membership)})


def components(edges: pd.DataFrame, products: np.ndarray) -> pd.DataFrame:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = pd.Index(products)
    src, dst = index.get_indexer(edges["src"]), index.get_indexer(edges["dst"])
    link = coo_matrix((np.ones(len(src)), (src, dst)), shape=(len(products), len(products)))
    _, label = connected_components(link, directed=False)
    return pd.DataFrame({"product_id": products, "cluster_id": label})


def judge(clusters: pd.DataFrame, edges: pd.DataFrame, true_edges: pd.DataFrame) -> dict:
    from pipelines.graph_validation import weight_kept_inside

    sizes = clusters.groupby("cluster_id").size()
    cluster_of = clusters.set_index("product_id")["cluster_id"]
    crossing = cluster_of.reindex(edges["src"]).to_numpy() != cluster_of.reindex(edges["dst"]).to_numpy()
    weight = edges["weight"].to_numpy(dtype=float)
    return {
        "kept": weight_kept_inside(clusters, true_edges),
        "cut": float(weight[crossing].sum() / weight.sum()),
        "clusters": len(sizes),
        "singletons": int((sizes == 1).sum()),
        "median": float(sizes.median()),
        "max": int(sizes.max()),
        "over_cap": int(sizes[sizes > MAX_CLUSTER_SIZE].sum()),
    }


def main(argv: list[str] | None = None) -> int:
    from pipelines.clustering import cluster_products
    from pipelines.graph import build_substitution_graph
    from pipelines.simulation import DEMO_CONFIG, simulate_history, simulate_market
    from pipelines.spark import get_spark

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=DEMO_CONFIG.n_products)
    parser.add_argument("--seed", type=int, default=DEMO_CONFIG.seed)
    args = parser.parse_args(argv)

    config = dataclasses.replace(DEMO_CONFIG, n_products=args.products, seed=args.seed)
    world = simulate_market(config)
    sales, _ = simulate_history(world)
    spark = get_spark(app_name="community-alternatives")
    catalog = spark.createDataFrame(world.catalog[["product_id", "subclass"]])
    edges_sdf = build_substitution_graph(
        spark.createDataFrame(sales), catalog, config.history_end + timedelta(days=1)
    ).localCheckpoint(eager=True)
    edges = edges_sdf.select("src", "dst", "weight").toPandas()
    products = np.sort(world.catalog["product_id"].to_numpy().astype(object))
    print(f"world: {config.n_products} products, {config.n_subclasses} subclasses, seed {config.seed}; "
          f"found graph {len(edges)} edges; true graph {len(world.true_edges)} edges", flush=True)

    rows = []
    started = time.perf_counter()
    leiden = cluster_products(edges_sdf, catalog.select("product_id"), max_cluster_size=MAX_CLUSTER_SIZE).toPandas()
    rows.append(("Leiden, resolution 0.5, cap 40 (cluster_products, today)", judge(leiden, edges, world.true_edges),
                 time.perf_counter() - started))
    spark.stop()
    rows.append(("connected components (upper bound on kept)", judge(components(edges, products), edges, world.true_edges), None))
    for max_iter in (5, 10, 20):
        started = time.perf_counter()
        found = synchronous_label_propagation(edges, products, max_iter)
        rows.append((f"LPA synchronous unweighted (GraphFrames/GraphX rule), maxIter {max_iter}",
                     judge(found, edges, world.true_edges), time.perf_counter() - started))
    for weighted in (False, True):
        judged = [judge(igraph_label_propagation(edges, products, weighted, seed), edges, world.true_edges)
                  for seed in LPA_SEEDS]
        mean = {key: float(np.mean([j[key] for j in judged])) for key in judged[0]}
        rows.append((f"LPA asynchronous {'weighted' if weighted else 'unweighted'} (igraph), mean of seeds 0-4",
                     mean, None))
        kept = [j["kept"] for j in judged]
        print(f"  igraph LPA {'weighted' if weighted else 'unweighted'}: kept per seed "
              + ", ".join(f"{k:.3f}" for k in kept), flush=True)

    header = f"{'method':<72} {'kept':>6} {'cut':>6} {'clusters':>8} {'single':>6} {'median':>6} {'max':>5} {'>cap':>5}"
    print()
    print(header)
    print("-" * len(header))
    for name, m, _ in rows:
        print(f"{name:<72} {m['kept']:>6.3f} {m['cut']:>6.3f} {m['clusters']:>8.0f} {m['singletons']:>6.0f} "
              f"{m['median']:>6.1f} {m['max']:>5.0f} {m['over_cap']:>5.0f}")
    print()
    print("kept = true cross-elasticity weight inside clusters; cut = found-graph weight between clusters; "
          f">cap = products in clusters over {MAX_CLUSTER_SIZE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
