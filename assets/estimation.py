"""From sales to effects: the enrolled products' sales, their first differences, the estimates."""

import dagster as dg
import pandas as pd
from pyspark.sql import functions as F

from assets.checks import run_metadata
from assets.kinds import DELTA_TABLE
from assets.inputs import load_checked_sales, sales_check_specs
from pipelines import balance, estimation, graph, publication, spillover
from pipelines import metrics as metric_rules
from pipelines.progress import Progress
from pipelines import experiments as experiment_files

PRE_DAYS = estimation.CounterfactualSettings().pre_days


def experiment_sales_asset(sales_writers: tuple[str, ...] = ()) -> dg.AssetsDefinition:
    """The `experiment_sales` asset; `sales_writers`: assets that drop files into `input/sales/`
    and so must run first (the demo's simulated_sales; jobs/definitions.py passes it)."""
    return dg.asset(
        name="experiment_sales",
        group_name="results",
        kinds=DELTA_TABLE,
        deps=["sales_files", "daily_assignments", "catalog", *sales_writers],
        required_resource_keys={"spark", "warehouse"},
        check_specs=sales_check_specs("experiment_sales"),
    )(_experiment_sales)


def _experiment_sales(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Sales of enrolled products, from a year before their enrolment to the latest day in
    `input/sales/` (new daily drops included), validated like every sales input."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    loaded, checks, refused = load_checked_sales(context, "experiment_sales")
    enrolled = warehouse.read(spark, "daily_assignments").groupBy("product_id").agg(F.min("date").alias("first_day"))
    rows = loaded.rows.join(enrolled, "product_id").where(F.col("date") >= F.date_sub("first_day", PRE_DAYS)).drop("first_day")
    warehouse.write(rows, "experiment_sales")
    stats = warehouse.read(spark, "experiment_sales").agg(
        F.count("*").alias("rows"), F.countDistinct("product_id").alias("products"), F.max("date").alias("last_day")
    ).first()
    return dg.MaterializeResult(
        metadata={"rows": stats["rows"], "products": stats["products"], "last_day": str(stats["last_day"]), "refused_rows": refused,
                  **run_metadata(spark, stats["rows"])},
        check_results=checks,
    )


SAMPLE_RATIO_CHECK = "sample_ratio_mismatch"
RESULTS_HISTORY = "experiment_results_history"  # as_of=YYYY-MM-DD/: each refresh's experiment_results
EFFECT_OVER_TIME = "effect_over_time"
BALANCE_CHECK = "pre_period_balance"


def _checks(warehouse, spark, specs: pd.DataFrame) -> list[dg.AssetCheckResult]:
    """SRM (blocking at p < 0.001, warning at p < 0.01) and pre-period balance (beyond-chance imbalance warns),
    rules in `pipelines.balance`."""
    per_unit = balance.sales_days_per_unit(warehouse.read(spark, "daily_assignments"), warehouse.read(spark, "experiment_sales"))
    srm = balance.srm_table(per_unit, specs)
    verdicts = set(srm["verdict"]) if not srm.empty else set()
    srm_failed = srm[srm["verdict"] != "ok"] if not srm.empty else srm
    smd = balance.balance_table(warehouse.read(spark, "first_differences").toPandas(), specs)
    unbalanced = smd[smd["warn"]]
    describe = lambda rows: rows.to_markdown(index=False, floatfmt=".4g") if len(rows) else "none"  # noqa: E731
    return [
        dg.AssetCheckResult(
            check_name=SAMPLE_RATIO_CHECK, passed=not len(srm_failed),
            severity=dg.AssetCheckSeverity.ERROR if "block" in verdicts else dg.AssetCheckSeverity.WARN,
            metadata={
                "failed": dg.MetadataValue.md(
                    "\n".join(f"- **{r.experiment}**: {r.verdict} (p = {r.p:.2g}; units {r.units_treated}/{r.units_control} "
                              f"treated/control, expected share {r.expected_treated_share:.0%}; sales on "
                              f"{r.sales_day_share_treated:.1%} / {r.sales_day_share_control:.1%} of published days)"
                              for r in srm_failed.itertuples()) or "none"),
                "tests": dg.MetadataValue.md(describe(srm)),
                "rule": f"chi-square on units with sales per arm and unit-level test of days with sales, Bonferroni; "
                        f"block p < {balance.SRM_BLOCK_P}, warn p < {balance.SRM_WARN_P}",
            },
        ),
        dg.AssetCheckResult(
            check_name=BALANCE_CHECK, passed=not len(unbalanced), severity=dg.AssetCheckSeverity.WARN,
            metadata={"unbalanced": dg.MetadataValue.md(describe(unbalanced)), "smd": dg.MetadataValue.md(describe(smd)),
                      "rule": f"pre-period mean units and price differ between arms beyond chance: permutation test over "
                              f"the randomisation units, Bonferroni over covariates, p < {balance.BALANCE_WARN_P} warns"},
        ),
    ]


@dg.asset(
    group_name="results",
    kinds=DELTA_TABLE,
    deps=["experiment_sales", "daily_assignments", "experiments", "catalog", "trigger_events"],
    required_resource_keys={"spark", "warehouse"},
    check_specs=[
        dg.AssetCheckSpec(SAMPLE_RATIO_CHECK, asset="first_differences", blocking=True,
                          description="units and days with sales per arm match the design (blocking at p < 0.001)"),
        dg.AssetCheckSpec(BALANCE_CHECK, asset="first_differences",
                          description="pre-period mean units and price no more unbalanced between arms than chance (permutation p >= 0.01)"),
    ],
)
def first_differences(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Per experiment and product: the first difference against the counterfactual its pool's
    back-test chose (trigger events and untreated prices known), and pre-period features."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    specs = warehouse.read(spark, "experiments").toPandas()
    designs = dict(zip(specs["name"], specs["design"]))
    parsed = experiment_files.frame_to_specs(specs)
    metrics = {s.name: list(s.all_metrics) for s in parsed}
    catalog = warehouse.read(spark, "catalog")
    fd = estimation.first_differences(
        warehouse.read(spark, "experiment_sales"),
        warehouse.read(spark, "daily_assignments"),
        designs,
        metrics,
        catalog=catalog,  # short-history products pool within their subclass
        events=warehouse.read(spark, "trigger_events") if warehouse.exists("trigger_events") else None,
        unit_costs=_unit_costs(spark, parsed, catalog),
    )
    warehouse.write(fd, "first_differences")
    stored = warehouse.read(spark, "first_differences")
    enrolled = warehouse.read(spark, "daily_assignments").groupBy("experiment").agg(F.countDistinct("product_id").alias("enrolled"))
    per_experiment = (
        stored.select("experiment", "arm", "product_id").distinct().groupBy("experiment", "arm").count().groupBy("experiment").pivot("arm").sum("count")
        .join(enrolled, "experiment", "right").fillna(0).toPandas()
    )
    context.log.info("first differences per experiment:\n" + per_experiment.to_string(index=False))
    chosen = stored.groupBy("experiment", "counterfactual").agg(F.countDistinct("product_id").alias("count")).toPandas()
    counterfactuals = {name: dict(zip(rows["counterfactual"], rows["count"].astype(int)))
                       for name, rows in chosen.groupby("experiment")}
    return dg.MaterializeResult(
        metadata={
            "products_per_experiment": dg.MetadataValue.json(per_experiment.set_index("experiment").to_dict(orient="index")),
            "counterfactual_chosen": dg.MetadataValue.json(counterfactuals),  # products per back-test winner
            "note": "products enrolled but without a first difference lack pre-period history or window days",
            **run_metadata(spark, stored.count()),
        },
        check_results=_checks(warehouse, spark, specs),
    )


def _unit_costs(spark, specs, catalog):
    """(experiment, product_id, unit_cost, margin_rate) of the experiments measuring profit
    (`metrics.unit_costs`: the file's `costs`, else the catalogue's unit_cost), or None."""
    wanted = [s for s in specs if "profit" in s.all_metrics]
    if not wanted:
        return None
    columns = ["product_id", "category"] + (["unit_cost"] if "unit_cost" in catalog.columns else [])
    rows = catalog.select(*columns).toPandas()
    frames = [metric_rules.unit_costs(s.costs, rows).assign(experiment=s.name) for s in wanted]
    return spark.createDataFrame(pd.concat(frames, ignore_index=True)[["experiment", "product_id", "unit_cost", "margin_rate"]])


def _with_spillover(context, results: pd.DataFrame, fd: pd.DataFrame, specs: pd.DataFrame):
    """`spillover.results_with_spillover` on the graph snapshot in force at each between-product
    experiment's start (its edges, blocks and enrolment read here)."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    snapshots = warehouse.partitions("substitution_graph", "snapshot_date")
    parsed = experiment_files.frame_to_specs(specs)
    between = [s for s in parsed if s.design in spillover.DRAWN_ONCE_DESIGNS and s.name in set(results["experiment"])]
    published = warehouse.read(spark, "daily_assignments").where(F.col("experiment").isin([s.name for s in between])).toPandas()
    catalog = warehouse.read(spark, "catalog").select("product_id", "subclass").toPandas()
    exposure_inputs = {}
    for spec in between:
        in_force = publication.snapshot_in_force(snapshots, spec.start)
        if in_force is None or not warehouse.exists("enrolments", ("experiment", spec.name)):
            continue
        snapshot = ("snapshot_date", in_force)
        blocks = warehouse.read(spark, graph.BLOCKS_TABLE, snapshot).toPandas() if warehouse.exists(graph.BLOCKS_TABLE, snapshot) else None
        edges = spillover.exposure_edges(warehouse.read(spark, "substitution_graph", snapshot).toPandas(), blocks, catalog)
        units = warehouse.read(spark, "enrolments", ("experiment", spec.name)).drop("experiment").toPandas()
        exposure_inputs[spec.name] = (edges, units)
    results, exposure, notes, warnings = spillover.results_with_spillover(results, fd, parsed, published, exposure_inputs)
    for warning in warnings:
        context.log.warning(warning)
    return results, exposure, notes


def _clusters_in_force(context, specs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per switchback experiment: the product_clusters snapshot in force at its start (product_id,
    cluster_id), whose clusters the bootstrap resamples whole (`estimation.BootstrapBlocks`)."""
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    snapshots = warehouse.partitions("product_clusters", "snapshot_date")
    found, cache = {}, {}
    for spec in experiment_files.frame_to_specs(specs):
        in_force = publication.snapshot_in_force(snapshots, spec.start)
        if spec.design not in estimation.SWITCHBACK_DESIGNS or in_force is None:
            continue
        if in_force not in cache:
            cache[in_force] = (warehouse.read(spark, "product_clusters", ("snapshot_date", in_force))
                               .select("product_id", "cluster_id").toPandas())
        found[spec.name] = cache[in_force]
    return found


class EstimationConfig(dg.Config):
    """Run-level knob of a results refresh (set it in the launchpad): bootstrap draws per estimate
    of a switchback design (the SE's own Monte Carlo error is about SE / sqrt(2 x n_bootstrap);
    between designs use the jackknife over units, or over 250 groups of units an arm). Results of the same day
    and settings are reproduced bit for bit; `estimator_settings` in the metadata records them."""

    n_bootstrap: int = estimation.HPTEEstimator().n_bootstrap


def _estimate_each(context, fd, specs, catalog, as_of, n_bootstrap: int, clusters) -> tuple[pd.DataFrame, dict, dict]:
    """Every experiment's estimates, one at a time (each fit is independent, same random_state: the
    same numbers as all at once), so the run log says how far it is and how long is left; returns
    (results, problems by experiment, fitted models)."""
    models: dict = {}
    progress = Progress("experiment_results", len(specs), "experiment(s)", context.log.info)
    parts, problems = [], {}
    for i in range(len(specs)):
        part, part_problems = estimation.estimate_experiments(fd, specs.iloc[[i]], as_of, n_bootstrap=n_bootstrap, features=catalog,
                                                              models=models, clusters=clusters)
        parts.append(part)
        problems.update(part_problems)
        progress.step(str(specs["name"].iloc[i]))
    filled = [p for p in parts if not p.empty]
    results = pd.concat(filled, ignore_index=True) if filled else pd.DataFrame(columns=estimation.RESULT_COLUMNS)
    for name, why in problems.items():
        context.log.warning(f"experiment '{name}' not estimated: {why}")
    return results, problems, models


def _results_metadata(results: pd.DataFrame, models: dict, problems: dict, spillover_notes: dict, as_of, history: list) -> dict:
    """What the UI shows on experiment_results: every estimate in one line, HPTE's heterogeneity,
    precision and carryover, spillover notes and the estimator settings behind every figure."""
    heterogeneity = {}
    for key, model in sorted(models.items()):
        if len(key) != 2 or key[1] != "hpte":  # heterogeneity of the primary metric
            continue
        name = key[0]
        top = model.heterogeneity_.head(12)
        heterogeneity[name] = (
            f"**{name}**: {model.n_trimmed_} trimmed, {model.n_leaves_skipped_} of {model.n_leaves_} leaves "
            f"skipped (one arm only)\n\n" + top.to_markdown(index=False, floatfmt=".3f")
        )
    return {
        "as_of": str(as_of),
        "estimated": len(results),
        "history": dg.MetadataValue.json(history),
        "not_estimated": dg.MetadataValue.json(problems),
        "results": dg.MetadataValue.md(
            "\n".join(
                f"- **{r.experiment}** {r.metric} ({r.estimator}): {r.effect:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], "
                f"relative {r.relative_effect:+.1%} [{r.ci_low_rel:+.1%}, {r.ci_high_rel:+.1%}], Holm p {r.p_holm:.3f}"
                + (f", guardrail {r.guardrail_status}" if r.guardrail_status else "")
                for r in results.itertuples()
            )
        ),
        "heterogeneity": dg.MetadataValue.md("\n\n".join(heterogeneity.values()) or "no HPTE fit"),
        "precision": dg.MetadataValue.md(
            "\n".join(
                f"- **{r.experiment}** {r.metric} ({r.estimator}): counterfactual {r.counterfactual}; regression adjustment "
                f"removed {r.variance_reduction:.0%} of the variance"
                + (f"; carryover {r.carryover_estimate:+.3f} (SE {r.carryover_se:.3f})"
                   + (" FLAGGED" if r.carryover_flag else f", not flagged (it catches {r.carryover_detectable:.3f} or more 4 times in 5)")
                   if pd.notna(r.carryover_estimate) else "")
                for r in results.itertuples()
            )
        ),
        "spillover": dg.MetadataValue.json(spillover_notes),
        # every figure traced to the estimator settings that produced it (scikit-learn get_params)
        "estimator_settings": dg.MetadataValue.json(
            {f"{key[0]}/{key[1]}": model.get_params() for key, model in sorted(models.items()) if len(key) == 2}
        ),
    }


RESULTS_READS = ["first_differences", "experiments", "experiment_sales", "catalog", "substitution_graph", "product_clusters",
                 "daily_assignments", "enrolments"]


@dg.multi_asset(
    specs=[
        dg.AssetSpec("experiment_results", group_name="results", kinds=DELTA_TABLE, deps=RESULTS_READS,
                     description="One row per experiment, estimator and metric: effect, SE, 95% interval (contract v1)."),
        dg.AssetSpec(RESULTS_HISTORY, group_name="results", kinds=DELTA_TABLE, deps=RESULTS_READS,
                     description="Every refresh's experiment_results under its as_of day, never overwritten."),
        dg.AssetSpec(EFFECT_OVER_TIME, group_name="results", kinds=DELTA_TABLE, deps=RESULTS_READS,
                     description="Cumulative effect and 95% band by day since start, per experiment and metric."),
        dg.AssetSpec("spillover_exposure", group_name="results", kinds=DELTA_TABLE, deps=RESULTS_READS,
                     description="Products per exposure condition of the spillover estimate (IPW), per experiment."),
    ],
    required_resource_keys={"spark", "warehouse"},
)
def experiment_results(context: dg.AssetExecutionContext, config: EstimationConfig):
    """One row per experiment and estimator (plain DiD and HPTE): effect, SE, 95% interval
    (contract v1); HPTE's heterogeneity (which kinds of products respond more) as metadata.
    The same fit writes the results' history, the effect over time and the spillover exposure."""
    if config.n_bootstrap < 100:
        raise dg.Failure(f"experiment_results: config n_bootstrap {config.n_bootstrap} is below 100; an SE from fewer draws is too noisy to report")
    spark, warehouse = context.resources.spark.session(), context.resources.warehouse.get()
    fd = warehouse.read(spark, "first_differences").toPandas()
    specs = warehouse.read(spark, "experiments").toPandas()
    catalog = warehouse.read(spark, "catalog").toPandas()
    as_of = warehouse.read(spark, "experiment_sales").agg(F.max("date")).first()[0]
    clusters = _clusters_in_force(context, specs)
    results, problems, models = _estimate_each(context, fd, specs, catalog, as_of, config.n_bootstrap, clusters)
    results, exposure, spillover_notes = _with_spillover(context, results, fd, specs)
    warehouse.write(results, "experiment_results")
    # history (issue 16): every refresh's results under its as_of day, never touched by a later
    # refresh (a rerun of the same day rewrites that day only); the cumulative effect by day since start
    warehouse.write(results, RESULTS_HISTORY, ("as_of", str(as_of)))
    over_time = estimation.effect_over_time(fd, specs, as_of, n_bootstrap=config.n_bootstrap, clusters=clusters)
    warehouse.write(over_time, EFFECT_OVER_TIME)
    warehouse.write(exposure, "spillover_exposure")
    yield dg.MaterializeResult(asset_key=RESULTS_HISTORY, metadata={"as_of": str(as_of), "rows": len(results)})
    yield dg.MaterializeResult(asset_key=EFFECT_OVER_TIME, metadata={"rows": len(over_time)})
    yield dg.MaterializeResult(asset_key="spillover_exposure", metadata={"rows": len(exposure)})
    yield dg.MaterializeResult(
        asset_key="experiment_results",
        metadata={**_results_metadata(results, models, problems, spillover_notes, as_of, warehouse.partitions(RESULTS_HISTORY, "as_of")),
                  **run_metadata(spark, len(results))},
    )
