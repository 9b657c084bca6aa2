"""The one `Definitions` object: assets, checks, jobs, schedules and resources.

Demo mode (PRICELAB_DEMO=1) merges in the simulator's assets (`dg.Definitions.merge`) and makes
the assets that read what the simulator writes depend on it; everything else is the same in a
real deployment. Jobs run in-process so a run starts one JVM, not one per step.
"""

import dagster as dg

from assets import advice, assignments, clustering, estimation, graph, inputs, report
from jobs import settings
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

# Demo only: what reads the simulator's output waits for it (its sales files, its true effects).
DEMO_DEPS = {"experiment_sales": ["simulated_sales"], "experiment_report": ["simulator_truth"]}


def with_demo_deps(assets_defs: list) -> list:
    def add(spec: dg.AssetSpec) -> dg.AssetSpec:
        extra = DEMO_DEPS.get(spec.key.to_user_string(), [])
        return spec.replace_attributes(deps=[*spec.deps, *extra]) if extra else spec

    return [a.map_asset_specs(add) for a in assets_defs]

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



def build_definitions(demo: bool) -> dg.Definitions:
    """The deployment's definitions; with `demo`, merged with the simulator's assets."""
    results = with_demo_deps(RESULT_ASSETS) if demo else RESULT_ASSETS
    core = dg.Definitions(
        assets=[*INPUT_AND_GRAPH_ASSETS, *ASSIGNMENT_ASSETS, *results, *ADVICE_ASSETS],
        jobs=[build_graph_job, publish_assignments_job, refresh_results_job, advise_job],
        schedules=[publish_assignments_schedule, refresh_results_schedule, build_graph_schedule],
        sensors=[experiment_files_sensor],
        resources=default_resources(),
        executor=dg.in_process_executor,
    )
    if not demo:
        return core
    from assets import simulation

    return dg.Definitions.merge(core, dg.Definitions(assets=with_kinds(dg.load_assets_from_modules([simulation]))))


defs = build_definitions(settings.demo_mode())
