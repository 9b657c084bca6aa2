"""Daily assignments: what the price engine applies each day, one partition per day. The rules
(enrolment freezing, the snapshot in force, published days never change) are in
`pipelines.publication`; this asset runs them under the warehouse lock and reports.

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

import dagster as dg
# Not exported by dagster; a per-partition check evaluation needs it to count as current (see below).
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from pyspark.sql import Window
from pyspark.sql import functions as F

from assets.checks import gx_check_result, run_metadata
from assets.kinds import DELTA_TABLE
from pipelines import assignment, publication
from pipelines.storage import WarehouseLockedError

ASSIGNMENT_CONTRACT = "assignment_contract"
UNITS_MOVE_TOGETHER = "units_move_together"
EXPERIMENTS_PUBLISHED = "experiments_published"
PUBLISHED_UNCHANGED = "published_days_unchanged"
AUDITED_DAYS = 10  # at most this many of the run's already-published days (the latest) compared with their first publication
CALENDAR_UNITS = 40


def _days(window) -> list[dt.date]:
    start, end = window.start.date(), window.end.date()  # end is exclusive
    return [start + dt.timedelta(days=i) for i in range((end - start).days)]


# Each experiment's products, units and strata, frozen at its first publication. The publishing
# step writes it (a day's run enrols the experiments that start in it), so it cannot be an asset
# of its own step: a job's assets share one partitions definition, and enrolments are per
# experiment, not per day. It is declared here so the lineage shows it, and each write is
# recorded as its materialization.
# An experiment reads the clusters snapshot in force at its start, which may be any snapshot
# (older than the day published, never a later one): every snapshot key is upstream of every day.
CLUSTERS_IN_FORCE = dg.AssetDep("product_clusters", partition_mapping=dg.AllPartitionMapping())

ENROLMENTS = dg.AssetSpec(
    "enrolments", group_name="assignments", kinds=DELTA_TABLE, deps=["experiments", "catalog", CLUSTERS_IN_FORCE],
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
        deps=["experiments", "catalog", CLUSTERS_IN_FORCE, "trigger_events", "enrolments"],
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


def _refusal(refused: publication.PublicationRefused) -> dg.Failure:
    return dg.Failure(description=str(refused), metadata={k: dg.MetadataValue.json(v) for k, v in refused.details.items()})


def _publish(context, spark, warehouse, days: list[dt.date]) -> dg.MaterializeResult:
    """Plan, check and write the run's days (`pipelines.publication`); metadata, calendars and checks."""
    levels = {"info": context.log.info, "warning": context.log.warning, "error": context.log.error}
    try:
        plan = publication.plan_days(spark, warehouse, days, log=lambda level, text: levels[level](text))
    except publication.PublicationRefused as refused:
        raise _refusal(refused) from None
    for name, enrolment in plan.enrolments.items():
        if enrolment.written:
            context.log_event(dg.AssetMaterialization("enrolments", metadata={"experiment": name}))
    try:
        published_days = publication.publish_new_days(spark, warehouse, plan)
        counts = {
            f"{r['experiment']}/{r['arm']}": int(r["count"])
            for r in plan.rows.groupBy("experiment", "arm").count().orderBy("experiment", "arm").collect()
        }
    except publication.PublicationRefused as refused:
        raise _refusal(refused) from None
    finally:
        plan.release()
    metadata = {
        "days": len(days),
        "days_already_published": len(published_days),
        "enrolments_reused": dg.MetadataValue.json([name for name, e in plan.enrolments.items() if e.frozen]),
        "rows_per_experiment_arm": dg.MetadataValue.json(counts),
        **run_metadata(spark, sum(counts.values())),
        **_calendars(spark, warehouse, plan.runnable),
    }
    return dg.MaterializeResult(metadata=metadata, check_results=_check_results(context, spark, warehouse, plan, published_days))


def _calendars(spark, warehouse, runnable) -> dict:
    """Per experiment: its calendar (every published day, its first CALENDAR_UNITS units; one Spark
    job), written to plots/ and returned as metadata."""
    if not runnable:
        return {}
    by_unit = Window.partitionBy("experiment").orderBy("unit_id")
    calendars = (
        warehouse.read(spark, "daily_assignments")
        .where(F.col("experiment").isin([s.name for s in runnable]))
        .withColumn("_unit_rank", F.dense_rank().over(by_unit))
        .where(F.col("_unit_rank") <= CALENDAR_UNITS)
        .drop("_unit_rank")
        .toPandas()
    )
    metadata = {}
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
    return metadata


def _check_results(context, spark, warehouse, plan: publication.DaysPlan, published_days) -> list[dg.AssetCheckResult]:
    """The four checks; the last reads Delta's history of the run's already-published days."""
    audited = sorted(d.isoformat() for d in published_days)[-AUDITED_DAYS:]
    problems = warehouse.audit_published(spark, "daily_assignments", values=audited)
    if problems:
        context.log.error(f"daily_assignments: Delta's history shows a published day changed: {problems[0][:300]}")
    not_published = {name: e.not_published for name, e in plan.enrolments.items() if e.not_published}
    return [
        gx_check_result(ASSIGNMENT_CONTRACT, plan.outcome),
        dg.AssetCheckResult(
            check_name=UNITS_MOVE_TOGETHER, passed=plan.n_split == 0,
            metadata={"split_units": plan.n_split, "examples": dg.MetadataValue.json(plan.split_examples)},
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
