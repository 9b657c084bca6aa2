"""Design advice (issue 17): proposals in `input/proposals/*.yaml`, answered from history.

Thin: reads the warehouse, calls `pipelines.advisor`, writes `warehouse/design_advice/` (one row
per proposal and candidate) and the report section `warehouse/report/design_advice.md` with one
MDE plot per proposal. A proposal never publishes anything.
"""

import base64

import dagster as dg
import pandas as pd

from pipelines import advisor

PROPOSAL_FILES_VALID = "proposal_files_valid"
ADVICE_SECTION = "report/design_advice.md"


class AdviceConfig(dg.Config):
    """Run-level knobs of the advisor (set them in the launchpad)."""

    n_replays: int = advisor.DEFAULT_REPLAYS
    n_calibration: int = advisor.DEFAULT_CALIBRATION_REPLAYS
    calibration_products: int = advisor.DEFAULT_CALIBRATION_PRODUCTS


def _latest(warehouse, spark, table: str, columns: list[str]) -> pd.DataFrame | None:
    snapshots = warehouse.partitions(table, "snapshot_date")
    if not snapshots:
        return None
    return warehouse.read(spark, table, ("snapshot_date", snapshots[-1])).select(*columns).toPandas()


@dg.asset(
    group_name="advice",
    deps=["proposal_files", "catalog", "sales", "trigger_events", "substitution_graph", "product_clusters", "daily_assignments"],
    required_resource_keys={"spark", "warehouse"},
    check_specs=[dg.AssetCheckSpec(PROPOSAL_FILES_VALID, asset="design_advice", description="warns when a proposal file was refused")],
)
def design_advice(context: dg.AssetExecutionContext, config: AdviceConfig) -> dg.MaterializeResult:
    """Per proposal and candidate design x unit x blackout: predicted SE, MDE, A/A rejection rate,
    carryover, spillover bias, expected RMSE and the recommendation, from A/A replays of the history."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    catalog = warehouse.read(spark, "catalog").toPandas()
    proposals, errors = advisor.load_proposals(warehouse.input_dir / "proposals", catalog)
    for error in errors:
        context.log.error(f"proposal refused: {error}")
    tables, sections, pictures = [], [], {}
    if proposals:
        sales = warehouse.read(spark, "sales").toPandas()
        events = warehouse.read(spark, "trigger_events").toPandas() if warehouse.exists("trigger_events") else None
        past = (warehouse.read(spark, "daily_assignments").select("date", "product_id", "arm").toPandas()
                if warehouse.partitions("daily_assignments", "date") else None)
        inputs = advisor.AdviceInputs(
            sales=sales, catalog=catalog, events=events, past_assignments=past,
            clusters=_latest(warehouse, spark, "product_clusters", ["product_id", "cluster_id"]),
            edges=_latest(warehouse, spark, "substitution_graph", ["src", "dst", "weight"]),
        )
        history = None
        for proposal in proposals:
            if history is None or proposal.candidates[0].metric != proposals[0].candidates[0].metric:
                history = advisor.build_history(sales, catalog, proposal.candidates[0].metric, past)
            table, evidence = advisor.advise(spark, proposal, inputs, config.n_replays, config.n_calibration,
                                             config.calibration_products, history=history)
            for note in proposal.notes:
                context.log.info(f"proposal {proposal.name}: {note}")
            picture = advisor.mde_png(table)
            image = f"design_advice_{proposal.name}.png"
            warehouse.write_file(f"report/{image}", picture)
            pictures[proposal.name] = picture
            sections.append(advisor.advice_markdown(table, evidence, image))
            tables.append(table)
            context.log.info(f"proposal {proposal.name}: {table.loc[table['recommended'], 'reason'].iloc[0]}")
    result = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(advisor.ADVICE_COLUMNS))
    if len(result):
        warehouse.write(result.astype({"recommended": bool}), "design_advice")
    else:  # no proposal: an empty table (typed), so no stale advice survives
        warehouse.write(spark.createDataFrame([], advisor.ADVICE_SCHEMA), "design_advice")
    warehouse.write_file(ADVICE_SECTION, "## Design advice\n\n" + ("\n".join(sections) if sections else "No proposal in input/proposals/.\n"))
    metadata = {
        "proposals": len(proposals), "refused": len(errors), "rows": len(result),
        "recommended": dg.MetadataValue.json({r["proposal"]: r["reason"] for _, r in result[result["recommended"].astype(bool)].iterrows()} if len(result) else {}),
    }
    for name, picture in pictures.items():
        metadata[f"mde_{name}"] = dg.MetadataValue.md(f"![mde](data:image/png;base64,{base64.b64encode(picture).decode()})")
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[dg.AssetCheckResult(check_name=PROPOSAL_FILES_VALID, passed=not errors, severity=dg.AssetCheckSeverity.WARN,
                                            metadata={"refused": dg.MetadataValue.json([str(e) for e in errors])})],
    )
