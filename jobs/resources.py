"""Resources: the one SparkSession and the warehouse directory, chosen from the environment."""
from __future__ import annotations

from pathlib import Path

import dagster as dg
from pyspark.sql import SparkSession

from pipelines.spark import get_spark, jar_files
from pipelines.storage import Warehouse


# Where `make setup` copies the JVM jars pinned in jvm/pom.xml (GraphFrames).
PROJECT_JARS_DIR = Path(__file__).resolve().parents[1] / "jars"


class SparkResource(dg.ConfigurableResource):
    """The process's SparkSession. Empty fields fall back to PRICELAB_SPARK_MASTER /
    PRICELAB_SPARK_REMOTE, then to an embedded `local[*]` session; `jars_dir` (default: the
    project's ./jars) holds the jars put on its classpath."""

    master: str = ""
    remote: str = ""
    jars_dir: str = ""

    def session(self) -> SparkSession:
        jars = jar_files(self.jars_dir or PROJECT_JARS_DIR)
        return get_spark(master=self.master or None, remote=self.remote or None, jars=jars)


class WarehouseResource(dg.ConfigurableResource):
    """Where inputs are read and outputs written: PRICELAB_DATA_DIR, default ./data."""

    data_dir: str = ""

    def get(self) -> Warehouse:
        return Warehouse(self.data_dir or None)


def default_resources() -> dict:
    return {"spark": SparkResource(), "warehouse": WarehouseResource()}
