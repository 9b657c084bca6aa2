"""The one `Definitions` object: assets, checks, jobs, schedules and resources.

Demo mode (PRICELAB_DEMO=1) adds the simulator's assets; everything else is the same in a real
deployment. Jobs run in-process so a run starts one JVM, not one per step.
"""

import dagster as dg

from assets import advice, assignments, clustering, estimation, graph, inputs, report
from assets.mode import demo_mode
from jobs.resources import default_resources
from jobs.sensors import experiment_files_sensor

INPUT_AND_GRAPH_ASSETS = dg.load_assets_from_modules([inputs, graph, clustering])
ASSIGNMENT_ASSETS = dg.load_assets_from_modules([assignments])
RESULT_ASSETS = dg.load_assets_from_modules([estimation, report])
ADVICE_ASSETS = dg.load_assets_from_modules([advice])
DEMO_ASSETS = []
if demo_mode():
    from assets import simulation

    DEMO_ASSETS = dg.load_assets_from_modules([simulation])

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
