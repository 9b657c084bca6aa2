"""Clusters of the substitution graph: randomise substitutes together.

1. Connected components of the whole graph, on Spark: GraphFrames' `connectedComponents` when its
   JVM jar is on the classpath, otherwise a plain-DataFrame min-label propagation. Both return the
   same partition with the same label (the smallest product_id of the component); which one ran,
   and why, is logged.
2. Inside each component, igraph's Leiden (modularity, edge weights, `resolution`, fixed seed) on
   the executors, one `applyInPandas` group per component.
3. A cluster still larger than `max_cluster_size` is split again: Leiden on its own subgraph at a
   higher resolution (x1.5 per step), its pieces merged back greedily along the heaviest links while
   they fit (so a clique is cut into a few big parts, not shattered); finally, if Leiden will not
   split it, a deterministic balanced cut of its breadth-first order.

Block evidence (`graph.block_evidence`) decides first: a block (subclass) whose pooled test shows
substitution that its edges cannot carry is randomised whole, one cluster per block, split along
catalogue-attribute similarity when it is larger than `max_cluster_size`
(`split_by_attributes`). The edge clustering above runs on the other products only.

`cluster_id` = the smallest product_id in the cluster: stable, deterministic, readable. Products
without any edge (outside whole blocks) are singletons. `reason` says why each cluster exists:
'edges', 'block' (whole block), 'block_split_by_attributes' or 'singleton'.
"""
from __future__ import annotations

import io
import logging
import random
import tempfile
from collections import deque
from contextlib import contextmanager

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.spark import graphframes_missing_reason

logger = logging.getLogger(__name__)

# Components are already small (substitutes within a subclass), and modularity at resolution 1
# splits a sparsely observed substitute group into pairs and triples. Measured on the default
# simulated market (seeds 42, 7, 123; graph from pipelines.graph): resolution 1.0 keeps 0.74-0.78
# of the true cross-elasticity weight inside clusters, 0.5 keeps 0.90-0.92 with ~25% fewer
# clusters (median size 4-5, the simulator's true groups have 3-8 products).
DEFAULT_RESOLUTION = 0.5
RESOLUTION_STEP = 1.5  # factor applied to the resolution each time an oversized cluster is split
MAX_SPLIT_ATTEMPTS = 12  # resolution * 1.5**12 ~ 130x before the balanced cut takes over
MAX_PROPAGATION_ROUNDS = 10_000

CLUSTER_SCHEMA = T.StructType(
    [T.StructField("product_id", T.StringType()), T.StructField("cluster_id", T.StringType())]
)
CLUSTER_REASONS = ("edges", "block", "block_split_by_attributes", "singleton")
CATALOG_KEYS = ("product_id", "category", "subclass")


# ----------------------------------------------------------------------------- components


@contextmanager
def _adaptive_execution_off(spark):
    """Turn adaptive query execution off for an iterative graph step, then restore the setting.

    GraphFrames asks for it; the fallback's many small rounds also run faster without AQE
    re-planning every stage.
    """
    previous = spark.conf.get("spark.sql.adaptive.enabled", None)
    spark.conf.set("spark.sql.adaptive.enabled", "false")
    try:
        yield
    finally:
        if previous is None:
            spark.conf.unset("spark.sql.adaptive.enabled")
        else:
            spark.conf.set("spark.sql.adaptive.enabled", previous)


def _undirected_edges(edges: DataFrame, vertices: DataFrame) -> DataFrame:
    """src < dst, no self-loops, both ends among the vertices, one row per pair (max weight)."""
    has_weight = "weight" in edges.columns
    ids = vertices.select("product_id")
    canonical = edges.where(
        F.col("src").isNotNull() & F.col("dst").isNotNull() & (F.col("src") != F.col("dst"))
    ).select(
        F.least("src", "dst").alias("src"),
        F.greatest("src", "dst").alias("dst"),
        (F.col("weight").cast("double") if has_weight else F.lit(1.0)).alias("weight"),
    )
    canonical = canonical.join(ids.withColumnRenamed("product_id", "src"), "src", "left_semi").join(
        ids.withColumnRenamed("product_id", "dst"), "dst", "left_semi"
    )
    return canonical.groupBy("src", "dst").agg(F.max("weight").alias("weight"))


def _components_by_propagation(edges: DataFrame, vertices: DataFrame) -> DataFrame:
    """Min-label propagation with hooking and pointer jumping, on plain Spark DataFrames.

    Every vertex x holds a label L(x), the id of a vertex of its own component (initially x).
    Each round, for every edge (u, x) the smaller label L(u) is offered both to x (plain
    min-label propagation) and to the vertex L(x) names (hooking x's whole label tree onto u's);
    and every vertex jumps to the label of its label. Labels only decrease and always name a
    vertex of the same component, so the fixed point is the smallest id of each component; the
    hooking and jumping make long chains converge in a few rounds instead of one per hop.
    Lineage is cut every round with localCheckpoint; stops when no label changes.
    """
    both_ways = edges.select("src", "dst").union(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst")))
    both_ways = both_ways.localCheckpoint(eager=True)
    labels = vertices.select("product_id", F.col("product_id").alias("label")).localCheckpoint(eager=True)
    for _ in range(MAX_PROPAGATION_ROUNDS):
        # Every offer is (vertex, candidate label); one aggregation takes the smallest.
        labelled = both_ways.join(
            labels.select(F.col("product_id").alias("src"), F.col("label").alias("offer")), "src"
        ).join(labels.select(F.col("product_id").alias("dst"), F.col("label").alias("dst_label")), "dst")
        to_neighbour = labelled.select(F.col("dst").alias("product_id"), "offer", F.lit(False).alias("own"))
        to_label_root = labelled.select(F.col("dst_label").alias("product_id"), "offer", F.lit(False).alias("own"))
        jump = (
            labels.alias("v")
            .join(labels.alias("l"), F.col("v.label") == F.col("l.product_id"))
            .select(F.col("v.product_id").alias("product_id"), F.col("l.label").alias("offer"), F.lit(False).alias("own"))
        )
        own = labels.select("product_id", F.col("label").alias("offer"), F.lit(True).alias("own"))
        updated = (
            own.unionByName(to_neighbour)
            .unionByName(to_label_root)
            .unionByName(jump)
            .groupBy("product_id")
            .agg(F.min("offer").alias("label"), F.max(F.when(F.col("own"), F.col("offer"))).alias("label_before"))
            .localCheckpoint(eager=False)  # materialised by the count below: one job per round
        )
        n_changed = updated.where(F.col("label") < F.col("label_before")).count()
        labels = updated.select("product_id", "label")
        if n_changed == 0:
            return labels.withColumnRenamed("label", "component")
    raise RuntimeError(f"connected components did not converge in {MAX_PROPAGATION_ROUNDS} rounds")


def _components_by_graphframes(edges: DataFrame, vertices: DataFrame, checkpoint_dir: str | None = None) -> DataFrame:
    """GraphFrames' connectedComponents, with the settings its documentation asks for.

    A checkpoint directory on the SparkContext (`checkpoint_dir`, e.g. under the data dir; else the
    one already set; else a temporary one) and adaptive query execution off for the duration of
    the step, restored afterwards.
    """
    from graphframes import GraphFrame

    spark = edges.sparkSession
    context = spark.sparkContext
    if checkpoint_dir is not None:
        context.setCheckpointDir(str(checkpoint_dir))
    elif context.getCheckpointDir() is None:
        context.setCheckpointDir(tempfile.mkdtemp(prefix="pricelab-graphframes-"))
    with _adaptive_execution_off(spark):
        graph = GraphFrame(vertices.select(F.col("product_id").alias("id")).distinct(), edges.select("src", "dst"))
        found = graph.connectedComponents().select(F.col("id").alias("product_id"), "component")
        found = found.localCheckpoint(eager=True)
    # Relabel GraphFrames' numeric component ids as the smallest product_id, like the fallback.
    smallest = found.groupBy("component").agg(F.min("product_id").alias("label"))
    return found.join(smallest, "component").select("product_id", F.col("label").alias("component"))


def connected_components(
    edges: DataFrame, vertices: DataFrame, use_graphframes: bool | None = None, checkpoint_dir: str | None = None
) -> DataFrame:
    """(product_id, component) for every vertex; component = the smallest product_id in it.

    edges: src, dst (direction ignored; edges touching a product outside `vertices` are ignored).
    vertices: product_id. use_graphframes: None = use GraphFrames when its jar is on the
    classpath, True = require it (error if absent), False = plain Spark DataFrames.
    checkpoint_dir: GraphFrames' checkpoint directory (see `_components_by_graphframes`).
    Which implementation ran, and why, is logged (logger `pipelines.clustering`, INFO).
    """
    ids = vertices.select("product_id").where(F.col("product_id").isNotNull()).distinct()
    return _components(_undirected_edges(edges, ids), ids, use_graphframes, checkpoint_dir)


GRAPHFRAMES_IMPLEMENTATION = "GraphFrames connectedComponents"
FALLBACK_IMPLEMENTATION = "plain Spark min-label propagation (fallback)"


def _choose_components_implementation(spark, use_graphframes: bool | None) -> bool:
    """True for GraphFrames: when asked, or (None) when its jar is on the classpath. Logs the choice."""
    missing = graphframes_missing_reason(spark)
    if use_graphframes and missing:
        raise RuntimeError(
            f"use_graphframes=True but {missing}; add it with spark.jars (`make setup` fetches it into "
            "./jars) or spark.jars.packages, or pass use_graphframes=None to fall back to the plain "
            "Spark implementation"
        )
    if use_graphframes is None:
        chosen = missing is None
        why = "the GraphFrames JVM jar is on the Spark classpath" if chosen else missing
    else:
        chosen, why = use_graphframes, f"use_graphframes={use_graphframes} was asked for"
    logger.info(
        "connected components: %s, because %s", GRAPHFRAMES_IMPLEMENTATION if chosen else FALLBACK_IMPLEMENTATION, why
    )
    return chosen


def _components(
    undirected: DataFrame, ids: DataFrame, use_graphframes: bool | None, checkpoint_dir: str | None = None
) -> DataFrame:
    """connected_components on already canonical edges and distinct vertex ids."""
    spark = undirected.sparkSession
    if _choose_components_implementation(spark, use_graphframes):
        found = _components_by_graphframes(undirected, ids, checkpoint_dir)
        # Some GraphFrames releases drop isolated vertices: every vertex is its own component then.
        return ids.join(found, "product_id", "left").select(
            "product_id", F.coalesce("component", "product_id").alias("component")
        )
    with _adaptive_execution_off(spark):
        return _components_by_propagation(undirected, ids)


# ----------------------------------------------------------------------------- Leiden


def _leiden(graph, resolution: float, seed: int) -> list[int]:
    """Leiden memberships (modularity, weights), deterministic: igraph draws from Python's random."""
    random.seed(seed)
    return graph.community_leiden(
        objective_function="modularity", weights="weight", resolution=resolution, n_iterations=-1
    ).membership


def _merge_small_pieces(graph, membership: np.ndarray, max_size: int) -> np.ndarray:
    """Greedily re-join pieces along their heaviest link while the union fits in max_size.

    Leiden at a raised resolution may shatter a dense region (a clique falls apart into
    singletons); this puts the pieces back into as few parts as fit. Ties: smallest piece index.
    """
    n_pieces = membership.max() + 1
    sizes = np.bincount(membership, minlength=n_pieces)
    edge_list = np.array(graph.get_edgelist(), dtype=np.int64).reshape(-1, 2)
    weights = np.asarray(graph.es["weight"], dtype=float)
    link = np.zeros((n_pieces, n_pieces))
    np.add.at(link, (membership[edge_list[:, 0]], membership[edge_list[:, 1]]), weights)
    link = link + link.T
    np.fill_diagonal(link, 0.0)
    alive = np.ones(n_pieces, dtype=bool)
    while True:
        fits = (sizes[:, None] + sizes[None, :] <= max_size) & alive[:, None] & alive[None, :] & (link > 0)
        if not fits.any():
            break
        candidate = np.where(fits, link, -np.inf)
        a, b = np.unravel_index(np.argmax(candidate), candidate.shape)  # first maximum: deterministic
        a, b = min(a, b), max(a, b)
        link[a] += link[b]
        link[:, a] += link[:, b]
        link[a, a] = 0.0
        link[b] = 0.0
        link[:, b] = 0.0
        sizes[a] += sizes[b]
        alive[b] = False
        membership = np.where(membership == b, a, membership)
    return membership


def _balanced_cut(graph, max_size: int) -> list[np.ndarray]:
    """Deterministic cut into ceil(n / max_size) near-equal parts of a breadth-first order."""
    n = graph.vcount()
    names = np.asarray(graph.vs["name"])
    neighbours = graph.get_adjlist()
    seen = np.zeros(n, dtype=bool)
    order: list[int] = []
    for start in np.argsort(names, kind="stable"):
        if seen[start]:
            continue
        seen[start] = True
        queue = deque([start])
        while queue:
            v = queue.popleft()
            order.append(v)
            for w in sorted(neighbours[v], key=lambda u: names[u]):
                if not seen[w]:
                    seen[w] = True
                    queue.append(w)
    n_parts = -(-n // max_size)
    return [np.asarray(part) for part in np.array_split(np.asarray(order), n_parts)]


def _split_oversized(graph, max_size: int, resolution: float, seed: int) -> list[np.ndarray]:
    """Vertex index arrays of parts of `graph`, each of at most max_size vertices."""
    if graph.vcount() <= max_size:
        return [np.arange(graph.vcount())]
    for attempt in range(1, MAX_SPLIT_ATTEMPTS + 1):
        raised = resolution * RESOLUTION_STEP**attempt
        membership = np.asarray(_leiden(graph, raised, seed))
        if membership.max() > 0:
            membership = _merge_small_pieces(graph, membership, max_size)
            if len(np.unique(membership)) > 1:
                parts: list[np.ndarray] = []
                for piece in np.unique(membership):
                    members = np.flatnonzero(membership == piece)
                    sub = graph.subgraph(members)
                    parts.extend(members[p] for p in _split_oversized(sub, max_size, raised, seed))
                return parts
    return _balanced_cut(graph, max_size)


def cluster_component(component_edges: pd.DataFrame, max_cluster_size: int, resolution: float, seed: int) -> pd.DataFrame:
    """(product_id, cluster_id) for one connected component given its edges (src, dst, weight)."""
    import igraph

    names = np.unique(np.concatenate([component_edges["src"].to_numpy(), component_edges["dst"].to_numpy()]))
    index = pd.Index(names)
    ordered = component_edges.sort_values(["src", "dst"])
    graph = igraph.Graph(
        n=len(names),
        edges=np.column_stack([index.get_indexer(ordered["src"]), index.get_indexer(ordered["dst"])]).tolist(),
        directed=False,
    )
    graph.vs["name"] = list(names)
    graph.es["weight"] = ordered["weight"].to_numpy(dtype=float).tolist()
    membership = np.asarray(_leiden(graph, resolution, seed))
    cluster_of = np.empty(len(names), dtype=object)
    for piece in np.unique(membership):
        members = np.flatnonzero(membership == piece)
        for part in _split_oversized(graph.subgraph(members), max_cluster_size, resolution, seed):
            chosen = members[part]
            cluster_of[chosen] = names[chosen].min()
    return pd.DataFrame({"product_id": names, "cluster_id": cluster_of})


def cluster_products(
    edges: DataFrame,
    products: DataFrame,
    max_cluster_size: int = 40,
    resolution: float = DEFAULT_RESOLUTION,
    seed: int = 0,
    use_graphframes: bool | None = None,
    blocks: pd.DataFrame | None = None,
    checkpoint_dir: str | None = None,
) -> DataFrame:
    """(product_id, cluster_id, reason) for every product: whole blocks, then edge clusters.

    edges: src, dst, weight (> 0; direction ignored, duplicates keep the larger weight).
    products: product_id (e.g. the catalogue); with `blocks`, also subclass and the attribute
    columns. blocks: `graph.block_evidence` rows (block, randomise_whole); the products of a
    block to randomise whole form its cluster(s) and their edges are left out of the rest.
    Leiden runs per component on the executors. `resolution`: Leiden's modularity resolution
    inside each component (see DEFAULT_RESOLUTION); higher gives more, smaller clusters.
    `use_graphframes`, `checkpoint_dir`: how connected components run (see `connected_components`).
    """
    if max_cluster_size < 1:
        raise ValueError(f"max_cluster_size must be >= 1, got {max_cluster_size}")
    if resolution <= 0:
        raise ValueError(f"resolution must be > 0, got {resolution}")
    for column in ("src", "dst", "weight"):
        if column not in edges.columns:
            raise ValueError(f"edges: missing column {column!r}")
    if "product_id" not in products.columns:
        raise ValueError("products: missing column 'product_id'")
    bad = edges.where(F.col("weight").isNull() | F.isnan("weight") | (F.col("weight") <= 0)).limit(1).collect()
    if bad:
        row = bad[0]
        raise ValueError(f"edges: weight must be > 0, got {row['weight']} for src={row['src']}, dst={row['dst']}")

    spark = products.sparkSession
    ids = products.select("product_id").where(F.col("product_id").isNotNull()).distinct()
    whole = _whole_block_clusters(products, blocks, max_cluster_size)
    if whole is not None:
        whole_sdf = spark.createDataFrame(whole, "product_id string, cluster_id string, reason string")
        ids = ids.join(whole_sdf.select("product_id"), "product_id", "left_anti")
    undirected = _undirected_edges(edges, ids).localCheckpoint(eager=True)
    components = _components(undirected, ids, use_graphframes, checkpoint_dir)
    component_edges = undirected.join(components.withColumnRenamed("product_id", "src"), "src")

    def per_component(frame: pd.DataFrame) -> pd.DataFrame:
        return cluster_component(frame, max_cluster_size, resolution, seed)

    clustered = component_edges.groupBy("component").applyInPandas(per_component, CLUSTER_SCHEMA)
    by_edges = ids.join(clustered, "product_id", "left").select(
        "product_id",
        F.coalesce("cluster_id", "product_id").alias("cluster_id"),
        F.when(F.col("cluster_id").isNull(), F.lit("singleton")).otherwise(F.lit("edges")).alias("reason"),
    )
    # Leiden pieces of one product (possible after a split) are singletons too
    sizes = by_edges.groupBy("cluster_id").agg(F.count(F.lit(1)).alias("size"))
    by_edges = by_edges.join(sizes, "cluster_id").select(
        "product_id", "cluster_id", F.when(F.col("size") == 1, F.lit("singleton")).otherwise(F.col("reason")).alias("reason")
    )
    return by_edges if whole is None else by_edges.unionByName(whole_sdf)


def _whole_block_clusters(products: DataFrame, blocks: pd.DataFrame | None, max_cluster_size: int) -> pd.DataFrame | None:
    """Clusters of the blocks to randomise whole (pandas), or None when there are none."""
    if blocks is None or blocks.empty or not blocks["randomise_whole"].any():
        return None
    if "subclass" not in products.columns:
        raise ValueError("products: blocks to randomise whole need the catalogue's 'subclass' column")
    chosen = sorted(blocks.loc[blocks["randomise_whole"].astype(bool), "block"].astype(str))
    members = products.where(F.col("subclass").isin(chosen)).toPandas()
    parts = []
    for block, frame in members.sort_values("product_id").groupby("subclass", sort=True):
        labels = split_by_attributes(frame, max_cluster_size)
        reason = "block" if labels.max() == 0 else "block_split_by_attributes"
        ids = frame["product_id"].astype(str).to_numpy()
        first = pd.Series(ids).groupby(labels).transform("min").to_numpy()
        parts.append(pd.DataFrame({"product_id": ids, "cluster_id": first, "reason": reason}))
    return pd.concat(parts, ignore_index=True)


def split_by_attributes(members: pd.DataFrame, max_cluster_size: int) -> np.ndarray:
    """Part labels 0..k-1 cutting a block into k = ceil(n / max) near-equal parts of similar products.

    Features: every catalogue column but the keys (numeric standardised, categorical one-hot, by
    scikit-learn's ColumnTransformer). Products are ordered by the leaves of a Ward hierarchical
    clustering of those features (scipy), so neighbours in the order are alike, and the order is
    cut into contiguous parts: every part fits, and similar products stay together. Deterministic
    for a given member order (sort by product_id first).
    """
    n = len(members)
    n_parts = -(-n // max_cluster_size)
    if n_parts <= 1:
        return np.zeros(n, dtype=np.int64)
    from scipy.cluster.hierarchy import leaves_list, linkage
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    features = members.drop(columns=[c for c in CATALOG_KEYS if c in members.columns])
    numeric = [c for c in features.columns if pd.api.types.is_numeric_dtype(features[c]) or pd.api.types.is_bool_dtype(features[c])]
    categorical = [c for c in features.columns if c not in numeric]
    order = np.arange(n)
    if numeric or categorical:
        encoder = ColumnTransformer(
            [("numeric", StandardScaler(), numeric), ("categorical", OneHotEncoder(handle_unknown="ignore"), categorical)],
            sparse_threshold=0.0,
        )
        matrix = encoder.fit_transform(features.assign(**{c: features[c].astype(float) for c in numeric}).fillna(0))
        if matrix.shape[1] and n > 2:
            order = leaves_list(linkage(np.asarray(matrix, dtype=float), method="ward"))
    labels = np.empty(n, dtype=np.int64)
    for part, chunk in enumerate(np.array_split(order, n_parts)):
        labels[chunk] = part
    return labels


# ----------------------------------------------------------------------------- reporting


def cluster_metrics(edges: DataFrame, clusters: DataFrame) -> dict:
    """Cluster count, singletons, size distribution and the share of edge weight cut.

    cut share = weight of edges whose ends lie in different clusters / total edge weight: the
    spillover the clustering leaves between randomisation units (0 when there are no edges).
    """
    sizes = clusters.groupBy("cluster_id").agg(F.count(F.lit(1)).alias("size"))
    size_row = sizes.agg(
        F.count(F.lit(1)).alias("clusters"),
        F.sum(F.when(F.col("size") == 1, 1).otherwise(0)).alias("singletons"),
        F.min("size").alias("min"),
        F.median("size").alias("median"),
        F.percentile("size", 0.9).alias("p90"),
        F.max("size").alias("max"),
    ).first()
    cluster_of = clusters.select("product_id", "cluster_id")
    labelled = (
        edges.select("src", "dst", F.col("weight").cast("double").alias("weight"))
        .join(cluster_of.withColumnRenamed("product_id", "src").withColumnRenamed("cluster_id", "c_src"), "src")
        .join(cluster_of.withColumnRenamed("product_id", "dst").withColumnRenamed("cluster_id", "c_dst"), "dst")
    )
    weight_row = labelled.agg(
        F.sum("weight").alias("total"),
        F.sum(F.when(F.col("c_src") != F.col("c_dst"), F.col("weight")).otherwise(0.0)).alias("cut"),
        F.sum(F.when(F.col("c_src") != F.col("c_dst"), 1).otherwise(0)).alias("cut_edges"),
    ).first()
    total = float(weight_row["total"] or 0.0)
    cut = float(weight_row["cut"] or 0.0)
    reasons = {}
    if "reason" in clusters.columns:
        reasons = {
            f"products_by_reason_{row['reason']}": int(row["count"])
            for row in clusters.groupBy("reason").count().collect()
        }

    def number(value):
        return None if value is None else float(value)

    return {
        "clusters": int(size_row["clusters"]),
        "singletons": int(size_row["singletons"] or 0),
        "size_min": number(size_row["min"]),
        "size_median": number(size_row["median"]),
        "size_p90": number(size_row["p90"]),
        "size_max": number(size_row["max"]),
        "edges_cut": int(weight_row["cut_edges"] or 0),
        "cut_weight_share": cut / total if total > 0 else 0.0,
        "products": int(clusters.count()),
        **reasons,
    }


SINGLETON_WARNING_SHARE = 0.9


def design_warnings(metrics: dict) -> list[str]:
    """Say so when cluster randomisation is (close to) product randomisation."""
    products = metrics.get("products") or 0
    if not products:
        return []
    share = metrics["singletons"] / products
    if share >= SINGLETON_WARNING_SHARE:
        return [
            f"{share:.0%} of products are singleton clusters: 'unit: cluster' is close to product randomisation "
            "here; see the substitution_graph metadata for what the graph could detect"
        ]
    return []


def largest_clusters_png(edges: DataFrame, clusters: DataFrame, k: int = 6) -> bytes:
    """PNG of the k largest clusters' subgraphs (nodes coloured by cluster; cut edges dashed)."""
    import igraph
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    largest = (
        clusters.groupBy("cluster_id")
        .agg(F.count(F.lit(1)).alias("size"))
        .orderBy(F.desc("size"), "cluster_id")
        .limit(k)
    )
    members = clusters.join(largest.select("cluster_id"), "cluster_id").toPandas().sort_values("product_id")
    ids = members["product_id"].tolist()
    member_ids = clusters.sparkSession.createDataFrame(members[["product_id"]])
    shown = (
        edges.select("src", "dst", "weight")
        .join(member_ids.withColumnRenamed("product_id", "src"), "src", "left_semi")
        .join(member_ids.withColumnRenamed("product_id", "dst"), "dst", "left_semi")
        .toPandas()
        .sort_values(["src", "dst"])
    )

    figure = Figure(figsize=(7, 6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.set_axis_off()
    if not ids:
        axes.set_title("no clusters")
    else:
        index = {pid: i for i, pid in enumerate(ids)}
        cluster_names = sorted(members["cluster_id"].unique())
        colour_of = {c: i for i, c in enumerate(cluster_names)}
        cluster_by_id = dict(zip(members["product_id"], members["cluster_id"]))
        # Lay out on the edges inside clusters only, so each cluster is drawn as its own group.
        inside = [
            (index[a], index[b]) for a, b in zip(shown["src"], shown["dst"]) if cluster_by_id[a] == cluster_by_id[b]
        ]
        random.seed(0)  # the layout draws from Python's random through igraph
        layout = np.asarray(igraph.Graph(n=len(ids), edges=inside).layout_fruchterman_reingold().coords)
        colours = colormaps["tab10"]
        max_weight = float(shown["weight"].max()) if len(shown) else 1.0
        for a, b, w in zip(shown["src"], shown["dst"], shown["weight"]):
            same = cluster_by_id[a] == cluster_by_id[b]
            (x0, y0), (x1, y1) = layout[index[a]], layout[index[b]]
            axes.plot(
                [x0, x1],
                [y0, y1],
                color="0.35" if same else "#c0392b",
                linestyle="-" if same else "--",
                linewidth=(0.5 + 2.0 * w / max_weight) if same else 0.5,
                alpha=0.7 if same else 0.25,
                zorder=1,
            )
        node_colours = [colours(colour_of[cluster_by_id[p]] % 10) for p in ids]
        axes.scatter(layout[:, 0], layout[:, 1], c=node_colours, s=40, edgecolors="black", linewidths=0.4, zorder=2)
        for name in cluster_names:
            axes.scatter([], [], color=colours(colour_of[name] % 10), label=f"{name} ({(members.cluster_id == name).sum()})")
        axes.legend(loc="best", fontsize=7, title="cluster (size)", title_fontsize=7)
        axes.set_title(f"The {len(cluster_names)} largest clusters (dashed: cut edges)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
