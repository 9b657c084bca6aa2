"""The experiment-files sensor (skip / run request / cursor) and the daily schedule's partition."""
from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import pytest

from jobs.resources import WarehouseResource, warehouse_resource
from jobs.sensors import EXPERIMENTS_ASSET_KEY, experiment_files_sensor
from pipelines.experiments import compare_digests, experiment_file_digests

EXPERIMENT_YAML = """\
name: {name}
design: time_bound
start: 2026-03-01
end: 2026-03-20
treatment: {{price_change: {price_change}}}
seed: 7
"""


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "input" / "experiments").mkdir(parents=True)
    return tmp_path


def write_experiment(data_dir, file: str, name: str, price_change: float = -0.05):
    path = data_dir / "input" / "experiments" / file
    path.write_text(EXPERIMENT_YAML.format(name=name, price_change=price_change))
    return path


class Tick:
    """What one evaluation returned: run_requests, the new cursor (None when unchanged), skip_message."""

    def __init__(self, outcome, cursor_before):
        skipped = isinstance(outcome, dg.SkipReason)
        assert skipped or isinstance(outcome, dg.SensorResult), outcome
        self.run_requests = [] if skipped else list(outcome.run_requests)
        self.cursor = cursor_before if skipped else outcome.cursor
        self.skip_message = outcome.skip_message if skipped else None


def tick(data_dir, cursor: str | None) -> Tick:
    """Invoke the sensor once, as the daemon would, with the given cursor."""
    context = dg.build_sensor_context(cursor=cursor, resources={"warehouse": WarehouseResource(data_dir=str(data_dir))})
    return Tick(experiment_files_sensor(context), cursor)


def test_digests_list_only_experiment_files_and_compare(data_dir):
    write_experiment(data_dir, "a.yaml", "a")
    write_experiment(data_dir, "b.yml", "b")
    (data_dir / "input" / "experiments" / "notes.txt").write_text("not an experiment")
    (data_dir / "input" / "experiments" / ".draft.yaml").write_text("hidden editor copy")
    digests = experiment_file_digests(data_dir / "input" / "experiments")
    assert sorted(digests) == ["a.yaml", "b.yml"] and all(len(d) == 64 for d in digests.values())
    assert experiment_file_digests(data_dir / "nowhere") == {}
    changes = compare_digests({"a.yaml": digests["a.yaml"], "b.yml": "0" * 64, "gone.yaml": "1" * 64}, digests)
    assert changes == {"added": [], "changed": ["b.yml"], "removed": ["gone.yaml"]}


def test_no_files_and_no_change_skip(data_dir):
    empty = tick(data_dir, None)
    assert not empty.run_requests and "no experiment file" in empty.skip_message
    write_experiment(data_dir, "a.yaml", "a")
    first = tick(data_dir, None)
    again = tick(data_dir, first.cursor)
    assert not again.run_requests and again.skip_message
    # rewriting identical bytes (a touch, a save without edits) is no change either
    write_experiment(data_dir, "a.yaml", "a")
    assert not tick(data_dir, first.cursor).run_requests


def changes_of(result: Tick) -> str:
    return result.run_requests[0].tags["pricelab/experiment_files"]


def test_new_file_requests_an_experiments_run_and_moves_the_cursor(data_dir, capfd):
    write_experiment(data_dir, "a.yaml", "a")
    first = tick(data_dir, None)
    assert len(first.run_requests) == 1
    assert first.run_requests[0].asset_selection == [EXPERIMENTS_ASSET_KEY] and changes_of(first) == "added: a.yaml"
    assert set(json.loads(first.cursor)) == {"a.yaml"}

    write_experiment(data_dir, "b.yaml", "b")
    capfd.readouterr()
    second = tick(data_dir, first.cursor)
    assert len(second.run_requests) == 1 and second.run_requests[0].asset_selection == [EXPERIMENTS_ASSET_KEY]
    cursor = json.loads(second.cursor)
    assert set(cursor) == {"a.yaml", "b.yaml"} and cursor["a.yaml"] == json.loads(first.cursor)["a.yaml"]
    assert changes_of(second) == "added: b.yaml"
    assert "experiment files in" in capfd.readouterr().err.split("added: b.yaml")[0]  # logged too


def test_edited_and_removed_files_request_runs(data_dir):
    write_experiment(data_dir, "a.yaml", "a")
    b = write_experiment(data_dir, "b.yaml", "b")
    cursor = tick(data_dir, None).cursor
    write_experiment(data_dir, "a.yaml", "a", price_change=-0.10)
    edited = tick(data_dir, cursor)
    assert len(edited.run_requests) == 1 and edited.cursor != cursor
    assert changes_of(edited) == "changed: a.yaml"
    b.unlink()
    write_experiment(data_dir, "c.yaml", "c")
    both = tick(data_dir, edited.cursor)
    assert len(both.run_requests) == 1 and set(json.loads(both.cursor)) == {"a.yaml", "c.yaml"}
    assert changes_of(both) == "added: c.yaml; removed: b.yaml"
    removed = both
    # editing back to an earlier content is still a change (no run_key that would dedupe it)
    write_experiment(data_dir, "a.yaml", "a")
    assert len(tick(data_dir, removed.cursor).run_requests) == 1


def test_unreadable_cursor_counts_as_no_files(data_dir):
    write_experiment(data_dir, "a.yaml", "a")
    result = tick(data_dir, "not json")
    assert len(result.run_requests) == 1 and set(json.loads(result.cursor)) == {"a.yaml"}


def test_warehouse_defaults_to_pricelab_data_dir(data_dir, monkeypatch):
    monkeypatch.setenv("PRICELAB_DATA_DIR", str(data_dir))
    write_experiment(data_dir, "a.yaml", "a")
    resource = warehouse_resource()  # as `default_resources` builds it: PRICELAB_DATA_DIR through dg.EnvVar
    assert isinstance(resource.data_dir, dg.EnvVar) and resource.data_dir.env_var_name == "PRICELAB_DATA_DIR"
    context = dg.build_sensor_context(cursor=None, resources={"warehouse": resource})
    assert set(json.loads(experiment_files_sensor(context).cursor)) == {"a.yaml"}


@pytest.fixture(scope="module")
def defs():
    from jobs.definitions import defs as definitions

    return definitions


def test_sensor_is_registered_and_targets_the_experiments_asset(defs):
    sensor = defs.resolve_sensor_def("experiment_files_sensor")
    assert sensor.minimum_interval_seconds == 60
    assert sensor.asset_selection.resolve(defs.resolve_asset_graph()) == {EXPERIMENTS_ASSET_KEY}


def test_tick_through_the_definitions_requests_the_experiments_asset(defs, data_dir):
    write_experiment(data_dir, "a.yaml", "a")
    context = dg.build_sensor_context(
        cursor=None, definitions=defs, resources={"warehouse": WarehouseResource(data_dir=str(data_dir))}
    )
    data = defs.resolve_sensor_def("experiment_files_sensor").evaluate_tick(context)
    assert [r.asset_selection for r in data.run_requests] == [[EXPERIMENTS_ASSET_KEY]]
    assert set(json.loads(data.cursor)) == {"a.yaml"}


@pytest.mark.parametrize("tick_time", ["2026-03-10T00:15:00+00:00", "2026-12-31T00:15:00+00:00"])
def test_daily_schedule_publishes_the_partition_of_the_tick_day(defs, tick_time):
    schedule = defs.resolve_schedule_def("publish_assignments_daily")
    assert schedule.cron_schedule == "15 0 * * *" and schedule.execution_timezone == "UTC"
    when = dt.datetime.fromisoformat(tick_time)
    data = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when))
    assert [r.partition_key for r in data.run_requests] == [when.date().isoformat()]  # today, not yesterday


def test_first_tick_after_a_restart_does_not_rerun_when_nothing_changed(data_dir):
    """No cursor yet (a fresh `dagster dev`), but the last `experiments` run read these very files
    (its `file_digests` metadata, e.g. from `make demo`): skip, and adopt them as the cursor."""
    write_experiment(data_dir, "a.yaml", "a")
    instance = dg.DagsterInstance.ephemeral()
    digests = experiment_file_digests(data_dir / "input" / "experiments")
    instance.report_runless_asset_event(
        dg.AssetMaterialization(EXPERIMENTS_ASSET_KEY, metadata={"file_digests": dg.MetadataValue.json(digests)})
    )
    resources = {"warehouse": WarehouseResource(data_dir=str(data_dir))}
    outcome = experiment_files_sensor(dg.build_sensor_context(cursor=None, instance=instance, resources=resources))
    assert isinstance(outcome, dg.SensorResult) and not outcome.run_requests
    assert "since the last experiments run" in outcome.skip_reason.skip_message
    assert json.loads(outcome.cursor) == digests
    # an edit made while the UI was down is still seen at the first tick
    write_experiment(data_dir, "a.yaml", "a", price_change=-0.1)
    outcome = experiment_files_sensor(dg.build_sensor_context(cursor=None, instance=instance, resources=resources))
    assert len(outcome.run_requests) == 1 and "changed: a.yaml" in outcome.run_requests[0].tags["pricelab/experiment_files"]


# ----------------------------------------------------------------------------------------------
# build_graph_weekly: a sensor that keeps the weekly time and registers the snapshot keys
# ----------------------------------------------------------------------------------------------

def test_weekly_tick_is_the_latest_monday_0200_utc():
    from jobs.snapshots import last_weekly_tick

    utc = dt.timezone.utc
    assert last_weekly_tick(dt.datetime(2025, 7, 7, 2, 0, tzinfo=utc)) == dt.datetime(2025, 7, 7, 2, 0, tzinfo=utc)
    assert last_weekly_tick(dt.datetime(2025, 7, 7, 1, 59, tzinfo=utc)) == dt.datetime(2025, 6, 30, 2, 0, tzinfo=utc)
    assert last_weekly_tick(dt.datetime(2025, 7, 13, 23, 0, tzinfo=utc)) == dt.datetime(2025, 7, 7, 2, 0, tzinfo=utc)


def test_snapshot_run_target_spans_the_keys_in_the_partitions_order():
    from jobs.snapshots import RANGE_END_TAG, RANGE_START_TAG, target
    from pipelines.snapshot_plan import SnapshotPlanError

    assert target(["2025-07-01"], ["2025-06-02", "2025-07-01"]) == ("2025-07-01", {})
    order = ["2025-07-01", "2025-03-03", "2025-06-02"]  # keys as registered, not sorted
    assert target(["2025-06-02", "2025-03-03"], order) == (None, {RANGE_START_TAG: "2025-03-03", RANGE_END_TAG: "2025-06-02"})
    with pytest.raises(SnapshotPlanError, match="snapshot partition 'oops' is not a date YYYY-MM-DD and lies between"):
        target(["2025-07-01", "2025-06-02"], ["2025-07-01", "oops", "2025-06-02"])


def test_weekly_sensor_registers_the_snapshot_keys_and_requests_one_run_on_them(defs, tmp_path, monkeypatch):
    """No Spark: the keys are planned from the inputs (pandas) and the warehouse's Delta log. The
    CLI market's cluster experiment starts before the last sales day, so the build needs a snapshot
    at its start beside the default one; both are registered and targeted by one range run."""
    from assets.partitions import SNAPSHOT_PARTITIONS_NAME
    from jobs import snapshots
    from pipelines.snapshot_plan import plan_snapshots
    from tests.test_cli import write_market

    root = write_market(tmp_path)
    plan = plan_snapshots(root, today=dt.date(2025, 7, 1))
    assert plan.default == dt.date(2025, 7, 1) and plan.for_experiment_starts == [dt.date(2025, 6, 2)]
    instance = dg.DagsterInstance.ephemeral()
    sensor = defs.resolve_sensor_def(snapshots.WEEKLY_SENSOR)
    assert sensor.job_name == "build_graph_job" and sensor.default_status == dg.DefaultSensorStatus.STOPPED

    def evaluate(now: str, cursor: str | None):
        monkeypatch.setattr(snapshots, "_now", lambda: dt.datetime.fromisoformat(now))
        resources = {"warehouse": WarehouseResource(data_dir=str(root), today="2025-07-01")}
        context = dg.build_sensor_context(cursor=cursor, instance=instance, definitions=defs, resources=resources)
        return sensor.evaluate_tick(context)

    first = evaluate("2025-07-02T10:00:00+00:00", None)  # turned on: waits for the next Monday, as a schedule does
    assert not first.run_requests and first.cursor == "2025-06-30T02:00:00+00:00"
    due = evaluate("2025-07-07T02:03:00+00:00", first.cursor)
    assert [r.partition_keys for r in due.dynamic_partitions_requests] == [plan.keys]
    request, = due.run_requests
    assert request.partition_key is None
    assert (request.tags[snapshots.RANGE_START_TAG], request.tags[snapshots.RANGE_END_TAG]) == (plan.keys[0], plan.keys[-1])
    assert request.run_key == "build_graph_weekly:2025-07-07T02:00:00+00:00"
    again = evaluate("2025-07-07T02:08:00+00:00", due.cursor)  # the same week: nothing more
    assert not again.run_requests and not again.dynamic_partitions_requests
    # keys already registered are not requested again; a snapshot given by the user is its own key
    instance.add_dynamic_partitions(SNAPSHOT_PARTITIONS_NAME, plan.keys)
    build = snapshots.plan_build(instance.get_dynamic_partitions(SNAPSHOT_PARTITIONS_NAME), root, dt.date(2025, 6, 16),
                                 today=dt.date(2025, 7, 1))
    assert build.new_keys == ["2025-06-16"] and build.partition_key is None  # 2025-06-02 (experiment start) and 2025-06-16
    assert build.run_config == {"ops": {"substitution_graph": {"config": {"snapshot_date": "2025-06-16"}}}}


def test_a_build_with_no_sales_is_not_started(tmp_path):
    from pipelines.snapshot_plan import SnapshotPlanError, plan_snapshots
    from tests.test_cli import write_market

    root = write_market(tmp_path)
    (root / "input" / "sales" / "history.parquet").unlink()
    with pytest.raises(SnapshotPlanError, match="substitution_graph: no snapshot date: the sales input is unusable"):
        plan_snapshots(root)
