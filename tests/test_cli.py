"""The `pricelab` console script as a new user meets it: PRICELAB_DATA_DIR as the only setting,
data dated 2025 (before any default partition start), one-line errors and exit codes."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

PRICELAB = str(Path(sys.executable).with_name("pricelab"))
SUBCLASSES = [("kitchen", "k1"), ("kitchen", "k2"), ("garden", "g1"), ("garden", "g2")]
HISTORY = [dt.date(2025, 4, 1) + dt.timedelta(days=i) for i in range(91)]  # 2025-04-01 .. 2025-06-30
CLUSTER_EXPERIMENT = """\
name: kitchen-cut
design: time_bound
start: 2025-06-02
end: 2025-06-22
unit: cluster
population: {categories: [kitchen]}
treatment: {price_change: -0.1}
seed: 3
"""
PRODUCT_EXPERIMENT = """\
name: garden-cut
design: time_bound
start: 2025-06-09
end: 2025-06-29
population: {categories: [garden]}
treatment: {price_change: -0.1}
seed: 4
"""


def write_market(root: Path) -> Path:
    """24 products, four months of daily sales in 2025, a cluster and a product experiment that
    start before the last sales day (so the default snapshot would come after their starts)."""
    (root / "input" / "sales").mkdir(parents=True)
    (root / "input" / "experiments").mkdir()
    catalog = pd.DataFrame([
        {"product_id": f"{sub}-{i}", "category": cat, "subclass": sub, "pack_size": float(i % 3)}
        for cat, sub in SUBCLASSES for i in range(6)
    ])
    catalog.to_parquet(root / "input" / "catalog.parquet", index=False)
    rng = np.random.default_rng(0)
    sales = pd.DataFrame([
        {"product_id": pid, "date": day, "price": round(float(10 + rng.normal()), 2), "units": float(rng.poisson(20))}
        for pid in catalog["product_id"] for day in HISTORY
    ])
    sales.to_parquet(root / "input" / "sales" / "history.parquet", index=False)
    (root / "input" / "experiments" / "kitchen.yaml").write_text(CLUSTER_EXPERIMENT)
    (root / "input" / "experiments" / "garden.yaml").write_text(PRODUCT_EXPERIMENT)
    return root


def user_env(root: Path) -> dict[str, str]:
    """What a new user has: PRICELAB_DATA_DIR and nothing else of ours."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PRICELAB_", "DAGSTER_", "SPARK_", "PYSPARK_", "GX_"))}
    env["PRICELAB_DATA_DIR"] = str(root)
    env["PRICELAB_TODAY"] = "2025-07-01"  # "today", so the run is the same on any day
    return env


def pricelab(root: Path, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PRICELAB, *args], env={**user_env(root), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=root)


def assert_no_traceback(out: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]


def test_bad_command_line_exits_2_in_one_line(tmp_path):
    out = pricelab(tmp_path, "publish", "2025-13-01")
    assert out.returncode == 2 and out.stderr.strip() == "pricelab: error: '2025-13-01' is not a day YYYY-MM-DD"
    out = pricelab(tmp_path, "no-such-command")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    assert_no_traceback(out)


def test_partitions_start_at_the_month_of_the_earliest_experiment_and_unknown_ones_name_the_range(tmp_path):
    root = write_market(tmp_path)
    script = "from jobs.definitions import DAILY_PARTITIONS as d; print(d.get_first_partition_key())"
    out = subprocess.run([sys.executable, "-c", script], env=user_env(root), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2025-06-01", out.stderr[-2000:]
    out = pricelab(root, "publish", "2025-05-31")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().startswith("pricelab: error: partition '2025-05-31' of daily_assignments does not exist: "
                                         "valid keys are days YYYY-MM-DD from 2025-06-01 to ")
    assert len(out.stderr.strip().splitlines()) == 1
    assert_no_traceback(out)


def test_validate_inputs_prints_every_refusal_and_exits_3(tmp_path):
    root = write_market(tmp_path)
    out = pricelab(root, "validate-inputs")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sales: 2184 row(s) read, 2184 accepted, 0 refused" in out.stdout
    pd.DataFrame({"product_id": ["k1-0", "k1-1", "nope"], "date": ["2025-07-01", "2025-07-01", "2025-07-01"],
                  "price": ["-1", "Infinity", "3"], "units": ["1", "2", "3"]}).to_csv(root / "input" / "sales" / "bad.csv", index=False)
    (root / "input" / "experiments" / "typo.yaml").write_text(PRODUCT_EXPERIMENT.replace("time_bound", "time_bond").replace("garden-cut", "other"))
    started = time.time()
    out = pricelab(root, "validate-inputs")
    assert time.time() - started < 60
    assert out.returncode == 3, out.stdout + out.stderr
    assert "bad.csv row k1-0|2025-07-01: field 'price' price must be > 0" in out.stdout
    assert "bad.csv row k1-1|2025-07-01: field 'price' price is not finite (NaN or Infinity)" in out.stdout
    assert "bad.csv row nope|2025-07-01: field 'product_id' product_id is not in the catalogue" in out.stdout
    assert "typo.yaml: field 'design': unknown design 'time_bond'" in out.stdout
    assert "pricelab: validate-inputs: 4 refusal(s)" in out.stdout
    assert_no_traceback(out)


def test_retire_refuses_what_is_not_an_ended_enrolled_experiment(tmp_path):
    root = write_market(tmp_path)
    out = pricelab(root, "retire", "kitchen-cut")
    assert out.returncode == 2
    assert out.stderr.strip() == "pricelab: error: retire refused: 'kitchen-cut' is not an enrolled experiment (enrolled: none)"


def _instance(root: Path):
    """The instance the CLI used (its storage, jobs.instance.PricelabStorage, reads DAGSTER_HOME)."""
    import dagster as dg

    before = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(root / ".dagster_home")
    try:
        return dg.DagsterInstance.get()
    finally:
        if before is None:
            os.environ.pop("DAGSTER_HOME")
        else:
            os.environ["DAGSTER_HOME"] = before


SLEEPY_JOB = """
import time, dagster as dg
from jobs.resources import WarehouseResource

@dg.op(required_resource_keys={"warehouse"})
def wait(context):
    open("started", "w").write("x")
    time.sleep(600)

@dg.job(resource_defs={"warehouse": WarehouseResource()})
def sleepy():
    wait()

sleepy.execute_in_process(instance=dg.DagsterInstance.get())
"""


def test_a_killed_run_is_marked_failed_by_the_next_command(tmp_path):
    (tmp_path / ".dagster_home").mkdir()
    env = {**user_env(tmp_path), "DAGSTER_HOME": str(tmp_path / ".dagster_home")}
    killed = subprocess.Popen([sys.executable, "-c", SLEEPY_JOB], env=env, cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "started").exists():
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    runs = _instance(tmp_path).get_runs()
    assert [(r.job_name, r.status.value) for r in runs] == [("sleepy", "STARTED")]
    out = pricelab(tmp_path, "retire", "x")  # a command that starts no run still tidies the instance
    assert f"run {runs[0].run_id} was left STARTED by a process that is gone (killed?): marked failed" in out.stdout
    run = _instance(tmp_path).get_run_by_id(runs[0].run_id)
    assert run.status.value == "FAILURE"
    messages = [r.event_log_entry.message or "" for r in _instance(tmp_path).get_records_for_run(runs[0].run_id).records]
    assert any("was left STARTED by process" in m for m in messages), messages[-3:]


@pytest.mark.slow
def test_a_new_user_runs_2025_data_end_to_end(tmp_path):
    root = write_market(tmp_path)
    out = pricelab(root, "run")
    assert_no_traceback(out)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    statuses = sorted((r.job_name, r.status.value) for r in _instance(root).get_runs())
    assert statuses == [("build_graph_job", "SUCCESS"), ("publish_assignments_job", "SUCCESS"), ("refresh_results_job", "SUCCESS")]
    # progress with an estimate, in the console (and so in the run log, which the console logger mirrors)
    logged = out.stdout + out.stderr
    assert "substitution graph: 1/2 snapshot(s) done (50%)" in logged and "~" in logged.split("1/2 snapshot(s) done")[1][:60]
    assert "experiment_results: 2/2 experiment(s) done (100%)" in logged
    instance = _instance(root)
    graph_run = next(r for r in instance.get_runs() if r.job_name == "build_graph_job")
    run_log = [e.user_message for e in instance.all_logs(graph_run.run_id) if e.user_message]
    assert any("substitution graph: 2/2 snapshot(s) done (100%)" in m for m in run_log)
    # the cluster experiment starting before the last sales day got a snapshot in force at its start
    from pipelines.spark import get_spark
    from pipelines.storage import Warehouse

    warehouse, spark = Warehouse(root), get_spark()
    assert warehouse.partitions("product_clusters", "snapshot_date") == ["2025-06-02", "2025-07-01"]
    # what the UI shows is the warehouse's truth: each snapshot is a partition key of both assets,
    # materialised by the one build_graph_job run (a range over the two keys)
    assert_snapshots_in_the_ui(instance, warehouse)
    assert graph_run.tags["dagster/asset_partition_range_start"] == "2025-06-02"
    assert graph_run.tags["dagster/asset_partition_range_end"] == "2025-07-01"
    days = warehouse.partitions("daily_assignments", "date")
    assert days[0] == "2025-06-02" and days[-1] == "2025-06-29" and len(days) == 28
    results = warehouse.read(spark, "experiment_results").toPandas()
    assert sorted(set(results["experiment"])) == ["garden-cut", "kitchen-cut"]
    assert results["effect"].notna().all() and (results["n_products"] == 12).all()
    # an ended experiment whose file is gone can be retired, and only then
    out = pricelab(root, "retire", "kitchen-cut")
    assert out.returncode == 2 and "still has a file (kitchen.yaml)" in out.stderr
    (root / "input" / "experiments" / "kitchen.yaml").unlink()
    out = pricelab(root, "retire", "kitchen-cut")
    assert out.returncode == 0, out.stderr
    assert (root / "warehouse" / "retired_experiments" / "kitchen-cut.json").exists()
    # --snapshot-date picks the key: registered, built, shown; an existing one is reused, not rewritten
    out = pricelab(root, "build-graph", "--snapshot-date", "2025-06-16")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "snapshot(s) 2025-06-16 (new partition keys: 2025-06-16)" in out.stdout
    assert warehouse.partitions("product_clusters", "snapshot_date") == ["2025-06-02", "2025-06-16", "2025-07-01"]
    assert_snapshots_in_the_ui(_instance(root), warehouse)
    out = pricelab(root, "build-graph")
    assert out.returncode == 0 and "snapshot(s) 2025-07-01 (new partition keys: none)" in out.stdout, out.stdout[-3000:]
    assert "snapshot 2025-07-01 exists and is never rewritten; reusing it" in out.stdout + out.stderr


def assert_snapshots_in_the_ui(instance, warehouse) -> None:
    """The instance lists every warehouse snapshot as a `snapshot_date` key, materialised for both assets."""
    import dagster as dg

    from assets.partitions import SNAPSHOT_PARTITIONS_NAME

    built = warehouse.partitions("substitution_graph", "snapshot_date")
    assert built == warehouse.partitions("product_clusters", "snapshot_date")
    assert sorted(instance.get_dynamic_partitions(SNAPSHOT_PARTITIONS_NAME)) == built
    for asset in ("substitution_graph", "product_clusters"):
        assert instance.get_materialized_partitions(dg.AssetKey(asset)) == set(built), asset


@pytest.mark.slow
def test_a_cluster_experiment_without_a_snapshot_is_not_a_silent_success(tmp_path):
    from pipelines.experiments import load_experiments, specs_to_frame
    from pipelines.storage import Warehouse

    root = write_market(tmp_path)
    catalog = pd.read_parquet(root / "input" / "catalog.parquet")
    specs, refused = load_experiments(root / "input" / "experiments", catalog)
    assert not refused
    warehouse = Warehouse(root)  # accepted experiments and catalogue, but no graph built yet
    warehouse.write(specs_to_frame(specs), "experiments")
    warehouse.write(catalog, "catalog")
    out = pricelab(root, "publish", "2025-06-09")
    assert_no_traceback(out)
    assert out.returncode == 3, out.stdout[-4000:] + out.stderr[-2000:]
    assert "check daily_assignments:experiments_published failed (WARN)" in out.stdout
    assert "not_published: kitchen-cut: no product_clusters snapshot dated on or before its start 2025-06-02" in out.stdout
    assert out.stdout.strip().endswith("pricelab: done, with refusals (exit 3)")
    from pipelines.spark import get_spark

    published = warehouse.read(get_spark(), "daily_assignments", ("date", "2025-06-09")).toPandas()
    assert set(published["experiment"]) == {"garden-cut"}
