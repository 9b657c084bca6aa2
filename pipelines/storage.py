"""The warehouse: Delta Lake tables under one location, plus small files (reports, plots).

Every table is a Delta table (`warehouse/<table>/` with its `_delta_log/`), so every write is one
atomic commit of Delta's transaction log: a killed run leaves the table as it was (data files it
wrote without committing are not part of the table), readers never see half a write, and other
engines read the tables safely. The tables' location is `<data dir>/warehouse` by default;
`Warehouse(tables_url=...)` (PRICELAB_WAREHOUSE_URL, through the warehouse resource) puts them anywhere Spark's Hadoop
filesystems reach (`s3a://bucket/prefix`, `abfss://...`, `gs://...`, `hdfs://...`, `file:///...`).
Inputs, reports and plots stay under the local data directory.

Partitioned tables are written one partition per commit, with `replaceWhere` naming exactly that
partition (Delta refuses a row outside it). Tables in `PUBLISHED` are write-once: a partition is
published by one commit and never written again. That rule is enforced by Delta itself: the
commit carries an idempotent-transaction id for its partition (`txnAppId`), so a second write of
the same partition, from any process or machine, commits nothing, and a writer racing another on
the same partition gets Delta's concurrent-modification conflict; both surface as
`WriteConflictError` with a one-line message, the published partition unchanged. Each commit
records the partition it wrote in its `userMetadata`, so an empty published partition (a day with
no rows) is known too, and `audit_published` reads the table's version history to prove that no
published partition ever changed.

Writers of one table on this machine also exclude each other with `Warehouse.lock` (an fcntl lock
file), which covers a whole run's several writes.

A pricelab v1 warehouse (plain Parquet directories with `key=value` partition folders) is
converted in place to Delta (`CONVERT TO DELTA`) the first time a table is touched, keeping its
empty partitions; a table that cannot be converted is refused with a message saying why.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.delta_log import read_local_delta

# Write-once tables and their partition key: a published partition never changes.
PUBLISHED = {"daily_assignments": "date"}

METADATA_TAG = "pricelab"  # the userMetadata of pricelab's commits: {"pricelab": 1, "table": ..., ...}
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Delta's concurrent-modification errors (class names and error-class prefixes)
CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
             "ConcurrentTransactionException", "ConcurrentWriteException", "MetadataChangedException",
             "ProtocolChangedException", "DELTA_CONCURRENT_")


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else `./data` (jobs/settings.py reads PRICELAB_DATA_DIR)."""
    return Path(explicit or "data").resolve()


class WarehouseLockedError(RuntimeError):
    """Another process holds the write lock of a table."""


class WriteConflictError(RuntimeError):
    """Another writer published, or is writing, the same partition: nothing of this write landed."""


class DeltaUnavailableError(RuntimeError):
    """The Spark session cannot read or write Delta tables (Delta's jars are not on its classpath)."""


class MigrationRefusedError(RuntimeError):
    """A pricelab v1 Parquet table that cannot be converted to Delta."""


# ----------------------------------------------------------------------------------------------
# small local files (reports, plots, YAML), written atomically with a temporary sibling
# ----------------------------------------------------------------------------------------------

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


def clean_stale_temporaries(final: Path) -> None:
    """Remove temporary siblings of `final` whose writing process no longer runs."""
    parent = final.parent
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        pid = _sibling_owner(path, final.name, "tmp")
        if pid is not None and (pid == 0 or (pid != os.getpid() and not _pid_alive(pid))):
            _remove(path)


def recover(final: Path) -> None:
    """Undo what a kill between v1's two renames left (the table's name empty, its old copy
    `.<name>.old-<pid>-<id>` beside it): put the copy back; other old copies go. Used before a
    v1 table is converted to Delta."""
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


def write_text(text: str | bytes, path: str | os.PathLike) -> Path:
    """Write a small file (report, YAML, PNG) atomically."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = _sibling(final, "tmp")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------------------------
# Delta helpers
# ----------------------------------------------------------------------------------------------

def _session() -> SparkSession:
    spark = SparkSession.getActiveSession()
    if spark is None:
        from pipelines.spark import get_spark

        spark = get_spark()
    return spark


def _one_line(error: BaseException, limit: int = 240) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_conflict(error: BaseException) -> str | None:
    text = f"{type(error).__name__} {error}"
    return next((name for name in CONFLICTS if name in text), None)


def _delta_error(error: BaseException) -> BaseException | None:
    """A clear error when `error` says the session has no Delta data source."""
    text = str(error)
    if "DATA_SOURCE_NOT_FOUND" in text or "Failed to find the data source: delta" in text or "DeltaSparkSessionExtension" in text:
        return DeltaUnavailableError(
            "the Spark session cannot use Delta Lake tables: Delta's jars are not on its classpath "
            "(run `make setup`, which fetches them into ./jars — jars/UNAVAILABLE-delta says why when it could "
            "not — or give the session spark.jars.packages=io.delta:delta-spark_4.1_2.13:4.3.0)"
        )
    return None


def _to_spark(spark: SparkSession, frame: pd.DataFrame) -> DataFrame:
    """A pandas frame as a Spark DataFrame, through Arrow; all-null columns become strings."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame, preserve_index=False)
    fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
    table = table.cast(pa.schema(fields))
    return spark.createDataFrame(table)


def _sql_literal(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _commit_metadata(**fields) -> str:
    return json.dumps({METADATA_TAG: 1, **fields}, sort_keys=True)


def _parse_metadata(text) -> dict | None:
    if not text:
        return None
    try:
        meta = json.loads(text)
    except (TypeError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get(METADATA_TAG) else None


_PARTITIONS: dict[tuple[str, str], tuple[tuple, list[str]]] = {}  # (table uri, key) -> (version, values)


def _logged_partition_values(path: Path, key: str) -> set[str] | None:
    """Values of partition column `key` from a local table's Delta log (no Spark job): the live
    files' partition values plus those pricelab's commits recorded (an empty partition has no
    file). None when the log cannot be read that way or `key` is not a partition column."""
    table = read_local_delta(path)
    if table is None:
        return None
    try:
        if key not in table.metadata().partition_columns:
            return None
        values = {str(part.get(key)) for part in table.partitions()}
        commits = table.history()
    except Exception:  # noqa: BLE001
        return None
    for commit in commits:
        meta = _parse_metadata(commit.get("userMetadata"))
        if meta and meta.get("key") == key:
            values.update(str(v) for v in meta.get("values", []))
    return values


class Warehouse:
    """The data directory's layout: `input/` (contract-v1 inputs), `warehouse/` (outputs: Delta
    tables, reports and plots).

    A partitioned table keeps its partition column (`daily_assignments` by `date`,
    `product_clusters` by `snapshot_date`, `enrolments` by `experiment`, ...); it is written and
    replaced one partition at a time, and a partition written with no rows still counts as written.
    """

    def __init__(self, root: str | os.PathLike | None = None, tables_url: str | None = None):
        self.root = data_dir(root)
        url = tables_url or ""
        self.tables_url = url.rstrip("/") if url else str(self.tables_dir)

    # ------------------------------------------------------------------ layout
    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def tables_dir(self) -> Path:
        """The local `warehouse/` folder: reports, plots, locks (and the tables by default)."""
        return self.root / "warehouse"

    @property
    def local_tables(self) -> bool:
        return urlparse(self.tables_url).scheme in ("", "file")

    def uri(self, table: str) -> str:
        """Where table `table` lives (a local path or a URL)."""
        return f"{self.tables_url}/{table}"

    def path(self, table: str, partition: tuple[str, str] | None = None) -> Path:
        """The local folder of a table (or of one partition's files); local tables only."""
        if not self.local_tables:
            raise ValueError(f"warehouse tables are at {self.tables_url}, not on a local path")
        base = Path(urlparse(self.tables_url).path if self.tables_url.startswith("file:") else self.tables_url) / table
        return base / f"{partition[0]}={partition[1]}" if partition else base

    def _exists_on_storage(self, relative: str) -> bool:
        if self.local_tables:
            return (self.path("") / relative).exists()
        spark = _session()
        jvm = spark.sparkContext._jvm
        target = jvm.org.apache.hadoop.fs.Path(f"{self.tables_url}/{relative}")
        return bool(target.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).exists(target))

    def is_delta(self, table: str) -> bool:
        return self._exists_on_storage(f"{table}/_delta_log")

    # ------------------------------------------------------------------ locks
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

    # ------------------------------------------------------------------ migration from v1
    def _ensure_delta(self, table: str) -> bool:
        """True when `table` is a Delta table, converting a v1 Parquet table first; False when
        there is no table."""
        if self.is_delta(table):
            return True
        if not self.local_tables:
            return False
        base = self.path(table)
        recover(base)
        if not base.is_dir():
            return False
        return self._convert_v1(table, base)

    def _convert_v1(self, table: str, base: Path) -> bool:
        for hidden in list(base.iterdir()):  # v1 leftovers of killed writes: partition copies aside, temporaries
            if hidden.name.startswith(".") and ".old-" in hidden.name:
                recover(base / hidden.name[1:].split(".old-")[0])
            elif hidden.name.startswith(".") and ".tmp-" in hidden.name:
                _remove(hidden)
        visible = [p for p in base.iterdir() if not p.name.startswith((".", "_"))]
        files = [p for p in visible if p.is_file() and p.suffix == ".parquet"]
        folders = [p for p in visible if p.is_dir() and "=" in p.name]
        if not files and not folders:
            return False  # an empty folder: no table yet
        refuse = lambda why: MigrationRefusedError(  # noqa: E731
            f"warehouse table '{table}' at {base} is a pricelab v1 Parquet table that cannot be converted to Delta: "
            f"{why}; it is left as it is: move it aside and run again to rebuild it"
        )
        others = [p.name for p in visible if p not in files and p not in folders]
        if others or (files and folders):
            raise refuse(f"unexpected entries {sorted(others)[:3] or [files[0].name]} beside its data")
        key, partition = None, ""
        published = []
        if folders:
            keys = {p.name.split("=", 1)[0] for p in folders}
            if len(keys) != 1:
                raise refuse(f"partition folders of several keys {sorted(keys)}")
            key = keys.pop()
            published = sorted(p.name.split("=", 1)[1] for p in folders if any(p.glob("*.parquet")))
            kind = "DATE" if published and all(ISO_DATE.match(v) for v in published) else "STRING"
            partition = f" PARTITIONED BY (`{key}` {kind})"
            for folder in folders:
                if not any(folder.glob("*.parquet")):
                    _remove(folder)  # a v1 partition never moved into place
        spark = _session()
        meta = _commit_metadata(table=table, operation="convert-v1", key=key, values=published)
        spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", meta)
        try:
            spark.sql(f"CONVERT TO DELTA parquet.`{base}`{partition}")
        except Exception as error:  # noqa: BLE001 - any failure: refuse, naming it
            raise (_delta_error(error) or refuse(_one_line(error))) from None
        finally:
            spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
        return True

    # ------------------------------------------------------------------ reading
    def history(self, table: str, last: int | None = None) -> pd.DataFrame:
        """The table's Delta version history (its `last` commits, default all), oldest first:
        version, timestamp, operation, predicate (a replaceWhere's), metadata (pricelab's
        userMetadata, parsed), removed_files."""
        if not self._ensure_delta(table):
            raise FileNotFoundError(f"warehouse table '{table}' has not been written yet ({self.uri(table)})")
        limit = f" LIMIT {int(last)}" if last else ""
        rows = _session().sql(f"DESCRIBE HISTORY delta.`{self.uri(table)}`{limit}").select(
            "version", "timestamp", "operation", "operationParameters", "operationMetrics", "userMetadata"
        ).collect()
        frame = pd.DataFrame([{
            "version": int(r["version"]),
            "timestamp": r["timestamp"],
            "operation": r["operation"],
            "predicate": (r["operationParameters"] or {}).get("predicate"),
            "metadata": _parse_metadata(r["userMetadata"]),
            "removed_files": int((r["operationMetrics"] or {}).get("numRemovedFiles", 0) or 0),
        } for r in rows], columns=["version", "timestamp", "operation", "predicate", "metadata", "removed_files"])
        return frame.sort_values("version").reset_index(drop=True)

    def exists(self, table: str, partition: tuple[str, str] | None = None) -> bool:
        if not self._ensure_delta(table):
            return False
        return partition is None or partition[1] in self.partitions(table, partition[0])

    def _version(self, table: str) -> tuple | None:
        """The table's latest version and its commit file's identity, from the log's file names
        (local tables; a table dropped and written again gets new files), else None."""
        if not self.local_tables:
            return None
        log = self.path(table) / "_delta_log"
        versions = [n for n in os.listdir(log) if len(n) == 25 and n.endswith(".json") and n[:20].isdigit()]
        if not versions:
            return None
        latest = os.stat(log / max(versions))
        return max(versions), latest.st_ino, latest.st_mtime_ns

    def partitions(self, table: str, key: str) -> list[str]:
        """Values of partition column `key` that have been written (with rows or without), sorted."""
        if not self._ensure_delta(table):
            return []
        version = self._version(table)
        cached = _PARTITIONS.get((self.uri(table), key))
        if version is not None and cached is not None and cached[0] == version:
            return list(cached[1])
        values = _logged_partition_values(self.path(table), key) if self.local_tables else None
        if values is None:  # a remote table, or a log delta-rs cannot read: ask Spark
            frame = _session().read.format("delta").load(self.uri(table))
            if key not in frame.columns:
                return []
            values = {str(r[0]) for r in frame.select(key).distinct().collect()}
            for meta in self.history(table)["metadata"]:
                if meta and meta.get("key") == key:
                    values.update(str(v) for v in meta.get("values", []))
        if version is not None:
            _PARTITIONS[(self.uri(table), key)] = (version, sorted(values))
        return sorted(values)

    def read(self, spark: SparkSession, table: str, partition: tuple[str, str] | None = None) -> DataFrame:
        """Read a table (all partitions) or one partition, keeping the partition column."""
        if not self._ensure_delta(table):
            raise FileNotFoundError(f"warehouse table '{table}' has not been written yet ({self.uri(table)})")
        try:
            frame = spark.read.format("delta").load(self.uri(table))
        except Exception as error:  # noqa: BLE001
            raise (_delta_error(error) or error) from None
        if partition is None:
            return frame
        key, value = partition
        if value not in self.partitions(table, key):
            raise FileNotFoundError(f"warehouse table '{table}' has no partition {key}={value} ({self.uri(table)})")
        return frame.where(F.col(key) == F.lit(value).cast(frame.schema[key].dataType))

    def read_version(self, spark: SparkSession, table: str, version: int) -> DataFrame:
        """The table as it was at `version` (Delta time travel)."""
        return spark.read.format("delta").option("versionAsOf", int(version)).load(self.uri(table))

    # ------------------------------------------------------------------ writing
    def write(self, df, table: str, partition: tuple[str, str] | None = None) -> str:
        """Write (replace) a table or one partition of it, in one Delta commit. Spark or pandas
        input; a partition's column is set to the partition's value."""
        spark = _session()
        frame = _to_spark(spark, df) if isinstance(df, pd.DataFrame) else df
        if partition is None:
            self._ensure_delta(table)  # a v1 table is converted (and its history kept) first
            self._commit(
                frame.write.format("delta").mode("overwrite").option("overwriteSchema", "true"),
                table, _commit_metadata(table=table, run=uuid.uuid4().hex),
            )
            return self.uri(table)
        self._write_partition(frame, table, partition[0], partition[1])
        return self.uri(table)

    def write_partitions(self, df: DataFrame, table: str, key: str, values: list[str]) -> list[str]:
        """Write several partitions of a Spark DataFrame, one Delta commit each (a value with no
        rows is written empty: published as "nothing"). Cache `df` when it is costly to compute."""
        known = self.partitions(table, key)  # read once; a racing writer is caught by Delta itself
        for value in values:
            self._write_partition(df.where(F.col(key) == F.lit(value).cast(df.schema[key].dataType)), table, key, value, known)
            known.append(str(value))
        return [f"{self.uri(table)}/{key}={v}" for v in values]

    def _write_partition(self, frame: DataFrame, table: str, key: str, value: str, known: list[str] | None = None) -> None:
        exists = self._ensure_delta(table)
        spark = frame.sparkSession
        kind = self._column_type(spark, table, key) if exists else None
        if kind is None:
            kind = "date" if ISO_DATE.match(str(value)) else "string"
        frame = frame.withColumn(key, F.lit(str(value)).cast(kind))
        once = PUBLISHED.get(table) == key
        if once and exists and str(value) in (self.partitions(table, key) if known is None else known):
            raise WriteConflictError(
                f"warehouse table '{table}' {key}={value} is already published and published partitions never "
                "change: nothing written"
            )
        run = uuid.uuid4().hex
        writer = frame.write.format("delta").partitionBy(key).option("mergeSchema", "true")
        if once:
            # A new partition (checked above) is appended: replaceWhere would make Delta list the
            # files it replaces first (a Spark job per commit; appends took 0.6 s a day against 0.9 s).
            # Delta's idempotent-transaction id: this partition commits once, whoever writes it.
            writer = writer.mode("append").option("txnAppId", f"{METADATA_TAG}:{table}:{key}={value}").option("txnVersion", 0)
        else:
            writer = writer.mode("overwrite").option("replaceWhere", f"`{key}` = {_sql_literal(value)}")
        if not once and frame.isEmpty():  # Delta skips a commit with no action; a one-off transaction id makes one
            writer = writer.option("txnAppId", f"{METADATA_TAG}:{table}:{key}={value}:{run}").option("txnVersion", 0)
        self._commit(writer, table, _commit_metadata(table=table, key=key, values=[str(value)], run=run), (key, value))
        if once and not any(m and m.get("run") == run for m in self._recent_metadata(table, last=50)):
            raise WriteConflictError(
                f"warehouse table '{table}' {key}={value} was published by another writer meanwhile: this run's rows "
                "were not written and the published partition is unchanged"
            )

    def _column_type(self, spark: SparkSession, table: str, column: str):
        """The type of `column` in the table's schema (None when it has no such column); a local
        table's from its log (delta-rs: a Delta type name Spark casts to), else Spark's."""
        log = read_local_delta(self.path(table)) if self.local_tables else None
        if log is not None:
            try:
                fields = json.loads(log.schema().to_json())["fields"]
                kinds = {f["name"]: f["type"] for f in fields}
                if isinstance(kinds.get(column, ""), str):
                    return kinds.get(column)
            except Exception:  # noqa: BLE001 - read it through Spark instead
                pass
        current = spark.read.format("delta").load(self.uri(table)).schema
        return current[column].dataType if column in current.fieldNames() else None

    def _recent_metadata(self, table: str, last: int) -> list[dict | None]:
        """pricelab's userMetadata of the table's `last` commits; a local table's from its log
        (delta-rs, no Spark job), else from `history`."""
        log = read_local_delta(self.path(table)) if self.local_tables else None
        if log is not None:
            try:
                return [_parse_metadata(commit.get("userMetadata")) for commit in log.history(limit=last)]
            except Exception:  # noqa: BLE001
                pass
        return list(self.history(table, last=last)["metadata"])

    def _commit(self, writer, table: str, metadata: str, partition: tuple[str, str] | None = None) -> None:
        where = f" {partition[0]}={partition[1]}" if partition else ""
        try:
            writer.option("userMetadata", metadata).save(self.uri(table))
        except Exception as error:  # noqa: BLE001 - Delta's conflicts and a missing Delta become clear errors
            conflict = _is_conflict(error)
            if conflict:
                raise WriteConflictError(
                    f"warehouse table '{table}'{where}: another writer committed to it at the same time ({conflict}); "
                    "nothing of this run was written there and what is published is unchanged; run again"
                ) from None
            raise (_delta_error(error) or error) from None

    # ------------------------------------------------------------------ the write-once proof
    def audit_published(self, spark: SparkSession, table: str, values: list[str] | None = None) -> list[str]:
        """Problems found in `table`'s version history, [] when every published partition is as it
        was first committed: each is published by exactly one commit; no commit but pricelab's
        publishes came after the first one; and (for `values`, default all) the rows at the
        publishing version equal the rows now (Delta time travel, one read per version)."""
        key = PUBLISHED[table]
        history = self.history(table)
        problems, first = [], {}
        for row in history.itertuples():
            meta = row.metadata or {}
            written = [str(v) for v in meta.get("values", [])] if meta.get("key") == key else []
            for value in written:
                if value in first:
                    problems.append(f"{key}={value} written again at version {row.version} (first published at version {first[value]})")
                else:
                    first.setdefault(value, row.version)
            if not meta and first:  # any other writer after the first publication: flagged, whatever it did
                problems.append(f"version {row.version} ({row.operation}) is not a pricelab publish"
                                + (f"; it removed {row.removed_files} file(s)" if row.removed_files else ""))
        check = sorted(first) if values is None else [str(v) for v in values if str(v) in first]
        now = spark.read.format("delta").load(self.uri(table))
        kind = now.schema[key].dataType
        by_version: dict[int, list[str]] = {}
        for value in check:
            by_version.setdefault(first[value], []).append(value)
        for version, group in sorted(by_version.items()):
            literal = [F.lit(v).cast(kind) for v in group]
            then = self.read_version(spark, table, version).where(F.col(key).isin(literal))
            current = now.where(F.col(key).isin(literal)).select(then.columns)
            changed = then.exceptAll(current).union(current.exceptAll(then)).select(key).distinct().collect()
            problems += [f"{key}={r[0]} differs from its first publication (version {version})" for r in changed]
        return problems

    def write_file(self, relative: str, content: str | bytes) -> Path:
        """A report or picture under `warehouse/`, written atomically."""
        return write_text(content, self.tables_dir / relative)

    def drop(self, table: str) -> None:
        """Delete a whole table (benchmarks and tests; never a published one in a run)."""
        if self.local_tables:
            _remove(self.path(table))
            return
        spark = _session()
        jvm = spark.sparkContext._jvm
        target = jvm.org.apache.hadoop.fs.Path(self.uri(table))
        target.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).delete(target, True)
