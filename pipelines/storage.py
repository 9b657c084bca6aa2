"""Parquet storage under one warehouse directory, written atomically.

Every write goes to a hidden temporary sibling first and is renamed into place only when
complete, so a killed run never leaves half a table or half a partition behind. Paths are local
(or any mounted filesystem where rename is atomic).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pandas as pd
from pyspark.sql import DataFrame, SparkSession


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The warehouse root: the argument, else `PRICELAB_DATA_DIR`, else `./data`."""
    return Path(explicit or os.environ.get("PRICELAB_DATA_DIR") or "data").resolve()


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` with renames only; the old copy is removed last."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _tmp_sibling(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_spark_parquet(df: DataFrame, path: str | os.PathLike) -> Path:
    """Write a Spark DataFrame as a Parquet directory at `path`, atomically."""
    final = Path(path)
    tmp = _tmp_sibling(final)
    df.write.mode("overwrite").parquet(str(tmp))
    _swap_into_place(tmp, final)
    return final


def write_pandas_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame as a Parquet directory holding one file, atomically."""
    final = Path(path)
    tmp = _tmp_sibling(final)
    tmp.mkdir()
    df.to_parquet(tmp / "part-00000.parquet", index=False)
    _swap_into_place(tmp, final)
    return final


def write_text(text: str | bytes, path: str | os.PathLike) -> Path:
    """Write a small file (report, YAML, PNG) atomically."""
    final = Path(path)
    tmp = _tmp_sibling(final)
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, final)
    return final


def parquet_exists(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() or (p.is_dir() and any(p.glob("*.parquet")))


def read_spark_parquet(spark: SparkSession, path: str | os.PathLike) -> DataFrame:
    return spark.read.parquet(str(path))


def read_pandas_parquet(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_parquet(path)
