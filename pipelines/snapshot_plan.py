"""Which graph and clusters snapshots a build needs, worked out before the build, without Spark.

A build writes dated snapshots (`substitution_graph/snapshot_date=D/`, `product_clusters/...`),
each one partition key of the Dagster assets. Whoever launches a build (the CLI, the weekly
sensor, the demo) asks `plan_snapshots` for the dates first, so it can register them as
partition keys before the run starts:

- the default snapshot: the day after the last complete sales day (`contract.last_complete_day`,
  the rule the Spark side uses too), or the date the user gave;
- a snapshot at every accepted experiment start that has no snapshot in force
  (`graph.snapshot_dates_needed`);
- every graph snapshot that still has no clusters (a build stopped between the two).

The inputs are read with the pandas rules of `pipelines.validation` (the rules of the Spark
loader, the same accepted experiments as the `experiments` asset) and the warehouse's snapshots
from the Delta log by delta-rs, so no Spark job runs for a local warehouse. Existing snapshots are
reused by the build, never rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pandas as pd

from pipelines.contract import last_complete_day
from pipelines.graph import snapshot_dates_needed
from pipelines.storage import Warehouse
from pipelines.validation import validate_inputs

GRAPH_TABLE, CLUSTERS_TABLE, SNAPSHOT_COLUMN = "substitution_graph", "product_clusters", "snapshot_date"


class SnapshotPlanError(ValueError):
    """No snapshot can be planned (e.g. no valid sales): one line for the user."""


@dataclass(frozen=True)
class SnapshotPlan:
    default: date  # the build's main snapshot (the user's date, or the day after the last complete sales day)
    dates: list[date]  # every snapshot the build materialises, sorted (existing ones are reused)
    for_experiment_starts: list[date]  # among them: added so an experiment start has a snapshot in force
    without_clusters: list[date]  # among them: graph snapshots written earlier that have no clusters yet

    @property
    def keys(self) -> list[str]:
        return [d.isoformat() for d in self.dates]


def default_snapshot(sales: pd.DataFrame | None) -> date:
    """The day after the last complete day of `sales` (pandas: product_id, date)."""
    per_day = (pd.DataFrame({"date": [], "n": []}) if sales is None or sales.empty
               else sales.groupby("date")["product_id"].nunique().rename("n").reset_index())
    last = last_complete_day(per_day)
    if last is None:
        raise SnapshotPlanError("substitution_graph: the sales table is empty, so there is no history to build a graph from")
    return last + timedelta(days=1)


def existing_snapshots(warehouse: Warehouse, table: str) -> list[date]:
    return [date.fromisoformat(d) for d in warehouse.partitions(table, SNAPSHOT_COLUMN)]


def plan_snapshots(data_dir: str | Path, snapshot_date: date | None = None, today: date | None = None,
                   tables_url: str | None = None) -> SnapshotPlan:
    """The snapshots a graph build of `data_dir` materialises (see the module's docstring)."""
    checked = validate_inputs(data_dir, today=today, tables_url=tables_url)
    if snapshot_date is None:
        sales = checked.inputs["sales"]
        if sales.error and sales.good is None:
            raise SnapshotPlanError(f"substitution_graph: no snapshot date: the sales input is unusable ({sales.error})")
        snapshot_date = default_snapshot(sales.good)
    warehouse = Warehouse(data_dir, tables_url=tables_url)
    graphs = existing_snapshots(warehouse, GRAPH_TABLE)
    clustered = set(existing_snapshots(warehouse, CLUSTERS_TABLE))
    needed = snapshot_dates_needed(snapshot_date, graphs, [spec.start for spec in checked.specs])
    without_clusters = sorted(d for d in graphs if d not in clustered)
    return SnapshotPlan(
        default=snapshot_date,
        dates=sorted({snapshot_date, *needed, *without_clusters}),
        for_experiment_starts=[d for d in needed if d != snapshot_date],
        without_clusters=without_clusters,
    )
