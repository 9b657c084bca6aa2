"""Product clusters: substitutes grouped so they are randomised together.

One clusters snapshot per graph snapshot, written once, like the graph itself: the two assets
share the dynamic partitions `snapshot_date` (assets/partitions.py), one key per snapshot.
"""

import base64

import dagster as dg
from pyspark.sql import functions as F

from assets.checks import run_metadata
from assets.kinds import DELTA_TABLE
from assets.partitions import SNAPSHOT_PARTITIONS, snapshot_days
from pipelines import clustering, graph
from pipelines.progress import spark_progress

MAX_CLUSTER_SIZE = 40


class ClusteringConfig(dg.Config):
    """Run-level knob (set it in the launchpad): the largest cluster Leiden may leave. It applies
    to the clusters snapshots this run writes; written snapshots are never rewritten."""

    max_cluster_size: int = MAX_CLUSTER_SIZE


EVERY_PRODUCT_ONE_CLUSTER = "every_product_in_one_cluster"


@dg.asset(
    group_name="graph",
    kinds=DELTA_TABLE,
    partitions_def=SNAPSHOT_PARTITIONS,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["substitution_graph", "catalog"],
    required_resource_keys={"spark", "warehouse"},
    check_specs=[
        dg.AssetCheckSpec(
            EVERY_PRODUCT_ONE_CLUSTER, asset="product_clusters", blocking=True,
            description="every catalogue product has exactly one cluster, of at most the run's max_cluster_size products",
        )
    ],
)
def product_clusters(context: dg.AssetExecutionContext, config: ClusteringConfig) -> dg.MaterializeResult:
    """(product_id, cluster_id) for every product: components, then Leiden inside each; one
    clusters snapshot per partition key, from the graph snapshot of the same key."""
    if config.max_cluster_size < 2:
        raise dg.Failure(f"product_clusters: config max_cluster_size {config.max_cluster_size} must be at least 2")
    days = [d.isoformat() for d in snapshot_days(context, "product_clusters")]
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    graphs = set(warehouse.partitions("substitution_graph", "snapshot_date"))
    missing = [d for d in days if d not in graphs]
    if missing:
        raise dg.Failure(f"product_clusters: no substitution_graph snapshot {', '.join(missing)}: materialise "
                         "substitution_graph for the same partition first (pricelab build-graph builds both)")
    catalog = warehouse.read(spark, "catalog")
    products = catalog.select("product_id")
    reused = {}
    for snapshot in days:
        partition = ("snapshot_date", snapshot)
        reused[snapshot] = warehouse.exists("product_clusters", partition)
        if reused[snapshot]:
            context.log.info(f"clusters for snapshot {snapshot} exist and are never rewritten; reusing them")
            continue
        context.log.info(f"clustering snapshot {snapshot}")
        blocks = warehouse.read(spark, graph.BLOCKS_TABLE, partition).toPandas() if warehouse.exists(graph.BLOCKS_TABLE, partition) else None
        with spark_progress(spark, f"clusters {snapshot}", context.log.info):
            clusters = clustering.cluster_products(
                warehouse.read(spark, "substitution_graph", partition), catalog, max_cluster_size=config.max_cluster_size,
                blocks=blocks, checkpoint_dir=str(warehouse.root / "checkpoints"),
            )
            warehouse.write(clusters, "product_clusters", partition)
    latest = days[-1]  # the metadata and picture describe the run's latest snapshot
    partition = ("snapshot_date", latest)
    edges = warehouse.read(spark, "substitution_graph", partition)
    clusters = warehouse.read(spark, "product_clusters", partition)
    metrics = clustering.cluster_metrics(edges, clusters)
    for line in clustering.design_warnings(metrics):
        context.log.warning(line)
    picture = clustering.largest_clusters_png(edges, clusters)
    picture_path = warehouse.write_file(f"plots/clusters_{latest}.png", picture)
    return dg.MaterializeResult(
        metadata={
            "snapshot_date": latest,
            "reused_snapshot": reused[latest],
            "snapshots_clustered": dg.MetadataValue.json([d for d in days if not reused[d]]),
            "snapshots_reused": dg.MetadataValue.json([d for d in days if reused[d]]),
            "max_cluster_size": config.max_cluster_size,  # of this run's snapshots
            **run_metadata(spark, clusters.count()),
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
            "metrics": dg.MetadataValue.json(metrics),
            "largest_clusters": dg.MetadataValue.md(
                f"![largest clusters](data:image/png;base64,{base64.b64encode(picture).decode()})"
            ),
            "largest_clusters_png": dg.MetadataValue.path(str(picture_path)),
        },
        check_results=[_one_cluster_each(spark, warehouse, products, days, reused, config.max_cluster_size)],
    )


def _one_cluster_each(spark, warehouse, products, days: list[str], reused: dict, max_cluster_size: int) -> dg.AssetCheckResult:
    """Every catalogue product in exactly one cluster, in each of the run's snapshots; the size
    limit only for the snapshots this run clustered (a reused one was built under its own run's
    limit, which this run does not know)."""
    problems = {"products_without_cluster": 0, "products_in_several_clusters": 0, "clusters_over_max_size": 0}
    for snapshot in days:
        clusters = warehouse.read(spark, "product_clusters", ("snapshot_date", snapshot))
        per_product = clusters.groupBy("product_id").agg(F.countDistinct("cluster_id").alias("n"))
        problems["products_without_cluster"] += products.join(clusters, "product_id", "left_anti").count()
        problems["products_in_several_clusters"] += per_product.where("n > 1").count()
        if not reused[snapshot]:
            problems["clusters_over_max_size"] += clusters.groupBy("cluster_id").count().where(F.col("count") > max_cluster_size).count()
    if all(reused.values()):
        problems.pop("clusters_over_max_size")
    return dg.AssetCheckResult(check_name=EVERY_PRODUCT_ONE_CLUSTER, passed=not any(problems.values()), metadata=problems)
