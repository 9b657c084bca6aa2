"""The corpus of `tests/test_bad_inputs.py` as the user meets it: through the `pricelab` command.

`test_bad_inputs.py` checks each case at its layer (loader, storage, asset). Here every case a
user causes runs through the command that first reads what it breaks, and what the command prints
is what is checked:
- `pricelab validate-inputs` (no Spark, seconds) for every experiment-file, sales, catalogue and
  trigger-event case, through `jobs.cli.main` (the console script's own entry point) in this
  process; a few through the installed console script itself, in a new process;
- `pricelab validate-inputs` on a tiny published warehouse for the running-experiment cases (it
  reads the enrolments from the Delta log without Spark, as build-graph will judge the files);
- `pricelab publish` on that warehouse (Spark, `slow`, few) for the cases only publishing shows.
Asserted for each: the exit code; one output line holding the expected fragment and naming the
file, field or row; every output line bounded; no traceback anywhere in stdout or stderr (Python's
`Traceback`, Dagster's `Stack Trace:`, a `File "..."` frame); every file that was under the data
directory before the command (inputs and warehouse) byte-identical after it, none gone, and
nothing new outside the Dagster instance (and the lock file, for publish).

Every case of the corpus is in exactly one of VALIDATE_CASES, RUNNING_CASES, WAREHOUSE_CASES,
TABLE_ONLY_CASES and NOT_THROUGH_CLI
(with the reason), so a new case cannot be left out silently. `benchmarks/edges_table.py` prints
the table of cases and the lines the CLI printed, from these same runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bad_inputs import (
    ALL_CASES, EXPERIMENT_CASES, OTHER_INPUT_CASES, PUBLISHED, SALES_CASES, Case, write_market,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRICELAB = str(Path(sys.executable).with_name("pricelab"))
TODAY = "2026-01-06"  # the corpus' market: history 2025-12-01..2025-12-30, experiments from 2026-01-05
MAX_LINE_CHARS = 1000
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|Stack Trace:|^\s*File \".*\", line \d+", re.M)
VALIDATE = ("validate-inputs",)


@dataclasses.dataclass(frozen=True)
class Cli:
    """What the user must read: `names` (the file, field or row) and `expect` (the reason; default
    the corpus case's own fragment) on one line, and the exit code."""

    names: str
    expect: str | None = None
    code: int = 3
    command: tuple[str, ...] = VALIDATE
    writes: tuple[str, ...] = ()  # what the command may add (new files only) besides the Dagster instance


# every experiment-file, sales, catalogue and trigger-event case a user causes: validate-inputs
VALIDATE_CASES: dict[str, Cli] = {
    "yaml-alias-bomb": Cli("experiment refused: {root}/input/experiments/bomb.yaml: invalid YAML at line 2"),
    "yaml-duplicate-key": Cli("experiment refused: {root}/input/experiments/dup.yaml: invalid YAML at line 7"),
    "yaml-huge-bad-value": Cli("{root}/input/experiments/huge.yaml: field 'name'"),
    "yaml-too-large-file": Cli("{root}/input/experiments/big.yaml: 70108 bytes"),
    "yaml-deep-nesting": Cli("experiment refused: {root}/input/experiments/deep.yaml"),
    "yaml-syntax-error": Cli("experiment refused: {root}/input/experiments/syntax.yaml"),
    "yaml-empty-file": Cli("experiment refused: {root}/input/experiments/empty.yaml"),
    "yaml-top-level-list": Cli("experiment refused: {root}/input/experiments/list.yaml"),
    "yaml-not-utf8": Cli("experiment refused: {root}/input/experiments/latin.yaml"),
    "yaml-python-tag": Cli("experiment refused: {root}/input/experiments/tag.yaml"),
    "price-change-500pct": Cli("experiment refused: {root}/input/experiments/p5.yaml"),
    "price-change-below-minus-1": Cli("{root}/input/experiments/pm.yaml: field 'treatment.price_change'"),
    "price-change-nan": Cli("experiment refused: {root}/input/experiments/pn.yaml"),
    "price-change-text": Cli("{root}/input/experiments/pt.yaml: field 'treatment.price_change'"),
    "unknown-field": Cli("experiment refused: {root}/input/experiments/uf.yaml"),
    "missing-seed": Cli("experiment refused: {root}/input/experiments/ms.yaml"),
    "end-before-start": Cli("experiment refused: {root}/input/experiments/eb.yaml"),
    "impossible-date": Cli("experiment refused: {root}/input/experiments/id.yaml"),
    "date-with-time": Cli("{root}/input/experiments/dt.yaml: field 'start'"),
    "treated-fraction-1.5": Cli("{root}/input/experiments/tf.yaml: field 'treated_fraction'"),
    "unknown-design": Cli("{root}/input/experiments/ud.yaml: field 'design'"),
    "unsafe-name": Cli("{root}/input/experiments/un.yaml: field 'name'"),
    "seed-not-integer": Cli("experiment refused: {root}/input/experiments/si.yaml"),
    "unknown-category": Cli("{root}/input/experiments/uc.yaml: field 'population.categories'"),
    "triggered-without-event": Cli("experiment refused: {root}/input/experiments/te.yaml"),
    "crossover-blackout-too-long": Cli("{root}/input/experiments/cb.yaml: field 'blackout_days'"),
    "duplicate-name-new-files": Cli("{root}/input/experiments/x2.yaml: field 'name'", "'twin' is already used by {root}/input/experiments/x1.yaml"),
    "upper-case-YAML-suffix": Cli("experiments: 3 accepted (upper, tb-kitchen, trig-garden)", "0 refused", code=0),
    "not-an-experiment-file": Cli("experiment refused: {root}/input/experiments/plan.json"),
    "infinite-price-csv": Cli("sales: {root}/input/sales/inf.csv row k1-0|2025-12-31: field 'price'"),
    "infinite-units-parquet": Cli("sales: {root}/input/sales/inf.parquet row k1-0|2025-12-31: field 'units'"),
    "nan-units-csv": Cli("sales: {root}/input/sales/nan.csv row k1-0|2025-12-31: field 'units'"),
    "future-dated-sale": Cli("sales: {root}/input/sales/future.parquet row k1-0|2099-01-01: field 'date'", "date is in the future (after 2026-01-07"),
    "conflicting-duplicate-new-file": Cli("sales: {root}/input/sales/history.parquet row k1-0|2025-12-01: field 'product_id,date'"),
    "exact-duplicate-new-file": Cli("row k1-0|2025-12-01: field 'product_id,date'"),
    "upper-case-CSV-read": Cli("sales: 721 row(s) read, 721 accepted, 0 refused, 0 file(s) refused", "sales: 721", code=0),
    "gzipped-csv-read": Cli("sales: 721 row(s) read, 721 accepted, 0 refused, 0 file(s) refused", "sales: 721", code=0),
    "unsupported-file-in-sales-dir": Cli("sales: file refused: {root}/input/sales/notes.xlsx"),
    "corrupt-parquet-refused-alone": Cli("sales: file refused: {root}/input/sales/broken.parquet"),
    "parquet-corrupt-pages": Cli("sales: file refused: {root}/input/sales/pages.parquet"),
    "garbage-parquet": Cli("sales: file refused: {root}/input/sales/junk.parquet"),
    "missing-units-column": Cli("sales: file refused: {root}/input/sales/nounits.parquet"),
    "price-not-a-number": Cli("sales: {root}/input/sales/text.csv row k1-0|2025-12-31: field 'price'"),
    "negative-price": Cli("sales: {root}/input/sales/neg.parquet row k1-0|2025-12-31: field 'price'"),
    "unknown-product": Cli("sales: {root}/input/sales/unk.parquet row zz-9|2025-12-31: field 'product_id'"),
    "date-not-a-date": Cli("sales: {root}/input/sales/bad-date.csv row k1-0|31/12/2025: field 'date'"),
    "catalog-conflicting-duplicate": Cli("catalog: {root}/input/catalog.parquet row k1-0: field 'product_id'"),
    "catalog-empty-subclass": Cli("catalog: {root}/input/catalog.parquet row new-1: field 'subclass'"),
    "trigger-event-empty": Cli("trigger_events: {root}/input/trigger_events.parquet row g1-0|2026-01-08: field 'event'"),
    "refused-trigger-rows-quarantined": Cli("trigger_events: {root}/input/trigger_events.parquet row <null>|2026-01-08: field 'product_id'",
                                            "product_id is empty"),
    "trigger-event-not-a-date": Cli("trigger_events: {root}/input/trigger_events.csv row g1-0|soon: field 'date'"),
}

# running experiments (enrolled in the warehouse): validate-inputs on a copy of a published one
RUNNING_CASES: dict[str, Cli] = {
    "overlap-with-running": Cli("experiment refused: {root}/input/experiments/a-over.yaml: field 'population'"),
    "name-hijack-sorting-first": Cli("experiment refused: {root}/input/experiments/a-hijack.yaml: field 'name'"),
    "running-file-typo": Cli("RUNNING EXPERIMENT KEPT: experiment 'tb-kitchen'", "keeping its last valid spec"),
    "running-file-removed": Cli("RUNNING EXPERIMENT KEPT: experiment 'tb-kitchen'"),
    "running-file-renamed-experiment": Cli("RUNNING EXPERIMENT KEPT: experiment 'tb-kitchen'"),
    # asset-layer cases, as validate-inputs judges their files (their publish is the asset layer's)
    "name-hijack-end-to-end": Cli("experiment refused: {root}/input/experiments/a-hijack.yaml: field 'name'"),
    "running-file-typo-end-to-end": Cli("RUNNING EXPERIMENT KEPT: experiment 'tb-kitchen'", "keeping its last valid spec"),
    "every-experiment-file-refused-running": Cli("RUNNING EXPERIMENT KEPT: experiment 'trig-garden'", "keeping its last valid spec"),
    "empty-experiments-directory-running": Cli("RUNNING EXPERIMENT KEPT: experiment 'tb-kitchen'"),
    "every-experiment-file-refused-fresh": Cli("experiment refused: {root}/input/experiments/b-tb.yaml", "invalid YAML at line 1"),
    "empty-experiments-directory-fresh": Cli("note: no experiment file in {root}/input/experiments", "no experiment will be published", code=0),
}
FRESH = ("every-experiment-file-refused-fresh", "empty-experiments-directory-fresh")  # no enrolment yet

# cases only a published warehouse shows: `pricelab publish` on a copy of one (slow)
WAREHOUSE_CASES: dict[str, Cli] = {
    "unknown-partition": Cli("partition '2099-01-01' of daily_assignments does not exist", code=2, command=("publish", "2099-01-01")),
    "concurrent-publish": Cli("daily_assignments 2026-01-07..2026-01-07 not published: warehouse table 'daily_assignments'",
                              code=1, command=("publish", "2026-01-07")),
}

# run through the CLI by benchmarks/edges_table.py only, not in the tests: build-graph took 183s
# here for this one case (a whole build_graph_job in a new JVM); the asset layer checks it in CI
TABLE_ONLY_CASES: dict[str, Cli] = {
    "history-too-short-for-graph": Cli("substitution_graph: snapshot", code=1, command=("build-graph",),
                                       writes=("warehouse/catalog/", "warehouse/sales/", "warehouse/trigger_events/",
                                               "warehouse/experiments/", "warehouse/quarantine/", "checkpoints/")),
}

# cases not run through the CLI here, and why
NOT_THROUGH_CLI: dict[str, str] = {
    **{c: "a fault, not a user's input: a killed or racing writer (storage layer in test_bad_inputs.py)"
       for c in ("kill-before-commit-leaves-orphan-files", "kill-mid-commit-leaves-temporary-log-file",
                 "concurrent-writer-holds-lock", "second-publish-of-a-day")},
    "read-of-unwritten-table": "an API call (Warehouse.read) on a table never written: no command reads one unguarded",
    **{c: "the file is valid; only publishing shows it, after build-graph re-reads the files: asset layer in "
          "test_bad_inputs.py, not run here through the CLI (build-graph took 183s for one case)"
       for c in ("running-file-edit-changes-published", "population-edit-after-publish-ignored",
                 "population-edit-before-any-publish")},
    "first-triggered-day-alone": "not a bad input: the daily schedule's own path (asset layer in test_bad_inputs.py)",
    "split-unit-blocked-before-write": "a forged enrolment table (no command writes one): asset layer in test_bad_inputs.py",
}

CASES = {c.name: c for c in ALL_CASES}


def test_every_case_of_the_corpus_is_placed_once():
    placed = [*VALIDATE_CASES, *RUNNING_CASES, *WAREHOUSE_CASES, *TABLE_ONLY_CASES, *NOT_THROUGH_CLI]
    assert sorted(placed) == sorted(CASES), set(placed) ^ set(CASES)
    assert {c.name for c in EXPERIMENT_CASES + SALES_CASES + OTHER_INPUT_CASES} <= set(VALIDATE_CASES) | set(RUNNING_CASES)


# ----------------------------------------------------------------------------------------------
# running a command and judging its output
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


def tree_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under the data directory, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_in_process(root: Path, command: tuple[str, ...], monkeypatch) -> Ran:
    """`pricelab --data-dir ROOT COMMAND` through `jobs.cli.main` in this process (the variables it
    sets are put back after the test by `monkeypatch`); an exception escaping it is a traceback."""
    from jobs import cli

    for name in ("PRICELAB_DATA_DIR", "DAGSTER_HOME", "PYSPARK_PYTHON", "SPARK_LOCAL_IP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRICELAB_TODAY", TODAY)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["--data-dir", str(root), *command])
        except SystemExit as exit_:
            code = exit_.code
        except Exception as error:  # noqa: BLE001 - what the console script would print as a traceback
            import traceback

            code = -1
            err.write("".join(traceback.format_exception(error)))
    return Ran(code, out.getvalue(), err.getvalue())


def user_env(root: Path) -> dict[str, str]:
    """A new user's environment: PRICELAB_DATA_DIR and nothing else of ours; this checkout's code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRICELAB_", "DAGSTER_", "SPARK_", "PYSPARK_", "GX_"))}
    env.update(PRICELAB_DATA_DIR=str(root), PRICELAB_TODAY=TODAY, PYTHONPATH=str(PROJECT_ROOT))
    return env


def run_console_script(root: Path, command: tuple[str, ...], timeout: int = 900) -> Ran:
    """The installed `pricelab` console script in a new process (PYTHONPATH: this checkout)."""
    out = subprocess.run([PRICELAB, *command], env=user_env(root), capture_output=True, text=True, timeout=timeout, cwd=root)
    return Ran(out.returncode, out.stdout, out.stderr)


def the_line(ran: Ran, names: str, expect: str) -> str:
    """The one output line holding both `names` and `expect`."""
    lines = [line for line in (ran.stdout + ran.stderr).splitlines() if names in line and expect in line]
    assert lines, f"no line with {names!r} and {expect!r} in:\n{(ran.stdout + ran.stderr)[-3000:]}"
    return lines[0]


def judge(ran: Ran, cli: Cli, case: Case, root: Path) -> str:
    """Assert what the user reads; the line found (the data directory written as $PRICELAB_DATA_DIR)."""
    names, expect = cli.names.format(root=root), (cli.expect or case.expect).format(root=root)
    both = ran.stdout + ran.stderr
    assert not TRACEBACK.search(both), both[-4000:]
    assert ran.code == cli.code, (ran.code, both[-3000:])
    line = the_line(ran, names, expect)
    for every in both.splitlines():
        assert len(every) <= MAX_LINE_CHARS, every[:300]
    return line.replace(str(root), "$PRICELAB_DATA_DIR")


def assert_nothing_written_changed(before: dict[str, str], after: dict[str, str], may_add: tuple[str, ...]) -> None:
    changed = sorted(p for p, digest in before.items() if after.get(p) != digest)
    assert not changed, f"changed or gone: {changed[:10]}"
    added = sorted(p for p in set(after) - set(before) if not p.startswith(may_add))
    assert not added, f"written: {added[:10]}"


# ----------------------------------------------------------------------------------------------
# validate-inputs: every file and row case, in seconds
# ----------------------------------------------------------------------------------------------

def validate_case(name: str, root: Path, run) -> str:
    case, cli = CASES[name], VALIDATE_CASES[name]
    write_market(root)
    case.breaks(root)
    before = tree_checksums(root)
    ran = run(root, cli.command)
    line = judge(ran, cli, case, root)
    assert_nothing_written_changed(before, tree_checksums(root), may_add=(".dagster_home",))
    return line


@pytest.mark.parametrize("name", sorted(VALIDATE_CASES))
def test_validate_inputs_case(name, tmp_path, monkeypatch):
    validate_case(name, tmp_path / "data", lambda root, command: run_in_process(root, command, monkeypatch))


@pytest.mark.parametrize("name", ["yaml-alias-bomb", "corrupt-parquet-refused-alone", "future-dated-sale"])
def test_validate_inputs_case_through_the_console_script(name, tmp_path):
    validate_case(name, tmp_path / "data", run_console_script)


# ----------------------------------------------------------------------------------------------
# publish: the cases only a published warehouse shows (Spark, slow)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_published_market(spark, tmp_path_factory) -> Path:
    """The corpus' market with its first two days published (the one test_bad_inputs.py's asset
    cases copy: built once per session)."""
    from tests.test_bad_inputs import published_market_root

    return published_market_root(tmp_path_factory)


def running_case(name: str, base: Path, root: Path, run) -> str:
    """validate-inputs on a copy of the published market, where tb-kitchen and trig-garden run."""
    case, cli = CASES[name], RUNNING_CASES[name]
    shutil.copytree(base, root)
    if name in FRESH:  # a fresh deployment, as the asset case has it
        for table in ("daily_assignments", "enrolments", "experiment_registry"):
            shutil.rmtree(root / "warehouse" / table)
    case.breaks(root)
    before = tree_checksums(root)
    ran = run(root, cli.command)
    line = judge(ran, cli, case, root)
    assert_nothing_written_changed(before, tree_checksums(root), may_add=(".dagster_home",))
    return line


@pytest.mark.parametrize("name", sorted(RUNNING_CASES))
def test_validate_inputs_running_case(name, cli_published_market, tmp_path, monkeypatch):
    running_case(name, cli_published_market, tmp_path / "data", lambda root, command: run_in_process(root, command, monkeypatch))


def test_validate_inputs_reads_the_running_experiments_as_build_graph_does(spark, cli_published_market):
    """The registry and the accepted experiments read from the Delta log without Spark give the
    running specs the `experiments` asset computes through Spark."""
    from pipelines.experiments import read_registry
    from pipelines import experiments as ex
    from pipelines.storage import Warehouse
    from pipelines.validation import running_from_warehouse

    warehouse = Warehouse(cli_published_market)
    through_spark = ex.running_specs(read_registry(warehouse), warehouse.read(spark, "experiments").toPandas())
    without_spark, note = running_from_warehouse(cli_published_market)
    assert note is None and sorted(through_spark) == ["tb-kitchen", "trig-garden"]
    assert without_spark == through_spark


def warehouse_case(name: str, base: Path, root: Path) -> str:
    from pipelines.storage import Warehouse

    case, cli = CASES[name], {**WAREHOUSE_CASES, **TABLE_ONLY_CASES}[name]
    shutil.copytree(base, root)
    case.breaks(root)
    before = tree_checksums(root)
    assert any(p.startswith(f"warehouse/daily_assignments/date={PUBLISHED[0]}/") for p in before)
    if name == "concurrent-publish":  # another run holds the table's lock
        with Warehouse(root).lock("daily_assignments"):
            ran = run_console_script(root, cli.command)
    else:
        ran = run_console_script(root, cli.command)
    line = judge(ran, cli, case, root)
    assert_nothing_written_changed(before, tree_checksums(root), may_add=(".dagster_home", "warehouse/.locks", *cli.writes))
    return line


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WAREHOUSE_CASES))
def test_warehouse_case(name, cli_published_market, tmp_path):
    warehouse_case(name, cli_published_market, tmp_path / "data")
