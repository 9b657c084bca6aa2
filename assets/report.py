"""The report a pricing scientist reads: the results table, a picture, what was not estimated."""

import base64

import dagster as dg

from assets.mode import demo_mode
from pipelines import graph, report


@dg.asset(
    group_name="results",
    deps=["experiment_results"] + (["simulator_truth"] if demo_mode() else []),
    required_resource_keys={"spark", "warehouse"},
)
def experiment_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """`warehouse/report/report.md` and `effects.png`; in demo mode with the true effects beside."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    results = warehouse.read(spark, "experiment_results").toPandas()
    truth = warehouse.read(spark, "simulator_truth").toPandas() if demo_mode() and warehouse.exists("simulator_truth") else None
    specs = warehouse.read(spark, "experiments").toPandas()
    table = report.results_table(results, truth, specs)
    problems = {}
    for name in sorted(set(specs["name"]) - set(results["experiment"])):
        problems[name] = "not estimated yet (see the experiment_results run log)"
    as_of = results["as_of"].max() if not results.empty else None
    picture = report.effects_png(table) if not table.empty else b""
    if picture:
        warehouse.write_file("report/effects.png", picture)
    exposure = warehouse.read(spark, "spillover_exposure").toPandas() if warehouse.exists("spillover_exposure") else None
    snapshots = warehouse.partitions(graph.BLOCKS_TABLE, "snapshot_date")
    graph_power = None
    if snapshots:
        blocks = warehouse.read(spark, graph.BLOCKS_TABLE, ("snapshot_date", snapshots[-1])).toPandas()
        graph_power = {**graph.power_summary(blocks), "snapshot_date": snapshots[-1]}
    text = report.report_markdown(table, problems, as_of, exposure, graph_power)
    advice = warehouse.tables_dir / "report" / "design_advice.md"  # design_advice's section, when it ran
    if advice.exists():
        text = text.rstrip("\n") + "\n\n" + advice.read_text()
    path = warehouse.write_file("report/report.md", text)
    context.log.info("experiment results:\n" + report.format_table(table))
    metadata = {"report": dg.MetadataValue.path(str(path)), "table": dg.MetadataValue.md(report.format_table(table))}
    if picture:
        metadata["effects"] = dg.MetadataValue.md(f"![effects](data:image/png;base64,{base64.b64encode(picture).decode()})")
    return dg.MaterializeResult(metadata=metadata)
