"""Spark settings: what matters applies on every master, small-machine sizes only on local[*];
the Dagster resource takes its settings from config (EnvVar); a Connect server whose Python
workers cannot run pricelab's pandas UDFs is named in one line."""
from __future__ import annotations

import dagster as dg
import pytest

from jobs.resources import SparkResource, spark_resource
from pipelines.spark import EVERYWHERE, LOCAL_SIZING, SparkWorkerPythonError, check_worker_python, session_settings


def test_the_settings_that_matter_apply_on_every_master_and_sizes_only_locally():
    for master in ("spark://10.0.0.5:7077", "yarn", "k8s://https://api:6443"):
        settings = session_settings(master)
        assert settings["spark.sql.session.timeZone"] == "UTC"
        assert {k: settings[k] for k in EVERYWHERE} == EVERYWHERE
        assert not set(LOCAL_SIZING) & set(settings), master  # the cluster keeps its own sizes
    local = session_settings("local[*]")
    assert local["spark.sql.shuffle.partitions"] == "8" and local["spark.sql.session.timeZone"] == "UTC"
    assert session_settings("yarn", conf={"spark.sql.shuffle.partitions": "400"})["spark.sql.shuffle.partitions"] == "400"


def test_the_resource_is_configured_through_env_vars_and_sizes_the_cluster(monkeypatch):
    monkeypatch.setenv("PRICELAB_SPARK_MASTER", "spark://10.0.0.5:7077")
    monkeypatch.setenv("PRICELAB_SPARK_SHUFFLE_PARTITIONS", "64")
    monkeypatch.setenv("PRICELAB_SPARK_EXECUTOR_MEMORY", "8g")
    monkeypatch.delenv("PRICELAB_SPARK_REMOTE", raising=False)
    resource = spark_resource()
    assert isinstance(resource.master, dg.EnvVar) and resource.master.env_var_name == "PRICELAB_SPARK_MASTER"

    @dg.asset
    def probe(spark: SparkResource) -> dict:
        return {"master": spark.master, "conf": spark.spark_conf()}

    result = dg.materialize([probe], resources={"spark": resource})
    assert result.output_for_node("probe") == {
        "master": "spark://10.0.0.5:7077",
        "conf": {"spark.sql.shuffle.partitions": "64", "spark.executor.memory": "8g"},
    }


def test_a_worker_python_without_the_packages_is_named_in_one_line(spark):
    assert check_worker_python(spark, "local session", modules=("numpy", "igraph"))
    with pytest.raises(SparkWorkerPythonError) as error:
        check_worker_python(spark, "Spark Connect server sc://h:15002", modules=("numpy", "no_such_module_xyz"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("Spark Connect server sc://h:15002: its Python workers (")
    assert "lack no_such_module_xyz (ModuleNotFoundError)" in message and "PYSPARK_PYTHON=" in message
