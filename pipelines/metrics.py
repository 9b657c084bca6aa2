"""Decision metrics (issue 16): which outcome each experiment measures, how revenue and profit are
formed from sales, relative effects with honest intervals, Holm's adjustment across an
experiment's metrics, and guardrail verdicts.

One rule in one place:
- `units` and any other numeric sales column are taken as they are.
- `revenue` is the sales table's `revenue` column when it has one, else price x units.
- `profit` is (price - unit cost) x units. The unit cost comes from the experiment file's
  `costs:` (per category: `unit_cost` in money, or `margin_rate`, the share of the untreated
  shelf price that is margin, so unit cost = (1 - margin_rate) x price / (1 + price_change)), else
  from the catalogue's `unit_cost` column. Without either, `profit` is refused when the file is
  loaded (`experiments.load_experiment_directory`), naming the file and the field.
- The relative effect is effect / B, B = the counterfactual mean of the treated product-days,
  estimated model-free as the treated product-days' observed mean minus the effect. Its interval
  is the DiD estimator's jackknife of the ratio in between designs, else the delta method on the
  linearised ratio over randomisation units (`relative_effect`).
- Guardrail verdicts (`guardrail_status`): `held` when the whole relative interval lies on the
  safe side of the tolerance, `breached` when it lies wholly beyond it, else `inconclusive`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

BUILT_IN = ("units", "revenue", "profit")
GUARDRAIL_DIRECTIONS = ("must_not_fall", "must_not_rise")
COST_FIELDS = ("unit_cost", "margin_rate")
GUARDRAIL_FIELDS = ("metric", "direction", "tolerance")
MAX_METRICS = 10


def sales_columns_needed(metric: str) -> tuple[str, ...]:
    """Sales columns a metric is computed from (besides product_id and date)."""
    if metric in ("revenue", "profit"):
        return ("price", "units")
    return (metric,)


# ----------------------------------------------------------------------------------------------
# Metric values on sales rows (pandas and Spark, same rule)
# ----------------------------------------------------------------------------------------------

def metric_values_pandas(rows: pd.DataFrame, metric: str) -> np.ndarray:
    """The metric per sales row. `rows` has the sales columns and, for profit, `unit_cost` (money,
    NaN where the margin rate applies), `margin_rate` and `price_change` (0 off treatment)."""
    if metric == "revenue":
        if "revenue" in rows.columns:
            return rows["revenue"].to_numpy(float)
        return rows["price"].to_numpy(float) * rows["units"].to_numpy(float)
    if metric == "profit":
        price = rows["price"].to_numpy(float)
        change = rows["price_change"].fillna(0.0).to_numpy(float) if "price_change" in rows.columns else 0.0
        cost = rows["unit_cost"].to_numpy(float)
        margin = rows["margin_rate"].to_numpy(float) if "margin_rate" in rows.columns else np.full(len(rows), np.nan)
        cost = np.where(np.isfinite(cost), cost, (1.0 - margin) * price / (1.0 + change))
        return (price - cost) * rows["units"].to_numpy(float)
    return rows[metric].to_numpy(float)


def metric_column_spark(metric: str, columns):
    """The same rule as a Spark Column over a panel with price, units, revenue (optional),
    unit_cost, margin_rate and price_change (see `metric_values_pandas`)."""
    from pyspark.sql import functions as F

    if metric == "revenue":
        if "revenue" in columns:
            return F.col("revenue").cast("double")
        return F.col("price").cast("double") * F.col("units").cast("double")
    if metric == "profit":
        change = F.coalesce(F.col("price_change"), F.lit(0.0)) if "price_change" in columns else F.lit(0.0)
        cost = F.coalesce(F.col("unit_cost"), (1.0 - F.col("margin_rate")) * F.col("price") / (1.0 + change))
        return (F.col("price").cast("double") - cost) * F.col("units").cast("double")
    return F.col(metric).cast("double")


def unit_costs(costs: dict, population: pd.DataFrame) -> pd.DataFrame:
    """(product_id, unit_cost, margin_rate) for a population (product_id, category[, unit_cost]):
    the experiment file's per-category `costs` first, the catalogue's `unit_cost` otherwise."""
    frame = pd.DataFrame({"product_id": population["product_id"].astype(str).to_numpy()})
    category = population["category"].astype(str).to_numpy()
    cost = np.full(len(frame), np.nan)
    margin = np.full(len(frame), np.nan)
    if "unit_cost" in population.columns:
        cost = pd.to_numeric(population["unit_cost"], errors="coerce").to_numpy(float)
    for name, given in (costs or {}).items():
        mine = category == name
        if "unit_cost" in given:
            cost = np.where(mine, float(given["unit_cost"]), cost)
            margin = np.where(mine, np.nan, margin)
        else:
            margin = np.where(mine, float(given["margin_rate"]), margin)
            cost = np.where(mine, np.nan, cost)
    return frame.assign(unit_cost=cost, margin_rate=margin)


def missing_costs(costs: dict, population: pd.DataFrame) -> list[str]:
    """Product ids of `population` with neither a unit cost nor a margin rate (see `unit_costs`)."""
    found = unit_costs(costs, population)
    bad = ~(np.isfinite(found["unit_cost"]) | np.isfinite(found["margin_rate"]))
    return found.loc[bad, "product_id"].tolist()


# ----------------------------------------------------------------------------------------------
# Relative effect with its delta-method interval
# ----------------------------------------------------------------------------------------------

def _unit_sums(units: np.ndarray, *values: np.ndarray) -> list[np.ndarray]:
    _, row = np.unique(units, return_inverse=True)
    return [np.bincount(row, weights=v) for v in values]


def relative_effect(effect: float, se: float, analysed: pd.DataFrame, alpha: float = 0.05, df: float | None = None,
                    se_rel: float | None = None) -> dict:
    """Relative effect R = effect / B and its interval, B the counterfactual mean of the treated
    product-days.

    `analysed` holds the estimator's analysed products: `unit_id` (the randomisation unit, or the
    bootstrap block), `group` (the comparison group the estimate resamples within: arm, or
    crossover sequence), `treated` (bool: the product's treated days enter B; all products in a
    switchback design), `value` (the first difference as the estimator used it), `treated_mean`
    (observed mean of the metric on the product's treated analysed days).

    B = Ybar_T - effect, Ybar_T the treated products' mean observed level (product-weighted, like
    the effect): a model-free counterfactual level (the treated days' sales minus what treatment
    added). Delta method on R = effect / (Ybar_T - effect):
        Var R = (Ybar^2 Var(effect) + effect^2 Var(Ybar) - 2 Ybar effect Cov(effect, Ybar)) / B^4,
    Var(effect) = the estimator's (bootstrap) SE squared.
    - Between designs: the treated products are a random half, so Ybar moves with the draw, and
      with the effect (big products have big effects). Var(Ybar) and Cov(effect, Ybar) come from
      the linearised means over randomisation units within each comparison group (units
      resampled together, never products of one unit apart), the effect's influence taken as
      that of the group means of `value` it compares. Leaving the covariance out widens, taking
      Var(Ybar) out narrows the interval.
    - Switchback designs: every product is treated, so Ybar is the level of all of them, not a
      draw: Var(Ybar) = Cov = 0, and B's only error is the effect's (B = Ybar - effect). Treating
      the products as sampled added e^2 Var(Ybar), which made the interval 12-27% wider than the
      relative effect's spread in random days (`benchmarks/metrics.py`, 200 experiments a cell).
    `se_rel`, when the estimator gives it, replaces the delta method: the DiD estimator's
    jackknife of the ratio itself in between designs (`estimation.jackknife_between`), which
    re-computes Ybar with the effect and so needs no linearisation.
    The interval is R -/+ q x SE(R), q Student's t quantile with `df` degrees of freedom (the
    estimator's `df_`: its randomisation units, `estimation.effective_df`), normal when None.
    """
    out = {"relative_effect": np.nan, "se_rel": np.nan, "ci_low_rel": np.nan, "ci_high_rel": np.nan, "baseline": np.nan}
    rows = analysed[np.isfinite(analysed["value"].to_numpy(float))]
    treated = rows[rows["treated"].astype(bool) & np.isfinite(rows["treated_mean"].to_numpy(float))]
    if treated.empty or not np.isfinite(effect):
        return out
    ybar = float(treated["treated_mean"].mean())
    baseline = ybar - effect
    if not np.isfinite(baseline) or baseline <= 0:
        return {**out, "baseline": baseline}
    ratio = effect / baseline
    # between designs, linearised per arm: the effect is the treated arm's mean of `value` minus
    # the control arm's; switchback designs have no level sampling (see the docstring)
    groups = sorted(rows["group"].astype(str).unique())
    switchback = not set(groups) <= {"treatment", "control"}
    var_y, cov = 0.0, 0.0
    for group in groups if not switchback and (se_rel is None or not np.isfinite(se_rel)) else []:
        part = rows[rows["group"].astype(str) == group]
        n_units = part["unit_id"].nunique()
        if n_units < 2:
            continue
        weight = 1.0 if group == "treatment" else -1.0
        units = part["unit_id"].astype(str).to_numpy()
        ones = np.ones(len(part))
        v = part["value"].to_numpy(float)
        in_b = part["treated"].astype(bool).to_numpy() & np.isfinite(part["treated_mean"].to_numpy(float))
        y = np.where(in_b, part["treated_mean"].to_numpy(float), 0.0)
        count_v, sum_v, count_y, sum_y = _unit_sums(units, ones, v, in_b.astype(float), y)
        # influence of this group's mean of `value` on the effect, per unit
        infl_effect = weight * (sum_v - count_v * sum_v.sum() / count_v.sum()) / count_v.sum()
        if count_y.sum() > 0:  # centred on the group's own mean: resampling keeps each group's size
            infl_y = (sum_y - count_y * sum_y.sum() / count_y.sum()) / len(treated)
        else:
            infl_y = np.zeros(len(count_v))
        scale = n_units / (n_units - 1)
        var_y += scale * float((infl_y ** 2).sum())
        cov += scale * float((infl_effect * infl_y).sum())
    if se_rel is None or not np.isfinite(se_rel):  # the delta method
        var_ratio = (ybar ** 2 * se ** 2 + effect ** 2 * var_y - 2 * ybar * effect * cov) / baseline ** 4
        se_rel = math.sqrt(max(var_ratio, 0.0))
    z = _quantile(alpha, df)
    return {"relative_effect": ratio, "se_rel": se_rel, "ci_low_rel": ratio - z * se_rel,
            "ci_high_rel": ratio + z * se_rel, "baseline": baseline}


# ----------------------------------------------------------------------------------------------
# Multiple testing and guardrails
# ----------------------------------------------------------------------------------------------

def _quantile(alpha: float, df: float | None) -> float:
    """The two-sided 1 - alpha quantile: Student's t with `df` degrees of freedom, normal when None."""
    if df is None or not np.isfinite(df):
        return float(stats.norm.ppf(1 - alpha / 2))
    return float(stats.t.ppf(1 - alpha / 2, max(float(df), 1.0)))


def p_value(effect: float, se: float, df: float | None = None) -> float:
    """Two-sided p-value of effect / se: Student's t with `df` degrees of freedom (the estimator's
    `df_`), normal when None (NaN when either is missing or se <= 0)."""
    if not (np.isfinite(effect) and np.isfinite(se)) or se <= 0:
        return np.nan
    if df is None or not np.isfinite(df):
        return float(2 * stats.norm.sf(abs(effect / se)))
    return float(2 * stats.t.sf(abs(effect / se), max(float(df), 1.0)))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), NaN kept out of the family."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if not len(finite):
        return adjusted
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def guardrail_status(direction: str, tolerance: float, ci_low_rel: float, ci_high_rel: float) -> str:
    """held | breached | inconclusive for one guardrail (tolerance: the tolerated relative change).

    must_not_fall: held when ci_low_rel >= -tolerance, breached when ci_high_rel < -tolerance.
    must_not_rise: held when ci_high_rel <= tolerance, breached when ci_low_rel > tolerance.
    """
    if not (np.isfinite(ci_low_rel) and np.isfinite(ci_high_rel)):
        return "inconclusive"
    if direction == "must_not_fall":
        if ci_low_rel >= -tolerance:
            return "held"
        return "breached" if ci_high_rel < -tolerance else "inconclusive"
    if ci_high_rel <= tolerance:
        return "held"
    return "breached" if ci_low_rel > tolerance else "inconclusive"
