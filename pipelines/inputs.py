"""Contract-v1 inputs: find the files, read them with an explicit schema, reject bad rows.

Inputs live under `<data_dir>/input/<name>` as one Parquet or CSV file, or a directory of them
(daily drops). A file whose columns break the contract is refused whole, with its name and the
missing field; a row that breaks it is kept aside with the file, its key and the reason. The rest
goes on: callers get the good rows plus a table of what was refused and why.

Files are `.parquet`, `.csv` or `.csv.gz` (any letter case); any other visible file in an input
directory is refused by name, never skipped silently. A file that cannot be read (a corrupt
Parquet footer) is refused alone. Values must be finite (NaN / Infinity refused), sales may not
be dated after today + FUTURE_TOLERANCE_DAYS, and a key given twice with different values is
refused in every copy (which file sorts first must never decide which row wins); exact copies
keep one row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from pipelines.contract import (  # noqa: F401  (re-exported: callers use pipelines.inputs.*)
    FUTURE_TOLERANCE_DAYS, INPUT_SUFFIXES, MESSAGE_CHARS, InputError, _file_columns, _input_suffix, _one_line,
    input_files, input_listing, last_complete_day, today_utc,
)
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

# Required columns per input and the type each is cast to; extra columns are kept.
CATALOG_COLUMNS = {"product_id": T.StringType(), "category": T.StringType(), "subclass": T.StringType()}
SALES_COLUMNS = {
    "product_id": T.StringType(),
    "date": T.DateType(),
    "price": T.DoubleType(),
    "units": T.DoubleType(),
}
SALES_OPTIONAL = {"views": T.DoubleType(), "revenue": T.DoubleType()}
TRIGGER_COLUMNS = {"product_id": T.StringType(), "date": T.DateType(), "event": T.StringType()}
RELATED_PAIRS_COLUMNS = {"product_id_a": T.StringType(), "product_id_b": T.StringType()}

SOURCE = "_source_file"
REJECTED_SCHEMA = T.StructType(
    [
        T.StructField("input", T.StringType()),
        T.StructField("file", T.StringType()),
        T.StructField("row_key", T.StringType()),
        T.StructField("field", T.StringType()),
        T.StructField("reason", T.StringType()),
    ]
)


def _read_file(spark: SparkSession, path: Path) -> DataFrame:
    if _input_suffix(path) == ".parquet":
        return spark.read.parquet(str(path))
    return spark.read.option("header", True).option("inferSchema", False).csv(str(path))


def _cast(df: DataFrame, columns: dict[str, T.DataType]) -> DataFrame:
    """Cast required/optional columns to the contract type; originals kept as `_raw_<col>`."""
    for name, dtype in columns.items():
        if name in df.columns:
            df = df.withColumn(f"_raw_{name}", F.col(name).cast("string")).withColumn(name, F.col(name).try_cast(dtype))
    return df


@dataclass
class LoadedInput:
    """Good rows, refused rows (input, file, row_key, field, reason), refused whole files, and
    the rows as read (`raw`, before any refusal) for the data-quality suite."""

    rows: DataFrame
    rejected: DataFrame
    refused_files: list[str] = field(default_factory=list)
    raw: DataFrame | None = None


def read_input(
    spark: SparkSession,
    data_dir: Path,
    name: str,
    required: dict[str, T.DataType],
    optional: dict[str, T.DataType] | None = None,
    must_exist: bool = True,
) -> tuple[DataFrame | None, list[str]]:
    """Read every file of input `name`, cast to the contract, tag rows with their file.

    Returns the union of the usable files (None when there is none) and one message per refused
    file. Files are grouped by column set so a daily drop with an extra column still unions.
    """
    files, refused = input_listing(data_dir, name)
    if not files:
        if must_exist:
            raise InputError(
                f"input '{name}': no file at {Path(data_dir) / 'input' / name}[.parquet|.csv|.csv.gz|/]"
                + (f" ({'; '.join(refused)[:MESSAGE_CHARS]})" if refused else "")
            )
        return None, refused
    frames: list[DataFrame] = []
    wanted = {**required, **(optional or {})}
    for path in files:
        try:
            columns = _file_columns(path)
        except Exception as exc:  # unreadable file: refuse it, keep the others
            refused.append(f"{path}: cannot be read ({_one_line(exc)})")
            continue
        missing = [c for c in required if c not in columns]
        if missing:
            refused.append(f"{path}: field(s) {', '.join(repr(m) for m in missing)} missing (has {str(columns)[:MESSAGE_CHARS]})")
            continue
        df = _cast(_read_file(spark, path), wanted).withColumn(SOURCE, F.lit(str(path)))
        frames.append(df)
    if not frames:
        if must_exist:
            raise InputError(f"input '{name}': every file was refused: " + "; ".join(refused)[: 2 * MESSAGE_CHARS])
        return None, refused
    rows = frames[0]
    for frame in frames[1:]:
        rows = rows.unionByName(frame, allowMissingColumns=True)
    return rows, refused


def _reject(rows: DataFrame, rules: list[tuple[str, Column, str]], key: Column, input_name: str):
    """Split rows by rules (field, condition that is True when the row is bad, reason)."""
    reasons = F.array_compact(
        F.array(*[F.when(bad, F.struct(F.lit(fld).alias("field"), F.lit(why).alias("reason"))) for fld, bad, why in rules])
    )
    tagged = rows.withColumn("_problems", reasons)
    good = tagged.where(F.size("_problems") == 0).drop("_problems")
    bad = (
        tagged.where(F.size("_problems") > 0)
        .select(
            F.lit(input_name).alias("input"),
            F.col(SOURCE).alias("file"),
            key.alias("row_key"),
            F.col("_problems")[0]["field"].alias("field"),
            F.col("_problems")[0]["reason"].alias("reason"),
        )
    )
    return good, bad


def _drop_raw(df: DataFrame) -> DataFrame:
    return df.drop(*[c for c in df.columns if c.startswith("_raw_")])


def _unparsed(column: str) -> Column:
    """True where a value was given but could not be cast to the contract type."""
    return F.col(column).isNull() & F.col(f"_raw_{column}").isNotNull()


def _duplicates(good: DataFrame, keys: list[str], input_name: str, what: str, values: list[str] | None = None):
    """One row per key. Exact copies (same `values`) keep one row and refuse the others naming
    the file kept; copies that disagree are ALL refused, naming the files, so which file sorts
    first never decides which value wins."""
    from pyspark.sql.window import Window

    values = [v for v in (values or []) if v in good.columns]
    by_key = Window.partitionBy(*keys)
    order = by_key.orderBy(F.col(SOURCE), *[F.col(v) for v in values])
    signature = F.to_json(F.struct(*[F.col(v) for v in values])) if values else F.lit("")
    ranked = (
        good.withColumn("_n", F.row_number().over(order))
        .withColumn("_first_file", F.first(SOURCE).over(order))
        .withColumn("_versions", F.size(F.collect_set(signature).over(by_key)))
        .withColumn("_files", F.array_join(F.array_sort(F.collect_set(SOURCE).over(by_key)), ", "))
    )
    keep = ranked.where("_n = 1 AND _versions = 1").drop("_n", "_first_file", "_versions", "_files")
    reason = F.when(
        F.col("_versions") > 1,
        F.concat(F.lit(f"conflicting rows for {what} ("), F.col("_versions").cast("string"),
                 F.lit(" different values) in "), F.col("_files"), F.lit("; every copy refused")),
    ).otherwise(F.concat(F.lit(f"duplicate {what} (same values); kept the copy in "), F.col("_first_file")))
    dup = ranked.where("_n > 1 OR _versions > 1").select(
        F.lit(input_name).alias("input"),
        F.col(SOURCE).alias("file"),
        F.concat_ws("|", *[F.col(k).cast("string") for k in keys]).alias("row_key"),
        F.lit(",".join(keys)).alias("field"),
        reason.alias("reason"),
    )
    return keep, dup


def _not_finite(column: str) -> Column:
    return F.isnan(column) | (F.abs(F.col(column)) == F.lit(float("inf")))


def load_catalog(spark: SparkSession, data_dir: Path) -> LoadedInput:
    """The product catalogue: unique non-empty product_id, category and subclass per product."""
    rows, refused = read_input(spark, data_dir, "catalog", CATALOG_COLUMNS)
    rules = [
        (c, F.col(c).isNull() | (F.trim(F.col(c)) == ""), f"{c} is empty") for c in ("product_id", "category", "subclass")
    ]
    good, bad = _reject(rows, rules, F.coalesce(F.col("product_id"), F.lit("<null>")), "catalog")
    good, dup = _duplicates(good, ["product_id"], "catalog", "product_id", ["category", "subclass"])
    return LoadedInput(_drop_raw(good).drop(SOURCE), bad.unionByName(dup), refused, raw=rows)


def load_sales(
    spark: SparkSession, data_dir: Path, catalog: DataFrame | None = None, today: date | None = None
) -> LoadedInput:
    """Daily sales: one row per product and day with finite price > 0 and units >= 0, dated no
    later than `today` (default `today_utc()`) + FUTURE_TOLERANCE_DAYS.

    A missing day stays missing (no data, not zero sales). Rows for products absent from the
    catalogue are refused when a catalogue is given.
    """
    latest = (today or today_utc()) + timedelta(days=FUTURE_TOLERANCE_DAYS)
    rows, refused = read_input(spark, data_dir, "sales", SALES_COLUMNS, SALES_OPTIONAL)
    key = F.concat_ws("|", F.coalesce(F.col("product_id"), F.lit("<null>")), F.coalesce(F.col("_raw_date"), F.lit("<null>")))
    rules = [
        ("product_id", F.col("product_id").isNull() | (F.trim(F.col("product_id")) == ""), "product_id is empty"),
        ("date", _unparsed("date"), "date is not a date"),
        ("date", F.col("date").isNull(), "date is empty"),
        ("date", F.col("date") > F.lit(latest),
         f"date is in the future (after {latest}: today + {FUTURE_TOLERANCE_DAYS} day)"),
        ("price", _unparsed("price"), "price is not a number"),
        ("price", _not_finite("price"), "price is not finite (NaN or Infinity)"),
        ("price", F.col("price").isNull() | (F.col("price") <= 0), "price must be > 0"),
        ("units", _unparsed("units"), "units is not a number"),
        ("units", _not_finite("units"), "units is not finite (NaN or Infinity)"),
        ("units", F.col("units").isNull() | (F.col("units") < 0), "units must be >= 0"),
    ]
    for optional in SALES_OPTIONAL:
        if optional in rows.columns:
            rules += [
                (optional, _unparsed(optional), f"{optional} is not a number"),
                (optional, F.col(optional).isNotNull() & _not_finite(optional), f"{optional} is not finite (NaN or Infinity)"),
            ]
    good, bad = _reject(rows, rules, key, "sales")
    good, dup = _duplicates(good, ["product_id", "date"], "sales", "(product_id, date)",
                            ["price", "units", *SALES_OPTIONAL])
    bad = bad.unionByName(dup)
    if catalog is not None:
        known = catalog.select("product_id").withColumn("_known", F.lit(True))
        good = good.join(known, "product_id", "left")
        unknown = good.where(F.col("_known").isNull())
        bad = bad.unionByName(
            unknown.select(
                F.lit("sales").alias("input"),
                F.col(SOURCE).alias("file"),
                F.concat_ws("|", "product_id", F.col("date").cast("string")).alias("row_key"),
                F.lit("product_id").alias("field"),
                F.lit("product_id is not in the catalogue").alias("reason"),
            )
        )
        good = good.where(F.col("_known")).drop("_known")
    columns = list(SALES_COLUMNS) + [c for c in SALES_OPTIONAL if c in good.columns]
    extra = [c for c in good.columns if c not in columns and c != SOURCE and not c.startswith("_raw_")]
    return LoadedInput(good.select(*columns, *extra), bad, refused, raw=rows)


def load_trigger_events(spark: SparkSession, data_dir: Path) -> LoadedInput:
    """Optional trigger events (product_id, date, event); an empty table when absent."""
    rows, refused = read_input(spark, data_dir, "trigger_events", TRIGGER_COLUMNS, must_exist=False)
    if rows is None:
        empty = spark.createDataFrame([], T.StructType([T.StructField(k, v) for k, v in TRIGGER_COLUMNS.items()]))
        return LoadedInput(empty, spark.createDataFrame([], REJECTED_SCHEMA), refused)
    key = F.concat_ws("|", F.coalesce("product_id", F.lit("<null>")), F.coalesce("_raw_date", F.lit("<null>")))
    rules = [
        ("product_id", F.col("product_id").isNull(), "product_id is empty"),
        ("date", F.col("date").isNull(), "date is empty or not a date"),
        ("event", F.col("event").isNull() | (F.trim("event") == ""), "event is empty"),
    ]
    good, bad = _reject(rows, rules, key, "trigger_events")
    return LoadedInput(good.select(*TRIGGER_COLUMNS).dropDuplicates(), bad, refused)


def load_related_pairs(spark: SparkSession, data_dir: Path) -> DataFrame | None:
    """Optional candidate pairs for the graph; None means "every pair within a subclass"."""
    rows, _ = read_input(spark, data_dir, "related_pairs", RELATED_PAIRS_COLUMNS, must_exist=False)
    if rows is None:
        return None
    return rows.select(*RELATED_PAIRS_COLUMNS).dropna().dropDuplicates()


def last_complete_sales_day(sales: DataFrame, share: float = 0.5) -> date | None:
    """The latest day whose number of products sold is at least `share` of the median day's, so
    one stray row (a late or mistyped date) never decides a snapshot date. None when empty."""
    per_day = sales.groupBy("date").agg(F.countDistinct("product_id").alias("n")).toPandas()
    return last_complete_day(per_day, share)


def rejection_summary(rejected: DataFrame, examples: int = 5) -> tuple[dict[str, int], list[dict]]:
    """Counts of refused rows per (field, reason) and a few example rows, for logs and metadata."""
    counts = {
        f"{r['field']}: {r['reason']}": int(r["count"])
        for r in rejected.groupBy("field", "reason").count().orderBy(F.desc("count")).collect()
    }
    sample = [row.asDict() for row in rejected.limit(examples).collect()] if counts else []
    return counts, sample
