"""Product clusters: substitutes grouped so they are randomised together.

One clusters snapshot per graph snapshot, written once, like the graph itself.
"""

import base64

import dagster as dg
from pyspark.sql import functions as F

from assets.checks import run_metadata
from assets.kinds import DELTA_TABLE
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
    """(product_id, cluster_id) for every product: components, then Leiden inside each."""
    if config.max_cluster_size < 2:
        raise dg.Failure(f"product_clusters: config max_cluster_size {config.max_cluster_size} must be at least 2")
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    snapshots = warehouse.partitions("substitution_graph", "snapshot_date")
    if not snapshots:
        raise dg.Failure("product_clusters: no substitution_graph snapshot has been built yet")
    catalog = warehouse.read(spark, "catalog")
    products = catalog.select("product_id")
    # every graph snapshot gets its clusters (a build may add snapshots at experiment starts)
    reused = True
    for snapshot in snapshots:
        partition = ("snapshot_date", snapshot)
        if warehouse.exists("product_clusters", partition):
            if snapshot == snapshots[-1]:
                context.log.info(f"clusters for snapshot {snapshot} exist and are never rewritten; reusing them")
            continue
        reused = reused and snapshot != snapshots[-1]
        context.log.info(f"clustering snapshot {snapshot}")
        blocks = warehouse.read(spark, graph.BLOCKS_TABLE, partition).toPandas() if warehouse.exists(graph.BLOCKS_TABLE, partition) else None
        with spark_progress(spark, f"clusters {snapshot}", context.log.info):
            clusters = clustering.cluster_products(
                warehouse.read(spark, "substitution_graph", partition), catalog, max_cluster_size=config.max_cluster_size,
                blocks=blocks, checkpoint_dir=str(warehouse.root / "checkpoints"),
            )
            warehouse.write(clusters, "product_clusters", partition)
    partition = ("snapshot_date", snapshots[-1])
    edges = warehouse.read(spark, "substitution_graph", partition)
    clusters = warehouse.read(spark, "product_clusters", partition)
    metrics = clustering.cluster_metrics(edges, clusters)
    for line in clustering.design_warnings(metrics):
        context.log.warning(line)
    picture = clustering.largest_clusters_png(edges, clusters)
    picture_path = warehouse.write_file(f"plots/clusters_{snapshots[-1]}.png", picture)

    per_product = clusters.groupBy("product_id").agg(F.countDistinct("cluster_id").alias("n"))
    problems = {
        "products_without_cluster": products.join(clusters, "product_id", "left_anti").count(),
        "products_in_several_clusters": per_product.where("n > 1").count(),
    }
    if not reused:  # a reused snapshot was built under its own run's limit, which this run does not know
        problems["clusters_over_max_size"] = clusters.groupBy("cluster_id").count().where(F.col("count") > config.max_cluster_size).count()
    return dg.MaterializeResult(
        metadata={
            "snapshot_date": snapshots[-1],
            "reused_snapshot": reused,
            "max_cluster_size": config.max_cluster_size,  # of this run's snapshots
            **run_metadata(spark, clusters.count()),
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
            "metrics": dg.MetadataValue.json(metrics),
            "largest_clusters": dg.MetadataValue.md(
                f"![largest clusters](data:image/png;base64,{base64.b64encode(picture).decode()})"
            ),
            "largest_clusters_png": dg.MetadataValue.path(str(picture_path)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=EVERY_PRODUCT_ONE_CLUSTER, passed=not any(problems.values()), metadata=problems
            )
        ],
    )
