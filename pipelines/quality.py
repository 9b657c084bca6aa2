"""Data-quality suites, run with great-expectations 1.x on Spark or pandas DataFrames.

Suites are plain lists of GX expectations built in code; `validate` runs one against a
DataFrame in an ephemeral GX context (no files, analytics off) and returns a small, serialisable
outcome: passed or not, and for each failed expectation the column, the count and example values.
The same suite runs on either engine: large tables stay on Spark; a small batch (one day's
assignments) is checked on pandas, where GX's many small Spark jobs would cost seconds each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

ARMS = ["treatment", "control"]


@dataclass
class QualityOutcome:
    """What a suite found: `passed`, and one entry per failed expectation."""

    suite: str
    passed: bool
    n_rows: int
    failures: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        if self.passed:
            return f"{self.suite}: all expectations met on {self.n_rows} rows"
        parts = [
            f"{f['expectation']}({f['column']}): {f['unexpected_count']} unexpected, e.g. {f['examples']}"
            for f in self.failures
        ]
        return f"{self.suite}: FAILED on {self.n_rows} rows: " + "; ".join(parts)


@lru_cache(maxsize=1)
def _context():
    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # progress bars are cosmetic; an older GX simply keeps them
        pass
    return context


@lru_cache(maxsize=2)
def _batch_definition(engine: str):
    """GX's whole-DataFrame batch definition on `engine` ("spark" or "pandas"), made once."""
    sources = _context().data_sources
    source = sources.add_spark("pricelab_spark") if engine == "spark" else sources.add_pandas("pricelab_pandas")
    return source.add_dataframe_asset("frame").add_batch_definition_whole_dataframe("whole")


def validate(df: DataFrame | pd.DataFrame, suite_name: str, expectations: list) -> QualityOutcome:
    """Run expectations against a Spark or pandas DataFrame; never raises on bad data, reports it."""
    batch_definition = _batch_definition("pandas" if isinstance(df, pd.DataFrame) else "spark")
    suite = gx.ExpectationSuite(name=suite_name, expectations=[e.copy() for e in expectations])
    batch = batch_definition.get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5})
    failures = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        kwargs = config.kwargs
        res = item.result or {}
        failures.append(
            {
                "expectation": config.type,
                "column": kwargs.get("column") or ",".join(kwargs.get("column_list", []) or []),
                "unexpected_count": int(res.get("unexpected_count") or 0),
                "unexpected_percent": round(float(res.get("unexpected_percent") or 0.0), 4),
                "examples": [str(v) for v in (res.get("partial_unexpected_list") or [])[:5]],
                "observed": str(res.get("observed_value")) if "observed_value" in res else None,
            }
        )
    n_rows = int(result.results[0].result.get("element_count", 0)) if result.results else 0
    return QualityOutcome(suite_name, bool(result.success), n_rows, failures)


def catalog_expectations(max_bad_share: float = 0.01) -> list:
    """Keys present and unique; every product has a category and a subclass (a few broken rows
    are refused and reported; more than `max_bad_share` fails the check)."""
    mostly = 1.0 - max_bad_share
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="product_id", mostly=mostly),
        gxe.ExpectColumnValuesToBeUnique(column="product_id", mostly=mostly),
        gxe.ExpectColumnValuesToNotBeNull(column="category", mostly=mostly),
        gxe.ExpectColumnValuesToNotBeNull(column="subclass", mostly=mostly),
    ]


def sales_expectations(max_bad_share: float = 0.01) -> list:
    """The sales contract, tolerating a small share of bad rows (they are refused, not used).

    `mostly` lets a feed with a few broken rows through (those rows are kept aside); a feed with
    more than `max_bad_share` broken rows fails, because then the data itself is suspect.
    """
    mostly = 1.0 - max_bad_share
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="product_id", mostly=mostly),
        gxe.ExpectColumnValuesToNotBeNull(column="date", mostly=mostly),
        gxe.ExpectColumnValuesToBeBetween(column="price", min_value=0, strict_min=True, mostly=mostly),
        gxe.ExpectColumnValuesToBeBetween(column="units", min_value=0, mostly=mostly),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["product_id", "date"], mostly=mostly),
    ]


def assignment_expectations() -> list:
    """Published assignments: keys present, arms in the set, one arm per product and day."""
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="date"),
        gxe.ExpectColumnValuesToNotBeNull(column="experiment"),
        gxe.ExpectColumnValuesToNotBeNull(column="product_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="unit_id"),
        gxe.ExpectColumnValuesToBeInSet(column="arm", value_set=ARMS),
        gxe.ExpectColumnValuesToNotBeNull(column="blackout"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["date", "product_id"]),
    ]


def split_units(assignments: DataFrame, examples: int = 5) -> tuple[int, list[str]]:
    """Units given more than one arm on a day (a randomisation unit must move as one)."""
    split = (
        assignments.groupBy("date", "experiment", "unit_id")
        .agg(F.countDistinct("arm").alias("arms"))
        .where("arms > 1")
    )
    rows = split.limit(examples).collect()
    n = split.count() if rows else 0
    return n, [f"{r['experiment']}/{r['unit_id']} on {r['date']}" for r in rows]
