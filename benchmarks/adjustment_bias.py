"""Does the regression adjustment move the estimate away from the unadjusted one? (issue 18, triggered bias)

On the same simulated worlds as `benchmarks/estimators.py` (carryover 0, product units), per design:
the unadjusted difference of mean first differences (`raw`, unbiased under randomisation up to
the product/day weighting), the pooled in-sample adjustment the estimators use (`pooled`,
`estimation.regression_adjustment`'s rule), slopes fitted on the control arm only (`att`,
regression imputation) and Lin's interacted adjustment (`lin`). Printed per design and variant:
bias, sd and RMSE against the simulator's true direct effect, and the paired t of (variant - raw)
over worlds: a systematic shift away from `raw` is bias the adjustment adds.

    .venv/bin/python benchmarks/adjustment_bias.py --replications 60 --designs triggered,time_bound
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import estimators as bench  # noqa: E402  (the benchmark's worlds, designs and pandas assignments)
from pipelines import estimation, simulation  # noqa: E402


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(np.column_stack([np.ones(len(y)), x]), y, rcond=None)[0][1:]


def variants(fd: pd.DataFrame) -> dict[str, float]:
    """The four estimates of one experiment's first differences."""
    x, _ = estimation.covariate_matrix(fd, estimation.ADJUSTMENT_COVARIATES)
    y, t = fd["first_difference"].to_numpy(float), (fd["arm"] == "treatment").to_numpy()
    raw, gap = y[t].mean() - y[~t].mean(), x[t].mean(0) - x[~t].mean(0)
    within_x = np.vstack([x[t] - x[t].mean(0), x[~t] - x[~t].mean(0)])
    within_y = np.concatenate([y[t] - y[t].mean(), y[~t] - y[~t].mean()])
    control, treated = _slopes(x[~t], y[~t]), _slopes(x[t], y[t])
    centre = x.mean(0)
    return {"raw": raw, "pooled": raw - gap @ _slopes(within_x, within_y), "att": raw - gap @ control,
            "lin": (y[t].mean() - (x[t].mean(0) - centre) @ treated) - (y[~t].mean() - (x[~t].mean(0) - centre) @ control)}


def one_world(seed: int, regime: str, designs: list[str]) -> list[dict]:
    config = bench.market_config(regime, n_products=1200, n_subclasses=24, seed=1000 + seed, carryover_decay=0.0)
    world = simulation.simulate_market(config)
    specs = [s for s in bench.experiment_specs(config, seed, -0.08, 6) if s.design in designs and s.unit == "product"]
    triggers = simulation.simulate_trigger_events(world, config.history_start, specs[0].end)
    clusters = bench.true_clusters(world)
    assignments = pd.concat([bench.pandas_assignments(s, world.catalog, triggers, clusters) for s in specs])
    sales = simulation.simulate_sales(world, assignments, config.history_start, specs[0].end)
    truth = simulation.true_effects(world, assignments).set_index("experiment")["true_direct_effect"]
    fds = estimation.first_differences_pandas(sales, assignments, {s.name: s.design for s in specs},
                                              catalog=world.catalog, events=triggers)
    return [{"seed": seed, "design": s.design, "truth": truth[s.name], **variants(fds[fds["experiment"] == s.name])}
            for s in specs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=60)
    parser.add_argument("--regime", default="default")
    parser.add_argument("--designs", default="triggered,time_bound")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for seed in range(args.replications):
        rows += one_world(seed, args.regime, args.designs.split(","))
        print(f"world {seed + 1}/{args.replications} done", file=sys.stderr, flush=True)
    results = pd.DataFrame(rows)
    print(f"regime {args.regime}, {args.replications} worlds, carryover 0, product units")
    print("| design | variant | bias | sd | bias/sd | rmse | paired t of (variant - raw) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for design, group in results.groupby("design"):
        for name in ("raw", "pooled", "att", "lin"):
            error, shift = group[name] - group["truth"], group[name] - group["raw"]
            t = shift.mean() / shift.std() * np.sqrt(len(shift)) if shift.std() > 0 else 0.0
            print(f"| {design} | {name} | {error.mean():.3f} | {error.std():.3f} | {error.mean() / error.std():.2f} | "
                  f"{np.sqrt((error ** 2).mean()):.3f} | {t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
