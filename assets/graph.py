"""The substitution graph: whose demand moves when another product's price moves.

Snapshots are dated and written once (`substitution_graph/snapshot_date=D/`, built from the 365
days before D): experiments keep the snapshot in force at their start, so a snapshot that
assignments may depend on is never rewritten. Each snapshot is one key of the dynamic partitions
`snapshot_date` (assets/partitions.py), so the UI lists every snapshot and the run that made it.
"""

import datetime as dt
import inspect

import dagster as dg
from pyspark.sql import functions as F

from assets.checks import run_metadata
from assets.kinds import DELTA_TABLE
from assets.partitions import SNAPSHOT_PARTITIONS, snapshot_days
from pipelines import graph, inputs
from pipelines.progress import Progress, spark_progress


FDR_DEFAULT = inspect.signature(graph.learn_substitution).parameters["fdr"].default


class SnapshotConfig(dg.Config):
    """Run-level knobs of a graph build (set them in the launchpad). `snapshot_date` (YYYY-MM-DD):
    the day the snapshot is in force from; it must be one of the run's snapshot partitions (the
    partition key picks the snapshot; `pricelab build-graph --snapshot-date D` registers D and
    launches it). `fdr`: the Benjamini-Hochberg false discovery rate of the pair tests; it applies
    to snapshots built by this run (a snapshot is never rewritten, and records the rate it was
    built with)."""

    snapshot_date: str = ""
    fdr: float = FDR_DEFAULT


def check_snapshot_date(config: SnapshotConfig, days: list[dt.date]) -> None:
    """A configured snapshot_date must be a date among the run's snapshot partitions."""
    if not config.snapshot_date:
        return
    try:
        day = dt.date.fromisoformat(config.snapshot_date)
    except ValueError:
        raise dg.Failure(f"substitution_graph: config snapshot_date {config.snapshot_date[:40]!r} is not a date YYYY-MM-DD") from None
    if day not in days:
        raise dg.Failure(
            f"substitution_graph: config snapshot_date {day} is not among this run's snapshot partitions "
            f"({', '.join(d.isoformat() for d in days)}): launch the run on partition {day} "
            f"(pricelab build-graph --snapshot-date {day} registers it)"
        )


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


@dg.asset(
    kinds=DELTA_TABLE, group_name="graph", partitions_def=SNAPSHOT_PARTITIONS, backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["sales", "catalog", "experiments", "related_pairs_files"], required_resource_keys={"spark", "warehouse"},
)
def substitution_graph(context: dg.AssetExecutionContext, config: SnapshotConfig) -> dg.MaterializeResult:
    """Edges (src, dst, weight, corr, n_days, evidence) between substitutes, and the evidence and
    power of each block (`substitution_blocks`): one dated snapshot per partition key (a run may
    hold several keys: `pipelines.snapshot_plan` adds one at every accepted experiment start that
    has no snapshot in force). An existing snapshot is reused, never rewritten."""
    if not 0 < config.fdr < 1:
        raise dg.Failure(f"substitution_graph: config fdr {config.fdr!r} is not a rate strictly between 0 and 1")
    days = snapshot_days(context, "substitution_graph")
    check_snapshot_date(config, days)
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    reused = {}
    progress = Progress("substitution graph", len(days), "snapshot(s)", context.log.info)
    for day in days:
        reused[day] = _build_snapshot(context, spark, warehouse, day, config.fdr)
        progress.step(f"{day}{' reused' if reused[day] else ' built'}")
    have = [dt.date.fromisoformat(d) for d in warehouse.partitions("substitution_graph", "snapshot_date")]
    for start in experiment_starts(spark, warehouse):
        if not any(d <= start for d in have):
            context.log.warning(f"experiment start {start} has no snapshot in force: pricelab build-graph (or the "
                                "build_graph_weekly sensor) adds one dated at its start")
    snapshot = days[-1]  # the metadata describes the run's latest snapshot
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
            "reused_snapshot": reused[snapshot],
            "fdr": config.fdr,  # of this run's builds (a reused snapshot keeps the rate it was built with)
            "snapshots_built": dg.MetadataValue.json([d.isoformat() for d in days if not reused[d]]),
            "snapshots_reused": dg.MetadataValue.json([d.isoformat() for d in days if reused[d]]),
            **summary,
            **{k: v for k, v in power.items() if k not in ("warnings", "table")},
            "power_by_block": dg.MetadataValue.md(power["table"]),
            "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in power["warnings"]) or "none"),
        }
    )
