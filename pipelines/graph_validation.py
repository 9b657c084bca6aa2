"""Judge a substitution graph and its clusters against the simulator's true graph.

For benchmarks and tests only (assets never see the truth). Inputs are small pandas frames:
found edges (src, dst), the true edges (src, dst, cross_elasticity; `world.true_edges`) and
clusters (product_id, cluster_id). Pairs are unordered: (a, b) and (b, a) are the same pair.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def _pair_keys(frame: pd.DataFrame) -> pd.Series:
    src, dst = frame["src"].astype(str).to_numpy(), frame["dst"].astype(str).to_numpy()
    low, high = np.minimum(src, dst), np.maximum(src, dst)
    return pd.Series(low, dtype=object) + "|" + pd.Series(high, dtype=object)


def edge_recovery(edges: pd.DataFrame, true_edges: pd.DataFrame, min_strength: float) -> dict:
    """Precision and recall of found edges against the true graph.

    precision = found edges that are true edges (of any strength) / found edges;
    recall = true edges with cross_elasticity >= min_strength that were found / such true edges.
    Also returns the counts and the recall of every true edge (`recall_all`).
    """
    for name, frame, needed in (("edges", edges, ("src", "dst")), ("true_edges", true_edges, ("src", "dst", "cross_elasticity"))):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ValueError(f"{name}: missing column(s) {missing}")
    found = set(_pair_keys(edges))
    true_keys = _pair_keys(true_edges)
    strong = set(true_keys[true_edges["cross_elasticity"].to_numpy() >= min_strength])
    every_true = set(true_keys)
    true_found = len(found & every_true)
    return {
        "min_strength": float(min_strength),
        "found": len(found),
        "true_found": true_found,
        "precision": true_found / len(found) if found else float("nan"),
        "strong_true": len(strong),
        "strong_found": len(found & strong),
        "recall": len(found & strong) / len(strong) if strong else float("nan"),
        "recall_all": true_found / len(every_true) if every_true else float("nan"),
    }


def weight_kept_inside(clusters: pd.DataFrame, true_edges: pd.DataFrame) -> float:
    """Share of the true cross-elasticity weight whose two ends share a cluster.

    The spillover a cluster-randomised experiment keeps inside its units; a product missing from
    `clusters` counts as a singleton.
    """
    if true_edges.empty:
        return float("nan")
    cluster_of = clusters.drop_duplicates("product_id").set_index("product_id")["cluster_id"]
    src_cluster = cluster_of.reindex(true_edges["src"]).to_numpy()
    dst_cluster = cluster_of.reindex(true_edges["dst"]).to_numpy()
    same = pd.notna(src_cluster) & (src_cluster == dst_cluster)
    weight = true_edges["cross_elasticity"].to_numpy(dtype=float)
    return float(weight[same].sum() / weight.sum())
