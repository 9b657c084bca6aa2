"""Resources: the one SparkSession and the warehouse, built from the environment through `dg.EnvVar`."""
from __future__ import annotations

import os
import sys
from datetime import date
from pathlib import Path

import dagster as dg
from pyspark.sql import SparkSession

from jobs import settings
from jobs.runs import record_run_process
from pipelines.spark import get_spark, jar_files
from pipelines.storage import Warehouse


# Where `make setup` copies the JVM jars pinned in jvm/pom.xml (GraphFrames).
PROJECT_JARS_DIR = Path(__file__).resolve().parents[1] / "jars"


class SparkResource(dg.ConfigurableResource):
    """The process's SparkSession, configured in the Dagster resource (the UI's Resources page
    shows it; `default_resources` fills it from environment variables through `dg.EnvVar`).

    Empty `master`/`remote` fall back to an embedded `local[*]` session. The settings results
    depend on (UTC session time zone, Arrow, adaptive execution) apply on every master
    (`pipelines.spark.EVERYWHERE`); the small-machine sizes only on `local[*]`. On a cluster,
    `shuffle_partitions`, `driver_memory`, `executor_memory`, `executor_cores` and `conf` set
    what the cluster should use (0 / empty: the cluster's own defaults); `python` the Python its
    executors run pandas UDFs with (empty: this interpreter)."""

    master: str = ""
    remote: str = ""
    jars_dir: str = ""
    shuffle_partitions: int = 0
    driver_memory: str = ""
    executor_memory: str = ""
    executor_cores: int = 0
    python: str = ""
    conf: dict[str, str] = {}

    def spark_conf(self) -> dict[str, str]:
        settings = dict(self.conf)
        if self.shuffle_partitions:
            settings["spark.sql.shuffle.partitions"] = str(self.shuffle_partitions)
        if self.driver_memory:
            settings["spark.driver.memory"] = self.driver_memory
        if self.executor_memory:
            settings["spark.executor.memory"] = self.executor_memory
        if self.executor_cores:
            settings["spark.executor.cores"] = str(self.executor_cores)
        return settings

    def session(self) -> SparkSession:
        jars = jar_files(self.jars_dir or PROJECT_JARS_DIR)
        if self.remote.startswith("local"):
            # an embedded Connect server is a JVM this process starts: its Python workers are the
            # PYSPARK_PYTHON of the environment it inherits (a remote server has its own)
            os.environ.setdefault("PYSPARK_PYTHON", self.python or sys.executable)
        return get_spark(master=self.master or None, remote=self.remote or None, jars=jars, conf=self.spark_conf(),
                         python=self.python or None)


# Environment variables read into SparkResource (only those set: an unset EnvVar is an error).
SPARK_ENV = {
    "master": settings.SPARK_MASTER,
    "remote": settings.SPARK_REMOTE,
    "shuffle_partitions": "PRICELAB_SPARK_SHUFFLE_PARTITIONS",
    "driver_memory": "PRICELAB_SPARK_DRIVER_MEMORY",
    "executor_memory": "PRICELAB_SPARK_EXECUTOR_MEMORY",
    "executor_cores": "PRICELAB_SPARK_EXECUTOR_CORES",
    "python": "PYSPARK_PYTHON",  # the executors' Python, where it is not this interpreter's path
}


def spark_resource() -> SparkResource:
    fields = {}
    for name, variable in SPARK_ENV.items():
        if os.environ.get(variable, "").strip():
            fields[name] = dg.EnvVar.int(variable) if name in ("shuffle_partitions", "executor_cores") else dg.EnvVar(variable)
    return SparkResource(**fields)


class WarehouseResource(dg.ConfigurableResource):
    """Where inputs are read and outputs written, and the day the run treats as today.

    `data_dir` (PRICELAB_DATA_DIR, default ./data) holds `input/` and the reports; `tables_url`
    (PRICELAB_WAREHOUSE_URL, default `<data_dir>/warehouse`) the Delta tables; `today`
    (PRICELAB_TODAY, YYYY-MM-DD, default the UTC date) bounds the sales dates accepted."""

    data_dir: str = ""
    tables_url: str = ""
    today: str = ""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # every run records its process, so a killed run can be told apart (jobs/runs.py)
        record_run_process(context.instance, context.run_id)

    def get(self) -> Warehouse:
        return Warehouse(self.data_dir or None, tables_url=self.tables_url or None)

    def as_of(self) -> date | None:
        """The fixed "today", or None (the real UTC date)."""
        return date.fromisoformat(self.today) if self.today else None


# Environment variables read into WarehouseResource (only those set).
WAREHOUSE_ENV = {"data_dir": settings.DATA_DIR, "tables_url": settings.WAREHOUSE_URL, "today": settings.TODAY}


def warehouse_resource() -> WarehouseResource:
    return WarehouseResource(**{name: dg.EnvVar(v) for name, v in WAREHOUSE_ENV.items() if os.environ.get(v, "").strip()})


def default_resources() -> dict:
    return {"spark": spark_resource(), "warehouse": warehouse_resource()}


# Outside a Dagster run (the CLI, the demo's summary) the same resources, their EnvVars resolved.
def warehouse_from_environment() -> Warehouse:
    return warehouse_resource().process_config_and_initialize().get()


def spark_from_environment() -> SparkSession:
    return spark_resource().process_config_and_initialize().session()
