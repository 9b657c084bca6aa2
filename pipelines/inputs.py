"""Contract-v1 inputs: find the files, read them with an explicit schema, reject bad rows.

Inputs live under `<data_dir>/input/<name>` as one Parquet or CSV file, or a directory of them
(daily drops). A file whose columns break the contract is refused whole, with its name and the
missing field; a row that breaks it is kept aside with the file, its key and the reason. The rest
goes on: callers get the good rows plus a table of what was refused and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
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


class InputError(ValueError):
    """An input that cannot be used at all (missing, or no file with the required fields)."""


@dataclass
class LoadedInput:
    """Good rows, refused rows (input, file, row_key, field, reason), refused whole files, and
    the rows as read (`raw`, before any refusal) for the data-quality suite."""

    rows: DataFrame
    rejected: DataFrame
    refused_files: list[str] = field(default_factory=list)
    raw: DataFrame | None = None


def input_files(data_dir: Path, name: str) -> list[Path]:
    """The Parquet/CSV files making up input `name` (a file or a directory of files), sorted."""
    root = Path(data_dir) / "input"
    candidates = [root / f"{name}.parquet", root / f"{name}.csv", root / name]
    files: list[Path] = []
    for path in candidates:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in (".parquet", ".csv") and not p.name.startswith((".", "_"))
            )
    return sorted(files)


def _file_columns(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return list(pq.read_schema(path).names)
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().strip()
    return [c.strip().strip('"') for c in header.split(",")] if header else []


def _read_file(spark: SparkSession, path: Path) -> DataFrame:
    if path.suffix == ".parquet":
        return spark.read.parquet(str(path))
    return spark.read.option("header", True).option("inferSchema", False).csv(str(path))


def _cast(df: DataFrame, columns: dict[str, T.DataType]) -> DataFrame:
    """Cast required/optional columns to the contract type; originals kept as `_raw_<col>`."""
    for name, dtype in columns.items():
        if name in df.columns:
            df = df.withColumn(f"_raw_{name}", F.col(name).cast("string")).withColumn(name, F.col(name).try_cast(dtype))
    return df


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
    files = input_files(data_dir, name)
    if not files:
        if must_exist:
            raise InputError(f"input '{name}': no file at {Path(data_dir) / 'input' / name}[.parquet|.csv|/]")
        return None, []
    refused: list[str] = []
    frames: list[DataFrame] = []
    wanted = {**required, **(optional or {})}
    for path in files:
        try:
            columns = _file_columns(path)
        except Exception as exc:  # unreadable file: refuse it, keep the others
            refused.append(f"{path}: cannot be read ({type(exc).__name__}: {exc})")
            continue
        missing = [c for c in required if c not in columns]
        if missing:
            refused.append(f"{path}: field(s) {', '.join(repr(m) for m in missing)} missing (has {columns})")
            continue
        df = _cast(_read_file(spark, path), wanted).withColumn(SOURCE, F.lit(str(path)))
        frames.append(df)
    if not frames:
        if must_exist:
            raise InputError(f"input '{name}': every file was refused: " + "; ".join(refused))
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


def _duplicates(good: DataFrame, keys: list[str], input_name: str, what: str):
    """Keep the first row per key (by file, then position); refuse the others naming both."""
    from pyspark.sql.window import Window

    order = Window.partitionBy(*keys).orderBy(F.col(SOURCE), F.monotonically_increasing_id())
    ranked = good.withColumn("_n", F.row_number().over(order)).withColumn("_first_file", F.first(SOURCE).over(order))
    keep = ranked.where("_n = 1").drop("_n", "_first_file")
    dup = ranked.where("_n > 1").select(
        F.lit(input_name).alias("input"),
        F.col(SOURCE).alias("file"),
        F.concat_ws("|", *[F.col(k).cast("string") for k in keys]).alias("row_key"),
        F.lit(",".join(keys)).alias("field"),
        F.concat(F.lit(f"duplicate {what}; first seen in "), F.col("_first_file")).alias("reason"),
    )
    return keep, dup


def load_catalog(spark: SparkSession, data_dir: Path) -> LoadedInput:
    """The product catalogue: unique non-empty product_id, category and subclass per product."""
    rows, refused = read_input(spark, data_dir, "catalog", CATALOG_COLUMNS)
    rules = [
        (c, F.col(c).isNull() | (F.trim(F.col(c)) == ""), f"{c} is empty") for c in ("product_id", "category", "subclass")
    ]
    good, bad = _reject(rows, rules, F.coalesce(F.col("product_id"), F.lit("<null>")), "catalog")
    good, dup = _duplicates(good, ["product_id"], "catalog", "product_id")
    return LoadedInput(_drop_raw(good).drop(SOURCE), bad.unionByName(dup), refused, raw=rows)


def load_sales(spark: SparkSession, data_dir: Path, catalog: DataFrame | None = None) -> LoadedInput:
    """Daily sales: one row per product and day with price > 0 and units >= 0.

    A missing day stays missing (no data, not zero sales). Rows for products absent from the
    catalogue are refused when a catalogue is given.
    """
    rows, refused = read_input(spark, data_dir, "sales", SALES_COLUMNS, SALES_OPTIONAL)
    key = F.concat_ws("|", F.coalesce(F.col("product_id"), F.lit("<null>")), F.coalesce(F.col("_raw_date"), F.lit("<null>")))
    rules = [
        ("product_id", F.col("product_id").isNull() | (F.trim(F.col("product_id")) == ""), "product_id is empty"),
        ("date", _unparsed("date"), "date is not a date"),
        ("date", F.col("date").isNull(), "date is empty"),
        ("price", _unparsed("price"), "price is not a number"),
        ("price", F.col("price").isNull() | F.isnan("price") | (F.col("price") <= 0), "price must be > 0"),
        ("units", _unparsed("units"), "units is not a number"),
        ("units", F.col("units").isNull() | F.isnan("units") | (F.col("units") < 0), "units must be >= 0"),
    ]
    good, bad = _reject(rows, rules, key, "sales")
    good, dup = _duplicates(good, ["product_id", "date"], "sales", "(product_id, date)")
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


def rejection_summary(rejected: DataFrame, examples: int = 5) -> tuple[dict[str, int], list[dict]]:
    """Counts of refused rows per (field, reason) and a few example rows, for logs and metadata."""
    counts = {
        f"{r['field']}: {r['reason']}": int(r["count"])
        for r in rejected.groupBy("field", "reason").count().orderBy(F.desc("count")).collect()
    }
    sample = [row.asDict() for row in rejected.limit(examples).collect()] if counts else []
    return counts, sample
