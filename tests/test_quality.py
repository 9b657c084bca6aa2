"""GX suites fail on bad data, pass on good data, and report examples."""
from __future__ import annotations

import datetime as dt

from pipelines import quality


def _sales(spark, rows):
    return spark.createDataFrame(rows, "product_id string, date date, price double, units double")


def test_sales_suite_passes_clean_data(spark):
    rows = [("P1", dt.date(2025, 1, d), 10.0, float(d)) for d in range(1, 29)]
    outcome = quality.validate(_sales(spark, rows), "sales", quality.sales_expectations())
    assert outcome.passed, outcome.describe()
    assert outcome.n_rows == 28


def test_sales_suite_fails_beyond_the_tolerated_share_with_examples(spark):
    rows = [("P1", dt.date(2025, 1, d), 10.0, 1.0) for d in range(1, 21)]
    rows += [("P2", dt.date(2025, 1, d), -2.0, 1.0) for d in range(1, 4)]  # 3 of 23 rows: 13% broken
    outcome = quality.validate(_sales(spark, rows), "sales", quality.sales_expectations(max_bad_share=0.01))
    assert not outcome.passed
    price = [f for f in outcome.failures if f["column"] == "price"]
    assert price and price[0]["unexpected_count"] == 3 and "-2.0" in price[0]["examples"]
    assert "FAILED" in outcome.describe()


def test_sales_suite_tolerates_a_small_share(spark):
    rows = [("P1", dt.date(2024, 1, 1) + dt.timedelta(days=d), 10.0, 1.0) for d in range(200)]
    rows.append(("P2", dt.date(2025, 1, 1), -1.0, 1.0))  # 1 of 201 rows: 0.5%
    assert quality.validate(_sales(spark, rows), "sales", quality.sales_expectations(max_bad_share=0.01)).passed


def test_assignment_suite_catches_two_arms_for_one_product_day(spark):
    schema = "date date, experiment string, product_id string, unit_id string, arm string, blackout boolean, price_change double"
    day = dt.date(2026, 1, 5)
    good = [(day, "e", "P1", "C1", "treatment", False, -0.1), (day, "e", "P2", "C1", "treatment", False, -0.1)]
    assert quality.validate(spark.createDataFrame(good, schema), "a", quality.assignment_expectations()).passed
    bad = good + [(day, "f", "P1", "P1", "control", False, 0.0), (day, "e", "P3", "C2", "placebo", False, 0.0)]
    outcome = quality.validate(spark.createDataFrame(bad, schema), "a", quality.assignment_expectations())
    failed = {f["expectation"] for f in outcome.failures}
    assert "expect_compound_columns_to_be_unique" in failed and "expect_column_values_to_be_in_set" in failed


def test_the_assignment_suite_reports_the_same_on_pandas_as_on_spark(spark):
    """A day's rows are checked on pandas (assets/assignments.py): same verdict, counts and examples."""
    schema = "date date, experiment string, product_id string, unit_id string, arm string, blackout boolean, price_change double"
    day = dt.date(2026, 1, 5)
    rows = [(day, "e", f"P{i}", f"C{i // 2}", "treatment" if i % 2 else "control", False, -0.1) for i in range(30)]
    rows += [(day, "f", "P1", "P1", "control", False, 0.0), (day, "e", "P40", None, "placebo", None, 0.0)]
    frame = spark.createDataFrame(rows, schema)
    on_spark = quality.validate(frame, "a", quality.assignment_expectations())
    on_pandas = quality.validate(frame.toPandas(), "a", quality.assignment_expectations())
    assert not on_spark.passed and not on_pandas.passed and on_spark.n_rows == on_pandas.n_rows == 32
    summary = lambda outcome: sorted((f["expectation"], f["column"], f["unexpected_count"]) for f in outcome.failures)  # noqa: E731
    assert summary(on_pandas) == summary(on_spark)
    assert {f["expectation"] for f in on_pandas.failures} >= {
        "expect_compound_columns_to_be_unique", "expect_column_values_to_be_in_set", "expect_column_values_to_not_be_null"}
    assert quality.validate(frame.toPandas().iloc[:30], "a", quality.assignment_expectations()).passed


def test_split_units_found(spark):
    schema = "date date, experiment string, product_id string, unit_id string, arm string"
    day = dt.date(2026, 1, 5)
    rows = [(day, "e", "P1", "C1", "treatment"), (day, "e", "P2", "C1", "control"), (day, "e", "P3", "C2", "control")]
    n, examples = quality.split_units(spark.createDataFrame(rows, schema))
    assert n == 1 and examples == ["e/C1 on 2026-01-05"]
