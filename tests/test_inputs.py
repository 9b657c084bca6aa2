"""Inputs: contract columns, refused files and rows named with file, field and reason."""
from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipelines import inputs


def _write_catalog(root, rows=None):
    (root / "input").mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        rows or [("P1", "kitchen", "k-1", 3), ("P2", "kitchen", "k-1", 5), ("P3", "garden", "g-1", 1)],
        columns=["product_id", "category", "subclass", "pack_size"],
    )
    frame.to_parquet(root / "input" / "catalog.parquet", index=False)


def _sales_frame(rows):
    return pd.DataFrame(rows, columns=["product_id", "date", "price", "units"])


def test_good_sales_pass_through_with_extra_columns_kept(spark, tmp_path):
    _write_catalog(tmp_path)
    (tmp_path / "input" / "sales").mkdir()
    frame = _sales_frame([("P1", dt.date(2025, 1, 1), 9.5, 3.0), ("P2", dt.date(2025, 1, 1), 4.0, 0.0)])
    frame["views"] = [10.0, 4.0]
    frame["store"] = ["a", "b"]
    frame.to_parquet(tmp_path / "input" / "sales" / "day1.parquet", index=False)
    catalog = inputs.load_catalog(spark, tmp_path).rows
    loaded = inputs.load_sales(spark, tmp_path, catalog=catalog)
    rows = loaded.rows.toPandas()
    assert len(rows) == 2 and loaded.rejected.count() == 0
    assert {"product_id", "date", "price", "units", "views", "store"} <= set(rows.columns)
    assert "_source_file" not in rows.columns


def test_bad_rows_are_refused_with_file_field_and_reason(spark, tmp_path):
    _write_catalog(tmp_path)
    sales_dir = tmp_path / "input" / "sales"
    sales_dir.mkdir()
    _sales_frame(
        [
            ("P1", dt.date(2025, 1, 1), 10.0, 2.0),
            ("P1", dt.date(2025, 1, 2), -1.0, 2.0),  # price <= 0
            ("P2", dt.date(2025, 1, 1), 5.0, -3.0),  # units < 0
            ("P9", dt.date(2025, 1, 1), 5.0, 1.0),  # unknown product
            (None, dt.date(2025, 1, 1), 5.0, 1.0),  # empty key
        ]
    ).to_parquet(sales_dir / "a.parquet", index=False)
    _sales_frame([("P1", dt.date(2025, 1, 1), 10.0, 4.0)]).to_parquet(sales_dir / "b.parquet", index=False)  # duplicate
    catalog = inputs.load_catalog(spark, tmp_path).rows
    loaded = inputs.load_sales(spark, tmp_path, catalog=catalog)
    good = loaded.rows.toPandas()
    assert good.empty  # P1|2025-01-01 given twice with different units: no file order decides, both refused
    refused = loaded.rejected.toPandas().set_index("row_key")
    assert refused.loc["P1|2025-01-02", "reason"] == "price must be > 0"
    assert refused.loc["P1|2025-01-02", "field"] == "price"
    assert refused.loc["P1|2025-01-02", "file"].endswith("a.parquet")
    assert refused.loc["P2|2025-01-01", "reason"] == "units must be >= 0"
    assert refused.loc["P9|2025-01-01", "reason"] == "product_id is not in the catalogue"
    assert refused.loc["<null>|2025-01-01", "field"] == "product_id"
    duplicate = refused[refused["field"] == "product_id,date"]
    assert sorted(f.rsplit("/", 1)[-1] for f in duplicate["file"]) == ["a.parquet", "b.parquet"]
    assert all("conflicting rows" in r and "a.parquet" in r and "b.parquet" in r for r in duplicate["reason"])


def test_a_file_missing_a_column_is_refused_and_the_others_go_on(spark, tmp_path):
    _write_catalog(tmp_path)
    sales_dir = tmp_path / "input" / "sales"
    sales_dir.mkdir()
    _sales_frame([("P1", dt.date(2025, 1, 1), 10.0, 2.0)]).to_parquet(sales_dir / "good.parquet", index=False)
    pd.DataFrame({"product_id": ["P2"], "date": [dt.date(2025, 1, 1)], "price": [3.0]}).to_parquet(
        sales_dir / "no_units.parquet", index=False
    )
    loaded = inputs.load_sales(spark, tmp_path)
    assert loaded.rows.count() == 1
    assert len(loaded.refused_files) == 1
    assert "no_units.parquet" in loaded.refused_files[0] and "'units' missing" in loaded.refused_files[0]


def test_csv_sales_with_unparseable_values(spark, tmp_path):
    _write_catalog(tmp_path)
    sales_dir = tmp_path / "input" / "sales"
    sales_dir.mkdir()
    (sales_dir / "drop.csv").write_text(
        "product_id,date,price,units\nP1,2025-01-01,10.0,2\nP2,not-a-date,5.0,1\nP3,2025-01-01,abc,1\n"
    )
    loaded = inputs.load_sales(spark, tmp_path)
    assert loaded.rows.count() == 1
    reasons = dict(loaded.rejected.select("field", "reason").toPandas().values)
    assert reasons["date"] == "date is not a date"
    assert reasons["price"] == "price is not a number"


def test_missing_input_names_the_path(spark, tmp_path):
    with pytest.raises(inputs.InputError, match="input 'sales': no file at"):
        inputs.load_sales(spark, tmp_path)


def test_catalog_duplicates_and_blanks_refused(spark, tmp_path):
    _write_catalog(tmp_path, [("P1", "kitchen", "k-1", 1), ("P1", "garden", "g-1", 1), ("P2", "", "k-1", 2)])
    loaded = inputs.load_catalog(spark, tmp_path)
    assert loaded.rows.toPandas()["product_id"].tolist() == []  # P1 twice, in two categories: neither is guessed
    reasons = sorted(loaded.rejected.toPandas()["reason"])
    assert reasons[0] == "category is empty"
    assert reasons[1:] == [reasons[1]] * 2 and reasons[1].startswith("conflicting rows for product_id (2 different values)")


def test_optional_inputs_absent(spark, tmp_path):
    _write_catalog(tmp_path)
    assert inputs.load_trigger_events(spark, tmp_path).rows.count() == 0
    assert inputs.load_related_pairs(spark, tmp_path) is None
