"""One SparkSession per process, configured from arguments.

`master` (default `local[*]`) picks a classic master (`spark://host:7077`, `yarn`, `k8s://...`);
`remote` (`sc://host:15002`) picks Spark Connect instead (`local` starts an embedded Connect
server, which the tests use to prove the Connect path). The Dagster resource (`jobs/resources.py`,
which reads PRICELAB_SPARK_MASTER / PRICELAB_SPARK_REMOTE) and the tests call `get_spark`, so code
runs the same way everywhere. This module reads and writes no environment variable: the pandas
UDF workers' Python is an argument (`python`, default this interpreter), and an embedded master
listens on loopback through its settings (`LOCAL_SIZING`), not SPARK_LOCAL_IP.

Extra JVM jars (GraphFrames and Delta Lake, fetched by `make setup` into ./jars) are passed in as
local paths (default: the project's ./jars) and set as `spark.jars`: nothing is downloaded when a
session starts. When Delta's jar is among them, the session gets Delta's SQL extension and catalog
(`DELTA_SETTINGS`); on a cluster that resolves packages itself, give
`spark.jars.packages=io.delta:delta-spark_4.1_2.13:4.3.0` in `conf` and the same settings apply.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pyspark.sql import SparkSession

# Settings that results depend on, or that every run needs: applied on EVERY master (local,
# standalone, YARN, Kubernetes) and, where a running session accepts them, on Spark Connect.
EVERYWHERE = {
    "spark.sql.session.timeZone": "UTC",  # dates and days are UTC days everywhere
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.legacy.timeParserPolicy": "CORRECTED",
    "spark.ui.showConsoleProgress": "false",
}

# Sized for a 2-core laptop-class machine and small daily data: applied on `local[*]` only (a
# cluster keeps its own sizes unless configured, see SparkResource); override with `conf`.
LOCAL_SIZING = {
    "spark.sql.shuffle.partitions": "8",
    "spark.default.parallelism": "4",
    "spark.driver.memory": "4g",
    "spark.ui.enabled": "false",
    # An embedded session listens on loopback only.
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
}

LOCAL_DEFAULTS = {**EVERYWHERE, **LOCAL_SIZING}

# Delta Lake in a session: its SQL extension (CONVERT TO DELTA, DESCRIBE HISTORY, time travel)
# and its catalog. Set on every master when Delta's jar is on the classpath (`delta_requested`).
DELTA_SETTINGS = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
# ... and on `local[*]`: Delta rebuilds a table's state from its log with this many tasks
# (default 50: slow on 2 cores with small tables)
DELTA_LOCAL_SETTINGS = {"spark.databricks.delta.snapshotPartitions": "2"}
DELTA_PACKAGE = "io.delta:delta-spark_4.1_2.13:4.3.0"  # jvm/delta/pom.xml pins the same version

# Where `make setup` copies the jars pinned in jvm/pom.xml and jvm/delta/pom.xml.
PROJECT_JARS_DIR = Path(__file__).resolve().parents[1] / "jars"


# Settings a running session (classic or Connect) accepts through `spark.conf.set`.
RUNTIME_SQL_SETTINGS = (
    "spark.sql.shuffle.partitions",
    "spark.sql.session.timeZone",
    "spark.sql.execution.arrow.pyspark.enabled",
    "spark.sql.adaptive.enabled",
)
# ... of which these matter on any Connect server (the rest is local sizing)
RUNTIME_EVERYWHERE = tuple(k for k in RUNTIME_SQL_SETTINGS if k in EVERYWHERE)

# What pandas UDFs (applyInPandas: graph blocks, Leiden, estimation) import on the executors.
WORKER_MODULES = ("numpy", "pandas", "pyarrow", "igraph", "sklearn", "econml", "pipelines")


class SparkWorkerPythonError(RuntimeError):
    """The executors' Python cannot run pricelab's pandas UDFs."""


def check_worker_python(spark: SparkSession, where: str, modules: tuple[str, ...] = WORKER_MODULES) -> str:
    """Run one tiny pandas UDF that imports `modules` on an executor; the executor's Python path.

    Raises SparkWorkerPythonError with one line saying what to do (a Spark Connect server, or a
    cluster's workers, must run pandas UDFs with a Python that has this venv's packages)."""
    import pandas as pd

    def probe(frames):
        import importlib
        import sys as worker_sys

        missing = []
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - reported back to the driver
                missing.append(f"{name} ({type(exc).__name__})")
        for _ in frames:
            yield pd.DataFrame({"python": [worker_sys.executable], "missing": [", ".join(missing)]})

    try:
        row = spark.range(1).mapInPandas(probe, "python string, missing string").collect()[0]
    except Exception as exc:  # the worker could not even start (no pandas/pyarrow, wrong Python)
        first = " ".join(str(exc).split())[:200]
        raise SparkWorkerPythonError(
            f"{where}: pandas UDFs fail on its Python workers ({type(exc).__name__}: {first}); start the server "
            f"with PYSPARK_PYTHON set to a Python with pricelab's packages, e.g. this venv's {sys.executable}"
        ) from None
    if row["missing"]:
        raise SparkWorkerPythonError(
            f"{where}: its Python workers ({row['python']}) lack {row['missing']}; pandas UDFs need the venv's "
            f"packages: start the server with PYSPARK_PYTHON={sys.executable} (or a Python with the same packages)"
        )
    return row["python"]


def jar_files(directory: str | Path | None) -> list[str]:
    """The *.jar files directly in `directory`, sorted; [] when it is None or does not exist."""
    if directory is None or not Path(directory).is_dir():
        return []
    return sorted(str(path.resolve()) for path in Path(directory).glob("*.jar"))


def session_settings(master: str, jars: list[str] | None = None, conf: dict[str, str] | None = None) -> dict[str, str]:
    """What a classic session on `master` is built with: EVERYWHERE on every master, LOCAL_SIZING
    on `local[...]` only, the jars, Delta's settings when its jar is there, then `conf` (which wins)."""
    local = master.startswith("local")
    settings = dict(LOCAL_DEFAULTS) if local else dict(EVERYWHERE)
    if jars:
        settings["spark.jars"] = ",".join(jars)
    if delta_requested(jars or [], conf):
        settings.update(DELTA_SETTINGS)
        if local:
            settings.update(DELTA_LOCAL_SETTINGS)
    settings.update(conf or {})
    return settings


def delta_requested(jars: list[str], conf: dict[str, str] | None) -> bool:
    """True when Delta's JVM code will be on the classpath: its jar is among `jars`, or `conf`
    asks the cluster to resolve the package (`spark.jars.packages`)."""
    packages = (conf or {}).get("spark.jars.packages", "")
    return any(Path(j).name.startswith("delta-spark_") for j in jars) or "io.delta:delta-spark" in packages


def get_spark(
    master: str | None = None,
    remote: str | None = None,
    app_name: str = "pricelab",
    conf: dict[str, str] | None = None,
    jars: list[str] | None = None,
    check_worker: bool = True,
    python: str | None = None,
) -> SparkSession:
    """Return the process's SparkSession, creating it on first use.

    `remote` (a Spark Connect URL) wins over `master`; with neither, an embedded `local[*]`
    session. `check_worker`: on Spark Connect, prove first that the server's Python workers run
    pricelab's interpreter (`check_worker_python`). `jars`: local jar paths
    for `spark.jars` on a classic session (a Connect server has its own classpath: ignored there);
    None means the project's ./jars, [] none. `python`: the Python a classic session's pandas
    UDF workers run (default this interpreter, which has pricelab's packages; on a cluster whose
    executors keep it elsewhere, their path).
    """
    if jars is None:
        jars = jar_files(PROJECT_JARS_DIR)
    remote = remote or None
    master = master or "local[*]"
    builder = SparkSession.builder.appName(app_name)
    if remote:
        builder = builder.remote(remote)
    else:
        builder = builder.master(master)
        for key, value in session_settings(master, jars, conf).items():
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if not remote:
        spark.sparkContext.setLogLevel("ERROR")
        spark.sparkContext.pythonExec = python or sys.executable  # what PySpark's UDFs and RDDs launch
    else:
        # a running Connect server: the settings that matter always; the small-machine sizes only
        # on an embedded server (`local`); `conf` wins for the keys a running session accepts
        keys = RUNTIME_SQL_SETTINGS if remote.startswith("local") else RUNTIME_EVERYWHERE
        runtime = {key: LOCAL_DEFAULTS[key] for key in keys}
        runtime.update({k: v for k, v in (conf or {}).items() if k in RUNTIME_SQL_SETTINGS})
        for key, value in runtime.items():
            spark.conf.set(key, value)
        if check_worker:
            check_worker_python(spark, f"Spark Connect server {remote}")
    return spark


def graphframes_missing_reason(spark: SparkSession) -> str | None:
    """None when the GraphFrames JVM classes are on the session's classpath, else why not.

    Only looks: never downloads anything.
    """
    try:
        jvm = spark.sparkContext._jvm  # classic sessions only; Connect has no JVM handle
    except Exception:
        return "a Spark Connect session has no driver JVM to look in (the server needs the GraphFrames Connect plugin)"
    try:
        jvm.java.lang.Class.forName("org.graphframes.GraphFrame")
    except Exception:
        return "the GraphFrames JVM jar is not on the Spark classpath (org.graphframes.GraphFrame not found)"
    return None


def graphframes_available(spark: SparkSession) -> bool:
    """True when the GraphFrames JVM classes are on the classpath (never downloads anything)."""
    return graphframes_missing_reason(spark) is None
