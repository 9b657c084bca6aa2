"""Effect estimation: detrended first differences per product, then the second difference.

Step 1 (`first_differences` on Spark, `first_differences_pandas` for small panels; both call
`pool_profile` per pool and `product_first_difference` per product): each product's
counterfactual is fitted on its pre-period (trend, day of week, yearly seasonality; products
with a short history borrow the shape of their pool, rule in `CounterfactualSettings`), and its
residuals in the experiment window become one number, the first difference. Between-product
designs (time_bound, triggered) use the mean residual in the window; switchback designs
(random_days, crossover) the mean residual on treated days minus on control days. Blackout days
never enter.

Then two estimators on the first differences: `DiDEstimator` (plain difference in differences)
and `HPTEEstimator` (outlier filter, second difference within causal-forest leaves, unit
bootstrap). `estimate_experiments` gives one contract row per experiment and estimator.

The estimators follow scikit-learn's conventions: the constructor stores parameters, `fit`
returns self, learned attributes end with `_`.
"""
from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from joblib import Parallel, delayed, effective_n_jobs
from scipy import sparse
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from pipelines import metrics as metric_rules

SWITCHBACK_DESIGNS = ("random_days", "crossover")
BETWEEN_DESIGNS = ("time_bound", "triggered")

FIRST_DIFFERENCE_SCHEMA = T.StructType(
    [
        T.StructField("experiment", T.StringType()),
        T.StructField("product_id", T.StringType()),
        T.StructField("unit_id", T.StringType()),
        T.StructField("arm", T.StringType()),  # treatment | control | switchback
        T.StructField("first_difference", T.DoubleType()),
        T.StructField("counterfactual_mean", T.DoubleType()),
        T.StructField("n_pre_days", T.IntegerType()),
        T.StructField("n_window_days", T.IntegerType()),
        T.StructField("pre_mean", T.DoubleType()),
        T.StructField("pre_sd", T.DoubleType()),
        T.StructField("pre_trend", T.DoubleType()),
        T.StructField("model", T.StringType()),
        # counterfactual chosen by back-test per pool (`choose_counterfactual`)
        T.StructField("pool", T.StringType()),
        T.StructField("counterfactual", T.StringType()),
        T.StructField("backtest_error", T.DoubleType()),
        T.StructField("candidate_fd", T.ArrayType(T.DoubleType())),
        T.StructField("candidate_error", T.ArrayType(T.DoubleType())),
        T.StructField("candidate_placebo", T.ArrayType(T.DoubleType())),
        # every back-test window's placebo per candidate, candidate-major (n_candidates x windows)
        T.StructField("candidate_placebo_windows", T.ArrayType(T.DoubleType())),
        T.StructField("candidate_carryover", T.ArrayType(T.DoubleType())),
        T.StructField("candidate_carryover_variance", T.ArrayType(T.DoubleType())),
        # regression-adjustment covariates and design details
        T.StructField("recent_mean", T.DoubleType()),
        T.StructField("placebo", T.DoubleType()),
        T.StructField("placebo_windows", T.ArrayType(T.DoubleType())),  # the chosen candidate's, per window
        T.StructField("recent_gap", T.DoubleType()),
        T.StructField("sequence", T.StringType()),
        T.StructField("carryover_difference", T.DoubleType()),
        T.StructField("carryover_variance", T.DoubleType()),  # its sampling variance, from the product's own days
        T.StructField("after_treated_share", T.DoubleType()),
        T.StructField("known_factors", T.StringType()),
        # issue 16: the metric of this row, and the observed mean of the metric on the product's
        # treated analysed days (NaN for a between design's controls): the relative effect's level
        T.StructField("metric", T.StringType()),
        T.StructField("treated_mean", T.DoubleType()),
        T.StructField("pre_price", T.DoubleType()),  # mean pre-period price (balance check)
        # effect over time (issue 16): the first difference and the treated days' mean from the
        # product's first CUMULATIVE_STEP_DAYS, 2x, ... window days on (the last: the whole window);
        # per candidate, candidate-major, until `choose_counterfactual` keeps the chosen one's
        T.StructField("cumulative_days", T.ArrayType(T.IntegerType())),
        T.StructField("candidate_cumulative", T.ArrayType(T.DoubleType())),
        T.StructField("cumulative_fd", T.ArrayType(T.DoubleType())),
        T.StructField("cumulative_treated_mean", T.ArrayType(T.DoubleType())),
    ]
)

# Counterfactual candidates, in this order in the candidate_* arrays. "trend+seasonality" is the
# history rule of `CounterfactualSettings` (own yearly model, or pooled shape, or own trend/level
# with weekday); "pooled" is the pool's shape for every product; "level_Kw" the mean of the last
# K weeks; "level_4w+weekday" that level with the product's weekday pattern; "blend" the mean of
# the history rule's and level_4w+weekday's predictions. The pooled shape competes only for products
# whose history is too short for their own yearly model: it is fitted on the whole pre-period of the
# pool, so for the others its back-test would have seen the stretches it predicts.
COUNTERFACTUALS = ("trend+seasonality", "pooled", "level_2w", "level_4w", "level_8w", "level_4w+weekday", "blend")
BLENDED = ("trend+seasonality", "level_4w+weekday")  # "blend" is the mean of these two predictions
# covariates of the regression adjustment (CUPED-style), when present in the first differences
CUMULATIVE_STEP_DAYS = 7  # effect over time: first differences from every week of window days on
MIN_FACTOR_DAYS = 7  # pre-period days a known factor must move on to be fitted
MAX_FACTOR_EFFECT = 5.0  # largest plausible known-factor effect, in units per unit of factor, x the product's mean
ADJUSTMENT_COVARIATES = ("pre_mean", "recent_mean", "placebo", "recent_gap")
# switchback designs: only covariates that do not depend on the product's own treated/control day
# pattern (the placebo and the gap are computed on that pattern, so they carry its assignment: a
# slope on them takes assignment-driven spread out of the bootstrap without taking it out of the
# estimate; in the simulator's crossovers that made the SE ~15% too small)
SWITCHBACK_ADJUSTMENT_COVARIATES = ("pre_mean", "recent_mean")


@dataclass(frozen=True)
class CounterfactualSettings:
    """How much history a product needs and which counterfactual model it gets.

    The history rule ("trend+seasonality"), by the number n of pre-period days the product has (at
    most `pre_days`):
    - n >= `yearly_min_days`: its own model, trend + day of week + one yearly harmonic;
    - `min_pre_days` <= n < `yearly_min_days` and its pool has >= `min_pool_products` products
      with a full-model history: pooled, y_it = a_i * s_pool(t), where s_pool is the pool's
      relative profile (trend, day of week, yearly harmonic fitted on those products' pre-period
      sales divided by their own pre-period mean) and a_i the product's own scale, fitted by
      least squares on its own pre-period days. The pool is the product's subclass when a
      catalogue is given, otherwise every product enrolled in the experiment;
    - same history but no usable pool: own trend + day of week when n >= `own_trend_min_days`,
      own level + day of week below that;
    - n < `min_pre_days`: no first difference; the product is left out (counted upstream).

    Back-test: every candidate of `COUNTERFACTUALS` predicts the `backtest_windows` stretches of
    the pre-period just before the experiment that have the experiment window's length, fitted
    only on days before each stretch (the seasonal shape and the known factors' effects, below,
    on the pre-period without the stretch: a stretch is predicted out of sample, as the window
    is, or its placebo errors would look smaller than the window's); its error is the mean square of the first difference it
    makes there with the product's own day pattern (a placebo: no treatment then). Per pool the
    candidate with the lowest mean error wins (`choose_counterfactual`).

    Known factors, removed before any candidate is fitted: trigger events (a product-day within
    `event_days` of the start of an event of the product) and the product's own untreated price
    (log price / (1 + price_change) on treated days): their effects in units are fitted on the
    product's pre-period alone (with its trend and seasonality), so an event or a promotion in the
    window is not mistaken for treatment or noise.
    """

    pre_days: int = 365
    min_pre_days: int = 14
    yearly_min_days: int = 300
    own_trend_min_days: int = 91
    min_pool_products: int = 5
    backtest_windows: int = 3
    event_days: int = 7
    known_factors: bool = True


_TREND_EPOCH = pd.Timestamp("2020-01-01")  # origin of the pooled profile's trend (years)
POOL_PROFILE_SCHEMA = T.StructType(
    [
        T.StructField("experiment", T.StringType()),
        T.StructField("pool", T.StringType()),
        T.StructField("pool_coef", T.ArrayType(T.DoubleType())),
        T.StructField("pool_products", T.IntegerType()),
    ]
)


def _days(dates) -> np.ndarray:
    """Dates (date objects, strings or datetime64) as datetime64[D]."""
    return pd.to_datetime(pd.Series(dates)).to_numpy().astype("datetime64[D]")


def _design_matrix(day_index: np.ndarray, days: np.ndarray, yearly: bool, trend: bool = True) -> np.ndarray:
    """Columns: 1, (trend: day_index / 365), weekday dummies Tue..Sun, (yearly: sin, cos of day of year)."""
    dow = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    columns = [np.ones(len(days))] + ([day_index / 365.0] if trend else [])
    columns += [(dow == d).astype(float) for d in range(1, 7)]
    if yearly:
        doy = (days - days.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64) + 1
        angle = 2 * np.pi * doy / 365.25
        columns += [np.sin(angle), np.cos(angle)]
    return np.column_stack(columns)


def _profile_matrix(days: np.ndarray) -> np.ndarray:
    """Design of the pooled relative profile: trend in years since a fixed epoch, weekday, yearly."""
    day_index = (days - np.datetime64(_TREND_EPOCH.date(), "D")).astype(np.int64).astype(float)
    return _design_matrix(day_index, days, yearly=True)


def pool_profile(pre_rows: pd.DataFrame, settings: CounterfactualSettings) -> pd.DataFrame:
    """The relative demand profile of one pool (experiment, pool) from its long-history products.

    `pre_rows`: pre-period rows (experiment, pool, product_id, date, y) of every product of the
    pool. Products with >= `yearly_min_days` pre-period days and a positive mean contribute
    y / (their pre-period mean); the profile is an OLS fit of that on trend, weekday and a yearly
    harmonic. Returns one row (experiment, pool, pool_coef, pool_products); pool_coef is empty
    when fewer than `min_pool_products` products qualify.
    """
    # Spark hands a group's rows over in no fixed order, and a least-squares fit of the same rows in
    # another order differs by ~1e-14, which the forest magnifies: fit them in one canonical order.
    pre_rows = pre_rows.sort_values(["product_id", "date"], kind="stable").reset_index(drop=True)
    days = pre_rows.groupby("product_id")["y"].transform("size")
    level = pre_rows.groupby("product_id")["y"].transform("mean")
    usable = pre_rows[(days >= settings.yearly_min_days) & (level > 0)]
    n_products = int(usable["product_id"].nunique())
    coef: list[float] = []
    if n_products >= settings.min_pool_products:
        relative = usable["y"].to_numpy(float) / level[usable.index].to_numpy(float)
        coef = np.linalg.lstsq(_profile_matrix(_days(usable["date"])), relative, rcond=None)[0].tolist()
    return pd.DataFrame(
        [{"experiment": pre_rows["experiment"].iloc[0], "pool": pre_rows["pool"].iloc[0],
          "pool_coef": coef, "pool_products": n_products}]
    )


def _empty_first_difference() -> pd.DataFrame:
    return pd.DataFrame(columns=[f.name for f in FIRST_DIFFERENCE_SCHEMA.fields])


def _weekday(days: np.ndarray) -> np.ndarray:
    return (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0


class _Candidates:
    """Fits and predictions of every counterfactual candidate for one product's (adjusted) series."""

    def __init__(self, family: str, pool_coef, settings: CounterfactualSettings):
        self.family, self.pool_coef, self.settings = family, pool_coef, settings

    def _own(self, fit_days, fit_y, target_days, origin, yearly: bool, trend: bool):
        fit_index = (fit_days - origin).astype(np.int64).astype(float)
        target_index = (target_days - origin).astype(np.int64).astype(float)
        design = _design_matrix(fit_index, fit_days, yearly, trend)
        if len(fit_y) < 2 * design.shape[1]:
            return None, 0.0
        coef, *_ = np.linalg.lstsq(design, fit_y, rcond=None)
        return _design_matrix(target_index, target_days, yearly, trend) @ coef, (coef[1] if trend else 0.0)

    def _pooled(self, fit_days, fit_y, target_days):
        if self.pool_coef is None:
            return None, 0.0
        shape_fit = _profile_matrix(fit_days) @ self.pool_coef
        scale = float(shape_fit @ fit_y / max(float(shape_fit @ shape_fit), 1e-12))
        return scale * (_profile_matrix(target_days) @ self.pool_coef), scale * self.pool_coef[1]

    def seasonal_shape(self, days, y, origin) -> None:
        """Fix the own yearly model's weekday and yearly shape from `days` (for a back-test window:
        the pre-period without that window, before and after it): the back-test's shorter fits then
        refit only level and trend on the days before the window (a yearly harmonic is not
        identified from a few months), so the candidate is judged as it is used, and the window
        it predicts never enters its fit."""
        self.shape = None
        if self.family == "trend+weekly+yearly":
            index = (days - origin).astype(np.int64).astype(float)
            design = _design_matrix(index, days, True, True)
            if len(y) >= 2 * design.shape[1]:
                self.shape = np.linalg.lstsq(design, y, rcond=None)[0][2:]

    def _own_yearly(self, fit_days, fit_y, target_days, origin):
        if getattr(self, "shape", None) is None:
            return self._own(fit_days, fit_y, target_days, origin, True, True)
        fit_index = (fit_days - origin).astype(np.int64).astype(float)
        target_index = (target_days - origin).astype(np.int64).astype(float)
        seasonal_fit = _design_matrix(fit_index, fit_days, True, True)[:, 2:] @ self.shape
        level_trend = np.column_stack([np.ones(len(fit_days)), fit_index / 365.0])
        coef, *_ = np.linalg.lstsq(level_trend, fit_y - seasonal_fit, rcond=None)
        target = _design_matrix(target_index, target_days, True, True)
        return target[:, :2] @ coef + target[:, 2:] @ self.shape, coef[1]

    def predict(self, name: str, fit_days, fit_y, target_days, origin):
        """(prediction on target_days, trend per year) or (None, 0) when the candidate cannot fit."""
        if len(fit_y) < self.settings.min_pre_days:
            return None, 0.0
        if name == "trend+seasonality":
            if self.family == "trend+weekly+yearly":
                return self._own_yearly(fit_days, fit_y, target_days, origin)
            if self.family == "pooled":
                return self._pooled(fit_days, fit_y, target_days)
            return self._own(fit_days, fit_y, target_days, origin, False, self.family == "trend+weekly")
        if name == "pooled":
            return self._pooled(fit_days, fit_y, target_days)
        cutoff = fit_days.max() + 1
        if name.startswith("level_"):
            weeks = int(name[len("level_"):].split("w")[0])
            recent = fit_days >= cutoff - 7 * weeks
            if recent.sum() < 7 * weeks // 2:
                return None, 0.0
            level = float(fit_y[recent].mean())
            if not name.endswith("+weekday"):
                return np.full(len(target_days), level), 0.0
            dow = _weekday(fit_days)
            deviation = fit_y - fit_y.mean()
            counts = np.bincount(dow, minlength=7)
            offset = np.where(counts > 0, np.bincount(dow, weights=deviation, minlength=7) / np.maximum(counts, 1), 0.0)
            return level - offset[dow[recent]].mean() + offset[_weekday(target_days)], 0.0
        raise ValueError(f"unknown counterfactual candidate {name!r}")


def _window_statistic(residual: np.ndarray, role: np.ndarray, switchback: bool) -> float:
    """The first difference of residuals on days with role 1 (treated) / 0 (control)."""
    if switchback:
        treated, control = role == 1, role == 0
        if not treated.any() or not control.any():
            return np.nan
        return float(residual[treated].mean() - residual[control].mean())
    used = role >= 0
    return float(residual[used].mean()) if used.any() else np.nan


def _after_treated(window_days: np.ndarray, all_days: np.ndarray, all_treated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window day: (the previous calendar day is enrolled, it was treated)."""
    previous = window_days - 1
    position = np.searchsorted(all_days, previous)
    known = (position < len(all_days)) & (all_days[np.minimum(position, len(all_days) - 1)] == previous)
    previous_treated = np.where(known, all_treated[np.minimum(position, len(all_days) - 1)], False)
    return known, previous_treated


def _carryover_difference(residual: np.ndarray, role: np.ndarray, known: np.ndarray,
                          previous_treated: np.ndarray) -> tuple[float, float]:
    """Mean residual of control days right after a treated day minus control days after a control
    day, and that difference's sampling variance (pooled within-group variance of the two sets of
    days; `carryover_check` weights products by it)."""
    control = role == 0
    after_treated, after_control = control & known & previous_treated, control & known & ~previous_treated
    n_t, n_c = int(after_treated.sum()), int(after_control.sum())
    if not n_t or not n_c:
        return np.nan, np.nan
    first, second = residual[after_treated], residual[after_control]
    variance = np.nan
    if n_t + n_c > 2:
        within = (((first - first.mean()) ** 2).sum() + ((second - second.mean()) ** 2).sum()) / (n_t + n_c - 2)
        variance = float(within * (1 / n_t + 1 / n_c))
    return float(first.mean() - second.mean()), variance


def _known_factor_columns(panel: pd.DataFrame, in_window: np.ndarray, settings: CounterfactualSettings):
    """The known factors (trigger event in force, untreated log price) as columns, or (None, []).

    A factor is identified only if it moved on enough pre-period days, and it is never
    extrapolated beyond the range the pre-period saw (a regular-price step after a flat history
    would be)."""
    factors, names = [], []
    if settings.known_factors:
        for column in ("event_on", "log_price"):
            if column not in panel.columns:
                continue
            values = panel[column].to_numpy(dtype=float)
            if column == "log_price":
                reference = np.nanmedian(values[~in_window]) if np.isfinite(values[~in_window]).any() else np.nan
                values = values - reference
            values = np.where(np.isfinite(values), values, 0.0)
            pre_values = values[~in_window]
            if (np.abs(pre_values - np.median(pre_values)) > 1e-9).sum() >= MIN_FACTOR_DAYS:
                factors.append(np.clip(values, pre_values.min(), pre_values.max()))
                names.append("event" if column == "event_on" else "price")
    return (np.column_stack(factors) if factors else None), names


def _remove_known_factors(y: np.ndarray, factors: np.ndarray | None, names: list[str], days: np.ndarray,
                          fit: np.ndarray, yearly: bool, trend: bool) -> tuple[np.ndarray, list[str]]:
    """y minus the known factors' effects in units, fitted on the `fit` days with the product's own
    trend and seasonality; returns (adjusted y, names of the factors removed).

    A factor whose fitted effect is implausible (more than MAX_FACTOR_EFFECT x the product's mean
    per unit: an elasticity beyond 5, an event more than doubling sales) is confounded with
    something else in a short history: left out."""
    if factors is None or not np.any(fit):  # nothing to fit on (a back-test window at the history's start)
        return y, []
    fit_days, fit_y = days[fit], y[fit]
    index = (fit_days - fit_days.max()).astype(np.int64).astype(float)
    base = _design_matrix(index, fit_days, yearly, trend)
    design = np.column_stack([base, factors[fit]])
    if len(fit_y) < 2 * design.shape[1]:
        return y, []
    coef, *_ = np.linalg.lstsq(design, fit_y, rcond=None)
    effect = coef[base.shape[1]:]
    plausible = np.abs(effect) <= MAX_FACTOR_EFFECT * max(abs(float(fit_y.mean())), 1e-9)
    return y - factors[:, plausible] @ effect[plausible], [n for n, ok in zip(names, plausible) if ok]


def _history_family(n_pre: int, has_pool: bool, settings: CounterfactualSettings) -> str:
    """The history rule's model family: a year of history fits trend, weekly and yearly shape; a
    short history borrows its pool's shape, else its own trend (or level) with the weekly shape."""
    if n_pre >= settings.yearly_min_days:
        return "trend+weekly+yearly"
    if has_pool:
        return "pooled"
    return "trend+weekly" if n_pre >= settings.own_trend_min_days else "level+weekly"


def _backtest_adjusted_pre(y, factors, factor_names, days, in_window, outside, with_yearly, with_trend) -> np.ndarray:
    """The pre-period with the known factors removed by a fit that leaves out a back-test window's
    own days (`outside` False), so that window is predicted out of sample as the experiment's is."""
    fit_days = ~in_window
    fit_days[np.flatnonzero(~in_window)[~outside]] = False
    return _remove_known_factors(y, factors, factor_names, days, fit_days, with_yearly, with_trend)[0][~in_window]


def _backtest_statistics(candidates, name: str, pre_days, origin, span: int, role_by_offset, backtest_shapes, backtest_pre,
                         window_shape, switchback: bool) -> np.ndarray:
    """Candidate `name`'s placebo first difference in each back-test window of the pre-period
    (the window's length, 1, 2, ... lengths before the experiment), NaN where it cannot predict."""
    out = np.full(len(backtest_shapes), np.nan)
    for j in range(1, len(backtest_shapes) + 1):
        start = origin - j * span
        fit, target = pre_days < start, (pre_days >= start) & (pre_days < start + span)
        if not target.any():
            continue
        role = role_by_offset[(pre_days[target] - start).astype(np.int64)]
        candidates.shape, adj_pre_j = backtest_shapes[j - 1], backtest_pre[j - 1]
        predicted_bt, _ = candidates.predict(name, pre_days[fit], adj_pre_j[fit], pre_days[target], start)
        candidates.shape = window_shape
        if predicted_bt is None:
            continue
        out[j - 1] = _window_statistic(adj_pre_j[target] - predicted_bt, role, switchback)
    return out


def _with_blend(fd, carry, cumulative, backtest) -> tuple[np.ndarray, np.ndarray]:
    """Fill the blend candidate in place: the mean of the history rule's and the recent level's
    predictions (their errors are far from perfectly correlated; every statistic is linear in the
    prediction). Returns each candidate's first placebo and its mean squared back-test error."""
    blend, parts = COUNTERFACTUALS.index("blend"), [COUNTERFACTUALS.index(n) for n in BLENDED]
    fd[blend], carry[blend] = fd[parts].mean(), carry[parts].mean()
    cumulative[blend] = cumulative[parts].mean(axis=0)
    backtest[blend] = backtest[parts].mean(axis=0)
    placebo = backtest[:, 0].copy()
    finite = np.isfinite(backtest)
    error = np.where(finite.any(axis=1), np.nansum(np.where(finite, backtest ** 2, 0.0), axis=1) / np.maximum(finite.sum(axis=1), 1), np.nan)
    return placebo, error


def product_first_difference(
    panel: pd.DataFrame, switchback: bool, settings: CounterfactualSettings, pool_coef=None
) -> pd.DataFrame:
    """One product's first difference from its rows (date, y, arm, blackout, in_window[, event_on, log_price]).

    `arm` is null on pre-period rows. `pool_coef` is its pool's profile (`pool_profile`), used
    when the product's own history is short (rule in `CounterfactualSettings`); when None, a
    `pool_coef` column of the panel is used if present. `event_on` (trigger event in force) and
    `log_price` (untreated log price) are the known factors. Every candidate of
    `COUNTERFACTUALS` gives a first difference (`candidate_fd`) and a back-test error
    (`candidate_error`); `first_difference` is the history rule's until `choose_counterfactual`
    picks per pool. Returns an empty frame when the product lacks history or (switchback) lacks
    either arm in the window.

    Still long (about 140 lines; the family rule, the back-test fits and statistics and the blend
    are helpers): the candidate loop shares a dozen per-product arrays with the output row, whose
    forty fields are the first-differences contract; cutting it further would pass them all around.
    """
    panel = panel.sort_values("date")
    if pool_coef is None and "pool_coef" in panel.columns:
        pool_coef = panel["pool_coef"].iloc[0]
    pool_coef = None if pool_coef is None or len(pool_coef) == 0 else np.asarray(pool_coef, dtype=float)
    in_window = panel["in_window"].astype(bool).to_numpy()
    blackout = panel["blackout"].astype(bool).to_numpy()
    used = in_window & ~blackout
    n_pre = int((~in_window).sum())
    if n_pre < settings.min_pre_days or not used.any():
        return _empty_first_difference()
    days = _days(panel["date"])
    y = panel["y"].to_numpy(dtype=float)
    treated_all = (panel["arm"] == "treatment").to_numpy() & in_window
    pre_days, pre_y = days[~in_window], y[~in_window]
    window_days = days[used]
    family = _history_family(n_pre, pool_coef is not None, settings)

    # known factors: effects in units fitted on the pre-period with the product's own trend/seasonality
    factors, factor_names = _known_factor_columns(panel, in_window, settings)
    with_yearly, with_trend = family == "trend+weekly+yearly", family != "level+weekly"
    adjusted, names = _remove_known_factors(y, factors, factor_names, days, ~in_window, with_yearly, with_trend)
    adj_pre = adjusted[~in_window]

    origin = window_days.min()
    span = int((days[in_window].max() - origin).astype(np.int64)) + 1
    role_by_offset = np.full(span, -1)
    role_by_offset[(window_days - origin).astype(np.int64)] = np.where(treated_all[used], 1, 0)
    window_role = role_by_offset[(window_days - origin).astype(np.int64)]
    known_previous, previous_treated = _after_treated(window_days, days[in_window], treated_all[in_window])
    control_days = window_role == 0
    after_treated_share = float((known_previous & previous_treated & control_days).sum() / max(control_days.sum(), 1))
    candidates = _Candidates(family, pool_coef, settings)
    # a back-test window is predicted as the experiment window is: its known-factor effects and
    # seasonal shape are fitted without its own days (in-sample effects would make the placebo
    # errors, hence the back-test errors and the spillover's common error, look smaller than the
    # window's)
    backtest_shapes, backtest_pre = [], []
    for j in range(1, settings.backtest_windows + 1):
        start = origin - j * span
        outside = (pre_days < start) | (pre_days >= start + span)
        adj_pre_j = adj_pre if factors is None else _backtest_adjusted_pre(
            y, factors, factor_names, days, in_window, outside, with_yearly, with_trend)
        candidates.seasonal_shape(pre_days[outside], adj_pre_j[outside], origin)
        backtest_shapes.append(candidates.shape)
        backtest_pre.append(adj_pre_j)
    candidates.seasonal_shape(pre_days, adj_pre, origin)
    window_shape = candidates.shape
    n_candidates = len(COUNTERFACTUALS)
    # days since the product's first window day (blackout days included: a crossover's first analysed day is day 7)
    window_start = days[in_window].min()
    offsets = (window_days - window_start).astype(np.int64)
    window_span = int((days[in_window].max() - window_start).astype(np.int64)) + 1
    cutoffs = list(range(CUMULATIVE_STEP_DAYS, window_span, CUMULATIVE_STEP_DAYS)) + [window_span]
    cumulative = np.full((n_candidates, len(cutoffs)), np.nan)
    fd, carry = np.full(n_candidates, np.nan), np.full(n_candidates, np.nan)
    carry_variance = np.full(n_candidates, np.nan)
    backtest = np.full((n_candidates, settings.backtest_windows), np.nan)  # placebo first difference per window
    rule_prediction, rule_trend = None, 0.0
    for k, name in enumerate(COUNTERFACTUALS):
        if name == "blend" or (name == "pooled" and family == "trend+weekly+yearly"):
            continue  # the blend is formed below; see COUNTERFACTUALS for the pooled shape
        predicted, trend = candidates.predict(name, pre_days, adj_pre, window_days, origin)
        if predicted is None:
            continue
        residual = adjusted[used] - predicted
        fd[k] = _window_statistic(residual, window_role, switchback)
        for c, cutoff in enumerate(cutoffs):
            early = offsets < cutoff
            cumulative[k, c] = _window_statistic(residual[early], window_role[early], switchback)
        if name == "trend+seasonality":
            rule_prediction, rule_trend = predicted, trend
        if switchback:
            carry[k], carry_variance[k] = _carryover_difference(residual, window_role, known_previous, previous_treated)
        backtest[k] = _backtest_statistics(candidates, name, pre_days, origin, span, role_by_offset, backtest_shapes,
                                           backtest_pre, window_shape, switchback)
    placebo, error = _with_blend(fd, carry, cumulative, backtest)
    carry_variance[COUNTERFACTUALS.index("blend")] = carry_variance[[COUNTERFACTUALS.index(n) for n in BLENDED]].mean()
    if rule_prediction is None or not np.isfinite(fd[0]):
        return _empty_first_difference()
    first_window = panel.loc[used].iloc[0]
    if switchback:
        arm = "switchback"
        crossover = "design" in panel.columns and panel["design"].iloc[0] == "crossover"
        sequence = ("treatment_first" if first_window["arm"] == "treatment" else "control_first") if crossover else arm
    else:
        arm = "treatment" if treated_all[used].mean() >= 0.5 else "control"
        sequence = arm
    recent = pre_days >= pre_days.max() - 27
    return pd.DataFrame(
        [
            {
                "experiment": panel["experiment"].iloc[0],
                "product_id": panel["product_id"].iloc[0],
                "unit_id": first_window["unit_id"],
                "arm": arm,
                "first_difference": float(fd[0]),
                "counterfactual_mean": float(rule_prediction.mean()),
                "n_pre_days": n_pre,
                "n_window_days": int(used.sum()),
                "pre_mean": float(pre_y.mean()),
                "pre_sd": float(pre_y.std(ddof=1)) if len(pre_y) > 1 else 0.0,
                "pre_trend": float(rule_trend),
                "model": family,
                "pool": str(panel["pool"].iloc[0]) if "pool" in panel.columns else "",
                "counterfactual": "trend+seasonality",
                "backtest_error": float(error[0]),
                "candidate_fd": fd.tolist(),
                "candidate_error": error.tolist(),
                "candidate_placebo": placebo.tolist(),
                "candidate_placebo_windows": backtest.ravel().tolist(),
                "candidate_carryover": carry.tolist(),
                "candidate_carryover_variance": carry_variance.tolist(),
                "recent_mean": float(adj_pre[recent].mean()),
                "placebo": float(placebo[0]),
                "placebo_windows": backtest[0].tolist(),
                "recent_gap": np.nan,
                "sequence": sequence,
                "carryover_difference": float(carry[0]),
                "carryover_variance": float(carry_variance[0]),
                "after_treated_share": after_treated_share if switchback else np.nan,
                "known_factors": ",".join(names),
                "metric": str(panel["metric"].iloc[0]) if "metric" in panel.columns else "",
                "treated_mean": float(y[used][window_role == 1].mean()) if (window_role == 1).any() else np.nan,
                "pre_price": _pre_price(panel, in_window),
                "cumulative_days": [int(c) for c in cutoffs],
                "candidate_cumulative": cumulative.ravel().tolist(),
                "cumulative_fd": cumulative[0].tolist(),
                "cumulative_treated_mean": [
                    float(y[used][(window_role == 1) & (offsets < c)].mean()) if ((window_role == 1) & (offsets < c)).any() else np.nan
                    for c in cutoffs
                ],
            }
        ]
    )


def _pre_price(panel: pd.DataFrame, in_window: np.ndarray) -> float:
    """Mean pre-period price of a product (from its untreated log price), NaN without prices."""
    if "log_price" not in panel.columns:
        return np.nan
    values = panel["log_price"].to_numpy(dtype=float)[~in_window]
    values = values[np.isfinite(values)]
    return float(np.exp(values).mean()) if len(values) else np.nan


def choose_counterfactual(first_differences: pd.DataFrame) -> pd.DataFrame:
    """Per (experiment, pool): the candidate counterfactual with the lowest mean back-test error.

    A product for which the chosen candidate cannot be fitted keeps the history rule
    ("trend+seasonality"); so does its back-test error in the comparison. The chosen candidate's
    first difference, placebo and carryover difference replace the rule's; `counterfactual` names it;
    `recent_gap` (a covariate) is the chosen first difference minus the 4-week level's.
    """
    if first_differences.empty:
        return first_differences
    out = []
    keys = ["experiment", "metric", "pool"] if "metric" in first_differences.columns else ["experiment", "pool"]
    for _, rows in first_differences.groupby(keys, sort=False):
        fd = np.array(rows["candidate_fd"].tolist(), dtype=float)
        error = np.array(rows["candidate_error"].tolist(), dtype=float)
        usable = np.isfinite(fd) & np.isfinite(error)
        fallback = np.where(np.isfinite(error[:, :1]), error[:, :1], np.nan)
        score = np.where(usable, error, fallback)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_error = np.nanmean(score, axis=0)
        best = int(np.nanargmin(mean_error)) if np.isfinite(mean_error).any() else 0
        take = np.where(usable[:, best], best, 0)
        pick = lambda column: np.array(rows[column].tolist(), dtype=float)[np.arange(len(rows)), take]  # noqa: E731
        chosen_fd = pick("candidate_fd")
        windows = np.array(rows["candidate_placebo_windows"].tolist(), dtype=float).reshape(len(rows), fd.shape[1], -1)
        cumulative = [np.asarray(v, dtype=float).reshape(fd.shape[1], -1)[t] for v, t in zip(rows["candidate_cumulative"], take)]
        recent = fd[:, COUNTERFACTUALS.index("level_4w")]
        out.append(rows.assign(
            first_difference=chosen_fd, placebo=pick("candidate_placebo"),
            placebo_windows=list(windows[np.arange(len(rows)), take]),
            cumulative_fd=cumulative,
            recent_gap=np.where(np.isfinite(recent), chosen_fd - recent, 0.0),
            carryover_difference=pick("candidate_carryover"), carryover_variance=pick("candidate_carryover_variance"),
            backtest_error=error[np.arange(len(rows)), take],
            counterfactual=np.where(take == best, COUNTERFACTUALS[best], COUNTERFACTUALS[0]),
        ))
    return pd.concat(out).loc[first_differences.index]


def _event_days_spark(events: DataFrame, event_days: int) -> DataFrame:
    """(product_id, date, event_on=True) for every day within `event_days` of an event's start."""
    return (
        events.select(F.col("product_id").cast("string").alias("product_id"), F.to_date("date").alias("start"))
        .select("product_id", F.explode(F.sequence("start", F.date_add("start", event_days - 1))).alias("date"))
        .distinct()
        .withColumn("event_on", F.lit(1.0))
    )


def _check_metric(experiment: str, metric: str, columns, costs_given: bool) -> None:
    missing = [c for c in metric_rules.sales_columns_needed(metric) if c not in columns]
    if metric == "revenue" and "revenue" in columns:
        missing = []
    if missing:
        raise ValueError(f"experiment '{experiment}': metric '{metric}' needs sales column(s) {missing} (sales has {list(columns)})")
    if metric == "profit" and not costs_given:
        raise ValueError(f"experiment '{experiment}': metric 'profit' needs unit costs (experiment file `costs:` or catalogue `unit_cost`)")


def _experiment_panel(
    sales: DataFrame, enrolled: DataFrame, assignments: DataFrame, experiment: str, design: str, metric: str,
    settings: CounterfactualSettings, unit_costs: DataFrame | None = None,
) -> DataFrame:
    window = enrolled.where(F.col("experiment") == experiment)
    _check_metric(experiment, metric, sales.columns, unit_costs is not None)
    price = [F.col("price").cast("double").alias("price")] if "price" in sales.columns else []
    columns = ["experiment", "product_id", "date", "unit_id", "arm", "blackout"]
    columns += ["price_change"] if "price_change" in assignments.columns else []
    needed = [c for c in ("units", "revenue") if c in sales.columns and c != metric]
    source = sales.select("product_id", "date", F.col(metric).cast("double").alias("y"), *price) if metric in sales.columns else (
        sales.select("product_id", "date", *price, *needed))
    panel = (
        source
        .join(window, "product_id")
        .where((F.col("date") >= F.date_sub("first_day", settings.pre_days)) & (F.col("date") <= F.col("last_day")))
        .join(assignments.select(*columns), ["experiment", "product_id", "date"], "left")
        .withColumn("in_window", F.col("date") >= F.col("first_day"))
        # a window day without an assignment row is outside the product's enrolment: drop it
        .where(~F.col("in_window") | F.col("arm").isNotNull())
        .withColumn("blackout", F.coalesce("blackout", F.lit(False)))
        .withColumn("switchback", F.lit(design in SWITCHBACK_DESIGNS))
        .withColumn("design", F.lit(design))
        .withColumn("metric", F.lit(metric))
        .drop("first_day", "last_day")
    )
    if metric not in sales.columns:  # revenue / profit from price and units (`metrics.metric_column_spark`)
        if metric == "profit":
            costs = unit_costs.where(F.col("experiment") == experiment).select("product_id", "unit_cost", "margin_rate")
            panel = panel.join(costs, "product_id", "left")
        panel = panel.withColumn("y", metric_rules.metric_column_spark(metric, panel.columns)).drop(
            *[c for c in ("units", "revenue", "unit_cost", "margin_rate") if c in panel.columns])
    if price:
        change = F.coalesce(F.col("price_change"), F.lit(0.0)) if "price_change" in columns else F.lit(0.0)
        untreated = F.when(F.col("arm") == "treatment", F.col("price") / (1.0 + change)).otherwise(F.col("price"))
        panel = panel.withColumn("log_price", F.when(untreated > 0, F.log(untreated))).drop("price")
    return panel.drop("price_change") if "price_change" in columns else panel


def first_differences(
    sales: DataFrame,
    assignments: DataFrame,
    designs: dict[str, str],
    metrics: dict[str, str] | None = None,
    settings: CounterfactualSettings = CounterfactualSettings(),
    catalog: DataFrame | None = None,
    events: DataFrame | None = None,
    unit_costs: DataFrame | None = None,
) -> DataFrame:
    """Per (experiment, product): the detrended first difference, on Spark.

    `assignments` are the published rows (date, experiment, product_id, unit_id, arm, blackout,
    price_change); `designs` maps experiment -> design, `metrics` experiment -> outcome column
    (default units). Each product's pre-period is the `pre_days` before its first enrolled day.
    `catalog` (product_id, subclass) makes the subclass the pool for short-history products and
    for the back-test choice of counterfactual; without it the pool is the experiment's enrolment
    (see `CounterfactualSettings`). `events` (product_id, date, event: trigger events, for
    controls too) are a known factor, like the untreated price. Pool profiles are fitted per
    (experiment, pool) group, products per (experiment, product) group, the counterfactual is
    chosen per (experiment, pool).
    """
    metrics = metrics or {}
    enrolled = assignments.groupBy("experiment", "product_id").agg(
        F.min("date").alias("first_day"), F.max("date").alias("last_day")
    )
    parts = [
        _experiment_panel(sales, enrolled, assignments, experiment, design, metric, settings, unit_costs)
        for experiment, design in sorted(designs.items())
        for metric in _metric_list(metrics.get(experiment, "units"))
    ]
    if not parts:
        return sales.sparkSession.createDataFrame([], FIRST_DIFFERENCE_SCHEMA)
    panel = parts[0]
    for rows in parts[1:]:
        panel = panel.unionByName(rows)
    if events is not None:
        panel = (panel.join(_event_days_spark(events, settings.event_days), ["product_id", "date"], "left")
                 .withColumn("event_on", F.coalesce("event_on", F.lit(0.0))))
    if catalog is not None:
        pools = catalog.select(F.col("product_id").cast("string").alias("product_id"),
                               F.col("subclass").cast("string").alias("pool"))
        panel = panel.join(pools, "product_id", "left").withColumn("pool", F.coalesce("pool", F.lit("")))
    else:
        panel = panel.withColumn("pool", F.lit(""))
    profiles = (
        panel.where(~F.col("in_window"))
        .select("experiment", "metric", "pool", "product_id", "date", "y")
        .groupBy("experiment", "metric", "pool")
        .applyInPandas(lambda rows: pool_profile(rows, settings).assign(metric=rows["metric"].iloc[0]),
                       T.StructType(POOL_PROFILE_SCHEMA.fields + [T.StructField("metric", T.StringType())]))
        .drop("pool_products")
    )
    panel = panel.join(profiles, ["experiment", "metric", "pool"], "left")

    def run(group: pd.DataFrame) -> pd.DataFrame:
        return product_first_difference(group, bool(group["switchback"].iloc[0]), settings)

    def choose(group: pd.DataFrame) -> pd.DataFrame:
        return choose_counterfactual(group)[[f.name for f in FIRST_DIFFERENCE_SCHEMA.fields]]

    per_product = panel.groupBy("experiment", "metric", "product_id").applyInPandas(run, FIRST_DIFFERENCE_SCHEMA)
    return per_product.groupBy("experiment", "metric", "pool").applyInPandas(choose, FIRST_DIFFERENCE_SCHEMA)


def _metric_list(value) -> list[str]:
    """An experiment's metrics from `metrics=` of the first-difference functions: a name or a list."""
    return [value] if isinstance(value, str) else list(value)


def _event_days_pandas(events: pd.DataFrame, event_days: int) -> pd.DataFrame:
    start = pd.to_datetime(events["date"]).to_numpy().astype("datetime64[D]")
    product = events["product_id"].astype(str).to_numpy()
    offsets = np.arange(event_days)
    frame = pd.DataFrame({
        "product_id": np.repeat(product, event_days),
        "date": pd.to_datetime((start[:, None] + offsets[None, :]).ravel()),
    }).drop_duplicates()
    return frame.assign(event_on=1.0)


def _experiment_panel_pandas(sales: pd.DataFrame, rows: pd.DataFrame, experiment: str, design: str, metric: str,
                             settings: CounterfactualSettings, unit_costs, event_on, pools) -> pd.DataFrame:
    """One experiment's and metric's panel for `first_differences_pandas`: each enrolled product's
    pre-period and window days, its arm, the metric's values as y, the untreated log price and the
    known events, tagged with experiment, design, metric and pool."""
    span = rows.groupby("product_id")["date"].agg(first_day="min", last_day="max")
    if metric in sales.columns:
        keep = ["product_id", "date", metric] + (["price"] if "price" in sales.columns and metric != "price" else [])
        panel = sales[keep].rename(columns={metric: "y"})
    else:  # revenue / profit from price and units (`metrics.metric_values_pandas`)
        panel = sales[["product_id", "date", "price", "units"] + [c for c in ("revenue",) if c in sales.columns]]
    panel = panel.join(span, on="product_id", how="inner")
    panel = panel[(panel["date"] >= panel["first_day"] - pd.Timedelta(days=settings.pre_days)) & (panel["date"] <= panel["last_day"])]
    columns = ["product_id", "date", "unit_id", "arm", "blackout"] + (["price_change"] if "price_change" in rows.columns else [])
    panel = panel.merge(rows[columns], on=["product_id", "date"], how="left")
    panel["in_window"] = panel["date"] >= panel["first_day"]
    panel = panel[~panel["in_window"] | panel["arm"].notna()].drop(columns=["first_day", "last_day"])
    panel["blackout"] = panel["blackout"].eq(True)  # no assignment row (pre-period): not blackout
    if "y" not in panel.columns:
        if metric == "profit":
            costs = unit_costs[unit_costs["experiment"] == experiment][["product_id", "unit_cost", "margin_rate"]]
            panel = panel.merge(costs.assign(product_id=costs["product_id"].astype(str)), on="product_id", how="left")
        panel["y"] = metric_rules.metric_values_pandas(panel, metric)
        panel = panel.drop(columns=[c for c in ("units", "revenue", "unit_cost", "margin_rate") if c in panel.columns])
    if "price" in panel.columns:
        change = panel["price_change"].fillna(0.0) if "price_change" in panel.columns else 0.0
        untreated = np.where(panel["arm"] == "treatment", panel["price"] / (1.0 + change), panel["price"])
        with np.errstate(divide="ignore", invalid="ignore"):
            panel["log_price"] = np.where(untreated > 0, np.log(untreated), np.nan)
        panel = panel.drop(columns=["price"])
    panel = panel.drop(columns=[c for c in ("price_change",) if c in panel.columns])
    if event_on is not None:
        panel = panel.merge(event_on, on=["product_id", "date"], how="left")
        panel["event_on"] = panel["event_on"].fillna(0.0)
    panel["experiment"] = experiment
    panel["design"] = design
    panel["metric"] = metric
    panel["pool"] = panel["product_id"].map(pools).fillna("") if pools is not None else ""
    return panel


def first_differences_pandas(
    sales: pd.DataFrame,
    assignments: pd.DataFrame,
    designs: dict[str, str],
    metrics: dict[str, str] | None = None,
    settings: CounterfactualSettings = CounterfactualSettings(),
    catalog: pd.DataFrame | None = None,
    events: pd.DataFrame | None = None,
    unit_costs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """`first_differences` in pandas for small panels (notebooks, simulations): same rules, same
    per-pool and per-product functions, same output columns."""
    metrics = metrics or {}
    sales = sales.assign(date=pd.to_datetime(sales["date"]), product_id=sales["product_id"].astype(str))
    assignments = assignments.assign(date=pd.to_datetime(assignments["date"]))
    pools = (
        catalog.set_index(catalog["product_id"].astype(str))["subclass"].astype(str)
        if catalog is not None else None
    )
    event_on = _event_days_pandas(events, settings.event_days) if events is not None else None
    out = []
    jobs = [(e, d, m) for e, d in sorted(designs.items()) for m in _metric_list(metrics.get(e, "units"))]
    for experiment, design, metric in jobs:
        _check_metric(experiment, metric, sales.columns, unit_costs is not None)
        rows = assignments[assignments["experiment"] == experiment]
        if rows.empty:
            continue
        panel = _experiment_panel_pandas(sales, rows, experiment, design, metric, settings, unit_costs, event_on, pools)
        pre = panel[~panel["in_window"]]
        coef_by_pool = {
            pool: pool_profile(rows_of_pool, settings)["pool_coef"].iloc[0]
            for pool, rows_of_pool in pre.groupby("pool")
        }
        switchback = design in SWITCHBACK_DESIGNS
        for (pool, _), product_rows in panel.groupby(["pool", "product_id"]):
            out.append(product_first_difference(product_rows, switchback, settings, coef_by_pool.get(pool, [])))
    columns = [f.name for f in FIRST_DIFFERENCE_SCHEMA.fields]
    out = [frame for frame in out if not frame.empty]
    if not out:
        return pd.DataFrame(columns=columns)
    return choose_counterfactual(pd.concat(out, ignore_index=True)[columns])


def _in_product_order(fd: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by product (then experiment, arm): Spark returns them in no fixed order, and the
    folds, forests and bootstrap draws follow row order, so this makes estimates reproducible."""
    keys = [c for c in ("product_id", "experiment", "arm", "unit_id") if c in fd.columns]
    return fd.sort_values(keys, kind="stable").reset_index(drop=True)


CROSSOVER_SEQUENCES = ("treatment_first", "control_first")


def comparison_groups(fd: pd.DataFrame) -> np.ndarray:
    """The groups an estimate compares or balances: the arms of a between design; the two
    sequences of a crossover (treated first / control first), weighted equally so a period effect
    (demand in phase 1 vs phase 2) cancels even when the sequences hold unequal numbers of
    products, as with cluster units; one group for random days."""
    if (fd["arm"] == "switchback").any():
        if "sequence" in fd.columns and fd["sequence"].isin(CROSSOVER_SEQUENCES).all() and fd["sequence"].nunique() == 2:
            return fd["sequence"].to_numpy(dtype=object)
        return np.full(len(fd), "switchback", dtype=object)
    return fd["arm"].to_numpy(dtype=object)


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """OLS slopes of y on x (with intercept): the least-squares slopes are the ones that minimise
    the variance of the adjusted mean (a robust fit would serve the core and let the tails grow)."""
    design = np.column_stack([np.ones(len(y)), x])
    return np.linalg.lstsq(design, y, rcond=None)[0][1:]


def regression_adjustment(fd: pd.DataFrame, groups: np.ndarray, n_folds: int, rng: np.random.Generator,
                          covariates=None, pooled: bool = True) -> tuple[np.ndarray, float, list[str]]:
    """CUPED-style adjusted first differences: (values, variance reduction, covariates used).

    Every product gets y - (x - mean(x)) @ theta, mean(x) over all products of the experiment.
    `pooled` (the default): one theta for all arms, fitted (`_slopes`) on deviations from each
    comparison group's means (arm, or crossover sequence), so no difference between groups
    enters it; with randomised groups this is the classical regression adjustment, unbiased to
    first order. Otherwise theta is fitted per group (Lin's interacted regression). With
    `n_folds` > 1 it is cross-fitted: units are dealt to folds within each group and a fold's
    products get the slopes fitted on the other folds. In the simulator's markets the pooled
    in-sample fit gave the smallest errors (per-arm and cross-fitted slopes from ~100 products
    with lognormal levels were noisy enough to add error, most of all in crossovers, whose two
    sequences see a period effect with opposite signs). Covariates are
    pre-period figures (`ADJUSTMENT_COVARIATES`: pre-period mean, last-4-weeks mean, the
    placebo first difference of the stretch just before the window, and the gap between the
    chosen counterfactual's prediction and the 4-week level's, which lets the regression blend
    the two), so they cannot carry the
    treatment; switchback designs use `SWITCHBACK_ADJUSTMENT_COVARIATES` (the default when
    `covariates` is None). In a switchback design the adjustment leaves every comparison group's
    mean as it is (each product is its own control): it only takes the products' differing
    effects out of the bootstrap's spread. The variance reduction is 1 - var(adjusted) / var(raw)
    within groups.
    """
    if covariates is None:
        switchback = "arm" in fd.columns and bool((fd["arm"] == "switchback").any())
        covariates = SWITCHBACK_ADJUSTMENT_COVARIATES if switchback else ADJUSTMENT_COVARIATES
    y = fd["first_difference"].to_numpy(float)
    columns = [c for c in covariates if c in fd.columns]
    if not columns or len(y) < 4:
        return y, 0.0, []
    x, columns = covariate_matrix(fd, columns)
    if not columns:
        return y, 0.0, []
    centre = x.mean(axis=0)
    units = fd["unit_id"].astype(str).to_numpy()
    folds = _unit_folds(units, groups, n_folds, rng)
    adjusted = y.copy()
    if pooled:  # one slope for all arms, fitted on within-group deviations (no group difference enters)
        y_within, x_within = y.copy(), x.copy()
        for group in np.unique(groups):
            in_group = groups == group
            y_within[in_group] -= y[in_group].mean()
            x_within[in_group] -= x[in_group].mean(axis=0)
    for fold in range(n_folds):
        for group in [None] if pooled else np.unique(groups):
            in_group = np.ones(len(y), bool) if group is None else groups == group
            apply_to, fit_on = in_group & (folds == fold), in_group & ((folds != fold) if n_folds > 1 else True)
            if not apply_to.any() or fit_on.sum() < 3 * (len(columns) + 1):
                continue
            theta = _slopes(x_within[fit_on], y_within[fit_on]) if pooled else _slopes(x[fit_on], y[fit_on])
            adjusted[apply_to] = y[apply_to] - (x[apply_to] - centre) @ theta
    within = lambda v: float(sum(((v[groups == g] - v[groups == g].mean()) ** 2).sum() for g in np.unique(groups)))  # noqa: E731
    raw = within(y)
    return adjusted, (1.0 - within(adjusted) / raw) if raw > 0 else 0.0, columns


def covariate_matrix(fd: pd.DataFrame, columns) -> tuple[np.ndarray, list[str]]:
    """The regression adjustment's covariates as an (n x k) matrix: missing values set to the
    column's median, constant columns dropped; returns (matrix, the columns kept)."""
    columns = [c for c in columns if c in fd.columns]
    x = fd[columns].to_numpy(float) if columns else np.zeros((len(fd), 0))
    for j in range(x.shape[1]):
        bad = ~np.isfinite(x[:, j])
        if bad.any():
            x[bad, j] = np.nanmedian(x[:, j]) if (~bad).any() else 0.0
    varying = x.std(axis=0) > 1e-12 if len(x) else np.zeros(x.shape[1], bool)
    return x[:, varying], [c for c, v in zip(columns, varying) if v]


MIN_BOOTSTRAP_BLOCKS = 20  # fewer substitute clusters than this: resample units (a block bootstrap over a handful of blocks has too few degrees of freedom)


class BootstrapBlocks:
    """Which randomisation units are resampled together.

    Without clusters every unit is its own block, resampled within its comparison group (arm or
    crossover sequence). With `clusters` (product_id, cluster_id: the substitution clusters of the
    snapshot in force) a unit belongs to the cluster of its first product, and within each
    comparison group the cluster's units there are resampled together: products of one cluster
    share their substitutes' prices, so in a product-randomised experiment their errors are
    correlated (in a crossover, two substitutes in one sequence both carry minus their cross
    effect), which a product bootstrap misses. Resampling stays within group because the
    randomisation put products, not clusters, into the groups (a shared draw across groups would
    treat each cluster's split as fixed and lose that variance). Blocks are used only in switchback
    designs, where every product is its own control so a trait its cluster shares (similar
    products sell alike) cancels: in a between design products of one cluster land in both arms
    by chance, such a trait is ordinary product-level variance, and resampling clusters would
    overstate the SE. And only when they are coarser than the units and at least
    `MIN_BOOTSTRAP_BLOCKS` of them hold data.
    """

    def __init__(self, fd: pd.DataFrame, clusters: pd.DataFrame | None = None):
        units = fd["unit_id"].astype(str).to_numpy()
        self.blocks = None
        self.block_of_unit = None
        switchback = "arm" in fd.columns and bool((fd["arm"] == "switchback").any())
        if switchback and clusters is not None and len(clusters) and len(fd):
            cluster_of = clusters.assign(product_id=clusters["product_id"].astype(str)).drop_duplicates("product_id")
            cluster_of = cluster_of.set_index("product_id")["cluster_id"].astype(str)
            block = fd["product_id"].astype(str).map(cluster_of)
            block = block.where(block.notna(), "unit:" + pd.Series(units, index=fd.index)).to_numpy(dtype=object)
            first = pd.Series(block).groupby(units, sort=False).first()  # a unit lies in one block
            block = first.reindex(units).to_numpy(dtype=object)
            n_blocks, n_units = len(np.unique(block)), len(np.unique(units))
            if MIN_BOOTSTRAP_BLOCKS <= n_blocks < n_units:
                self.blocks, self.block_of_unit = block, first
        self.n_blocks = len(np.unique(self.blocks)) if self.blocks is not None else len(np.unique(units))
        self.kind = "clusters" if self.blocks is not None else "units"

    def weights(self, group_units: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
        """(n_bootstrap x len(group_units)) bootstrap counts of one group's units: its blocks
        resampled with replacement, each unit weighted by its block's count."""
        if self.blocks is None:
            return resample_counts(len(group_units), n_bootstrap, rng)
        block_ids, index = np.unique(self.block_of_unit.reindex(group_units).to_numpy(dtype=object), return_inverse=True)
        return resample_counts(len(block_ids), n_bootstrap, rng)[:, index]


def resample_counts(k: int, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """(n_bootstrap x k) bootstrap counts of k units (or blocks) of one comparison group: k - 1 of
    them drawn with replacement (Rao and Wu's rescaled bootstrap for stratified samples, m = k - 1).

    Drawing k of k makes the variance of a resampled mean (k - 1)/k times the unbiased s^2/k;
    with the ~15-25 randomisation units an arm holds in a small experiment that alone cut the SE
    by 2-3% per group. Drawing k - 1 makes it exactly s^2/k, the textbook variance of a mean."""
    return rng.multinomial(max(k - 1, 1), np.full(k, 1.0 / k), size=n_bootstrap).astype(float)


def _group_means_and_draws(units: np.ndarray, values: np.ndarray, mask: np.ndarray, n_bootstrap: int,
                           rng: np.random.Generator, blocks: BootstrapBlocks | None = None) -> tuple[float, np.ndarray, int]:
    """Mean of `values` over rows in `mask` and its bootstrap draws (units, or their blocks, resampled with replacement)."""
    group_units, row = np.unique(units[mask], return_inverse=True)
    sums = np.bincount(row, weights=values[mask], minlength=len(group_units))
    counts = np.bincount(row, minlength=len(group_units)).astype(float)
    if blocks is None:
        draws = resample_counts(len(group_units), n_bootstrap, rng)
    else:
        draws = blocks.weights(group_units, n_bootstrap, rng)
    return float(sums.sum() / counts.sum()), (draws @ sums) / np.maximum(draws @ counts, 1e-12), len(group_units)


def _balanced_effect(units: np.ndarray, values: np.ndarray, groups: np.ndarray, switchback: bool, n_bootstrap: int,
                     rng: np.random.Generator, blocks: BootstrapBlocks | None = None) -> tuple[float, np.ndarray]:
    """Between designs: treated mean - control mean; switchback: the mean over comparison groups
    of each group's mean (crossover: the two sequences weighted equally). Bootstrap within group,
    or over the blocks of `blocks` (`BootstrapBlocks`)."""
    if switchback:
        parts = [_group_means_and_draws(units, values, groups == g, n_bootstrap, rng, blocks) for g in sorted(np.unique(groups))]
        return float(np.mean([p[0] for p in parts])), np.mean([p[1] for p in parts], axis=0)
    treated = _group_means_and_draws(units, values, groups == "treatment", n_bootstrap, rng, blocks)
    control = _group_means_and_draws(units, values, groups == "control", n_bootstrap, rng, blocks)
    return treated[0] - control[0], treated[1] - control[1]


def adjusted_effect(units: np.ndarray, y: np.ndarray, x: np.ndarray, groups: np.ndarray, switchback: bool,
                    n_bootstrap: int, rng: np.random.Generator, blocks: BootstrapBlocks | None = None,
                    chunk: int = 250) -> tuple[float, np.ndarray]:
    """The regression-adjusted effect and its bootstrap draws, the adjustment re-fitted in every draw.

    y: raw first differences; x: (n x k) covariates (k = 0: no adjustment). The estimate is that
    of `regression_adjustment` (pooled, not cross-fitted) followed by `_balanced_effect`: one
    slope theta, least squares on deviations from each comparison group's means; every group's
    adjusted mean ybar_g - (xbar_g - xbar) @ theta; between designs treated minus control,
    switchback designs the mean over groups. Each bootstrap draw resamples units (or their blocks:
    `BootstrapBlocks`) within group (`resample_counts`) and recomputes all of it, theta included,
    from weighted unit sums. Holding theta at its full-sample value instead (adjust, then
    bootstrap the adjusted values) leaves the slope's own error out of the SE: with 4 covariates
    and ~25 units an arm the simulator's between designs came out 10-20% too narrow. In a
    switchback design the adjustment hardly moves the estimate (each group's mean stays; only
    the crossover's unequal sequences shift it a little), so re-fitting it keeps the SE of the
    estimate actually made; a fixed theta took the covariate-explained spread of the products'
    effects out of the SE (10-15% too narrow in the simulator) without taking it out of the
    estimate's error.

    Switchback designs centre the covariates on the experiment's own products in every draw
    (their mean is known, not sampled: the estimand is the effect on these products). Centring
    each draw on its own resample instead makes ybar* - (xbar* - xbar*) theta* = ybar*, so the
    adjustment did nothing to the SE: random days' SE was that of the unadjusted mean, 1.32x its
    empirical SE with coverage 1.000 over 48 default-regime worlds, against 1.08x and 0.958 held
    fixed (`benchmarks/estimators.py --designs random_days,crossover --carryover 0`).
    """
    n, k = x.shape if x.ndim == 2 else (len(y), 0)
    if k and n < 3 * (k + 1):  # `regression_adjustment`'s rule: too few products to fit the slopes
        x, k = np.zeros((n, 0)), 0
    names, stats = _unit_moments(units, y, x, groups)
    totals = sum(sums.sum(axis=0) for _, sums in stats)
    full_centre = totals[2:2 + k] / max(float(totals[0]), 1e-12)

    def effects(weights: list[np.ndarray]) -> np.ndarray:
        return _adjusted_effects([w @ sums for w, (_, sums) in zip(weights, stats)], names, k, switchback, full_centre)

    effect = float(effects([np.ones((1, len(u))) for u, _ in stats])[0])
    draws = []
    for first in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - first)
        weights = [blocks.weights(u, size, rng) if blocks is not None else resample_counts(len(u), size, rng) for u, _ in stats]
        draws.append(effects(weights))
    return effect, (np.concatenate(draws) if draws else np.zeros(0))


def _unit_moments(units: np.ndarray, y: np.ndarray, x: np.ndarray, groups: np.ndarray,
                  level: np.ndarray | None = None) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """Per comparison group (sorted names): its units and their sums of (1, y, x, x x', x y) and,
    with `level` (NaN where a product is not in the level), of (in level, level): the moments
    the adjusted effect is computed from (`_adjusted_effects`), one row per unit."""
    k = x.shape[1]
    names = sorted(np.unique(groups))
    stats = []
    for name in names:
        rows = groups == name
        group_units, row = np.unique(units[rows], return_inverse=True)
        xg, yg = x[rows], y[rows]
        columns = [np.ones(rows.sum()), yg, *xg.T, *(xg[:, :, None] * xg[:, None, :]).reshape(len(yg), k * k).T, *(xg * yg[:, None]).T]
        if level is not None:
            in_level = np.isfinite(level[rows])
            columns += [in_level.astype(float), np.where(in_level, level[rows], 0.0)]
        sums = np.column_stack([np.bincount(row, weights=c, minlength=len(group_units)) for c in columns])
        stats.append((group_units, sums))
    return names, stats


def _adjusted_effects(moments: list[np.ndarray], names: list[str], k: int, switchback: bool,
                      full_centre: np.ndarray) -> np.ndarray:
    """Per draw (rows of each group's weighted unit sums, `_unit_moments`): the adjusted effect."""
    n_draws = len(moments[0])
    count = [m[:, 0] for m in moments]
    sum_y = [m[:, 1] for m in moments]
    sum_x = [m[:, 2:2 + k] for m in moments]
    theta = np.zeros((n_draws, k))
    if k:
        wxx, wxy = np.zeros((n_draws, k, k)), np.zeros((n_draws, k))
        for m, c, sy, sx in zip(moments, count, sum_y, sum_x):
            c = np.maximum(c, 1e-12)
            wxx += m[:, 2 + k:2 + k + k * k].reshape(n_draws, k, k) - sx[:, :, None] * sx[:, None, :] / c[:, None, None]
            wxy += m[:, 2 + k + k * k:2 + 2 * k + k * k] - sx * (sy / c)[:, None]
        theta = np.einsum("bij,bj->bi", np.linalg.pinv(wxx), wxy)
    # between designs: the draw's own centre; switchback designs: the experiment's products'
    # covariate mean, held fixed (see `adjusted_effect`)
    centre = sum(sum_x) / np.maximum(sum(count), 1e-12)[:, None] if not switchback else full_centre[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        adjusted = {name: sy / c - np.einsum("bk,bk->b", sx / c[:, None] - centre, theta)
                    for name, c, sy, sx in zip(names, count, sum_y, sum_x)}
    if switchback:
        return np.mean([adjusted[name] for name in names], axis=0)
    return adjusted["treatment"] - adjusted["control"]


def jackknife_between(units: np.ndarray, y: np.ndarray, x: np.ndarray, groups: np.ndarray,
                      level: np.ndarray | None = None) -> tuple[float, float]:
    """Delete-one-unit jackknife SEs of a between design's adjusted effect and of its relative
    effect: (SE of the effect, SE of effect / (Ybar - effect)), the second NaN without `level`.

    Each randomisation unit is left out in turn and everything is re-computed, the adjustment's
    slopes included; the variance is sum over arms of (m - 1)/m x sum of squared deviations of
    the arm's m leave-one-out estimates (stratified: arms were randomised to fixed sizes).
    `level` is each product's observed mean level on its treated days (NaN off the treated arm):
    Ybar, its product-weighted mean, is re-computed with the effect, so the ratio's variance needs
    no linearisation and carries the level's covariance with the effect.

    Why not the bootstrap: revenue and profit first differences are price-weighted, so a few
    expensive products carry the spread, and the adjustment's fit passes close to them. The unit
    bootstrap (and HC2) then understated the SE: over 120 default-regime experiments of 100
    products, profit's mean bootstrap SE was 0.82x its empirical SE (time-bound) and 0.71x
    (triggered), with relative-interval coverage 0.908-0.925. The jackknife, close to the HC3
    sandwich, gave 0.95x / 0.87x and relative coverage 0.933-0.975 in every cell of the default and
    weak regimes (units: 0.95-1.11x, coverage 0.933-0.967). Every SE was computed on the same
    experiments (`benchmarks/se_methods.py --replications 60 --regime default,weak`, which prints
    bootstrap, HC2 and jackknife side by side); HC2 fell in between.
    """
    k = x.shape[1]
    names, stats = _unit_moments(units, y, x, groups, level)
    totals = [sums.sum(axis=0) for _, sums in stats]
    full_centre = sum(totals)[2:2 + k] / max(float(sum(totals)[0]), 1e-12)
    var_effect = var_ratio = 0.0
    for g, (group_units, sums) in enumerate(stats):
        m = len(group_units)
        if m < 2:
            return np.nan, np.nan
        moments = [np.repeat(t[None, :], m, axis=0) for t in totals]
        moments[g] = totals[g][None, :] - sums  # row i: the group without its unit i
        effect = _adjusted_effects(moments, names, k, False, full_centre)
        var_effect += (m - 1) / m * float(((effect - effect.mean()) ** 2).sum())
        if level is not None:
            in_level, level_sum = sum(mo[:, -2] for mo in moments), sum(mo[:, -1] for mo in moments)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = effect / (level_sum / in_level - effect)
            var_ratio += (m - 1) / m * float(((ratio - ratio.mean()) ** 2).sum())
    return math.sqrt(var_effect), (math.sqrt(var_ratio) if level is not None and np.isfinite(var_ratio) else np.nan)


JACKKNIFE_GROUPS = 250  # per arm: above this many units, HPTE's jackknife leaves out groups of units


def jackknife_weights(n_units: list[int], rng: np.random.Generator,
                      max_groups: int = JACKKNIFE_GROUPS) -> tuple[list[np.ndarray], list[slice]]:
    """Weights of the stratified jackknife of a between design, as draws for the leaf machinery:
    per arm a (units x draws) matrix and the slice of the draws that leave out that arm's units.

    Each arm's m units are dealt at random to G = min(m, `max_groups`) groups (one unit a group up
    to `max_groups`: the delete-one jackknife); draw j leaves out one group of one arm (weight 0)
    and keeps every other unit (weight 1). Grouping bounds the draws at 2 x `max_groups` whatever
    the size; with hundreds of units an arm the heavy-tail error the jackknife corrects
    (`jackknife_between`) has faded, and G - 1 = 249 degrees of freedom an arm keep the SE's own
    noise small. `jackknife_se` turns the draws' estimates into the SE."""
    total = sum(min(m, max_groups) for m in n_units)
    weights, slices, first = [], [], 0
    for m in n_units:
        g = min(m, max_groups)
        group_of = rng.permutation(m) % g
        w = np.ones((m, total))
        w[np.arange(m), first + group_of] = 0.0
        weights.append(w)
        slices.append(slice(first, first + g))
        first += g
    return weights, slices


def jackknife_se(estimates: np.ndarray, slices: list[slice]) -> float:
    """SE from the leave-one-group-out estimates of `jackknife_weights`: the square root of the sum
    over arms of (G - 1)/G x the squared deviations of the arm's G estimates."""
    variance = 0.0
    for part in slices:
        values = estimates[part]
        g = len(values)
        if g < 2 or not np.isfinite(values).all():
            return np.nan
        variance += (g - 1) / g * float(((values - values.mean()) ** 2).sum())
    return math.sqrt(variance)


def effective_df(units: np.ndarray, values: np.ndarray, groups: np.ndarray, switchback: bool, n_covariates: int = 0) -> float:
    """Degrees of freedom of the effect's SE: Welch-Satterthwaite over the comparison groups'
    randomisation units (or bootstrap blocks: pass them as `units`), minus the adjustment's
    covariates. Each group's variance is that of its product-weighted mean, linearised over units.
    The interval uses Student's t with these df: with 15-25 units an arm the normal quantile
    understates the interval by 2-4%."""
    variances, sizes = [], []
    for name in sorted(np.unique(groups)):
        rows = groups == name
        group_units, row = np.unique(units[rows], return_inverse=True)
        v = values[rows]
        if len(group_units) < 2:
            continue
        residual = np.bincount(row, weights=v - v.mean(), minlength=len(group_units))
        m = len(group_units)
        variances.append(m / (m - 1) * float((residual ** 2).sum()) / rows.sum() ** 2)
        sizes.append(m)
    if not variances or sum(variances) <= 0:
        return float(max(sum(sizes) - len(sizes) - n_covariates, 1))
    df = sum(variances) ** 2 / sum(v ** 2 / (m - 1) for v, m in zip(variances, sizes))
    return float(max(df - n_covariates, 1.0))


def t_interval(effect: float, se: float, df: float, alpha: float) -> tuple[float, float]:
    """effect -/+ t_{1 - alpha/2, df} x se."""
    from scipy import stats

    q = float(stats.t.ppf(1 - alpha / 2, df)) if np.isfinite(df) else float(stats.norm.ppf(1 - alpha / 2))
    return float(effect - q * se), float(effect + q * se)


_Z_80 = 0.8416  # the standard normal's 80% quantile: 80% power


def carryover_check(fd: pd.DataFrame, z: float = 1.96, blocks: BootstrapBlocks | None = None) -> dict:
    """Carryover of a switchback experiment from its own data (lag one).

    Per product, `carryover_difference` is the mean residual of control days right after a
    treated day minus that of control days after a control day: zero without carryover, the
    leftover of the effect with it. What a treated day leaves behind scales with the product's
    effect in units, hence with its level, while the difference's noise is the product's own
    (`carryover_variance`). So carryover is modelled as a share rho of each product's
    counterfactual level and rho is estimated by weighted least squares, weight 1 / variance: the
    most powerful test of rho = 0 under that model (equal weights lost a quarter of the power in
    the simulator's worlds; see issue 18's note). Its SE is cluster-robust over randomisation
    units, or over `blocks` (`BootstrapBlocks` over substitute clusters), whose products' draws
    are not independent. Flagged when |rho| > z SE. `carryover_estimate` is rho times the mean
    level (the average carryover in units if the model holds); `carryover_bias` estimates what it
    does to the effect: minus that times the share of analysed control days that follow a
    treated day (lag one only, so a lower bound for slowly decaying carryover).
    `carryover_detectable` is the carryover (in units, either sign) the flag would catch with 80%
    power: a flag that does not fire says only that carryover is likely below it. NaN (no flag) for
    between designs, and where blackout days leave no control day right after a treated one.
    First differences without `carryover_variance` get equal weights.
    """
    empty = {"carryover_estimate": np.nan, "carryover_se": np.nan, "carryover_flag": False, "carryover_bias": np.nan,
             "carryover_detectable": np.nan}
    if "carryover_difference" not in fd.columns or not (fd["arm"] == "switchback").any():
        return empty
    rows = fd[np.isfinite(fd["carryover_difference"].to_numpy(float))]
    level = np.clip(rows["counterfactual_mean"].to_numpy(float), 0.0, None) if "counterfactual_mean" in rows.columns else np.ones(len(rows))
    variance = rows["carryover_variance"].to_numpy(float) if "carryover_variance" in rows.columns else np.ones(len(rows))
    usable = np.isfinite(level) & np.isfinite(variance)
    rows, level, variance = rows[usable], level[usable], variance[usable]
    cluster = rows["unit_id"].astype(str).to_numpy()
    if blocks is not None and blocks.blocks is not None:
        cluster = pd.Series(blocks.blocks, index=fd.index)[rows.index].to_numpy()
    n_clusters = len(np.unique(cluster))
    if n_clusters < 3 or not (level > 0).any():
        return empty
    # a floor, so that a product whose control days barely vary cannot take all the weight
    weight = level / np.maximum(variance, 0.05 * np.median(variance[variance > 0]) if (variance > 0).any() else 1.0)
    c = rows["carryover_difference"].to_numpy(float)
    information = float((weight * level).sum())
    rho = float((weight * c).sum() / information)
    score = pd.Series(weight * (c - rho * level)).groupby(cluster).sum().to_numpy()
    rho_se = float(np.sqrt((score ** 2).sum() * n_clusters / (n_clusters - 1)) / information)
    mean_level = float(level.mean())
    share = float(rows["after_treated_share"].mean()) if "after_treated_share" in rows.columns else np.nan
    return {"carryover_estimate": rho * mean_level, "carryover_se": rho_se * mean_level,
            "carryover_flag": bool(abs(rho) > z * rho_se), "carryover_bias": -rho * mean_level * share,
            "carryover_detectable": (z + _Z_80) * rho_se * mean_level}


def analysed_rows(fd: pd.DataFrame, values: np.ndarray, groups: np.ndarray, blocks: "BootstrapBlocks") -> pd.DataFrame:
    """What an estimator analysed, for the relative effect's delta method (`metrics.relative_effect`):
    product_id, unit_id (the bootstrap's resampled unit: randomisation unit, or its substitute
    cluster), group, value (first difference as used), treated (the product's treated days enter
    the level), treated_mean."""
    switchback = bool((fd["arm"] == "switchback").any())
    unit = blocks.blocks if blocks.blocks is not None else fd["unit_id"].astype(str).to_numpy()
    treated_mean = fd["treated_mean"].to_numpy(float) if "treated_mean" in fd.columns else np.full(len(fd), np.nan)
    return pd.DataFrame({
        "product_id": fd["product_id"].astype(str).to_numpy(), "unit_id": np.asarray(unit, dtype=object),
        "group": np.asarray(groups, dtype=object), "value": np.asarray(values, float),
        "treated": np.ones(len(fd), bool) if switchback else (fd["arm"] == "treatment").to_numpy(),
        "treated_mean": treated_mean,
    })


class _EffectEstimator(BaseEstimator):
    """What both estimators share: scikit-learn's parameters (`get_params`, `clone`) and the
    fitted effect's interval at any level."""

    def effect_interval(self, alpha: float | None = None) -> tuple[float, float]:
        """The (1 - alpha) interval of the fitted effect: effect -/+ t(df_) x SE (`t_interval`);
        `alpha` defaults to the estimator's own."""
        check_is_fitted(self, ["effect_", "se_", "df_"])
        return t_interval(self.effect_, self.se_, self.df_, self.alpha if alpha is None else alpha)

    def _interval_from_bootstrap(self, y: np.ndarray, groups: np.ndarray, switchback: bool, n_covariates: int) -> None:
        """SE from the finite bootstrap draws, the randomisation units' degrees of freedom
        (`effective_df`) and the Student t interval: the last step of both fits."""
        self.bootstrap_ = self.bootstrap_[np.isfinite(self.bootstrap_)]
        self.se_ = float(np.std(self.bootstrap_, ddof=1))
        self._interval_from_se(y, groups, switchback, n_covariates)

    def _interval_from_se(self, y: np.ndarray, groups: np.ndarray, switchback: bool, n_covariates: int) -> None:
        """Degrees of freedom (`effective_df`) and the Student t interval around `se_`."""
        self.df_ = effective_df(self.analysed_["unit_id"].astype(str).to_numpy(), y, groups, switchback, n_covariates)
        self.ci_ = t_interval(self.effect_, self.se_, self.df_, self.alpha)


class DiDEstimator(_EffectEstimator):
    """Difference in differences of detrended first differences, regression-adjusted, with unit-resampling SEs.

    Between-product designs: mean first difference of treated products minus control products.
    Switchback designs: mean within-product (treated - control) first difference; a crossover
    averages its two sequences with equal weight (`comparison_groups`). With `adjust`, the first
    differences are first regression-adjusted on pre-period covariates, pooled over arms (cross-fitted over
    `adjust_folds` folds of units when > 1: `regression_adjustment`); `variance_reduction_` says what it
    bought. Standard errors: between designs, the delete-one-unit jackknife within arm, the
    adjustment re-fitted each time (`jackknife_between`, which also gives the relative effect's
    SE, `relative_se_`); switchback designs, resampling randomisation units (or their substitute
    clusters) with replacement within sequence, `n_bootstrap` times, the adjustment re-fitted in
    every draw (`adjusted_effect`; k - 1 of a group's k units drawn: `resample_counts`). The 95%
    interval is effect -/+ t x SE with the randomisation units' degrees of freedom
    (`effective_df`, learned as `df_`).

    Parameters
    ----------
    n_bootstrap : int, default 1000
        Bootstrap draws of the randomisation units (switchback designs).
    alpha : float, default 0.05
        1 - the interval's level (`ci_`; `effect_interval` takes any other).
    random_state : int, default 0
        Seed of the adjustment's folds and the bootstrap.
    adjust : bool, default True
        Regression-adjust the first differences on pre-period covariates.
    adjust_folds : int, default 1
        Folds of units the adjustment is cross-fitted over (1: pooled, re-fitted in every draw).

    Attributes
    ----------
    effect_, se_, df_, ci_ : float, float, float, tuple
        The effect (units per product-day), its bootstrap SE, degrees of freedom and interval.
    bootstrap_ : ndarray
        The bootstrap draws of the effect (switchback designs; empty for between designs).
    relative_se_ : float or None
        Between designs: the jackknife SE of the relative effect, for `metrics.relative_effect`.
    variance_reduction_, covariates_ : float, list
        What the regression adjustment removed of the variance, and on which covariates.
    carryover_ : dict
        `carryover_check` of a switchback design.

    Examples
    --------
    >>> import pandas as pd
    >>> fd = pd.DataFrame({"product_id": list("abcdef"), "unit_id": list("abcdef"),
    ...                    "arm": ["treatment"] * 3 + ["control"] * 3,
    ...                    "first_difference": [2.1, 1.9, 2.3, 0.1, -0.2, 0.0]})
    >>> model = DiDEstimator(n_bootstrap=200, adjust=False).fit(fd)
    >>> round(model.effect_, 2)
    2.13
    >>> low, high = model.effect_interval(alpha=0.1)
    """

    def __init__(self, n_bootstrap: int = 1000, alpha: float = 0.05, random_state: int = 0, adjust: bool = True,
                 adjust_folds: int = 1):
        self.n_bootstrap = n_bootstrap
        self.alpha = alpha
        self.random_state = random_state
        self.adjust = adjust
        self.adjust_folds = adjust_folds

    def fit(self, first_differences: pd.DataFrame, clusters: pd.DataFrame | None = None) -> "DiDEstimator":
        """Fit on one experiment's first differences.

        Parameters
        ----------
        first_differences : pandas.DataFrame
            One experiment's rows of `first_differences` (step 1): product_id, unit_id, arm,
            first_difference and the pre-period covariates.
        clusters : pandas.DataFrame or None
            (product_id, cluster_id): substitute clusters, resampled whole (`BootstrapBlocks`).

        Returns
        -------
        self : DiDEstimator
            Fitted: effect_, se_, ci_, df_ and the rest of the learned attributes.
        """
        fd = _in_product_order(first_differences.dropna(subset=["first_difference"]))
        rng = np.random.default_rng(self.random_state)
        switchback = bool((fd["arm"] == "switchback").any())
        if switchback:
            if fd.empty:
                raise ValueError("no product has both treated and control days in the window")
        else:
            for arm in ("treatment", "control"):
                n_units = fd.loc[fd["arm"] == arm, "unit_id"].nunique()
                if n_units < 2:
                    raise ValueError(f"the {arm} arm has {n_units} randomisation unit(s) with data; need >= 2")
        groups = comparison_groups(fd)
        y, self.variance_reduction_, self.covariates_ = (
            regression_adjustment(fd, groups, self.adjust_folds, rng) if self.adjust
            else (fd["first_difference"].to_numpy(float), 0.0, [])
        )
        units = fd["unit_id"].astype(str).to_numpy()
        blocks = BootstrapBlocks(fd, clusters)
        self.bootstrap_blocks_ = f"{blocks.n_blocks} {blocks.kind}"
        self.analysed_ = analysed_rows(fd, y, groups, blocks)
        # the bootstrap re-fits the pooled adjustment in every draw (`adjusted_effect`); a
        # cross-fitted one (adjust_folds > 1) is held fixed and its adjusted values resampled
        refit = self.adjust and self.adjust_folds == 1
        x = covariate_matrix(fd, self.covariates_)[0] if refit else np.zeros((len(fd), 0))
        raw = fd["first_difference"].to_numpy(float) if refit else y
        if switchback:
            self.effect_, self.bootstrap_ = adjusted_effect(units, raw, x, groups, switchback, self.n_bootstrap, rng,
                                                            blocks if blocks.blocks is not None else None)
            self._interval_from_bootstrap(y, groups, switchback, x.shape[1])
            self.relative_se_ = None  # `metrics.relative_effect`'s own rule
        else:  # jackknife SEs (`jackknife_between`): the bootstrap understated revenue's and profit's
            self.effect_, self.bootstrap_ = adjusted_effect(units, raw, x, groups, switchback, 0, rng)
            level = np.where(groups == "treatment", fd["treated_mean"].to_numpy(float), np.nan) if "treated_mean" in fd.columns else None
            self.se_, self.relative_se_ = jackknife_between(units, raw, x, groups, level)
            self._interval_from_se(y, groups, switchback, x.shape[1])
        self.n_treated_ = int((groups == "treatment").sum()) if not switchback else len(fd)
        self.n_control_ = int((groups == "control").sum()) if not switchback else len(fd)
        self.n_products_ = int(fd["product_id"].nunique())
        self.n_units_ = int(fd["unit_id"].nunique())
        self.carryover_ = carryover_check(fd, blocks=blocks)
        return self


# ----------------------------------------------------------------------------------------------
# HPTE: outlier filter, second difference within causal-forest leaves, unit bootstrap
# ----------------------------------------------------------------------------------------------

PRE_PERIOD_FEATURES = ("pre_mean", "pre_sd", "pre_trend", "n_pre_days", "counterfactual_mean")
CATALOG_KEY_COLUMNS = ("product_id", "category", "subclass")  # not attributes (contract v1)
# forests grown on more rows x trees than this (summed over folds) grow in parallel processes
# (`HPTEEstimator._forest_leaves`); below it a worker's start (it imports econml: seconds) would cost more than it saves
FOREST_PROCESSES_MIN_ROW_TREES = 5_000_000
TREE_SAMPLE_SHARE = 0.45  # econml's default share of the products each tree is grown on (half to split, half to fill)
_LEAF_STRIDE = 1 << 32  # global leaf id = (fold * n_estimators + tree) * stride + node id
MAX_ONE_HOT_LEVELS = 20  # a categorical attribute keeps its most frequent levels, the rest is 'other'


def trim_outliers(first_differences: pd.DataFrame, k: float, groups: np.ndarray | None = None,
                  outlier_sd: float = 4.0) -> np.ndarray:
    """Keep-mask of the outlier filter: per arm (crossover: sequence), drop at most the
    floor(q * n_arm) lowest and highest standardised first differences, with tail share
    q = k / N (N = products of the experiment, q <= 0.25), and of those only the ones further
    than `outlier_sd` robust sd (1.4826 MAD) from the arm's median (None: no such guard).

    The guard keeps the filter to outliers: an effect that differs between products makes the
    tails unequal, and cutting a fixed count from each tail of a skewed distribution moves its
    mean (in the simulator the plain k/N cut biased random days by about half an SE).

    A first difference is standardised by its product's pre-period sd (`pre_sd`; 1 when absent
    or zero), so an outlier is a swing extreme for that product (a level shift, a broken
    forecast), not simply a big product: trimming raw units would cut the best sellers, whose
    effects in units are the largest, and bias the estimate toward zero. Trimming within each arm
    (switchback: one group) keeps a shift of the treated arm from pushing its products into a
    pooled tail. k = 0 trims nothing.
    """
    n_total = len(first_differences)
    keep = np.ones(n_total, dtype=bool)
    if n_total == 0 or k <= 0:
        return keep
    share = min(k / n_total, 0.25)
    values = first_differences["first_difference"].to_numpy(float)
    if "pre_sd" in first_differences.columns:
        scale = first_differences["pre_sd"].to_numpy(float)
        values = values / np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    groups = first_differences["arm"].to_numpy(dtype=object) if groups is None else np.asarray(groups, dtype=object)
    for group in pd.unique(groups):
        rows = np.flatnonzero(groups == group)
        n_cut = int(np.floor(share * len(rows) + 1e-9))
        if n_cut == 0:
            continue
        order = rows[np.argsort(values[rows], kind="stable")]
        cut = np.concatenate([order[:n_cut], order[-n_cut:]])
        if outlier_sd is not None:
            centre = np.median(values[rows])
            spread = 1.4826 * np.median(np.abs(values[rows] - centre))
            cut = cut[np.abs(values[cut] - centre) > outlier_sd * spread]
        keep[cut] = False
    return keep


def product_features(
    first_differences: pd.DataFrame, catalog: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[str]]]:
    """Causal-forest features per product, row-aligned with `first_differences`.

    Returns (encoded, raw, columns_of): `encoded` is numeric (pre-period statistics, numeric
    catalogue attributes with missing values set to the median, categorical and boolean ones
    one-hot, at most `MAX_ONE_HOT_LEVELS` levels each); `raw` holds the same attributes
    unencoded (for heterogeneity summaries); `columns_of` maps an attribute to its encoded columns.
    Catalogue attributes are every column but product_id, category and subclass.
    """
    product_ids = first_differences["product_id"].astype(str).to_numpy()
    present = [c for c in PRE_PERIOD_FEATURES if c in first_differences.columns]
    raw = first_differences.loc[:, present].astype(float).reset_index(drop=True)
    if not present and (catalog is None or not len(catalog)):
        raw = pd.DataFrame({"constant": np.zeros(len(first_differences))})
    if catalog is not None and len(catalog):
        if "product_id" not in catalog.columns:
            raise ValueError(f"features: need a product_id column, got {list(catalog.columns)}")
        attributes = catalog.assign(product_id=catalog["product_id"].astype(str)).drop_duplicates("product_id")
        attributes = attributes.set_index("product_id")
        attributes = attributes.drop(columns=[c for c in CATALOG_KEY_COLUMNS if c in attributes.columns])
        attributes = attributes.reindex(product_ids).reset_index(drop=True)
        clash = [c for c in attributes.columns if c in raw.columns]
        if clash:
            raise ValueError(f"features: catalogue attribute(s) {clash} clash with pre-period statistics")
        raw = pd.concat([attributes, raw], axis=1)
    encoded, columns_of = {}, {}
    for name in raw.columns:
        column = raw[name]
        if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
            text = column.astype("string").fillna("<missing>")
            levels = text.value_counts().index[:MAX_ONE_HOT_LEVELS]
            text = text.where(text.isin(levels), "<other>")
            names = []
            for level in sorted(text.unique()):
                encoded[f"{name}={level}"] = (text == level).to_numpy(float)
                names.append(f"{name}={level}")
            columns_of[name] = names
        else:
            values = column.astype(float)
            encoded[name] = values.fillna(values.median() if values.notna().any() else 0.0).to_numpy(float)
            columns_of[name] = [name]
    return pd.DataFrame(encoded), raw, columns_of


def _unit_folds(units: np.ndarray, groups: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold per row: units are dealt to folds at random, separately within each group (arm)."""
    fold_of_unit = {}
    for group in np.unique(groups):
        group_units = np.unique(units[groups == group])
        for position, unit in enumerate(rng.permutation(group_units)):
            fold_of_unit[unit] = position % n_folds
    return np.array([fold_of_unit[u] for u in units], dtype=int)


def _membership(rows: np.ndarray, leaf_column: np.ndarray, values: np.ndarray, n_rows: int, n_columns: int):
    """Sparse (n_rows x n_columns): sum of `values` of the products in each row (unit) and leaf."""
    n_trees = leaf_column.shape[1]
    return sparse.csr_matrix(
        (np.repeat(values, n_trees), (np.repeat(rows, n_trees), leaf_column.ravel())), shape=(n_rows, n_columns)
    )


def _leaf_weighted_effect(s_t, n_t, s_c, n_c, switchback: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per draw (rows) over leaf columns: (effect, leaf differences, leaf weights).

    Between designs: a leaf's difference is mean(treated) - mean(control), its weight its number
    of products, and a leaf lacking one arm gets weight 0 (skipped). Switchback: the leaf's mean
    within-product difference, weighted by its number of products.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        if switchback:
            weight = n_t
            difference = s_t / n_t
        else:
            valid = (n_t > 0) & (n_c > 0)
            weight = np.where(valid, n_t + n_c, 0.0)
            difference = s_t / n_t - s_c / n_c
        effect = np.nansum(np.where(weight > 0, weight * difference, 0.0), axis=1) / weight.sum(axis=1)
    return effect, difference, weight


def _grown_fold(params: dict, x_grow: np.ndarray, treatment_grow: np.ndarray, y_grow: np.ndarray,
                x_apply: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One fold's honest causal forest (`econml.grf.CausalForest(**params)`), grown on the other
    folds' products: the leaf of each of the fold's products in every tree, and the forest's
    feature importances. Module level, so a process pool can run it (`HPTEEstimator._forest_leaves`)."""
    from econml.grf import CausalForest

    forest = CausalForest(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        forest.fit(x_grow, treatment_grow, y_grow)
        return forest.apply(x_apply), forest.feature_importances_


class HPTEEstimator(_EffectEstimator):
    """Heterogeneous panel treatment effect (DESIGN.md, steps 2-4) on detrended first differences.

    fit(first_differences, features): one experiment's rows of `first_differences` (step 1) and,
    optionally, catalogue attributes by product_id.
    - Regression adjustment (`adjust`, `regression_adjustment`): each first difference is adjusted
      on pre-period covariates, before anything else, so the forest's leaves and the filter see
      adjusted values; the slopes are pooled over arms (valid under randomisation: fitted on
      deviations from the arm means, no arm difference enters them), or cross-fitted over
      `adjust_folds` folds of units when > 1; `variance_reduction_`.
    - Outlier filter (`trim_outliers`): tail share `trim_k` / N per tail, within arm (crossover:
      within sequence), of values beyond `trim_sd` robust sd from the arm's median.
    - Second difference within causal-forest leaves, cross-fitted: units are dealt to `n_folds`
      folds (within arm); for each fold an honest `econml.grf.CausalForest` is grown on the other
      folds (features: `product_features`; between designs T = arm, y = first difference;
      switchback designs T = 1 without intercept, so the forest splits on the within-product
      effect), and the fold's products are dropped down its trees (`apply`). In every leaf the
      treated and control first differences are compared; leaf differences are averaged over all
      leaves of all trees with weight = products in the leaf. Leaves lacking one arm are skipped
      and counted. Because leaves are formed on other products, the leaf comparison is honest.
      For switchback designs every product is its own control, so the estimate is the (trimmed)
      mean within-product difference, a crossover's two sequences weighted equally (a period
      effect cancels; `comparison_groups`); the forest then only describes heterogeneity.
    - Standard error, the forest's leaves held fixed, every draw recomputing every leaf's
      difference from sparse unit-by-leaf sums (one matrix product per arm): between designs the
      stratified jackknife over randomisation units (`jackknife_weights`: each unit, or above 250
      an arm each of 250 groups of units, left out in turn; `jackknife_se`), which also gives the
      relative effect's SE (`relative_se_`); switchback designs the mean within-product
      difference's bootstrap, as in DiD (`adjusted_effect`, `n_bootstrap` draws). The 95%
      interval is effect -/+ t x SE with the randomisation units' degrees of freedom
      (`effective_df`, learned as `df_`), as in DiD.

    Attributes
    ----------
    effect_, se_, ci_, df_, bootstrap_ : the estimate, its SE, interval, degrees of freedom and draws
        (between designs: the jackknife's leave-out estimates).
    relative_se_ : between designs, the jackknife SE of the relative effect (`metrics.relative_effect`).
    n_trimmed_, trimmed_products_, n_products_, n_units_ : what the filter removed and what was analysed.
    n_leaves_, n_leaves_skipped_, leaf_effects_ : the leaves (one row per fold, tree and leaf).
    product_effects_ : per-product effect (mean over trees of its leaf's difference).
    heterogeneity_, feature_importances_ : per attribute and level/quartile, the mean product
        effect, relative to the counterfactual, and the forest's importance.
    baseline_, variance_reduction_, covariates_ : the counterfactual level and the adjustment.
    carryover_ : `carryover_check` (switchback designs).

    Parameters
    ----------
    n_bootstrap : int, default 1000
        Bootstrap draws of the randomisation units (switchback designs).
    trim_k : float, default 2.0
        The outlier filter's tail share is trim_k / N per tail (0: no filter).
    n_estimators, min_samples_leaf : int, default 200, 5
        Trees per fold's causal forest, and its smallest leaf.
    n_folds : int, default 2
        Cross-fitting folds of units (a fold's products fall down trees grown without them).
    alpha : float, default 0.05
        1 - the interval's level (`ci_`; `effect_interval` takes any other).
    random_state : int, default 0
        Seed of the folds, the forests and the bootstrap.
    adjust, adjust_folds : bool, int, default True, 1
        Regression adjustment, as in `DiDEstimator`.
    trim_sd : float or None, default 4.0
        Only values beyond this many robust sd from the arm's median are trimmed.
    max_tree_rows : int or None, default 10000
        Each tree grows on econml's default share (`TREE_SAMPLE_SHARE`, 0.45) of its fold's
        products, but on at most this many (None: no cap). Growing time rises with the rows a tree
        sees while the leaves it forms are already fine, so the cap binds only on large experiments
        (above about 44,000 products with 2 folds; issue 18: at 100,000 products HPTE took 50 s
        instead of 77 s, SE 1.1-1.9% larger over 4 seeds). Subsamples that grow slower than n are also what the
        forests' asymptotic theory asks for (Wager and Athey 2018).
    n_jobs : int or None, default -1
        Workers for growing the forests and for the leaf bootstrap (-1: every core, as econml's
        forests default to): large forests (`FOREST_PROCESSES_MIN_ROW_TREES`) grow one fold per
        process, the bootstrap runs on threads. The figures do not depend on it: each tree has
        its own seed and each bootstrap chunk its own draws.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> arm = np.where(np.arange(60) % 2 == 0, "treatment", "control")
    >>> fd = pd.DataFrame({"product_id": [f"p{i}" for i in range(60)], "arm": arm,
    ...                    "unit_id": [f"p{i}" for i in range(60)], "counterfactual_mean": 10.0,
    ...                    "first_difference": 2.0 * (arm == "treatment") + rng.normal(0, 1, 60)})
    >>> model = HPTEEstimator(n_bootstrap=200, n_estimators=8, adjust=False).fit(fd)
    >>> bool(1.0 < model.effect_ < 3.0), sorted(model.get_params())[:2]
    (True, ['adjust', 'adjust_folds'])
    """

    def __init__(
        self,
        n_bootstrap: int = 1000,
        trim_k: float = 2.0,
        n_estimators: int = 200,
        min_samples_leaf: int = 5,
        n_folds: int = 2,
        alpha: float = 0.05,
        random_state: int = 0,
        adjust: bool = True,
        adjust_folds: int = 1,
        trim_sd: float | None = 4.0,
        n_jobs: int | None = -1,
        max_tree_rows: int | None = 10_000,
    ):
        self.max_tree_rows = max_tree_rows
        self.n_jobs = n_jobs
        self.trim_sd = trim_sd
        self.adjust = adjust
        self.adjust_folds = adjust_folds
        self.n_bootstrap = n_bootstrap
        self.trim_k = trim_k
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.n_folds = n_folds
        self.alpha = alpha
        self.random_state = random_state

    # -- steps --------------------------------------------------------------------------------

    def _tree_sample(self, n_grow: int) -> float | int:
        """econml's `max_samples` for a forest grown on `n_grow` products: its default share (0.45),
        but at most `max_tree_rows` products per tree."""
        if self.max_tree_rows is None or TREE_SAMPLE_SHARE * n_grow <= self.max_tree_rows:
            return TREE_SAMPLE_SHARE
        return int(self.max_tree_rows)

    def _forest_leaves(self, x: np.ndarray, treatment: np.ndarray, y: np.ndarray, folds: np.ndarray,
                       switchback: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per product and tree: the leaf (a global column id) of the forest grown without its fold.

        With `n_jobs` > 1 the folds' forests grow at once in separate processes (`_grown_fold`):
        econml grows a forest's trees on threads, but its tree builder keeps the GIL for most of
        the work (on 2 cores, n_jobs=2 grew 16 trees on 50,000 rows no faster than n_jobs=1,
        with no more CPU time), so one forest at a time used about one core. The trees are the
        same either way (each forest's seed is random_state + fold, each tree's seed is drawn from it)."""
        leaves = np.zeros((len(y), self.n_estimators), dtype=np.int64)
        grown = []  # (fold, rows the fold's forest is applied to, rows it grows on)
        for fold in range(self.n_folds):
            apply_to, grow_on = folds == fold, folds != fold
            if not apply_to.any():
                continue
            grows = grow_on.sum() >= 2 * self.min_samples_leaf and (switchback or len(np.unique(treatment[grow_on])) == 2)
            if grows:
                grown.append((fold, apply_to, grow_on))
            else:  # too few products to grow on: one leaf per tree (a plain comparison)
                leaves[apply_to] = (fold * self.n_estimators + np.arange(self.n_estimators)) * _LEAF_STRIDE
        n_jobs = effective_n_jobs(self.n_jobs)
        big = sum(int(grow_on.sum()) for _, _, grow_on in grown) * self.n_estimators >= FOREST_PROCESSES_MIN_ROW_TREES
        processes = min(n_jobs, len(grown)) if n_jobs > 1 and big else 1

        def params(fold: int) -> dict:
            return dict(n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf, honest=True,
                        max_samples=self._tree_sample(int((folds != fold).sum())),
                        inference=False, fit_intercept=not switchback, random_state=self.random_state + fold,
                        n_jobs=max(1, n_jobs // processes) if processes > 1 else self.n_jobs)

        tasks = [(params(fold), x[grow_on], treatment[grow_on], y[grow_on], x[apply_to]) for fold, apply_to, grow_on in grown]
        if processes > 1:
            results = Parallel(n_jobs=processes, backend="loky", max_nbytes=None)(delayed(_grown_fold)(*task) for task in tasks)
        else:
            results = [_grown_fold(*task) for task in tasks]
        importances = []
        for (fold, apply_to, _), (fold_leaves, importance) in zip(grown, results):
            if np.all(np.isfinite(importance)):
                importances.append(importance)
            leaves[apply_to] = (fold * self.n_estimators + np.arange(self.n_estimators)) * _LEAF_STRIDE + fold_leaves
        importance = np.mean(importances, axis=0) if importances else np.full(x.shape[1], np.nan)
        return leaves, importance

    def fit(self, first_differences: pd.DataFrame, features: pd.DataFrame | None = None,
            clusters: pd.DataFrame | None = None) -> "HPTEEstimator":
        """Fit on one experiment's first differences.

        The steps, in order (they share one random generator): adjust and trim (`_prepared`), grow
        the cross-fitted forest (`_forest_leaves`), estimate and bootstrap over its leaves
        (`_leaf_estimates`), then describe the leaves and products (`_describe`).

        Parameters
        ----------
        first_differences : pandas.DataFrame
            One experiment's rows of `first_differences` (step 1).
        features : pandas.DataFrame or None
            Catalogue attributes by product_id, the forest's features beside the pre-period
            statistics (`product_features`).
        clusters : pandas.DataFrame or None
            (product_id, cluster_id): substitute clusters, resampled whole (`BootstrapBlocks`).

        Returns
        -------
        self : HPTEEstimator
            Fitted: effect_, se_, ci_, df_ and the rest of the learned attributes.
        """
        fd = _in_product_order(first_differences.dropna(subset=["first_difference"])).drop_duplicates("product_id")
        fd = fd.reset_index(drop=True)
        if fd.empty:
            raise ValueError("no first differences to estimate from")
        rng = np.random.default_rng(self.random_state)
        switchback = bool((fd["arm"] == "switchback").any())
        fd, groups, blocks = self._prepared(fd, clusters, switchback, rng)

        encoded, raw, columns_of = product_features(fd, features)
        x = encoded.to_numpy(float)
        y = fd["first_difference"].to_numpy(float)
        treated = (fd["arm"] == "treatment").to_numpy()
        treatment = np.ones(len(fd)) if switchback else treated.astype(float)
        units = fd["unit_id"].astype(str).to_numpy()
        folds = _unit_folds(units, fd["arm"].to_numpy(), self.n_folds, rng)
        leaves, importance = self._forest_leaves(x, treatment, y, folds, switchback)
        leaf_ids, leaf_column = np.unique(leaves, return_inverse=True)
        leaf_column = leaf_column.reshape(leaves.shape)

        # the adjustment's covariates, for re-fitting it in every bootstrap draw (`adjusted_effect`;
        # a cross-fitted adjustment, adjust_folds > 1, is held fixed)
        refit = self.adjust and self.adjust_folds == 1 and "raw_first_difference" in fd.columns
        z = covariate_matrix(fd, self.covariates_)[0] if refit else np.zeros((len(fd), 0))
        if z.shape[1] and len(fd) < 3 * (z.shape[1] + 1):
            z = np.zeros((len(fd), 0))
        raw_y = fd["raw_first_difference"].to_numpy(float) if z.shape[1] else y
        level = (np.where(treated, fd["treated_mean"].to_numpy(float), np.nan)
                 if "treated_mean" in fd.columns and not switchback else None)
        point = self._leaf_estimates(y, raw_y, z, treated, units, leaf_column, len(leaf_ids), switchback, rng, level)
        if switchback:  # every product is its own control: the leaf average is the mean; balance sequences
            self.effect_, self.bootstrap_ = adjusted_effect(units, raw_y, z, groups, True, self.n_bootstrap, rng,
                                                            blocks if blocks.blocks is not None else None)
            self._interval_from_bootstrap(y, groups, switchback, z.shape[1])
        else:
            self.se_ = jackknife_se(self.bootstrap_, self._jackknife_slices)
            self._interval_from_se(y, groups, switchback, z.shape[1])
        self._describe(fd, point, leaf_ids, leaf_column, importance, encoded, raw, columns_of, switchback)
        return self

    def _prepared(self, fd: pd.DataFrame, clusters, switchback: bool, rng) -> tuple[pd.DataFrame, np.ndarray, "BootstrapBlocks"]:
        """The first differences adjusted and trimmed, their comparison groups and bootstrap blocks."""
        groups = comparison_groups(fd)
        self.carryover_ = carryover_check(fd, blocks=BootstrapBlocks(fd, clusters))

        def adjust(fd: pd.DataFrame, groups: np.ndarray) -> pd.DataFrame:
            if not self.adjust:
                self.variance_reduction_, self.covariates_ = 0.0, []
                return fd
            adjusted, self.variance_reduction_, self.covariates_ = regression_adjustment(fd, groups, self.adjust_folds, rng)
            return fd.assign(raw_first_difference=fd["first_difference"], first_difference=adjusted)

        # Between designs: adjust first, so the filter judges what is left after the known part (a
        # product's level, which differs between arms by chance). Switchback designs: every product
        # is its own control, so the adjustment leaves each group's mean as it is and only takes
        # the products' differing effects out of the spread; the filter judges the raw within-product
        # differences (its job is noise: spikes, breaks), not how far a product's effect lies from
        # the covariates' prediction, which is real heterogeneity (trimming on it biased the
        # simulator's random days by ~0.2 SE and raised the crossover's error).
        if not switchback:
            fd = adjust(fd, groups)
        keep = trim_outliers(fd, self.trim_k, groups, self.trim_sd)
        self.n_trimmed_ = int((~keep).sum())
        self.trimmed_products_ = fd.loc[~keep, "product_id"].tolist()
        fd, groups = fd[keep].reset_index(drop=True), groups[keep]
        if switchback:
            fd = adjust(fd, groups)
        blocks = BootstrapBlocks(fd, clusters)
        self.bootstrap_blocks_ = f"{blocks.n_blocks} {blocks.kind}"
        self.analysed_ = analysed_rows(fd, fd["first_difference"].to_numpy(float), groups, blocks)
        for group in ("treatment", "control") if not switchback else np.unique(groups):
            n_units = fd.loc[groups == group, "unit_id"].nunique()
            if n_units < 2:
                raise ValueError(f"the {group} arm has {n_units} randomisation unit(s) with data after trimming; need >= 2")
        return fd, groups, blocks

    def _leaf_estimates(self, y, raw_y, z, treated, units, leaf_column, n_columns: int, switchback: bool, rng,
                        level: np.ndarray | None = None) -> tuple:
        """The leaf-weighted estimate and its bootstrap draws (`effect_`, `bootstrap_`); returns the
        sample's per-leaf sums (s_t, n_t, s_c, n_c, difference, weight) for `_describe`.

        Per arm: leaf-by-unit counts, the rows' leaf membership and the unit draws (switchback: no
        leaf bootstrap, the estimate is the balanced mean `fit` takes and the leaves only describe).
        Between designs with the adjustment re-fitted, the draws also carry the raw first
        difference and every covariate (the leaf-weighted estimate is linear in the outcome for
        given weights, so the draw's estimate is that of the raw values minus theta_b times the
        covariates'), and each arm's weighted moments for theta_b."""
        k = z.shape[1]
        first_arm = np.ones(len(y), bool) if switchback else treated
        values = np.column_stack([y] if not k else [raw_y, *z.T])
        # between designs: the stratified jackknife's draws (`jackknife_weights`), not a bootstrap:
        # as in DiD (`jackknife_between`), the bootstrap understated revenue's and profit's SE
        masks = (first_arm, ~first_arm)
        arm_units = [np.unique(units[mask], return_inverse=True) for mask in masks]
        jackknife, self._jackknife_slices = (jackknife_weights([len(u) for u, _ in arm_units], rng) if not switchback
                                             and all(len(u) for u, _ in arm_units) else ([None, None], []))
        n_draws = 0 if switchback else sum(part.stop - part.start for part in self._jackknife_slices)
        arms, moments, level_sums = [], [], []
        for mask, (group_units, unit_row), weights in zip(masks, arm_units, jackknife):
            n_rows = int(mask.sum())
            draws = np.ascontiguousarray(weights) if weights is not None and n_draws else None  # (units x draws)
            if draws is not None and level is not None:  # the relative effect's level, per draw (treated arm)
                in_level = np.isfinite(level[mask])
                level_sums.append(draws.T @ np.column_stack([
                    np.bincount(unit_row, weights=in_level.astype(float), minlength=len(group_units)),
                    np.bincount(unit_row, weights=np.where(in_level, level[mask], 0.0), minlength=len(group_units))]))
            arms.append(_BootstrapArm(
                counts=_membership(unit_row, leaf_column[mask], np.ones(n_rows), len(group_units), n_columns).T.tocsr(),
                members=_membership(np.arange(n_rows), leaf_column[mask], np.ones(n_rows), n_rows, n_columns).tocsc(),
                unit_row=unit_row, values=values[mask], draws=draws,
            ))
            if k and draws is not None:  # per draw: the arm's weighted sums for theta_b
                zm, ym = z[mask], raw_y[mask]
                columns = [np.ones(n_rows), ym, *zm.T, *(zm[:, :, None] * zm[:, None, :]).reshape(n_rows, k * k).T, *(zm * ym[:, None]).T]
                unit_sums = np.column_stack([np.bincount(unit_row, weights=c, minlength=len(group_units)) for c in columns])
                moments.append(draws.T @ unit_sums)

        # the sample itself: per-leaf sums and the point estimate (on the adjusted first differences)
        n_t, n_c = [np.bincount(leaf_column[mask].ravel(), minlength=n_columns).astype(float) for mask in (first_arm, ~first_arm)]
        s_t, s_c = [np.bincount(leaf_column[mask].ravel(), weights=np.repeat(y[mask], leaf_column.shape[1]), minlength=n_columns)
                    for mask in (first_arm, ~first_arm)]
        effect, difference, weight = _leaf_weighted_effect(s_t[None], n_t[None], s_c[None], n_c[None], switchback)
        numerator, denominator = _bootstrap_leaf_sums(arms, n_draws, effective_n_jobs(self.n_jobs))
        numerator = _minus_adjustment(numerator, moments, k, n_draws) if k and len(moments) == 2 else numerator[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            estimates = np.concatenate([effect, numerator / denominator])
        self.effect_ = float(estimates[0])
        self.bootstrap_ = estimates[1:]
        if not np.isfinite(self.effect_):
            raise ValueError("no causal-forest leaf holds both arms")
        self.relative_se_ = None
        if level_sums:  # the ratio effect / (Ybar - effect) in every draw, Ybar the treated products' level
            in_level, level_sum = sum(part[:, 0] for part in level_sums), sum(part[:, 1] for part in level_sums)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = self.bootstrap_ / (level_sum / in_level - self.bootstrap_)
            self.relative_se_ = jackknife_se(ratio, self._jackknife_slices)
        return s_t, n_t, s_c, n_c, difference[0], weight[0]

    def _describe(self, fd, point, leaf_ids, leaf_column, importance, encoded, raw, columns_of, switchback: bool) -> None:
        """Descriptions: the leaves, per-product effects and heterogeneity by attribute."""
        s_t, n_t, s_c, n_c, difference, weight = point
        fold_tree = leaf_ids // _LEAF_STRIDE
        self.leaf_effects_ = pd.DataFrame(
            {
                "fold": fold_tree // self.n_estimators,
                "tree": fold_tree % self.n_estimators,
                "leaf": leaf_ids % _LEAF_STRIDE,
                "n_treated": n_t.astype(int),
                "n_control": (n_t * 0 if switchback else n_c).astype(int),
                "effect": np.where(weight > 0, difference, np.nan),
                "skipped": weight <= 0,
            }
        )
        self.n_leaves_ = int(len(leaf_ids))
        self.n_leaves_skipped_ = int((weight <= 0).sum())
        leaf_difference = np.where(weight > 0, difference, np.nan)
        per_tree = leaf_difference[leaf_column]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            product_effect = np.nanmean(per_tree, axis=1)
        self.product_effects_ = pd.Series(product_effect, index=fd["product_id"].to_numpy(), name="effect")
        self.feature_importances_ = pd.Series(importance, index=encoded.columns, name="importance")
        self.heterogeneity_ = _heterogeneity_table(
            raw, columns_of, product_effect, fd["counterfactual_mean"].to_numpy(float), self.feature_importances_
        )
        self.baseline_ = float(fd["counterfactual_mean"].mean())
        self.n_products_ = int(len(fd))
        self.n_units_ = int(fd["unit_id"].nunique())
        self.switchback_ = switchback


@dataclass(frozen=True)
class _BootstrapArm:
    """One arm's inputs to the leaf bootstrap: (leaves x units) counts, (rows x leaves) membership
    (a row's leaves, one per tree; CSC, see `_bootstrap_leaf_sums`), each row's unit, the rows'
    outcomes (rows x outcomes) and the units' bootstrap weights (units x draws; None when the arm
    is empty or there are no draws)."""

    counts: sparse.csr_matrix
    members: sparse.csc_matrix
    unit_row: np.ndarray
    values: np.ndarray
    draws: np.ndarray | None


def _bootstrap_leaf_sums(arms: list[_BootstrapArm], n_draws: int, n_jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per outcome and draw, the leaf-weighted sum of treated minus control leaf means (numerator),
    and per draw the total leaf weight (denominator), for between designs.

    A draw's numerator is sum over leaves of w (S_t / N_t - S_c / N_c), w = N_t + N_c where both
    arms are present. It is linear in the rows' outcomes, so it is computed as sum over rows of
    outcome x unit weight x (the sum over the row's trees of w / N of its leaf): one sparse
    product per arm for the leaf counts, one to bring the leaf factors back to the rows, then a
    dense product with every outcome at once. Draws go in chunks (memory: leaves x chunk), on
    `n_jobs` threads (scipy's sparse products release the GIL); each chunk fills its own columns,
    so the figures do not depend on the number of threads.

    Speed (issue 18): the leaf factors are brought back to the rows through the CSC form of the
    membership, which reads the (leaves x chunk) factors once, in order, and adds into the
    (rows x chunk) result, instead of gathering a random factor row for every (row, tree) of the
    CSR form; a row still receives its trees' factors in the same (column) order, so the sums are
    the same bit for bit. The leaf counts and weights are whole numbers (exact in float64), so
    w / N is the same number computed as w / max(N, 1) with w set to 0 where an arm is missing."""
    n_outcomes = arms[0].values.shape[1]
    numerator, denominator = np.zeros((n_outcomes, n_draws)), np.zeros(n_draws)
    if not n_draws or any(arm.draws is None for arm in arms):
        return numerator, denominator
    treated, control = arms
    members = [arm.members.tocsc() for arm in arms]  # no copy when already CSC
    width = int(np.clip(8e6 // max(treated.counts.shape[0], 1), 1, n_draws))

    def chunk(first: int) -> None:
        columns = slice(first, min(first + width, n_draws))
        n_t, n_c = treated.counts @ treated.draws[:, columns], control.counts @ control.draws[:, columns]
        valid = np.minimum(n_t, n_c) > 0
        weight = np.add(n_t, n_c, out=np.zeros_like(n_t), where=valid)
        del valid
        denominator[columns] = weight.sum(axis=0)
        for arm, member, n, sign in ((treated, members[0], n_t, 1.0), (control, members[1], n_c, -1.0)):
            factor = np.maximum(n, 1.0, out=n)  # n is not needed after this
            factor = np.divide(weight, factor, out=factor)
            per_row = member @ factor
            del factor
            per_row *= arm.draws[arm.unit_row, columns]
            numerator[:, columns] += sign * (arm.values.T @ per_row)

    starts = range(0, n_draws, width)
    if n_jobs > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(n_jobs, len(starts))) as pool:
            list(pool.map(chunk, starts))
    else:
        for first in starts:
            chunk(first)
    return numerator, denominator


def _minus_adjustment(numerator: np.ndarray, moments: list, k: int, n_draws: int) -> np.ndarray:
    """The raw outcome's numerator minus theta_b times the covariates', theta_b from each draw's
    pooled within-arm moments, as `adjusted_effect` does."""
    wxx, wxy = np.zeros((n_draws, k, k)), np.zeros((n_draws, k))
    for m in moments:
        c, sy, sx = np.maximum(m[:, 0], 1e-12), m[:, 1], m[:, 2:2 + k]
        wxx += m[:, 2 + k:2 + k + k * k].reshape(n_draws, k, k) - sx[:, :, None] * sx[:, None, :] / c[:, None, None]
        wxy += m[:, 2 + k + k * k:] - sx * (sy / c)[:, None]
    theta = np.einsum("bij,bj->bi", np.linalg.pinv(wxx), wxy)
    return numerator[0] - np.einsum("bk,kb->b", theta, numerator[1:])


def _heterogeneity_table(raw: pd.DataFrame, columns_of: dict[str, list[str]], product_effect: np.ndarray,
                         counterfactual: np.ndarray, importance: pd.Series) -> pd.DataFrame:
    """Mean per-product effect by attribute level (numeric attributes: quartiles), most important
    attributes first: which kinds of products respond more."""
    rows = []
    known = np.isfinite(product_effect)
    for name, columns in columns_of.items():
        column = raw[name]
        if len(columns) == 1 and columns[0] == name:
            values = column.astype(float)
            try:  # quartiles, kept in numeric order
                groups = pd.qcut(values, 4, duplicates="drop", precision=3)
            except ValueError:
                groups = values.astype(str)
        else:
            groups = column.astype("string").fillna("<missing>")
        for level, index in pd.Series(np.arange(len(raw))).groupby(groups.to_numpy() if groups.dtype != "category" else groups, observed=True):
            idx = index.to_numpy()
            idx = idx[known[idx]]
            if len(idx) == 0:
                continue
            effect = float(product_effect[idx].mean())
            base = float(counterfactual[idx].mean())
            rows.append({
                "attribute": name,
                "group": f"({level.left:.4g}, {level.right:.4g}]" if isinstance(level, pd.Interval) else str(level),
                "n_products": int(len(idx)),
                "effect": effect,
                "relative_effect": effect / base if base else np.nan,
                "importance": float(np.nansum(importance[columns].to_numpy())),
            })
    table = pd.DataFrame(rows, columns=["attribute", "group", "n_products", "effect", "relative_effect", "importance"])
    # most important attribute first; groups keep their order (levels sorted, quartiles ascending)
    rank = table.groupby("attribute", sort=False)["importance"].transform("max").fillna(-1.0)
    table = table.assign(_rank=rank, _row=np.arange(len(table)))
    return table.sort_values(["_rank", "attribute", "_row"], ascending=[False, True, True]).drop(columns=["_rank", "_row"]).reset_index(drop=True)


RESULT_COLUMNS = [
    "experiment",
    "design",
    "estimator",
    "metric",
    "effect",
    "relative_effect",
    "se",
    "ci_low",
    "ci_high",
    "n_products",
    "n_trimmed",
    "spillover_effect",
    "spillover_se",
    "spillover_ci_low",  # from the controls' forecasts (spillover.spillover_from_forecasts), Student t
    "spillover_ci_high",
    "spillover_ipw",  # design-based IPW on the graph's exposures, beside it (spillover.estimate_spillover)
    "spillover_ipw_se",
    "as_of",
    # decision metrics (issue 16): the relative effect's delta-method interval (`metrics.relative_effect`),
    # the p-value and its Holm adjustment across the experiment's metrics (per estimator), the
    # metric's role (primary | secondary | guardrail) and a guardrail's verdict
    "se_rel",
    "ci_low_rel",
    "ci_high_rel",
    "baseline",
    "p_value",
    "p_holm",
    "role",
    "guardrail",
    "guardrail_status",
    # precision and carryover (issue 18)
    "counterfactual",
    "variance_reduction",
    "carryover_estimate",
    "carryover_se",
    "carryover_flag",
    "carryover_bias",
    "carryover_detectable",
]


def counterfactual_summary(fd: pd.DataFrame) -> str:
    """Which counterfactual the back-test chose, as 'name (products)', most products first."""
    if "counterfactual" not in fd.columns or fd.empty:
        return ""
    counts = fd["counterfactual"].value_counts()
    return ", ".join(f"{name} ({count})" for name, count in counts.items())


def _result_row(spec, estimator: str, model, metric: str, n_trimmed: int, as_of, counterfactual: str = "") -> dict:
    carryover = getattr(model, "carryover_", None) or carryover_check(pd.DataFrame({"arm": []}))
    df = getattr(model, "df_", None)
    relative = metric_rules.relative_effect(model.effect_, model.se_, model.analysed_, df=df,
                                            se_rel=getattr(model, "relative_se_", None))
    return {
        "experiment": spec.name,
        "design": spec.design,
        "estimator": estimator,
        "metric": metric,
        "effect": model.effect_,
        **relative,
        "p_value": metric_rules.p_value(model.effect_, model.se_, df),
        "se": model.se_,
        "ci_low": model.ci_[0],
        "ci_high": model.ci_[1],
        "n_products": model.n_products_,
        "n_trimmed": n_trimmed,
        "spillover_effect": np.nan,
        "spillover_se": np.nan,
        "spillover_ci_low": np.nan,
        "spillover_ci_high": np.nan,
        "spillover_ipw": np.nan,
        "spillover_ipw_se": np.nan,
        "as_of": as_of,
        "counterfactual": counterfactual,
        "variance_reduction": getattr(model, "variance_reduction_", 0.0),
        **carryover,
    }


def estimate_experiments(
    first_differences: pd.DataFrame,
    experiments: pd.DataFrame,
    as_of: pd.Timestamp | None,
    n_bootstrap: int = 1000,
    random_state: int = 0,
    features: pd.DataFrame | None = None,
    hpte_params: dict | None = None,
    models: dict | None = None,
    clusters: pd.DataFrame | dict | None = None,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """One results row per experiment and estimator (contract v1), plus per-experiment problems.

    Estimators: 'did' (regression-adjusted difference in differences, `DiDEstimator`) and 'hpte'
    (`HPTEEstimator`, with `features` = catalogue attributes by product_id, and `hpte_params`
    passed to its constructor). An experiment that cannot be estimated (no data yet, one arm
    empty) gets no row and a message instead; the others go on. If HPTE alone fails, the DiD row
    stays and the message says so. When `models` is a dict, the fitted estimators are stored in
    it by (experiment, estimator), e.g. for the heterogeneity tables. Spillover columns stay
    empty until it is estimated. `clusters` (product_id, cluster_id; or a dict experiment -> such
    a frame: the product_clusters snapshot in force at its start) makes both bootstraps resample
    substitute clusters whole (`BootstrapBlocks`).
    """
    rows, problems = [], {}
    for spec in experiments.itertuples():
        all_metrics, guardrails = _spec_metrics(spec)
        for metric in all_metrics:
            label = spec.name if metric == all_metrics[0] else f"{spec.name} ({metric})"
            fd = first_differences[first_differences["experiment"] == spec.name]
            if "metric" in fd.columns and fd["metric"].notna().any():
                fd = fd[fd["metric"] == metric]
            if fd.empty:
                problems[label] = "no first differences yet (no sales in the window, or no history)"
                continue
            blocks = clusters.get(spec.name) if isinstance(clusters, dict) else clusters
            try:
                did = DiDEstimator(n_bootstrap=n_bootstrap, random_state=random_state).fit(fd, blocks)
            except ValueError as exc:
                problems[label] = str(exc)
                continue
            chosen = counterfactual_summary(fd)
            rows.append(_result_row(spec, "did", did, metric, 0, as_of, chosen))
            try:
                params = {"n_bootstrap": n_bootstrap, "random_state": random_state, **(hpte_params or {})}
                hpte = HPTEEstimator(**params).fit(fd, features, blocks)
            except ValueError as exc:
                problems[label] = f"hpte not estimated: {exc}"
                hpte = None
            else:
                rows.append(_result_row(spec, "hpte", hpte, metric, hpte.n_trimmed_, as_of, chosen))
            if models is not None:
                key = (spec.name, "did") if metric == all_metrics[0] else (spec.name, "did", metric)
                models[key] = did
                if hpte is not None:
                    models[(spec.name, "hpte") if metric == all_metrics[0] else (spec.name, "hpte", metric)] = hpte
    return decide(pd.DataFrame(rows, columns=RESULT_COLUMNS), experiments), problems


def _spec_metrics(spec) -> tuple[list[str], dict]:
    """(metrics, primary first; guardrails {metric: (direction, tolerance)}) of a row of the
    experiments table (tables written before issue 16 have only `metric`)."""
    listed = getattr(spec, "metrics", None)
    listed = json.loads(listed) if isinstance(listed, str) and listed else (list(listed) if isinstance(listed, (list, tuple)) else [])
    guards = getattr(spec, "guardrails", None)
    guards = json.loads(guards) if isinstance(guards, str) and guards else (list(guards) if isinstance(guards, (list, tuple)) else [])
    return (listed or [getattr(spec, "metric", "units")]), {g[0]: (g[1], float(g[2])) for g in guards}


def decide(results: pd.DataFrame, experiments: pd.DataFrame) -> pd.DataFrame:
    """Roles, Holm-adjusted p-values across each experiment's metrics (per estimator) and guardrail
    verdicts (`metrics.holm`, `metrics.guardrail_status`)."""
    if results.empty:
        return results
    results = results.copy()
    specs = {spec.name: _spec_metrics(spec) for spec in experiments.itertuples()}
    for (name, _), rows in results.groupby(["experiment", "estimator"], sort=False):
        results.loc[rows.index, "p_holm"] = metric_rules.holm(rows["p_value"].to_numpy(float))
    roles, guard, status = [], [], []
    for row in results.itertuples():
        metrics_of, guardrails = specs.get(row.experiment, ([row.metric], {}))
        if row.metric in guardrails:
            direction, tolerance = guardrails[row.metric]
            roles.append("guardrail")
            guard.append(f"{direction} beyond {tolerance:.1%}")
            status.append(metric_rules.guardrail_status(direction, tolerance, row.ci_low_rel, row.ci_high_rel))
        else:
            roles.append("primary" if row.metric == metrics_of[0] else "secondary")
            guard.append("")
            status.append("")
    return results.assign(role=roles, guardrail=guard, guardrail_status=status)


OVER_TIME_COLUMNS = ["experiment", "metric", "estimator", "day", "n_products", "effect", "ci_low", "ci_high",
                     "relative_effect", "ci_low_rel", "ci_high_rel", "as_of"]


def effect_over_time(first_differences: pd.DataFrame, experiments: pd.DataFrame, as_of=None, n_bootstrap: int = 1000,
                     random_state: int = 0, clusters: pd.DataFrame | dict | None = None) -> pd.DataFrame:
    """The cumulative effect by day since start, per experiment and metric (issue 16): the DiD
    estimate, its 95% interval, the relative effect and its interval from each product's first
    7, 14, ... window days (`cumulative_fd`, `cumulative_treated_mean`; a product whose window is
    shorter counts with its whole window). One row per (experiment, metric, day)."""
    rows = []
    if first_differences.empty or "cumulative_fd" not in first_differences.columns:
        return pd.DataFrame(columns=OVER_TIME_COLUMNS)
    for spec in experiments.itertuples():
        blocks = clusters.get(spec.name) if isinstance(clusters, dict) else clusters
        for metric in _spec_metrics(spec)[0]:
            fd = first_differences[first_differences["experiment"] == spec.name]
            if "metric" in fd.columns and fd["metric"].notna().any():
                fd = fd[fd["metric"] == metric]
            fd = fd[fd["cumulative_fd"].map(lambda v: v is not None and len(v) > 0)]
            if fd.empty:
                continue
            lengths = fd["cumulative_fd"].map(len).to_numpy()
            for c in range(int(lengths.max())):
                at = np.minimum(c, lengths - 1)
                pick = lambda column: np.array([np.asarray(v, float)[i] for v, i in zip(fd[column], at)])  # noqa: E731
                days = np.array([np.asarray(v)[i] for v, i in zip(fd["cumulative_days"], at)])
                part = fd.assign(first_difference=pick("cumulative_fd"), treated_mean=pick("cumulative_treated_mean"))
                try:
                    model = DiDEstimator(n_bootstrap=n_bootstrap, random_state=random_state).fit(part, blocks)
                except ValueError:
                    continue
                relative = metric_rules.relative_effect(model.effect_, model.se_, model.analysed_, df=model.df_,
                                                        se_rel=getattr(model, "relative_se_", None))
                rows.append({"experiment": spec.name, "metric": metric, "estimator": "did", "day": int(days.max()),
                             "n_products": model.n_products_, "effect": model.effect_, "ci_low": model.ci_[0],
                             "ci_high": model.ci_[1], "relative_effect": relative["relative_effect"],
                             "ci_low_rel": relative["ci_low_rel"], "ci_high_rel": relative["ci_high_rel"], "as_of": as_of})
    return pd.DataFrame(rows, columns=OVER_TIME_COLUMNS)
