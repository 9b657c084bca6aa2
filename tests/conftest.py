"""Shared fixtures: one SparkSession for the whole test session, temporary data directories."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def spark():
    from pipelines.spark import get_spark

    session = get_spark(app_name="pricelab-tests", conf={"spark.sql.shuffle.partitions": "2"})
    yield session
    session.stop()
