"""`make demo`: the whole pipeline on the embedded simulated market, through Dagster.

1. Generates the simulated market into `$PRICELAB_DATA_DIR/input` when it is absent.
2. Registers the build's snapshot partition keys (`jobs.snapshots`) and runs `build_graph_job`
   on them (inputs, checks, substitution graph, clusters).
3. Publishes every day of the demo experiments with one `publish_assignments_job` run over the
   partition range (what a backfill from the UI does).
4. Runs `refresh_results_job` (demo: the simulator answers the published prices), then prints
   the results with the simulator's true effects beside them.
Runs are recorded in the Dagster instance at $DAGSTER_HOME, so `dagster dev` shows them after.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("PRICELAB_DEMO", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

import dagster as dg  # noqa: E402

from pipelines import experiments, report, simulation  # noqa: E402
from jobs import settings  # noqa: E402
from jobs.resources import spark_from_environment, warehouse_from_environment  # noqa: E402
from jobs.snapshots import prepare_graph_build  # noqa: E402
from pipelines.snapshot_plan import SnapshotPlanError  # noqa: E402

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def _step(message: str, started: float) -> None:
    print(f"[{time.time() - started:6.0f}s] {message}", flush=True)


def _run(job_name: str, instance: dg.DagsterInstance, tags: dict | None = None, partition_key: str | None = None) -> None:
    from jobs.definitions import defs
    from jobs.runs import run_tags

    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}  # our progress lines, not Dagster's DEBUG events
    result = defs.get_job_def(job_name).execute_in_process(
        run_config=quiet, instance=instance, tags={**(tags or {}), **run_tags()}, partition_key=partition_key,
        raise_on_error=False,
    )
    failed_checks = [
        e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and not e.asset_check_evaluation_data.passed
    ]
    for name in dict.fromkeys(f"{c.asset_key.to_user_string()}:{c.check_name}" for c in failed_checks):
        print(f"    check failed: {name}", flush=True)
    if not result.success:
        failures = [e.message for e in result.all_events if e.is_failure]
        raise SystemExit(f"{job_name} failed:\n  " + "\n  ".join(failures[:5]))


def main() -> int:
    started = time.time()
    warehouse = warehouse_from_environment()
    if not (warehouse.input_dir / "catalog.parquet").exists():
        _step(f"generating the simulated market into {warehouse.input_dir}", started)
        simulation.write_demo_inputs(warehouse.root)
    else:
        _step(f"using the existing inputs in {warehouse.input_dir}", started)
    instance = dg.DagsterInstance.get()

    try:  # the snapshot partition keys are worked out (no Spark) and registered before the run
        build = prepare_graph_build(instance, warehouse.root, today=settings.today(), tables_url=warehouse.tables_url)
    except SnapshotPlanError as error:
        raise SystemExit(f"build_graph_job not started: {error}") from None
    _step(f"build_graph_job: inputs, data-quality checks, substitution graph, clusters; {build.describe()[0]}", started)
    _run("build_graph_job", instance, build.tags, build.partition_key)

    spark = spark_from_environment()
    specs = warehouse.read(spark, "experiments").toPandas()
    if specs.empty:
        raise SystemExit("no valid experiment in input/experiments: nothing to publish")
    first, last = min(specs["start"]), max(specs["end"])
    _step(f"publish_assignments_job: {len(specs)} experiments, days {first}..{last} in one run", started)
    _run("publish_assignments_job", instance, {RANGE_START_TAG: str(first), RANGE_END_TAG: str(last)})

    _step("refresh_results_job: simulated sales, first differences, estimates, report", started)
    _run("refresh_results_job", instance)

    results = warehouse.read(spark, "experiment_results").toPandas()
    truth = warehouse.read(spark, "simulator_truth").toPandas() if warehouse.exists("simulator_truth") else None
    table = report.results_table(results, truth, specs)
    print()
    print("Experiment results, one row per experiment, metric and estimator: effect = change per product-day in the")
    print("metric's units (units; revenue and profit in money), relative_effect = effect over the counterfactual mean of")
    print("the treated product-days, each with its 95% interval. true_effect / true_relative are the simulator's truth for")
    print("what the design measures: randomising products measures the DIRECT effect (own price, neighbours as assigned);")
    print("randomising whole substitute clusters measures the GLOBAL effect (all treated vs none: substitutes' price cuts")
    print("cannibalise each other, so it is far smaller here). p_holm: Holm-adjusted across the experiment's metrics.")
    print(report.format_table(report.decision_table(table)))
    print()
    for spec in experiments.frame_to_specs(specs):
        rows = results[results["experiment"] == spec.name]
        if len(rows):
            print(f"{spec.name}: {report.business_sentence(spec, rows)}")
    print()
    print(f"Report: {warehouse.tables_dir / 'report' / 'report.md'} (pictures: effects.png, effect_over_time.png beside it)")
    _step("done", started)
    print("Open the UI (asset graph, lineage, checks, schedules, these runs):")
    print("  make ui        # = DAGSTER_HOME=$PWD/.dagster_home .venv/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
