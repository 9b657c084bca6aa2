"""Turning a quality outcome into a Dagster asset check result, the same way everywhere."""

import dagster as dg

from pipelines.quality import QualityOutcome


def gx_check_result(check_name: str, outcome: QualityOutcome, severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    """Passed/failed with the failed expectations, their counts and example values as metadata."""
    metadata = {"rows": outcome.n_rows, "summary": outcome.describe()}
    if outcome.failures:
        metadata["failed_expectations"] = dg.MetadataValue.json(outcome.failures)
    return dg.AssetCheckResult(check_name=check_name, passed=outcome.passed, severity=severity, metadata=metadata)


def refused_rows_result(check_name: str, counts: dict[str, int], examples: list[dict], refused_files: list[str]) -> dg.AssetCheckResult:
    """A warning (not blocking) whenever any input row or file was refused, with the reasons."""
    passed = not counts and not refused_files
    metadata = {"refused_rows": sum(counts.values()), "refused_files": len(refused_files)}
    if counts:
        metadata["reasons"] = dg.MetadataValue.json(counts)
        metadata["examples"] = dg.MetadataValue.json(examples)
    if refused_files:
        metadata["files"] = dg.MetadataValue.json(refused_files)
    return dg.AssetCheckResult(
        check_name=check_name, passed=passed, severity=dg.AssetCheckSeverity.WARN, metadata=metadata
    )


ROW_COUNT = "dagster/row_count"


def run_metadata(spark=None, rows: int | None = None) -> dict:
    """Metadata every asset carries: its row count (`dagster/row_count`, shown in the UI's asset
    table) and, where the Spark session has a UI (on a cluster; local sessions run without one),
    a link to it."""
    metadata = {}
    if rows is not None:
        metadata[ROW_COUNT] = dg.MetadataValue.int(int(rows))
    try:
        url = spark.sparkContext.uiWebUrl if spark is not None else None  # classic sessions only
    except Exception:
        url = None
    if url:
        metadata["spark_ui"] = dg.MetadataValue.url(url)
    return metadata
