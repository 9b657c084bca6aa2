"""Speed of one day's assignments at scale: 1M products in 10k clusters, every design.

The world is built with Spark from `spark.range` (no Python loop): products p0000000.. in
`--subclasses` subclasses (id mod S) and 50 categories, clusters c00000.. (id mod C, so with S
dividing C every cluster lies inside one subclass, as clusters of substitutes do), and one
`competitor_discount` event for every third product on one of the experiment's first 20 days.
Inputs are written to Parquet in a temporary warehouse first, and read back from there.

For each unit (product, cluster) the enrolment is computed once and frozen (a Delta table), as the
`daily_assignments` asset does at an experiment's first publication (its time is shown apart).
Then, per design, the timed step is what the daily run does for one day: `assign_days` on the
frozen enrolment (and the trigger events) for day 21 of a 42-day experiment (a crossover
blackout day of the second phase), published with `Warehouse.write_partitions` (one Delta commit:
the asset's own write) or, with `--sink noop`, Spark's `noop` sink (the
whole computation without the write). One warm-up run (the first design, not counted) loads the
JVM's code paths; its time is printed apart. The asset's checks and picture are not included.

    .venv/bin/python benchmarks/assignments.py [--products 1000000] [--clusters 10000]
        [--subclasses 500] [--sink parquet|noop] [--units product,cluster] [--repeats 1]

Timings are wall-clock seconds on whatever else the machine is running at the time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark.sql import functions as F  # noqa: E402

from pipelines.assignment import assign_days, enrolment_units  # noqa: E402
from pipelines.experiments import ExperimentSpec  # noqa: E402
from pipelines.spark import get_spark  # noqa: E402
from pipelines.storage import Warehouse  # noqa: E402

START = date(2026, 1, 1)
EXPERIMENT_DAYS = 42
BENCHMARK_DAY = START + timedelta(days=20)
TRIGGER_EVENT = "competitor_discount"
DESIGNS = ("time_bound", "triggered", "random_days", "crossover")
N_CATEGORIES = 50


def build_world(spark, warehouse: Warehouse, n_products: int, n_clusters: int, n_subclasses: int) -> None:
    """Write catalog, product_clusters and trigger_events tables built from `spark.range`."""
    ids = spark.range(n_products)
    catalog = ids.select(
        F.format_string("p%07d", "id").alias("product_id"),
        F.format_string("cat%02d", F.col("id") % N_CATEGORIES).alias("category"),
        F.format_string("s%04d", F.col("id") % n_subclasses).alias("subclass"),
    )
    clusters = ids.select(
        F.format_string("p%07d", "id").alias("product_id"),
        F.format_string("c%05d", F.col("id") % n_clusters).alias("cluster_id"),
    )
    events = ids.where(F.col("id") % 3 == 0).select(
        F.format_string("p%07d", "id").alias("product_id"),
        F.date_add(F.lit(START), ((F.col("id") * 7919) % 20).cast("int")).alias("date"),
        F.lit(TRIGGER_EVENT).alias("event"),
    )
    warehouse.write(catalog, "catalog")
    warehouse.write(clusters, "product_clusters")
    warehouse.write(events, "trigger_events")


def experiment(design: str, unit: str) -> ExperimentSpec:
    """A 42-day experiment of `design` over the whole catalogue, randomising `unit`s."""
    extra = {
        "crossover": {"phase_days": 14, "blackout_days": 7},
        "triggered": {"trigger_event": TRIGGER_EVENT, "duration_days": 21},
    }.get(design, {})
    return ExperimentSpec(
        name=f"bench-{design.replace('_', '-')}-{unit}", design=design, start=START,
        end=START + timedelta(days=EXPERIMENT_DAYS - 1), unit=unit, treated_fraction=0.5,
        price_change=-0.05, seed=7, source="benchmarks/assignments.py", **extra,
    )


def freeze_enrolment(spark, warehouse: Warehouse, unit: str) -> float:
    """Compute and write the enrolment of a `unit` experiment; seconds taken."""
    catalog = warehouse.read(spark, "catalog")
    clusters = warehouse.read(spark, "product_clusters") if unit == "cluster" else None
    began = time.perf_counter()
    warehouse.write(enrolment_units(experiment("time_bound", unit), catalog, clusters), "enrolments", ("unit", unit))
    return time.perf_counter() - began


def publish_one_day(spark, warehouse: Warehouse, design: str, unit: str, sink: str) -> tuple[float, int]:
    """Compute (and publish, unless sink is noop) BENCHMARK_DAY of `design`; (seconds, rows)."""
    units = warehouse.read(spark, "enrolments", ("unit", unit)).drop("unit")
    events = warehouse.read(spark, "trigger_events")
    warehouse.drop("daily_assignments")  # a day is published once: start each timed run afresh
    began = time.perf_counter()
    rows = assign_days(experiment(design, unit), units, [BENCHMARK_DAY], events)
    if sink == "noop":
        rows.write.format("noop").mode("overwrite").save()
    else:
        warehouse.write_partitions(rows, "daily_assignments", "date", [BENCHMARK_DAY.isoformat()])
    seconds = time.perf_counter() - began
    if sink == "noop":
        return seconds, -1
    return seconds, warehouse.read(spark, "daily_assignments").count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--subclasses", type=int, default=500)
    parser.add_argument("--sink", choices=("parquet", "noop"), default="parquet")
    parser.add_argument("--units", default="product,cluster", help="comma-separated: product, cluster")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per design; the best is shown")
    parser.add_argument("--workdir", default=None, help="temporary warehouse (default: a new temp dir)")
    args = parser.parse_args()
    units = [u.strip() for u in args.units.split(",") if u.strip()]

    spark = get_spark(app_name="pricelab-benchmark-assignments")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pricelab-bench-assignments-"))
    warehouse = Warehouse(root)
    try:
        began = time.perf_counter()
        build_world(spark, warehouse, args.products, args.clusters, args.subclasses)
        print(f"world: {args.products:,} products, {args.clusters:,} clusters, {args.subclasses} subclasses, "
              f"written in {time.perf_counter() - began:.1f} s; Spark {spark.version}, "
              f"master {spark.sparkContext.master}, {os.cpu_count()} cores; sink: {args.sink}; "
              f"day {BENCHMARK_DAY} of {START}..{START + timedelta(days=EXPERIMENT_DAYS - 1)}", flush=True)
        enrolment_seconds = {unit: freeze_enrolment(spark, warehouse, unit) for unit in units}
        warm_up, _ = publish_one_day(spark, warehouse, DESIGNS[0], units[0], args.sink)
        print(f"warm-up ({DESIGNS[0]}, {units[0]}; not counted): {warm_up:.1f} s", flush=True)

        header = (f"{'design':<12} {'unit':<8} {'products':>10} {'clusters':>9} {'rows':>10} "
                  f"{'enrol s':>8} {'seconds':>8}")
        lines = [header, "-" * len(header)]
        for unit in units:
            for design in DESIGNS:
                timings = [publish_one_day(spark, warehouse, design, unit, args.sink) for _ in range(args.repeats)]
                seconds, rows = min(timings)
                clusters = f"{args.clusters:,}" if unit == "cluster" else "-"
                lines.append(f"{design:<12} {unit:<8} {args.products:>10,} {clusters:>9} "
                             f"{rows if rows >= 0 else 'n/a':>10} {enrolment_seconds[unit]:>8.1f} {seconds:>8.1f}")
                print(lines[-1], flush=True)
        print()
        print("\n".join(lines))
        step = "Delta publication" if args.sink == "parquet" else "noop sink (no write)"
        print(f"seconds: one day's assign_days + {step}; enrol s: the experiment's enrolment, once per "
              "experiment (frozen at its first publication), not per day.")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
