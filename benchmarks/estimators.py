"""Statistical performance of the estimators (DiD, HPTE) and their peers on the market simulator, per design.

Each replication draws a fresh world (its own seed) of the chosen simulator regime (`--regime`,
`simulation.regime_config` once main has it), runs six experiments at once, one per category (so
they never share products or substitution edges), simulates the closed-loop sales, computes
first differences (`estimation.first_differences_pandas`, the same per-pool and per-product
functions as the Spark path; trigger events passed as known events) and fits both estimators;
the peers (FeedX, cluster-experiments, pyfixest: `benchmarks/peers.py`, installed by
`make bench-setup`) get the same experiment rows. Both pricelab estimators get the world's true
substitute groups as the clusters their bootstrap resamples whole (standing in for the
product_clusters snapshot; `--no-cluster-bootstrap` resamples randomisation units only). The truth is the simulator's
`true_direct_effect` for product units (a product's neighbours are equally often treated in
either arm, so spillover does not bias the comparison in expectation) and `true_global_effect`
for cluster units.

Designs: time_bound, triggered (21-day windows from the first competitor_discount), random_days,
crossover (21-day phases, 7 blackout days), crossover with no blackout, and a cluster-unit
crossover (the simulator's true substitute groups as clusters, 21-day phases, 7 blackout days).
Carryover follows `--carryover` (simulator default 0.5; 0 for the coverage targets); the table
shows the carryover left in the control days the analysis uses, which is what biases switchback
designs, and the share of experiments whose own data flagged it.

Assignments come from a pandas twin of `pipelines.assignment` (the Spark path costs seconds per
call); before the run the twin is checked row for row against the Spark functions on one world.
`--timing 10000,100000` times HPTE (B = --bootstrap) on that many products, with --trees trees
and with the pipeline's default number (`HPTEEstimator().n_estimators`), both cores (n_jobs=-1);
where the default `max_tree_rows` cap binds (100,000 products), also without it, in the same run.

    .venv/bin/python benchmarks/estimators.py [--replications 200] [--regime default,weak] [--carryover 0] [--workers 1]
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
    os.environ.setdefault(_threads, "1")  # one BLAS thread per worker: the workers are the parallelism

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers  # noqa: E402
from benchmarks.replications import read_partial, run_replications  # noqa: E402
from pipelines import assignment, estimation, simulation  # noqa: E402
from pipelines.experiments import ExperimentSpec  # noqa: E402

DESIGNS = (  # (label, design, category index, unit, extra spec fields)
    ("time_bound", "time_bound", 0, "product", {}),
    ("triggered", "triggered", 1, "product", {"trigger_event": simulation.TRIGGER_EVENT, "duration_days": 21}),
    ("random_days", "random_days", 2, "product", {}),
    ("crossover", "crossover", 3, "product", {"phase_days": 21, "blackout_days": 7}),
    ("crossover_no_blackout", "crossover", 4, "product", {"phase_days": 21, "blackout_days": 0}),
    ("crossover_cluster", "crossover", 5, "cluster", {"phase_days": 21, "blackout_days": 7}),
)
CATEGORIES = ("kitchen", "garden", "toys", "pets", "office", "books")  # one per design: no shared products or edges
ESTIMAND = {label: ("global" if unit == "cluster" else "direct") for label, _, _, unit, _ in DESIGNS}


def market_config(regime: str, **overrides) -> simulation.MarketConfig:
    """The simulator's regime (`simulation.regime_config` when main has it) with the benchmark's overrides."""
    overrides = {"categories": CATEGORIES, **overrides}
    if hasattr(simulation, "regime_config"):
        return simulation.regime_config(regime, **overrides)
    if regime != "default":
        raise SystemExit(f"--regime {regime}: this checkout's simulator has no regime_config (merge main); only 'default'")
    return simulation.MarketConfig(**overrides)


def true_clusters(world: simulation.MarketWorld) -> pd.DataFrame:
    """Cluster units of the benchmark: the simulator's true substitute groups (product_id, cluster_id)."""
    return pd.DataFrame({"product_id": world.products["product_id"].astype(str).to_numpy(),
                         "cluster_id": "G" + world.products["true_group"].astype(str).to_numpy()})


# ------------------------------------------------------------------------------------------------
# Assignments: pandas twin of pipelines.assignment (product units), checked against Spark
# ------------------------------------------------------------------------------------------------

def _first_group(spec: ExperimentSpec, units: pd.DataFrame, period: str) -> np.ndarray:
    """Balanced stratified draw for one period (`assignment.first_group_draws`, the rule's one home)."""
    return assignment.first_group_draws(spec.name, [spec.seed], units["unit_id"].to_numpy(), units["stratum"].to_numpy(),
                                        period, spec.treated_fraction)[0]


def pandas_assignments(spec: ExperimentSpec, catalog: pd.DataFrame, triggers: pd.DataFrame,
                       clusters: pd.DataFrame | None = None) -> pd.DataFrame:
    """Contract rows of `spec` (population = categories) for all its days; cluster units from
    `clusters` (product_id, cluster_id), each cluster's stratum its most common subclass."""
    enrolled = catalog[catalog["category"].isin(spec.population["categories"])]
    products = pd.DataFrame({"product_id": enrolled["product_id"].astype(str).to_numpy(),
                             "stratum": enrolled["subclass"].astype(str).to_numpy()})
    if spec.unit == "cluster":
        products["unit_id"] = products["product_id"].map(clusters.set_index("product_id")["cluster_id"])
        counts = products.groupby(["unit_id", "stratum"]).size().rename("n").reset_index()
        counts = counts.sort_values(["unit_id", "n", "stratum"], ascending=[True, False, True])
        products["stratum"] = products["unit_id"].map(counts.drop_duplicates("unit_id").set_index("unit_id")["stratum"])
    else:
        products["unit_id"] = products["product_id"]
    units = products[["unit_id", "stratum"]].drop_duplicates("unit_id").reset_index(drop=True)
    days = [spec.start + timedelta(days=i) for i in range(spec.n_days)]
    frames = []

    def by_product(unit_treated: np.ndarray) -> np.ndarray:
        return products["unit_id"].map(dict(zip(units["unit_id"], unit_treated))).to_numpy(bool)

    if spec.design in ("time_bound", "triggered"):
        treated = by_product(_first_group(spec, units, "experiment"))
        if spec.design == "triggered":
            events = triggers[(triggers["event"] == spec.trigger_event)].copy()
            events["date"] = pd.to_datetime(events["date"]).dt.date
            events = events[(events["date"] >= spec.start) & (events["date"] <= spec.end)]
            first = events.groupby("product_id")["date"].min()
        for day in days:
            frame = products.assign(date=day, treated=treated, blackout=False)
            if spec.design == "triggered":
                start = frame["product_id"].map(first)
                end = start.map(lambda s: min(s + timedelta(days=spec.duration_days - 1), spec.end) if pd.notna(s) else s)
                inside = start.notna() & (start <= day) & (end >= day)
                frame = frame[inside.to_numpy()]
            frames.append(frame)
    elif spec.design == "random_days":
        for day in days:
            frames.append(products.assign(date=day, treated=by_product(_first_group(spec, units, day.isoformat())), blackout=False))
    elif spec.design == "crossover":
        sequence_a = by_product(_first_group(spec, units, "sequence"))
        for day in days:
            offset = (day - spec.start).days
            even = (offset // spec.phase_days) % 2 == 0
            frames.append(products.assign(date=day, treated=sequence_a == even,
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
        ExperimentSpec(name=f"{label.replace('_', '-')}", design=design, start=start, end=end, unit=unit,
                       population={"categories": [config.categories[category]]}, treated_fraction=0.5,
                       price_change=price_change, metric="units", seed=seed * 10 + i, **extra)
        for i, (label, design, category, unit, extra) in enumerate(DESIGNS)
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
    clusters = true_clusters(world)
    clusters_sdf = spark.createDataFrame(clusters)
    for spec in specs:
        days = [spec.start + timedelta(days=i) for i in range(spec.n_days)]
        units = assignment.enrolment_units(spec, catalog_sdf, clusters_sdf if spec.unit == "cluster" else None)
        expected = assignment.assign_days(spec, units, days, triggers_sdf).toPandas()
        mine = pandas_assignments(spec, world.catalog, triggers, clusters)
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
    """One world, one experiment per design: pricelab's estimators, the peers and the truth."""
    seed, opts = job
    warnings.simplefilter("ignore")
    config = market_config(opts.get("regime", "default"), n_products=opts["products"], n_subclasses=opts["subclasses"],
                           seed=1000 + seed, carryover_decay=opts.get("carryover", simulation.MarketConfig().carryover_decay))
    world = simulation.simulate_market(config)
    specs = experiment_specs(config, seed, opts["price_change"], opts["weeks"])
    end = specs[0].end
    triggers = simulation.simulate_trigger_events(world, config.history_start, end)
    clusters = true_clusters(world)
    assignments = pd.concat([pandas_assignments(s, world.catalog, triggers, clusters) for s in specs], ignore_index=True)
    sales = simulation.simulate_sales(world, assignments, config.history_start, end)
    truth = simulation.true_effects(world, assignments).set_index("experiment")
    expected = simulation.expected_sales(world, assignments, specs[0].start, end)
    expected["date"] = pd.to_datetime(expected["date"])
    started = time.time()
    wanted = [s for label, s in zip((d[0] for d in DESIGNS), specs) if not opts.get("designs") or label in opts["designs"]]
    fds = estimation.first_differences_pandas(
        sales, assignments, {s.name: s.design for s in wanted}, catalog=world.catalog, events=triggers
    )
    fd_seconds = (time.time() - started) / len(wanted)
    rows = []
    for label, spec in zip((d[0] for d in DESIGNS), specs):
        if opts.get("designs") and label not in opts["designs"]:
            continue
        fd = fds[fds["experiment"] == spec.name]
        rows_of = assignments[(assignments["experiment"] == spec.name) & ~assignments["blackout"]]
        control_days = rows_of[rows_of["arm"] == "control"].assign(date=lambda f: pd.to_datetime(f["date"]))
        carry = control_days.merge(expected, on=["product_id", "date"])
        carryover = float((carry["expected_units"] * -np.expm1(-carry["own_log_effect"])).mean())
        truth_of = {"true_direct": truth.loc[spec.name, "true_direct_effect"],
                    "true_global": truth.loc[spec.name, "true_global_effect"]}
        truth_of["truth"] = truth_of["true_global" if ESTIMAND[label] == "global" else "true_direct"]
        base = {"seed": seed, "regime": opts.get("regime", "default"), "design": label, **truth_of,
                "carryover_control": carryover}
        started = time.time()
        blocks = clusters if opts.get("cluster_bootstrap", True) else None
        did = estimation.DiDEstimator(n_bootstrap=opts["bootstrap"], random_state=seed).fit(fd, blocks)
        did_seconds = time.time() - started + fd_seconds
        started = time.time()
        hpte = estimation.HPTEEstimator(n_bootstrap=opts["bootstrap"], trim_k=opts["trim_k"],
                                        n_estimators=opts["trees"], random_state=seed).fit(fd, world.catalog, blocks)
        hpte_seconds = time.time() - started + fd_seconds
        for name, model, seconds in (("did", did, did_seconds), ("hpte", hpte, hpte_seconds)):
            rows.append({
                **base, "estimator": name, "effect": model.effect_, "se": model.se_,
                "ci_low": model.ci_[0], "ci_high": model.ci_[1], "n_products": model.n_products_,
                "n_trimmed": getattr(model, "n_trimmed_", 0), "seconds": seconds,
                "counterfactual": estimation.counterfactual_summary(fd),
                "variance_reduction": model.variance_reduction_,
                **model.carryover_,
            })
        for name, found in peers.peer_estimates(spec, assignments, sales, triggers, opts.get("peers", [])).items():
            row = {**base, "estimator": name, "effect": np.nan, "se": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                   "note": "cannot handle this design"}
            if found is not None and "error" in found:
                row["note"] = found["error"]
            elif found is not None:
                row.update(found, note="")
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------

def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per regime, design and estimator: bias, empirical and reported SE, coverage and mean absolute
    error against the design's estimand (direct for product units, global for cluster units)."""
    results = results.assign(error=results["effect"] - results["truth"],
                             covered=(results["ci_low"] <= results["truth"]) & (results["truth"] <= results["ci_high"]))
    results["abs_error"] = results["error"].abs()
    for column in ("carryover_flag", "variance_reduction", "n_trimmed", "note"):
        if column not in results.columns:
            results[column] = np.nan
    results["carryover_flag"] = results["carryover_flag"].astype(float)
    estimated = results[results["effect"].notna()]
    table = estimated.groupby(["regime", "design", "estimator"], sort=False).agg(
        reps=("seed", "size"),
        truth=("truth", "mean"),
        bias=("error", "mean"),
        emp_se=("error", "std"),
        mean_se=("se", "mean"),
        coverage=("covered", "mean"),
        mae=("abs_error", "mean"),
        var_reduction=("variance_reduction", "mean"),
        carryover_flag=("carryover_flag", "mean"),
        carryover_ctrl=("carryover_control", "mean"),
    ).reset_index()
    table["bias/se"] = table["bias"] / table["emp_se"]
    missing = results[results["effect"].isna()].groupby(["regime", "design", "estimator"], sort=False)["note"].first()
    extra = [{"regime": r, "design": d, "estimator": e, "reps": 0, "note": note} for (r, d, e), note in missing.items()
             if not ((table["regime"] == r) & (table["design"] == d) & (table["estimator"] == e)).any()]
    table["note"] = ""
    table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True) if extra else table
    order = {d[0]: i for i, d in enumerate(DESIGNS)}
    table["_design"] = table["design"].map(order)
    return table.sort_values(["regime", "_design"], kind="stable").drop(columns="_design").reset_index(drop=True)


def goals(table: pd.DataFrame, results: pd.DataFrame, carryover: float) -> list[str]:
    """Issue 18's targets, measured: HPTE's mean SE against the best peer's, coverage, bias, flags."""
    lines = []
    peer_rows = table[table["estimator"].isin(peers.PEERS) & (table["reps"] > 0)]
    for (regime, design), rows in table.groupby(["regime", "design"], sort=False):
        hpte = rows[rows["estimator"] == "hpte"]
        if hpte.empty:
            continue
        hpte = hpte.iloc[0]
        peer = peer_rows[(peer_rows["regime"] == regime) & (peer_rows["design"] == design)]
        target = 0.85 if design == "time_bound" else 0.95
        text = f"  {regime:8s} {design:22s}"
        if len(peer):
            best = peer.loc[peer["mean_se"].idxmin()]
            ratio = hpte["mean_se"] / best["mean_se"]
            text += (f" SE hpte/best peer ({best['estimator']}) {ratio:.3f} ({'ok' if ratio <= target else 'MISSED'} <= {target})"
                     f"  emp-SE ratio {hpte['emp_se'] / best['emp_se']:.3f}")
        cover_ok = 0.93 <= hpte["coverage"] <= 0.97
        bias_ok = abs(hpte["bias/se"]) < 0.2
        text += (f"  coverage {hpte['coverage']:.3f} ({'ok' if cover_ok else 'MISSED'} 0.93-0.97)"
                 f"  |bias|/SE {abs(hpte['bias/se']):.2f} ({'ok' if bias_ok else 'MISSED'} < 0.2)")
        if design in ("random_days", "crossover_no_blackout"):
            text += (f"  carryover flag rate {hpte['carryover_flag']:.3f} (true carryover on analysed control days "
                     f"{hpte['carryover_ctrl']:.3f} units)")
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--products", type=int, default=1200, help="products per world (a sixth per design)")
    parser.add_argument("--subclasses", type=int, default=24)
    parser.add_argument("--weeks", type=int, default=6, help="experiment length")
    parser.add_argument("--price-change", type=float, default=-0.08)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--trim-k", type=float, default=2.0)
    parser.add_argument("--carryover", type=float, default=simulation.MarketConfig().carryover_decay,
                        help="carryover decay per day in the simulated worlds (0 = none)")
    parser.add_argument("--regime", default="default",
                        help="simulator regime(s), comma-separated (simulation.REGIMES: default, weak, no_substitutes)")
    parser.add_argument("--designs", default="", help="comma list of design labels to run (default: all)")
    parser.add_argument("--peers", default="all", help="'all' (those installed: make bench-setup), 'none', or a comma list")
    parser.add_argument("--timing", default="", help="comma list of product counts to time HPTE on (B = --bootstrap), e.g. 10000,100000")
    parser.add_argument("--no-cluster-bootstrap", action="store_true",
                        help="resample randomisation units only (default: the true substitute groups whole)")
    parser.add_argument("--skip-assignment-check", action="store_true")
    parser.add_argument("--out", default="", help="optional CSV of per-replication rows (appended to OUT.partial as they come)")
    parser.add_argument("--table-from", default="",
                        help="print the table of an earlier run's rows (OUT, or OUT.partial of a stopped run) and exit")
    args = parser.parse_args(argv)
    chosen_peers = (peers.available_peers() if args.peers == "all" else [] if args.peers == "none"
                    else [p.strip() for p in args.peers.split(",") if p.strip()])
    params = " ".join(f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}") for k, v in vars(args).items()
                      if k not in ("out", "skip_assignment_check", "table_from") and v is not False)
    if args.table_from:
        path = args.table_from
        results = read_partial(path[: -len(".partial")]) if path.endswith(".partial") else pd.read_csv(path)
        print(f"rows of {path}: {results['seed'].nunique()} worlds; the run's own settings, not this command's, made them")
        print_report(results, args, f"--table-from {path}", time.time())
        return 0
    print(f"benchmarks/estimators.py {params}", flush=True)
    print(f"peers: {', '.join(chosen_peers) or 'none'}", flush=True)
    if args.timing:
        tree_counts = sorted({args.trees, estimation.HPTEEstimator().n_estimators})  # the benchmark's and the pipeline's
        for n in [int(v) for v in args.timing.split(",") if v]:
            for trees in tree_counts:
                print(time_hpte(n, args.bootstrap, trees), flush=True)
            if estimation.HPTEEstimator()._tree_sample(n // 2) != estimation.TREE_SAMPLE_SHARE:  # the cap binds: time without it too
                print(time_hpte(n, args.bootstrap, estimation.HPTEEstimator().n_estimators, max_tree_rows=None), flush=True)
        if args.replications == 0:
            return 0
    regimes = [r.strip() for r in args.regime.split(",") if r.strip()]
    if not args.skip_assignment_check:
        config = market_config(regimes[0], n_products=args.products, n_subclasses=args.subclasses, seed=1000)
        check_assignments_against_spark(config, experiment_specs(config, 0, args.price_change, args.weeks))
    started = time.time()
    jobs = [(seed, {"products": args.products, "subclasses": args.subclasses, "weeks": args.weeks,
                    "price_change": args.price_change, "bootstrap": args.bootstrap, "trees": args.trees,
                    "trim_k": args.trim_k, "carryover": args.carryover, "regime": regime, "peers": chosen_peers,
                    "cluster_bootstrap": not args.no_cluster_bootstrap,
                    "designs": [d.strip() for d in args.designs.split(",") if d.strip()]})
            for regime in regimes for seed in range(args.replications)]
    results = run_replications(replicate, jobs, args.workers, started, args.out)
    print_report(results, args, params, started)
    return 0


def print_report(results: pd.DataFrame, args: argparse.Namespace, params: str, started: float) -> None:
    """The table, the counterfactuals chosen, the timing and the goals of one run's rows."""
    table = summarise(results)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    pd.set_option("display.max_colwidth", 60)
    print()
    print(f"command: .venv/bin/python benchmarks/estimators.py {params}")
    if not args.table_from:
        print(f"worlds: {args.products} products ({args.products // len(DESIGNS)} per design), {args.subclasses} subclasses, "
              f"{args.weeks}-week experiments, price change {args.price_change:+.0%}, carryover_decay {args.carryover}; "
              f"crossovers: 21-day phases; crossover_cluster randomises the simulator's true substitute groups")
    print("estimand: bias, coverage, emp_se and mae are against the TRUE DIRECT effect for product units and the TRUE "
          "GLOBAL effect for crossover_cluster (units per analysis product-day)")
    print("columns: emp_se = sd(estimate - truth); mean_se = mean reported SE; coverage = share of 95% intervals holding "
          "the truth; mae = mean |estimate - truth|; var_reduction = regression adjustment's variance reduction; "
          "carryover_flag = share of experiments flagged; carryover_ctrl = true carryover (units) on analysed control days")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    hpte = results[results["estimator"] == "hpte"]
    chosen = hpte.groupby(["regime", "design"], sort=False)["counterfactual"].agg(lambda v: pd.Series(
        [part.split(" (")[0] for text in v for part in str(text).split(", ")]).value_counts().head(3).to_dict())
    print("\ncounterfactual chosen by back-test (pools, top 3, over all replications):")
    for (regime, design), counts in chosen.items():
        print(f"  {regime:8s} {design:22s} {counts}")
    seconds = results[results["estimator"].isin(["did", "hpte"])].groupby("estimator")["seconds"].mean()
    print(f"\nmean seconds per experiment (first differences + estimator): {seconds.round(2).to_dict()}")
    print("\ngoals (HPTE):")
    for line in goals(table, results, args.carryover):
        print(line)
    print(f"total {time.time() - started:.0f} s")


def time_hpte(n_products: int, n_bootstrap: int, n_trees: int, **settings) -> str:
    """Seconds HPTE takes (fit: adjustment, filter, cross-fitted forest, bootstrap) on synthetic first differences."""
    rng = np.random.default_rng(0)
    level = rng.lognormal(np.log(15), 0.7, n_products)
    arm = np.where(rng.random(n_products) < 0.5, "treatment", "control")
    fd = pd.DataFrame({
        "experiment": "timing", "product_id": [f"P{i:07d}" for i in range(n_products)], "arm": arm,
        "first_difference": 0.1 * level * (arm == "treatment") + rng.normal(0, 1, n_products) * np.sqrt(level),
        "counterfactual_mean": level, "pre_mean": level * rng.lognormal(0, 0.1, n_products), "pre_sd": np.sqrt(level),
        "pre_trend": rng.normal(0, 1, n_products), "n_pre_days": 365, "recent_mean": level, "placebo": rng.normal(0, 1, n_products),
    })
    fd["unit_id"] = fd["product_id"]
    catalog = pd.DataFrame({"product_id": fd["product_id"], "brand_tier": rng.choice(["a", "b", "c"], n_products),
                            "pack_size": rng.integers(1, 13, n_products), "rating": rng.uniform(3, 5, n_products)})
    started = time.time()
    model = estimation.HPTEEstimator(n_bootstrap=n_bootstrap, n_estimators=n_trees, random_state=0, **settings).fit(fd, catalog)
    return (f"timing: HPTE on {n_products} products, B = {n_bootstrap}, {n_trees} trees, max_tree_rows {model.max_tree_rows}, "
            f"n_jobs {model.n_jobs}: {time.time() - started:.1f} s (effect {model.effect_:.4f}, SE {model.se_:.4f})")


if __name__ == "__main__":
    sys.exit(main())
