"""Parquet storage under one warehouse directory, written atomically.

Every write goes to a hidden temporary sibling first and is renamed into place only when
complete, so a killed run never leaves half a table or half a partition behind. Paths are local
(or any mounted filesystem where rename is atomic).

Replacing an existing table takes two renames (old copy aside, new copy in). A kill between
them leaves the table's name empty and its old copy beside it (`.<name>.old-<pid>-<id>`):
`recover` (run before every read, listing and write) puts the old copy back, so a table is never
missing. Temporary siblings of a process that no longer runs are removed at the next write.
Writers of one table exclude each other with `Warehouse.lock` (an fcntl lock file).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd
from pyspark.sql import DataFrame, SparkSession


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The warehouse root: the argument, else `PRICELAB_DATA_DIR`, else `./data`."""
    return Path(explicit or os.environ.get("PRICELAB_DATA_DIR") or "data").resolve()


class WarehouseLockedError(RuntimeError):
    """Another process holds the write lock of a table."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _sibling(final: Path, kind: str) -> Path:
    """A hidden sibling `.<name>.<kind>-<pid>-<id>`: the pid says whether its writer still runs."""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _sibling_owner(path: Path, final_name: str, kind: str) -> int | None:
    """The writer pid of a `_sibling` of `final_name`, None when `path` is not one."""
    prefix = f".{final_name}.{kind}-"
    if not path.name.startswith(prefix):
        return None
    pid = path.name[len(prefix):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else 0  # an old-style name (no pid): its writer is gone


def recover(final: Path) -> None:
    """Undo what a kill between the two renames of `_swap_into_place` left: when `final` is
    missing and an old copy of it lies beside it, put that copy back; old copies of a table that
    is in place are leftovers and go."""
    parent = final.parent
    if not parent.is_dir():
        return
    olds = sorted(p for p in parent.iterdir() if _sibling_owner(p, final.name, "old") is not None)
    if not olds:
        return
    if not final.exists():
        os.replace(olds[-1], final)
        olds = olds[:-1]
    for old in olds:
        _remove(old)


def clean_stale_temporaries(final: Path) -> None:
    """Remove temporary siblings of `final` whose writing process no longer runs."""
    parent = final.parent
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        pid = _sibling_owner(path, final.name, "tmp")
        if pid is not None and (pid == 0 or (pid != os.getpid() and not _pid_alive(pid))):
            _remove(path)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` with renames only; the old copy is removed last.

    A kill between the two renames leaves the old copy beside `final`; `recover` restores it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    old = _sibling(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


def _tmp_sibling(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    return _sibling(final, "tmp")


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

    def recover(self, table: str) -> None:
        """Put back any copy of `table` (or of one of its partitions) that a kill between two
        renames left aside; see `recover`."""
        base = self.path(table)
        recover(base)
        if base.is_dir() and any(p.name.startswith(".") and ".old-" in p.name for p in base.iterdir()):
            for name in {p.name[1:].split(".old-")[0] for p in base.iterdir() if p.name.startswith(".") and ".old-" in p.name}:
                recover(base / name)

    @contextlib.contextmanager
    def lock(self, table: str):
        """Hold the write lock of `table` (`warehouse/.locks/<table>.lock`, fcntl, released when
        the process dies). Raises `WarehouseLockedError` at once when another process holds it."""
        locks = self.tables_dir / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        path = locks / f"{table.replace('/', '_')}.lock"
        handle = open(path, "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise WarehouseLockedError(
                    f"warehouse table '{table}' is being written by {holder} (lock {path}); "
                    "wait for that run to end, then run again"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            yield path
        finally:
            handle.close()

    def exists(self, table: str, partition: tuple[str, str] | None = None) -> bool:
        self.recover(table)
        return parquet_exists(self.path(table, partition))

    def partitions(self, table: str, key: str) -> list[str]:
        """Values of partition column `key` that have been written, sorted."""
        self.recover(table)
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
        self.recover(table)
        if not self.exists(table, partition) and not self.partitions(table, partition[0] if partition else "date"):
            raise FileNotFoundError(f"warehouse table '{table}' has not been written yet ({self.path(table, partition)})")
        if partition:
            return spark.read.option("basePath", str(self.path(table))).parquet(str(self.path(table, partition)))
        return spark.read.parquet(str(self.path(table)))

    def write_file(self, relative: str, content: str | bytes) -> Path:
        """A report or picture under `warehouse/`, written atomically."""
        return write_text(content, self.tables_dir / relative)
