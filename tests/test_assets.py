"""Assets through `dagster.materialize` on a tiny simulated market: the full flow, write-once
days, and blocking checks that stop bad data."""
from __future__ import annotations

import datetime as dt
import shutil

import dagster as dg
import pandas as pd
import pytest

from assets import assignments, clustering, estimation, graph, inputs, report, simulation
from jobs.resources import SparkResource, WarehouseResource
from pipelines.simulation import MarketConfig, write_demo_inputs
from pipelines.storage import Warehouse

# Four subclasses per category: a cluster design can randomise whole subclasses (block evidence)
# and still have two units per arm.
TINY = MarketConfig(n_products=100, n_subclasses=20, history_start=dt.date(2025, 9, 3), history_days=120, seed=3)
RANGE = {"dagster/asset_partition_range_start": "2026-01-05", "dagster/asset_partition_range_end": "2026-02-15"}
ALL_ASSETS = dg.load_assets_from_modules([inputs, graph, clustering, assignments, simulation, estimation, report])


def _materialize(data_dir, selection, **kwargs):
    resources = {"spark": SparkResource(), "warehouse": WarehouseResource(data_dir=str(data_dir))}
    return dg.materialize(ALL_ASSETS, selection=selection, resources=resources, raise_on_error=False, **kwargs)


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def tiny_market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    write_demo_inputs(root, TINY)
    return root


@pytest.mark.slow
def test_the_whole_flow_on_a_tiny_market(spark, tiny_market, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_market, data)
    built = _materialize(data, ["catalog", "sales", "trigger_events", "experiments", "substitution_graph", "product_clusters"])
    assert built.success and all(_checks(built).values()), _checks(built)

    published = _materialize(data, ["daily_assignments"], tags=RANGE)
    assert published.success and all(_checks(published).values()), _checks(published)
    warehouse = Warehouse(data)
    assert len(warehouse.partitions("daily_assignments", "date")) == 42

    answered = _materialize(data, ["simulated_sales", "simulator_truth"])
    assert answered.success
    results = _materialize(data, ["experiment_sales", "first_differences", "experiment_results", "experiment_report"])
    assert results.success, [e.message for e in results.all_events if e.is_failure]
    table = warehouse.read(spark, "experiment_results").toPandas()
    assert set(table["experiment"]) == {"time-bound-kitchen", "triggered-garden", "random-days-toys", "crossover-pets"}
    assert (table["se"] > 0).all() and (table["ci_low"] < table["ci_high"]).all()
    assert (warehouse.tables_dir / "report" / "report.md").read_text().count("|") > 10
    # SRM and balance checks on first_differences (issue 16): intact first
    assert _checks(results)[estimation.SAMPLE_RATIO_CHECK], _checks(results)
    # a published day is never changed: recomputing gives the same rows, a changed file is refused
    before = warehouse.read(spark, "daily_assignments", ("date", "2026-01-20")).toPandas()
    again = _materialize(data, ["experiments", "daily_assignments"], partition_key="2026-01-20")
    assert again.success
    after = warehouse.read(spark, "daily_assignments", ("date", "2026-01-20")).toPandas()
    pd.testing.assert_frame_equal(before.sort_values("product_id").reset_index(drop=True), after.sort_values("product_id").reset_index(drop=True))

    # a product added to the catalogue mid-experiment does not move a running experiment's units
    catalog_file = data / "input" / "catalog.parquet"
    catalog = pd.read_parquet(catalog_file)
    newcomer = catalog[catalog["category"] == "kitchen"].head(1).assign(product_id="P-NEW")
    pd.concat([catalog, newcomer]).to_parquet(catalog_file, index=False)
    grown = _materialize(data, ["catalog", "experiments", "daily_assignments"], partition_key="2026-01-20")
    assert grown.success, [e.message for e in grown.all_events if e.is_failure]

    experiment_file = data / "input" / "experiments" / "time-bound-kitchen.yaml"
    experiment_file.write_text(experiment_file.read_text().replace("seed:", "seed: 99 #"))
    refused = _materialize(data, ["experiments", "daily_assignments"], partition_key="2026-01-20")
    assert not refused.success
    failure = [e for e in refused.all_events if e.is_step_failure][0]
    assert "published day(s) would change" in failure.event_specific_data.error.message
    after_refusal = warehouse.read(spark, "daily_assignments", ("date", "2026-01-20")).toPandas()
    assert len(after_refusal) == len(before)


def test_bad_sales_fail_the_blocking_check_and_stop_downstream(spark, tiny_market, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_market, data)
    history = pd.read_parquet(data / "input" / "sales" / "history.parquet")
    history.loc[history.sample(frac=0.05, random_state=0).index, "price"] = -1.0  # 5% broken rows
    history.to_parquet(data / "input" / "sales" / "history.parquet", index=False)
    result = _materialize(data, ["catalog", "sales", "substitution_graph"])
    checks = _checks(result)
    assert checks["sales_contract"] is False and checks["sales_refused_rows"] is False
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "sales" in materialized and "substitution_graph" not in materialized  # blocked


def test_a_bad_experiment_file_is_refused_alone(spark, tiny_market, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_market, data)
    (data / "input" / "experiments" / "broken.yaml").write_text("name: Bad Name\ndesign: time_bound\n")
    result = _materialize(data, ["catalog", "experiments"])
    assert result.success and _checks(result)["experiment_files_valid"] is False
    names = set(Warehouse(data).read(spark, "experiments").toPandas()["name"])
    assert names == {"time-bound-kitchen", "triggered-garden", "random-days-toys", "crossover-pets"}

