"""The design_advice asset through `dagster.materialize` on a tiny simulated market."""
from __future__ import annotations

import datetime as dt

import dagster as dg
import pytest

from assets import advice, clustering, graph, inputs
from jobs.resources import SparkResource, WarehouseResource
from pipelines import advisor
from pipelines.simulation import MarketConfig, write_demo_inputs
from pipelines.storage import Warehouse
from tests.test_assets import with_snapshot_keys

TINY = MarketConfig(n_products=100, n_subclasses=20, history_start=dt.date(2025, 9, 3), history_days=150, seed=3)
ASSETS = dg.load_assets_from_modules([inputs, graph, clustering, advice])
SMALL = {"ops": {"design_advice": {"config": {"n_replays": 20, "n_calibration": 1, "calibration_products": 40}}}}


@pytest.mark.slow
def test_design_advice_answers_proposals_and_refuses_a_bad_one_alone(spark, tmp_path):
    write_demo_inputs(tmp_path, TINY)
    demo = tmp_path / "input" / "proposals" / "cut-5-office.yaml"  # two designs x two units: a fast test
    demo.write_text(demo.read_text() + "design: [time_bound, crossover]\n")
    (tmp_path / "input" / "proposals" / "broken.yaml").write_text(
        "name: broken\nstart: 2026-02-02\nend: 2026-02-22\ntreatment: {price_change: -0.05}\nseed: 1\ndesign: [zigzag]\n")
    resources = {"spark": SparkResource(), "warehouse": WarehouseResource(data_dir=str(tmp_path))}
    graph_run = ["catalog", "sales", "trigger_events", "substitution_graph", "product_clusters"]
    instance = dg.DagsterInstance.ephemeral()
    built = dg.materialize(ASSETS, selection=graph_run, resources=resources, raise_on_error=False, instance=instance,
                           **with_snapshot_keys(instance, tmp_path, graph_run, {}))
    assert built.success
    result = dg.materialize(ASSETS, selection=["design_advice"], resources=resources, run_config=SMALL, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {advice.PROPOSAL_FILES_VALID: False}  # the broken file is refused, the good one answered
    table = Warehouse(tmp_path).read(spark, "design_advice").toPandas()
    assert list(table.columns) == list(advisor.ADVICE_COLUMNS)
    assert set(table["proposal"]) == {"cut-5-office"} and table["recommended"].sum() == 1
    assert len(table) == 4 and (table["replays"] == 20).all()
    section = (Warehouse(tmp_path).tables_dir / advice.ADVICE_SECTION).read_text()
    assert "Recommendation." in section and "cut-5-office" in section
    assert (Warehouse(tmp_path).tables_dir / "report" / "design_advice_cut-5-office.png").stat().st_size > 1000


def test_advise_job_is_defined():
    from jobs.definitions import defs

    assert defs.get_job_def("advise_job").name == "advise_job"
