"""The report a pricing scientist reads: the results table, a picture, what was not estimated."""

import base64

import dagster as dg

from assets.estimation import EFFECT_OVER_TIME
from pipelines import experiments as experiment_files
from pipelines import graph, report


def experiment_report_asset(truth: tuple[str, ...] = ()) -> dg.AssetsDefinition:
    """The `experiment_report` asset; `truth`: the asset that writes the true effects to put
    beside the estimates (the demo's simulator_truth; jobs/definitions.py passes it)."""
    return dg.asset(
        name="experiment_report",
        group_name="results",
        deps=["experiment_results", EFFECT_OVER_TIME, "spillover_exposure", "experiments", "substitution_graph",
              "design_advice", *truth],
        required_resource_keys={"spark", "warehouse"},
    )(_experiment_report)


def _experiment_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """`warehouse/report/report.md` and `effects.png`; with the true effects beside when the
    simulator wrote them (demo)."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    results = warehouse.read(spark, "experiment_results").toPandas()
    truth = warehouse.read(spark, "simulator_truth").toPandas() if warehouse.exists("simulator_truth") else None
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
    sentences = {}
    for spec in experiment_files.frame_to_specs(specs):
        rows = results[results["experiment"] == spec.name]
        if len(rows):
            sentences[spec.name] = report.business_sentence(spec, rows)
    over_time = warehouse.read(spark, EFFECT_OVER_TIME).toPandas() if warehouse.exists(EFFECT_OVER_TIME) else None
    has_over_time = over_time is not None and not over_time.empty
    if has_over_time:
        truth_rel = table[["experiment", "metric", "true_relative"]].drop_duplicates() if "true_relative" in table.columns else None
        warehouse.write_file("report/effect_over_time.png", report.effect_over_time_png(over_time, truth_rel))
    text = report.report_markdown(table, problems, as_of, exposure, graph_power, sentences=sentences, over_time=has_over_time)
    advice = warehouse.tables_dir / "report" / "design_advice.md"  # design_advice's section, when it ran
    if advice.exists():
        text = text.rstrip("\n") + "\n\n" + advice.read_text()
    path = warehouse.write_file("report/report.md", text)
    for name, sentence in sentences.items():
        context.log.info(f"{name}: {sentence}")
    context.log.info("experiment results:\n" + report.format_table(table))
    metadata = {"report": dg.MetadataValue.path(str(path)), "table": dg.MetadataValue.md(report.format_table(table)),
                "decisions": dg.MetadataValue.md("\n\n".join(f"**{n}**: {s}" for n, s in sentences.items()) or "none")}
    if picture:
        metadata["effects"] = dg.MetadataValue.md(f"![effects](data:image/png;base64,{base64.b64encode(picture).decode()})")
    return dg.MaterializeResult(metadata=metadata)
