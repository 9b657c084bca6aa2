"""Effect estimation: detrended first differences per product, then the second difference.

Step 1 runs on Spark, one product per task group: each product's counterfactual is fitted on its
own pre-period (trend, day of week, yearly seasonality) and its residuals in the experiment window
become one number, the first difference. Between-product designs (time_bound, triggered) use the
mean residual in the window; switchback designs (random_days, crossover) use the mean residual on
treated days minus on control days. Blackout days never enter.

The estimators follow scikit-learn's conventions: the constructor stores parameters, `fit`
returns self, learned attributes end with `_`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

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
    ]
)


@dataclass(frozen=True)
class CounterfactualSettings:
    """How much history a product needs and which terms its counterfactual may use."""

    pre_days: int = 365
    min_pre_days: int = 28  # fewer: the product is left out and counted
    yearly_min_days: int = 300  # yearly seasonality only with (almost) a full year behind it


def _design_matrix(day_index: np.ndarray, dates: pd.Series, yearly: bool) -> np.ndarray:
    dow = pd.to_datetime(dates).dt.dayofweek.to_numpy()
    columns = [np.ones_like(day_index, dtype=float), day_index / 365.0]
    columns += [(dow == d).astype(float) for d in range(1, 7)]
    if yearly:
        doy = pd.to_datetime(dates).dt.dayofyear.to_numpy() / 365.25
        columns += [np.sin(2 * np.pi * doy), np.cos(2 * np.pi * doy)]
    return np.column_stack(columns)


def product_first_difference(panel: pd.DataFrame, switchback: bool, settings: CounterfactualSettings) -> pd.DataFrame:
    """One product's first difference from its rows (date, y, arm, blackout, window flag).

    `arm` is null on pre-period rows. Returns an empty frame when the product lacks history or
    (switchback) lacks either arm in the window.
    """
    panel = panel.sort_values("date")
    pre = panel[~panel["in_window"]]
    window = panel[panel["in_window"] & ~panel["blackout"].astype(bool)]
    if len(pre) < settings.min_pre_days or window.empty:
        return pd.DataFrame(columns=[f.name for f in FIRST_DIFFERENCE_SCHEMA.fields])
    origin = pd.Timestamp(window["date"].min())
    yearly = len(pre) >= settings.yearly_min_days
    day = lambda frame: (pd.to_datetime(frame["date"]) - origin).dt.days.to_numpy(dtype=float)  # noqa: E731
    x_pre = _design_matrix(day(pre), pre["date"], yearly)
    coef, *_ = np.linalg.lstsq(x_pre, pre["y"].to_numpy(dtype=float), rcond=None)
    predicted = _design_matrix(day(window), window["date"], yearly) @ coef
    residual = window["y"].to_numpy(dtype=float) - predicted
    treated = (window["arm"] == "treatment").to_numpy()
    if switchback:
        if treated.all() or (~treated).all():
            return pd.DataFrame(columns=[f.name for f in FIRST_DIFFERENCE_SCHEMA.fields])
        fd = residual[treated].mean() - residual[~treated].mean()
        arm = "switchback"
    else:
        fd = residual.mean()
        arm = "treatment" if treated.mean() >= 0.5 else "control"
    pre_y = pre["y"].to_numpy(dtype=float)
    return pd.DataFrame(
        [
            {
                "experiment": panel["experiment"].iloc[0],
                "product_id": panel["product_id"].iloc[0],
                "unit_id": window["unit_id"].iloc[0],
                "arm": arm,
                "first_difference": float(fd),
                "counterfactual_mean": float(predicted.mean()),
                "n_pre_days": int(len(pre)),
                "n_window_days": int(len(window)),
                "pre_mean": float(pre_y.mean()),
                "pre_sd": float(pre_y.std(ddof=1)) if len(pre_y) > 1 else 0.0,
                "pre_trend": float(coef[1]),
                "model": "trend+weekly+yearly" if yearly else "trend+weekly",
            }
        ]
    )


def first_differences(
    sales: DataFrame,
    assignments: DataFrame,
    designs: dict[str, str],
    metrics: dict[str, str] | None = None,
    settings: CounterfactualSettings = CounterfactualSettings(),
) -> DataFrame:
    """Per (experiment, product): the detrended first difference, on Spark.

    `assignments` are the published rows (date, experiment, product_id, unit_id, arm, blackout);
    `designs` maps experiment -> design, `metrics` experiment -> outcome column (default units).
    Each product's pre-period is the `pre_days` before its first enrolled day.
    """
    metrics = metrics or {}
    enrolled = assignments.groupBy("experiment", "product_id").agg(
        F.min("date").alias("first_day"), F.max("date").alias("last_day")
    )
    per_experiment = []
    for experiment, design in sorted(designs.items()):
        metric = metrics.get(experiment, "units")
        if metric not in sales.columns:
            raise ValueError(f"experiment '{experiment}': metric '{metric}' is not a column of sales ({sales.columns})")
        window = enrolled.where(F.col("experiment") == experiment)
        rows = (
            sales.select("product_id", "date", F.col(metric).cast("double").alias("y"))
            .join(window, "product_id")
            .where((F.col("date") >= F.date_sub("first_day", settings.pre_days)) & (F.col("date") <= F.col("last_day")))
            .join(
                assignments.select("experiment", "product_id", "date", "unit_id", "arm", "blackout"),
                ["experiment", "product_id", "date"],
                "left",
            )
            .withColumn("in_window", F.col("date") >= F.col("first_day"))
            # a window day without an assignment row is outside the product's enrolment: drop it
            .where(~F.col("in_window") | F.col("arm").isNotNull())
            .withColumn("blackout", F.coalesce("blackout", F.lit(False)))
            .withColumn("switchback", F.lit(design in SWITCHBACK_DESIGNS))
            .drop("first_day", "last_day")
        )
        per_experiment.append(rows)
    if not per_experiment:
        return sales.sparkSession.createDataFrame([], FIRST_DIFFERENCE_SCHEMA)
    panel = per_experiment[0]
    for rows in per_experiment[1:]:
        panel = panel.unionByName(rows)

    def run(group: pd.DataFrame) -> pd.DataFrame:
        return product_first_difference(group, bool(group["switchback"].iloc[0]), settings)

    return panel.groupBy("experiment", "product_id").applyInPandas(run, FIRST_DIFFERENCE_SCHEMA)


def _unit_sums(fd: pd.DataFrame, mask: np.ndarray, units: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    grouped = fd[mask].groupby("unit_id")["first_difference"].agg(["sum", "count"]).reindex(units, fill_value=0)
    return grouped["sum"].to_numpy(float), grouped["count"].to_numpy(float)


class DiDEstimator:
    """Plain difference-in-differences of detrended first differences, with a unit bootstrap.

    Between-product designs: mean first difference of treated products minus control products.
    Switchback designs: mean within-product (treated - control) first difference. Standard
    errors come from resampling randomisation units (products or clusters) with replacement,
    within arm for between designs, `n_bootstrap` times, vectorised as a matrix of draw counts.
    """

    def __init__(self, n_bootstrap: int = 1000, alpha: float = 0.05, random_state: int = 0):
        self.n_bootstrap = n_bootstrap
        self.alpha = alpha
        self.random_state = random_state

    def fit(self, first_differences: pd.DataFrame) -> "DiDEstimator":
        fd = first_differences.dropna(subset=["first_difference"])
        rng = np.random.default_rng(self.random_state)
        switchback = (fd["arm"] == "switchback").any()
        if switchback:
            units = pd.Index(sorted(fd["unit_id"].unique()))
            sums, counts = _unit_sums(fd, np.ones(len(fd), bool), units)
            if counts.sum() == 0:
                raise ValueError("no product has both treated and control days in the window")
            self.effect_ = float(sums.sum() / counts.sum())
            draws = rng.multinomial(len(units), np.full(len(units), 1 / len(units)), size=self.n_bootstrap)
            self.bootstrap_ = (draws @ sums) / np.maximum(draws @ counts, 1e-12)
            self.n_treated_, self.n_control_ = int(counts.sum()), int(counts.sum())
        else:
            arms = {}
            for arm in ("treatment", "control"):
                mask = (fd["arm"] == arm).to_numpy()
                units = pd.Index(sorted(fd.loc[mask, "unit_id"].unique()))
                if len(units) < 2:
                    raise ValueError(f"the {arm} arm has {len(units)} randomisation unit(s) with data; need >= 2")
                sums, counts = _unit_sums(fd, mask, units)
                draws = rng.multinomial(len(units), np.full(len(units), 1 / len(units)), size=self.n_bootstrap)
                arms[arm] = (sums.sum() / counts.sum(), (draws @ sums) / np.maximum(draws @ counts, 1e-12), int(counts.sum()))
            self.effect_ = float(arms["treatment"][0] - arms["control"][0])
            self.bootstrap_ = arms["treatment"][1] - arms["control"][1]
            self.n_treated_, self.n_control_ = arms["treatment"][2], arms["control"][2]
        self.se_ = float(np.std(self.bootstrap_, ddof=1))
        low, high = np.quantile(self.bootstrap_, [self.alpha / 2, 1 - self.alpha / 2])
        # basic (pivotal) bootstrap interval: centred on the estimate, robust to a skewed draw
        self.ci_ = (float(2 * self.effect_ - high), float(2 * self.effect_ - low))
        self.n_products_ = int(fd["product_id"].nunique())
        self.n_units_ = int(fd["unit_id"].nunique())
        return self


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
    "as_of",
]


def estimate_experiments(
    first_differences: pd.DataFrame,
    experiments: pd.DataFrame,
    as_of: pd.Timestamp | None,
    n_bootstrap: int = 1000,
    random_state: int = 0,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """One results row per experiment and estimator (contract v1), plus per-experiment problems.

    An experiment that cannot be estimated (no data yet, one arm empty) gets no row and a
    message instead; the others go on. Spillover columns stay empty until it is estimated.
    """
    rows, problems = [], {}
    for spec in experiments.itertuples():
        fd = first_differences[first_differences["experiment"] == spec.name]
        if fd.empty:
            problems[spec.name] = "no first differences yet (no sales in the window, or no history)"
            continue
        try:
            did = DiDEstimator(n_bootstrap=n_bootstrap, random_state=random_state).fit(fd)
        except ValueError as exc:
            problems[spec.name] = str(exc)
            continue
        baseline = float(fd["counterfactual_mean"].mean())
        rows.append(
            {
                "experiment": spec.name,
                "design": spec.design,
                "estimator": "did",
                "metric": spec.metric,
                "effect": did.effect_,
                "relative_effect": did.effect_ / baseline if baseline else np.nan,
                "se": did.se_,
                "ci_low": did.ci_[0],
                "ci_high": did.ci_[1],
                "n_products": did.n_products_,
                "n_trimmed": 0,
                "spillover_effect": np.nan,
                "spillover_se": np.nan,
                "as_of": as_of,
            }
        )
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), problems
