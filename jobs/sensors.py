"""Sensors: notice new, edited or removed experiment files and re-read them.

`experiment_files_sensor` keeps, as its cursor, the JSON of {file name: sha256 of its content}
for `input/experiments/*.yaml|*.yml`. When the listing differs from the cursor it requests a run
of the `experiments` asset (which validates the files, refusing bad ones one by one) and logs
which files were added, changed and removed; otherwise it skips. The next daily assignments run
then reads the new experiment table (and refuses any change to a published day).
"""
from __future__ import annotations

import json

import dagster as dg

from jobs.resources import WarehouseResource
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
    directory = warehouse.get().input_dir / "experiments"
    before = _digests_from_cursor(context.cursor, context.log)
    after = experiment_file_digests(directory)
    changes = compare_digests(before, after)
    if not any(changes.values()):
        return dg.SkipReason(f"no experiment file added, changed or removed in {directory} ({len(after)} file(s))")
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
