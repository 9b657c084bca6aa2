"""Scale of the substitution-graph and clustering stages: Spark vs a plain pandas implementation.

For each size (products x 365 days of simulated history, ~50 products a subclass) the script
1. simulates the market in a child process and writes the sales (product_id, date, price, units,
   views) and the catalogue as Parquet under a temporary directory;
2. runs, in a fresh child process, `build_substitution_graph` (materialised), `cluster_products`
   (materialised), then connected components of that graph alone, once with the plain Spark
   fallback and once with GraphFrames (when its jar, fetched by `make setup` into ./jars, is on
   the classpath; the two partitions are compared), on a local Spark session reading that Parquet;
3. runs, in another child process with a time cap, a straightforward pandas implementation of the
   graph stage on the driver: read the Parquet, one `block_pair_statistics` per subclass (the
   same numpy kernel) in a groupby loop, Benjamini-Hochberg and the edge rule in numpy. No Spark.

Peak memory is the largest sum of resident set sizes over the child's process tree (Python
driver, JVM, Python workers), sampled every 0.2 s from /proc. Wall times exclude simulation and
Spark start-up. Every figure is printed as a progress line and again in the final table.

    .venv/bin/python benchmarks/graph_scale.py [--sizes 10000,50000,100000] [--regimes default,weak,no_substitutes]
        [--pandas-cap 900] [--pandas-max 50000]

Each row is also judged against the simulator's truth (outside the timings): precision and
recall (cross elasticity >= 0.4) of the edges, true cross weight kept inside clusters, singleton
share, blocks randomised whole and the largest cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRODUCTS_PER_SUBCLASS = {"default": 50, "weak": 25, "no_substitutes": 25}  # each regime at its own density
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------------
# Memory: RSS of a process tree, from /proc
# ------------------------------------------------------------------------------------------------

def _tree_rss_bytes(root_pid: int) -> int:
    """Sum of RSS of root_pid and all its descendants (0 for processes that vanish meanwhile)."""
    parent_of, rss_of = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            parent_of[int(entry)] = int(fields[1])
            rss_of[int(entry)] = int(fields[21]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    total, frontier = 0, [root_pid]
    children: dict[int, list[int]] = {}
    for pid, parent in parent_of.items():
        children.setdefault(parent, []).append(pid)
    while frontier:
        pid = frontier.pop()
        total += rss_of.get(pid, 0)
        frontier.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Samples the RSS of this process's tree in a thread; `.peak` in bytes."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))


# ------------------------------------------------------------------------------------------------
# Child steps (each runs in its own process: `graph_scale.py --step NAME --data DIR`)
# ------------------------------------------------------------------------------------------------

def step_simulate(data: Path, n_products: int, regime: str) -> dict:
    from pipelines.simulation import regime_config, simulate_history, simulate_market

    config = regime_config(regime, n_products=n_products,
                           n_subclasses=max(1, n_products // PRODUCTS_PER_SUBCLASS[regime]), seed=42)
    started = time.perf_counter()
    world = simulate_market(config)
    sales, _ = simulate_history(world)
    sales.to_parquet(data / "sales.parquet", index=False, row_group_size=1_000_000)
    world.catalog.to_parquet(data / "catalog.parquet", index=False)
    world.true_edges.to_parquet(data / "true_edges.parquet", index=False)
    (data / "snapshot").write_text(str(config.history_end.toordinal() + 1))  # the snapshot date
    return {"rows": len(sales), "subclasses": config.n_subclasses, "simulate_s": time.perf_counter() - started}


def _snapshot(data: Path):
    from datetime import date

    return date.fromordinal(int((data / "snapshot").read_text()))


def _timed_components(edges, catalog, use_graphframes: bool, checkpoint_dir: Path):
    """(components DataFrame materialised, seconds, number of components)."""
    from pipelines.clustering import connected_components

    started = time.perf_counter()
    found = connected_components(edges, catalog, use_graphframes=use_graphframes, checkpoint_dir=str(checkpoint_dir))
    found = found.localCheckpoint(eager=True)
    seconds = time.perf_counter() - started
    return found, seconds, found.select("component").distinct().count()


def step_spark(data: Path) -> dict:
    import pandas as pd

    from pipelines.clustering import cluster_products
    from pipelines.graph import learn_substitution
    from pipelines.graph_validation import edge_recovery, weight_kept_inside
    from pipelines.spark import get_spark, graphframes_available, jar_files
    from pyspark.sql import functions as F

    with PeakMemory() as memory:
        spark = get_spark(app_name="graph-scale", jars=jar_files(ROOT / "jars"))
        sales = spark.read.parquet(str(data / "sales.parquet"))
        catalog = spark.read.parquet(str(data / "catalog.parquet"))
        started = time.perf_counter()
        learned = learn_substitution(sales, catalog, _snapshot(data))
        edges = learned.edges.localCheckpoint(eager=True)
        n_edges = edges.count()
        graph_s = time.perf_counter() - started
        started = time.perf_counter()
        clusters = cluster_products(edges, catalog, blocks=learned.blocks).localCheckpoint(eager=True)
        n_clusters = clusters.select("cluster_id").distinct().count()
        clustering_s = time.perf_counter() - started
        # judged against the simulator's truth (outside the timings)
        truth = pd.read_parquet(data / "true_edges.parquet")
        clusters_pdf = clusters.toPandas()
        quality = {"whole_blocks": int(learned.blocks["randomise_whole"].sum()), "blocks": len(learned.blocks),
                   "singleton_share": float((clusters_pdf.groupby("cluster_id")["product_id"].transform("size") == 1).mean()),
                   "largest_cluster": int(clusters_pdf.groupby("cluster_id").size().max()),
                   "precision": float("nan"), "recall_04": float("nan"), "kept": float("nan")}
        if len(truth):
            recovery = edge_recovery(edges.select("src", "dst").toPandas(), truth, 0.4)
            quality.update(precision=recovery["precision"], recall_04=recovery["recall"],
                           kept=weight_kept_inside(clusters_pdf, truth))
        # After the clustering (which ran components once already), so neither side pays JVM warm-up.
        fallback, cc_fallback_s, n_components = _timed_components(edges, catalog, False, data / "checkpoints")
        cc_graphframes_s = cc_same = None
        if graphframes_available(spark):
            graphframes, cc_graphframes_s, _ = _timed_components(edges, catalog, True, data / "checkpoints")
            differing = fallback.join(graphframes.withColumnRenamed("component", "gf"), "product_id", "full_outer")
            cc_same = differing.where(~F.col("component").eqNullSafe(F.col("gf"))).count() == 0
        spark.stop()
    return {"graph_s": graph_s, "clustering_s": clustering_s, "edges": n_edges, "clusters": n_clusters,
            "peak_gb": memory.peak / 1e9, "cc_fallback_s": cc_fallback_s, "cc_graphframes_s": cc_graphframes_s,
            "cc_same": cc_same, "components": n_components, **quality}


def pandas_substitution_graph(sales, catalog, snapshot, window_days=365, min_overlap=60, fdr=0.05, min_corr=0.1):
    """The graph stage on the driver: groupby subclass, the same kernel, BH and edge rule in numpy."""
    from datetime import timedelta

    import numpy as np
    import pandas as pd

    from pipelines.graph import block_pair_statistics

    window_start = snapshot - timedelta(days=window_days)
    day = (pd.to_datetime(sales["date"]) - pd.Timestamp(window_start)).dt.days
    demand = "views" if "views" in sales.columns else "units"
    panel = pd.DataFrame({"product_id": sales["product_id"], "day": day, "price": sales["price"],
                          "units": sales[demand]})
    panel = panel[(panel["day"] >= 0) & (panel["day"] < window_days) & panel["units"].notna()]
    days_per_product = panel.groupby("product_id")["day"].transform("size")
    panel = panel[days_per_product >= min_overlap]
    panel = panel.merge(catalog.rename(columns={"subclass": "block"}), on="product_id")
    stats = pd.concat(
        [block_pair_statistics(block, None, window_start, window_days, min_overlap) for _, block in panel.groupby("block")],
        ignore_index=True,
    )
    p = np.sort(stats["p_pair"].dropna().to_numpy())
    passing = np.flatnonzero(p <= np.arange(1, len(p) + 1) * fdr / max(len(p), 1))
    if len(passing) == 0:
        return stats.iloc[:0]
    corr = stats[["corr_src_dst", "corr_dst_src"]].mean(axis=1)  # mean of the defined directions
    return stats[(stats["p_pair"] <= p[passing.max()]) & (corr >= min_corr) & (corr > 0)]


def step_pandas(data: Path) -> dict:
    import pandas as pd

    with PeakMemory() as memory:
        started = time.perf_counter()
        sales = pd.read_parquet(data / "sales.parquet")
        catalog = pd.read_parquet(data / "catalog.parquet")
        edges = pandas_substitution_graph(sales, catalog, _snapshot(data))
        graph_s = time.perf_counter() - started
    return {"graph_s": graph_s, "edges": len(edges), "peak_gb": memory.peak / 1e9}


STEPS = {"simulate": step_simulate, "spark": step_spark, "pandas": step_pandas}


def run_child(step: str, data: Path, n_products: int, timeout: float | None, regime: str = "default") -> dict | None:
    """Run one step in a fresh interpreter; its result dict, or None when it hit the time cap."""
    command = [sys.executable, __file__, "--step", step, "--data", str(data), "--products", str(n_products),
               "--regime", regime]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"step {step} for {n_products} products failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000,100000", help="comma-separated product counts")
    parser.add_argument("--pandas-cap", type=float, default=900.0, help="seconds before the pandas run is stopped")
    parser.add_argument("--pandas-max", type=int, default=50_000, help="largest size the pandas run is tried at")
    parser.add_argument("--regimes", default="default", help="comma-separated simulator regimes (pipelines.simulation.REGIMES)")
    parser.add_argument("--regime", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--products", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.step:  # a child: one step, its result as the last stdout line
        data = Path(args.data)
        result = step_simulate(data, args.products, args.regime) if args.step == "simulate" else STEPS[args.step](data)
        print(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    regimes = [r for r in args.regimes.split(",") if r.strip()]
    print(f"graph_scale: sizes {sizes}, regimes {regimes}, {os.cpu_count()} cores, 365 days", flush=True)
    rows = []
    for regime, n_products in [(r, n) for r in regimes for n in sizes]:
        with tempfile.TemporaryDirectory(prefix="pricelab-graph-scale-") as directory:
            data = Path(directory)
            sim = run_child("simulate", data, n_products, None, regime)
            print(f"[{n_products}] simulated {sim['rows']:,} rows, {sim['subclasses']} subclasses in {sim['simulate_s']:.0f}s", flush=True)
            spark = run_child("spark", data, n_products, None, regime)
            print(f"[{regime} {n_products}] spark: graph {spark['graph_s']:.0f}s, clustering {spark['clustering_s']:.0f}s, "
                  f"peak {spark['peak_gb']:.2f} GB, {spark['edges']:,} edges, {spark['clusters']:,} clusters; "
                  f"precision {spark['precision']:.3f}, recall (>= 0.4) {spark['recall_04']:.3f}, true weight kept "
                  f"{spark['kept']:.3f}, singletons {spark['singleton_share']:.3f}, blocks whole "
                  f"{spark['whole_blocks']}/{spark['blocks']}, largest cluster {spark['largest_cluster']}", flush=True)
            graphframes = ("not run: GraphFrames jar not on the classpath" if spark["cc_graphframes_s"] is None else
                           f"GraphFrames {spark['cc_graphframes_s']:.1f}s "
                           f"({'same' if spark['cc_same'] else 'DIFFERENT'} partition)")
            print(f"[{n_products}] connected components ({spark['components']:,}): fallback {spark['cc_fallback_s']:.1f}s, "
                  f"{graphframes}", flush=True)
            if n_products <= args.pandas_max:
                pandas = run_child("pandas", data, n_products, args.pandas_cap)
                if pandas is None:
                    print(f"[{n_products}] pandas: stopped at the {args.pandas_cap:.0f}s cap", flush=True)
                else:
                    print(f"[{n_products}] pandas: graph {pandas['graph_s']:.0f}s, peak {pandas['peak_gb']:.2f} GB, "
                          f"{pandas['edges']:,} edges", flush=True)
            else:
                pandas = "skipped"
            rows.append((regime, n_products, sim, spark, pandas))

    header = (f"{'regime':>14} {'products':>9} {'subcl':>6} {'rows':>12} | {'spark graph s':>13} {'cluster s':>9} {'peak GB':>7} "
              f"{'edges':>9} {'clusters':>8} | {'cc fallback s':>13} {'cc GraphFrames s':>16} | "
              f"{'pandas graph s':>14} {'peak GB':>7} {'edges':>9} | {'prec':>5} {'rec.4':>5} {'kept':>5} "
              f"{'single':>6} {'whole':>7} {'max':>4}")
    print()
    print(header)
    print("-" * len(header))
    for regime, n_products, sim, spark, pandas in rows:
        if isinstance(pandas, dict):
            tail = f"{pandas['graph_s']:>14.0f} {pandas['peak_gb']:>7.2f} {pandas['edges']:>9,}"
        else:
            tail = f"{'> cap' if pandas is None else 'not run':>14} {'':>7} {'':>9}"
        if spark["cc_graphframes_s"] is None:
            graphframes = "no jar"
        else:
            graphframes = f"{spark['cc_graphframes_s']:.1f}" + ("" if spark["cc_same"] else " (differs)")
        print(f"{regime:>14} {n_products:>9,} {sim['subclasses']:>6,} {sim['rows']:>12,} | {spark['graph_s']:>13.0f} "
              f"{spark['clustering_s']:>9.0f} {spark['peak_gb']:>7.2f} {spark['edges']:>9,} {spark['clusters']:>8,} | "
              f"{spark['cc_fallback_s']:>13.1f} {graphframes:>16} | {tail} | {spark['precision']:>5.3f} "
              f"{spark['recall_04']:>5.3f} {spark['kept']:>5.3f} {spark['singleton_share']:>6.3f} "
              f"{spark['whole_blocks']:>3}/{spark['blocks']:<3} {spark['largest_cluster']:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
