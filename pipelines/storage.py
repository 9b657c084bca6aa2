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


class Warehouse:
    """The data directory's layout: `input/` (contract-v1 inputs) and `warehouse/` (outputs).

    Tables are Parquet directories; a partitioned table keeps one sub-directory per value
    (`daily_assignments/date=2026-01-05/`), written and replaced one partition at a time, with
    the partition column in the path only, so Spark's partition discovery adds it back on read.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = data_dir(root)

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def tables_dir(self) -> Path:
        return self.root / "warehouse"

    def path(self, table: str, partition: tuple[str, str] | None = None) -> Path:
        base = self.tables_dir / table
        return base / f"{partition[0]}={partition[1]}" if partition else base

    def exists(self, table: str, partition: tuple[str, str] | None = None) -> bool:
        return parquet_exists(self.path(table, partition))

    def partitions(self, table: str, key: str) -> list[str]:
        """Values of partition column `key` that have been written, sorted."""
        base = self.path(table)
        if not base.is_dir():
            return []
        prefix = f"{key}="
        return sorted(
            p.name[len(prefix):] for p in base.iterdir() if p.is_dir() and p.name.startswith(prefix) and parquet_exists(p)
        )

    def write(self, df, table: str, partition: tuple[str, str] | None = None) -> Path:
        """Write (replace) a table or one partition of it, atomically. Spark or pandas input."""
        target = self.path(table, partition)
        if isinstance(df, pd.DataFrame):
            frame = df.drop(columns=[partition[0]], errors="ignore") if partition else df
            return write_pandas_parquet(frame, target)
        frame = df.drop(partition[0]) if partition else df
        return write_spark_parquet(frame, target)

    def write_partitions(self, df: DataFrame, table: str, key: str, values: list[str]) -> list[Path]:
        """Write several partitions of a Spark DataFrame in one Spark job, each moved into place
        atomically. A value with no rows gets an empty partition (published as "nothing")."""
        staging = _tmp_sibling(self.path(table))
        df.write.partitionBy(key).parquet(str(staging))
        empty = staging / "_empty"
        written = []
        for value in values:
            source = staging / f"{key}={value}"
            if not parquet_exists(source):
                if not empty.exists():
                    df.sparkSession.createDataFrame([], df.drop(key).schema).coalesce(1).write.parquet(str(empty))
                shutil.copytree(empty, source, dirs_exist_ok=True)
            target = self.path(table, (key, value))
            _swap_into_place(source, target)
            written.append(target)
        shutil.rmtree(staging, ignore_errors=True)
        return written

    def read(self, spark: SparkSession, table: str, partition: tuple[str, str] | None = None) -> DataFrame:
        """Read a table (all partitions) or one partition, keeping the partition column."""
        if not self.exists(table, partition) and not self.partitions(table, partition[0] if partition else "date"):
            raise FileNotFoundError(f"warehouse table '{table}' has not been written yet ({self.path(table, partition)})")
        if partition:
            return spark.read.option("basePath", str(self.path(table))).parquet(str(self.path(table, partition)))
        return spark.read.parquet(str(self.path(table)))

    def write_file(self, relative: str, content: str | bytes) -> Path:
        """A report or picture under `warehouse/`, written atomically."""
        return write_text(content, self.tables_dir / relative)
