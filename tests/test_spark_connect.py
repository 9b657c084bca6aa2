"""The same pipeline code through Spark Connect: PRICELAB_SPARK_REMOTE=local starts an embedded
Connect server in a child process (a process has one kind of session), whose answers must equal
the classic session's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import datetime as dt, json
    import numpy as np, pandas as pd
    from jobs.resources import spark_from_environment
    from pipelines import clustering, estimation
    spark = spark_from_environment()  # PRICELAB_SPARK_REMOTE, as the Dagster resource reads it
    rng = np.random.default_rng(0)
    start = dt.date(2026, 1, 5)
    sales = pd.DataFrame([(f"P{p}", start + dt.timedelta(days=k), 10.0, float(rng.poisson(10 + 3 * (p % 2) * (k >= 0))))
                          for p in range(4) for k in range(-60, 14)], columns=["product_id", "date", "price", "units"])
    assignments = pd.DataFrame([(start + dt.timedelta(days=k), "e", f"P{p}", f"P{p}", "treatment" if p % 2 else "control", False, 0.0)
                                for p in range(4) for k in range(14)],
                               columns=["date", "experiment", "product_id", "unit_id", "arm", "blackout", "price_change"])
    fd = estimation.first_differences(spark.createDataFrame(sales), spark.createDataFrame(assignments), {"e": "time_bound"}).toPandas()
    edges = spark.createDataFrame([("P0", "P1", 1.0), ("P2", "P3", 1.0)], "src string, dst string, weight double")
    vertices = spark.createDataFrame([(f"P{i}",) for i in range(5)], "product_id string")
    components = clustering.connected_components(edges, vertices).toPandas()
    print("RESULT " + json.dumps({
        "session": type(spark).__module__,
        "fd": {r.product_id: round(r.first_difference, 9) for r in fd.itertuples()},
        "components": dict(zip(components["product_id"], components["component"])),
    }))
    """
)


def _run(remote: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PRICELAB_SPARK_REMOTE"}
    if remote:
        env["PRICELAB_SPARK_REMOTE"] = remote
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_spark_connect_gives_the_classic_answers():
    connect, classic = _run("local"), _run(None)
    assert connect["session"] == "pyspark.sql.connect.session"
    assert classic["session"] == "pyspark.sql.session"
    assert connect["fd"] == classic["fd"] and len(connect["fd"]) == 4
    assert connect["components"] == classic["components"] == {"P0": "P0", "P1": "P0", "P2": "P2", "P3": "P2", "P4": "P4"}
