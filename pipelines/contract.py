"""The parts of input contract v1 that need no Spark: where input files are, which files are
read, their columns (a file that cannot be decoded is refused here), "today", and the reason texts
of every row rule. `pipelines.inputs` (Spark) and `pipelines.validation` (pandas, for
`pricelab validate-inputs`) both apply these, so they refuse the same rows with the same words.
"""
from __future__ import annotations

import gzip
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

FUTURE_TOLERANCE_DAYS = 1
MESSAGE_CHARS = 160
INPUT_SUFFIXES = (".parquet", ".csv", ".csv.gz")


def today_utc() -> date:
    """Today in UTC (callers that replay a past day pass their own `today` instead)."""
    return datetime.now(timezone.utc).date()


def _input_suffix(path: Path) -> str | None:
    lower = path.name.lower()
    return next((s for s in sorted(INPUT_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)


class InputError(ValueError):
    """An input that cannot be used at all (missing, or no file with the required fields)."""


def input_listing(data_dir: Path, name: str) -> tuple[list[Path], list[str]]:
    """The Parquet/CSV files making up input `name` (`<name>.parquet|.csv|.csv.gz` in any case,
    or a directory of such files), sorted, and one message per other visible file of that
    directory (refused, never silently skipped). Hidden and `_`-prefixed files are ignored
    (Spark's `_SUCCESS`, `.crc`)."""
    root = Path(data_dir) / "input"
    files: list[Path] = []
    ignored: list[str] = []
    if root.is_dir():
        files.extend(
            p for p in root.iterdir()
            if p.is_file() and _input_suffix(p) and p.name[: -len(_input_suffix(p))] == name
        )
    directory = root / name
    if directory.is_dir():
        for p in sorted(directory.rglob("*")):
            if not p.is_file() or any(part.startswith((".", "_")) for part in p.relative_to(directory).parts):
                continue
            if _input_suffix(p):
                files.append(p)
            else:
                ignored.append(f"{p}: not a data file (only {', '.join(INPUT_SUFFIXES)} are read); ignored")
    return sorted(files), ignored


def input_files(data_dir: Path, name: str) -> list[Path]:
    """The Parquet/CSV files making up input `name` (a file or a directory of files), sorted."""
    return input_listing(data_dir, name)[0]


def _file_columns(path: Path) -> list[str]:
    """The file's column names; raises on a file that cannot be read (e.g. a corrupt footer)."""
    suffix = _input_suffix(path)
    if suffix == ".parquet":
        metadata = pq.read_metadata(path)  # footer and every row group's bounds
        size = path.stat().st_size
        for i in range(metadata.num_row_groups):
            group = metadata.row_group(i)
            for j in range(group.num_columns):
                chunk = group.column(j)
                first = chunk.dictionary_page_offset if chunk.has_dictionary_page and chunk.dictionary_page_offset else chunk.data_page_offset
                if first < 4 or first + chunk.total_compressed_size > size - 8:
                    raise ValueError(f"row group {i} column {j} points outside the file (truncated?)")
        names = list(metadata.schema.to_arrow_schema().names)
        # decode every page once (streaming, one batch at a time): a file whose pages are
        # corrupt is refused here, alone, rather than failing the Spark job that reads them all
        handle = pq.ParquetFile(path)
        for batch in handle.iter_batches(batch_size=1 << 16):
            del batch
        return names
    opener = gzip.open if suffix == ".csv.gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        header = handle.readline().strip()
    return [c.strip().strip('"') for c in header.split(",")] if header else []


def _one_line(exc: Exception) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "...(cut)"


def last_complete_day(per_day, share: float = 0.5) -> date | None:
    """The latest `date` of `per_day` (pandas: date, n = products sold that day) whose `n` is at
    least `share` of the median day's, so one stray row (a late or mistyped date) never decides a
    snapshot date. None when empty. Spark (`pipelines.inputs`) and pandas callers share it."""
    if per_day.empty:
        return None
    threshold = share * float(per_day["n"].median())
    return max(per_day.loc[per_day["n"] >= threshold, "date"])
