"""The process environment, read in one place.

`pipelines` and `assets` never read environment variables: `pipelines` takes plain arguments, and
assets get their settings from the resources (`jobs/resources.py`, built from `dg.EnvVar`) or from
run config. The command line, the demo and the definitions read what they need here.
"""
from __future__ import annotations

import os
from datetime import date
from pathlib import Path

DATA_DIR = "PRICELAB_DATA_DIR"
WAREHOUSE_URL = "PRICELAB_WAREHOUSE_URL"
TODAY = "PRICELAB_TODAY"
DEMO = "PRICELAB_DEMO"
PARTITIONS_START = "PRICELAB_PARTITIONS_START"
SPARK_MASTER = "PRICELAB_SPARK_MASTER"
SPARK_REMOTE = "PRICELAB_SPARK_REMOTE"


def _text(name: str) -> str:
    return os.environ.get(name, "").strip()


def data_dir() -> Path:
    """PRICELAB_DATA_DIR, else ./data."""
    return Path(_text(DATA_DIR) or "data").expanduser().resolve()


def warehouse_url() -> str | None:
    """PRICELAB_WAREHOUSE_URL (tables anywhere Hadoop's filesystems reach), else None: `<data>/warehouse`."""
    return _text(WAREHOUSE_URL) or None


def today() -> date | None:
    """PRICELAB_TODAY (YYYY-MM-DD: replays of past days, tests), else None: the real UTC date."""
    fixed = _text(TODAY)
    return date.fromisoformat(fixed) if fixed else None


def demo_mode() -> bool:
    """PRICELAB_DEMO=1 (set by `make demo`): the simulator's assets join the definitions."""
    return _text(DEMO).lower() in ("1", "true", "yes")


def partitions_start() -> str | None:
    """PRICELAB_PARTITIONS_START (YYYY-MM-DD), else None: the month of the earliest experiment start."""
    return _text(PARTITIONS_START) or None


def spark_where() -> str:
    """Where the Spark session runs, for progress lines."""
    remote = _text(SPARK_REMOTE)
    return f"Spark Connect {remote}" if remote else f"Spark master {_text(SPARK_MASTER) or 'local[*]'}"
