"""`pricelab`: the commands a data engineer runs, with PRICELAB_DATA_DIR as the only setting.

    pricelab validate-inputs            check every input in seconds (no Spark), print every refusal
    pricelab build-graph                inputs, checks, substitution graph and clusters snapshots
    pricelab publish [DAY|FIRST..LAST]  publish the daily assignments (default: today)
    pricelab refresh-results            read new sales, re-estimate, rebuild the report
    pricelab run                        build-graph, publish every experiment day up to today, refresh-results
    pricelab retire NAME                stop keeping an ended experiment whose file is gone
    pricelab ui                         the Dagster UI on http://127.0.0.1:3000 (these runs included)

Exit codes: 0 done, 1 failed, 2 bad command line, 3 done with refusals (refused files or rows,
a failed warning check, an experiment not published). A user's mistake is one line, never a
traceback. The command sets its own defaults: DAGSTER_HOME (`$PRICELAB_DATA_DIR/.dagster_home`,
with the project's dagster.yaml), PYSPARK_PYTHON (this interpreter), SPARK_LOCAL_IP (127.0.0.1),
GX analytics and Dagster telemetry off. Runs are recorded in that instance, so `pricelab ui`
shows them under their jobs; a run left STARTED by a killed command is marked failed first.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import time
from pathlib import Path

from jobs import settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSALS = 0, 1, 2, 3
PROJECT_ROOT = Path(__file__).resolve().parents[1]
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
MAX_LISTED = 50


class UsageError(Exception):
    """A mistake on the command line or in the setup: one line, exit 2."""


def say(message: str) -> None:
    print(f"pricelab: {message}", flush=True)


def _today() -> dt.date:
    """PRICELAB_TODAY when set (replays of past days, tests), else the UTC date."""
    from pipelines.contract import today_utc

    return settings.today() or today_utc()


def _warehouse(root: Path):
    from pipelines.storage import Warehouse

    return Warehouse(root, tables_url=settings.warehouse_url())


def set_environment(data_dir: str | None) -> Path:
    """The defaults every command needs; PRICELAB_DATA_DIR (or --data-dir) is the only setting."""
    root = Path(data_dir or os.environ.get("PRICELAB_DATA_DIR") or "data").expanduser().resolve()
    os.environ["PRICELAB_DATA_DIR"] = str(root)
    home = Path(os.environ.get("DAGSTER_HOME") or root / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    if not (home / "dagster.yaml").exists():
        project_yaml = PROJECT_ROOT / "dagster.yaml"
        if project_yaml.exists():
            shutil.copyfile(project_yaml, home / "dagster.yaml")
        else:
            (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    return root


# ----------------------------------------------------------------------------------------------
# validate-inputs (no Spark, no Dagster)
# ----------------------------------------------------------------------------------------------

def cmd_validate_inputs(args, root: Path) -> int:
    from pipelines.validation import validate_inputs

    started = time.time()
    if not (root / "input").is_dir():
        raise UsageError(f"no input directory at {root / 'input'} (set PRICELAB_DATA_DIR to your data directory)")
    result = validate_inputs(root, today=settings.today(), tables_url=settings.warehouse_url())
    lines = result.messages()
    for line in lines[: args.max_lines] if args.max_lines else lines:
        print(line)
    if args.max_lines and len(lines) > args.max_lines:
        print(f"... and {len(lines) - args.max_lines} more (--max-lines 0 prints all)")
    for note in result.notes:
        print(f"note: {note}")
    for name, check in result.inputs.items():
        good = 0 if check.good is None else len(check.good)
        print(f"{name}: {check.rows_read} row(s) read, {good} accepted, {len(check.rejected)} refused, "
              f"{len(check.refused_files)} file(s) refused" + (" (input unusable)" if check.error else ""))
    print(f"experiments: {len(result.experiments_accepted)} accepted ({', '.join(result.experiments_accepted) or 'none'}), "
          f"{len(result.experiments)} refused" + (f", {len(result.kept)} running kept on their last valid spec" if result.kept else ""))
    unusable = [c.name for c in result.inputs.values() if c.error]
    say(f"validate-inputs: {result.refusals} refusal(s) in {time.time() - started:.1f}s")
    if unusable:
        return EXIT_FAILED
    return EXIT_REFUSALS if result.refusals else EXIT_OK


# ----------------------------------------------------------------------------------------------
# Dagster jobs
# ----------------------------------------------------------------------------------------------

class Outcome:
    def __init__(self) -> None:
        self.failed = False
        self.refusals: list[str] = []

    def code(self) -> int:
        return EXIT_FAILED if self.failed else (EXIT_REFUSALS if self.refusals else EXIT_OK)


def _instance():
    import dagster as dg

    from jobs.runs import fail_dead_runs

    instance = dg.DagsterInstance.get()
    for run_id in fail_dead_runs(instance):
        say(f"run {run_id} was left STARTED by a process that is gone (killed?): marked failed")
    return instance


def _failure_line(event) -> str:
    error = event.event_specific_data.error
    cause = error
    while cause is not None and cause.cause is not None and cause.cls_name not in ("Failure",):
        cause = cause.cause
    message = (cause or error).message.strip().replace("dagster._core.definitions.events.Failure: ", "")
    return " ".join(message.split())[:600]


def _check_lines(evaluation) -> list[str]:
    lines = [f"check {evaluation.asset_key.to_user_string()}:{evaluation.check_name} failed ({evaluation.severity.value})"]
    for key, value in (evaluation.metadata or {}).items():
        data = getattr(value, "data", getattr(value, "value", None))
        if data in (None, 0, [], {}, "", "none"):
            continue
        if isinstance(data, dict):
            lines.extend(f"  {key}: {k}: {v}" for k, v in list(data.items())[:MAX_LISTED])
        elif isinstance(data, list):
            lines.extend(f"  {key}: {v}" for v in data[:MAX_LISTED])
        elif key not in ("description",):
            lines.append(f"  {key}: {str(data)[:300]}")
    return lines


def one_line(text: str, limit: int = 1000) -> str:
    """A log message as one bounded line: a failure's stack trace cut off (the run's log in the
    instance keeps it, `pricelab ui`), the other line breaks folded."""
    head = text.split("\nStack Trace:", 1)[0]
    line = " ".join(head.replace("dagster._core.definitions.events.Failure: ", "").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def console_logger():
    """The runs' console logger: Dagster's format, one line per record (no stack traces)."""
    import logging

    import dagster as dg

    class OneLineFormatter(logging.Formatter):
        def formatMessage(self, record: logging.LogRecord) -> str:
            record.message = one_line(record.message)
            return super().formatMessage(record)

        def formatException(self, ei) -> str:  # an exception logged with exc_info: its last line only
            return ""

    @dg.logger(
        {"log_level": dg.Field(str, is_required=False, default_value="INFO")},
        description="pricelab's console logger: one line per record; stack traces stay in the run's log.",
    )
    def one_line_console(init_context):
        log = logging.Logger("dagster", level=init_context.logger_config["log_level"].upper())
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLineFormatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s", "%Y-%m-%d %H:%M:%S %z"))
        log.addHandler(handler)
        return log

    return one_line_console


def execute(job_name: str, outcome: Outcome, partition_key: str | None = None, tags: dict | None = None,
            run_config: dict | None = None) -> bool:
    """Run one job in this process (one Spark driver), recorded in the instance; True when it succeeded."""
    from jobs.definitions import defs
    from jobs.runs import run_tags

    instance = _instance()
    config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}, **(run_config or {})}
    started = time.time()
    say(f"{job_name}: started ({settings.spark_where()})")
    job = defs.get_job_def(job_name).with_logger_defs({"console": console_logger()})
    result = job.execute_in_process(
        run_config=config, instance=instance, partition_key=partition_key,
        tags={**(tags or {}), **run_tags()}, raise_on_error=False,
    )
    seen = set()
    for event in result.all_events:  # a range run records each check per day too: list each failure once
        if event.event_type_value == "ASSET_CHECK_EVALUATION" and not event.asset_check_evaluation_data.passed:
            lines = tuple(_check_lines(event.asset_check_evaluation_data))
            if lines not in seen:
                seen.add(lines)
                outcome.refusals.extend(lines)
    if not result.success:
        outcome.failed = True
        failures = [_failure_line(e) for e in result.all_events if e.is_step_failure] or ["the run failed (see its log)"]
        for line in dict.fromkeys(failures):
            say(f"{job_name} failed: {line}")
        say(f"{job_name}: run {result.run_id} failed after {time.time() - started:.0f}s (its log: pricelab ui)")
        return False
    say(f"{job_name}: run {result.run_id} succeeded in {time.time() - started:.0f}s")
    return True


def _parse_day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text[:40]!r} is not a day YYYY-MM-DD") from None


def publish_range(first: dt.date, last: dt.date, outcome: Outcome) -> bool:
    from jobs.definitions import DAILY_PARTITIONS as daily_partitions

    if last < first:
        raise UsageError(f"range {first}..{last} ends before it starts")
    for day in (first, last):
        if not daily_partitions.has_partition_key(day.isoformat()):
            raise UsageError(daily_partitions.unknown_key_message(day.isoformat()))
    if first == last:
        return execute("publish_assignments_job", outcome, partition_key=first.isoformat())
    return execute("publish_assignments_job", outcome, tags={RANGE_START_TAG: first.isoformat(), RANGE_END_TAG: last.isoformat()})


def build_graph(root: Path, outcome: Outcome, snapshot_date: dt.date | None = None) -> bool:
    """Plan the build's snapshots (no Spark), register their partition keys, run build_graph_job on them."""
    from jobs.snapshots import prepare_graph_build
    from pipelines.snapshot_plan import SnapshotPlanError

    try:
        build = prepare_graph_build(_instance(), root, snapshot_date, today=settings.today(), tables_url=settings.warehouse_url())
    except SnapshotPlanError as error:
        outcome.failed = True
        say(f"build_graph_job not started: {error}")
        return False
    for line in build.describe():
        say(line)
    return execute("build_graph_job", outcome, partition_key=build.partition_key, tags=build.tags, run_config=build.run_config)


def cmd_build_graph(args, root: Path) -> int:
    outcome = Outcome()
    build_graph(root, outcome, _parse_day(args.snapshot_date) if args.snapshot_date else None)
    return finish(outcome)


def cmd_publish(args, root: Path) -> int:
    outcome = Outcome()
    text = args.days or _today().isoformat()
    if ".." in text:
        first, _, last = text.partition("..")
        publish_range(_parse_day(first.strip(".")), _parse_day(last.strip(".")), outcome)
    else:
        day = _parse_day(text)
        publish_range(day, day, outcome)
    return finish(outcome)


def cmd_refresh_results(args, root: Path) -> int:
    outcome = Outcome()
    execute("refresh_results_job", outcome)
    return finish(outcome)


def _accepted_experiments(root: Path):
    """The experiments the last build accepted (through the warehouse, on this process's session)."""
    from jobs.resources import spark_from_environment
    from pipelines.experiments import frame_to_specs

    warehouse = _warehouse(root)
    if not warehouse.exists("experiments"):
        return []
    frame = warehouse.read(spark_from_environment(), "experiments").toPandas()
    return frame_to_specs(frame) if not frame.empty else []


def cmd_run(args, root: Path) -> int:
    outcome = Outcome()
    if not build_graph(root, outcome):
        return finish(outcome)
    specs = _accepted_experiments(root)
    if not specs:
        outcome.refusals.append("no accepted experiment: nothing to publish (see the experiments refused above)")
        return finish(outcome)
    today = _today()
    first = min(s.start for s in specs)
    last = min(max(s.end for s in specs), today)
    if first > today:
        say(f"the first experiment starts on {first}, after today ({today}): nothing to publish yet")
    elif not publish_range(first, last, outcome):
        return finish(outcome)
    execute("refresh_results_job", outcome)
    return finish(outcome)


def cmd_retire(args, root: Path) -> int:
    import json

    from pipelines.experiments import RETIRED_DIR, retire_refusal, running_specs

    registry = _registry(root)
    previous = None
    running = running_specs(registry, previous)
    why = retire_refusal(args.name, running, root / "input" / "experiments", _today())
    if why:
        raise UsageError(f"retire refused: {why}")
    marker = root / "warehouse" / RETIRED_DIR / f"{args.name}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.tmp-{os.getpid()}")
    spec = running[args.name]
    tmp.write_text(json.dumps({"name": args.name, "retired_on": _today().isoformat(), "ended": spec.end.isoformat(),
                               "file": Path(spec.source).name}))
    os.replace(tmp, marker)
    say(f"experiment '{args.name}' retired (ended {spec.end}); its published days and enrolment stay as they are. "
        "The next build-graph or run stops keeping it.")
    return EXIT_OK


def _registry(root: Path):
    """The enrolled experiments (read without Spark), or None."""
    from pipelines.experiments import read_registry

    try:
        from jobs.resources import spark_from_environment

        return read_registry(_warehouse(root), start_spark=spark_from_environment)
    except Exception as exc:
        raise UsageError(f"cannot read the experiment registry under {root / 'warehouse'}: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from None


def cmd_ui(args, root: Path) -> int:
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster if dagster.exists() else "dagster"), "dev", "-m", "jobs.definitions",
               "-h", args.host, "-p", str(args.port)]
    say(f"Dagster UI on http://{args.host}:{args.port} (instance {os.environ['DAGSTER_HOME']}); Ctrl-C stops it")
    os.chdir(PROJECT_ROOT if (PROJECT_ROOT / "jobs").is_dir() else Path.cwd())
    os.execv(command[0], command) if Path(command[0]).exists() else os.execvp(command[0], command)
    return EXIT_OK


def finish(outcome: Outcome) -> int:
    if outcome.refusals:
        say(f"{len(outcome.refusals)} line(s) of refusals and failed checks:")
        for line in outcome.refusals[: 4 * MAX_LISTED]:
            print(f"  {line}")
    code = outcome.code()
    say({EXIT_OK: "done", EXIT_FAILED: "failed", EXIT_REFUSALS: "done, with refusals (exit 3)"}[code])
    return code


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pricelab", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--data-dir", help="the data directory (default: $PRICELAB_DATA_DIR, else ./data)")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    validate = commands.add_parser("validate-inputs", help="check every input without Spark; print every refusal")
    validate.add_argument("--max-lines", type=int, default=0, help="print at most this many refusals (0: all)")
    validate.set_defaults(run=cmd_validate_inputs)
    build = commands.add_parser("build-graph", help="inputs, checks, substitution graph and clusters")
    build.add_argument("--snapshot-date", help="the main snapshot's date (default: day after the last complete sales day)")
    build.set_defaults(run=cmd_build_graph)
    publish = commands.add_parser("publish", help="publish the assignments of a day or a range FIRST..LAST (default: today)")
    publish.add_argument("days", nargs="?", help="YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD")
    publish.set_defaults(run=cmd_publish)
    commands.add_parser("refresh-results", help="re-estimate every experiment, rebuild the report").set_defaults(run=cmd_refresh_results)
    commands.add_parser("run", help="build-graph, publish every experiment day up to today, refresh-results").set_defaults(run=cmd_run)
    retire = commands.add_parser("retire", help="stop keeping an ended experiment whose file is gone")
    retire.add_argument("name")
    retire.set_defaults(run=cmd_retire)
    ui = commands.add_parser("ui", help="the Dagster UI (dagster dev) on this instance")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(run=cmd_ui)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # exits 2 on a bad command line
    try:
        root = set_environment(args.data_dir)
        if args.command not in ("validate-inputs",):
            _instance()  # first mark runs that a killed command left STARTED as failed
        return args.run(args, root)
    except UsageError as error:
        print(f"pricelab: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pricelab: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
