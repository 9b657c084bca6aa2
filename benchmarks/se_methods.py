"""Which SE holds in between designs: the unit bootstrap, HC2 and the jackknife on the same experiments (issue 16).

Each replication draws a world of `benchmarks/metrics.py` (same seeds and sizes), keeps its
time-bound and triggered experiments and fits the regression-adjusted DiD on units, revenue and
profit. On every experiment it computes three SEs of the same estimate:
- `bootstrap`: units resampled within arm, the adjustment re-fitted in every draw
  (`estimation.adjusted_effect`, 500 draws), what DiD reported before the jackknife;
- `hc2`: the HC2 sandwich of the same regression (y ~ 1 + treated + centred covariates; statsmodels);
- `jackknife`: what DiD reports now (`estimation.jackknife_between`).
It prints, per regime, design and metric, each SE's mean over the empirical SE of the estimates
and the coverage of the t interval against the simulator's truth.

    .venv/bin/python benchmarks/se_methods.py [--replications 60] [--regime default,weak]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import metrics as bench  # noqa: E402
from benchmarks.replications import run_replications  # noqa: E402
from pipelines import estimation, simulation  # noqa: E402

BETWEEN = ("time_bound", "triggered")


def replicate(job) -> list[dict]:
    warnings.simplefilter("ignore")
    seed, opts = job
    world, labelled, assignments, sales, triggers, costs, clusters = bench.simulated(job)
    labelled = [(label, spec) for label, spec in labelled if label in BETWEEN]
    specs = [spec for _, spec in labelled]
    assignments = assignments[assignments["experiment"].isin([s.name for s in specs])]
    truth = simulation.true_effects(world, assignments, metrics=bench.METRICS).set_index(["experiment", "metric"])
    fds = estimation.first_differences_pandas(
        sales, assignments, {s.name: s.design for s in specs}, {s.name: list(s.all_metrics) for s in specs},
        catalog=world.catalog, events=triggers, unit_costs=costs)
    rows = []
    for label, spec in labelled:
        for metric in bench.METRICS:
            fd = estimation._in_product_order(fds[(fds["experiment"] == spec.name) & (fds["metric"] == metric)]
                                              .dropna(subset=["first_difference"]))
            model = estimation.DiDEstimator(random_state=seed).fit(fd)
            groups = estimation.comparison_groups(fd)
            x = estimation.covariate_matrix(fd, model.covariates_)[0] if model.covariates_ else np.zeros((len(fd), 0))
            y = fd["first_difference"].to_numpy(float)
            _, draws = estimation.adjusted_effect(fd["unit_id"].astype(str).to_numpy(), y, x, groups, False,
                                                  opts["bootstrap"], np.random.default_rng(seed))
            design = np.column_stack([np.ones(len(fd)), (groups == "treatment").astype(float), x - x.mean(axis=0)])
            hc2 = sm.OLS(y, design).fit(cov_type="HC2")
            rows.append({"regime": opts["regime"], "design": label, "metric": metric, "df": model.df_,
                         "error": model.effect_ - truth.loc[(spec.name, metric), "true_direct_effect"],
                         "bootstrap": float(np.std(draws, ddof=1)), "hc2": float(hc2.bse[1]), "jackknife": model.se_})
    return rows


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    q = stats.t.ppf(0.975, results["df"])
    out = []
    for key, part in results.groupby(["regime", "design", "metric"], sort=False):
        row = dict(zip(("regime", "design", "metric"), key), experiments=len(part))
        spread = part["error"].std(ddof=1)
        for method in ("bootstrap", "hc2", "jackknife"):
            row[f"{method}_se/sd"] = part[method].mean() / spread
            row[f"{method}_coverage"] = float((part["error"].abs() <= q[part.index] * part[method]).mean())
        out.append(row)
    return pd.DataFrame(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=60, help="worlds per regime")
    parser.add_argument("--regime", default="default,weak,no_substitutes")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    base = {"per_design": 2, "products": 100, "weeks": 6, "price_change": -0.08, "bootstrap": args.bootstrap, "carryover": 0.0}
    regimes = [r.strip() for r in args.regime.split(",") if r.strip()]
    started = time.time()
    jobs = [(seed, {**base, "regime": regime}) for regime in regimes for seed in range(args.replications)]
    results = run_replications(replicate, jobs, args.workers, started).reset_index(drop=True)
    pd.set_option("display.width", 200)
    print(f"\ncommand: .venv/bin/python benchmarks/se_methods.py --replications {args.replications} --regime {args.regime}")
    print(summarise(results).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
