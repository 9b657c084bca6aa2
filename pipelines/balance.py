"""Sample-ratio mismatch (SRM) and pre-period balance of an experiment's arms (issue 16).

SRM: data that goes missing in one arm (the price engine did not apply a price, a feed dropped
rows) biases every estimate. Two tests per experiment on what is analysed, not merely published:
- units: a chi-square test of the randomisation units with sales in the window per arm against
  the design's treated share (between designs; in switchback designs every unit is in both arms);
- days: a unit-level test of the share of published (non-blackout) product-days that have a
  sales row, treated arm against control: a Welch t-test over units for between designs, a
  paired t-test of each unit's treated-day and control-day shares for switchback designs. Rows
  dropped from one arm leave the unit counts as they are; this test sees them.
They are combined by Bonferroni (p = min(1, 2 x the smaller p)), so an intact design fires at
most at the stated levels: blocking at p < `SRM_BLOCK_P` (0.001), warning at p < `SRM_WARN_P`
(0.01). A 55/45 split of 2,000 units: see `tests/test_balance.py` (measured power).

Balance: pre-period covariates between the arms (between designs) or the two crossover
sequences: mean units (`pre_mean` of the units rows) and mean price (`pre_price`). The standardised
mean difference (SMD) is reported; what warns is an imbalance beyond what the randomisation itself
produces: a permutation test of the arm labels over the randomisation units (unit means, labels
shuffled with the arm sizes kept, `PERMUTATIONS` draws from a fixed seed), Bonferroni over the
covariates, warning at p < `BALANCE_WARN_P` (0.01). A fixed |SMD| >= 0.1 rule is for trials with
hundreds of units a arm: with 6 products an arm chance alone gives |SMD| ~ 0.6, so it warned on
almost every small, correctly randomised experiment. A chance imbalance does not bias the
estimators (they difference out the pre-period); a beyond-chance one says the published
assignment was not the one applied. Random-days designs balance every day by construction and
have no groups to compare.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from scipy import stats

SRM_BLOCK_P = 0.001
SRM_WARN_P = 0.01
BALANCE_WARN_P = 0.01
PERMUTATIONS = 4999
BALANCE_COVARIATES = ("pre_mean", "pre_price")
SWITCHBACK_DESIGNS = ("random_days", "crossover")


def unit_counts_test(n_treated: int, n_control: int, treated_fraction: float) -> float:
    """Chi-square (1 df) p-value of n_treated / n_control against the treated share."""
    n = n_treated + n_control
    if n == 0:
        return np.nan
    expected = np.array([treated_fraction * n, (1 - treated_fraction) * n])
    observed = np.array([n_treated, n_control], float)
    return float(stats.chi2.sf(((observed - expected) ** 2 / expected).sum(), 1))


def sales_days_test(per_unit: pd.DataFrame, switchback: bool) -> float:
    """p-value that the share of published product-days with sales is the same in both arms.

    `per_unit`: one row per (unit_id, arm) with `published` and `with_sales` product-days.
    """
    rates = per_unit.assign(rate=per_unit["with_sales"] / per_unit["published"].where(per_unit["published"] > 0))
    wide = rates.pivot_table(index="unit_id", columns="arm", values="rate", aggfunc="mean")
    if "treatment" not in wide.columns or "control" not in wide.columns:
        return np.nan
    if switchback:
        both = wide.dropna(subset=["treatment", "control"])
        difference = (both["treatment"] - both["control"]).to_numpy(float)
        if len(difference) < 3 or np.allclose(difference, difference[0]):
            return 1.0 if len(difference) >= 3 else np.nan
        return float(stats.ttest_1samp(difference, 0.0).pvalue)
    treated, control = wide["treatment"].dropna().to_numpy(float), wide["control"].dropna().to_numpy(float)
    if len(treated) < 2 or len(control) < 2:
        return np.nan
    if np.allclose(np.concatenate([treated, control]), treated[0]):
        return 1.0  # every unit has the same share (e.g. no missing day at all)
    return float(stats.ttest_ind(treated, control, equal_var=False).pvalue)


def srm(per_unit: pd.DataFrame, design: str, treated_fraction: float) -> dict:
    """SRM of one experiment from `per_unit` (unit_id, arm, published, with_sales): both tests,
    the combined p-value and the verdict (ok | warn | block)."""
    switchback = design in SWITCHBACK_DESIGNS
    analysed = per_unit[per_unit["with_sales"] > 0]
    n_treated = int(analysed.loc[analysed["arm"] == "treatment", "unit_id"].nunique())
    n_control = int(analysed.loc[analysed["arm"] == "control", "unit_id"].nunique())
    p_units = np.nan if switchback else unit_counts_test(n_treated, n_control, treated_fraction)
    p_days = sales_days_test(per_unit, switchback)
    finite = [p for p in (p_units, p_days) if np.isfinite(p)]
    p = min(1.0, len(finite) * min(finite)) if finite else np.nan
    verdict = "ok" if not np.isfinite(p) or p >= SRM_WARN_P else ("block" if p < SRM_BLOCK_P else "warn")
    share = per_unit.groupby("arm")[["published", "with_sales"]].sum()
    rate = (share["with_sales"] / share["published"]).to_dict()
    return {
        "units_treated": n_treated, "units_control": n_control, "expected_treated_share": treated_fraction,
        "p_units": p_units, "p_days": p_days, "p": p, "verdict": verdict,
        "sales_day_share_treated": float(rate.get("treatment", np.nan)),
        "sales_day_share_control": float(rate.get("control", np.nan)),
    }


def smd(a: np.ndarray, b: np.ndarray) -> float:
    """Standardised mean difference (mean a - mean b) / sqrt((var a + var b) / 2)."""
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return np.nan
    pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0


def permutation_p(values: np.ndarray, treated: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided randomisation p-value of the difference in means of `values` between
    `treated` and the rest, with the arm sizes kept ((1 + #|permuted| >= |observed|) / (1 + draws))."""
    ok = np.isfinite(values)
    values, treated = values[ok], treated[ok]
    n_treated = int(treated.sum())
    if n_treated < 1 or n_treated >= len(values):
        return np.nan
    observed = abs(values[treated].mean() - values[~treated].mean())
    rng, total, as_large = np.random.default_rng(seed), values.sum(), 0
    batch = max(1, min(permutations, 2_000_000 // len(values)))  # bounded memory on large experiments
    for start in range(0, permutations, batch):
        draws = np.argsort(rng.random((min(batch, permutations - start), len(values))), axis=1)[:, :n_treated]
        picked = values[draws].sum(axis=1)
        differences = np.abs(picked / n_treated - (total - picked) / (len(values) - n_treated))
        as_large += int(np.sum(differences >= observed - 1e-12 * max(1.0, observed)))
    return float((1 + as_large) / (1 + permutations))


def balance(first_differences: pd.DataFrame, design: str) -> dict:
    """Pre-period balance per covariate between the arms (crossover: sequences) of one experiment:
    {covariate: (smd over products, permutation p over randomisation units)} (empty for random days).

    Products are counted once (the units metric's rows when several metrics are present; pre_mean
    is in that metric's units).
    """
    fd = first_differences
    if "metric" in fd.columns and fd["metric"].notna().any():
        metric = "units" if (fd["metric"] == "units").any() else fd["metric"].iloc[0]
        fd = fd[fd["metric"] == metric]
    fd = fd.drop_duplicates("product_id")
    if design == "random_days":
        return {}
    group, first = ("sequence", "treatment_first") if design == "crossover" else ("arm", "treatment")
    second = "control_first" if design == "crossover" else "control"
    fd = fd[fd[group].isin([first, second])]
    unit = fd["unit_id"].astype(str) if "unit_id" in fd.columns else fd["product_id"].astype(str)
    out = {}
    for covariate in BALANCE_COVARIATES:
        if covariate not in fd.columns:
            continue
        values = fd[covariate].to_numpy(float)
        groups = fd[group].to_numpy(dtype=object)
        per_unit = pd.DataFrame({"unit": unit.to_numpy(), "first": groups == first, "value": values}).groupby("unit").agg(
            first=("first", "first"), value=("value", "mean"))
        out[covariate] = (smd(values[groups == first], values[groups == second]),
                          permutation_p(per_unit["value"].to_numpy(float), per_unit["first"].to_numpy(bool)))
    return out


def sales_days_per_unit(assignments: DataFrame, sales: DataFrame) -> pd.DataFrame:
    """The SRM's input: per experiment, randomisation unit and arm, the published non-blackout
    product-days (`published`) and those with a sales row (`with_sales`). Counted from the sales
    actually received, so rows a feed dropped or a price the engine never applied show here."""
    sold = sales.select("product_id", "date").distinct().withColumn("sold", F.lit(1))
    return (assignments.where(~F.col("blackout"))
            .join(sold, ["product_id", "date"], "left")
            .groupBy("experiment", "unit_id", "arm")
            .agg(F.count("*").alias("published"), F.count("sold").alias("with_sales"))
            .toPandas())


def srm_table(per_unit: pd.DataFrame, experiments: pd.DataFrame) -> pd.DataFrame:
    """`srm` for every experiment: `per_unit` has experiment, unit_id, arm, published, with_sales;
    `experiments` name, design, treated_fraction. One row per experiment with published rows."""
    rows = []
    for spec in experiments.itertuples():
        mine = per_unit[per_unit["experiment"] == spec.name]
        if mine.empty:
            continue
        rows.append({"experiment": spec.name, "design": spec.design, **srm(mine, spec.design, float(spec.treated_fraction))})
    return pd.DataFrame(rows)


def balance_table(first_differences: pd.DataFrame, experiments: pd.DataFrame) -> pd.DataFrame:
    """`balance` for every experiment with first differences: experiment, covariate, smd, p, warn
    (p below `BALANCE_WARN_P` after Bonferroni over the experiment's covariates)."""
    rows = []
    for spec in experiments.itertuples():
        mine = first_differences[first_differences["experiment"] == spec.name]
        if mine.empty:
            continue
        found = balance(mine, spec.design)
        for covariate, (value, p) in found.items():
            rows.append({"experiment": spec.name, "covariate": covariate, "smd": value, "p": p,
                         "warn": bool(np.isfinite(p) and p * len(found) < BALANCE_WARN_P)})
    return pd.DataFrame(rows, columns=["experiment", "covariate", "smd", "p", "warn"])
