"""Inputs: the catalogue, daily sales, trigger events and experiment files, validated.

Each asset reads `input/`, refuses what breaks the contract (kept aside in
`warehouse/quarantine/<input>/` with file, row key, field and reason), writes the good rows and
reports. The blocking checks fail when the input as a whole is suspect (more than 1% broken rows),
so nothing downstream is computed from it.
"""

import dagster as dg
from pyspark.sql import functions as F

from assets.checks import gx_check_result, refused_rows_result, run_metadata
from assets.kinds import DELTA_TABLE
from pipelines import experiments as experiment_files
from pipelines import inputs, quality

MAX_BAD_SHARE = 0.01

CATALOG_CONTRACT = "catalog_contract"
CATALOG_REFUSED_ROWS = "catalog_refused_rows"
SALES_CONTRACT = "sales_contract"
SALES_REFUSED_ROWS = "sales_refused_rows"
EXPERIMENT_FILES_VALID = "experiment_files_valid"

# The folders of `$PRICELAB_DATA_DIR/input/` that assets read, as external assets: pricelab never
# materialises them (the retailer's feeds drop the files), but declaring them makes the UI's
# lineage say which asset reads which files -- e.g. that `experiment_sales` reads the sales feed
# itself, new daily drops included, not the `sales` table the weekly graph build refreshes.
INPUT_FILES_GROUP = "input_files"


def _input_files(key: str, where: str, what: str) -> dg.AssetSpec:
    return dg.AssetSpec(key=key, group_name=INPUT_FILES_GROUP, description=f"`input/{where}`: {what} (external: landed by a feed)")


CATALOG_FILES = _input_files("catalog_files", "catalog.*", "the product catalogue")
SALES_FILES = _input_files("sales_files", "sales/", "daily sales files, the history and each new day's drop")
TRIGGER_EVENT_FILES = _input_files("trigger_event_files", "trigger_events.*", "dated outside events")
EXPERIMENT_FILES = _input_files("experiment_files", "experiments/*.yaml", "one experiment per file")
RELATED_PAIRS_FILES = _input_files("related_pairs_files", "related_pairs.*", "optional product pairs known to be related")
PROPOSAL_FILES = _input_files("proposal_files", "proposals/*.yaml", "experiment proposals for the design advisor")
# by the name of what is read under input/ (a file stem or a folder)
INPUT_FILES = {"catalog": CATALOG_FILES, "sales": SALES_FILES, "trigger_events": TRIGGER_EVENT_FILES,
               "experiments": EXPERIMENT_FILES, "related_pairs": RELATED_PAIRS_FILES, "proposals": PROPOSAL_FILES}


def _log_refusals(context, name: str, counts: dict, examples: list, refused_files: list) -> None:
    for message in refused_files:
        context.log.error(f"{name}: file refused: {message}")
    for reason, n in counts.items():
        context.log.warning(f"{name}: {n} row(s) refused ({reason})")
    for row in examples:
        context.log.warning(f"{name}: e.g. {row['file']} row {row['row_key']}: field '{row['field']}' {row['reason']}")


@dg.asset(
    group_name="inputs",
    kinds=DELTA_TABLE,
    deps=[CATALOG_FILES],
    required_resource_keys={"spark", "warehouse"},
    check_specs=[
        dg.AssetCheckSpec(CATALOG_CONTRACT, asset="catalog", blocking=True, description="GX: keys present and unique"),
        dg.AssetCheckSpec(CATALOG_REFUSED_ROWS, asset="catalog", description="warns when rows were refused"),
    ],
)
def catalog(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """The product catalogue: product_id, category, subclass and attributes (forest features)."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    loaded = inputs.load_catalog(spark, warehouse.root)
    outcome = quality.validate(loaded.raw, "catalog", quality.catalog_expectations(MAX_BAD_SHARE))
    counts, examples = inputs.rejection_summary(loaded.rejected)
    _log_refusals(context, "catalog", counts, examples, loaded.refused_files)
    warehouse.write(loaded.rejected, "quarantine/catalog")
    warehouse.write(loaded.rows, "catalog")
    table = warehouse.read(spark, "catalog")
    per_category = {r["category"]: int(r["count"]) for r in table.groupBy("category").count().collect()}
    return dg.MaterializeResult(
        metadata={
            "products": sum(per_category.values()),
            "subclasses": table.select("subclass").distinct().count(),
            "products_per_category": dg.MetadataValue.json(per_category),
            "attributes": dg.MetadataValue.json([c for c in table.columns if c not in inputs.CATALOG_COLUMNS]),
            **run_metadata(spark, sum(per_category.values())),
        },
        check_results=[
            gx_check_result(CATALOG_CONTRACT, outcome),
            refused_rows_result(CATALOG_REFUSED_ROWS, counts, examples, loaded.refused_files),
        ],
    )


def sales_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    """The sales contract checks, for every asset that reads `input/sales/`."""
    return [
        dg.AssetCheckSpec(
            SALES_CONTRACT, asset=asset, blocking=True,
            description="GX: price > 0, units >= 0, keys present, unique (product_id, date); <=1% broken rows",
        ),
        dg.AssetCheckSpec(SALES_REFUSED_ROWS, asset=asset, description="warns when rows were refused"),
    ]


def load_checked_sales(context, asset: str) -> tuple[inputs.LoadedInput, list[dg.AssetCheckResult], int]:
    """Read `input/sales/`, keep refused rows aside (quarantine/<asset>), run the contract suite."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    today = context.resources.warehouse.as_of()
    loaded = inputs.load_sales(spark, warehouse.root, catalog=warehouse.read(spark, "catalog"), today=today)
    outcome = quality.validate(loaded.raw, "sales", quality.sales_expectations(MAX_BAD_SHARE))
    counts, examples = inputs.rejection_summary(loaded.rejected)
    _log_refusals(context, asset, counts, examples, loaded.refused_files)
    warehouse.write(loaded.rejected, f"quarantine/{asset}")
    checks = [
        gx_check_result(SALES_CONTRACT, outcome),
        refused_rows_result(SALES_REFUSED_ROWS, counts, examples, loaded.refused_files),
    ]
    return loaded, checks, sum(counts.values())


@dg.asset(
    group_name="inputs",
    kinds=DELTA_TABLE,
    deps=[catalog, SALES_FILES],
    required_resource_keys={"spark", "warehouse"},
    check_specs=sales_check_specs("sales"),
)
def sales(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Every day of sales in `input/sales/` (history and new daily drops), one row per product-day."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    loaded, checks, refused = load_checked_sales(context, "sales")
    warehouse.write(loaded.rows, "sales")
    stored = warehouse.read(spark, "sales")
    stats = stored.agg(
        F.count("*").alias("rows"), F.countDistinct("product_id").alias("products"),
        F.min("date").alias("first_day"), F.max("date").alias("last_day"),
    ).first()
    return dg.MaterializeResult(
        metadata={
            "rows": stats["rows"],
            "products": stats["products"],
            "first_day": str(stats["first_day"]),
            "last_day": str(stats["last_day"]),
            "refused_rows": refused,
            **run_metadata(spark, stats["rows"]),
        },
        check_results=checks,
    )


@dg.asset(kinds=DELTA_TABLE, group_name="inputs", deps=[TRIGGER_EVENT_FILES], required_resource_keys={"spark", "warehouse"})
def trigger_events(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Dated outside events (e.g. a competitor's discount) that start triggered experiments."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    loaded = inputs.load_trigger_events(spark, warehouse.root)
    counts, examples = inputs.rejection_summary(loaded.rejected)
    _log_refusals(context, "trigger_events", counts, examples, loaded.refused_files)
    warehouse.write(loaded.rejected, "quarantine/trigger_events")
    warehouse.write(loaded.rows, "trigger_events")
    per_event = {r["event"]: int(r["count"]) for r in warehouse.read(spark, "trigger_events").groupBy("event").count().collect()}
    return dg.MaterializeResult(
        metadata={"events": dg.MetadataValue.json(per_event), "refused_rows": sum(counts.values()),
                  **run_metadata(spark, sum(per_event.values()))}
    )


@dg.asset(
    group_name="inputs",
    kinds=DELTA_TABLE,
    deps=[catalog, EXPERIMENT_FILES],
    required_resource_keys={"spark", "warehouse"},
    check_specs=[
        dg.AssetCheckSpec(EXPERIMENT_FILES_VALID, asset="experiments", description="warns when a file was refused"),
    ],
)
def experiments(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Experiment definitions from `input/experiments/*.yaml`; a bad file is refused alone.

    Running experiments (with an enrolment) keep their name's file for good and, when that file
    is refused or gone, their last valid spec. The run fails when files exist but none is usable.
    """
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    catalog_rows = warehouse.read(spark, "catalog")
    # unit_cost (optional): profit's unit cost, checked against each experiment's metrics
    known = catalog_rows.select("product_id", "category", "subclass", *[c for c in ("unit_cost",) if c in catalog_rows.columns]).toPandas()
    registry = experiment_files.read_registry(warehouse)
    previous = warehouse.read(spark, "experiments").toPandas() if warehouse.exists("experiments") else None
    directory = warehouse.input_dir / "experiments"
    running = experiment_files.running_specs(registry, previous)
    for name in experiment_files.retired_names(warehouse.tables_dir) & set(running):
        context.log.info(f"experiment '{name}' is retired (`pricelab retire`): no longer kept on its last spec")
        running.pop(name)
    loaded = experiment_files.load_experiment_directory(directory, known, running)
    specs, errors = loaded.specs, loaded.refused
    for message in loaded.ignored:
        context.log.warning(message)
    for error in errors:
        context.log.error(f"experiment refused: {error}")
    for message in loaded.kept:
        context.log.error(f"RUNNING EXPERIMENT KEPT: {message}")
    if not specs and errors:
        raise dg.Failure(
            description=f"every experiment file in {directory} was refused ({len(errors)}); first: {errors[0]}",
            metadata={"refused": dg.MetadataValue.json([str(e) for e in errors])},
        )
    if not specs:
        context.log.warning(f"no experiment file in {directory}: no experiment will be published")
    warehouse.write(experiment_files.specs_to_frame(specs), "experiments")
    return dg.MaterializeResult(
        metadata={
            "experiments": dg.MetadataValue.json(
                {s.name: {"design": s.design, "start": str(s.start), "end": str(s.end), "unit": s.unit} for s in specs}
            ),
            "refused": len(errors),
            "kept_on_last_valid_spec": dg.MetadataValue.json(loaded.kept),
            # what the experiment-files sensor compares with at its first tick (jobs/sensors.py)
            "file_digests": dg.MetadataValue.json(experiment_files.experiment_file_digests(directory)),
            **run_metadata(spark, len(specs)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=EXPERIMENT_FILES_VALID,
                passed=not errors and not loaded.kept and not loaded.ignored,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "refused": dg.MetadataValue.json([str(e) for e in errors]),
                    "kept_on_last_valid_spec": dg.MetadataValue.json(loaded.kept),
                    "ignored": dg.MetadataValue.json(loaded.ignored),
                },
            )
        ],
    )
