"""The warehouse on Delta Lake: atomic commits, one partition per commit, published partitions
written once (checked against Delta's version history), concurrent publishers, v1 migration."""
from __future__ import annotations

import datetime as dt
import threading

import pandas as pd
import pytest

from pipelines.storage import MigrationRefusedError, Warehouse, WriteConflictError

SCHEMA = "date date, product_id string, arm string"
DAY1, DAY2, DAY3 = dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date(2026, 1, 3)


def _rows(spark, *rows):
    return spark.createDataFrame(list(rows), SCHEMA)


def _content(frame) -> list[tuple]:
    return sorted(tuple(str(v) for v in r) for r in frame.collect())


def test_write_replaces_whole_table_and_leaves_no_temporary_files(spark, tmp_path):
    warehouse = Warehouse(tmp_path)
    warehouse.write(pd.DataFrame({"a": [1, 2]}), "t")
    warehouse.write(spark.createDataFrame([(3,)], "a long"), "t")
    assert [r.a for r in warehouse.read(spark, "t").collect()] == [3]
    assert not [p for p in (tmp_path / "warehouse").iterdir() if p.name.startswith(".")]
    assert (tmp_path / "warehouse" / "t" / "_delta_log").is_dir()  # a Delta table
    assert list(warehouse.history("t")["operation"]) == ["WRITE", "WRITE"]


def test_partitions_written_with_empty_days(spark, tmp_path):
    warehouse = Warehouse(tmp_path)
    rows = _rows(spark, (DAY1, "P1", "treatment"), (DAY3, "P2", "control"))
    values = ["2026-01-01", "2026-01-02", "2026-01-03"]
    warehouse.write_partitions(rows, "daily", "date", values)
    assert warehouse.partitions("daily", "date") == values  # the empty day counts as written
    assert warehouse.exists("daily", ("date", "2026-01-02")) and not warehouse.exists("daily", ("date", "2026-01-04"))
    assert warehouse.read(spark, "daily", ("date", "2026-01-02")).count() == 0
    table = warehouse.read(spark, "daily").orderBy("date").collect()
    assert [(r.date, r.product_id) for r in table] == [(DAY1, "P1"), (DAY3, "P2")]
    # one partition replaced, the others untouched
    warehouse.write(_rows(spark, (DAY1, "P9", "control")), "daily", ("date", "2026-01-01"))
    assert sorted(r.product_id for r in warehouse.read(spark, "daily").collect()) == ["P2", "P9"]
    # every commit's replaceWhere named exactly one partition
    history = warehouse.history("daily")
    assert list(history["predicate"]) == ["`date` = '2026-01-01'", "`date` = '2026-01-02'", "`date` = '2026-01-03'", "`date` = '2026-01-01'"]
    assert not [p for p in (tmp_path / "warehouse").iterdir() if p.name.startswith(".")]


def test_partitions_read_from_the_log_match_what_spark_reads(spark, tmp_path, monkeypatch):
    """`partitions` reads a local table's Delta log on the driver (delta-rs, no Spark job); the
    same values as the Spark path, empty partitions included, across more commits than Delta's
    checkpoint interval (a checkpoint file in the log)."""
    from pipelines import storage

    warehouse = Warehouse(tmp_path)
    days = [DAY1 + dt.timedelta(days=i) for i in range(12)]
    for day in days:
        rows = _rows(spark, (day, "P1", "treatment")) if day.day % 3 else spark.createDataFrame([], SCHEMA)
        warehouse.write_partitions(rows, "daily", "date", [day.isoformat()])
    assert any(p.name.endswith(".checkpoint.parquet") for p in (tmp_path / "warehouse" / "daily" / "_delta_log").iterdir())
    from_log = storage._logged_partition_values(tmp_path / "warehouse" / "daily", "date")
    assert sorted(from_log) == [d.isoformat() for d in days]
    monkeypatch.setattr(storage, "_logged_partition_values", lambda path, key: None)  # the Spark path
    storage._PARTITIONS.clear()
    assert warehouse.partitions("daily", "date") == sorted(from_log)
    assert storage._logged_partition_values(tmp_path / "warehouse" / "nothing", "date") is None


def test_read_of_a_missing_table_names_it(spark, tmp_path):
    with pytest.raises(FileNotFoundError, match="warehouse table 'nothing'"):
        Warehouse(tmp_path).read(spark, "nothing")


def test_a_published_day_is_written_once_and_history_proves_it(spark, tmp_path):
    warehouse = Warehouse(tmp_path)
    warehouse.write_partitions(_rows(spark, (DAY1, "P1", "treatment"), (DAY2, "P2", "control")), "daily_assignments", "date",
                               ["2026-01-01", "2026-01-02"])
    before = _content(warehouse.read(spark, "daily_assignments"))
    with pytest.raises(WriteConflictError, match=r"date=2026-01-01 is already published .* nothing written"):
        warehouse.write(_rows(spark, (DAY1, "P1", "control")), "daily_assignments", ("date", "2026-01-01"))
    assert _content(warehouse.read(spark, "daily_assignments")) == before
    assert warehouse.audit_published(spark, "daily_assignments") == []
    # the audit can fail: a writer that bypasses pricelab (here a SQL DELETE) is caught by the history
    spark.sql(f"DELETE FROM delta.`{warehouse.uri('daily_assignments')}` WHERE date = DATE'2026-01-02'")
    problems = warehouse.audit_published(spark, "daily_assignments")
    assert any("(DELETE) is not a pricelab publish" in p for p in problems)
    assert "date=2026-01-02 differs from its first publication (version 1)" in problems


def test_a_second_write_of_a_published_day_commits_nothing_even_past_the_check(spark, tmp_path, monkeypatch):
    """The rule lives in Delta's log, not only in pricelab's check: with the check skipped (as a
    writer that read the table just before another published the day), Delta's idempotent
    transaction id keeps the day as it was, and the writer is told."""
    warehouse = Warehouse(tmp_path)
    warehouse.write(_rows(spark, (DAY1, "P1", "treatment")), "daily_assignments", ("date", "2026-01-01"))
    version = int(warehouse.history("daily_assignments")["version"].max())
    monkeypatch.setattr(Warehouse, "partitions", lambda self, table, key: [])  # the stale view of a racing writer
    with pytest.raises(WriteConflictError, match="published by another writer meanwhile: this run's rows were not written"):
        warehouse.write(_rows(spark, (DAY1, "P1", "control")), "daily_assignments", ("date", "2026-01-01"))
    monkeypatch.undo()
    assert _content(warehouse.read(spark, "daily_assignments")) == [("2026-01-01", "P1", "treatment")]
    assert int(warehouse.history("daily_assignments")["version"].max()) == version  # no commit at all
    assert warehouse.audit_published(spark, "daily_assignments") == []


def test_concurrent_publishers_of_one_day_one_wins_the_other_gets_a_clear_conflict(spark, tmp_path):
    """Two writers publish the same day at once (as two machines would: no shared lock file).
    Exactly one commits; the other gets a one-line conflict; the day holds the winner's rows and
    Delta's history shows it was published once."""
    warehouse = Warehouse(tmp_path)
    warehouse.write(_rows(spark, (DAY1, "P0", "control")), "daily_assignments", ("date", "2026-01-01"))
    rows = {name: _rows(spark, (DAY2, f"P{i}", name)) for i, name in enumerate(["treatment", "control"], 1)}
    start, outcome = threading.Barrier(2), {}

    def publish(name):
        start.wait()
        try:
            Warehouse(tmp_path).write(rows[name], "daily_assignments", ("date", "2026-01-02"))
            outcome[name] = "published"
        except WriteConflictError as error:
            outcome[name] = str(error)

    threads = [threading.Thread(target=publish, args=(name,)) for name in rows]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [name for name, result in outcome.items() if result == "published"]
    assert len(winners) == 1, outcome
    (message,) = [result for result in outcome.values() if result != "published"]
    assert "\n" not in message and "date=2026-01-02" in message and len(message) < 400
    assert any(s in message for s in ("already published", "another writer")), message
    day = _content(warehouse.read(spark, "daily_assignments", ("date", "2026-01-02")))
    assert day == [("2026-01-02", "P1" if winners == ["treatment"] else "P2", winners[0])]
    publishes = [m for m in warehouse.history("daily_assignments")["metadata"] if m and m.get("values") == ["2026-01-02"]]
    assert len(publishes) == 1
    assert warehouse.audit_published(spark, "daily_assignments") == []


def _v1_table(root):
    """A pricelab v1 warehouse: Parquet folders, one empty partition, a kill's leftover."""
    base = root / "warehouse" / "daily_assignments"
    for day, products in (("2026-01-01", ["P1", "P2"]), ("2026-01-02", []), ("2026-01-03", ["P3"])):
        folder = base / f"date={day}"
        folder.mkdir(parents=True)
        frame = pd.DataFrame({"product_id": pd.Series(products, dtype="string"), "arm": pd.Series(["control"] * len(products), dtype="string")})
        frame.to_parquet(folder / "part-00000.parquet", index=False)
    (base / ".date=2026-01-04.tmp-999999-deadbeef").mkdir()  # a v1 temporary of a dead writer
    flat = root / "warehouse" / "catalog"
    flat.mkdir()
    pd.DataFrame({"product_id": ["P1", "P2"], "price": [1.5, 2.25]}).to_parquet(flat / "part-00000.parquet", index=False)
    return base


def test_a_v1_parquet_warehouse_is_converted_to_delta_on_first_use(spark, tmp_path):
    _v1_table(tmp_path)
    warehouse = Warehouse(tmp_path)
    assert warehouse.partitions("daily_assignments", "date") == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert warehouse.is_delta("daily_assignments")
    published = warehouse.read(spark, "daily_assignments").orderBy("product_id").collect()
    assert [(r.date, r.product_id) for r in published] == [(DAY1, "P1"), (DAY1, "P2"), (DAY3, "P3")]
    assert warehouse.history("daily_assignments")["operation"].tolist() == ["CONVERT"]
    assert [r.price for r in warehouse.read(spark, "catalog").orderBy("product_id").collect()] == [1.5, 2.25]
    # converted days stay published: the empty one too
    with pytest.raises(WriteConflictError, match="already published"):
        warehouse.write(_rows(spark, (DAY2, "P9", "control")), "daily_assignments", ("date", "2026-01-02"))
    warehouse.write(_rows(spark, (dt.date(2026, 1, 4), "P4", "control")), "daily_assignments", ("date", "2026-01-04"))
    assert warehouse.audit_published(spark, "daily_assignments") == []


def test_a_v1_table_that_cannot_be_converted_is_refused_and_left_alone(spark, tmp_path):
    base = tmp_path / "warehouse" / "odd"
    (base / "date=2026-01-01").mkdir(parents=True)
    pd.DataFrame({"a": [1]}).to_parquet(base / "date=2026-01-01" / "part-0.parquet")
    pd.DataFrame({"a": [2]}).to_parquet(base / "loose.parquet")  # files beside partition folders
    listing = sorted(str(p.relative_to(base)) for p in base.rglob("*"))
    with pytest.raises(MigrationRefusedError) as refused:
        Warehouse(tmp_path).read(spark, "odd")
    message = str(refused.value)
    assert "\n" not in message and "warehouse table 'odd'" in message and "cannot be converted to Delta" in message
    assert sorted(str(p.relative_to(base)) for p in base.rglob("*")) == listing


def test_tables_go_where_the_warehouse_url_says(spark, tmp_path, monkeypatch):
    """Tables follow PRICELAB_WAREHOUSE_URL (any Hadoop URL; here file://), read into the warehouse
    resource; inputs, reports stay local."""
    from jobs.resources import warehouse_from_environment

    elsewhere = tmp_path / "object-store"
    monkeypatch.setenv("PRICELAB_WAREHOUSE_URL", f"file://{elsewhere}/")
    monkeypatch.setenv("PRICELAB_DATA_DIR", str(tmp_path / "data"))
    warehouse = warehouse_from_environment()
    warehouse.write(_rows(spark, (DAY1, "P1", "control")), "daily_assignments", ("date", "2026-01-01"))
    warehouse.write_file("report/report.md", "# report")
    assert (elsewhere / "daily_assignments" / "_delta_log").is_dir()
    assert (tmp_path / "data" / "warehouse" / "report" / "report.md").is_file()
    assert not (tmp_path / "data" / "warehouse" / "daily_assignments").exists()
    assert warehouse.partitions("daily_assignments", "date") == ["2026-01-01"]
    assert _content(warehouse.read(spark, "daily_assignments")) == [("2026-01-01", "P1", "control")]
