"""A corpus of bad inputs and faults: one row per case, each with how the inputs are broken, the
message fragment the user must read, and what must stay unchanged (checked by checksum).

Layers, cheapest first:
- `experiment`: files in `input/experiments/` through `load_experiment_directory` (pure Python);
- `sales`, `catalog`, `trigger_events`: files under `input/` through `pipelines.inputs` (Spark);
- `storage`: faults of the warehouse (Delta tables: kills before and during a commit, locks, a
  second publish of a day);
- `asset`: `dagster.materialize` of the input and publishing assets on a tiny market, where the
  checksum covers every published day and enrolment file byte for byte.
Every message must be one line, bounded, and name the file, field or row.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import hashlib
import shutil
import textwrap
from pathlib import Path
from typing import Callable

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from pipelines import experiments as ex
from pipelines import inputs
from pipelines.storage import Warehouse, WarehouseLockedError, WriteConflictError

MAX_MESSAGE_CHARS = 600

# ----------------------------------------------------------------------------------------------
# A tiny market: 2 categories x 2 subclasses x 6 products, 30 days of history, two experiments
# ----------------------------------------------------------------------------------------------

SUBCLASSES = [("kitchen", "k1"), ("kitchen", "k2"), ("garden", "g1"), ("garden", "g2")]
HISTORY = [dt.date(2025, 12, 1) + dt.timedelta(days=i) for i in range(30)]
START, END = dt.date(2026, 1, 5), dt.date(2026, 1, 20)
PUBLISHED = ["2026-01-05", "2026-01-06"]

TIME_BOUND = f"""\
name: tb-kitchen
design: time_bound
start: {START}
end: {END}
population: {{categories: [kitchen]}}
treatment: {{price_change: -0.05}}
seed: 11
"""
TRIGGERED = f"""\
name: trig-garden
design: triggered
start: {START}
end: {END}
population: {{categories: [garden]}}
treatment: {{price_change: -0.05}}
trigger_event: competitor_discount
duration_days: 5
seed: 12
"""


def catalog_frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"product_id": f"{sub}-{i}", "category": cat, "subclass": sub, "pack_size": float(i % 3)}
        for cat, sub in SUBCLASSES for i in range(6)
    ])


def sales_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [
        {"product_id": pid, "date": day, "price": round(float(10 + rng.normal()), 2), "units": float(rng.poisson(5))}
        for pid in catalog_frame()["product_id"] for day in HISTORY
    ]
    return pd.DataFrame(rows)


def write_market(root: Path) -> Path:
    (root / "input" / "sales").mkdir(parents=True)
    (root / "input" / "experiments").mkdir()
    catalog_frame().to_parquet(root / "input" / "catalog.parquet", index=False)
    sales_frame().to_parquet(root / "input" / "sales" / "history.parquet", index=False)
    garden = [p for p in catalog_frame()["product_id"] if p.startswith("g")]
    events = pd.DataFrame({"product_id": garden, "date": [dt.date(2026, 1, 7 + i % 3) for i in range(len(garden))],
                           "event": "competitor_discount"})
    events.to_parquet(root / "input" / "trigger_events.parquet", index=False)
    (root / "input" / "experiments" / "b-tb.yaml").write_text(TIME_BOUND)
    (root / "input" / "experiments" / "c-trig.yaml").write_text(TRIGGERED)
    return root


def experiments_dir(root: Path) -> Path:
    return root / "input" / "experiments"


def sales_dir(root: Path) -> Path:
    return root / "input" / "sales"


# ----------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------

def frame_checksum(frame: pd.DataFrame) -> str:
    """Content checksum of a table: rows sorted, columns sorted, as CSV."""
    if frame.empty:
        return "empty"
    canonical = frame[sorted(frame.columns)].astype(str).sort_values(sorted(frame.columns)).to_csv(index=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def files_checksum(root: Path, *tables: str) -> str:
    """Byte checksum of every visible file under warehouse/<table> (path and content); a table
    may name one partition (`daily_assignments/date=2026-01-05`)."""
    digest = hashlib.sha256()
    for table in tables:
        base = root / "warehouse" / table
        for path in sorted(base.rglob("*")) if base.exists() else []:
            relative = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                digest.update(str(relative).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    layer: str
    breaks: Callable[[Path], None]  # breaks the inputs (or the warehouse) under the data dir
    expect: str  # a fragment of the message the user reads
    unchanged: str  # what must stay as it was (checked by checksum), in words
    slow: bool = False


def add_experiment(file: str, text: str) -> Callable[[Path], None]:
    return lambda root: (experiments_dir(root) / file).write_text(textwrap.dedent(text))


def add_experiment_bytes(file: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (experiments_dir(root) / file).write_bytes(data)


def newcomer(**fields) -> str:
    """A valid experiment on other dates than the base ones, with `fields` changed."""
    body = {"name": "new-one", "design": "time_bound", "start": "2026-03-01", "end": "2026-03-10",
            "treatment": "{price_change: 0.03}", "seed": "1", **fields}
    return "".join(f"{k}: {v}\n" for k, v in body.items() if v is not None)


def edit_running(root: Path, old: str, new: str) -> None:
    path = experiments_dir(root) / "b-tb.yaml"
    path.write_text(path.read_text().replace(old, new))


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(9)
)

EXPERIMENT_CASES = [
    Case("yaml-alias-bomb", "experiment", add_experiment("bomb.yaml", ALIAS_BOMB), "YAML alias '*a' is not allowed", "base experiments"),
    Case("yaml-duplicate-key", "experiment", add_experiment("dup.yaml", newcomer() + "seed: 2\n"), "duplicate key 'seed'", "base experiments"),
    Case("yaml-huge-bad-value", "experiment", add_experiment("huge.yaml", newcomer(name="X" * 20000)), "is not a safe name", "base experiments"),
    Case("yaml-too-large-file", "experiment", add_experiment("big.yaml", newcomer() + "#" * 70000 + "\n"), "larger than 65536", "base experiments"),
    Case("yaml-deep-nesting", "experiment", add_experiment("deep.yaml", "name: " + "[" * 20000 + "]" * 20000 + "\n"), "deep.yaml: invalid YAML", "base experiments"),
    Case("yaml-syntax-error", "experiment", add_experiment("syntax.yaml", "name: [broken\n"), "syntax.yaml: invalid YAML at line", "base experiments"),
    Case("yaml-empty-file", "experiment", add_experiment("empty.yaml", ""), "found an empty file", "base experiments"),
    Case("yaml-top-level-list", "experiment", add_experiment("list.yaml", "- a\n- b\n"), "found a list", "base experiments"),
    Case("yaml-not-utf8", "experiment", add_experiment_bytes("latin.yaml", b"name: caf\xe9\n"), "cannot read the file (UnicodeDecodeError", "base experiments"),
    Case("yaml-python-tag", "experiment", add_experiment("tag.yaml", "name: !!python/object/apply:os.system [ls]\n"), "invalid YAML", "base experiments"),
    Case("price-change-500pct", "experiment", add_experiment("p5.yaml", newcomer(treatment="{price_change: 5}")), "field 'treatment.price_change': 5 is a +500% price change", "base experiments"),
    Case("price-change-below-minus-1", "experiment", add_experiment("pm.yaml", newcomer(treatment="{price_change: -1.5}")), "would make the price zero or negative", "base experiments"),
    Case("price-change-nan", "experiment", add_experiment("pn.yaml", newcomer(treatment="{price_change: .nan}")), "field 'treatment.price_change': nan is not a number", "base experiments"),
    Case("price-change-text", "experiment", add_experiment("pt.yaml", newcomer(treatment="{price_change: cheap}")), "'cheap' is not a number", "base experiments"),
    Case("unknown-field", "experiment", add_experiment("uf.yaml", newcomer(colour="red")), "field 'colour': unknown field", "base experiments"),
    Case("missing-seed", "experiment", add_experiment("ms.yaml", newcomer(seed=None)), "field 'seed': missing required field", "base experiments"),
    Case("end-before-start", "experiment", add_experiment("eb.yaml", newcomer(end="2026-02-01")), "field 'end': 2026-02-01 is before start", "base experiments"),
    Case("impossible-date", "experiment", add_experiment("id.yaml", newcomer(start="2026-02-30")), "field 'start': '2026-02-30' is not a date", "base experiments"),
    Case("date-with-time", "experiment", add_experiment("dt.yaml", newcomer(start="2026-03-01T10:00:00")), "is not a date", "base experiments"),
    Case("treated-fraction-1.5", "experiment", add_experiment("tf.yaml", newcomer(treated_fraction="1.5")), "strictly between 0 and 1", "base experiments"),
    Case("unknown-design", "experiment", add_experiment("ud.yaml", newcomer(design="ab_test")), "unknown design 'ab_test'", "base experiments"),
    Case("unsafe-name", "experiment", add_experiment("un.yaml", newcomer(name="../../etc")), "is not a safe name", "base experiments"),
    Case("seed-not-integer", "experiment", add_experiment("si.yaml", newcomer(seed="1.5")), "field 'seed': 1.5 is not an integer", "base experiments"),
    Case("unknown-category", "experiment", add_experiment("uc.yaml", newcomer(population="{categories: [toys]}")), "unknown category not in the catalogue: toys", "base experiments"),
    Case("triggered-without-event", "experiment", add_experiment("te.yaml", newcomer(design="triggered")), "field 'trigger_event': missing", "base experiments"),
    Case("crossover-blackout-too-long", "experiment", add_experiment("cb.yaml", newcomer(design="crossover", phase_days="7", blackout_days="7")), "leaves no analysable day", "base experiments"),
    Case("overlap-with-running", "experiment", add_experiment("a-over.yaml", newcomer(start=str(START), population="{subclasses: [k1]}")), "overlaps experiment 'tb-kitchen'", "base experiments"),
    Case("name-hijack-sorting-first", "experiment", add_experiment("a-hijack.yaml", newcomer(name="tb-kitchen", start=str(START), end=str(END), population="{categories: [garden]}")), "'tb-kitchen' belongs to running experiment file b-tb.yaml", "base experiments"),
    Case("duplicate-name-new-files", "experiment", lambda root: [add_experiment(f, newcomer(name="twin", start=s, end=e))(root) for f, s, e in [("x1.yaml", "2026-03-01", "2026-03-02"), ("x2.yaml", "2026-04-01", "2026-04-02")]], "'twin' is already used by", "base experiments"),
    Case("running-file-typo", "experiment", lambda root: edit_running(root, "design: time_bound", "design: time_bond"), "experiment 'tb-kitchen' is running but b-tb.yaml is refused (unknown design", "base experiments (the running one on its last valid spec)"),
    Case("running-file-removed", "experiment", lambda root: (experiments_dir(root) / "b-tb.yaml").unlink(), "its file b-tb.yaml is gone; keeping its last valid spec", "base experiments (the running one on its last valid spec)"),
    Case("running-file-renamed-experiment", "experiment", lambda root: edit_running(root, "name: tb-kitchen", "name: tb-other"), "b-tb.yaml no longer names it", "base experiments (the running one on its last valid spec)"),
    Case("upper-case-YAML-suffix", "experiment", add_experiment("UPPER.YAML", newcomer(name="upper")), "accepted: upper", "base experiments"),
    Case("not-an-experiment-file", "experiment", add_experiment("plan.json", "{}"), "plan.json: ignored: not an experiment file", "base experiments"),
]


def add_sales(file: str, rows: list[tuple], csv: bool = False, gz: bool = False) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        frame = pd.DataFrame(rows, columns=["product_id", "date", "price", "units"])
        path = sales_dir(root) / file
        if gz:
            with gzip.open(path, "wt") as handle:
                frame.to_csv(handle, index=False)
        elif csv:
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
    return apply


def corrupt_parquet(root: Path) -> None:
    data = (sales_dir(root) / "history.parquet").read_bytes()
    add_sales("late.parquet", [("k1-0", "2025-12-31", 10.0, 3.0)])(root)
    (sales_dir(root) / "broken.parquet").write_bytes(data[: len(data) // 2])


def scramble_middle(data: bytes) -> bytes:
    """The same file with its middle bytes garbled: a valid footer over corrupt pages."""
    mixed = bytearray(data)
    for i in range(len(mixed) // 4, len(mixed) // 2):
        mixed[i] = (mixed[i] * 7 + 13) % 256
    return bytes(mixed)


FIRST = HISTORY[0].isoformat()
SALES_CASES = [
    Case("infinite-price-csv", "sales", add_sales("inf.csv", [("k1-0", "2025-12-31", "Infinity", 2.0)], csv=True), "price is not finite (NaN or Infinity)", "history rows"),
    Case("infinite-units-parquet", "sales", add_sales("inf.parquet", [("k1-0", dt.date(2025, 12, 31), 3.0, float("inf"))]), "units is not finite (NaN or Infinity)", "history rows"),
    Case("nan-units-csv", "sales", add_sales("nan.csv", [("k1-0", "2025-12-31", 3.0, "NaN")], csv=True), "units is not finite", "history rows"),
    Case("future-dated-sale", "sales", add_sales("future.parquet", [("k1-0", dt.date(2099, 1, 1), 3.0, 1.0)]), "date is in the future", "history rows"),
    Case("conflicting-duplicate-new-file", "sales", add_sales("0-correction.parquet", [("k1-0", HISTORY[0], 99.0, 1.0)]), "conflicting rows for (product_id, date) (2 different values)", "history rows but the conflicting key"),
    Case("exact-duplicate-new-file", "sales", add_sales("0-copy.parquet", [tuple(sales_frame().iloc[0])]), "duplicate (product_id, date) (same values); kept the copy in", "history rows"),
    Case("upper-case-CSV-read", "sales", add_sales("NEW.CSV", [("k1-0", "2025-12-31", 9.0, 1.0)], csv=True), "rows: +1", "history rows"),
    Case("gzipped-csv-read", "sales", add_sales("new.csv.gz", [("k1-0", "2025-12-31", 9.0, 1.0)], gz=True), "rows: +1", "history rows"),
    Case("unsupported-file-in-sales-dir", "sales", lambda root: (sales_dir(root) / "notes.xlsx").write_bytes(b"PK"), "notes.xlsx: not a data file", "history rows"),
    Case("corrupt-parquet-refused-alone", "sales", corrupt_parquet, "broken.parquet: cannot be read", "history rows (and the good new file loads)"),
    Case("parquet-corrupt-pages", "sales", lambda root: (sales_dir(root) / "pages.parquet").write_bytes(scramble_middle((sales_dir(root) / "history.parquet").read_bytes())), "pages.parquet: cannot be read (OSError", "history rows"),
    Case("garbage-parquet", "sales", lambda root: (sales_dir(root) / "junk.parquet").write_bytes(b"not parquet at all"), "junk.parquet: cannot be read", "history rows"),
    Case("missing-units-column", "sales", lambda root: pd.DataFrame({"product_id": ["k1-0"], "date": [HISTORY[0]], "price": [1.0]}).to_parquet(sales_dir(root) / "nounits.parquet"), "field(s) 'units' missing", "history rows"),
    Case("price-not-a-number", "sales", add_sales("text.csv", [("k1-0", "2025-12-31", "cheap", 1.0)], csv=True), "price is not a number", "history rows"),
    Case("negative-price", "sales", add_sales("neg.parquet", [("k1-0", dt.date(2025, 12, 31), -1.0, 1.0)]), "price must be > 0", "history rows"),
    Case("unknown-product", "sales", add_sales("unk.parquet", [("zz-9", dt.date(2025, 12, 31), 1.0, 1.0)]), "product_id is not in the catalogue", "history rows"),
    Case("date-not-a-date", "sales", add_sales("bad-date.csv", [("k1-0", "31/12/2025", 1.0, 1.0)], csv=True), "date is not a date", "history rows"),
]


def catalog_with(extra: list[dict]) -> Callable[[Path], None]:
    return lambda root: pd.concat([catalog_frame(), pd.DataFrame(extra)]).to_parquet(root / "input" / "catalog.parquet", index=False)


OTHER_INPUT_CASES = [
    Case("catalog-conflicting-duplicate", "catalog", catalog_with([{"product_id": "k1-0", "category": "garden", "subclass": "g1", "pack_size": 0.0}]), "conflicting rows for product_id (2 different values)", "catalogue rows but the conflicting product"),
    Case("catalog-empty-subclass", "catalog", catalog_with([{"product_id": "new-1", "category": "garden", "subclass": " ", "pack_size": 0.0}]), "subclass is empty", "catalogue rows"),
    Case("trigger-event-empty", "trigger_events", lambda root: pd.concat([pd.read_parquet(root / "input" / "trigger_events.parquet"), pd.DataFrame({"product_id": ["g1-0"], "date": [dt.date(2026, 1, 8)], "event": [""]})]).to_parquet(root / "input" / "trigger_events.parquet", index=False), "event is empty", "trigger events"),
    Case("trigger-event-not-a-date", "trigger_events", lambda root: pd.DataFrame({"product_id": ["g1-0"], "date": ["soon"], "event": ["competitor_discount"]}).to_csv(root / "input" / "trigger_events.csv", index=False), "date is empty or not a date", "trigger events"),
]


def killed_before_commit(root: Path) -> None:
    """A writer killed after writing its data files, before its commit: files nobody committed."""
    sales_frame().tail(5).to_parquet(root / "warehouse" / "sales_copy" / "part-00000-killed-writer.snappy.parquet", index=False)


def killed_mid_commit(root: Path) -> None:
    """A writer killed while writing its commit: Delta writes it to a temporary file first (renamed
    into place without overwrite), so a half-written commit is a hidden temporary, never a version."""
    log = root / "warehouse" / "sales_copy" / "_delta_log"
    (log / ".00000000000000000001.json.0f5e-killed.tmp").write_text('{"add":{"path":"part-00000-killed-writer.snappy.parq')


STORAGE_CASES = [
    Case("kill-before-commit-leaves-orphan-files", "storage", killed_before_commit, "read: intact", "table content"),
    Case("kill-mid-commit-leaves-temporary-log-file", "storage", killed_mid_commit, "write: committed", "table content"),
    Case("concurrent-writer-holds-lock", "storage", lambda root: None, "is being written by pid", "table content"),
    Case("read-of-unwritten-table", "storage", lambda root: None, "warehouse table 'never_written' has not been written yet", "table content"),
    Case("second-publish-of-a-day", "storage", lambda root: None, "date=2026-01-05 is already published", "table content (and the published day)"),
]


def publish_first_day_of_triggered(root: Path) -> None:
    """Nothing to break: a fresh warehouse whose first publish is the triggered experiment's first
    day alone, before any trigger (the daily schedule's own path)."""


ASSET_CASES = [
    Case("first-triggered-day-alone", "asset", lambda root: None, "ok: published 2026-01-07", "published days", slow=True),
    Case("name-hijack-end-to-end", "asset", add_experiment("a-hijack.yaml", newcomer(name="tb-kitchen", start=str(START), end=str(END), population="{categories: [garden]}")), "'tb-kitchen' belongs to running experiment file b-tb.yaml", "published days", slow=True),
    Case("running-file-typo-end-to-end", "asset", lambda root: edit_running(root, "seed: 11", "seed: eleven"), "RUNNING EXPERIMENT KEPT: experiment 'tb-kitchen' is running but b-tb.yaml is refused", "published days", slow=True),
    Case("running-file-edit-changes-published", "asset", lambda root: edit_running(root, "seed: 11", "seed: 99"), "published day(s) would change", "published days"),
    Case("every-experiment-file-refused-fresh", "asset", lambda root: [p.write_text("name: [") for p in experiments_dir(root).iterdir()], "was refused (2); first:", "nothing published"),
    Case("every-experiment-file-refused-running", "asset", lambda root: [p.write_text("name: [") for p in experiments_dir(root).iterdir()], "RUNNING EXPERIMENT KEPT: experiment 'trig-garden' is running but c-trig.yaml is refused", "published days", slow=True),
    Case("empty-experiments-directory-fresh", "asset", lambda root: [p.unlink() for p in experiments_dir(root).iterdir()], "no accepted experiment in", "nothing published"),
    Case("empty-experiments-directory-running", "asset", lambda root: [p.unlink() for p in experiments_dir(root).iterdir()], "its file b-tb.yaml is gone", "published days", slow=True),
    Case("concurrent-publish", "asset", lambda root: None, "is being written by pid", "published days"),
    Case("unknown-partition", "asset", lambda root: None, "valid keys are days YYYY-MM-DD from", "published days"),
    Case("population-edit-after-publish-ignored", "asset", lambda root: edit_running(root, "categories: [kitchen]", "subclasses: [k1]"), "stays frozen because days with its rows are published", "published days", slow=True),
    Case("population-edit-before-any-publish", "asset", lambda root: None, "enrolment recomputed", "the enrolment follows the edit", slow=True),
    Case("split-unit-blocked-before-write", "asset", lambda root: None, "not published: assignments: FAILED", "published days (and the day refused is not written)"),
    Case("history-too-short-for-graph", "asset", lambda root: None, "the graph needs at least 60 days of history", "published days (and no snapshot written)"),
    Case("refused-trigger-rows-quarantined", "asset", lambda root: pd.concat([pd.read_parquet(root / "input" / "trigger_events.parquet"), pd.DataFrame({"product_id": [None], "date": [dt.date(2026, 1, 8)], "event": ["competitor_discount"]})]).to_parquet(root / "input" / "trigger_events.parquet", index=False), "quarantine/trigger_events: product_id is empty", "published days"),
]

ALL_CASES = EXPERIMENT_CASES + SALES_CASES + OTHER_INPUT_CASES + STORAGE_CASES + ASSET_CASES


def test_the_corpus_is_large_and_every_case_distinct():
    assert len(ALL_CASES) >= 40
    assert len({c.name for c in ALL_CASES}) == len(ALL_CASES)


def check_messages(messages: list[str], expect: str) -> None:
    assert any(expect in m for m in messages), f"{expect!r} not in {[m[:200] for m in messages]}"
    for message in messages:
        assert "\n" not in message and len(message) <= MAX_MESSAGE_CHARS, message[:300]
        assert "Traceback" not in message


# ----------------------------------------------------------------------------------------------
# experiment files (pure Python)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def running_tb(tmp_path_factory) -> dict[str, ex.ExperimentSpec]:
    """tb-kitchen is running (it has an enrolment), owned by b-tb.yaml."""
    root = write_market(tmp_path_factory.mktemp("running"))
    return {"tb-kitchen": ex.parse_experiment_file(experiments_dir(root) / "b-tb.yaml")}


def load_directory(root: Path, running) -> ex.ExperimentLoad:
    return ex.load_experiment_directory(experiments_dir(root), catalog_frame(), running)


@pytest.mark.parametrize("case", EXPERIMENT_CASES, ids=lambda c: c.name)
def test_experiment_file_case(case, tmp_path, running_tb):
    root = write_market(tmp_path)
    base = load_directory(root, running_tb)
    assert not base.refused and not base.kept
    base_sum = frame_checksum(ex.specs_to_frame(base.specs).drop(columns="source"))
    case.breaks(root)
    loaded = load_directory(root, running_tb)
    messages = [str(e) for e in loaded.refused] + loaded.kept + loaded.ignored + [f"accepted: {s.name}" for s in loaded.specs]
    check_messages(messages, case.expect)
    kept_base = ex.specs_to_frame([s for s in loaded.specs if s.name in {b.name for b in base.specs}]).drop(columns="source")
    assert frame_checksum(kept_base) == base_sum  # every base experiment still there, spec unchanged


def test_alias_bomb_is_refused_without_expanding(tmp_path):
    import tracemalloc

    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    tracemalloc.start()
    with pytest.raises(ex.ExperimentFileError, match="alias"):
        ex.parse_experiment_file(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000  # 9**10 elements were never built


# ----------------------------------------------------------------------------------------------
# sales, catalogue and trigger events (Spark, pipelines.inputs)
# ----------------------------------------------------------------------------------------------

def loaded_messages(loaded: inputs.LoadedInput) -> list[str]:
    rows = loaded.rejected.toPandas()
    return list(loaded.refused_files) + [
        f"{r.file} row {r.row_key}: field '{r.field}' {r.reason}" for r in rows.itertuples()
    ]


def _keyed(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    frame = frame.copy()
    for key in keys:
        frame[key] = frame[key].astype(str)
    return frame.set_index(keys).sort_index()


@pytest.mark.parametrize("case", SALES_CASES + OTHER_INPUT_CASES, ids=lambda c: c.name)
def test_input_case(case, spark, tmp_path):
    root = write_market(tmp_path)
    load, keys = {
        "sales": (lambda: inputs.load_sales(spark, root, catalog=inputs.load_catalog(spark, root).rows), ["product_id", "date"]),
        "catalog": (lambda: inputs.load_catalog(spark, root), ["product_id"]),
        "trigger_events": (lambda: inputs.load_trigger_events(spark, root), ["product_id", "date", "event"]),
    }[case.layer]
    base = _keyed(load().rows.toPandas(), keys)
    case.breaks(root)
    loaded = load()
    rows = _keyed(loaded.rows.toPandas(), keys)
    messages = loaded_messages(loaded) + [f"rows: +{len(rows) - len(base)}"]
    check_messages(messages, case.expect)
    # no base row silently changed or dropped: the ones gone are exactly the ones quarantined
    refused_keys = set(loaded.rejected.toPandas()["row_key"])
    both = base.index[base.index.isin(rows.index)]
    assert frame_checksum(rows.loc[both].reset_index()) == frame_checksum(base.loc[both].reset_index())
    gone = [("|".join(k) if isinstance(k, tuple) else k) for k in base.index[~base.index.isin(rows.index)]]
    assert set(gone) <= refused_keys, gone


def test_snapshot_date_ignores_one_stray_row(spark):
    sales = sales_frame()
    stray = pd.DataFrame([{"product_id": "k1-0", "date": dt.date(2027, 6, 1), "price": 10.0, "units": 1.0}])
    frame = spark.createDataFrame(pd.concat([sales, stray], ignore_index=True))
    assert inputs.last_complete_sales_day(frame) == HISTORY[-1]


def test_pool_profile_is_bit_identical_whatever_the_row_order():
    """Reruns reproduce HPTE bit for bit: the pooled profile no longer depends on the order Spark
    hands a group's rows over (a least-squares fit in another order differed by ~1e-14)."""
    from pipelines.estimation import CounterfactualSettings, pool_profile

    rng = np.random.default_rng(1)
    days = pd.date_range("2025-01-01", periods=400).date
    rows = pd.DataFrame([
        {"experiment": "e", "pool": "p", "product_id": f"p{i}", "date": d, "y": float(rng.poisson(5 + i))}
        for i in range(6) for d in days
    ])
    settings = CounterfactualSettings()
    first = pool_profile(rows, settings)["pool_coef"].iloc[0]
    assert len(first) > 0
    for seed in range(3):
        shuffled = rows.sample(frac=1.0, random_state=seed)
        assert pool_profile(shuffled, settings)["pool_coef"].iloc[0] == first  # == on floats: bit for bit


# ----------------------------------------------------------------------------------------------
# storage faults
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", STORAGE_CASES, ids=lambda c: c.name)
def test_storage_case(case, spark, tmp_path):
    warehouse = Warehouse(tmp_path)
    table = sales_frame().head(50)
    warehouse.write(table, "sales_copy")
    before = frame_checksum(warehouse.read(spark, "sales_copy").toPandas())
    case.breaks(tmp_path)
    messages = []
    if case.name == "kill-before-commit-leaves-orphan-files":
        assert frame_checksum(warehouse.read(spark, "sales_copy").toPandas()) == before  # the orphan files are not the table
        messages.append("read: intact")
    elif case.name == "kill-mid-commit-leaves-temporary-log-file":
        assert frame_checksum(warehouse.read(spark, "sales_copy").toPandas()) == before
        warehouse.write(table, "sales_copy")  # the rerun commits version 1 beside the killed temporary
        assert warehouse.history("sales_copy")["version"].tolist() == [0, 1]
        messages.append("write: committed")
    elif case.name == "second-publish-of-a-day":
        day = pd.DataFrame({"date": [START], "experiment": ["e"], "product_id": ["k1-0"], "arm": ["control"]})
        warehouse.write(day, "daily_assignments", ("date", START.isoformat()))
        published = frame_checksum(warehouse.read(spark, "daily_assignments").toPandas())
        with pytest.raises(WriteConflictError) as raised:
            warehouse.write(day.assign(arm="treatment"), "daily_assignments", ("date", START.isoformat()))
        messages.append(str(raised.value))
        assert frame_checksum(warehouse.read(spark, "daily_assignments").toPandas()) == published
        assert warehouse.audit_published(spark, "daily_assignments") == []
    elif case.name == "concurrent-writer-holds-lock":
        with warehouse.lock("sales_copy"):
            with pytest.raises(WarehouseLockedError) as raised:
                with Warehouse(tmp_path).lock("sales_copy"):
                    pass
        messages.append(str(raised.value))
        with warehouse.lock("sales_copy"):  # released: the next writer gets it
            pass
    elif case.name == "read-of-unwritten-table":
        with pytest.raises(FileNotFoundError) as raised:
            warehouse.read(spark, "never_written")
        messages.append(str(raised.value))
    check_messages(messages, case.expect)
    assert frame_checksum(warehouse.read(spark, "sales_copy").toPandas()) == before


def test_a_kill_at_every_write_step_leaves_a_whole_table(spark, tmp_path):
    """A Delta write has three steps: data files written, commit written to a temporary file,
    commit renamed into place (without overwrite: the atomic step). A kill after either of the
    first two leaves the old table; after the third the new one; never a mix. The rerun gives the
    same rows bit for bit."""
    warehouse = Warehouse(tmp_path)
    old, new = sales_frame().head(10), sales_frame().tail(10)
    warehouse.write(old, "t")
    log = warehouse.path("t") / "_delta_log"
    new.to_parquet(warehouse.path("t") / "part-00000-killed.snappy.parquet", index=False)  # step 1, then killed
    assert frame_checksum(warehouse.read(spark, "t").toPandas()) == frame_checksum(old)
    (log / ".00000000000000000001.json.killed.tmp").write_text('{"add":{"path":"part-00000-killed.snappy.parquet"')  # step 2
    assert frame_checksum(warehouse.read(spark, "t").toPandas()) == frame_checksum(old)
    warehouse.write(new, "t")  # the rerun, through step 3
    once = frame_checksum(warehouse.read(spark, "t").toPandas())
    assert once == frame_checksum(new)
    warehouse.write(new, "t")  # and again: the same rows, bit for bit (floats compared by their exact repr)
    assert frame_checksum(warehouse.read(spark, "t").toPandas()) == once
    assert warehouse.history("t")["version"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "warehouse").iterdir()) in (["t"], [".locks", "t"])


# ----------------------------------------------------------------------------------------------
# assets: dagster.materialize on the tiny market
# ----------------------------------------------------------------------------------------------

def materialize(root: Path, selection, **kwargs):
    """`dagster.materialize` of the input and publishing assets; the result carries its instance
    (`result.logs_instance`) so the run's log lines can be read back."""
    from assets import assignments as assignment_assets
    from assets import graph as graph_assets
    from assets import inputs as input_assets
    from jobs.definitions import DAILY_PARTITIONS
    from jobs.resources import SparkResource, WarehouseResource
    from tests.test_assets import with_snapshot_keys

    assets = [*dg.load_assets_from_modules([input_assets, graph_assets]), assignment_assets.daily_assignments_asset(DAILY_PARTITIONS)]
    resources = {"spark": SparkResource(), "warehouse": WarehouseResource(data_dir=str(root))}
    instance = dg.DagsterInstance.ephemeral()
    kwargs = with_snapshot_keys(instance, root, selection, kwargs)  # a graph build targets its snapshot partitions
    result = dg.materialize(assets, selection=selection, resources=resources, raise_on_error=False, instance=instance, **kwargs)
    result.logs_instance = instance
    return result


def run_messages(result) -> list[str]:
    """What the user reads: each step failure's description and every warning/error log line."""
    messages = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.event_specific_data.error
            cause = error.message.strip()
            messages.append(cause.replace("dagster._core.definitions.events.Failure: ", ""))
    for record in result.logs_instance.all_logs(result.run_id):
        if record.user_message and record.level >= 30 and not record.dagster_event:
            messages.append(record.user_message)
    return messages


def info_messages(result) -> list[str]:
    return [r.user_message for r in result.logs_instance.all_logs(result.run_id) if r.user_message and not r.dagster_event]


RANGE = {"dagster/asset_partition_range_start": PUBLISHED[0], "dagster/asset_partition_range_end": PUBLISHED[-1]}
INPUT_ASSETS = ["catalog", "sales", "trigger_events", "experiments"]


_PUBLISHED: dict[str, Path] = {}


def published_market_root(tmp_path_factory) -> Path:
    """Inputs read and the first two days published: built once per test session (the CLI cases
    of test_bad_inputs_cli.py use it too), never written to after; every case works on a copy."""
    if "root" not in _PUBLISHED:
        root = write_market(tmp_path_factory.mktemp("asset") / "data")
        assert materialize(root, INPUT_ASSETS).success
        assert materialize(root, ["daily_assignments"], tags=RANGE).success
        _PUBLISHED["root"] = root
    return _PUBLISHED["root"]


@pytest.fixture(scope="module")
def published_market(spark, tmp_path_factory) -> Path:
    return published_market_root(tmp_path_factory)


def _publish(root, day: str):
    return materialize(root, ["daily_assignments"], partition_key=day)


def as_params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in cases]


@pytest.mark.parametrize("case", as_params(ASSET_CASES))
def test_asset_case(case, spark, published_market, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(published_market, root)
    warehouse = Warehouse(root)
    if case.name.endswith("-fresh") or case.name == "first-triggered-day-alone":
        for table in ("daily_assignments", "enrolments", "experiment_registry"):  # a fresh deployment
            shutil.rmtree(root / "warehouse" / table)
    days = [f"daily_assignments/date={d}" for d in warehouse.partitions("daily_assignments", "date")]
    before = files_checksum(root, *days)  # the days published before the case, byte for byte
    case.breaks(root)
    messages: list[str] = []
    if case.name == "first-triggered-day-alone":
        for day in ("2026-01-05", "2026-01-06", "2026-01-07"):  # triggers fire from 2026-01-07
            result = _publish(root, day)
            assert result.success, run_messages(result)
        published = warehouse.read(spark, "daily_assignments").toPandas()
        assert set(published.loc[published["experiment"] == "trig-garden", "date"].astype(str)) == {"2026-01-07"}
        messages.append("ok: published 2026-01-07")
    elif case.name in ("name-hijack-end-to-end", "running-file-typo-end-to-end", "population-edit-after-publish-ignored"):
        result = materialize(root, ["experiments"])
        assert result.success
        messages += run_messages(result)
        day = _publish(root, "2026-01-07")
        assert day.success, run_messages(day)
        messages += run_messages(day)
        rows = warehouse.read(spark, "daily_assignments", ("date", "2026-01-07")).toPandas()
        assert set(rows["experiment"]) >= {"tb-kitchen"}  # the running experiment was never dropped
        tb = rows[rows["experiment"] == "tb-kitchen"]
        assert set(tb["product_id"].str[:1]) == {"k"}  # still kitchen, not the hijacker's garden
    elif case.name in ("running-file-edit-changes-published", "every-experiment-file-refused-fresh",
                       "empty-experiments-directory-fresh"):
        result = materialize(root, ["experiments"])
        messages += run_messages(result)
        assert result.success == (case.name != "every-experiment-file-refused-fresh")
        if result.success:
            again = _publish(root, PUBLISHED[0])
            assert not again.success
            messages += run_messages(again)
        assert warehouse.partitions("daily_assignments", "date") == [d.split("=")[1] for d in days]
    elif case.name in ("every-experiment-file-refused-running", "empty-experiments-directory-running"):
        result = materialize(root, ["experiments"])
        assert result.success
        messages += run_messages(result)
        again = _publish(root, PUBLISHED[0])  # the published day recomputes identically from the kept specs
        assert again.success, run_messages(again)
    elif case.name == "concurrent-publish":
        with warehouse.lock("daily_assignments"):
            result = _publish(root, "2026-01-07")
        assert not result.success
        messages += run_messages(result)
        assert not warehouse.exists("daily_assignments", ("date", "2026-01-07"))
    elif case.name == "unknown-partition":
        with pytest.raises(Exception) as raised:
            _publish(root, "2099-01-01")
        messages.append(str(raised.value))
    elif case.name == "population-edit-before-any-publish":
        shutil.rmtree(root / "warehouse" / "daily_assignments")  # a first publish killed after enrolling
        days, before = [], files_checksum(root)
        edit_running(root, "categories: [kitchen]", "subclasses: [k1]")
        assert materialize(root, ["experiments"]).success
        result = _publish(root, PUBLISHED[0])
        assert result.success
        messages += info_messages(result)
        enrolled = warehouse.read(spark, "enrolments", ("experiment", "tb-kitchen")).toPandas()
        assert set(enrolled["product_id"].str[:2]) == {"k1"}  # the edit applied
    elif case.name == "split-unit-blocked-before-write":
        units = warehouse.read(spark, "enrolments", ("experiment", "tb-kitchen")).drop("experiment").toPandas()
        forged = pd.concat([units, units.head(1).assign(unit_id="intruder")], ignore_index=True)
        warehouse.write(forged, "enrolments", ("experiment", "tb-kitchen"))
        result = _publish(root, "2026-01-07")
        assert not result.success
        messages += run_messages(result)
        assert not warehouse.exists("daily_assignments", ("date", "2026-01-07"))
    elif case.name == "history-too-short-for-graph":  # the market holds 30 days of sales; the graph needs 60
        result = materialize(root, ["substitution_graph"])
        assert not result.success
        messages += run_messages(result)
        assert not warehouse.exists("substitution_graph") and not warehouse.exists("substitution_blocks")
    elif case.name == "refused-trigger-rows-quarantined":
        result = materialize(root, ["trigger_events"])
        assert result.success
        quarantined = warehouse.read(spark, "quarantine/trigger_events").toPandas()
        messages += [f"quarantine/trigger_events: {r.reason}" for r in quarantined.itertuples()]
    check_messages([m for m in messages if m], case.expect)
    assert files_checksum(root, *days) == before
    if warehouse.exists("daily_assignments"):  # and Delta's history shows every published day as first committed
        assert warehouse.audit_published(spark, "daily_assignments") == []


def test_first_differences_rerun_bit_for_bit_whatever_spark_row_order(spark):
    """A rerun on the same data reproduces every first difference bit for bit, though Spark hands
    the rows over in another order (other partitioning): the published figures never drift."""
    from pyspark.sql import functions as F

    from pipelines.estimation import first_differences

    rng = np.random.default_rng(3)
    start = dt.date(2026, 1, 5)
    days = [start - dt.timedelta(days=400) + dt.timedelta(days=i) for i in range(407)]
    products = [f"k1-{i}" for i in range(8)]  # 6 with a long history, 2 short (the pooled model)
    sales = pd.DataFrame([
        {"product_id": p, "date": d, "price": 10.0, "units": float(rng.poisson(8))}
        for i, p in enumerate(products) for d in (days if i < 6 else days[-60:])
    ])
    assignments = pd.DataFrame([
        {"date": start + dt.timedelta(days=k), "experiment": "e", "product_id": p, "unit_id": p,
         "arm": "treatment" if i % 2 else "control", "blackout": False}
        for i, p in enumerate(products) for k in range(7)
    ])
    catalog = spark.createDataFrame(pd.DataFrame({"product_id": products, "subclass": "k1"}))  # one pool
    rows = spark.createDataFrame(sales)

    def run(frame):
        fd = first_differences(frame, spark.createDataFrame(assignments), {"e": "time_bound"}, catalog=catalog)
        return fd.toPandas().sort_values("product_id").reset_index(drop=True)

    once = run(rows.repartition(1))
    again = run(rows.repartition(5, F.rand(seed=11)).sortWithinPartitions(F.rand(seed=12)))
    assert set(once["model"]) >= {"pooled", "trend+weekly+yearly"}
    pd.testing.assert_frame_equal(once, again, check_exact=True)
