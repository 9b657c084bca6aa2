"""`pricelab validate-inputs` (pandas, no Spark) refuses exactly what the Spark loader refuses:
the same files with the same messages, the same rows with the same (input, file, row_key, field,
reason), row for row, over the bad-input corpus and a file with many faults at once."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pandas as pd
import pytest

from pipelines import inputs, validation
from tests.test_bad_inputs import OTHER_INPUT_CASES, SALES_CASES, add_sales, sales_dir, write_market

COLUMNS = ["input", "file", "row_key", "field", "reason"]


def many_faults(root):
    """One CSV and one Parquet file with a dozen faults, several per row."""
    add_sales("messy.csv", [
        ("k1-0", "2025-12-31", "Infinity", "2"), ("", "2025-12-31", "1", "1"), ("k1-1", "", "1", "1"),
        ("k1-2", "2025-13-01", "1", "1"), ("k1-3", "2099-01-01", "-1", "x"), ("k1-4", "2025-12-30", "0", "1"),
        ("k1-5", "2025-12-30", "1", "-3"), ("k1-5", "2025-12-30", "1", "-3"), ("zz-1", "2025-12-30", "1", "1"),
        ("k2-0", "2025-12-31", "2", "1"), ("k2-0", "2025-12-31", "2", "1"), ("k2-1", "2025-12-31", "2", "1"),
        ("k2-1", "2025-12-31", "3", "1"), ("k2-2", "2025-12", "1_000", "1"), ("k2-3", "2025-12-29 10:00", "nan", "1"),
    ], csv=True)(root)
    add_sales("messy.parquet", [
        ("k2-1", dt.date(2025, 12, 31), 3.0, 1.0), ("g1-0", None, 1.0, 1.0), (None, dt.date(2025, 12, 30), 1.0, 1.0),
        ("g1-1", dt.date(2025, 12, 30), float("nan"), 1.0), ("g1-2", dt.date(2025, 12, 30), 1.0, None),
        ("g1-0", dt.date(2025, 12, 1), 10.0, 1.0),
    ])(root)


CASES = [(c.name, c.layer, c.breaks) for c in SALES_CASES + OTHER_INPUT_CASES] + [("many-faults", "sales", many_faults)]


def _rows(frame: pd.DataFrame) -> list[tuple]:
    return sorted(tuple("" if v is None else str(v) for v in row) for row in frame[COLUMNS].itertuples(index=False))


@pytest.mark.parametrize("name,layer,breaks", CASES, ids=[c[0] for c in CASES])
def test_validation_refuses_what_the_spark_loader_refuses(name, layer, breaks, spark, tmp_path):
    root = write_market(tmp_path)
    breaks(root)
    today = inputs.today_utc()
    spark_catalog = inputs.load_catalog(spark, root)
    loaded = {
        "catalog": lambda: spark_catalog,
        "sales": lambda: inputs.load_sales(spark, root, catalog=spark_catalog.rows, today=today),
        "trigger_events": lambda: inputs.load_trigger_events(spark, root),
    }[layer]()
    checked = validation.validate_inputs(root, today=today).inputs[layer]
    expected = _rows(loaded.rejected.toPandas())
    assert expected or loaded.refused_files or name.endswith("-read"), f"{name}: refuses nothing in Spark?"
    assert _rows(checked.rejected) == expected
    assert checked.refused_files == loaded.refused_files
    assert len(checked.good) == loaded.rows.count()


def test_validation_reports_every_refusal_in_one_pass_without_spark(tmp_path):
    root = write_market(tmp_path)
    many_faults(root)
    (root / "input" / "experiments" / "bad.yaml").write_text("name: x\ndesign: ab_test\n")
    (sales_dir(root) / "junk.parquet").write_bytes(b"not parquet")
    script = (
        "import sys; from pipelines.validation import validate_inputs\n"
        f"v = validate_inputs({str(root)!r})\n"
        "print('\\n'.join(v.messages())); print('REFUSALS', v.refusals)\n"
        "assert 'pyspark' not in sys.modules, 'validation imported Spark'\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "junk.parquet: cannot be read" in out.stdout
    assert "bad.yaml: field 'start': missing required field" in out.stdout
    assert "messy.csv row k1-0|2025-12-31: field 'price' price is not finite" in out.stdout
    assert "messy.csv row k1-3|2099-01-01: field 'date' date is in the future" in out.stdout
    assert int(lines[-1].split()[-1]) == len(lines) - 1 >= 15
