"""What the UI shows is true: kinds on every asset, row counts, checks on the daily assets per
partition, and in-process runs (make demo, pricelab) labelled with their code location so the UI
lists them under their jobs."""
from __future__ import annotations

import dagster as dg
from dagster._core.storage.tags import REPOSITORY_LABEL_TAG

from tests.test_standalone_cluster import prepared_market

from jobs.definitions import DAILY_PARTITIONS as daily_partitions

CHECKS = {"assignment_contract", "units_move_together", "experiments_published"}


def test_every_asset_has_kinds():
    from jobs.definitions import defs

    graph = defs.resolve_asset_graph()
    kinds = {key.to_user_string(): graph.get(key).kinds for key in graph.get_all_asset_keys()}
    assert kinds and all(kinds.values()), {k: v for k, v in kinds.items() if not v}
    assert "spark" in kinds["daily_assignments"] and "spark" in kinds["substitution_graph"]


def test_snapshots_are_partitions_and_the_assignments_depend_on_every_one():
    """The graph and clusters share the one `snapshot_date` dynamic partitions definition (one key
    per snapshot), and the lineage says what is true: an experiment's days and enrolment read the
    clusters snapshot in force at its start, which may be any snapshot."""
    from assets.partitions import SNAPSHOT_PARTITIONS
    from jobs.definitions import defs

    graph = defs.resolve_asset_graph()
    for key in ("substitution_graph", "product_clusters"):
        assert graph.get(dg.AssetKey(key)).partitions_def == SNAPSHOT_PARTITIONS
    assert defs.resolve_job_def("build_graph_job").partitions_def == SNAPSHOT_PARTITIONS
    for downstream in ("daily_assignments", "enrolments"):
        mapping = graph.get_partition_mapping(dg.AssetKey(downstream), dg.AssetKey("product_clusters"))
        assert isinstance(mapping, dg.AllPartitionMapping), (downstream, mapping)


def test_in_process_runs_carry_the_code_location_label(tmp_path):
    from jobs.runs import REPOSITORY_LABEL, run_tags

    assert run_tags()[REPOSITORY_LABEL_TAG] == REPOSITORY_LABEL == "__repository__@jobs.definitions"
    # the label the UI filters a job's runs by, for the code location of workspace.yaml
    from pathlib import Path

    import yaml

    workspace = yaml.safe_load((Path(__file__).resolve().parents[1] / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["python_module"]["module_name"] == "jobs.definitions"


def _publish(root, instance, **kwargs):
    from assets.assignments import daily_assignments_asset
    from jobs.resources import SparkResource, WarehouseResource

    return dg.materialize([daily_assignments_asset(daily_partitions)], instance=instance, raise_on_error=False,
                          resources={"spark": SparkResource(), "warehouse": WarehouseResource(data_dir=str(root))}, **kwargs)


def test_checks_on_daily_assignments_are_per_partition_with_row_counts(spark, tmp_path):
    root = prepared_market(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    single = _publish(root, instance, partition_key="2025-06-09")
    assert single.success
    evaluations = [e.asset_check_evaluation_data for e in single.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert {(e.check_name, e.partition) for e in evaluations if e.check_name in CHECKS} == {(c, "2025-06-09") for c in CHECKS}
    # the step also records the enrolments it wrote; the day's own materialization carries the row count
    materialization, = [m for m in single.asset_materializations_for_node("daily_assignments")
                        if m.asset_key == dg.AssetKey("daily_assignments")]
    assert materialization.metadata["dagster/row_count"].value == 24  # both experiments, 12 products each
    # a range run (a backfill) records each check on every day of the range too
    ranged = _publish(root, instance, tags={"dagster/asset_partition_range_start": "2025-06-10",
                                            "dagster/asset_partition_range_end": "2025-06-12"})
    assert ranged.success
    per_day = _passed_check_partitions(instance)
    days = ("2025-06-09", "2025-06-10", "2025-06-11", "2025-06-12")
    assert {c: per_day[c] & set(days) for c in CHECKS} == {c: set(days) for c in CHECKS}


def _passed_check_partitions(instance) -> dict[str, set[str]]:
    """check -> days the UI shows as passed: Dagster's asset-check state, which the check's Partitions
    tab reads (an evaluation counts there only when it names the day's latest materialization)."""
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionResolvedStatus

    keys = [(dg.AssetCheckKey(dg.AssetKey("daily_assignments"), c), daily_partitions) for c in CHECKS]
    states = instance.event_log_storage.get_asset_check_state(keys)
    return {
        key.name: set(states[key].subsets[AssetCheckExecutionResolvedStatus.SUCCEEDED].subset_value.get_partition_keys())
        for key, _ in keys
    }
