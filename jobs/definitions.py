"""The one `Definitions` object: assets, checks, jobs, schedules and resources.

Demo mode (PRICELAB_DEMO=1) adds the simulator's assets; everything else is the same in a real
deployment. Jobs run in-process so a run starts one JVM, not one per step.
"""

import dagster as dg

from assets import advice, assignments, clustering, estimation, graph, inputs, report
from assets.mode import demo_mode
from jobs.resources import default_resources
from jobs.sensors import experiment_files_sensor

# What each asset runs on and is stored as, shown as `kinds` in the UI (one place for all).
TABLE_FORMAT = "delta"  # as assets.kinds.DELTA_TABLE says on the tables the warehouse stores
ASSET_KINDS = {
    "catalog": {"spark", TABLE_FORMAT},
    "sales": {"spark", TABLE_FORMAT, "great_expectations"},
    "trigger_events": {"spark", TABLE_FORMAT},
    "experiments": {"yaml", TABLE_FORMAT},
    "substitution_graph": {"spark", TABLE_FORMAT},
    "product_clusters": {"spark", "igraph", TABLE_FORMAT},
    "daily_assignments": {"spark", TABLE_FORMAT, "great_expectations"},
    "simulated_sales": {"python", TABLE_FORMAT},
    "simulator_truth": {"python", TABLE_FORMAT},
    "experiment_sales": {"spark", TABLE_FORMAT, "great_expectations"},
    "first_differences": {"spark", TABLE_FORMAT},
    "experiment_results": {"scikitlearn", TABLE_FORMAT},
    "experiment_report": {"matplotlib", "markdown"},
    "design_advice": {"spark", TABLE_FORMAT},
}


def with_kinds(assets_defs: list) -> list:
    return [
        a.map_asset_specs(lambda spec: spec.merge_attributes(kinds=ASSET_KINDS.get(spec.key.to_user_string(), set())))
        for a in assets_defs
    ]


INPUT_AND_GRAPH_ASSETS = with_kinds(dg.load_assets_from_modules([inputs, graph, clustering]))
ASSIGNMENT_ASSETS = with_kinds(dg.load_assets_from_modules([assignments]))
RESULT_ASSETS = with_kinds(dg.load_assets_from_modules([estimation, report]))
ADVICE_ASSETS = with_kinds(dg.load_assets_from_modules([advice]))
DEMO_ASSETS = []
if demo_mode():
    from assets import simulation

    DEMO_ASSETS = with_kinds(dg.load_assets_from_modules([simulation]))

build_graph_job = dg.define_asset_job(
    "build_graph_job",
    selection=dg.AssetSelection.groups("inputs", "graph"),
    description="Validate the inputs, then build the substitution graph and clusters snapshot.",
)
publish_assignments_job = dg.define_asset_job(
    "publish_assignments_job",
    selection=dg.AssetSelection.assets("daily_assignments"),
    description="Publish the day's treatment/control assignments (a backfill publishes a range).",
)
refresh_results_job = dg.define_asset_job(
    "refresh_results_job",
    selection=dg.AssetSelection.groups("results", "demo_simulator"),
    description="Read the new sales, then re-estimate every experiment and rebuild the report.",
)
advise_job = dg.define_asset_job(
    "advise_job",
    selection=dg.AssetSelection.assets("design_advice"),
    description="Answer the proposals in input/proposals/ from history: design, unit, blackout, detectable effect.",
)

publish_assignments_schedule = dg.build_schedule_from_partitioned_job(
    publish_assignments_job, hour_of_day=0, minute_of_hour=15, name="publish_assignments_daily"
)
refresh_results_schedule = dg.ScheduleDefinition(
    name="refresh_results_daily", job=refresh_results_job, cron_schedule="0 6 * * *", execution_timezone="UTC"
)
build_graph_schedule = dg.ScheduleDefinition(
    name="build_graph_weekly", job=build_graph_job, cron_schedule="0 2 * * 1", execution_timezone="UTC"
)

defs = dg.Definitions(
    assets=[*INPUT_AND_GRAPH_ASSETS, *ASSIGNMENT_ASSETS, *DEMO_ASSETS, *RESULT_ASSETS, *ADVICE_ASSETS],
    jobs=[build_graph_job, publish_assignments_job, refresh_results_job, advise_job],
    schedules=[publish_assignments_schedule, refresh_results_schedule, build_graph_schedule],
    sensors=[experiment_files_sensor],
    resources=default_resources(),
    executor=dg.in_process_executor,
)
