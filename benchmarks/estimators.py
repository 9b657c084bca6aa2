"""Statistical performance of the estimators (DiD, HPTE) on the market simulator, per design.

Each replication draws a fresh small world (its own seed), runs five experiments at once, one per
category (so they never share products or substitution edges), simulates the closed-loop sales,
computes first differences (`estimation.first_differences_pandas`, the same per-pool and
per-product functions as the Spark path), and fits both estimators. The truth is the simulator's
`true_direct_effect` (same-day effect of treatment, per analysis product-day): randomisation is
by product, so a product's neighbours are equally often treated in either arm and spillover does
not bias the comparison in expectation; the global effect is printed beside it for reference.

Designs: time_bound, triggered (21-day windows from the first competitor_discount), random_days,
crossover (14-day phases, 7 blackout days) and crossover with no blackout. Carryover is on
(`carryover_decay` of the simulator); the table shows the carryover left in the control days the
analysis uses, which is what biases switchback designs.

Assignments come from a pandas twin of `pipelines.assignment` (the Spark path costs seconds per
call); before the run the twin is checked row for row against the Spark functions on one world.

    .venv/bin/python benchmarks/estimators.py [--replications 200] [--workers 2] [--products 1000]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")  # one BLAS thread per worker: the workers are the parallelism

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.replications import run_replications  # noqa: E402
from pipelines import estimation, simulation  # noqa: E402
from pipelines.experiments import ExperimentSpec  # noqa: E402

HASH_HEX_DIGITS, HASH_SCALE = 13, float(16**13)
DESIGNS = (  # (label, design, category index, extra spec fields)
    ("time_bound", "time_bound", 0, {}),
    ("triggered", "triggered", 1, {"trigger_event": simulation.TRIGGER_EVENT, "duration_days": 21}),
    ("random_days", "random_days", 2, {}),
    ("crossover", "crossover", 3, {"phase_days": 14, "blackout_days": 7}),
    ("crossover_no_blackout", "crossover", 4, {"phase_days": 14, "blackout_days": 0}),
)


# ------------------------------------------------------------------------------------------------
# Assignments: pandas twin of pipelines.assignment (product units), checked against Spark
# ------------------------------------------------------------------------------------------------

def _uniform(*parts) -> float:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:HASH_HEX_DIGITS], 16) / HASH_SCALE


def _first_group(spec: ExperimentSpec, units: pd.DataFrame, period: str) -> np.ndarray:
    """Balanced stratified draw for one period: True for the first n_t units of each stratum."""
    u = np.array([_uniform(spec.name, spec.seed, unit, period) for unit in units["unit_id"]])
    frame = units.assign(u=u).sort_values(["stratum", "u", "unit_id"])
    rank = frame.groupby("stratum").cumcount() + 1
    n_units = frame.groupby("stratum")["unit_id"].transform("size")
    quota = {s: _uniform(spec.name, spec.seed, s, period, "quota") for s in frame["stratum"].unique()}
    limit = np.floor(n_units * spec.treated_fraction + frame["stratum"].map(quota))
    return (rank <= limit).reindex(units.index).to_numpy()


def pandas_assignments(spec: ExperimentSpec, catalog: pd.DataFrame, triggers: pd.DataFrame) -> pd.DataFrame:
    """Contract rows of `spec` (product units, population = categories) for all its days."""
    enrolled = catalog[catalog["category"].isin(spec.population["categories"])]
    units = pd.DataFrame({"product_id": enrolled["product_id"].astype(str).to_numpy(),
                          "unit_id": enrolled["product_id"].astype(str).to_numpy(),
                          "stratum": enrolled["subclass"].astype(str).to_numpy()})
    days = [spec.start + timedelta(days=i) for i in range(spec.n_days)]
    frames = []
    if spec.design in ("time_bound", "triggered"):
        treated = _first_group(spec, units, "experiment")
        if spec.design == "triggered":
            events = triggers[(triggers["event"] == spec.trigger_event)].copy()
            events["date"] = pd.to_datetime(events["date"]).dt.date
            events = events[(events["date"] >= spec.start) & (events["date"] <= spec.end)]
            first = events.groupby("product_id")["date"].min()
        for day in days:
            frame = units.assign(date=day, treated=treated, blackout=False)
            if spec.design == "triggered":
                start = frame["product_id"].map(first)
                end = start.map(lambda s: min(s + timedelta(days=spec.duration_days - 1), spec.end) if pd.notna(s) else s)
                inside = start.notna() & (start <= day) & (end >= day)
                frame = frame[inside.to_numpy()]
            frames.append(frame)
    elif spec.design == "random_days":
        for day in days:
            frames.append(units.assign(date=day, treated=_first_group(spec, units, day.isoformat()), blackout=False))
    elif spec.design == "crossover":
        sequence_a = _first_group(spec, units, "sequence")
        for day in days:
            offset = (day - spec.start).days
            even = (offset // spec.phase_days) % 2 == 0
            frames.append(units.assign(date=day, treated=sequence_a == even,
                                       blackout=offset % spec.phase_days < spec.blackout_days))
    rows = pd.concat(frames, ignore_index=True)
    return pd.DataFrame({
        "date": rows["date"], "experiment": spec.name, "product_id": rows["product_id"], "unit_id": rows["unit_id"],
        "arm": np.where(rows["treated"], "treatment", "control"), "blackout": rows["blackout"].astype(bool),
        "price_change": np.where(rows["treated"], float(spec.price_change), 0.0),
    })


def experiment_specs(config: simulation.MarketConfig, seed: int, price_change: float, weeks: int) -> list[ExperimentSpec]:
    first_day = config.history_end + timedelta(days=1)
    start = first_day + timedelta(days=(7 - first_day.weekday()) % 7)
    end = start + timedelta(days=7 * weeks - 1)
    return [
        ExperimentSpec(name=f"{label.replace('_', '-')}", design=design, start=start, end=end, unit="product",
                       population={"categories": [config.categories[category]]}, treated_fraction=0.5,
                       price_change=price_change, metric="units", seed=seed * 10 + i, **extra)
        for i, (label, design, category, extra) in enumerate(DESIGNS)
    ]


def check_assignments_against_spark(config: simulation.MarketConfig, specs: list[ExperimentSpec]) -> None:
    """Assert that the pandas twin gives exactly the Spark assignment rows (one world, every design)."""
    from pipelines import assignment
    from pipelines.spark import get_spark

    world = simulation.simulate_market(config)
    spark = get_spark(app_name="benchmark-assignment-check", conf={"spark.sql.shuffle.partitions": "2"})
    triggers = simulation.simulate_trigger_events(world, config.history_start, specs[0].end)
    catalog_sdf = spark.createDataFrame(world.catalog.astype({"is_private_label": bool}))
    triggers_sdf = spark.createDataFrame(triggers)
    for spec in specs:
        days = [spec.start + timedelta(days=i) for i in range(spec.n_days)]
        units = assignment.enrolment_units(spec, catalog_sdf, None)
        expected = assignment.assign_days(spec, units, days, triggers_sdf).toPandas()
        mine = pandas_assignments(spec, world.catalog, triggers)
        key = ["date", "product_id"]
        expected = expected.sort_values(key).reset_index(drop=True)
        mine = mine.sort_values(key).reset_index(drop=True)
        expected["date"] = pd.to_datetime(expected["date"]).dt.date
        pd.testing.assert_frame_equal(mine[expected.columns], expected, check_dtype=False)
        print(f"  assignments of {spec.name} ({len(mine)} rows): pandas twin == pipelines.assignment", flush=True)
    spark.stop()  # free the JVM before the workers start


# ------------------------------------------------------------------------------------------------
# One replication
# ------------------------------------------------------------------------------------------------

def replicate(job: tuple[int, dict]) -> list[dict]:
    """One world, five experiments: estimates of both estimators and the truth, per design."""
    seed, opts = job
    warnings.simplefilter("ignore")
    config = simulation.MarketConfig(
        n_products=opts["products"], n_subclasses=opts["subclasses"], seed=1000 + seed,
        carryover_decay=opts.get("carryover", simulation.MarketConfig().carryover_decay),
    )
    world = simulation.simulate_market(config)
    specs = experiment_specs(config, seed, opts["price_change"], opts["weeks"])
    end = specs[0].end
    triggers = simulation.simulate_trigger_events(world, config.history_start, end)
    assignments = pd.concat([pandas_assignments(s, world.catalog, triggers) for s in specs], ignore_index=True)
    sales = simulation.simulate_sales(world, assignments, config.history_start, end)
    truth = simulation.true_effects(world, assignments).set_index("experiment")
    expected = simulation.expected_sales(world, assignments, specs[0].start, end)
    expected["date"] = pd.to_datetime(expected["date"])
    fds = estimation.first_differences_pandas(
        sales, assignments, {s.name: s.design for s in specs}, catalog=world.catalog
    )
    rows = []
    for label, spec in zip((d[0] for d in DESIGNS), specs):
        fd = fds[fds["experiment"] == spec.name]
        rows_of = assignments[(assignments["experiment"] == spec.name) & ~assignments["blackout"]]
        control_days = rows_of[rows_of["arm"] == "control"].assign(date=lambda f: pd.to_datetime(f["date"]))
        carry = control_days.merge(expected, on=["product_id", "date"])
        carryover = float((carry["expected_units"] * -np.expm1(-carry["own_log_effect"])).mean())
        did = estimation.DiDEstimator(n_bootstrap=opts["bootstrap"], random_state=seed).fit(fd)
        hpte = estimation.HPTEEstimator(n_bootstrap=opts["bootstrap"], trim_k=opts["trim_k"],
                                        n_estimators=opts["trees"], random_state=seed).fit(fd, world.catalog)
        for name, model in (("did", did), ("hpte", hpte)):
            rows.append({
                "seed": seed, "design": label, "estimator": name, "effect": model.effect_, "se": model.se_,
                "ci_low": model.ci_[0], "ci_high": model.ci_[1], "n_products": model.n_products_,
                "n_trimmed": getattr(model, "n_trimmed_", 0),
                "leaves_skipped": getattr(model, "n_leaves_skipped_", 0) / max(getattr(model, "n_leaves_", 1), 1),
                "true_direct": truth.loc[spec.name, "true_direct_effect"],
                "true_global": truth.loc[spec.name, "true_global_effect"],
                "carryover_control": carryover,
                "pooled_products": int((fd["model"] == "pooled").sum()),
            })
    return rows


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------

def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per design and estimator: bias vs the direct effect, empirical and reported SE, coverage."""
    results = results.assign(error=results["effect"] - results["true_direct"],
                             covered=(results["ci_low"] <= results["true_direct"]) & (results["true_direct"] <= results["ci_high"]))
    table = results.groupby(["design", "estimator"], sort=False).agg(
        reps=("seed", "size"),
        true_direct=("true_direct", "mean"),
        true_global=("true_global", "mean"),
        bias=("error", "mean"),
        emp_se=("error", "std"),
        mean_se=("se", "mean"),
        coverage=("covered", "mean"),
        trimmed=("n_trimmed", "mean"),
        skipped_leaves=("leaves_skipped", "mean"),
        carryover_ctrl=("carryover_control", "mean"),
        n_products=("n_products", "mean"),
    ).reset_index()
    table["bias_mc_se"] = table["emp_se"] / np.sqrt(table["reps"])
    table["bias/se"] = table["bias"] / table["emp_se"]
    table["se_ratio"] = table["mean_se"] / table["emp_se"]
    base = table[table["design"] == "time_bound"].set_index("estimator")["emp_se"]
    table["emp_se_vs_time_bound"] = table["emp_se"] / table["estimator"].map(base)
    base_reported = table[table["design"] == "time_bound"].set_index("estimator")["mean_se"]
    table["mean_se_vs_time_bound"] = table["mean_se"] / table["estimator"].map(base_reported)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--products", type=int, default=1000, help="products per world (a fifth per design)")
    parser.add_argument("--subclasses", type=int, default=20)
    parser.add_argument("--weeks", type=int, default=6, help="experiment length")
    parser.add_argument("--price-change", type=float, default=-0.08)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--trim-k", type=float, default=2.0)
    parser.add_argument("--carryover", type=float, default=simulation.MarketConfig().carryover_decay,
                        help="carryover decay per day in the simulated worlds (0 = none)")
    parser.add_argument("--skip-assignment-check", action="store_true")
    parser.add_argument("--out", default="", help="optional CSV of per-replication rows")
    args = parser.parse_args(argv)
    opts = {"products": args.products, "subclasses": args.subclasses, "weeks": args.weeks,
            "price_change": args.price_change, "bootstrap": args.bootstrap, "trees": args.trees, "trim_k": args.trim_k,
            "carryover": args.carryover}
    params = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "skip_assignment_check"))
    print(f"benchmarks/estimators.py {params}", flush=True)
    if not args.skip_assignment_check:
        config = simulation.MarketConfig(n_products=args.products, n_subclasses=args.subclasses, seed=1000)
        check_assignments_against_spark(config, experiment_specs(config, 0, args.price_change, args.weeks))
    started = time.time()
    jobs = [(seed, opts) for seed in range(args.replications)]
    results = run_replications(replicate, jobs, args.workers, started, args.out)
    table = summarise(results)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print()
    print(f"command: .venv/bin/python benchmarks/estimators.py {params}")
    print(f"worlds: {args.products} products ({args.products // 5} per design), {args.subclasses} subclasses, "
          f"{args.weeks}-week experiments, price change {args.price_change:+.0%}, product randomisation, "
          f"carryover_decay {args.carryover}")
    print("estimand: bias, coverage and empirical SE are against the simulator's TRUE DIRECT EFFECT "
          "(units per analysis product-day); true_global shown for reference")
    print("columns: emp_se = sd(estimate - truth); mean_se = mean bootstrap SE; coverage = share of 95% intervals "
          "holding the truth; carryover_ctrl = mean carryover (units) on the control days analysed; "
          "*_vs_time_bound = SE of the design / SE of time_bound (same estimator)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    hpte = table[table["estimator"] == "hpte"].set_index("design")
    did = table[table["estimator"] == "did"].set_index("design")
    print("\ngoals (HPTE):")
    for design, row in hpte.iterrows():
        print(f"  {design:22s} coverage {row['coverage']:.3f} ({'ok' if 0.93 <= row['coverage'] <= 0.97 else 'MISSED'} 0.93-0.97)"
              f"  |bias|/SE {abs(row['bias/se']):.2f} ({'ok' if abs(row['bias/se']) < 0.2 else 'MISSED'} < 0.2)"
              f"  SE hpte/did {row['emp_se'] / did.loc[design, 'emp_se']:.3f}"
              f" ({'lower' if row['emp_se'] < did.loc[design, 'emp_se'] else 'NOT lower'})")
    for design, target in (("random_days", "<= 0.40 (-60%)"), ("crossover", "<= 0.50-0.60 (-40..50%)")):
        if design in hpte.index:
            print(f"  SE {design}/time_bound: hpte {hpte.loc[design, 'emp_se_vs_time_bound']:.3f}, "
                  f"did {did.loc[design, 'emp_se_vs_time_bound']:.3f} (article: {target})")
    print(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
