"""Sensors: notice new, edited or removed experiment files and re-read them.

`experiment_files_sensor` keeps, as its cursor, the JSON of {file name: sha256 of its content}
for `input/experiments/*.yaml|*.yml`. When the listing differs from the cursor it requests a run
of the `experiments` asset (which validates the files, refusing bad ones one by one) and logs
which files were added, changed and removed; otherwise it skips. With no cursor yet (the first
tick after `dagster dev` or the daemon starts) it compares with the digests that the last
`experiments` materialization recorded (`file_digests` metadata, e.g. from `make demo`), so
nothing re-runs when nothing changed. Each tick also marks runs left STARTED by a dead process
as failed (`jobs.runs.fail_dead_runs`). The next daily assignments run
then reads the new experiment table (and refuses any change to a published day).
"""
from __future__ import annotations

import json

import dagster as dg

from jobs.resources import WarehouseResource
from jobs.runs import fail_dead_runs
from pipelines.experiments import compare_digests, experiment_file_digests

EXPERIMENTS_ASSET_KEY = dg.AssetKey("experiments")
EXPERIMENT_FILES_SENSOR = "experiment_files_sensor"
EXPERIMENT_FILES_INTERVAL_SECONDS = 60


def _digests_from_cursor(cursor: str | None, log) -> dict[str, str]:
    """The cursor's {file: sha256}; an empty, unreadable or foreign cursor counts as no files."""
    if not cursor:
        return {}
    try:
        digests = json.loads(cursor)
    except json.JSONDecodeError:
        log.warning(f"{EXPERIMENT_FILES_SENSOR}: cursor is not JSON; treating every file as new")
        return {}
    if not isinstance(digests, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
        log.warning(f"{EXPERIMENT_FILES_SENSOR}: cursor is not a {{file: sha256}} object; treating every file as new")
        return {}
    return digests


FILE_DIGESTS_METADATA = "file_digests"


def _instance(context):
    try:
        return context.instance
    except Exception:  # a context built without an instance (unit tests)
        return None


def _last_materialized_digests(instance) -> dict[str, str] | None:
    """{file: sha256} recorded by the latest `experiments` materialization, or None."""
    if instance is None:
        return None
    event = instance.get_latest_materialization_event(EXPERIMENTS_ASSET_KEY)
    materialization = event.asset_materialization if event is not None else None
    value = materialization.metadata.get(FILE_DIGESTS_METADATA) if materialization is not None else None
    data = getattr(value, "data", None)
    return data if isinstance(data, dict) else None


def describe_changes(changes: dict[str, list[str]]) -> str:
    """One line such as 'added: b.yaml; changed: a.yaml' (kinds without files left out)."""
    return "; ".join(f"{kind}: {', '.join(files)}" for kind, files in changes.items() if files)


@dg.sensor(
    name=EXPERIMENT_FILES_SENSOR,
    asset_selection=dg.AssetSelection.assets(EXPERIMENTS_ASSET_KEY),
    minimum_interval_seconds=EXPERIMENT_FILES_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-reads the experiment files (the `experiments` asset) when one is added, edited or removed.",
)
def experiment_files_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
    """Request an `experiments` run when `input/experiments/` differs from the cursor's digests."""
    instance = _instance(context)
    if instance is not None:
        for run_id in fail_dead_runs(instance):
            context.log.warning(f"run {run_id} was left STARTED by a dead process: marked failed")
    directory = warehouse.get().input_dir / "experiments"
    after = experiment_file_digests(directory)
    recorded = None if context.cursor else _last_materialized_digests(instance)
    before = recorded if recorded is not None else _digests_from_cursor(context.cursor, context.log)
    changes = compare_digests(before, after)
    if not any(changes.values()):
        message = f"no experiment file added, changed or removed in {directory} ({len(after)} file(s))"
        if recorded is not None:  # first tick: adopt what the last materialization read
            return dg.SensorResult(skip_reason=message + " since the last experiments run", cursor=json.dumps(after, sort_keys=True))
        return dg.SkipReason(message)
    summary = describe_changes(changes)
    context.log.info(f"experiment files in {directory}: {summary}")
    cursor = json.dumps(after, sort_keys=True)
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                # no run_key: the cursor already advances once per change, and a file edited back to
                # an earlier content must still start a run
                asset_selection=[EXPERIMENTS_ASSET_KEY],
                tags={"pricelab/experiment_files": summary[:200]},
            )
        ],
        cursor=cursor,
    )
