"""Design advisor against the simulator's closed loop (issue 17): predicted vs realised SE, A/A
rejection rates, carryover detection, speed.

`--regime R` (one of pipelines.simulation.REGIMES): one world of that regime (carryover off);
five cells, each a proposal on its own category so the closed-loop runs share one simulation:
time_bound/product, triggered/product, random_days/product, crossover/product (14-day phases,
3 blackout days) and time_bound/cluster (the simulator's true substitute groups as clusters).
The advisor predicts each cell from the world's history (`--replays` A/A replays, calibrated on
`--calibration` replays of the real estimator). Then each design is actually run `--runs` times
after the history (seeds 1..runs; arms from `pipelines.assignment.assign_days`, one Spark job per
cell; sales from `simulation.simulate_sales` in closed loop; the real `first_differences_pandas`
+ `DiDEstimator` with the true clusters as bootstrap blocks, as benchmarks/estimators.py does).
Between designs use the exact fast path of benchmarks/spillover.py (a between first difference
moves by exactly the change of the product's window mean; checked against the full computation on
the first run); switchback designs recompute the full first differences on the first
`--switchback-runs` runs only (CPU budget) -- the table says how many runs each realised SE has.

`--carryover-worlds N`: N worlds with carryover 0.5 and N with 0 (regimes cycling), each history
holding a past random_days experiment; counts how often the advisor's blackout is >= 3 (the true
half-life, 1 day, x 3) and how often it is 0.

`--speed`: one proposal (every design and unit, 8 candidates) over 1,000 products with a year of
history, `--replays` replays each: wall time.

    .venv/bin/python benchmarks/advisor.py --regime weak [--replays 200 --runs 200 --switchback-runs 40]
    .venv/bin/python benchmarks/advisor.py --carryover-worlds 30
    .venv/bin/python benchmarks/advisor.py --speed
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

from pipelines import advisor, assignment, estimation, simulation  # noqa: E402
from pipelines.experiments import ExperimentSpec  # noqa: E402

CELLS = (  # label, design, unit, category index, extra
    ("time_bound/product", "time_bound", "product", 0, {}),
    ("triggered/product", "triggered", "product", 1, {"trigger_event": simulation.TRIGGER_EVENT, "duration_days": 21}),
    ("random_days/product", "random_days", "product", 2, {}),
    ("crossover/product", "crossover", "product", 3, {"phase_days": 14, "blackout_days": 3}),
    ("time_bound/cluster", "time_bound", "cluster", 4, {}),
)


def true_clusters(world) -> pd.DataFrame:
    return pd.DataFrame({"product_id": world.products["product_id"].astype(str).to_numpy(),
                         "cluster_id": "G" + world.products["true_group"].astype(str).to_numpy()})


def cell_spec(config, label, design, unit, category, extra, seed, weeks=6) -> ExperimentSpec:
    first_day = config.history_end + timedelta(days=1)
    start = first_day + timedelta(days=(7 - first_day.weekday()) % 7)
    return ExperimentSpec(name=label.replace("/", "-").replace("_", "-"), design=design, start=start,
                          end=start + timedelta(days=7 * weeks - 1), unit=unit,
                          population={"categories": [config.categories[category]]}, price_change=-0.05,
                          seed=seed, source="benchmark", **extra)


def seeded_assignments(spark, spec: ExperimentSpec, catalog: pd.DataFrame, clusters: pd.DataFrame,
                       triggers: pd.DataFrame, seeds: list[int]) -> dict[int, pd.DataFrame]:
    """Contract rows of `spec` under each seed, from `assignment.assign_days` (one job: the spec is
    drawn per seed by giving each seed's units their own ids, '<seed>|<unit>')."""
    catalog_sdf = spark.createDataFrame(catalog[["product_id", "category", "subclass"]].astype(str))
    clusters_sdf = spark.createDataFrame(clusters) if spec.unit == "cluster" else None
    units = assignment.enrolment_units(spec, catalog_sdf, clusters_sdf).toPandas()
    frames = []
    for s in seeds:
        frames.append(pd.DataFrame({"product_id": f"{s}|" + units["product_id"], "unit_id": f"{s}|" + units["unit_id"],
                                    "stratum": f"{s}|" + units["stratum"]}))
    replayed = spark.createDataFrame(pd.concat(frames, ignore_index=True))
    events = None
    if spec.design == "triggered":
        t = triggers[triggers["product_id"].isin(set(units["product_id"]))]
        events = spark.createDataFrame(pd.concat([t.assign(product_id=f"{s}|" + t["product_id"]) for s in seeds], ignore_index=True)
                                       .assign(date=lambda f: pd.to_datetime(f["date"])))
    days = [spec.start + timedelta(days=i) for i in range(spec.n_days)]
    rows = assignment.assign_days(spec, replayed, days, events).toPandas()
    seed_of = rows["product_id"].str.split("|", n=1).str[0].astype(int)
    rows["product_id"] = rows["product_id"].str.split("|", n=1).str[1]
    rows["unit_id"] = rows["unit_id"].str.split("|", n=1).str[1]
    rows["date"] = pd.to_datetime(rows["date"]).dt.date
    return {s: part.reset_index(drop=True) for s, part in rows.groupby(seed_of)}


def fast_fd(base: pd.DataFrame, base_window_mean: pd.Series, window_sales: pd.DataFrame, a: pd.DataFrame) -> pd.DataFrame:
    window = window_sales.merge(a[["product_id", "date"]].assign(date=lambda f: pd.to_datetime(f["date"])),
                                on=["product_id", "date"])
    shift = base["product_id"].map(window.groupby("product_id")["units"].mean()).to_numpy() - base["product_id"].map(base_window_mean).to_numpy()
    arm = a.drop_duplicates("product_id").set_index("product_id")["arm"]
    return base.assign(first_difference=base["first_difference"].to_numpy() + shift, arm=base["product_id"].map(arm).to_numpy())


def _window_mean(window_sales: pd.DataFrame, a: pd.DataFrame) -> pd.Series:
    window = window_sales.merge(a[["product_id", "date"]].assign(date=lambda f: pd.to_datetime(f["date"])), on=["product_id", "date"])
    return window.groupby("product_id")["units"].mean()


def run_regime(spark, regime: str, opts) -> pd.DataFrame:
    started = time.time()
    config = simulation.regime_config(regime, n_products=opts.products, n_subclasses=opts.subclasses, seed=opts.world_seed,
                                      carryover_decay=0.0)
    world = simulation.simulate_market(config)
    history, _ = simulation.simulate_history(world)
    specs = [cell_spec(config, *cell, seed=1) for cell in CELLS]
    triggers = simulation.simulate_trigger_events(world, config.history_start, specs[0].end)
    clusters = true_clusters(world)
    edges = world.true_edges.rename(columns={"cross_elasticity": "weight"})
    inputs = advisor.AdviceInputs(history, world.catalog, clusters, edges, triggers)
    hist = advisor.build_history(history, world.catalog)
    predictions = {}
    for (label, *_), spec in zip(CELLS, specs):
        proposal = advisor.Proposal(name=spec.name, source="benchmark", candidates=(spec,))
        table, evidence = advisor.advise(spark, proposal, inputs, opts.replays, opts.calibration, opts.calibration_products,
                                         history=hist)
        predictions[label] = table.iloc[0]
        print(f"  [{time.time() - started:5.0f}s] advised {label}: predicted SE {table['predicted_se'].iloc[0]:.4f}, "
              f"A/A {table['aa_rejection_rate'].iloc[0]:.3f}", flush=True)
    seeds = list(range(1, opts.runs + 1))
    assigned = {label: seeded_assignments(spark, spec, world.catalog, clusters, triggers, seeds)
                for (label, *_), spec in zip(CELLS, specs)}
    print(f"  [{time.time() - started:5.0f}s] assignments of {opts.runs} runs x {len(CELLS)} cells", flush=True)
    results = {label: [] for label, *_ in CELLS}
    base = {}
    for s in seeds:
        a_all = pd.concat([assigned[label][s] for label, *_ in CELLS], ignore_index=True)
        window_sales = simulation.simulate_sales(world, a_all, specs[0].start, specs[0].end)
        window_sales["date"] = pd.to_datetime(window_sales["date"])
        truth = simulation.true_effects(world, a_all).set_index("experiment")
        for (label, design, unit, *_), spec in zip(CELLS, specs):
            a = assigned[label][s]
            switchback = design in estimation.SWITCHBACK_DESIGNS
            if switchback and s > opts.switchback_runs:
                continue
            if switchback or label not in base or not opts.fast_between:
                sales = pd.concat([history, window_sales], ignore_index=True)
                fd = estimation.first_differences_pandas(sales, a, {spec.name: design}, catalog=world.catalog, events=triggers)
                if not switchback:
                    base[label] = (fd, _window_mean(window_sales, a))
            else:
                fd = fast_fd(*base[label], window_sales, a)
                if s == 2:  # the fast path must reproduce the full computation
                    full = estimation.first_differences_pandas(pd.concat([history, window_sales], ignore_index=True), a,
                                                               {spec.name: design}, catalog=world.catalog, events=triggers)
                    merged = fd.merge(full[["product_id", "first_difference"]], on="product_id", suffixes=("", "_full"))
                    np.testing.assert_allclose(merged["first_difference"], merged["first_difference_full"], rtol=1e-8, atol=1e-8)
            model = estimation.DiDEstimator(n_bootstrap=opts.bootstrap, random_state=s).fit(fd, clusters)
            key = "true_global_effect" if unit == "cluster" else "true_direct_effect"
            results[label].append({"effect": model.effect_, "se": model.se_, "truth": truth.loc[spec.name, key]})
        if s % 20 == 0:
            print(f"  [{time.time() - started:5.0f}s] {s}/{opts.runs} closed-loop runs", flush=True)
    rows = []
    for label, *_ in CELLS:
        r = pd.DataFrame(results[label])
        p = predictions[label]
        realised = float((r["effect"] - r["truth"]).std(ddof=1))
        rows.append({
            "regime": regime, "cell": label, "replays": int(p["replays"]), "predicted_se": p["predicted_se"],
            "fast_se": p["fast_se"], "calibration": p["calibration_ratio"], "runs": len(r), "realised_se": realised,
            "ratio": p["predicted_se"] / realised, "within_20pct": abs(p["predicted_se"] / realised - 1) <= 0.2,
            "mean_reported_se": r["se"].mean(), "aa_rate": p["aa_rejection_rate"], "aa_in_3_7": 0.03 <= p["aa_rejection_rate"] <= 0.07,
            "realised_rejection": float((np.abs(r["effect"] - r["truth"]) > 1.959964 * r["se"]).mean()),
            "mde_rel": p["mde_rel"], "n_units": int(p["n_units"]), "n_products": int(p["n_products"]),
        })
    print(f"  [{time.time() - started:5.0f}s] regime {regime} done", flush=True)
    return pd.DataFrame(rows)


def carryover_worlds(spark, n: int) -> pd.DataFrame:
    rows = []
    regimes = list(simulation.REGIMES)
    for i in range(n):
        for rho in (0.5, 0.0):
            config = simulation.regime_config(regimes[i % len(regimes)], n_products=300, n_subclasses=12,
                                              carryover_decay=rho, history_days=240, seed=500 + i)
            world = simulation.simulate_market(config)
            start = config.history_start + timedelta(days=60)
            past = ExperimentSpec(name="past", design="random_days", start=start, end=start + timedelta(days=41),
                                  population={"categories": list(config.categories[:2])}, price_change=-0.1, seed=i)
            catalog_sdf = spark.createDataFrame(world.catalog[["product_id", "category", "subclass"]].astype(str))
            units = assignment.enrolment_units(past, catalog_sdf, None)
            a = assignment.assign_days(past, units, [start + timedelta(days=d) for d in range(past.n_days)]).toPandas()
            sales = simulation.simulate_sales(world, a, config.history_start, config.history_end)
            found = advisor.carryover_from_history(advisor.build_history(sales, world.catalog, past_assignments=a))
            rows.append({"world": i, "regime": config_name(config, regimes), "rho": rho, "rho_hat": found["rho"],
                         "rho_high": found["rho_high"], "carryover_days": found["carryover_days"],
                         "blackout": found["blackout_days"], "events": found["n_events"]})
    return pd.DataFrame(rows)


def config_name(config, regimes) -> str:
    for name in regimes:
        if simulation.REGIMES[name].baseline_units_median == config.baseline_units_median and \
                simulation.REGIMES[name].group_edge_prob == config.group_edge_prob:
            return name
    return "?"


def speed(spark, replays: int) -> None:
    config = simulation.regime_config("default", n_products=1000, carryover_decay=0.0)
    world = simulation.simulate_market(config)
    history, triggers = simulation.simulate_history(world)
    raw = {"name": "speed", "start": str(config.history_end + timedelta(days=7)),
           "end": str(config.history_end + timedelta(days=48)), "treatment": {"price_change": -0.05}, "seed": 1,
           "trigger_event": simulation.TRIGGER_EVENT, "phase_days": 14}
    proposal = advisor.parse_proposal_mapping(raw, "speed.yaml")
    started = time.time()
    table, evidence = advisor.advise(spark, proposal, advisor.AdviceInputs(
        history, world.catalog, true_clusters(world), world.true_edges.rename(columns={"cross_elasticity": "weight"}), triggers),
        n_replays=replays)
    seconds = time.time() - started
    print(pd.DataFrame(evidence["seconds"]).round(1).to_string(index=False))
    print(f"speed: {len(table)} candidates x {replays} replays, 1000 products, {config.history_days} days of history: "
          f"{seconds:.0f} s wall (goal <= 300 s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", default="")
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=3)
    parser.add_argument("--calibration-products", type=int, default=200)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--switchback-runs", type=int, default=40)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--products", type=int, default=750)
    parser.add_argument("--subclasses", type=int, default=30)
    parser.add_argument("--world-seed", type=int, default=42)
    parser.add_argument("--carryover-worlds", type=int, default=0)
    parser.add_argument("--fast-between", action="store_true",
                        help="between designs by the linear fast path (its check fails after the estimation changes of issue 16: off by default)")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--out", default="")
    opts = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from pipelines.spark import get_spark

    spark = get_spark(app_name="benchmark-advisor", conf={"spark.sql.shuffle.partitions": "4"})
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    if opts.speed:
        speed(spark, opts.replays)
    if opts.carryover_worlds:
        found = carryover_worlds(spark, opts.carryover_worlds)
        on, off = found[found["rho"] > 0], found[found["rho"] == 0]
        print(found.groupby("rho")[["rho_hat", "rho_high", "carryover_days", "blackout"]].describe().T.round(3).to_string())
        print(f"carryover on (rho 0.5, true half-life 1 day): blackout >= 3 in {(on['blackout'] >= 3).sum()}/{len(on)} worlds")
        print(f"carryover off: blackout 0 in {(off['blackout'] == 0).sum()}/{len(off)} worlds")
        if opts.out:
            found.to_csv(opts.out.replace(".csv", "") + "_carryover.csv", index=False)
    if opts.regime:
        tables = []
        for regime in opts.regime.split(","):
            tables.append(run_regime(spark, regime, opts))
            table = pd.concat(tables, ignore_index=True)
            print(table.round(4).to_string(index=False), flush=True)
            if opts.out:
                table.to_csv(opts.out, index=False)
        print(f"predicted SE within +-20% of realised: {int(table['within_20pct'].sum())}/{len(table)} cells; "
              f"A/A rate in [3%, 7%]: {int(table['aa_in_3_7'].sum())}/{len(table)} cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
