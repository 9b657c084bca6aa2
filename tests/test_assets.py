"""Assets through `dagster.materialize` on a tiny simulated market: the full flow, write-once
days, and blocking checks that stop bad data."""
from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

import pipelines.advisor
import pipelines.experiments
import pipelines.inputs
from assets import estimation
from assets.inputs import INPUT_FILES
from jobs.definitions import build_definitions
from jobs.resources import SparkResource, WarehouseResource
from pipelines.estimation import HPTEEstimator
from pipelines.simulation import MarketConfig, write_demo_inputs
from pipelines.storage import Warehouse

# Four subclasses per category: a cluster design can randomise whole subclasses (block evidence)
# and still have two units per arm.
TINY = MarketConfig(n_products=100, n_subclasses=20, history_start=dt.date(2025, 9, 3), history_days=120, seed=3)
RANGE = {"dagster/asset_partition_range_start": "2026-01-05", "dagster/asset_partition_range_end": "2026-02-15"}
ALL_ASSETS = list(build_definitions(demo=True).assets)  # as `make demo` defines them


SNAPSHOT_ASSETS = {"substitution_graph", "product_clusters"}


def with_snapshot_keys(instance: dg.DagsterInstance, data_dir, selection, kwargs: dict) -> dict:
    """`materialize` kwargs targeting the graph build's snapshot partitions, planned and registered
    as `pricelab build-graph` does (jobs.snapshots); a given partition_key is registered as is."""
    from assets.partitions import SNAPSHOT_PARTITIONS_NAME
    from jobs.snapshots import prepare_graph_build

    if not SNAPSHOT_ASSETS & set(selection):
        return kwargs
    if "partition_key" in kwargs:
        if not instance.has_dynamic_partition(SNAPSHOT_PARTITIONS_NAME, kwargs["partition_key"]):
            instance.add_dynamic_partitions(SNAPSHOT_PARTITIONS_NAME, [kwargs["partition_key"]])
        return kwargs
    build = prepare_graph_build(instance, data_dir)
    return {**kwargs, "partition_key": build.partition_key, "tags": {**kwargs.get("tags", {}), **build.tags}}


def _materialize(data_dir, selection, instance=None, **kwargs):
    resources = {"spark": SparkResource(), "warehouse": WarehouseResource(data_dir=str(data_dir))}
    instance = instance or dg.DagsterInstance.ephemeral()
    kwargs = with_snapshot_keys(instance, data_dir, selection, kwargs)
    # experiment_results is one step writing four assets: selecting it selects them all
    selection = dg.AssetSelection.assets(*selection).required_multi_asset_neighbors()
    return dg.materialize(ALL_ASSETS, selection=selection, resources=resources, raise_on_error=False, instance=instance, **kwargs)


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


# A table an asset reads that no declared dependency of it writes, and why that is right.
FEEDBACK_READS = {
    ("experiments", "experiment_registry"): "the registry (written at an experiment's first publication) keeps a running "
    "name with its file; declaring daily_assignments upstream of experiments would be a cycle",
}


@pytest.fixture
def table_access(monkeypatch):
    """Every warehouse table each asset step reads and writes: [(step's asset keys, table)] twice."""
    reads, writes = [], []

    def step_keys():
        try:
            context = dg.AssetExecutionContext.get()
        except Exception:
            return None  # outside an asset (the test itself)
        return frozenset(k.to_user_string() for k in context.selected_asset_keys)

    def spy(name, log):
        original = getattr(Warehouse, name)

        def recorded(self, *args, **kwargs):
            table = args[1] if name in ("read", "write", "write_partitions") else args[0]
            keys = step_keys()
            if keys is not None:
                log.append((keys, table))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Warehouse, name, recorded)

    for name in ("read", "exists", "partitions"):
        spy(name, reads)
    for name in ("write", "write_partitions"):
        spy(name, writes)

    def spy_inputs(module, name, input_name):  # a read of input/<name>: the feed's files
        original = getattr(module, name)

        def recorded(*args, **kwargs):
            keys = step_keys()
            if keys is not None:
                reads.append((keys, f"input/{input_name(*args, **kwargs)}"))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)

    spy_inputs(pipelines.inputs, "input_listing", lambda data_dir, name: name)
    for module in (pipelines.experiments, pipelines.advisor):
        spy_inputs(module, "experiment_file_paths", lambda directory: Path(directory).name)
    return reads, writes


def lineage_violations(reads, writes, asset_graph) -> list[str]:
    """Reads of a table whose writer is neither the reading step nor among its declared upstream
    assets. A table named as an asset is that asset's; any other (a side table such as
    substitution_blocks or quarantine/sales) belongs to the step that wrote it in the run."""
    names = {k.to_user_string() for k in asset_graph.get_all_asset_keys()}
    owner = {f"input/{name}": spec.key.to_user_string() for name, spec in INPUT_FILES.items()}
    for keys, table in writes:
        owner.setdefault(table, table if table in names else min(keys))
    found = set()
    for keys, table in reads:
        own = table if table in names else owner.get(table)
        if own is None:  # looked for and never written: nothing read
            continue
        upstream = set(keys) | {p.to_user_string() for k in keys for p in asset_graph.get(dg.AssetKey(k)).parent_keys}
        for key in keys:
            if own not in upstream and (key, table) not in FEEDBACK_READS:
                found.add(f"{key} reads {table} (written by {own}) but does not declare {own} upstream")
    return sorted(found)


@pytest.fixture(scope="module")
def tiny_market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    write_demo_inputs(root, TINY)
    return root


@pytest.mark.slow
def test_the_whole_flow_on_a_tiny_market(spark, tiny_market, tmp_path, table_access):
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
    # every estimate's settings are in the results' metadata (scikit-learn get_params)
    estimated, = [m for m in results.asset_materializations_for_node("experiment_results")
                  if m.asset_key == dg.AssetKey("experiment_results")]
    settings = estimated.metadata["estimator_settings"].value
    assert settings["crossover-pets/hpte"]["n_estimators"] == HPTEEstimator().n_estimators
    assert set(settings) == {f"{name}/{e}" for name in set(table["experiment"]) for e in ("did", "hpte")}
    # lineage (issue 14): every table an asset read is its own or a declared upstream asset's
    reads, writes = table_access
    assert {t for _, t in reads} >= {"catalog", "daily_assignments", "enrolments", "first_differences", "spillover_exposure"}
    assert lineage_violations(reads, writes, build_definitions(demo=True).resolve_asset_graph()) == []
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



def test_lineage_check_names_an_undeclared_read():
    graph_ = build_definitions(demo=True).resolve_asset_graph()
    writes = [(frozenset({"catalog"}), "catalog"), (frozenset({"substitution_graph"}), "substitution_blocks")]
    declared = [(frozenset({"experiment_report"}), "substitution_blocks"), (frozenset({"experiments"}), "experiment_registry"),
                (frozenset({"experiment_sales"}), "input/sales"), (frozenset({"substitution_graph"}), "input/related_pairs")]
    assert lineage_violations(declared, writes, graph_) == []
    undeclared = [(frozenset({"experiment_report"}), "catalog"), (frozenset({"first_differences"}), "input/sales")]
    assert lineage_violations(undeclared, writes, graph_) == [
        "experiment_report reads catalog (written by catalog) but does not declare catalog upstream",
        "first_differences reads input/sales (written by sales_files) but does not declare sales_files upstream"]


def test_demo_steps_wait_for_the_simulator():
    """A dependency added for the demo orders the steps too (lineage alone would let experiment_sales
    read input/sales/ before the simulated days are written)."""
    job = build_definitions(demo=True).resolve_job_def("refresh_results_job")
    structure = job.graph.dependency_structure

    def upstream(node: str) -> set[str]:
        return {o.node_name for outs in structure.input_to_upstream_outputs_for_node(node).values() for o in outs}

    assert "simulated_sales" in upstream("experiment_sales")
    assert "simulator_truth" in upstream("experiment_report")
    assert "simulated_sales" not in {k.to_user_string() for k in build_definitions(demo=False).resolve_asset_graph().get_all_asset_keys()}


def test_run_level_knobs_are_launchpad_config_with_the_library_defaults(tmp_path):
    """FDR, maximum cluster size and bootstrap draws can be set per run in the launchpad; their
    defaults are the library's, and a value out of range is refused in one line before any work."""
    import inspect

    from assets.clustering import MAX_CLUSTER_SIZE
    from pipelines.clustering import cluster_products
    from pipelines.graph import learn_substitution

    defs = build_definitions(demo=True)

    def knobs(job: str, op: str) -> dict:
        ops = defs.resolve_job_def(job).run_config_schema.config_type.fields["ops"].config_type.fields
        return {name: f.default_value for name, f in ops[op].config_type.fields["config"].config_type.fields.items()}

    assert knobs("build_graph_job", "substitution_graph")["fdr"] == inspect.signature(learn_substitution).parameters["fdr"].default
    assert knobs("build_graph_job", "product_clusters")["max_cluster_size"] == MAX_CLUSTER_SIZE
    assert inspect.signature(cluster_products).parameters["max_cluster_size"].default in (MAX_CLUSTER_SIZE, inspect.Parameter.empty)
    assert knobs("refresh_results_job", "experiment_results")["n_bootstrap"] == HPTEEstimator().n_bootstrap
    for op, config, message in (("product_clusters", {"max_cluster_size": 1}, "max_cluster_size 1 must be at least 2"),
                                ("substitution_graph", {"fdr": 1.5}, "fdr 1.5 is not a rate"),
                                ("experiment_results", {"n_bootstrap": 10}, "n_bootstrap 10 is below 100")):
        key = {"partition_key": "2025-06-02"} if op in SNAPSHOT_ASSETS else {}  # one snapshot; refused before any work
        refused = _materialize(tmp_path, [op], run_config={"ops": {op: {"config": config}}}, **key)
        failures = [e.event_specific_data.error.message for e in refused.all_events if e.is_step_failure]
        assert not refused.success and any(message in f for f in failures), failures



def test_a_snapshot_key_or_date_the_run_cannot_build_is_refused_in_one_line(tmp_path):
    """A snapshot partition added by hand in the UI must be a date; a launchpad snapshot_date must
    be one of the run's keys. Both fail before any work."""
    cases = (
        ("product_clusters", {"partition_key": "2025-13-01"}, "product_clusters: snapshot partition '2025-13-01' is not a date YYYY-MM-DD"),
        ("substitution_graph", {"partition_key": "2025-06-02", "run_config": {"ops": {"substitution_graph": {"config": {"snapshot_date": "2025-06-09"}}}}},
         "substitution_graph: config snapshot_date 2025-06-09 is not among this run's snapshot partitions (2025-06-02)"),
    )
    for op, kwargs, message in cases:
        refused = _materialize(tmp_path, [op], **kwargs)
        failures = [e.event_specific_data.error.message for e in refused.all_events if e.is_step_failure]
        assert not refused.success and any(message in f for f in failures), failures
