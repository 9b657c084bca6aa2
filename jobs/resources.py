"""Resources: the one SparkSession and the warehouse directory, chosen from the environment."""
from __future__ import annotations

import dagster as dg
from pyspark.sql import SparkSession

from pipelines.spark import get_spark
from pipelines.storage import Warehouse


class SparkResource(dg.ConfigurableResource):
    """The process's SparkSession. Empty fields fall back to PRICELAB_SPARK_MASTER /
    PRICELAB_SPARK_REMOTE, then to an embedded `local[*]` session."""

    master: str = ""
    remote: str = ""

    def session(self) -> SparkSession:
        return get_spark(master=self.master or None, remote=self.remote or None)


class WarehouseResource(dg.ConfigurableResource):
    """Where inputs are read and outputs written: PRICELAB_DATA_DIR, default ./data."""

    data_dir: str = ""

    def get(self) -> Warehouse:
        return Warehouse(self.data_dir or None)


def default_resources() -> dict:
    return {"spark": SparkResource(), "warehouse": WarehouseResource()}
