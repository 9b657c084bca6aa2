"""Spillover bias and the spillover estimate: product- versus cluster-randomised time_bound designs.

Each world (a small market from the simulator, rebuilt every `--reps-per-world` replications)
gets its substitution graph and clusters LEARNED from its simulated history by the graph stage
(`graph.build_substitution_graph` + `clustering.cluster_products`, on Spark), never the
simulator's true groups. Each replication redraws the experiment seed and runs, on the whole
catalogue, one product-randomised and one cluster-randomised time_bound experiment (separately,
each in its own closed loop), then:
- the plain (DiD) and HPTE estimates (`pipelines.estimation`) against the simulator's
  `true_global_effect` (every product treated vs none): their bias is the spillover bias;
- `spillover.estimate_spillover` (exposure on the learned graph, probabilities from redrawing the
  design) against the simulator's `true_spillover_effect` (mean over control product-days of
  units as assigned minus with no neighbour treated).
- as a diagnosis (not a result), the same spillover estimate with exposures on the simulator's TRUE
  graph: the gap between the two is what the learned graph's missing edges cost.
`--exposure-fdr` maps exposures on a second graph learned at a looser false discovery rate
(clusters still come from the FDR 0.05 graph), to explore that trade-off.
Assignments come from `spillover.draw_arms` (the numpy twin of `assignment.assign_days`),
checked row for row against the Spark code on the first world of each design.

    .venv/bin/python benchmarks/spillover.py [--replications 200] [--workers 2] [--products 400]
        [--exposure-fdr 0.2 --exposure-min-corr 0.05]
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.replications import run_replications  # noqa: E402
from pipelines import estimation, simulation, spillover  # noqa: E402
from pipelines.experiments import ExperimentSpec  # noqa: E402

DESIGNS = ("product", "cluster")


# products / subclasses per regime when not given: the default market as in earlier runs (40 a
# subclass), the weak and no-substitute markets as the independent market was measured (800 in 32)
REGIME_SIZES = {"default": (400, 10), "weak": (800, 32), "no_substitutes": (800, 32)}


def world_config(opts: dict, world: int) -> simulation.MarketConfig:
    return simulation.regime_config(opts["regime"], n_products=opts["products"], n_subclasses=opts["subclasses"],
                                    seed=5000 + world, carryover_decay=0.1)


def make_spec(config: simulation.MarketConfig, unit: str, seed: int, opts: dict) -> ExperimentSpec:
    first_day = config.history_end + timedelta(days=1)
    start = first_day + timedelta(days=(7 - first_day.weekday()) % 7)
    return ExperimentSpec(name=f"spill-{unit}", design="time_bound", start=start,
                          end=start + timedelta(days=7 * opts["weeks"] - 1), unit=unit, treated_fraction=0.5,
                          price_change=opts["price_change"], metric="units", seed=seed)


def assignments_of(spec: ExperimentSpec, units: pd.DataFrame) -> pd.DataFrame:
    """Contract rows of a time_bound spec from the numpy draw (every day of the experiment)."""
    table, arms = spillover.draw_arms(spec, units, [spec.seed])
    treated = pd.Series(arms[0], index=table["unit_id"]).reindex(units["unit_id"].astype(str)).to_numpy()
    days = [spec.start + timedelta(days=i) for i in range(spec.n_days)]
    n = len(units)
    return pd.DataFrame({
        "date": np.repeat(np.array(days, dtype=object), n),
        "experiment": spec.name,
        "product_id": np.tile(units["product_id"].astype(str).to_numpy(), len(days)),
        "unit_id": np.tile(units["unit_id"].astype(str).to_numpy(), len(days)),
        "arm": np.tile(np.where(treated, "treatment", "control"), len(days)),
        "blackout": False,
        "price_change": np.tile(np.where(treated, spec.price_change, 0.0), len(days)),
    })


# ------------------------------------------------------------------------------------------------
# Phase 1 (Spark): learned graph and clusters per world
# ------------------------------------------------------------------------------------------------

def graph_free_worlds(opts: dict, n_worlds: int) -> dict:
    """Phase 1 without Spark, for `--forecast-only`: product randomisation needs no graph, and with
    `--cluster-source true` the clusters are the simulator's own substitute groups (an oracle
    stand-in for learned clusters: a diagnosis of the forecast estimate under cluster
    randomisation, not of the graph stage). The reported spillover estimate needs no graph."""
    worlds = {}
    for w in range(n_worlds):
        world = simulation.simulate_market(world_config(opts, w))
        sales, _ = simulation.simulate_history(world)
        ids = world.catalog["product_id"].astype(str)
        group = "group:" + ids.map(world.products.set_index("product_id")["true_group"].astype(str))
        unit_ids = {"product": ids, "cluster": group}
        units = {unit: spillover.units_from_catalog(pd.DataFrame({"product_id": ids, "unit_id": unit_ids[unit]}), world.catalog)
                 for unit in opts["designs"]}
        worlds[w] = {"units": units, "sales": sales, "info": {}}
    return worlds


def learn_worlds(opts: dict, n_worlds: int) -> dict:
    from pipelines import assignment, clustering, graph
    from pipelines.spark import get_spark

    spark = get_spark(app_name="benchmark-spillover", conf={"spark.sql.shuffle.partitions": "4"})
    worlds = {}
    for w in range(n_worlds):
        t0 = time.time()
        config = world_config(opts, w)
        world = simulation.simulate_market(config)
        sales, _ = simulation.simulate_history(world)
        spec = make_spec(config, "cluster", 0, opts)
        catalog_sdf = spark.createDataFrame(world.catalog)
        learned = graph.learn_substitution(spark.createDataFrame(sales), catalog_sdf, spec.start)
        edges_sdf, blocks = learned.edges.localCheckpoint(eager=True), learned.blocks
        edges = edges_sdf.toPandas()
        clusters_sdf = clustering.cluster_products(edges_sdf, catalog_sdf, max_cluster_size=opts["max_cluster"],
                                                   blocks=blocks).localCheckpoint(eager=True)
        metrics = clustering.cluster_metrics(edges_sdf, clusters_sdf)
        units = {unit: assignment.enrolment_units(make_spec(config, unit, 0, opts), catalog_sdf,
                                                  clusters_sdf if unit == "cluster" else None).toPandas()
                 for unit in opts["designs"]}
        if w == 0:  # the numpy draw must be the Spark draw, row for row
            for unit in opts["designs"]:
                spec_u = make_spec(config, unit, 12345, opts)
                days = [spec_u.start + timedelta(days=i) for i in range(spec_u.n_days)]
                expected = assignment.assign_days(spec_u, spark.createDataFrame(units[unit]), days).toPandas()
                mine = assignments_of(spec_u, units[unit])
                expected["date"] = pd.to_datetime(expected["date"]).dt.date
                key = ["date", "product_id"]
                pd.testing.assert_frame_equal(mine.sort_values(key).reset_index(drop=True)[list(expected.columns)],
                                              expected.sort_values(key).reset_index(drop=True), check_dtype=False)
                print(f"  {unit} randomisation: numpy draw == pipelines.assignment ({len(mine)} rows)", flush=True)
        true_pairs = set(zip(world.true_edges["src"], world.true_edges["dst"]))
        learned_pairs = set(zip(np.minimum(edges["src"], edges["dst"]), np.maximum(edges["src"], edges["dst"])))
        c = world.true_edges.set_index(["src", "dst"])["cross_elasticity"]
        found = [p in learned_pairs for p in c.index]
        clusters_pdf = clusters_sdf.toPandas()
        cluster_of = dict(zip(*clusters_pdf[["product_id", "cluster_id"]].T.to_numpy()))
        cut_true = np.array([cluster_of[a] != cluster_of[b] for a, b in c.index], dtype=bool)
        total = float(c.sum())
        info = {
            "true_edges": len(true_pairs), "learned_edges": len(learned_pairs),
            "recall_weight": float(c[found].sum() / total) if total else float("nan"),
            "precision": len(true_pairs & learned_pairs) / len(learned_pairs) if learned_pairs else float("nan"),
            "clusters": metrics["clusters"], "cluster_size_max": metrics["size_max"],
            "singleton_share": metrics["singletons"] / len(clusters_pdf),
            "blocks_whole": int(blocks["randomise_whole"].sum()), "blocks": len(blocks),
            "market_z": float(blocks["market_z"].iloc[0]),
            "cut_share_learned": metrics["cut_weight_share"],
            "cut_share_true": float(c[cut_true].sum() / total) if total else float("nan"),
        }
        exposure_edges = spillover.exposure_edges(edges, blocks, world.catalog)
        if opts["exposure_fdr"]:
            exposure_edges = graph.build_substitution_graph(spark.createDataFrame(sales), catalog_sdf, spec.start,
                                                            fdr=opts["exposure_fdr"], min_corr=opts["exposure_min_corr"]).toPandas()
            exposure_pairs = set(zip(np.minimum(exposure_edges["src"], exposure_edges["dst"]),
                                     np.maximum(exposure_edges["src"], exposure_edges["dst"])))
            found_x = [p in exposure_pairs for p in c.index]
            info.update(exposure_edges=len(exposure_pairs), exposure_recall_weight=float(c[found_x].sum() / c.sum()),
                        exposure_precision=len(true_pairs & exposure_pairs) / max(len(exposure_pairs), 1))
            print(f"  world {w}: exposure graph fdr {opts['exposure_fdr']}: {len(exposure_pairs)} edges, recall by cross "
                  f"elasticity {info['exposure_recall_weight']:.2f}, precision {info['exposure_precision']:.2f}", flush=True)
        worlds[w] = {"edges": edges[["src", "dst", "weight"]], "exposure_edges": exposure_edges[["src", "dst", "weight"]],
                     "units": units, "sales": sales, "info": info}
        print(f"  world {w}: {info['learned_edges']} learned edges ({info['true_edges']} true; recall by cross "
              f"elasticity {info['recall_weight']:.2f}, precision {info['precision']:.2f}), market pooled z "
              f"{info['market_z']:.1f}, {info['blocks_whole']}/{info['blocks']} blocks randomised whole, "
              f"{info['clusters']} clusters (max {info['cluster_size_max']:.0f}, singletons {info['singleton_share']:.2f}), "
              f"true cross elasticity cut by clusters {info['cut_share_true']:.2f}, {time.time() - t0:.0f} s", flush=True)
    spark.stop()
    return worlds


# ------------------------------------------------------------------------------------------------
# Phase 2 (numpy, workers): replications
# ------------------------------------------------------------------------------------------------

_WORLDS: dict = {}
_WORLD_FILE = ""
_BASE_FD: dict = {}  # (world, design) -> first differences of the first replication this worker ran


def first_differences_fast(base: pd.DataFrame, base_window_mean: pd.Series, window_sales: pd.DataFrame,
                           a: pd.DataFrame) -> pd.DataFrame:
    """`first_differences_pandas` without refitting: the pre-period (hence each product's
    counterfactual, known factors and chosen candidate) and the set of observed window rows do not
    depend on the assignment, and a between-design first difference is linear in the window's
    units, so it moves by exactly the change in the product's window mean of units. Checked
    against the full computation on each world's first replication in each worker."""
    window_mean = window_sales.groupby("product_id")["units"].mean()
    shift = base["product_id"].map(window_mean).to_numpy() - base["product_id"].map(base_window_mean).to_numpy()
    arm = a.drop_duplicates("product_id").set_index("product_id")["arm"]
    return base.assign(first_difference=base["first_difference"].to_numpy() + shift,
                       arm=base["product_id"].map(arm).to_numpy())


def _world(w: int, opts: dict):
    if w not in _WORLDS:
        with open(os.path.join(_WORLD_FILE, f"world{w}.pkl"), "rb") as f:
            learned = pickle.load(f)
        _WORLDS.clear()
        _WORLDS[w] = (simulation.simulate_market(world_config(opts, w)), learned)
    return _WORLDS[w]


class _Skipped:
    effect_ = np.nan


_SKIPPED_HPTE = _Skipped()
_SKIPPED_IPW = {"spillover_effect": np.nan, "spillover_se": np.nan, "message": "skipped (--forecast-only)",
                "spillover_effect_ht": np.nan, "spillover_se_ht": np.nan, "global_effect_hajek": np.nan,
                "n_stabilised": np.nan, "exposure_counts": {k: np.nan for k in spillover.CONDITIONS}}


def replicate(job: tuple[int, dict]) -> list[dict]:
    rep, opts = job
    warnings.simplefilter("ignore")
    w = rep // opts["reps_per_world"]
    world, learned = _world(w, opts)
    rows = []
    for unit in opts["designs"]:
        spec = make_spec(world.config, unit, 100_000 + rep, opts)
        units = learned["units"][unit]
        a = assignments_of(spec, units)
        window_sales = simulation.simulate_sales(world, a, spec.start, spec.end)
        truth = simulation.true_effects(world, a).set_index("experiment").loc[spec.name]
        if (w, unit) not in _BASE_FD:
            sales = pd.concat([learned["sales"], window_sales], ignore_index=True)
            fd = estimation.first_differences_pandas(sales, a, {spec.name: spec.design}, catalog=world.catalog)
            _BASE_FD[(w, unit)] = (fd, window_sales.groupby("product_id")["units"].mean())
            if w == 0:  # the fast path must reproduce the full computation on a second draw
                a_other = assignments_of(make_spec(world.config, unit, 100_000 + rep + 1, opts), units)
                other_sales = simulation.simulate_sales(world, a_other, spec.start, spec.end)
                full = estimation.first_differences_pandas(pd.concat([learned["sales"], other_sales], ignore_index=True),
                                                           a_other, {spec.name: spec.design}, catalog=world.catalog)
                fast = first_differences_fast(*_BASE_FD[(w, unit)], other_sales, a_other)
                np.testing.assert_allclose(fast["first_difference"], full["first_difference"], rtol=1e-9, atol=1e-9)
                assert (fast["arm"] == full["arm"]).all()
        else:
            fd = first_differences_fast(*_BASE_FD[(w, unit)], window_sales, a)
        did = estimation.DiDEstimator(n_bootstrap=opts["bootstrap"], random_state=rep).fit(fd)
        if opts["forecast_only"]:  # the reported estimate only: no HPTE, no IPW (their redraws dominate the time)
            hpte, spill, oracle = _SKIPPED_HPTE, _SKIPPED_IPW, _SKIPPED_IPW
        else:
            hpte = estimation.HPTEEstimator(n_bootstrap=opts["bootstrap"], n_estimators=opts["trees"],
                                            random_state=rep).fit(fd, world.catalog)
            spill = spillover.estimate_spillover(fd, a, learned["exposure_edges"], spec, units=units, n_redraws=opts["redraws"])
            # diagnosis: the same estimate with exposures on the simulator's own graph (what graph errors cost)
            true_edges = world.true_edges.rename(columns={"cross_elasticity": "weight"})
            oracle = spillover.estimate_spillover(fd, a, true_edges, spec, units=units, n_redraws=opts["redraws"])
        counts = spill["exposure_counts"]
        forecast = spillover.spillover_from_forecasts(fd)
        rows.append({"spillover_fc": forecast["estimate"], "spillover_se_fc": forecast["se"],
            "spillover_lo_fc": forecast["ci_low"], "spillover_hi_fc": forecast["ci_high"],
            "common_sd_fc": forecast["common_sd"], "placebo_mean_fc": forecast["placebo_mean"], "df_fc": forecast["df"],
            "spillover_tg": oracle["spillover_effect"], "spillover_se_tg": oracle["spillover_se"],
            "rep": rep, "world": w, "design": unit,
            "true_global": truth["true_global_effect"], "true_direct": truth["true_direct_effect"],
            "true_spillover": truth["true_spillover_effect"],
            "plain": did.effect_, "hpte": hpte.effect_,
            "spillover": spill["spillover_effect"], "spillover_se": spill["spillover_se"],
            "spill_zero_by_design": spill["message"].startswith("spillover 0 by design"),
            "spillover_ht": spill["spillover_effect_ht"], "spillover_se_ht": spill["spillover_se_ht"],
            "global_hajek": spill["global_effect_hajek"], "n_stabilised": spill["n_stabilised"],
            "exposed_controls": counts["control_some_treated"], "unexposed_controls": counts["control_none_treated"],
            "treated_mostly": counts["treated_mostly_treated"], "treated_few": counts["treated_few_treated"],
            "n_units": units["unit_id"].nunique(),
        })
    return rows


def _interval_figures(r: pd.DataFrame, estimate: str, se: str, prefix: str) -> dict:
    """Bias, empirical SE, mean reported SE and 95% coverage against the true spillover, over the
    reps with an estimate. An estimate that is zero by design has SE 0: it covers only a truth of 0."""
    ok = r[estimate].notna()
    err = (r[estimate] - r["true_spillover"])[ok]
    covered = err.abs() <= spillover.Z_95 * r.loc[ok, se] + 1e-12
    return {f"{prefix}_bias": err.mean(), f"{prefix}_emp_se": err.std(ddof=1), f"{prefix}_mean_se": r.loc[ok, se].mean(),
            f"{prefix}_cover": covered.mean()}


def _forecast_figures(r: pd.DataFrame) -> dict:
    """As `_interval_figures` for `spillover_from_forecasts`, whose interval is Student's t."""
    ok = r["spillover_fc"].notna()
    err = (r["spillover_fc"] - r["true_spillover"])[ok]
    covered = (r.loc[ok, "spillover_lo_fc"] <= r.loc[ok, "true_spillover"]) & (r.loc[ok, "true_spillover"] <= r.loc[ok, "spillover_hi_fc"])
    return {"spill_fc_estimable": int(ok.sum()), "spill_fc_bias": err.mean(), "spill_fc_emp_se": err.std(ddof=1),
            "spill_fc_mean_se": r.loc[ok, "spillover_se_fc"].mean(), "spill_fc_common_sd": r.loc[ok, "common_sd_fc"].mean(),
            "spill_fc_placebo_mean": r.loc[ok, "placebo_mean_fc"].mean(), "spill_fc_df": r.loc[ok, "df_fc"].median(),
            "spill_fc_cover": covered.mean() if ok.any() else np.nan}


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    out = []
    for design, r in results.groupby("design", sort=False):
        n = len(r)
        row = {"design": design, "reps": n, "units": r["n_units"].mean(),
               "true_global": r["true_global"].mean(), "true_direct": r["true_direct"].mean()}
        for est in ("plain", "hpte"):
            err = r[est] - r["true_global"]
            row[f"{est}_bias"] = err.mean()
            row[f"{est}_bias_mcse"] = err.std(ddof=1) / np.sqrt(n)
        row.update({"true_spill": r["true_spillover"].mean(),
                    "spill_estimable": int(r["spillover"].notna().sum()),
                    "spill_zero_by_design": int(r["spill_zero_by_design"].sum()),
                    "true_spill_when_zero": r.loc[r["spill_zero_by_design"], "true_spillover"].abs().max()
                    if r["spill_zero_by_design"].any() else np.nan,
                    **_interval_figures(r, "spillover", "spillover_se", "spill"),
                    **_interval_figures(r, "spillover_ht", "spillover_se_ht", "spill_ht"),
                    **_forecast_figures(r),
                    "exposed_ctrl": r["exposed_controls"].mean(), "unexposed_ctrl": r["unexposed_controls"].mean(),
                    "stabilised": r["n_stabilised"].mean(),
                    **_interval_figures(r, "spillover_tg", "spillover_se_tg", "spill_tg")})
        out.append(row)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    global _WORLD_FILE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=200)
    parser.add_argument("--reps-per-world", type=int, default=4,
                        help="a world's noise is shared by its replications (only the assignment changes), so the "
                             "forecasts' errors vary between worlds: coverage needs many worlds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--regime", default="default", choices=sorted(simulation.REGIMES))
    parser.add_argument("--products", type=int, default=0, help="0 = the regime's size (REGIME_SIZES)")
    parser.add_argument("--subclasses", type=int, default=0)
    parser.add_argument("--weeks", type=int, default=4)
    parser.add_argument("--price-change", type=float, default=-0.10)
    parser.add_argument("--max-cluster", type=int, default=40, help="as the product_clusters asset (MAX_CLUSTER_SIZE)")
    parser.add_argument("--redraws", type=int, default=500)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--trees", type=int, default=40)
    parser.add_argument("--exposure-fdr", type=float, default=0.0,
                        help="exposures on a graph learned at this FDR (0 = the clustering graph's)")
    parser.add_argument("--exposure-min-corr", type=float, default=0.1)
    parser.add_argument("--forecast-only", action="store_true",
                        help="only the reported (forecast) spillover estimate and DiD: skips HPTE and the IPW estimates")
    parser.add_argument("--designs", default="product,cluster",
                        help="comma-separated randomisation units; 'product' alone with --forecast-only needs no Spark")
    parser.add_argument("--cluster-source", default="learned", choices=("learned", "true"),
                        help="true (with --forecast-only): cluster on the simulator's substitute groups, no Spark (a diagnosis)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    args.products = args.products or REGIME_SIZES[args.regime][0]
    args.subclasses = args.subclasses or REGIME_SIZES[args.regime][1]
    opts = {k: getattr(args, k) for k in ("regime", "products", "subclasses", "weeks", "price_change", "max_cluster", "redraws",
                                           "bootstrap", "trees", "reps_per_world", "exposure_fdr", "exposure_min_corr",
                                           "forecast_only", "cluster_source")}
    opts["designs"] = tuple(d for d in args.designs.split(",") if d)
    unknown = set(opts["designs"]) - set(DESIGNS)
    if unknown or not opts["designs"]:
        parser.error(f"--designs: unknown {sorted(unknown)}; choose from {DESIGNS}")
    if args.cluster_source == "true" and not args.forecast_only:
        parser.error("--cluster-source true needs --forecast-only (the IPW and HPTE rows need the learned graph)")
    params = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
    print(f"benchmarks/spillover.py {params}", flush=True)
    started = time.time()
    n_worlds = -(-args.replications // args.reps_per_world)
    graph_free = opts["forecast_only"] and (opts["designs"] == ("product",) or opts["cluster_source"] == "true")
    worlds = graph_free_worlds(opts, n_worlds) if graph_free else learn_worlds(opts, n_worlds)
    with tempfile.TemporaryDirectory() as tmp:
        _WORLD_FILE = tmp  # one file per world: a worker loads only the world it replicates
        for w, learned in worlds.items():
            with open(os.path.join(tmp, f"world{w}.pkl"), "wb") as f:
                pickle.dump(learned, f)
        print(f"phase 1 ({'simulated' if graph_free else 'graph + clusters of'} {n_worlds} worlds"
              f"{'' if graph_free else ', Spark'}) {time.time() - started:.0f} s", flush=True)
        jobs = [(rep, opts) for rep in range(args.replications)]
        results = run_replications(replicate, jobs, args.workers, started, args.out)
    table = summarise(results)
    info = pd.DataFrame([w["info"] for w in worlds.values()])
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    print()
    print(f"command: .venv/bin/python benchmarks/spillover.py {params}")
    graph_line = (f"learned graph: mean recall by true cross elasticity {info['recall_weight'].mean():.2f}, precision "
                  f"{info['precision'].mean():.2f}; learned clusters (max {args.max_cluster}): mean {info['clusters'].mean():.0f}, "
                  f"singletons {info['singleton_share'].mean():.3f}, blocks randomised whole {info['blocks_whole'].mean():.1f}/"
                  f"{info['blocks'].mean():.0f}, cutting {info['cut_share_true'].mean():.2f} of the true cross elasticity (kept "
                  f"inside: {1 - info['cut_share_true'].mean():.2f})" if "recall_weight" in info else "no graph learned (product design only)")
    print(f"regime {args.regime}; worlds: {n_worlds} x {args.products} products in {args.subclasses} subclasses, time_bound {args.weeks} weeks, "
          f"price change {args.price_change:+.0%}, treated share 0.5, whole catalogue; {graph_line}"
          + ("; clusters = the simulator's TRUE substitute groups (oracle stand-in, diagnosis)" if args.cluster_source == "true" else ""))
    print("plain = DiD on first differences, hpte = HPTEEstimator; *_bias against true_global_effect (mcse = Monte Carlo SE). "
          "spill_fc = spillover from the controls' forecasts (spillover_from_forecasts, the reported estimate; "
          "interval Student t) vs true_spillover_effect; spill = Hajek IPW spillover on controls (estimate_spillover); cover = 95% interval coverage; "
          "spill_ht = Horvitz-Thompson version; exposed/unexposed_ctrl = mean control products per condition; "
          "stabilised = mean products whose probability was raised to the floor"
          + "; spill_tg = the same estimate with exposures on the simulator's TRUE graph (diagnosis, not a result)")
    print(table.T.to_string(float_format=lambda v: f"{v:.4f}"))
    print("\ngoals:")
    if set(opts["designs"]) != set(DESIGNS) or args.cluster_source == "true":
        pass  # the clustering goals need both designs on learned clusters
    elif args.regime == "no_substitutes":
        share = info["singleton_share"].mean()
        print(f"  singletons on a market without substitutes: {share:.3f} ({'ok' if share >= 0.9 else 'MISSED'} >= 0.90)")
    else:
        kept = 1 - info["cut_share_true"].mean()
        print(f"  true cross weight kept inside clusters: {kept:.3f} ({'ok' if kept >= 0.7 else 'MISSED'} >= 0.70), "
              f"largest cluster {info['cluster_size_max'].max():.0f} (max {args.max_cluster})")
        p, c = table.set_index("design").loc["product"], table.set_index("design").loc["cluster"]
        for est in ("plain",) if args.forecast_only else ("plain", "hpte"):
            reduction = 1 - abs(c[f"{est}_bias"]) / abs(p[f"{est}_bias"])
            print(f"  {est}: spillover bias {p[f'{est}_bias']:+.4f} (product) -> {c[f'{est}_bias']:+.4f} (cluster): "
                  f"reduction {reduction:.0%} ({'ok' if reduction >= 0.60 else 'MISSED'} >= 60%)")
    for design, row in table.set_index("design").iterrows():
        print(f"  spillover coverage ({design}, from forecasts: the reported estimate): {row['spill_fc_cover']:.3f} "
              f"({'ok' if 0.90 <= row['spill_fc_cover'] <= 0.97 else 'MISSED'} 0.90-0.97), bias {row['spill_fc_bias']:+.4f} "
              f"(emp SE {row['spill_fc_emp_se']:.4f}, mean SE {row['spill_fc_mean_se']:.4f}, "
              f"{row['spill_fc_estimable']:.0f}/{row['reps']:.0f} estimable)")
        if args.forecast_only:
            continue
        print(f"  spillover coverage ({design}, IPW on the learned graph's exposures): {row['spill_cover']:.3f} "
              f"({'ok' if 0.90 <= row['spill_cover'] <= 0.97 else 'MISSED'} 0.90-0.97), bias {row['spill_bias']:+.4f} "
              f"(emp SE {row['spill_emp_se']:.4f}, {row['spill_estimable']:.0f}/{row['reps']:.0f} estimable, of which "
              f"{row['spill_zero_by_design']:.0f} zero by design, max |true spillover| there {row['true_spill_when_zero']:.4f}); with the true graph: "
              f"coverage {row['spill_tg_cover']:.3f}, bias {row['spill_tg_bias']:+.4f} (emp SE {row['spill_tg_emp_se']:.4f})")
    print(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
