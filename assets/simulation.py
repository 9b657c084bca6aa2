"""Demo only (PRICELAB_DEMO=1): the simulator plays the outside world.

`simulated_sales` reads the published assignments, simulates the market's response day by day
(closed loop: treated products carry the new price) and drops one sales file per day into
`input/sales/`, exactly as a real feed would. `simulator_truth` is what no real data set has:
the true effects of the published assignments, for the report to put beside the estimates.
"""

import datetime as dt
import os

import dagster as dg

from assets.kinds import DELTA_TABLE
from pipelines import report, simulation

SIMULATED_PREFIX = "simulated-"


def _world(warehouse):
    world_dir = warehouse.root / "simulator"
    if not world_dir.is_dir():
        raise dg.Failure(
            f"demo mode needs the simulated world in {world_dir}; create it with "
            "`python -m pipelines.simulation generate --data-dir <data dir>` (make demo does this)"
        )
    return simulation.load_world(world_dir)


@dg.asset(group_name="demo_simulator", deps=["daily_assignments"], required_resource_keys={"spark", "warehouse"})
def simulated_sales(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """One `input/sales/simulated-YYYY-MM-DD.parquet` per published day after the history."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    world = _world(warehouse)
    published = warehouse.read(spark, "daily_assignments").toPandas()
    if published.empty:
        return dg.MaterializeResult(metadata={"days": 0, "note": "no assignments published yet"})
    history_end = world.config.history_start + dt.timedelta(days=world.config.history_days - 1)
    start, end = history_end + dt.timedelta(days=1), max(published["date"])
    context.log.info(f"simulating the market's response from {start} to {end}")
    simulated = simulation.simulate_sales(world, published, start, end)
    sales_dir = warehouse.input_dir / "sales"
    sales_dir.mkdir(parents=True, exist_ok=True)
    for day, rows in simulated.groupby("date"):
        final = sales_dir / f"{SIMULATED_PREFIX}{day}.parquet"
        tmp = sales_dir / f".{final.name}.tmp"
        rows.to_parquet(tmp, index=False)
        os.replace(tmp, final)
    return dg.MaterializeResult(
        metadata={"days": int(simulated["date"].nunique()), "rows": len(simulated), "first_day": str(start), "last_day": str(end)}
    )


@dg.asset(kinds=DELTA_TABLE, group_name="demo_simulator", deps=["daily_assignments"], required_resource_keys={"spark", "warehouse"})
def simulator_truth(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """The true direct, global and spillover effects of each experiment as published."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    world = _world(warehouse)
    published = warehouse.read(spark, "daily_assignments").toPandas()
    costs_known = bool(simulation.unit_costs(world)["unit_cost"].notna().all())
    metrics = simulation.TRUTH_METRICS if costs_known else ("units", "revenue")  # worlds saved before unit costs
    truth = simulation.true_effects(world, published, metrics=metrics)
    warehouse.write(truth, "simulator_truth")
    return dg.MaterializeResult(
        metadata={"truth": dg.MetadataValue.md(report.format_table(truth))}
    )
