"""Shared fixtures: one SparkSession for the whole test session, temporary data directories."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# `make setup` copies the pinned JVM jars (GraphFrames) here; the session loads them from disk.
PROJECT_JARS_DIR = Path(__file__).resolve().parents[1] / "jars"

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
# The tests' markets live in temporary directories, not in PRICELAB_DATA_DIR, so the partitions
# cannot start from their experiments (jobs/definitions.py); a fixed early start covers them all.
os.environ.setdefault("PRICELAB_PARTITIONS_START", "2024-01-01")


@pytest.fixture(scope="session")
def spark():
    from pipelines.spark import get_spark, jar_files

    session = get_spark(
        app_name="pricelab-tests", conf={"spark.sql.shuffle.partitions": "2"}, jars=jar_files(PROJECT_JARS_DIR)
    )
    yield session
    session.stop()


# Test files that share a session-cached market (tests.test_bad_inputs.published_market_root, about
# 90 s to build): `make test`'s --dist loadfile sends each to the worker of its partner, so the
# market is built once instead of once per worker.
SHARED_MARKET_FILES = {"tests/test_bad_inputs_cli.py": "tests/test_bad_inputs.py"}


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None  # xdist's own scheduler for any other mode

    from xdist.scheduler import LoadFileScheduling

    class SharedMarketScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_MARKET_FILES.get(scope, scope)

    return SharedMarketScheduling(config, log)
