"""The substitution graph: whose demand moves when another product's price moves.

For every candidate pair (i, j) we correlate i's price with j's demand (and j's price with i's
demand) over the `window_days` days before the snapshot, after removing from each product's
series its level, weekday pattern and smooth trend, and from the demand its own-price response.
A positive correlation means "i is dearer, j sells more": substitutes. The two directions of a
pair are combined (Stouffer) into one one-sided Fisher-z test per pair, with Benjamini-Hochberg
over every tested pair of the whole graph.

How it runs on Spark:
- the panel is split into blocks (subclass by default) and one `applyInPandas` task per block
  builds the block's (days x products) matrices and correlates all of its products at once with
  masked matrix products — no self-join of the panel, no Python loop over pairs;
- the Benjamini-Hochberg step (rank of every p-value among all tests) runs in Spark.

Demand: `views` when the sales table has that column (optional in contract v1), else `units`;
a row whose demand is null is a missing day. Views carry the same demand shocks as units with far
less counting noise (a few % of views convert), so they see cross effects much more sharply: on
the default simulated market (MarketConfig(), seed 42) recall of true edges with cross
elasticity >= 0.4 is 0.59 from units and 0.86 from views at the same precision (~0.92).

Detrending (per product, on the days it has data): least squares of the series on a level, six
weekday dummies and Legendre polynomials of degree `TREND_DEGREE` (8: a yearly wave and a trend)
in time, time scaled to the product's own first..last day in the window so a product that enters
mid-year gets a trend over its own life, not an extrapolated one. Then, for the demand only: the
product's own-price response (slope of its detrended demand on its detrended log price) is
removed and the residual is winsorised at `WINSOR_SD` robust standard deviations (1.4826 x the
median absolute residual), so a product's own promotions and rare demand spikes do not drown its
neighbours' price signal.

Levels, not day-over-day changes: price promotions last days, while demand noise is close to
independent from day to day; differencing doubles the noise and keeps only the two edge days of
each promotion. On the default simulated market the day-over-day version found 8 edges (recall
0.004 at cross elasticity >= 0.3); levels with the own-price removal find most strong edges.
Autocorrelation left in the residuals (promotions, unmodelled seasonality) is handled by
Bartlett's correction of the Fisher-z sample size (`autocorrelation_lags`).

Candidates: every pair within a subclass; or, when `related_pairs` is given, only those pairs,
each computed in the block of the subclass of its `product_id_a` (a pair listed both ways uses the
smaller of the two subclasses). Products of other subclasses are shipped to that block as needed.

Edge rule: a pair is an edge when its combined test is BH-significant (positive side) and the
mean of its defined directional correlations `corr` is >= `min_corr` (and > 0). `weight` = the
mean of the directional correlations each clipped at 0, so it is >= corr and > 0; `n_days` = the
number of days both products have data.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import NamedTuple

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from scipy.special import ndtr, ndtri

TREND_DEGREE = 8  # Legendre polynomial degree of the smooth trend (a yearly wave fits)
WINSOR_SD = 3.0  # demand residuals are clipped at this many robust standard deviations
_RIDGE = 1e-9  # relative ridge on the detrending normal equations (weekdays never observed)

BLOCKS_TABLE = "substitution_blocks"  # the warehouse table of block evidence, beside the edges
EDGE_COLUMNS = ["src", "dst", "weight", "corr", "n_days", "evidence", "snapshot_date"]

PAIR_STATS_SCHEMA = T.StructType(
    [
        T.StructField("block", T.StringType()),
        T.StructField("src", T.StringType()),
        T.StructField("dst", T.StringType()),
        T.StructField("corr_src_dst", T.DoubleType()),  # price of src vs demand of dst
        T.StructField("corr_dst_src", T.DoubleType()),  # price of dst vs demand of src
        T.StructField("p_src_dst", T.DoubleType()),
        T.StructField("p_dst_src", T.DoubleType()),
        T.StructField("p_pair", T.DoubleType()),  # both directions combined: the tested p-value
        T.StructField("n_days", T.IntegerType()),
        # z of each direction (null: N(0, 1)) and its expected value per unit of cross elasticity
        # (sd(price_i) / sd(demand_j) * sqrt(n_eff)): the pair's power, and the block test's signal
        T.StructField("z_src_dst", T.DoubleType()),
        T.StructField("z_dst_src", T.DoubleType()),
        T.StructField("kappa_src_dst", T.DoubleType()),
        T.StructField("kappa_dst_src", T.DoubleType()),
        # empirical-Bayes local false discovery rate of the pair within its block (two-group model)
        # and whether the block's q-value rule (mean lfdr of the selected <= fdr) selects it
        T.StructField("lfdr", T.DoubleType()),
        T.StructField("eb_selected", T.BooleanType()),
        # the block's pooled test (`block_substitution_statistic`), repeated on each of its rows
        T.StructField("block_z", T.DoubleType()),
        T.StructField("block_z_per_elasticity", T.DoubleType()),
        T.StructField("block_products", T.IntegerType()),
    ]
)


def _detrended(values: np.ndarray, observed: np.ndarray, weekday: np.ndarray) -> np.ndarray:
    """Each column minus its least-squares level, weekday pattern and Legendre trend.

    values, observed: (days, products); weekday: (days,) in 0..6. Fitted on the observed days
    of each column only; returns the residuals there and 0 on missing days (use the mask).
    """
    n_days, n_products = values.shape
    t = np.arange(n_days, dtype=float)[:, None]
    first = observed.argmax(axis=0).astype(float)
    last = (n_days - 1 - observed[::-1].argmax(axis=0)).astype(float)
    span = np.maximum(last - first, 1.0)
    scaled_time = np.clip(2.0 * (t - first) / span - 1.0, -1.0, 1.0)  # (days, products)
    trend = np.polynomial.legendre.legvander(scaled_time, TREND_DEGREE)  # includes the level
    weekday_dummies = (weekday[:, None] == np.arange(1, 7)[None, :]).astype(float)
    design = np.concatenate(
        [trend, np.broadcast_to(weekday_dummies[:, None, :], (n_days, n_products, 6))], axis=2
    )  # (days, products, k)
    mask = observed.astype(float)
    y = np.where(observed, values, 0.0)
    weighted = design * mask[:, :, None]
    gram = np.einsum("tpk,tpl->pkl", weighted, design)
    rhs = np.einsum("tpk,tp->pk", weighted, y)
    k = design.shape[2]
    scale = np.trace(gram, axis1=1, axis2=2)[:, None, None] / k
    gram = gram + _RIDGE * np.maximum(scale, 1.0) * np.eye(k)[None]
    coef = np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]
    return np.where(observed, y - np.einsum("tpk,pk->tp", design, coef), 0.0)


def _without_own_price(demand: np.ndarray, price: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Detrended demand minus its own-price response, winsorised at WINSOR_SD robust SDs.

    demand, price: detrended (days, products), 0 where not observed. The own-price slope is
    fitted per product by least squares; a product's own promotions move its demand several
    times more than a neighbour's do, and removing them is most of the gain in power.
    """
    price_variance = (price * price).sum(axis=0)
    slope = np.divide((price * demand).sum(axis=0), price_variance, out=np.zeros(price.shape[1]), where=price_variance > 0)
    residual = np.where(observed, demand - slope * price, 0.0)
    absolute = np.where(observed, np.abs(residual), np.nan)
    has_days = observed.any(axis=0)
    robust_sd = np.zeros(price.shape[1])
    robust_sd[has_days] = 1.4826 * np.nanmedian(absolute[:, has_days], axis=0)
    limit = np.where(robust_sd > 0, WINSOR_SD * robust_sd, np.inf)
    return np.clip(residual, -limit, limit)


def _masked_cross_correlation(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """corr[i, j] of column i of x with column j of y over the rows both i and j have (mask).

    x and y are 0 where mask is False. Means and variances are taken over each pair's own
    overlap, so products with different histories are compared honestly. Returns (corr, overlap).
    """
    w = mask.astype(float)
    overlap = w.T @ w
    sum_x = x.T @ w
    sum_y = w.T @ y
    sum_xx = (x * x).T @ w
    sum_yy = w.T @ (y * y)
    sum_xy = x.T @ y
    with np.errstate(divide="ignore", invalid="ignore"):
        cov = sum_xy - sum_x * sum_y / overlap
        var_x = sum_xx - sum_x**2 / overlap
        var_y = sum_yy - sum_y**2 / overlap
        denominator = np.sqrt(var_x * var_y)
        tiny = 1e-12 * np.sqrt(np.maximum(sum_xx, 0) * np.maximum(sum_yy, 0))  # constant series
        corr = np.where((denominator > tiny) & (overlap > 3), cov / denominator, np.nan)
    return np.clip(corr, -1.0, 1.0), overlap.astype(np.int64)


def _autocorrelations(x: np.ndarray, mask: np.ndarray, max_lag: int) -> np.ndarray:
    """(products, max_lag) autocorrelations of each column at lags 1..max_lag, over observed pairs."""
    w = mask.astype(float)
    count = w.sum(axis=0)
    mean = np.divide((x * w).sum(axis=0), count, out=np.zeros(x.shape[1]), where=count > 0)
    centred = (x - mean) * w
    variance = (centred**2).sum(axis=0)
    rho = np.zeros((x.shape[1], max_lag))
    for lag in range(1, min(max_lag, x.shape[0] - 1) + 1):  # a loop over lags, not over pairs
        both = w[lag:] * w[:-lag]
        lagged = (centred[lag:] * centred[:-lag] * both).sum(axis=0)
        pairs = both.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            # the per-pair mean product over the overall mean square: Bartlett's estimator
            rho[:, lag - 1] = np.where((pairs > 0) & (variance > 0), (lagged / pairs) / (variance / count), 0.0)
    return np.clip(rho, -1.0, 1.0)


def _variance_inflation(x: np.ndarray, y: np.ndarray, mask: np.ndarray, max_lag: int) -> np.ndarray:
    """inflation[i, j] = 1 + 2 sum_k rho_xi(k) rho_yj(k), floored at 1 (Bartlett's formula).

    Two independent autocorrelated series have var(r) ~ inflation / n, not 1 / n. Prices in
    multi-day promotions are strongly autocorrelated, and so is any seasonality the detrending
    leaves in the demand, so without this the test is anti-conservative.
    """
    if max_lag <= 0:
        return np.ones((x.shape[1], y.shape[1]))
    return np.maximum(1.0 + 2.0 * _autocorrelations(x, mask, max_lag) @ _autocorrelations(y, mask, max_lag).T, 1.0)


def _fisher_z(corr: np.ndarray, n_effective: np.ndarray) -> np.ndarray:
    """Fisher's z = atanh(r) * sqrt(n_eff - 3): N(0, 1) when there is no cross effect.

    The one-sided p-value of "substitutes" is ndtr(-z). n_eff - 1 would account for the removed
    own-price slope; with hundreds of days the difference is immaterial.
    """
    r = np.clip(corr, -1 + 1e-12, 1 - 1e-12)
    return np.arctanh(r) * np.sqrt(np.maximum(n_effective - 3, 1))


BLOCK_MIN_SHIFT = 30  # circular shifts of the null: far beyond any promotion or carryover
BLOCK_MAX_SHIFTS = 64


def block_substitution_statistic(price: np.ndarray, demand: np.ndarray, observed: np.ndarray) -> tuple[float, float, float]:
    """The pooled test of a block: does its demand move with the prices of its OTHER members?

    price, demand: detrended (days, products), 0 on missing days. Each series is standardised
    over its observed days; T = sum over days and over ordered pairs i != j of
    price_i(t) * demand_j(t) / sqrt(days), i.e. about the sum of the block's directional
    correlations times sqrt(days). Computed from the block's summed series in O(days x products),
    never pair by pair. Its null spread comes from circular shifts of all prices together by
    BLOCK_MIN_SHIFT .. days - BLOCK_MIN_SHIFT days: a shifted price cannot act on today's demand,
    and the shifts keep the prices' own correlations, autocorrelation and any shocks the block
    shares. Returns (z, z per unit of cross elasticity, products): z = T / null sd; a block in
    which every product's cross elasticities add up to C has E[z] ~= C x the second number.
    """
    n_days, n = price.shape
    if n < 2 or n_days < 2 * BLOCK_MIN_SHIFT + 2:
        return float("nan"), float("nan"), n
    count = np.maximum(observed.sum(axis=0), 1)
    sd_price = np.sqrt((price * price).sum(axis=0) / count)
    sd_demand = np.sqrt((demand * demand).sum(axis=0) / count)
    usable = (sd_price > 0) & (sd_demand > 0)
    if usable.sum() < 2:
        return float("nan"), float("nan"), int(usable.sum())
    p = price[:, usable] / sd_price[usable]
    d = demand[:, usable] / sd_demand[usable]
    scale = 1.0 / np.sqrt(n_days)

    def statistic(shifted: np.ndarray) -> float:
        return float((shifted.sum(axis=1) @ d.sum(axis=1) - (shifted * d).sum()) * scale)

    observed_t = statistic(p)
    shifts = np.unique(np.linspace(BLOCK_MIN_SHIFT, n_days - BLOCK_MIN_SHIFT, BLOCK_MAX_SHIFTS).astype(int))
    null = np.array([statistic(np.roll(p, k, axis=0)) for k in shifts])
    null_sd = float(np.sqrt(np.mean(null * null)))
    if not null_sd > 0:
        return float("nan"), float("nan"), int(usable.sum())
    # E[price_i(t) demand_j(t)] summed over days = c_ij * sd_price_i / sd_demand_j * (days both observed)
    both = observed[:, usable].astype(float)
    overlap = both.T @ both
    np.fill_diagonal(overlap, 0.0)
    ratio = sd_price[usable][:, None] / sd_demand[usable][None, :]  # cross elasticity -> correlation
    m = usable.sum()
    # every product j with total cross elasticity C spread evenly over its m - 1 block neighbours
    per_elasticity = float((ratio * overlap).sum() / (m - 1) * scale / null_sd)
    return observed_t / null_sd, per_elasticity, int(m)


EB_MAX_ITERATIONS = 200


def local_false_discovery_rates(z: np.ndarray) -> np.ndarray:
    """Local fdr of each z under a two-group model fitted to one block's pair z-values.

    Efron's two groups with the theoretical null: f(z) = pi0 N(0, 1) + (1 - pi0) N(mu, 1),
    mu >= 0 (substitutes only raise z), pi0 and mu by EM. lfdr = pi0 phi(z) / f(z): a pair's
    evidence is shrunk towards what the block as a whole shows. A block full of weak substitutes
    (high 1 - pi0) lets moderate z-values through that a pair test alone would never pass; a
    block without substitutes (pi0 -> 1) lets nothing through.
    """
    z = np.asarray(z, dtype=float)
    finite = np.isfinite(z)
    out = np.ones(len(z))
    x = z[finite]
    if len(x) < 10:
        return out
    pi1, mu = 0.1, max(float(np.quantile(x, 0.9)), 1.0)
    for _ in range(EB_MAX_ITERATIONS):
        null = (1 - pi1) * np.exp(-0.5 * x * x)
        alt = pi1 * np.exp(-0.5 * (x - mu) ** 2)
        posterior = alt / np.maximum(null + alt, 1e-300)
        new_pi1 = float(np.clip(posterior.mean(), 1e-6, 1 - 1e-6))
        new_mu = float(max((posterior * x).sum() / max(posterior.sum(), 1e-12), 0.0))
        converged = abs(new_pi1 - pi1) < 1e-8 and abs(new_mu - mu) < 1e-8
        pi1, mu = new_pi1, new_mu
        if converged:
            break
    null = (1 - pi1) * np.exp(-0.5 * x * x)
    alt = pi1 * np.exp(-0.5 * (x - mu) ** 2)
    out[finite] = null / np.maximum(null + alt, 1e-300)
    return out


def q_value_selection(lfdr: np.ndarray, fdr: float) -> np.ndarray:
    """The largest set of smallest-lfdr pairs whose mean lfdr (their expected false share) <= fdr."""
    order = np.argsort(lfdr, kind="stable")
    mean_so_far = np.cumsum(lfdr[order]) / np.arange(1, len(lfdr) + 1)
    chosen = np.zeros(len(lfdr), dtype=bool)
    chosen[order[: int((mean_so_far <= fdr).sum())]] = True  # mean_so_far is non-decreasing
    return chosen


def _block_series(panel: pd.DataFrame, window_start: date, window_days: int) -> tuple[pd.Index, np.ndarray, np.ndarray, np.ndarray]:
    """A block's (days x products) detrended log prices and demand, net of the own price, and
    which days each product was observed (products sorted); a duplicate or impossible row is refused."""
    duplicated = panel.duplicated(["product_id", "day"])
    if duplicated.any():
        row = panel[duplicated].iloc[0]
        raise ValueError(
            f"sales: more than one row for product_id={row.product_id} on date "
            f"{window_start + timedelta(days=int(row.day))}; the contract is one row per product and day"
        )
    bad = ~(panel["price"] > 0) | ~(panel["units"] >= 0)
    if bad.any():
        row = panel[bad].iloc[0]
        raise ValueError(
            f"sales: product_id={row.product_id} on {window_start + timedelta(days=int(row.day))} has "
            f"price={row.price}, demand={row.units}; price must be > 0 and demand (units or views) >= 0"
        )
    products = pd.Index(np.sort(panel["product_id"].unique()))
    col = products.get_indexer(panel["product_id"])
    day = panel["day"].to_numpy(dtype=np.int64)
    observed = np.zeros((window_days, len(products)), dtype=bool)
    observed[day, col] = True
    log_price = np.zeros(observed.shape)
    log_price[day, col] = np.log(panel["price"].to_numpy(dtype=float))
    log_demand = np.zeros(observed.shape)
    log_demand[day, col] = np.log1p(panel["units"].to_numpy(dtype=float))
    weekday = (window_start.weekday() + np.arange(window_days)) % 7

    price = _detrended(log_price, observed, weekday)
    demand = _without_own_price(_detrended(log_demand, observed, weekday), price, observed)
    return products, price, demand, observed


def block_pair_statistics(
    panel: pd.DataFrame,
    pairs: pd.DataFrame | None,
    window_start: date,
    window_days: int,
    min_overlap: int,
    autocorrelation_lags: int = 14,
    fdr: float = 0.05,
) -> pd.DataFrame:
    """One block's pair statistics (PAIR_STATS_SCHEMA) from its panel rows.

    panel: block, product_id, day (0..window_days-1), price, units (the demand series: units or
    views). pairs: src, dst (src < dst)
    to keep, or None for every pair of the block. Pairs with overlap < min_overlap are dropped.
    p-values use the effective overlap n / inflation (see `_variance_inflation`).
    About 65 lines: one vectorised pass over the block's pairs (both directions' tests, Stouffer,
    detectable elasticities, local fdr) whose arrays feed the 18 output columns at the end;
    splitting it would pass a dozen aligned arrays between the parts.
    """
    columns = [f.name for f in PAIR_STATS_SCHEMA.fields]
    if panel.empty or (pairs is not None and pairs.empty):
        return _empty_pair_stats()
    block = panel["block"].iloc[0]
    products, price, demand, observed = _block_series(panel, window_start, window_days)
    corr, overlap = _masked_cross_correlation(price, demand, observed)
    inflation = _variance_inflation(price, demand, observed, autocorrelation_lags)

    if pairs is None:
        i, j = np.triu_indices(len(products), k=1)
    else:
        i = products.get_indexer(pairs["src"])
        j = products.get_indexer(pairs["dst"])
        present = (i >= 0) & (j >= 0)  # a product may have been dropped for too few days
        i, j = i[present], j[present]
    n = overlap[i, j]
    keep = n >= min_overlap
    i, j, n = i[keep], j[keep], n[keep]
    corr_ij, corr_ji = corr[i, j], corr[j, i]
    keep = np.isfinite(corr_ij) | np.isfinite(corr_ji)
    i, j, n, corr_ij, corr_ji = i[keep], j[keep], n[keep], corr_ij[keep], corr_ji[keep]
    z_ij = _fisher_z(corr_ij, n / inflation[i, j])  # NaN stays NaN
    z_ji = _fisher_z(corr_ji, n / inflation[j, i])
    # Stouffer: the cross elasticity is one number for both directions, so their tests add up
    z_pair = np.where(np.isfinite(z_ij) & np.isfinite(z_ji), (z_ij + z_ji) / np.sqrt(2.0), np.where(np.isfinite(z_ij), z_ij, z_ji))
    sd_price = np.sqrt((price * price).sum(axis=0) / np.maximum(observed.sum(axis=0), 1))
    sd_demand = np.sqrt((demand * demand).sum(axis=0) / np.maximum(observed.sum(axis=0), 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa_ij = np.where(np.isfinite(z_ij), sd_price[i] / sd_demand[j] * np.sqrt(n / inflation[i, j]), np.nan)
        kappa_ji = np.where(np.isfinite(z_ji), sd_price[j] / sd_demand[i] * np.sqrt(n / inflation[j, i]), np.nan)
    tested = np.unique(np.concatenate([i, j]))
    block_z, block_z_per_elasticity, block_products = block_substitution_statistic(
        price[:, tested], demand[:, tested], observed[:, tested]
    )
    lfdr = local_false_discovery_rates(z_pair)
    return pd.DataFrame(
        {
            "block": block,
            "src": products[i].to_numpy(),
            "dst": products[j].to_numpy(),
            "corr_src_dst": corr_ij,
            "corr_dst_src": corr_ji,
            "p_src_dst": ndtr(-z_ij),  # NaN stays NaN -> null
            "p_dst_src": ndtr(-z_ji),
            "p_pair": ndtr(-z_pair),
            "n_days": n.astype(np.int32),
            "z_src_dst": z_ij,
            "z_dst_src": z_ji,
            "kappa_src_dst": kappa_ij,
            "kappa_dst_src": kappa_ji,
            "lfdr": lfdr,
            "eb_selected": q_value_selection(lfdr, fdr),
            "block_z": block_z,
            "block_z_per_elasticity": block_z_per_elasticity,
            "block_products": np.int32(block_products),
        },
        columns=columns,
    )


def _empty_pair_stats() -> pd.DataFrame:
    dtypes = {"block": object, "src": object, "dst": object, "n_days": np.int32, "eb_selected": bool,
              "block_products": np.int32}
    return pd.DataFrame(
        {f.name: pd.Series(dtype=dtypes.get(f.name, float)) for f in PAIR_STATS_SCHEMA.fields}
    )


def _candidate_blocks(catalog: DataFrame, related_pairs: DataFrame | None) -> tuple[DataFrame, DataFrame | None]:
    """(block, product_id) membership and, with related_pairs, the (block, src, dst) candidates."""
    subclass_of = catalog.select("product_id", F.col("subclass").alias("block")).where(F.col("block").isNotNull())
    if related_pairs is None:
        return subclass_of.dropDuplicates(["product_id"]), None
    pairs = (
        related_pairs.where(
            F.col("product_id_a").isNotNull()
            & F.col("product_id_b").isNotNull()
            & (F.col("product_id_a") != F.col("product_id_b"))
        )
        .join(subclass_of.withColumnRenamed("product_id", "product_id_a"), "product_id_a")
        .select(
            "block",
            F.least("product_id_a", "product_id_b").alias("src"),
            F.greatest("product_id_a", "product_id_b").alias("dst"),
        )
        .groupBy("src", "dst")
        .agg(F.min("block").alias("block"))
    )
    members = pairs.select("block", F.col("src").alias("product_id")).union(
        pairs.select("block", F.col("dst").alias("product_id"))
    ).distinct()
    return members, pairs


def _bh_threshold(stats: DataFrame, fdr: float, columns: tuple[str, ...] = ("p_pair",)) -> float | None:
    """Largest p-value rejected by Benjamini-Hochberg over all tests (None: nothing rejected).

    The tests are the non-null values of `columns` (one per pair by default: the combined
    p-value). Only p <= fdr can be rejected, and its rank among all tests equals its rank among
    those, so only that (small) subset is sorted; m is the count of all tests.
    """
    tests = stats.select(F.explode(F.array(*columns)).alias("p")).where(
        F.col("p").isNotNull() & ~F.isnan("p")
    )
    n_tests = tests.count()
    if n_tests == 0:
        return None
    at_or_below = Window.orderBy("p").rangeBetween(Window.unboundedPreceding, Window.currentRow)
    threshold = (
        tests.where(F.col("p") <= fdr)
        .withColumn("rank", F.count(F.lit(1)).over(at_or_below))
        .where(F.col("p") <= F.col("rank") * F.lit(fdr / n_tests))
        .agg(F.max("p"))
        .first()[0]
    )
    return threshold


class SubstitutionEvidence(NamedTuple):
    """What the graph stage learned: pair edges (Spark) and one row of block evidence per block (pandas)."""

    edges: DataFrame
    blocks: pd.DataFrame


def build_substitution_graph(sales: DataFrame, catalog: DataFrame, snapshot_date: date, **options) -> DataFrame:
    """The substitution edges alone (see `learn_substitution`, which takes the same arguments)."""
    return learn_substitution(sales, catalog, snapshot_date, **options).edges


def learn_substitution(
    sales: DataFrame,
    catalog: DataFrame,
    snapshot_date: date,
    related_pairs: DataFrame | None = None,
    window_days: int = 365,
    min_overlap: int = 60,
    fdr: float = 0.05,
    min_corr: float = 0.1,
    autocorrelation_lags: int = 14,
    demand_column: str | None = None,
    evidence_rule: "BlockEvidenceRule | None" = None,
) -> SubstitutionEvidence:
    """Substitution edges and block evidence from the `window_days` days before `snapshot_date`.

    sales: contract v1 (product_id, date, price, units[, views]); catalog: product_id, subclass.
    Edges (src < dst, weight, corr, n_days, evidence, snapshot_date): pairs significant by
    Benjamini-Hochberg over every pair (`evidence` = 'pair_test'), or selected by the block's
    empirical-Bayes q-value rule at the same `fdr` ('block_shrinkage'); either way with mean
    directional correlation >= `min_corr`. Blocks: see `block_evidence`.
    `autocorrelation_lags` (0 = off): lags of the Bartlett correction of the Fisher-z sample size.
    `demand_column`: the demand series; None = `views` when sales has it, else `units`.
    """
    if window_days < 2:
        raise ValueError(f"window_days must be >= 2, got {window_days}")
    if min_overlap < 4:
        raise ValueError(f"min_overlap must be >= 4 (Fisher z needs n > 3), got {min_overlap}")
    if not 0 < fdr < 1:
        raise ValueError(f"fdr must be in (0, 1), got {fdr}")
    if min_corr < 0:
        raise ValueError(f"min_corr must be >= 0, got {min_corr}")
    if demand_column is None:  # views when the feed has any, else units
        has_views = "views" in sales.columns and bool(sales.where(F.col("views").isNotNull()).limit(1).count())
        demand_column = "views" if has_views else "units"
    for name, frame, needed in (
        ("sales", sales, ("product_id", "date", "price", demand_column)),
        ("catalog", catalog, ("product_id", "subclass")),
        ("related_pairs", related_pairs, ("product_id_a", "product_id_b")),
    ):
        missing = [c for c in needed if frame is not None and c not in frame.columns]
        if missing:
            raise ValueError(f"{name}: missing column(s) {missing}")

    stats = _pair_statistics(sales, catalog, snapshot_date, related_pairs, window_days, min_overlap, fdr,
                             autocorrelation_lags, demand_column)
    threshold = _bh_threshold(stats, fdr)
    n_tests = stats.count()
    # the one-sided z a pair must reach: the BH threshold found, or the first BH step fdr / m
    pair_threshold = threshold if threshold is not None else fdr / max(n_tests, 1)

    def defined(column: str):
        return F.when(F.isnan(column), None).otherwise(F.col(column))

    def mean_defined(a, b):  # mean of the two directions, or the one that is defined
        return (F.coalesce(a, b) + F.coalesce(b, a)) / 2.0

    corr_sd, corr_ds = defined("corr_src_dst"), defined("corr_dst_src")
    # greatest() skips nulls, so clip only where the direction is defined.
    clip_sd = F.when(corr_sd.isNotNull(), F.greatest(corr_sd, F.lit(0.0)))
    clip_ds = F.when(corr_ds.isNotNull(), F.greatest(corr_ds, F.lit(0.0)))
    pair_test = F.coalesce(F.col("p_pair") <= F.lit(pair_threshold), F.lit(False)) if threshold is not None else F.lit(False)
    labelled = (
        stats.withColumn("corr", mean_defined(corr_sd, corr_ds))
        .withColumn("weight", mean_defined(clip_sd, clip_ds))
        .withColumn(
            "evidence",
            F.when(pair_test, F.lit("pair_test")).when(F.col("eb_selected"), F.lit("block_shrinkage")),
        )
        .withColumn("is_edge", F.col("evidence").isNotNull() & (F.col("corr") >= min_corr) & (F.col("corr") > 0))
    )
    edges = labelled.where("is_edge").select(
        "src", "dst", "weight", "corr", "n_days", "evidence",
        F.lit(snapshot_date).cast("date").alias("snapshot_date"),
    )
    blocks = block_evidence(_block_rows(labelled, pair_threshold), evidence_rule or BlockEvidenceRule(fdr=fdr))
    blocks.insert(0, "snapshot_date", snapshot_date)
    return SubstitutionEvidence(edges, blocks)


def _pair_statistics(sales, catalog, snapshot_date, related_pairs, window_days, min_overlap, fdr,
                     autocorrelation_lags, demand_column) -> DataFrame:
    """PAIR_STATS_SCHEMA rows of every candidate pair, computed blockwise and checkpointed."""
    window_start = snapshot_date - timedelta(days=window_days)
    panel = sales.where(
        (F.col("date") >= F.lit(window_start)) & (F.col("date") < F.lit(snapshot_date))
    ).select(
        "product_id",
        F.datediff("date", F.lit(window_start)).cast("int").alias("day"),
        F.col("price").cast("double").alias("price"),
        F.col(demand_column).cast("double").alias("units"),  # the kernel's name for demand
    ).where(F.col("units").isNotNull())  # no demand recorded: a missing day
    # Products with fewer than min_overlap days are not filtered here (that costs a shuffle of the
    # panel): the kernel drops every pair whose common days fall short of min_overlap.

    members, pairs = _candidate_blocks(catalog, related_pairs)
    # By subclass, membership is one row per catalogue product (tens of MB for millions): broadcast
    # it, so the panel is shuffled once only (by block, for the applyInPandas). Memberships derived
    # from related_pairs can be far larger, so Spark chooses the join there.
    block_panel = panel.join(members if pairs is not None else F.broadcast(members), "product_id")

    if pairs is None:
        def per_block(frame: pd.DataFrame) -> pd.DataFrame:
            return block_pair_statistics(frame, None, window_start, window_days, min_overlap, autocorrelation_lags, fdr)

        stats = block_panel.groupBy("block").applyInPandas(per_block, PAIR_STATS_SCHEMA)
    else:
        def per_block_with_pairs(frame: pd.DataFrame, block_pairs: pd.DataFrame) -> pd.DataFrame:
            return block_pair_statistics(
                frame, block_pairs, window_start, window_days, min_overlap, autocorrelation_lags, fdr
            )

        stats = (
            block_panel.groupBy("block")
            # renamed key: `members` was derived from `pairs`, the two sides need distinct columns
            .cogroup(pairs.select(F.col("block").alias("pair_block"), "src", "dst").groupBy("pair_block"))
            .applyInPandas(per_block_with_pairs, PAIR_STATS_SCHEMA)
        )
    # Computed once: the BH threshold, the edges and the block table all read it.
    return stats.localCheckpoint(eager=True)


POWER_Z = 0.8416212335729143  # ndtri(0.8): 80% power


def _block_rows(labelled: DataFrame, pair_threshold: float) -> pd.DataFrame:
    """One row per block (pandas): pair counts, edges, pair and pooled detectability, edge share."""
    z_needed = float(ndtri(1.0 - pair_threshold)) + POWER_Z
    kappa = F.coalesce(_defined_or_zero("kappa_src_dst") + _defined_or_zero("kappa_dst_src"), F.lit(0.0))
    # the cross elasticity at which this pair's combined z reaches the threshold with 80% power
    pair_mde = F.when(kappa > 0, F.lit(z_needed * np.sqrt(2.0)) / kappa)
    z_sum = _defined_or_zero("z_src_dst") + _defined_or_zero("z_dst_src")
    rows = labelled.groupBy("block").agg(
        F.count(F.lit(1)).alias("pairs_tested"),
        F.sum(F.col("is_edge").cast("int")).alias("edges"),
        F.sum(F.when(F.col("is_edge") & (F.col("evidence") == "block_shrinkage"), 1).otherwise(0)).alias("edges_by_shrinkage"),
        F.median(pair_mde).alias("pair_detectable_elasticity"),
        F.first("block_z").alias("pooled_z"),
        F.first("block_z_per_elasticity").alias("pooled_z_per_elasticity"),
        F.first("block_products").alias("products"),
        F.sum(z_sum).alias("z_all"),
        F.sum(F.when(F.col("is_edge"), z_sum).otherwise(0.0)).alias("z_edges"),
    )
    return rows.toPandas().sort_values("block").reset_index(drop=True)


def _defined_or_zero(column: str):
    return F.when(F.col(column).isNull() | F.isnan(column), F.lit(0.0)).otherwise(F.col(column))


@dataclass(frozen=True)
class BlockEvidenceRule:
    """When a block's products must be randomised whole: the constants of `block_evidence`, stated.

    fdr: Benjamini-Hochberg level over blocks for a block that shows substitution on its own.
    market_alpha: one-sided level of the snapshot-wide pooled test that opens the hierarchical
        pooling (blocks borrow strength from each other only when the market as a whole shows
        substitution; 0.01, so a market without substitutes pools by mistake once in a hundred).
    posterior: the posterior probability of substitution a block needs under that pooling.
    min_cross_elasticity: the smallest total cross elasticity per product (posterior mean) that is
        worth randomising a block whole for; below it the spillover is immaterial.
    min_resolved_share: the share of a block's pooled signal its edges must carry for the edges
        to stand for the block; below it the edges cannot resolve the block.
    """

    fdr: float = 0.05
    market_alpha: float = 0.01
    posterior: float = 0.9
    min_cross_elasticity: float = 0.1
    min_resolved_share: float = 0.7


def block_evidence(blocks: pd.DataFrame, rule: BlockEvidenceRule = BlockEvidenceRule()) -> pd.DataFrame:
    """Decide, per block, whether it shows substitution and whether its edges resolve it.

    blocks: one row per block with pooled_z (the block's pooled test, N(0, 1) without
    substitutes), pooled_z_per_elasticity, z_all / z_edges (sum of directional pair z over all
    pairs / over edges). Evidence, in two ways:
    - on its own: the block's pooled test is significant by Benjamini-Hochberg over blocks;
    - by pooling: when the snapshot-wide test sum(z) / sqrt(B) is significant at market_alpha,
      blocks are exchangeable draws theta_b ~ N(mean, tau^2) (moments: tau^2 = var(z) - 1) and a
      block shows substitution when P(theta_b > 0 | z_b) >= posterior. One block of 25 weak
      substitutes has a pooled z of about 1 (no test finds it), while 32 such blocks give ~6.
    A block with evidence whose posterior mean cross elasticity is >= min_cross_elasticity and
    whose edges carry less than min_resolved_share of its pair signal is randomised whole
    (`randomise_whole`); `reason` says which case applies. Adds: pooled_p, posterior_z (posterior
    mean of theta_b), posterior_probability, cross_elasticity_estimate (total per product),
    pooled_detectable_elasticity (80% power at the pooled test's own BH step), resolved_share,
    evidence, randomise_whole, exposure_by_block (see below), reason.
    """
    out = blocks.copy()
    z = out["pooled_z"].to_numpy(dtype=float)
    usable = np.isfinite(z)
    out["pooled_p"] = np.where(usable, ndtr(-np.nan_to_num(z)), np.nan)
    n_blocks = int(usable.sum())
    own = np.zeros(len(out), dtype=bool)
    if n_blocks:
        p = out.loc[usable, "pooled_p"].to_numpy()
        order = np.argsort(p)
        passed = p[order] <= rule.fdr * np.arange(1, n_blocks + 1) / n_blocks
        cutoff = p[order][np.flatnonzero(passed).max()] if passed.any() else -1.0
        own[np.flatnonzero(usable)] = p <= cutoff
    market_z = float(z[usable].sum() / np.sqrt(n_blocks)) if n_blocks else float("nan")
    pooled = n_blocks >= 2 and market_z >= float(ndtri(1.0 - rule.market_alpha))
    posterior_mean = np.where(usable, z, np.nan)
    posterior_sd = np.ones(len(out))
    if pooled:
        mean, tau2 = float(z[usable].mean()), max(float(z[usable].var(ddof=1)) - 1.0, 0.0)
        shrink = tau2 / (tau2 + 1.0)
        posterior_mean = np.where(usable, mean + shrink * (z - mean), np.nan)
        posterior_sd = np.full(len(out), np.sqrt(max(shrink, 1.0 / n_blocks)))  # tau2 = 0: the mean's own spread
    probability = np.where(usable, ndtr(np.nan_to_num(posterior_mean) / posterior_sd), np.nan)
    k = out["pooled_z_per_elasticity"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = np.where(usable & (k > 0), posterior_mean / k, np.nan)
        z_needed = float(ndtri(1.0 - rule.fdr / max(n_blocks, 1))) + POWER_Z
        detectable = np.where(k > 0, z_needed / k, np.nan)
        z_all, z_edges = out["z_all"].to_numpy(float), out["z_edges"].to_numpy(float)
        # the share of the pair signal on edges; without any positive signal, 1 if edges exist, else 0
        resolved = np.where(z_all > 0, np.clip(z_edges / z_all, 0.0, 1.0), np.where(z_edges > 0, 1.0, 0.0))
    by_pooling = pooled & (probability >= rule.posterior)
    evidence = own | by_pooling
    material = np.nan_to_num(estimate) >= rule.min_cross_elasticity
    whole = evidence & material & (resolved < rule.min_resolved_share)
    reason = np.select(
        [whole & own, whole, evidence & ~material, evidence],
        [
            "randomise whole: its own pooled test shows substitution its edges do not carry",
            "randomise whole: the market shows substitution and this block likely shares it; its edges do not carry it",
            "edges only: substitution shown but immaterial (below min_cross_elasticity)",
            "edges: they carry most of the substitution the block shows",
        ],
        default="edges only: no evidence of substitution beyond its edges",
    )
    out["posterior_z"] = posterior_mean
    out["posterior_probability"] = probability
    out["cross_elasticity_estimate"] = estimate
    out["pooled_detectable_elasticity"] = detectable
    out["resolved_share"] = resolved
    out["evidence"] = evidence
    out["randomise_whole"] = whole
    # exposure is the block's treated share where substitution is more likely than not and the
    # edges do not carry it: the blocks randomised whole, and (in a market that shows substitution)
    # the blocks that fell short of the posterior needed to randomise them whole
    out["exposure_by_block"] = whole | (
        pooled & (np.nan_to_num(probability) >= 0.5) & (resolved < rule.min_resolved_share)
    )
    out["reason"] = reason
    out["market_z"] = market_z  # the snapshot-wide pooled test, on every row
    out["market_pooled"] = bool(pooled)
    return out


def _edge_schema() -> T.StructType:
    return T.StructType(
        [
            T.StructField("src", T.StringType()),
            T.StructField("dst", T.StringType()),
            T.StructField("weight", T.DoubleType()),
            T.StructField("corr", T.DoubleType()),
            T.StructField("n_days", T.IntegerType()),
            T.StructField("evidence", T.StringType()),
            T.StructField("snapshot_date", T.DateType()),
        ]
    )


def graph_summary(edges: DataFrame) -> dict:
    """Edge count, nodes with an edge, mean degree and weight quantiles, for asset metadata."""
    endpoints = edges.select(F.col("src").alias("node")).union(edges.select(F.col("dst").alias("node")))
    n_nodes = endpoints.distinct().count()
    row = edges.agg(
        F.count(F.lit(1)).alias("edges"),
        F.min("weight").alias("min"),
        F.percentile("weight", 0.25).alias("p25"),
        F.median("weight").alias("median"),
        F.percentile("weight", 0.75).alias("p75"),
        F.percentile("weight", 0.9).alias("p90"),
        F.max("weight").alias("max"),
    ).first()
    n_edges = int(row["edges"])
    return {
        "edges": n_edges,
        "nodes_with_edge": int(n_nodes),
        "mean_degree": (2.0 * n_edges / n_nodes) if n_nodes else 0.0,
        "weight_quantiles": {
            q: (float(row[q]) if row[q] is not None else None) for q in ("min", "p25", "median", "p75", "p90", "max")
        },
    }


def power_summary(blocks: pd.DataFrame, max_rows: int = 40) -> dict:
    """What the graph could see: per-block power and evidence as metadata, a table and warnings.

    blocks: `block_evidence` rows. Warnings name what a user must know before trusting a
    cluster design: blocks whose pair tests cannot see the substitution they likely have, and a
    market where substitution is shown but neither edges nor blocks could be resolved.
    """
    if blocks.empty:
        return {"blocks": 0, "warnings": ["no block had enough history to be tested"], "table": ""}
    whole = blocks["randomise_whole"].astype(bool)
    evidence = blocks["evidence"].astype(bool)
    summary = {
        "blocks": int(len(blocks)),
        "pairs_tested": int(blocks["pairs_tested"].sum()),
        "edges": int(blocks["edges"].sum()),
        "edges_by_shrinkage": int(blocks["edges_by_shrinkage"].sum()),
        "blocks_with_evidence": int(evidence.sum()),
        "blocks_randomised_whole": int(whole.sum()),
        "market_pooled_z": float(blocks["market_z"].iloc[0]),
        "median_pair_detectable_elasticity": float(np.nanmedian(blocks["pair_detectable_elasticity"])),
        "median_pooled_detectable_elasticity": float(np.nanmedian(blocks["pooled_detectable_elasticity"])),
    }
    warnings = []
    if whole.any():
        warnings.append(
            f"{int(whole.sum())} of {len(blocks)} blocks show substitution their pair edges cannot resolve "
            f"(pair tests detect a cross elasticity of about {summary['median_pair_detectable_elasticity']:.2f} "
            "at 80% power); they are randomised whole, which costs standard error"
        )
    unresolved = blocks["reason"].str.contains("immaterial")
    if unresolved.any():
        warnings.append(
            f"{int(unresolved.sum())} block(s) show substitution that is judged immaterial and stay on their edges: "
            "cluster randomisation there is close to product randomisation"
        )
    if summary["edges"] == 0 and not whole.any():
        warnings.append(
            "no substitution found: clusters will be singletons and cluster randomisation equals product "
            f"randomisation; the data could detect pair cross elasticities of about "
            f"{summary['median_pair_detectable_elasticity']:.2f} and per-product totals of about "
            f"{summary['median_pooled_detectable_elasticity']:.2f} (80% power)"
        )
    columns = ["block", "products", "pairs_tested", "edges", "pair_detectable_elasticity", "pooled_z",
               "pooled_detectable_elasticity", "cross_elasticity_estimate", "resolved_share", "randomise_whole"]
    shown = blocks.sort_values("block").head(max_rows)[columns]
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join(
        "| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |\n"
        for row in shown.itertuples(index=False)
    )
    more = f"\n({len(blocks) - max_rows} more blocks)\n" if len(blocks) > max_rows else ""
    return {**summary, "warnings": warnings, "table": header + body + more}


def snapshot_dates_needed(default: date, existing: list[date], experiment_starts: list[date]) -> list[date]:
    """The snapshot dates a build must add: `default` (unless it exists) and, for every experiment
    start with no snapshot dated on or before it (so none in force at its start), that start.
    One snapshot at the earliest such start is in force for the later ones too."""
    have = set(existing)
    wanted = [] if default in have else [default]
    have.add(default)
    for start in sorted(set(experiment_starts)):
        if not any(d <= start for d in have):
            wanted.append(start)
            have.add(start)
    return sorted(wanted)
