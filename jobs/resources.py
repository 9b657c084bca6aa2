"""Resources: the one SparkSession and the warehouse directory, chosen from the environment."""
from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pyspark.sql import SparkSession

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
    what the cluster should use (0 / empty: the cluster's own defaults)."""

    master: str = ""
    remote: str = ""
    jars_dir: str = ""
    shuffle_partitions: int = 0
    driver_memory: str = ""
    executor_memory: str = ""
    executor_cores: int = 0
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
        return get_spark(master=self.master or None, remote=self.remote or None, jars=jars, conf=self.spark_conf())


# Environment variables read into SparkResource (only those set: an unset EnvVar is an error).
SPARK_ENV = {
    "master": "PRICELAB_SPARK_MASTER",
    "remote": "PRICELAB_SPARK_REMOTE",
    "shuffle_partitions": "PRICELAB_SPARK_SHUFFLE_PARTITIONS",
    "driver_memory": "PRICELAB_SPARK_DRIVER_MEMORY",
    "executor_memory": "PRICELAB_SPARK_EXECUTOR_MEMORY",
    "executor_cores": "PRICELAB_SPARK_EXECUTOR_CORES",
}


def spark_resource() -> SparkResource:
    fields = {}
    for name, variable in SPARK_ENV.items():
        if os.environ.get(variable, "").strip():
            fields[name] = dg.EnvVar.int(variable) if name in ("shuffle_partitions", "executor_cores") else dg.EnvVar(variable)
    return SparkResource(**fields)


class WarehouseResource(dg.ConfigurableResource):
    """Where inputs are read and outputs written: PRICELAB_DATA_DIR, default ./data."""

    data_dir: str = ""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # every run records its process, so a killed run can be told apart (jobs/runs.py)
        record_run_process(context.instance, context.run_id)

    def get(self) -> Warehouse:
        return Warehouse(self.data_dir or None)


def default_resources() -> dict:
    warehouse = WarehouseResource(data_dir=dg.EnvVar("PRICELAB_DATA_DIR")) if os.environ.get("PRICELAB_DATA_DIR") else WarehouseResource()
    return {"spark": spark_resource(), "warehouse": warehouse}
