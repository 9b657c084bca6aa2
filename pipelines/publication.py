"""Publishing assignments: the rules that keep what the price engine applied unchanged.

- An experiment's enrolment (products, units, strata) is written at its first publication and is
  frozen once any of its rows is published; before that it is recomputed, so an edit of the file
  or catalogue still applies (e.g. after a killed first publish).
- A cluster-unit experiment uses the clusters snapshot in force at its start: the latest one dated
  on or before it.
- A published day never changes: recomputing it must give the same rows, and a run that would
  alter one is refused before anything is written.

Plain functions on the warehouse (`pipelines.storage.Warehouse`) and Spark; the Dagster asset
(`assets/assignments.py`) calls `plan_days` and `publish_new_days`, writes its metadata and checks.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines import assignment, experiments, quality
from pipelines.storage import WriteConflictError

PANDAS_CHECK_ROWS = 2_000_000  # up to this many computed rows are checked on pandas (a day of a large catalogue)


class PublicationRefused(Exception):
    """Nothing (more) is published; `details` says what, for the run's metadata."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def snapshot_in_force(snapshots: list[str], start: dt.date) -> str | None:
    """The latest snapshot (ISO date) dated on or before `start`, or None."""
    eligible = sorted(s for s in snapshots if dt.date.fromisoformat(s) <= start)
    return eligible[-1] if eligible else None


def changed_days(new: DataFrame, published: DataFrame) -> list[dict]:
    """Days whose recomputed rows differ from the published ones (rows added / removed)."""
    columns = list(assignment.ASSIGNMENT_COLUMNS)
    added = new.select(columns).exceptAll(published.select(columns)).groupBy("date").agg(F.count("*").alias("added"))
    removed = published.select(columns).exceptAll(new.select(columns)).groupBy("date").agg(F.count("*").alias("removed"))
    diff = added.join(removed, "date", "full").fillna(0).orderBy("date").collect()
    return [{"date": str(r["date"]), "rows_added": int(r["added"]), "rows_removed": int(r["removed"])} for r in diff]


def published_rows_exist(spark, warehouse, spec) -> bool:
    """True when some published day already holds a row of `spec` (its enrolment is then frozen)."""
    if not warehouse.partitions("daily_assignments", "date"):
        return False
    rows = warehouse.read(spark, "daily_assignments").where(
        F.col("date").between(F.lit(spec.start), F.lit(spec.end)) & (F.col("experiment") == spec.name)
    )
    return bool(rows.limit(1).count())


@dataclass
class Enrolment:
    """One experiment's enrolment for this run: its units (None: not assignable, `not_published`
    says why), whether it was frozen or written now, and what the run log should say."""

    units: DataFrame | None
    frozen: bool = False
    written: bool = False
    not_published: str | None = None
    messages: list[tuple[str, str]] = field(default_factory=list)  # (level, text)


def enrol(spark, warehouse, spec, catalog: DataFrame, snapshots: list[str], registry: dict) -> Enrolment:
    """The experiment's enrolment: read back when frozen, else computed and written (with the
    registry row naming its file). Raises `PublicationRefused` when the name belongs to another file."""
    partition = ("experiment", spec.name)
    enrolled = registry.get(spec.name)
    if enrolled is not None and enrolled["file"] != Path(spec.source).name:
        raise PublicationRefused(
            f"experiment '{spec.name}' comes from {Path(spec.source).name} but its enrolment belongs to "
            f"{enrolled['file']}: a running name stays with its file; nothing published"
        )
    messages = []
    if warehouse.exists("enrolments", partition):
        if published_rows_exist(spark, warehouse, spec):
            if enrolled is not None and enrolled["fingerprint"] != experiments.spec_fingerprint(spec):
                messages.append(("warning", f"experiment '{spec.name}' ({spec.source}) differs from the spec it was enrolled "
                                            "with; its enrolment (products, units) stays frozen because days with its rows are published"))
            if enrolled is None:  # enrolled before the registry existed: its current file owns the name from now on
                warehouse.write(experiments.registry_frame(spec), experiments.REGISTRY_TABLE, partition)
            units = warehouse.read(spark, "enrolments", partition).drop("experiment")
            return Enrolment(units, frozen=True, messages=messages)
        messages.append(("info", f"experiment '{spec.name}': enrolment recomputed (no row of it is published yet, so the "
                                 "current file and catalogue apply)"))
    clusters = None
    if spec.unit == "cluster":
        snapshot = snapshot_in_force(snapshots, spec.start)
        if snapshot is None:
            why = f"no product_clusters snapshot dated on or before its start {spec.start}"
            return Enrolment(None, not_published=why, messages=[*messages, ("error", f"experiment '{spec.name}' not assigned: {why}")])
        clusters = warehouse.read(spark, "product_clusters", ("snapshot_date", snapshot)).drop("snapshot_date")
    warehouse.write(assignment.enrolment_units(spec, catalog, clusters), "enrolments", partition)
    warehouse.write(experiments.registry_frame(spec), experiments.REGISTRY_TABLE, partition)
    return Enrolment(warehouse.read(spark, "enrolments", partition).drop("experiment"), written=True, messages=messages)


@dataclass
class DaysPlan:
    """The computed rows of a run's days, validated, with the enrolments they came from."""

    days: list[dt.date]
    runnable: list  # ExperimentSpec
    enrolments: dict[str, Enrolment]
    rows: DataFrame  # cached; `release()` when done
    outcome: quality.QualityOutcome
    n_split: int
    split_examples: list

    def release(self) -> None:
        self.rows.unpersist()


def plan_days(spark, warehouse, days: list[dt.date], log=print) -> DaysPlan:
    """Enrol the experiments active on `days` and compute their rows; the blocking checks
    (contract, units move together) run here, BEFORE anything is written, and a failure raises
    `PublicationRefused`. `log(level, text)` receives the enrolments' messages."""
    specs = experiments.frame_to_specs(warehouse.read(spark, "experiments").toPandas())
    if not specs:
        raise PublicationRefused(f"no accepted experiment in {warehouse.input_dir / 'experiments'}: nothing published for "
                                 f"{days[0]}..{days[-1]} (an empty published day could never change later)")
    active = [s for s in specs if s.start <= days[-1] and s.end >= days[0]]
    catalog = warehouse.read(spark, "catalog")
    snapshots = warehouse.partitions("product_clusters", "snapshot_date")
    events = warehouse.read(spark, "trigger_events") if warehouse.exists("trigger_events") else None
    registry_table = experiments.read_registry(warehouse)
    registry = {} if registry_table is None else {r["name"]: r for r in registry_table.to_dict("records")}
    enrolments = {}
    for spec in active:
        enrolments[spec.name] = enrol(spark, warehouse, spec, catalog, snapshots, registry)
        for level, text in enrolments[spec.name].messages:
            log(level, text)
    runnable = [s for s in active if enrolments[s.name].units is not None]
    log("info", f"computing {len(days)} day(s) {days[0]}..{days[-1]} for {len(runnable)} experiment(s)")
    units = {s.name: enrolments[s.name].units for s in runnable}
    rows = assignment.assign_experiments(runnable, units, days, events).cache()
    n_rows = rows.count()
    checked = rows.toPandas() if n_rows <= PANDAS_CHECK_ROWS else rows
    outcome = quality.validate(checked, "assignments", quality.assignment_expectations())
    del checked
    n_split, split_examples = quality.split_units(rows)
    if not outcome.passed or n_split:
        rows.unpersist()
        problem = outcome.describe() if not outcome.passed else f"{n_split} unit(s) split across arms, e.g. {split_examples[:3]}"
        raise PublicationRefused(f"daily_assignments {days[0]}..{days[-1]} not published: {problem[:400]}",
                                 {"split_units": split_examples})
    return DaysPlan(days, runnable, enrolments, rows, outcome, n_split, split_examples)


def publish_new_days(spark, warehouse, plan: DaysPlan) -> list[dt.date]:
    """Write the plan's days not yet published (one commit each) and return those that already
    were. Refused (`PublicationRefused`, nothing written) when a published day would change."""
    days, rows = plan.days, plan.rows
    published_days = [d for d in days if warehouse.exists("daily_assignments", ("date", d.isoformat()))]
    if published_days:
        published = warehouse.read(spark, "daily_assignments").where(F.col("date").isin(published_days))
        changed = changed_days(rows.where(F.col("date").isin(published_days)), published)
        if changed:
            raise PublicationRefused(
                f"refused: {len(changed)} published day(s) would change ({changed[0]['date']} first). Published "
                "assignments never change; restore the experiment file as it was, or give the change a new "
                "experiment name with a start after today.",
                {"changed_days": changed},
            )
    new_days = [d for d in days if d not in published_days]
    if new_days:
        try:
            warehouse.write_partitions(rows.where(F.col("date").isin(new_days)), "daily_assignments", "date",
                                       [d.isoformat() for d in new_days])
        except WriteConflictError as error:  # another machine's run published one of these days first
            raise PublicationRefused(f"daily_assignments {days[0]}..{days[-1]} not all published: {error}") from None
    return published_days
