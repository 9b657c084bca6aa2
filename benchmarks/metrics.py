"""Coverage of the relative effect per design and metric (issue 16), on the market simulator.

Each replication draws a fresh world of a simulator regime (`simulation.REGIMES`) with unit
costs, runs `--per-design` experiments of each design at once (one category each, so they never
share products or substitution edges), simulates the closed-loop sales, computes first
differences for units, revenue and profit with the pandas twin of the Spark path
(`estimation.first_differences_pandas`, the same per-pool and per-product functions; checked
equal to the Spark path on one world first, `--skip-spark-check` to skip) and fits the
regression-adjusted DiD (`estimation.estimate_experiments` with the estimator set to DiD only:
the relative interval is the same rule for HPTE, whose forest would cost ~20x the CPU here), its
SE the jackknife over randomisation units in between designs and a bootstrap resampling the world's
true substitute groups whole in switchback designs (standing in
for the product_clusters snapshot, as in benchmarks/estimators.py).
Truth: `simulation.true_effects(..., metrics=(units, revenue, profit))`, the direct effect for
product units (the global one for cluster units) over its counterfactual level.

Assignments come from the pandas twin of `pipelines.assignment` in benchmarks/estimators.py
(checked row for row against Spark there).

    /work/bin/slot .venv/bin/python benchmarks/metrics.py [--replications 100] [--per-design 2] [--regime default,weak,no_substitutes]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.estimators import pandas_assignments, true_clusters  # noqa: E402
from benchmarks.replications import run_replications  # noqa: E402
from pipelines import estimation, simulation  # noqa: E402
from pipelines import metrics as metric_rules  # noqa: E402
from pipelines.experiments import ExperimentSpec  # noqa: E402

METRICS = ("units", "revenue", "profit")
DESIGNS = (  # (label, design, unit, extra spec fields)
    ("time_bound", "time_bound", "product", {}),
    ("triggered", "triggered", "product", {"trigger_event": simulation.TRIGGER_EVENT, "duration_days": 21}),
    ("random_days", "random_days", "product", {}),
    ("crossover", "crossover", "product", {"phase_days": 21, "blackout_days": 7}),
)


def specs_for(config: simulation.MarketConfig, seed: int, per_design: int, price_change: float, weeks: int) -> list[tuple[str, ExperimentSpec]]:
    first_day = config.history_end + timedelta(days=1)
    start = first_day + timedelta(days=(7 - first_day.weekday()) % 7)
    end = start + timedelta(days=7 * weeks - 1)
    out = []
    for k in range(per_design):
        for d, (label, design, unit, extra) in enumerate(DESIGNS):
            category = config.categories[k * len(DESIGNS) + d]
            out.append((label, ExperimentSpec(
                name=f"{label.replace('_', '-')}-{k}", design=design, start=start, end=end, unit=unit,
                population={"categories": [category]}, treated_fraction=0.5, price_change=price_change,
                metric="units", metrics=METRICS, seed=seed * 100 + k * 10 + d, **extra)))
    return out


def world_config(regime: str, seed: int, per_design: int, products_per_experiment: int, carryover: float):
    categories = tuple(f"cat{i:02d}" for i in range(per_design * len(DESIGNS)))
    return simulation.regime_config(
        regime, categories=categories, n_products=products_per_experiment * len(categories),
        n_subclasses=4 * len(categories), seed=5000 + seed, carryover_decay=carryover)


def simulated(job):
    """World, specs, assignments, sales, triggers, unit costs of one replication."""
    seed, opts = job
    config = world_config(opts["regime"], seed, opts["per_design"], opts["products"], opts["carryover"])
    world = simulation.simulate_market(config)
    labelled = specs_for(config, seed, opts["per_design"], opts["price_change"], opts["weeks"])
    end = labelled[0][1].end
    triggers = simulation.simulate_trigger_events(world, config.history_start, end)
    clusters = true_clusters(world)
    assignments = pd.concat([pandas_assignments(s, world.catalog, triggers, clusters) for _, s in labelled], ignore_index=True)
    sales = simulation.simulate_sales(world, assignments, config.history_start, end)
    catalog = world.catalog.merge(simulation.unit_costs(world), on="product_id")
    costs = pd.concat([metric_rules.unit_costs(s.costs, catalog[catalog["category"].isin(s.population["categories"])])
                       .assign(experiment=s.name) for _, s in labelled], ignore_index=True)
    return world, labelled, assignments, sales, triggers, costs, clusters


def replicate(job) -> list[dict]:
    warnings.simplefilter("ignore")
    seed, opts = job
    world, labelled, assignments, sales, triggers, costs, clusters = simulated(job)
    specs = [s for _, s in labelled]
    truth = simulation.true_effects(world, assignments, metrics=METRICS).set_index(["experiment", "metric"])
    fds = estimation.first_differences_pandas(
        sales, assignments, {s.name: s.design for s in specs}, {s.name: list(s.all_metrics) for s in specs},
        catalog=world.catalog, events=triggers, unit_costs=costs)
    rows = []
    for label, spec in labelled:
        for metric in METRICS:
            fd = fds[(fds["experiment"] == spec.name) & (fds["metric"] == metric)]
            # the true substitute groups stand in for the product_clusters snapshot: switchback designs
            # resample them whole, as the experiment_results asset does (estimation.BootstrapBlocks)
            model = estimation.DiDEstimator(n_bootstrap=opts["bootstrap"], random_state=seed).fit(fd, clusters)
            found = metric_rules.relative_effect(model.effect_, model.se_, model.analysed_, df=model.df_,  # as the pipeline calls it
                                                 se_rel=model.relative_se_)
            t = truth.loc[(spec.name, metric)]
            rows.append({"regime": opts["regime"], "seed": seed, "design": label, "metric": metric,
                         "experiment": spec.name, "effect": model.effect_, "se": model.se_,
                         "ci_low": model.ci_[0], "ci_high": model.ci_[1],
                         "true_effect": t["true_direct_effect"], "true_relative": t["true_relative_effect"], **found})
    return rows


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    r = results.assign(
        error_rel=results["relative_effect"] - results["true_relative"],
        covered_rel=(results["ci_low_rel"] <= results["true_relative"]) & (results["true_relative"] <= results["ci_high_rel"]),
        covered_abs=(results["ci_low"] <= results["true_effect"]) & (results["true_effect"] <= results["ci_high"]),
    )
    table = r.groupby(["regime", "design", "metric"], sort=False).agg(
        experiments=("seed", "size"), true_rel=("true_relative", "mean"), bias_rel=("error_rel", "mean"),
        emp_se_rel=("error_rel", "std"), mean_se_rel=("se_rel", "mean"), coverage_rel=("covered_rel", "mean"),
        coverage_abs=("covered_abs", "mean"),
    ).reset_index()
    table["goal_93_97"] = np.where((table["coverage_rel"] >= 0.93) & (table["coverage_rel"] <= 0.97), "ok", "MISSED")
    return table


def check_against_spark(opts: dict) -> None:
    """First differences of one world: the pandas twin equals the Spark path for every metric."""
    from pipelines.spark import get_spark

    world, labelled, assignments, sales, triggers, costs, _ = simulated((0, opts))
    specs = [s for _, s in labelled]
    designs = {s.name: s.design for s in specs}
    metrics = {s.name: list(s.all_metrics) for s in specs}
    twin = estimation.first_differences_pandas(sales, assignments, designs, metrics, catalog=world.catalog,
                                               events=triggers, unit_costs=costs)
    spark = get_spark(app_name="benchmark-metrics-check", conf={"spark.sql.shuffle.partitions": "2"})
    found = estimation.first_differences(
        spark.createDataFrame(sales), spark.createDataFrame(assignments.assign(date=pd.to_datetime(assignments["date"]).dt.date)),
        designs, metrics, catalog=spark.createDataFrame(world.catalog.astype({"is_private_label": bool})),
        events=spark.createDataFrame(triggers), unit_costs=spark.createDataFrame(costs)).toPandas()
    spark.stop()
    key = ["experiment", "metric", "product_id"]
    twin, found = (f.sort_values(key).reset_index(drop=True) for f in (twin, found))
    assert len(twin) == len(found), (len(twin), len(found))
    for column in ("first_difference", "treated_mean", "counterfactual_mean"):
        np.testing.assert_allclose(twin[column].to_numpy(float), found[column].to_numpy(float), rtol=1e-9, atol=1e-9)
    print(f"  first differences of one world ({len(found)} rows, {', '.join(METRICS)}): pandas twin == Spark path", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=100, help="worlds per regime")
    parser.add_argument("--per-design", type=int, default=2, help="experiments per design in each world")
    parser.add_argument("--products", type=int, default=100, help="products per experiment")
    parser.add_argument("--weeks", type=int, default=6)
    parser.add_argument("--price-change", type=float, default=-0.08)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--carryover", type=float, default=0.0)
    parser.add_argument("--regime", default="default,weak,no_substitutes")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-spark-check", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    params = " ".join(f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}") for k, v in vars(args).items()
                      if k not in ("out", "skip_spark_check") and v is not False)
    print(f"benchmarks/metrics.py {params}", flush=True)
    regimes = [r.strip() for r in args.regime.split(",") if r.strip()]
    base = {"per_design": args.per_design, "products": args.products, "weeks": args.weeks, "price_change": args.price_change,
            "bootstrap": args.bootstrap, "carryover": args.carryover}
    if not args.skip_spark_check:
        # a small world (4 experiments of 30 products): the equality does not depend on size, local Spark's heap does
        check_against_spark({**base, "regime": regimes[0], "per_design": 1, "products": 30})
    started = time.time()
    jobs = [(seed, {**base, "regime": regime}) for regime in regimes for seed in range(args.replications)]
    results = run_replications(replicate, jobs, args.workers, started, args.out)
    table = summarise(results)
    pd.set_option("display.width", 200)
    print()
    print(f"command: .venv/bin/python benchmarks/metrics.py {params}")
    print(f"{args.replications} worlds per regime, {args.per_design} experiments per design each ({args.products} products, "
          f"{args.weeks} weeks, price change {args.price_change:+.0%}, carryover {args.carryover}); estimator: DiD; "
          "relative interval (pipelines.metrics.relative_effect): between designs the jackknife of the ratio over randomisation "
          "units, switchback designs the effect's bootstrap SE with the products' level fixed")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
