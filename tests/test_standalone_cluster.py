"""The same publishing on a Spark standalone cluster as locally: a loopback master and one
worker started with the pyspark wheel's own `sbin/spark-daemon.sh` (the README's commands),
stopped by their PIDs. Publishing only (inputs written directly, no graph build) keeps the test
short; the published days, enrolments and the Spark UI link are compared."""
from __future__ import annotations

import json
import os
import urllib.request
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.test_cli import pricelab, write_market


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.3)
    return False


@pytest.fixture
def standalone_master(tmp_path):
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    daemon = spark_home / "sbin" / "spark-daemon.sh"
    work = tmp_path / "spark"
    env = {**os.environ, "SPARK_HOME": str(spark_home), "SPARK_LOG_DIR": str(work / "logs"),
           "SPARK_PID_DIR": str(work / "pids"), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_WORKER_DIR": str(work / "worker"),
           "SPARK_NO_DAEMONIZE": ""}
    env.pop("SPARK_NO_DAEMONIZE")
    port, ui, worker_ui = _free_port(), _free_port(), _free_port()
    master_url = f"spark://127.0.0.1:{port}"
    subprocess.run([str(daemon), "start", "org.apache.spark.deploy.master.Master", "1",
                    "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui)], env=env, check=True,
                   capture_output=True, timeout=60)
    subprocess.run([str(daemon), "start", "org.apache.spark.deploy.worker.Worker", "1",
                    "--host", "127.0.0.1", "--cores", "2", "--memory", "2g", "--webui-port", str(worker_ui), master_url],
                   env=env, check=True, capture_output=True, timeout=60)
    pids = [int(p.read_text()) for p in sorted((work / "pids").glob("*.pid"))]
    try:
        assert len(pids) == 2 and _wait_for_port(port, 60), "the standalone master did not start"
        yield master_url, ui
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for pid in pids:
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def prepared_market(root: Path) -> Path:
    """The CLI test market with accepted experiments, catalogue and a clusters snapshot written
    directly (pandas), so only publishing runs on Spark."""
    from pipelines.experiments import load_experiments, specs_to_frame
    from pipelines.storage import Warehouse

    write_market(root)
    catalog = pd.read_parquet(root / "input" / "catalog.parquet")
    specs, refused = load_experiments(root / "input" / "experiments", catalog)
    assert not refused
    warehouse = Warehouse(root)
    warehouse.write(specs_to_frame(specs), "experiments")
    warehouse.write(catalog, "catalog")
    clusters = catalog.assign(cluster_id=catalog["subclass"] + "-" + (catalog["pack_size"].astype(int) % 2).astype(str))
    warehouse.write(clusters[["product_id", "cluster_id"]].assign(reason="edges"), "product_clusters", ("snapshot_date", "2025-06-01"))
    return root


def _published(root: Path) -> pd.DataFrame:
    from pipelines.spark import get_spark
    from pipelines.storage import Warehouse

    frame = Warehouse(root).read(get_spark(), "daily_assignments").toPandas()
    frame["date"] = frame["date"].astype(str)
    return frame.sort_values(["date", "experiment", "product_id"]).reset_index(drop=True)


@pytest.mark.slow
def test_publishing_on_a_standalone_cluster_equals_the_local_run(standalone_master, spark, tmp_path):
    import dagster as dg

    from pipelines.storage import Warehouse

    from assets.assignments import daily_assignments_asset
    from jobs.definitions import DAILY_PARTITIONS
    from jobs.resources import SparkResource, WarehouseResource

    local, cluster = prepared_market(tmp_path / "local"), prepared_market(tmp_path / "cluster")
    days = "2025-06-09..2025-06-15"  # one week in which both experiments run (the daily path has its own test)
    # the local run: the same asset on the tests' local session (in this process, no second JVM)
    done = dg.materialize(
        [daily_assignments_asset(DAILY_PARTITIONS)], resources={"spark": SparkResource(), "warehouse": WarehouseResource(data_dir=str(local))},
        tags={"dagster/asset_partition_range_start": "2025-06-09", "dagster/asset_partition_range_end": "2025-06-15"},
    )
    assert done.success
    master_url, ui_port = standalone_master
    on_cluster = pricelab(cluster, "publish", days, env={"PRICELAB_SPARK_MASTER": master_url})
    assert on_cluster.returncode == 0, on_cluster.stdout[-3000:] + on_cluster.stderr[-2000:]
    assert f"Spark master {master_url}" in on_cluster.stdout  # the run says where it ran
    # ... and the master saw it: one completed application, pricelab's
    deadline = time.time() + 30
    while True:  # the master notices the driver's end within seconds
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=10) as answer:
            state = json.load(answer)
        if state["completedapps"] or time.time() > deadline:
            break
        time.sleep(1)
    assert [app["name"] for app in state["completedapps"]] == ["pricelab"] and len(state["workers"]) == 1
    a, b = _published(local), _published(cluster)
    assert len(a) == 2 * 7 * 12 and a.equals(b)  # two experiments of 12 products, 7 days
    for name in ("kitchen-cut", "garden-cut"):
        pa, pb = (Warehouse(r).read(spark, "enrolments", ("experiment", name)).toPandas()
                  .sort_values("product_id").reset_index(drop=True) for r in (local, cluster))
        assert pa.equals(pb)
