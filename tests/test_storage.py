"""Atomic writes and partitions: nothing half-written, partitions replaced one at a time."""
from __future__ import annotations

import datetime as dt

import pandas as pd

from pipelines.storage import Warehouse


def test_write_replaces_whole_table_and_leaves_no_temporary_files(spark, tmp_path):
    warehouse = Warehouse(tmp_path)
    warehouse.write(pd.DataFrame({"a": [1, 2]}), "t")
    warehouse.write(spark.createDataFrame([(3,)], "a long"), "t")
    assert [r.a for r in warehouse.read(spark, "t").collect()] == [3]
    assert not [p for p in (tmp_path / "warehouse").iterdir() if p.name.startswith(".")]


def test_partitions_written_in_one_job_with_empty_days(spark, tmp_path):
    warehouse = Warehouse(tmp_path)
    day1, day3 = dt.date(2026, 1, 1), dt.date(2026, 1, 3)
    rows = spark.createDataFrame([(day1, "P1", "treatment"), (day3, "P2", "control")], "date date, product_id string, arm string")
    values = ["2026-01-01", "2026-01-02", "2026-01-03"]
    warehouse.write_partitions(rows, "daily", "date", values)
    assert warehouse.partitions("daily", "date") == values
    assert warehouse.read(spark, "daily", ("date", "2026-01-02")).count() == 0
    table = warehouse.read(spark, "daily").orderBy("date").collect()
    assert [(r.date, r.product_id) for r in table] == [(day1, "P1"), (day3, "P2")]
    # one partition replaced, the others untouched
    warehouse.write(spark.createDataFrame([(day1, "P9", "control")], "date date, product_id string, arm string"), "daily", ("date", "2026-01-01"))
    assert sorted(r.product_id for r in warehouse.read(spark, "daily").collect()) == ["P2", "P9"]
    assert not [p for p in (tmp_path / "warehouse").iterdir() if p.name.startswith(".")]


def test_read_of_a_missing_table_names_it(spark, tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="warehouse table 'nothing'"):
        Warehouse(tmp_path).read(spark, "nothing")
