"""Daily assignments: what the price engine applies each day, one partition per day.

A day is computed from the experiment files and each experiment's enrolment (its products, units
and strata from the catalogue and the clusters snapshot in force at its start), so any day (or a
range: backfills run as one Spark job) can be computed alone, in any order. The enrolment is
written once, at the experiment's first publication (`warehouse/enrolments/experiment=<name>/`),
so a product added to the catalogue later never shifts a running experiment's arms. A published day is never changed: recomputing it must give the
same rows, and a run that would alter a published day is refused before anything is written.
The blocking checks (contract, units move together) run on the computed rows before any day is
written; a failure publishes nothing. One publish at a time: a second concurrent run is refused
by the warehouse lock with a clear message. Each day is one Delta commit, written once (see
`pipelines.storage`): a run on another machine racing this one for a day gets a clear conflict,
and the `published_days_unchanged` check reads the table's Delta history after every run.
"""

import base64
import datetime as dt
from pathlib import Path

import dagster as dg
# Not exported by dagster; a per-partition check evaluation needs it to count as current (see below).
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from assets.checks import gx_check_result, run_metadata
from assets.inputs import read_registry
from assets.kinds import DELTA_TABLE
from pipelines import assignment, experiments, quality
from pipelines.storage import WarehouseLockedError, WriteConflictError

ASSIGNMENT_CONTRACT = "assignment_contract"
UNITS_MOVE_TOGETHER = "units_move_together"
EXPERIMENTS_PUBLISHED = "experiments_published"
PUBLISHED_UNCHANGED = "published_days_unchanged"
AUDITED_DAYS = 10  # at most this many of the run's already-published days (the latest) compared with their first publication
CALENDAR_UNITS = 40
PANDAS_CHECK_ROWS = 2_000_000  # up to this many computed rows are checked on pandas (a day of a large catalogue)


def _days(window) -> list[dt.date]:
    start, end = window.start.date(), window.end.date()  # end is exclusive
    return [start + dt.timedelta(days=i) for i in range((end - start).days)]


def _snapshot_in_force(snapshots: list[str], start: dt.date) -> str | None:
    """The latest clusters snapshot dated on or before the experiment's start."""
    eligible = [s for s in snapshots if dt.date.fromisoformat(s) <= start]
    return eligible[-1] if eligible else None


def _changed_days(new: DataFrame, published: DataFrame) -> list[dict]:
    """Days whose recomputed rows differ from the published ones (rows added / removed)."""
    columns = list(assignment.ASSIGNMENT_COLUMNS)
    added = new.select(columns).exceptAll(published.select(columns)).groupBy("date").agg(F.count("*").alias("added"))
    removed = published.select(columns).exceptAll(new.select(columns)).groupBy("date").agg(F.count("*").alias("removed"))
    diff = added.join(removed, "date", "full").fillna(0).orderBy("date").collect()
    return [{"date": str(r["date"]), "rows_added": int(r["added"]), "rows_removed": int(r["removed"])} for r in diff]


# Each experiment's products, units and strata, frozen at its first publication. The publishing
# step writes it (a day's run enrols the experiments that start in it), so it cannot be an asset
# of its own step: a job's assets share one partitions definition, and enrolments are per
# experiment, not per day. It is declared here so the lineage shows it, and each write is
# recorded as its materialization.
ENROLMENTS = dg.AssetSpec(
    "enrolments", group_name="assignments", kinds=DELTA_TABLE, deps=["experiments", "catalog", "product_clusters"],
    description="Per experiment: product_id, unit_id, stratum, written by daily_assignments at its first publication.",
)


def daily_assignments_asset(daily_partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The `daily_assignments` asset on `daily_partitions`, whose first day the deployment's data
    decides (`assets.partitions.daily_partitions_for`, built in jobs/definitions.py)."""

    @dg.asset(
        group_name="assignments",
        kinds=DELTA_TABLE,
        partitions_def=daily_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=["experiments", "catalog", "product_clusters", "trigger_events", "enrolments"],
        required_resource_keys={"spark", "warehouse"},
        check_specs=[
            dg.AssetCheckSpec(
                ASSIGNMENT_CONTRACT, asset="daily_assignments", blocking=True, partitions_def=daily_partitions,
                description="GX: keys present, arm in {treatment, control}, one arm per product and day",
            ),
            dg.AssetCheckSpec(
                UNITS_MOVE_TOGETHER, asset="daily_assignments", blocking=True, partitions_def=daily_partitions,
                description="every product of a randomisation unit has the same arm on a day",
            ),
            dg.AssetCheckSpec(
                EXPERIMENTS_PUBLISHED, asset="daily_assignments", partitions_def=daily_partitions,
                description="warns when an active experiment could not be assigned (e.g. no clusters snapshot)",
            ),
            dg.AssetCheckSpec(
                PUBLISHED_UNCHANGED, asset="daily_assignments",
                description=(
                    "Delta's version history: every published day was written by one commit and nothing else wrote "
                    "the table after; the run's already-published days equal their first publication (time travel)"
                ),
            ),
        ],
    )
    def daily_assignments(context: dg.AssetExecutionContext):
        """(date, experiment, product_id, unit_id, arm, blackout, price_change) for each day."""
        spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
        days = _days(context.partition_time_window)
        try:
            with warehouse.lock("daily_assignments"):
                result = _publish(context, spark, warehouse, days)
        except WarehouseLockedError as error:
            raise dg.Failure(description=f"daily_assignments {days[0]}..{days[-1]} not published: {error}") from None
        yield result
        if len(days) > 1:
            _record_checks_on_each_day(context, result.check_results, days)

    return daily_assignments


def _record_checks_on_each_day(context: dg.AssetExecutionContext, check_results, days: list[dt.date]) -> None:
    """A range run (a backfill) records its per-day checks on each of its days, so the UI shows each
    day's check status. Dagster keys that status on the materialization a check evaluated, and a range
    run's own check results carry no partition, so each day's evaluation names that day's materialization
    (written when the result above was yielded)."""
    blocking = {ASSIGNMENT_CONTRACT: True, UNITS_MOVE_TOGETHER: True, EXPERIMENTS_PUBLISHED: False}
    key = dg.AssetKey("daily_assignments")
    for day in days:
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[day.isoformat()]), limit=1
        ).records
        target = records[0] if records and records[0].run_id == context.run.run_id else None
        for result in check_results:
            if result.check_name not in blocking:  # PUBLISHED_UNCHANGED is about the whole table
                continue
            context.log_event(dg.AssetCheckEvaluation(
                asset_key=key, check_name=result.check_name, passed=result.passed,
                metadata=result.metadata, severity=result.severity, blocking=blocking[result.check_name],
                partition=day.isoformat(),
                target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
                    run_id=target.run_id, storage_id=target.storage_id, timestamp=target.timestamp,
                ) if target else None,
            ))


def _published_rows_exist(spark, warehouse, spec) -> bool:
    """True when some published day already holds a row of `spec` (its enrolment is then frozen)."""
    if not warehouse.partitions("daily_assignments", "date"):
        return False
    rows = warehouse.read(spark, "daily_assignments").where(
        F.col("date").between(F.lit(spec.start), F.lit(spec.end)) & (F.col("experiment") == spec.name)
    )
    return bool(rows.limit(1).count())


def _enrol(context, spark, warehouse, spec, catalog, snapshots, not_published, frozen, registry) -> DataFrame | None:
    """The experiment's enrolment: frozen once one of its rows is published; recomputed (so an edit
    of the population or catalogue applies) while none is, e.g. after a killed first publish."""
    partition = ("experiment", spec.name)
    enrolled = registry.get(spec.name)
    if enrolled is not None and enrolled["file"] != Path(spec.source).name:
        raise dg.Failure(
            description=(
                f"experiment '{spec.name}' comes from {Path(spec.source).name} but its enrolment belongs to "
                f"{enrolled['file']}: a running name stays with its file; nothing published"
            )
        )
    if warehouse.exists("enrolments", partition):
        if _published_rows_exist(spark, warehouse, spec):
            if enrolled is not None and enrolled["fingerprint"] != experiments.spec_fingerprint(spec):
                context.log.warning(
                    f"experiment '{spec.name}' ({spec.source}) differs from the spec it was enrolled with; its "
                    "enrolment (products, units) stays frozen because days with its rows are published"
                )
            if enrolled is None:  # enrolled before the registry existed: its current file owns the name from now on
                warehouse.write(experiments.registry_frame(spec), experiments.REGISTRY_TABLE, partition)
            frozen.append(spec.name)
            return warehouse.read(spark, "enrolments", partition).drop("experiment")
        context.log.info(
            f"experiment '{spec.name}': enrolment recomputed (no row of it is published yet, so the current "
            "file and catalogue apply)"
        )
    clusters = None
    if spec.unit == "cluster":
        snapshot = _snapshot_in_force(snapshots, spec.start)
        if snapshot is None:
            not_published[spec.name] = f"no product_clusters snapshot dated on or before its start {spec.start}"
            context.log.error(f"experiment '{spec.name}' not assigned: {not_published[spec.name]}")
            return None
        clusters = warehouse.read(spark, "product_clusters", ("snapshot_date", snapshot)).drop("snapshot_date")
    warehouse.write(assignment.enrolment_units(spec, catalog, clusters), "enrolments", partition)
    warehouse.write(experiments.registry_frame(spec), experiments.REGISTRY_TABLE, partition)
    context.log_event(dg.AssetMaterialization("enrolments", metadata={"experiment": spec.name, "unit": spec.unit}))
    return warehouse.read(spark, "enrolments", partition).drop("experiment")


def _publish(context, spark, warehouse, days: list[dt.date]) -> dg.MaterializeResult:
    specs = experiments.frame_to_specs(warehouse.read(spark, "experiments").toPandas())
    if not specs:
        raise dg.Failure(
            description=(
                f"no accepted experiment in {warehouse.input_dir / 'experiments'}: nothing published for "
                f"{days[0]}..{days[-1]} (an empty published day could never change later)"
            )
        )
    active = [s for s in specs if s.start <= days[-1] and s.end >= days[0]]
    catalog = warehouse.read(spark, "catalog")
    snapshots = warehouse.partitions("product_clusters", "snapshot_date")
    events = warehouse.read(spark, "trigger_events") if warehouse.exists("trigger_events") else None
    registry_table = read_registry(warehouse)
    registry = {} if registry_table is None else {r["name"]: r for r in registry_table.to_dict("records")}

    units_by_experiment, not_published, frozen = {}, {}, []
    for spec in active:
        units = _enrol(context, spark, warehouse, spec, catalog, snapshots, not_published, frozen, registry)
        if units is not None:
            units_by_experiment[spec.name] = units
    runnable = [s for s in active if s.name in units_by_experiment]
    context.log.info(f"computing {len(days)} day(s) {days[0]}..{days[-1]} for {len(runnable)} experiment(s)")
    rows = assignment.assign_experiments(runnable, units_by_experiment, days, events).cache()

    # blocking validation of the rows BEFORE anything is written
    n_rows = rows.count()
    checked = rows.toPandas() if n_rows <= PANDAS_CHECK_ROWS else rows
    outcome = quality.validate(checked, "assignments", quality.assignment_expectations())
    del checked
    n_split, split_examples = quality.split_units(rows)
    if not outcome.passed or n_split:
        rows.unpersist()
        problem = outcome.describe() if not outcome.passed else f"{n_split} unit(s) split across arms, e.g. {split_examples[:3]}"
        raise dg.Failure(
            description=f"daily_assignments {days[0]}..{days[-1]} not published: {problem[:400]}",
            metadata={"split_units": dg.MetadataValue.json(split_examples)},
        )

    published_days = [d for d in days if warehouse.exists("daily_assignments", ("date", d.isoformat()))]
    if published_days:
        published = warehouse.read(spark, "daily_assignments").where(F.col("date").isin(published_days))
        changed = _changed_days(rows.where(F.col("date").isin(published_days)), published)
        if changed:
            rows.unpersist()
            raise dg.Failure(
                description=(
                    f"refused: {len(changed)} published day(s) would change ({changed[0]['date']} first). Published "
                    "assignments never change; restore the experiment file as it was, or give the change a new "
                    "experiment name with a start after today."
                ),
                metadata={"changed_days": dg.MetadataValue.json(changed)},
            )
    new_days = [d for d in days if d not in published_days]
    if new_days:
        try:
            warehouse.write_partitions(
                rows.where(F.col("date").isin(new_days)), "daily_assignments", "date", [d.isoformat() for d in new_days]
            )
        except WriteConflictError as error:  # another machine's run published one of these days first
            rows.unpersist()
            raise dg.Failure(description=f"daily_assignments {days[0]}..{days[-1]} not all published: {error}") from None

    counts = {
        f"{r['experiment']}/{r['arm']}": int(r["count"])
        for r in rows.groupBy("experiment", "arm").count().orderBy("experiment", "arm").collect()
    }
    rows.unpersist()

    metadata = {
        "days": len(days),
        "days_already_published": len(published_days),
        "enrolments_reused": dg.MetadataValue.json(frozen),
        "rows_per_experiment_arm": dg.MetadataValue.json(counts),
        **run_metadata(spark, sum(counts.values())),
    }
    # calendars: every published day of each experiment, its first CALENDAR_UNITS units (one job)
    by_unit = Window.partitionBy("experiment").orderBy("unit_id")
    calendars = (
        warehouse.read(spark, "daily_assignments")
        .where(F.col("experiment").isin([s.name for s in runnable]))
        .withColumn("_unit_rank", F.dense_rank().over(by_unit))
        .where(F.col("_unit_rank") <= CALENDAR_UNITS)
        .drop("_unit_rank")
        .toPandas()
    ) if runnable else None
    for spec in runnable:
        frame = calendars[calendars["experiment"] == spec.name]
        if frame.empty:  # e.g. a triggered experiment before any trigger fired: nothing to draw yet
            metadata[f"calendar_{spec.name}"] = "no published row yet"
            continue
        picture = assignment.assignment_calendar_png(frame, spec.name, max_units=CALENDAR_UNITS, design=spec.design)
        warehouse.write_file(f"plots/assignments_{spec.name}.png", picture)
        metadata[f"calendar_{spec.name}"] = dg.MetadataValue.md(
            f"![{spec.name}](data:image/png;base64,{base64.b64encode(picture).decode()})"
        )
    audited = sorted(d.isoformat() for d in published_days)[-AUDITED_DAYS:]
    problems = warehouse.audit_published(spark, "daily_assignments", values=audited)
    if problems:
        context.log.error(f"daily_assignments: Delta's history shows a published day changed: {problems[0][:300]}")
    check_results = [
        gx_check_result(ASSIGNMENT_CONTRACT, outcome),
        dg.AssetCheckResult(
            check_name=UNITS_MOVE_TOGETHER, passed=n_split == 0,
            metadata={"split_units": n_split, "examples": dg.MetadataValue.json(split_examples)},
        ),
        dg.AssetCheckResult(
            check_name=EXPERIMENTS_PUBLISHED, passed=not not_published, severity=dg.AssetCheckSeverity.WARN,
            metadata={"not_published": dg.MetadataValue.json(not_published)},
        ),
        dg.AssetCheckResult(
            check_name=PUBLISHED_UNCHANGED, passed=not problems,
            metadata={
                "problems": dg.MetadataValue.json(problems[:20]),
                "table_version": int(warehouse.history("daily_assignments", last=1)["version"].iloc[-1]),
                "days_compared_with_first_publication": dg.MetadataValue.json(audited),
            },
        ),
    ]
    return dg.MaterializeResult(metadata=metadata, check_results=check_results)
