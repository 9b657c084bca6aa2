"""Every input checked in seconds, without Spark: `pricelab validate-inputs`.

The same contract as `pipelines.inputs` (Spark), applied with pandas and pyarrow: the same files
are refused with the same messages, and the same rows with the same (input, file, row_key, field,
reason) — `tests/test_validation.py` compares the two row for row on a corpus of bad inputs. The
file listing, the column reading and "today" are shared (`pipelines.contract`); the row rules are
written once per engine, in the same order (the first failing rule names the reason).
"""
from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from pipelines.contract import FUTURE_TOLERANCE_DAYS, MESSAGE_CHARS, _file_columns, _input_suffix, _one_line, input_listing, today_utc
from pipelines.delta_log import read_local_delta

SOURCE = "_source_file"
REJECTED_COLUMNS = ["input", "file", "row_key", "field", "reason"]
CATALOG_REQUIRED = ["product_id", "category", "subclass"]
SALES_REQUIRED = ["product_id", "date", "price", "units"]
SALES_OPTIONAL = ["views", "revenue"]
TRIGGER_REQUIRED = ["product_id", "date", "event"]
# Spark's string -> date cast: yyyy, yyyy-[m]m, yyyy-[m]m-[d]d, optionally followed by a time part
_SPARK_DATE = re.compile(r"^\s*(\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?(?:[ T].*)?\s*$")


@dataclass
class InputCheck:
    """What one input gave: rows read, good rows (pandas), refused rows, refused files."""

    name: str
    rows_read: int = 0
    good: pd.DataFrame | None = None
    rejected: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=REJECTED_COLUMNS))
    refused_files: list[str] = field(default_factory=list)
    error: str | None = None  # the input cannot be used at all


@dataclass
class Validation:
    inputs: dict[str, InputCheck]
    experiments: list[str]
    experiments_accepted: list[str]
    notes: list[str]
    kept: list[str] = field(default_factory=list)  # running experiments kept on their last valid spec
    specs: list = field(default_factory=list)  # the accepted specs (ExperimentSpec), running ones included

    def messages(self, examples_per_reason: int | None = None) -> list[str]:
        """One line per refusal: input errors, refused files, refused rows, refused experiment files."""
        lines: list[str] = []
        for check in self.inputs.values():
            if check.error:
                lines.append(check.error)
            lines.extend(f"{check.name}: file refused: {m}" for m in check.refused_files)
            for row in check.rejected.itertuples(index=False):
                lines.append(f"{check.name}: {row.file} row {row.row_key}: field '{row.field}' {row.reason}")
        lines.extend(f"experiment refused: {m}" for m in self.experiments)
        lines.extend(f"RUNNING EXPERIMENT KEPT: {m}" for m in self.kept)
        return lines

    @property
    def refusals(self) -> int:
        return (sum(bool(c.error) + len(c.refused_files) + len(c.rejected) for c in self.inputs.values())
                + len(self.experiments) + len(self.kept))


def _read(path: Path) -> pd.DataFrame:
    """The file as read: Parquet with its types, CSV as text (empty fields are null, like Spark's reader)."""
    if _input_suffix(path) == ".parquet":  # None for null, nan for NaN (as Spark reads them)
        table = pq.read_table(path)
        return pd.DataFrame({c: pd.Series(table.column(c).to_pylist(), dtype=object) for c in table.column_names})
    opener = gzip.open if _input_suffix(path) == ".csv.gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        frame = pd.read_csv(handle, dtype=str, keep_default_na=False, na_values=[""])
    return frame.astype(object).where(frame.notna(), None)


def _as_text(value) -> str | None:
    """A value as Spark's cast to string writes it (for row keys and unparsed checks)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _to_float(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if "_" in text:  # Python reads 1_000, Spark does not
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _to_date(value) -> date | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    match = _SPARK_DATE.match(str(value))
    if not match:
        return None
    try:
        return date(int(match.group(1)), int(match.group(2) or 1), int(match.group(3) or 1))
    except ValueError:
        return None


def _to_str(value) -> str | None:
    return _as_text(value)


def _load(data_dir: Path, name: str, required: list[str], must_exist: bool, optional: list[str] = ()) -> tuple[pd.DataFrame | None, InputCheck]:
    check = InputCheck(name)
    files, refused = input_listing(data_dir, name)
    check.refused_files = refused
    if not files:
        if must_exist:
            check.error = (
                f"input '{name}': no file at {Path(data_dir) / 'input' / name}[.parquet|.csv|.csv.gz|/]"
                + (f" ({'; '.join(refused)[:MESSAGE_CHARS]})" if refused else "")
            )
            check.refused_files = []
        return None, check
    frames = []
    for path in files:
        try:
            columns = _file_columns(path)
        except Exception as exc:
            check.refused_files.append(f"{path}: cannot be read ({_one_line(exc)})")
            continue
        missing = [c for c in required if c not in columns]
        if missing:
            check.refused_files.append(f"{path}: field(s) {', '.join(repr(m) for m in missing)} missing (has {str(columns)[:MESSAGE_CHARS]})")
            continue
        frame = _read(path)
        keep = [c for c in [*required, *optional] if c in frame.columns]
        frame = frame[keep].copy()
        frame[SOURCE] = str(path)
        frames.append(frame)
    if not frames:
        if must_exist:
            check.error = f"input '{name}': every file was refused: " + "; ".join(check.refused_files)[: 2 * MESSAGE_CHARS]
            check.refused_files = []
        return None, check
    rows = pd.concat(frames, ignore_index=True)
    check.rows_read = len(rows)
    return rows, check


def _apply_rules(rows: pd.DataFrame, rules: list[tuple[str, pd.Series, str]], keys: pd.Series, name: str):
    """Split rows by rules (field, bad mask, reason); the first failing rule names the reason."""
    reason = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    fld = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    for column, bad, why in rules:
        new = bad.fillna(False).astype(bool) & reason.isna()
        reason[new], fld[new] = why, column
    refused = reason.notna()
    rejected = pd.DataFrame({
        "input": name, "file": rows.loc[refused, SOURCE], "row_key": keys[refused],
        "field": fld[refused], "reason": reason[refused],
    })
    return rows[~refused], rejected


def _duplicates(good: pd.DataFrame, keys: list[str], name: str, what: str, values: list[str]):
    """As `pipelines.inputs._duplicates`: exact copies keep one row, disagreeing copies are all refused."""
    values = [v for v in values if v in good.columns]
    if good.empty:
        return good, pd.DataFrame(columns=REJECTED_COLUMNS)
    key_tuples = pd.Series(list(zip(*[good[k] for k in keys])), index=good.index)
    repeated = key_tuples.duplicated(keep=False)
    if not repeated.any():  # the common case, in one pass: a key given once is kept as it is
        return good, pd.DataFrame(columns=REJECTED_COLUMNS)
    work = good[repeated].copy()  # only the keys given more than once are looked at one by one
    work["_sig"] = [json.dumps([None if v is None else v for v in row], default=str) for row in work[values].itertuples(index=False)]
    work["_key"] = key_tuples[repeated]
    kept_rows, refused = list(good.index[~repeated]), []
    for _, group in work.groupby("_key", sort=False):
        ordered = group.sort_values([SOURCE, *values], na_position="first", kind="stable")
        versions = group["_sig"].nunique()
        files = ", ".join(sorted(group[SOURCE].unique()))
        first_file = ordered[SOURCE].iloc[0]
        row_key = "|".join(_as_text(v) if v is not None else "" for v in ordered[keys].iloc[0])
        for n, (index, row) in enumerate(ordered.iterrows()):
            if n == 0 and versions == 1:
                kept_rows.append(index)
                continue
            why = (f"conflicting rows for {what} ({versions} different values) in {files}; every copy refused"
                   if versions > 1 else f"duplicate {what} (same values); kept the copy in {first_file}")
            refused.append({"input": name, "file": row[SOURCE], "row_key": row_key, "field": ",".join(keys), "reason": why})
    return good.loc[kept_rows], pd.DataFrame(refused, columns=REJECTED_COLUMNS)


def _map(values: pd.Series, function) -> pd.Series:
    """`values.map(function)` keeping None as None (pandas would make a float column's None NaN)."""
    return pd.Series([function(v) for v in values], index=values.index, dtype=object)


def _null(values: pd.Series) -> pd.Series:
    """None only (NaN is a value, as in Spark)."""
    return values.map(lambda v: v is None)


def _unparsed(raw: pd.Series, parsed: pd.Series) -> pd.Series:
    return _null(parsed) & ~_null(raw)


def _not_finite(values: pd.Series) -> pd.Series:
    return values.map(lambda v: v is not None and not math.isfinite(v))


def check_catalog(data_dir: Path) -> InputCheck:
    rows, check = _load(data_dir, "catalog", CATALOG_REQUIRED, must_exist=True)
    if rows is None:
        return check
    for c in CATALOG_REQUIRED:
        rows[c] = _map(rows[c], _to_str)
    rules = [(c, rows[c].map(lambda v: v is None or v.strip() == ""), f"{c} is empty") for c in CATALOG_REQUIRED]
    keys = rows["product_id"].map(lambda v: "<null>" if v is None else v)
    good, bad = _apply_rules(rows, rules, keys, "catalog")
    good, dup = _duplicates(good, ["product_id"], "catalog", "product_id", ["category", "subclass"])
    check.good, check.rejected = good, pd.concat([bad, dup], ignore_index=True)
    return check


def check_sales(data_dir: Path, catalog: pd.DataFrame | None, today: date | None = None) -> InputCheck:
    latest = (today or today_utc()) + timedelta(days=FUTURE_TOLERANCE_DAYS)
    rows, check = _load(data_dir, "sales", SALES_REQUIRED, must_exist=True, optional=SALES_OPTIONAL)
    if rows is None:
        return check
    raw_date = _map(rows["date"], _as_text)
    rows["product_id"] = _map(rows["product_id"], _to_str)
    rows["date"] = _map(rows["date"], _to_date)
    raw = {}
    for column in ["price", "units", *[c for c in SALES_OPTIONAL if c in rows.columns]]:
        raw[column] = rows[column]
        rows[column] = _map(rows[column], _to_float)
    keys = pd.Series(
        [f"{'<null>' if p is None else p}|{'<null>' if d is None else d}" for p, d in zip(rows["product_id"], raw_date)],
        index=rows.index,
    )
    rules = [
        ("product_id", rows["product_id"].map(lambda v: v is None or v.strip() == ""), "product_id is empty"),
        ("date", _unparsed(raw_date, rows["date"]), "date is not a date"),
        ("date", _null(rows["date"]), "date is empty"),
        ("date", rows["date"].map(lambda d: d is not None and d > latest),
         f"date is in the future (after {latest}: today + {FUTURE_TOLERANCE_DAYS} day)"),
        ("price", _unparsed(raw["price"], rows["price"]), "price is not a number"),
        ("price", _not_finite(rows["price"]), "price is not finite (NaN or Infinity)"),
        ("price", rows["price"].map(lambda v: v is None or v <= 0), "price must be > 0"),
        ("units", _unparsed(raw["units"], rows["units"]), "units is not a number"),
        ("units", _not_finite(rows["units"]), "units is not finite (NaN or Infinity)"),
        ("units", rows["units"].map(lambda v: v is None or v < 0), "units must be >= 0"),
    ]
    for optional in SALES_OPTIONAL:
        if optional in rows.columns:
            rules += [
                (optional, _unparsed(raw[optional], rows[optional]), f"{optional} is not a number"),
                (optional, _not_finite(rows[optional]), f"{optional} is not finite (NaN or Infinity)"),
            ]
    good, bad = _apply_rules(rows, rules, keys, "sales")
    good, dup = _duplicates(good, ["product_id", "date"], "sales", "(product_id, date)", ["price", "units", *SALES_OPTIONAL])
    refused = [bad, dup]
    if catalog is not None:
        unknown = ~good["product_id"].isin(set(catalog["product_id"]))
        refused.append(pd.DataFrame({
            "input": "sales", "file": good.loc[unknown, SOURCE],
            "row_key": [f"{p}|{d}" for p, d in zip(good.loc[unknown, "product_id"], good.loc[unknown, "date"])],
            "field": "product_id", "reason": "product_id is not in the catalogue",
        }))
        good = good[~unknown]
    check.good = good
    check.rejected = pd.concat([r for r in refused if len(r)], ignore_index=True) if any(len(r) for r in refused) else check.rejected
    return check


def check_trigger_events(data_dir: Path) -> InputCheck:
    rows, check = _load(data_dir, "trigger_events", TRIGGER_REQUIRED, must_exist=False)
    if rows is None:
        return check
    raw_date = _map(rows["date"], _as_text)
    rows["product_id"] = _map(rows["product_id"], _to_str)
    rows["event"] = _map(rows["event"], _to_str)
    rows["date"] = _map(rows["date"], _to_date)
    keys = pd.Series(
        [f"{'<null>' if p is None else p}|{'<null>' if d is None else d}" for p, d in zip(rows["product_id"], raw_date)],
        index=rows.index,
    )
    rules = [
        ("product_id", _null(rows["product_id"]), "product_id is empty"),
        ("date", _null(rows["date"]), "date is empty or not a date"),
        ("event", rows["event"].map(lambda v: v is None or v.strip() == ""), "event is empty"),
    ]
    check.good, check.rejected = _apply_rules(rows, rules, keys, "trigger_events")
    return check


def read_delta_table(path: Path) -> pd.DataFrame | None:
    """A small local Delta table read without Spark (by delta-rs), partition values as text
    columns; None when the table does not exist or delta-rs cannot read it."""
    table = read_local_delta(path) if (path / "_delta_log").is_dir() else None
    if table is None:
        return None
    try:
        frame = table.to_pandas()
        partition_columns = table.metadata().partition_columns
    except Exception:  # noqa: BLE001 - unreadable this way: the caller says so
        return None
    for column in partition_columns:
        frame[column] = [None if v is None else str(v) for v in frame[column]]
    return frame


def running_from_warehouse(data_dir: Path, tables_url: str | None = None):
    """The running experiments (name -> last valid spec, as the `experiments` asset computes them)
    from the local warehouse without Spark, and a note when they cannot be read that way.
    `tables_url`: where the tables are when not under `<data_dir>/warehouse`."""
    from urllib.parse import urlparse

    from pipelines import experiments as experiment_files

    url = tables_url or str(Path(data_dir) / "warehouse")
    if urlparse(url).scheme not in ("", "file"):
        return {}, f"running experiments not checked: the warehouse is at {url} (validate-inputs reads local tables only)"
    tables = Path(urlparse(url).path if url.startswith("file:") else url)
    registry_path = tables / experiment_files.REGISTRY_TABLE
    if not (registry_path / "_delta_log").is_dir():
        return {}, None
    registry = read_delta_table(registry_path)
    if registry is None:
        return {}, f"running experiments not checked: {registry_path} cannot be read without Spark (build-graph checks them)"
    if registry.empty:
        return {}, None
    registry = registry.drop(columns="experiment", errors="ignore").sort_values("name").reset_index(drop=True)
    previous = read_delta_table(tables / "experiments")
    running = experiment_files.running_specs(registry, previous)
    for name in experiment_files.retired_names(tables) & set(running):
        running.pop(name)
    return running, None


def validate_inputs(data_dir: str | Path, today: date | None = None, running=None,
                    tables_url: str | None = None) -> Validation:
    """Check every input under `<data_dir>/input/`: catalogue, sales, trigger events, experiment
    files (against the catalogue, and against `running` specs: by default the running
    experiments of the warehouse at `tables_url` or `<data_dir>/warehouse`, as build-graph will
    see them). Never starts Spark."""
    from pipelines import experiments as experiment_files

    data_dir = Path(data_dir)
    notes: list[str] = []
    if running is None:
        running, note = running_from_warehouse(data_dir, tables_url)
        notes += [note] if note else []
    catalog = check_catalog(data_dir)
    known = catalog.good[CATALOG_REQUIRED] if catalog.good is not None else None
    sales = check_sales(data_dir, known, today)
    triggers = check_trigger_events(data_dir)
    refused, accepted, kept, specs = [], [], [], []
    directory = data_dir / "input" / "experiments"
    if known is None:
        notes.append("experiment files not checked against the catalogue: the catalogue is unusable")
    else:
        loaded = experiment_files.load_experiment_directory(directory, known, running)
        refused = [str(e) for e in loaded.refused] + list(loaded.ignored)
        specs = list(loaded.specs)
        accepted = [s.name for s in specs]
        kept = list(loaded.kept)
        if not experiment_files.experiment_file_paths(directory) and not running:
            notes.append(f"no experiment file in {directory}: no experiment will be published")
    return Validation({"catalog": catalog, "sales": sales, "trigger_events": triggers}, refused, accepted, notes, kept, specs)
