"""Partitions, defined once: the snapshot partitions of the graph and clusters, and the daily
partitions of the assignments.

Snapshot partitions (`SNAPSHOT_PARTITIONS`, dynamic, named `snapshot_date`): one key per dated
snapshot `YYYY-MM-DD` of `substitution_graph` and `product_clusters` (their tables' `snapshot_date=D/`
partitions). The keys are not known in advance (the default snapshot follows the sales, and an
experiment start may need its own), so whoever launches a build registers them first
(`jobs.snapshots`: the CLI, the demo, the weekly sensor); a key added by hand in the UI must be a
date, else the build refuses it in one line.

Daily partitions, defined once. They start on the first day of the month of the earliest
experiment start found in the data directory (experiment files and the experiments already
accepted or enrolled in the warehouse), so the CLI, `dagster dev` and the daemon, which all build
the definitions from the same PRICELAB_DATA_DIR (jobs/definitions.py), agree without any further
setting. An explicit start (PRICELAB_PARTITIONS_START, YYYY-MM-DD) still wins. With no experiment
anywhere they start on the first day of the current month. Today's partition exists (end_offset=1) so the
morning schedule can publish the day's assignments before the day's prices go live. An unknown
partition key is refused naming the valid range (Dagster's own message names only the key)."""

import datetime as dt
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterUnknownPartitionError

from pipelines.contract import today_utc

WAREHOUSE_SPEC_TABLES = ("experiments", "experiment_registry")
SNAPSHOT_PARTITIONS_NAME = "snapshot_date"
SNAPSHOT_PARTITIONS = dg.DynamicPartitionsDefinition(name=SNAPSHOT_PARTITIONS_NAME)


def snapshot_days(context: dg.AssetExecutionContext, asset: str) -> list[dt.date]:
    """The run's snapshot keys as dates, sorted; a key that is not a date fails in one line."""
    days = []
    for key in context.partition_keys:
        try:
            days.append(dt.date.fromisoformat(key))
        except ValueError:
            raise dg.Failure(
                f"{asset}: snapshot partition {key[:40]!r} is not a date YYYY-MM-DD (snapshot keys are the days a "
                "snapshot is in force from; delete it in the UI and run pricelab build-graph [--snapshot-date D])"
            ) from None
    return sorted(days)


def _warehouse_starts(root: Path) -> list[dt.date]:
    """Experiment starts recorded in the warehouse (accepted or enrolled experiments, e.g. one
    whose file has since been removed); read with pyarrow, no Spark. Unreadable tables count as none."""
    import pyarrow.dataset as ds

    starts: list[dt.date] = []
    for table in WAREHOUSE_SPEC_TABLES:
        path = root / "warehouse" / table
        if not path.is_dir():
            continue
        try:
            column = ds.dataset(str(path), format="parquet", partitioning="hive").to_table(columns=["start"]).column("start")
        except Exception:
            continue
        for value in column.to_pylist():
            if value is not None:
                starts.append(value.date() if isinstance(value, dt.datetime) else dt.date.fromisoformat(str(value)[:10]))
    return starts


def earliest_experiment_start(root: str | Path) -> dt.date | None:
    """The earliest start of any experiment file (that parses) or warehouse experiment, or None."""
    from pipelines.experiments import ExperimentFileError, experiment_file_paths, parse_experiment_file

    root = Path(root).resolve()
    starts = _warehouse_starts(root)
    for path in experiment_file_paths(root / "input" / "experiments"):
        try:
            starts.append(parse_experiment_file(path).start)
        except ExperimentFileError:
            continue
    return min(starts) if starts else None


def partitions_start(root: str | Path, explicit: str | None = None) -> str:
    """`explicit` when given, else the first day of the month of the earliest experiment start."""
    if explicit:
        return explicit
    first = earliest_experiment_start(root) or today_utc()
    return first.replace(day=1).isoformat()


class DailyPartitionsNamingTheRange(dg.DailyPartitionsDefinition):
    """Dagster's daily partitions, whose refusal of an unknown key says which keys exist."""

    def unknown_key_message(self, partition_key: str) -> str:
        return (
            f"partition {str(partition_key)[:40]!r} of daily_assignments does not exist: valid keys are days "
            f"YYYY-MM-DD from {self.get_first_partition_key()} to {self.get_last_partition_key()} (the first is "
            "the month of the earliest experiment start; today's day is the last)"
        )

    def validate_partition_key(self, partition_key: str, context) -> None:
        try:
            super().validate_partition_key(partition_key, context)
        except DagsterUnknownPartitionError:
            raise DagsterUnknownPartitionError(self.unknown_key_message(partition_key)) from None


def daily_partitions_for(root: str | Path, explicit_start: str | None = None) -> DailyPartitionsNamingTheRange:
    """The daily partitions of the data directory `root`, today's day the last."""
    return DailyPartitionsNamingTheRange(start_date=partitions_start(root, explicit_start), end_offset=1, timezone="UTC")
