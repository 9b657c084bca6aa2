"""Extra JVM jars reach the classpath from local paths (`spark.jars`), with no download."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile

import pytest

from pipelines.spark import jar_files


def test_jar_files_lists_only_jars_sorted(tmp_path):
    for name in ("b.jar", "a.jar", "fetch.log", "UNAVAILABLE"):
        (tmp_path / name).write_text("x")
    assert jar_files(tmp_path) == [str(tmp_path / "a.jar"), str(tmp_path / "b.jar")]
    assert jar_files(tmp_path / "absent") == [] and jar_files(None) == []


@pytest.mark.slow  # a second JVM
def test_a_local_jar_passed_to_get_spark_is_on_the_driver_classpath(tmp_path):
    """The path GraphFrames takes: jar_files(dir) -> get_spark(jars=...) -> driver class loader."""
    probe = tmp_path / "jars" / "pricelab-probe.jar"
    probe.parent.mkdir()
    with zipfile.ZipFile(probe, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        jar.writestr("pricelab/probe.txt", "found")
    script = textwrap.dedent(
        f"""
        from pipelines.spark import get_spark, jar_files
        spark = get_spark(master="local[1]", app_name="pricelab-jars", jars=jar_files({str(probe.parent)!r}),
                          conf={{"spark.driver.memory": "1g"}})
        jvm = spark.sparkContext._jvm
        loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
        print("spark.jars=" + spark.conf.get("spark.jars"))
        print("resource=" + str(loader.getResource("pricelab/probe.txt") is not None))
        spark.stop()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"spark.jars={probe}" in done.stdout
    assert "resource=True" in done.stdout
