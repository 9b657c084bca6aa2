"""The one `Definitions` object: assets, checks, jobs, schedules and resources.

Demo mode (PRICELAB_DEMO=1) merges in the simulator's assets (`dg.Definitions.merge`) and makes
the two assets that read what the simulator writes run after it; everything else is the same in
a real deployment. Jobs run in-process so a run starts one JVM, not one per step.
"""

import dagster as dg

from assets import advice, assignments, clustering, estimation, graph, inputs, report
from assets.partitions import daily_partitions_for
from jobs import settings
from jobs.resources import default_resources
from jobs.sensors import experiment_files_sensor
from jobs.snapshots import BUILD_GRAPH_JOB, build_graph_weekly

# What each asset runs on and is stored as, shown as `kinds` in the UI (one place for all).
TABLE_FORMAT = "delta"  # as assets.kinds.DELTA_TABLE says on the tables the warehouse stores
ASSET_KINDS = {
    "catalog_files": {"parquet", "csv"},
    "sales_files": {"parquet", "csv"},
    "trigger_event_files": {"parquet", "csv"},
    "related_pairs_files": {"parquet", "csv"},
    "experiment_files": {"yaml"},
    "proposal_files": {"yaml"},
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
    "experiment_results_history": {"scikitlearn", TABLE_FORMAT},
    "effect_over_time": {"scikitlearn", TABLE_FORMAT},
    "spillover_exposure": {"python", TABLE_FORMAT},
    "enrolments": {"spark", TABLE_FORMAT},
    "experiment_report": {"matplotlib", "markdown"},
    "design_advice": {"spark", TABLE_FORMAT},
}


def with_kinds(assets_defs: list) -> list:
    def add(spec: dg.AssetSpec) -> dg.AssetSpec:
        return spec.merge_attributes(kinds=ASSET_KINDS.get(spec.key.to_user_string(), set()))

    return [add(a) if isinstance(a, dg.AssetSpec) else a.map_asset_specs(add) for a in assets_defs]


INPUT_AND_GRAPH_ASSETS = with_kinds([*inputs.INPUT_FILES.values(), *dg.load_assets_from_modules([inputs, graph, clustering])])
# The daily partitions start from the data directory's experiments (or PRICELAB_PARTITIONS_START).
DAILY_PARTITIONS = daily_partitions_for(settings.data_dir(), settings.partitions_start())
ASSIGNMENT_ASSETS = with_kinds([assignments.ENROLMENTS, assignments.daily_assignments_asset(DAILY_PARTITIONS)])


def result_assets(demo: bool) -> list:
    """From sales to the report; in demo mode experiment_sales waits for the simulated sales files
    and the report for the true effects (asset deps: they also order the job's steps)."""
    return with_kinds([
        estimation.experiment_sales_asset(("simulated_sales",) if demo else ()),
        *dg.load_assets_from_modules([estimation]),
        report.experiment_report_asset(("simulator_truth",) if demo else ()),
    ])

ADVICE_ASSETS = with_kinds(dg.load_assets_from_modules([advice]))

build_graph_job = dg.define_asset_job(
    BUILD_GRAPH_JOB,
    selection=dg.AssetSelection.groups("inputs", "graph"),
    description="Validate the inputs, then build the substitution graph and clusters snapshots of the run's snapshot_date "
    "partition keys (registered by whoever launches it: pricelab build-graph, the build_graph_weekly sensor).",
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
# The weekly graph build is the sensor `build_graph_weekly` (jobs/snapshots.py): a schedule cannot
# register the snapshot partition keys its run needs.



def build_definitions(demo: bool) -> dg.Definitions:
    """The deployment's definitions; with `demo`, merged with the simulator's assets."""
    core = dg.Definitions(
        assets=[*INPUT_AND_GRAPH_ASSETS, *ASSIGNMENT_ASSETS, *result_assets(demo), *ADVICE_ASSETS],
        jobs=[build_graph_job, publish_assignments_job, refresh_results_job, advise_job],
        schedules=[publish_assignments_schedule, refresh_results_schedule],
        sensors=[experiment_files_sensor, build_graph_weekly],
        resources=default_resources(),
        executor=dg.in_process_executor,
    )
    if not demo:
        return core
    from assets import simulation

    return dg.Definitions.merge(core, dg.Definitions(assets=with_kinds(dg.load_assets_from_modules([simulation]))))


defs = build_definitions(settings.demo_mode())
