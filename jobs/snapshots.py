"""Launching a graph build: its snapshot partition keys are worked out and registered first.

`substitution_graph` and `product_clusters` are partitioned by the dynamic partitions
`snapshot_date` (assets/partitions.py): one key per dated snapshot. A build's keys are not known
before it is launched (`pipelines.snapshot_plan`: the default snapshot after the last complete
sales day, one at every experiment start with no snapshot in force, graph snapshots still
without clusters), so every launcher plans them without Spark, registers the new ones in the
instance, and targets them:

- `pricelab build-graph` / `pricelab run` (jobs/cli.py) and `make demo` (jobs/demo.py) call
  `prepare_graph_build` and run `build_graph_job` in-process on the keys;
- the weekly build is the sensor `build_graph_weekly` below.

One run materialises the inputs once and every key of the build: one key is the run's partition
key; several are a partition range of `snapshot_date`. New keys are registered in date order in
one call, so the keys of one build are next to each other in the partitions' order (Dagster keeps
dynamic keys in the order they were added); a range can only also span older keys registered
between them, and those snapshots exist and are reused (recorded again, never rewritten).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import dagster as dg

from assets.partitions import SNAPSHOT_PARTITIONS, SNAPSHOT_PARTITIONS_NAME
from jobs.resources import WarehouseResource
from pipelines.snapshot_plan import SnapshotPlan, SnapshotPlanError, plan_snapshots

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
BUILD_GRAPH_JOB = "build_graph_job"


@dataclass(frozen=True)
class GraphBuild:
    """A planned build: its snapshots, the keys it registers, and how a run targets them."""

    plan: SnapshotPlan
    new_keys: list[str]
    partition_key: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    run_config: dict = field(default_factory=dict)

    def describe(self) -> list[str]:
        lines = [f"snapshot(s) {', '.join(self.plan.keys)} (new partition keys: {', '.join(self.new_keys) or 'none'})"]
        lines += [f"experiment start {d} has no snapshot in force: building one dated {d}" for d in self.plan.for_experiment_starts]
        lines += [f"graph snapshot {d} has no clusters yet: clustering it" for d in self.plan.without_clusters]
        return lines


def _is_day(key: str) -> bool:
    try:
        dt.date.fromisoformat(key)
    except ValueError:
        return False
    return True


def target(keys: list[str], order: list[str]) -> tuple[str | None, dict[str, str]]:
    """(partition key, no tags) for one key; (None, range tags) spanning `keys` in `order` (the
    dynamic partitions' order, the keys already in it) for several. A range that would span a key
    that is not a date (added by hand in the UI) is refused in one line: the run would fail on it."""
    if len(keys) == 1:
        return keys[0], {}
    positions = sorted(order.index(k) for k in keys)
    spanned = order[positions[0]: positions[-1] + 1]
    foreign = [k for k in spanned if not _is_day(k)]
    if foreign:
        raise SnapshotPlanError(
            f"snapshot partition {foreign[0][:40]!r} is not a date YYYY-MM-DD and lies between this build's keys "
            f"({', '.join(keys)}): delete it (UI: substitution_graph, Partitions) and build again"
        )
    return None, {RANGE_START_TAG: spanned[0], RANGE_END_TAG: spanned[-1]}


def plan_build(existing_keys: list[str], data_dir, snapshot_date: dt.date | None = None, today: dt.date | None = None,
               tables_url: str | None = None) -> GraphBuild:
    """The build's snapshots (`pipelines.snapshot_plan`, no Spark for a local warehouse) and its
    run target, given the keys the instance already holds (`existing_keys`, in their order)."""
    plan = plan_snapshots(data_dir, snapshot_date=snapshot_date, today=today, tables_url=tables_url)
    new_keys = [k for k in plan.keys if k not in set(existing_keys)]
    partition_key, tags = target(plan.keys, [*existing_keys, *new_keys])
    run_config = {"ops": {"substitution_graph": {"config": {"snapshot_date": snapshot_date.isoformat()}}}} if snapshot_date else {}
    return GraphBuild(plan, new_keys, partition_key, tags, run_config)


def prepare_graph_build(instance: dg.DagsterInstance, data_dir, snapshot_date: dt.date | None = None,
                        today: dt.date | None = None, tables_url: str | None = None) -> GraphBuild:
    """Plan a build and register its new snapshot keys in `instance` (the CLI and the demo)."""
    build = plan_build(instance.get_dynamic_partitions(SNAPSHOT_PARTITIONS_NAME), data_dir, snapshot_date, today, tables_url)
    if build.new_keys:
        instance.add_dynamic_partitions(SNAPSHOT_PARTITIONS_NAME, build.new_keys)
    return build


# ----------------------------------------------------------------------------------------------
# The weekly build
# ----------------------------------------------------------------------------------------------

WEEKLY_SENSOR = "build_graph_weekly"
WEEKLY_WEEKDAY, WEEKLY_HOUR = 0, 2  # Monday 02:00 UTC, as the cron schedule "0 2 * * 1" it replaces
WEEKLY_INTERVAL_SECONDS = 300


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def last_weekly_tick(now: dt.datetime) -> dt.datetime:
    """The latest Monday 02:00 UTC at or before `now` (aware)."""
    now = now.astimezone(dt.timezone.utc)
    monday = (now - dt.timedelta(days=(now.weekday() - WEEKLY_WEEKDAY) % 7)).replace(hour=WEEKLY_HOUR, minute=0, second=0, microsecond=0)
    return monday if monday <= now else monday - dt.timedelta(days=7)


@dg.sensor(
    name=WEEKLY_SENSOR,
    job_name=BUILD_GRAPH_JOB,
    minimum_interval_seconds=WEEKLY_INTERVAL_SECONDS,
    description="Every Monday 02:00 UTC: registers the week's snapshot partition keys and runs build_graph_job on them.",
)
def build_graph_weekly(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
    """The weekly graph build, as a sensor that keeps a schedule's time.

    Why a sensor and not a `ScheduleDefinition`: the build's snapshot keys are only known at
    launch (they follow the sales and the experiment starts) and must be registered before the
    run that materialises them; a schedule's evaluation cannot add dynamic partitions (Dagster
    evaluates schedules with no `dynamic_partitions_requests`), while a sensor's `SensorResult`
    carries both the `AddDynamicPartitionsRequest` and the run request, applied together. The
    sensor keeps the latest Monday 02:00 UTC it handled as its cursor and requests one run per
    such tick (run key `build_graph_weekly:<tick>`); like a schedule it does not catch up missed
    weeks, and when first turned on it waits for the next tick. Stopped by default, as the
    schedule was: turn it on in the UI."""
    tick = last_weekly_tick(_now())
    following = (tick + dt.timedelta(days=7)).isoformat()
    if not context.cursor:
        return dg.SensorResult(skip_reason=f"turned on: the first weekly build runs at {following}", cursor=tick.isoformat())
    if tick.isoformat() <= context.cursor:
        return dg.SkipReason(f"the build of {context.cursor} is done; the next runs at {following}")
    store = warehouse.get()
    try:
        build = plan_build(context.instance.get_dynamic_partitions(SNAPSHOT_PARTITIONS_NAME), store.root,
                           today=warehouse.as_of(), tables_url=store.tables_url)
    except SnapshotPlanError as error:
        return dg.SensorResult(skip_reason=f"weekly build of {tick.isoformat()} not started: {error}", cursor=tick.isoformat())
    for line in build.describe():
        context.log.info(f"{WEEKLY_SENSOR}: {line}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"{WEEKLY_SENSOR}:{tick.isoformat()}", partition_key=build.partition_key,
                                    tags={**build.tags, "pricelab/weekly_tick": tick.isoformat()})],
        dynamic_partitions_requests=[SNAPSHOT_PARTITIONS.build_add_request(build.new_keys)] if build.new_keys else [],
        cursor=tick.isoformat(),
    )
