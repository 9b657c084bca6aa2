"""The substitution graph: whose demand moves when another product's price moves.

Snapshots are dated and written once (`substitution_graph/snapshot_date=D/`, built from the 365
days before D): experiments keep the snapshot in force at their start, so a snapshot that
assignments may depend on is never rewritten.
"""

import datetime as dt
import inspect

import dagster as dg
from pyspark.sql import functions as F

from assets.checks import run_metadata
from assets.kinds import DELTA_TABLE
from pipelines import graph, inputs
from pipelines.progress import Progress, spark_progress


FDR_DEFAULT = inspect.signature(graph.learn_substitution).parameters["fdr"].default


class SnapshotConfig(dg.Config):
    """Run-level knobs of a graph build (set them in the launchpad). `snapshot_date` (YYYY-MM-DD):
    the day the snapshot is in force from; default: the day after the last complete sales day (the
    latest day with at least half the median day's products). `fdr`: the Benjamini-Hochberg false
    discovery rate of the pair tests; it applies to snapshots built by this run (a snapshot is
    never rewritten, and records the rate it was built with)."""

    snapshot_date: str = ""
    fdr: float = FDR_DEFAULT


def resolve_snapshot_date(config: SnapshotConfig, sales) -> dt.date:
    if config.snapshot_date:
        try:
            return dt.date.fromisoformat(config.snapshot_date)
        except ValueError:
            raise dg.Failure(f"substitution_graph: config snapshot_date {config.snapshot_date[:40]!r} is not a date YYYY-MM-DD") from None
    # the latest day most products sold on, never one stray row's date (snapshots are never rewritten)
    last = inputs.last_complete_sales_day(sales)
    if last is None:
        raise dg.Failure("substitution_graph: the sales table is empty, so there is no history to build a graph from")
    return last + dt.timedelta(days=1)


def short_history_message(sales, snapshot: dt.date) -> str:
    """Why no snapshot can be built: the days of sales in its window, against the minimum."""
    defaults = inspect.signature(graph.learn_substitution).parameters
    window_days, min_overlap = defaults["window_days"].default, defaults["min_overlap"].default
    first = snapshot - dt.timedelta(days=window_days)
    days = sales.where((F.col("date") >= F.lit(first)) & (F.col("date") < F.lit(snapshot))).agg(
        F.countDistinct("date").alias("n"), F.min("date").alias("lo"), F.max("date").alias("hi")).first()
    held = f"{days['n']} day(s), {days['lo']}..{days['hi']}" if days["n"] else "none"
    return (f"substitution_graph: snapshot {snapshot} not built: no candidate pair of products (same subclass, or input/related_pairs) has {min_overlap} days of "
            f"sales together in the {window_days} days before it (sales there: {held}); the graph needs at least "
            f"{min_overlap} days of history. Nothing of this snapshot was written; product-unit experiments can still be published "
            "(pricelab publish), cluster-unit ones wait for a snapshot")


def _build_snapshot(context, spark, warehouse, snapshot: dt.date, fdr: float = FDR_DEFAULT) -> bool:
    """Build snapshot `snapshot` unless it exists (snapshots are never rewritten); True when reused."""
    partition = ("snapshot_date", snapshot.isoformat())
    if warehouse.exists("substitution_graph", partition) and warehouse.exists(graph.BLOCKS_TABLE, partition):
        context.log.info(f"snapshot {snapshot} exists and is never rewritten; reusing it")
        return True
    sales = warehouse.read(spark, "sales")
    catalog = warehouse.read(spark, "catalog")
    related = inputs.load_related_pairs(spark, warehouse.root)
    context.log.info(f"building the substitution graph for snapshot {snapshot} (365 days of history)")
    with spark_progress(spark, f"substitution graph {snapshot}", context.log.info):
        learned = graph.learn_substitution(sales, catalog, snapshot, related_pairs=related, fdr=fdr)
    if learned.blocks.empty:  # not one candidate pair with enough days together: nothing to write, ever
        raise dg.Failure(description=short_history_message(sales, snapshot))
    warehouse.write(spark.createDataFrame(learned.blocks), graph.BLOCKS_TABLE, partition)
    warehouse.write(learned.edges, "substitution_graph", partition)
    return False


def experiment_starts(spark, warehouse) -> list[dt.date]:
    """Start days of the accepted experiments (none before the experiments asset has run)."""
    if not warehouse.exists("experiments"):
        return []
    return sorted({r["start"] for r in warehouse.read(spark, "experiments").select("start").collect()})


@dg.asset(kinds=DELTA_TABLE, group_name="graph", deps=["sales", "catalog", "experiments"], required_resource_keys={"spark", "warehouse"})
def substitution_graph(context: dg.AssetExecutionContext, config: SnapshotConfig) -> dg.MaterializeResult:
    """Edges (src, dst, weight, corr, n_days, evidence) between substitutes, and the evidence and
    power of each block (`substitution_blocks`), one dated snapshot per build. Every accepted
    experiment also gets a snapshot in force at its start: when none is dated on or before it,
    one dated at its start is built (from the 365 days before it)."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    if not 0 < config.fdr < 1:
        raise dg.Failure(f"substitution_graph: config fdr {config.fdr!r} is not a rate strictly between 0 and 1")
    sales = warehouse.read(spark, "sales")
    snapshot = resolve_snapshot_date(config, sales)
    existing = [dt.date.fromisoformat(d) for d in warehouse.partitions("substitution_graph", "snapshot_date")]
    starts = experiment_starts(spark, warehouse)
    wanted = graph.snapshot_dates_needed(snapshot, existing, starts)
    for extra in [d for d in wanted if d != snapshot]:
        context.log.info(f"experiment start {extra} has no snapshot in force: building one dated {extra}")
    reused = True
    days = sorted(set(wanted) | {snapshot})
    progress = Progress("substitution graph", len(days), "snapshot(s)", context.log.info)
    for day in days:
        built_reused = _build_snapshot(context, spark, warehouse, day, config.fdr)
        progress.step(f"{day}{' reused' if built_reused else ' built'}")
        if day == snapshot:
            reused = built_reused
    partition = ("snapshot_date", snapshot.isoformat())
    edges = warehouse.read(spark, "substitution_graph", partition)
    blocks = warehouse.read(spark, graph.BLOCKS_TABLE, partition).toPandas()
    power = graph.power_summary(blocks)
    for line in power["warnings"]:
        context.log.warning(line)
    summary = graph.graph_summary(edges)
    return dg.MaterializeResult(
        metadata={
            **run_metadata(spark, summary.get("edges")),
            "snapshot_date": snapshot.isoformat(),
            "reused_snapshot": reused,
            "fdr": config.fdr,  # of this run's builds (a reused snapshot keeps the rate it was built with)
            "snapshots_added_for_experiment_starts": dg.MetadataValue.json([d.isoformat() for d in wanted if d != snapshot]),
            **summary,
            **{k: v for k, v in power.items() if k not in ("warnings", "table")},
            "power_by_block": dg.MetadataValue.md(power["table"]),
            "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in power["warnings"]) or "none"),
        }
    )
