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

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from scipy import sparse

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
    """How much history a product needs and which counterfactual model it gets.

    The rule, by the number n of pre-period days the product has (at most `pre_days`):
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
    """

    pre_days: int = 365
    min_pre_days: int = 14
    yearly_min_days: int = 300
    own_trend_min_days: int = 91
    min_pool_products: int = 5


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


def product_first_difference(
    panel: pd.DataFrame, switchback: bool, settings: CounterfactualSettings, pool_coef=None
) -> pd.DataFrame:
    """One product's first difference from its rows (date, y, arm, blackout, in_window).

    `arm` is null on pre-period rows. `pool_coef` is its pool's profile (`pool_profile`), used
    when the product's own history is short (rule in `CounterfactualSettings`); when None, a
    `pool_coef` column of the panel is used if present. Returns an empty frame when the product
    lacks history or (switchback) lacks either arm in the window.
    """
    panel = panel.sort_values("date")
    if pool_coef is None and "pool_coef" in panel.columns:
        pool_coef = panel["pool_coef"].iloc[0]
    pool_coef = None if pool_coef is None or len(pool_coef) == 0 else np.asarray(pool_coef, dtype=float)
    pre = panel[~panel["in_window"].astype(bool)]
    window = panel[panel["in_window"].astype(bool) & ~panel["blackout"].astype(bool)]
    if len(pre) < settings.min_pre_days or window.empty:
        return _empty_first_difference()
    pre_y = pre["y"].to_numpy(dtype=float)
    pre_days, window_days = _days(pre["date"]), _days(window["date"])
    origin = window_days.min()
    pre_index = (pre_days - origin).astype(np.int64).astype(float)
    window_index = (window_days - origin).astype(np.int64).astype(float)
    if len(pre) >= settings.yearly_min_days:
        model = "trend+weekly+yearly"
        coef, *_ = np.linalg.lstsq(_design_matrix(pre_index, pre_days, True), pre_y, rcond=None)
        predicted = _design_matrix(window_index, window_days, True) @ coef
        trend = coef[1]
    elif pool_coef is not None:
        model = "pooled"
        shape_pre = _profile_matrix(pre_days) @ pool_coef
        scale = float(shape_pre @ pre_y / max(float(shape_pre @ shape_pre), 1e-12))
        predicted = scale * (_profile_matrix(window_days) @ pool_coef)
        trend = scale * pool_coef[1]
    else:
        with_trend = len(pre) >= settings.own_trend_min_days
        model = "trend+weekly" if with_trend else "level+weekly"
        coef, *_ = np.linalg.lstsq(_design_matrix(pre_index, pre_days, False, with_trend), pre_y, rcond=None)
        predicted = _design_matrix(window_index, window_days, False, with_trend) @ coef
        trend = coef[1] if with_trend else 0.0
    residual = window["y"].to_numpy(dtype=float) - predicted
    treated = (window["arm"] == "treatment").to_numpy()
    if switchback:
        if treated.all() or (~treated).all():
            return _empty_first_difference()
        fd = residual[treated].mean() - residual[~treated].mean()
        arm = "switchback"
    else:
        fd = residual.mean()
        arm = "treatment" if treated.mean() >= 0.5 else "control"
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
                "pre_trend": float(trend),
                "model": model,
            }
        ]
    )


def _experiment_panel(
    sales: DataFrame, enrolled: DataFrame, assignments: DataFrame, experiment: str, design: str, metric: str,
    settings: CounterfactualSettings,
) -> DataFrame:
    window = enrolled.where(F.col("experiment") == experiment)
    if metric not in sales.columns:
        raise ValueError(f"experiment '{experiment}': metric '{metric}' is not a column of sales ({sales.columns})")
    return (
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


def first_differences(
    sales: DataFrame,
    assignments: DataFrame,
    designs: dict[str, str],
    metrics: dict[str, str] | None = None,
    settings: CounterfactualSettings = CounterfactualSettings(),
    catalog: DataFrame | None = None,
) -> DataFrame:
    """Per (experiment, product): the detrended first difference, on Spark.

    `assignments` are the published rows (date, experiment, product_id, unit_id, arm, blackout);
    `designs` maps experiment -> design, `metrics` experiment -> outcome column (default units).
    Each product's pre-period is the `pre_days` before its first enrolled day. `catalog`
    (product_id, subclass) makes the subclass the pool for short-history products; without it
    the pool is the experiment's enrolment (see `CounterfactualSettings`). Pool profiles are
    fitted per (experiment, pool) group, products per (experiment, product) group.
    """
    metrics = metrics or {}
    enrolled = assignments.groupBy("experiment", "product_id").agg(
        F.min("date").alias("first_day"), F.max("date").alias("last_day")
    )
    parts = [
        _experiment_panel(sales, enrolled, assignments, experiment, design, metrics.get(experiment, "units"), settings)
        for experiment, design in sorted(designs.items())
    ]
    if not parts:
        return sales.sparkSession.createDataFrame([], FIRST_DIFFERENCE_SCHEMA)
    panel = parts[0]
    for rows in parts[1:]:
        panel = panel.unionByName(rows)
    if catalog is not None:
        pools = catalog.select(F.col("product_id").cast("string").alias("product_id"),
                               F.col("subclass").cast("string").alias("pool"))
        panel = panel.join(pools, "product_id", "left").withColumn("pool", F.coalesce("pool", F.lit("")))
    else:
        panel = panel.withColumn("pool", F.lit(""))
    profiles = (
        panel.where(~F.col("in_window"))
        .select("experiment", "pool", "product_id", "date", "y")
        .groupBy("experiment", "pool")
        .applyInPandas(lambda rows: pool_profile(rows, settings), POOL_PROFILE_SCHEMA)
        .drop("pool_products")
    )
    panel = panel.join(profiles, ["experiment", "pool"], "left")

    def run(group: pd.DataFrame) -> pd.DataFrame:
        return product_first_difference(group, bool(group["switchback"].iloc[0]), settings)

    return panel.groupBy("experiment", "product_id").applyInPandas(run, FIRST_DIFFERENCE_SCHEMA)


def first_differences_pandas(
    sales: pd.DataFrame,
    assignments: pd.DataFrame,
    designs: dict[str, str],
    metrics: dict[str, str] | None = None,
    settings: CounterfactualSettings = CounterfactualSettings(),
    catalog: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """`first_differences` in pandas for small panels (notebooks, simulations): same rules, same
    per-pool and per-product functions, same output columns."""
    metrics = metrics or {}
    sales = sales.assign(date=pd.to_datetime(sales["date"]))
    assignments = assignments.assign(date=pd.to_datetime(assignments["date"]))
    pools = (
        catalog.set_index(catalog["product_id"].astype(str))["subclass"].astype(str)
        if catalog is not None else None
    )
    out = []
    for experiment, design in sorted(designs.items()):
        metric = metrics.get(experiment, "units")
        if metric not in sales.columns:
            raise ValueError(f"experiment '{experiment}': metric '{metric}' is not a column of sales ({list(sales.columns)})")
        rows = assignments[assignments["experiment"] == experiment]
        if rows.empty:
            continue
        span = rows.groupby("product_id")["date"].agg(first_day="min", last_day="max")
        panel = sales[["product_id", "date", metric]].rename(columns={metric: "y"}).join(span, on="product_id", how="inner")
        panel = panel[(panel["date"] >= panel["first_day"] - pd.Timedelta(days=settings.pre_days)) & (panel["date"] <= panel["last_day"])]
        panel = panel.merge(rows[["product_id", "date", "unit_id", "arm", "blackout"]], on=["product_id", "date"], how="left")
        panel["in_window"] = panel["date"] >= panel["first_day"]
        panel = panel[~panel["in_window"] | panel["arm"].notna()].drop(columns=["first_day", "last_day"])
        panel["blackout"] = panel["blackout"].eq(True)  # no assignment row (pre-period): not blackout
        panel["experiment"] = experiment
        panel["pool"] = panel["product_id"].map(pools).fillna("") if pools is not None else ""
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
    return pd.concat(out, ignore_index=True)[columns] if out else pd.DataFrame(columns=columns)


def _unit_sums(fd: pd.DataFrame, mask: np.ndarray, units: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    grouped = fd[mask].groupby("unit_id")["first_difference"].agg(["sum", "count"]).reindex(units, fill_value=0)
    return grouped["sum"].to_numpy(float), grouped["count"].to_numpy(float)


def _in_product_order(fd: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by product (then experiment, arm): Spark returns them in no fixed order, and the
    folds, forests and bootstrap draws follow row order, so this makes estimates reproducible."""
    keys = [c for c in ("product_id", "experiment", "arm", "unit_id") if c in fd.columns]
    return fd.sort_values(keys, kind="stable").reset_index(drop=True)


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
        fd = _in_product_order(first_differences.dropna(subset=["first_difference"]))
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


# ----------------------------------------------------------------------------------------------
# HPTE: outlier filter, second difference within causal-forest leaves, unit bootstrap
# ----------------------------------------------------------------------------------------------

PRE_PERIOD_FEATURES = ("pre_mean", "pre_sd", "pre_trend", "n_pre_days", "counterfactual_mean")
CATALOG_KEY_COLUMNS = ("product_id", "category", "subclass")  # not attributes (contract v1)
_LEAF_STRIDE = 1 << 32  # global leaf id = (fold * n_estimators + tree) * stride + node id
MAX_ONE_HOT_LEVELS = 20  # a categorical attribute keeps its most frequent levels, the rest is 'other'


def trim_outliers(first_differences: pd.DataFrame, k: float) -> np.ndarray:
    """Keep-mask of the outlier filter: per arm, drop the floor(q * n_arm) lowest and highest
    standardised first differences, with tail share q = k / N (N = products of the experiment,
    q <= 0.25).

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
    for arm in first_differences["arm"].unique():
        rows = np.flatnonzero((first_differences["arm"] == arm).to_numpy())
        n_cut = int(np.floor(share * len(rows) + 1e-9))
        if n_cut == 0:
            continue
        order = rows[np.argsort(values[rows], kind="stable")]
        keep[order[:n_cut]] = False
        keep[order[-n_cut:]] = False
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


def _draw_matrix(n_units: int, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap counts: row 0 is the sample itself (all ones), rows 1.. are multinomial draws."""
    draws = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_draws)
    return np.vstack([np.ones((1, n_units)), draws]).astype(float)


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


class HPTEEstimator:
    """Heterogeneous panel treatment effect (DESIGN.md, steps 2-4) on detrended first differences.

    fit(first_differences, features): one experiment's rows of `first_differences` (step 1) and,
    optionally, catalogue attributes by product_id.
    - Outlier filter (`trim_outliers`): tail share `trim_k` / N per tail, within arm.
    - Second difference within causal-forest leaves, cross-fitted: units are dealt to `n_folds`
      folds (within arm); for each fold an honest `econml.grf.CausalForest` is grown on the other
      folds (features: `product_features`; between designs T = arm, y = first difference;
      switchback designs T = 1 without intercept, so the forest splits on the within-product
      effect), and the fold's products are dropped down its trees (`apply`). In every leaf the
      treated and control first differences are compared; leaf differences are averaged over all
      leaves of all trees with weight = products in the leaf. Leaves lacking one arm are skipped
      and counted. Because leaves are formed on other products, the leaf comparison is honest.
      For switchback designs every product is its own control, so the estimate is the (trimmed)
      mean within-product difference; the forest then only describes heterogeneity.
    - Bootstrap: randomisation units (products, or clusters) are resampled with replacement,
      within arm for between designs, `n_bootstrap` times; the forest's leaves stay fixed and
      each draw recomputes every leaf's difference from sparse unit-by-leaf sums (one matrix
      product per arm). SE = sd of the draws; 95% interval = basic bootstrap interval.

    Learned attributes: effect_, se_, ci_, bootstrap_, n_trimmed_, trimmed_products_,
    n_products_, n_units_, n_leaves_, n_leaves_skipped_, leaf_effects_ (one row per fold, tree
    and leaf), product_effects_ (per-product effect: mean over trees of its leaf's difference),
    heterogeneity_ (per attribute and level/quartile: mean product effect, relative to the
    counterfactual, and the forest's importance), feature_importances_, baseline_.
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
    ):
        self.n_bootstrap = n_bootstrap
        self.trim_k = trim_k
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.n_folds = n_folds
        self.alpha = alpha
        self.random_state = random_state

    # -- steps --------------------------------------------------------------------------------

    def _forest_leaves(self, x: np.ndarray, treatment: np.ndarray, y: np.ndarray, folds: np.ndarray,
                       switchback: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per product and tree: the leaf (a global column id) of the forest grown without its fold."""
        from econml.grf import CausalForest

        leaves = np.zeros((len(y), self.n_estimators), dtype=np.int64)
        importances = []
        for fold in range(self.n_folds):
            apply_to, grow_on = folds == fold, folds != fold
            if not apply_to.any():
                continue
            forest = CausalForest(
                n_estimators=self.n_estimators,
                min_samples_leaf=self.min_samples_leaf,
                honest=True,
                inference=False,
                fit_intercept=not switchback,
                random_state=self.random_state + fold,
                n_jobs=1,
            )
            grows = grow_on.sum() >= 2 * self.min_samples_leaf and (switchback or len(np.unique(treatment[grow_on])) == 2)
            if grows:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    forest.fit(x[grow_on], treatment[grow_on], y[grow_on])
                    fold_leaves = forest.apply(x[apply_to])
                    importance = forest.feature_importances_
                if np.all(np.isfinite(importance)):
                    importances.append(importance)
            else:  # too few products to grow on: one leaf per tree (a plain comparison)
                fold_leaves = np.zeros((apply_to.sum(), self.n_estimators), dtype=np.int64)
            leaves[apply_to] = (fold * self.n_estimators + np.arange(self.n_estimators)) * _LEAF_STRIDE + fold_leaves
        importance = np.mean(importances, axis=0) if importances else np.full(x.shape[1], np.nan)
        return leaves, importance

    def fit(self, first_differences: pd.DataFrame, features: pd.DataFrame | None = None) -> "HPTEEstimator":
        """Fit on one experiment's first differences (and catalogue attributes by product_id)."""
        fd = _in_product_order(first_differences.dropna(subset=["first_difference"])).drop_duplicates("product_id")
        fd = fd.reset_index(drop=True)
        if fd.empty:
            raise ValueError("no first differences to estimate from")
        rng = np.random.default_rng(self.random_state)
        switchback = bool((fd["arm"] == "switchback").any())
        keep = trim_outliers(fd, self.trim_k)
        self.n_trimmed_ = int((~keep).sum())
        self.trimmed_products_ = fd.loc[~keep, "product_id"].tolist()
        fd = fd[keep].reset_index(drop=True)
        arm_groups = ("switchback",) if switchback else ("treatment", "control")
        for arm in arm_groups:
            n_units = fd.loc[fd["arm"] == arm, "unit_id"].nunique()
            if n_units < 2:
                raise ValueError(f"the {arm} arm has {n_units} randomisation unit(s) with data after trimming; need >= 2")

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
        n_columns = len(leaf_ids)

        # unit-by-leaf sums and counts per arm (switchback: everything in the 'treated' slot)
        first_arm = np.ones(len(fd), bool) if switchback else treated
        sums, draws = [], []
        for mask in (first_arm, ~first_arm):
            arm_units, unit_row = np.unique(units[mask], return_inverse=True)
            sums.append((
                _membership(unit_row, leaf_column[mask], y[mask], len(arm_units), n_columns),
                _membership(unit_row, leaf_column[mask], np.ones(mask.sum()), len(arm_units), n_columns),
            ))
            draws.append(_draw_matrix(len(arm_units), self.n_bootstrap, rng) if len(arm_units) else None)

        def leaf_sums(arm: int, rows: slice) -> tuple[np.ndarray, np.ndarray]:
            if draws[arm] is None:
                empty = np.zeros((rows.stop - rows.start, n_columns))
                return empty, empty
            d = draws[arm][rows]
            return np.asarray((sums[arm][0].T @ d.T).T), np.asarray((sums[arm][1].T @ d.T).T)

        estimates = np.empty(self.n_bootstrap + 1)
        chunk = max(1, int(4e6 // max(n_columns, 1)))
        for start in range(0, self.n_bootstrap + 1, chunk):
            rows = slice(start, min(start + chunk, self.n_bootstrap + 1))
            (s_t, n_t), (s_c, n_c) = leaf_sums(0, rows), leaf_sums(1, rows)
            effect, difference, weight = _leaf_weighted_effect(s_t, n_t, s_c, n_c, switchback)
            estimates[rows] = effect
            if start == 0:
                point = (s_t[0], n_t[0], s_c[0], n_c[0], difference[0], weight[0])
        self.effect_ = float(estimates[0])
        self.bootstrap_ = estimates[1:]
        if not np.isfinite(self.effect_):
            raise ValueError("no causal-forest leaf holds both arms")
        self.bootstrap_ = self.bootstrap_[np.isfinite(self.bootstrap_)]
        self.se_ = float(np.std(self.bootstrap_, ddof=1))
        low, high = np.quantile(self.bootstrap_, [self.alpha / 2, 1 - self.alpha / 2])
        self.ci_ = (float(2 * self.effect_ - high), float(2 * self.effect_ - low))

        # descriptions: leaves, per-product effects, heterogeneity by attribute
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
        self.n_leaves_ = int(n_columns)
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
        return self


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
    "as_of",
]


def _result_row(spec, estimator: str, model, baseline: float, n_trimmed: int, as_of) -> dict:
    return {
        "experiment": spec.name,
        "design": spec.design,
        "estimator": estimator,
        "metric": spec.metric,
        "effect": model.effect_,
        "relative_effect": model.effect_ / baseline if baseline else np.nan,
        "se": model.se_,
        "ci_low": model.ci_[0],
        "ci_high": model.ci_[1],
        "n_products": model.n_products_,
        "n_trimmed": n_trimmed,
        "spillover_effect": np.nan,
        "spillover_se": np.nan,
        "as_of": as_of,
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
) -> tuple[pd.DataFrame, dict[str, str]]:
    """One results row per experiment and estimator (contract v1), plus per-experiment problems.

    Estimators: 'did' (plain difference in differences, `DiDEstimator`) and 'hpte'
    (`HPTEEstimator`, with `features` = catalogue attributes by product_id, and `hpte_params`
    passed to its constructor). An experiment that cannot be estimated (no data yet, one arm
    empty) gets no row and a message instead; the others go on. If HPTE alone fails, the DiD row
    stays and the message says so. When `models` is a dict, the fitted estimators are stored in
    it by (experiment, estimator), e.g. for the heterogeneity tables. Spillover columns stay
    empty until it is estimated.
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
        rows.append(_result_row(spec, "did", did, float(fd["counterfactual_mean"].mean()), 0, as_of))
        try:
            params = {"n_bootstrap": n_bootstrap, "random_state": random_state, **(hpte_params or {})}
            hpte = HPTEEstimator(**params).fit(fd, features)
        except ValueError as exc:
            problems[spec.name] = f"hpte not estimated: {exc}"
            hpte = None
        else:
            rows.append(_result_row(spec, "hpte", hpte, hpte.baseline_, hpte.n_trimmed_, as_of))
        if models is not None:
            models[(spec.name, "did")] = did
            if hpte is not None:
                models[(spec.name, "hpte")] = hpte
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), problems
