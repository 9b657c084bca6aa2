"""A market simulator with known truth: pricelab's demo data set, test fixtures and estimator judge.

A `MarketWorld` (from `simulate_market`) holds a catalogue and, per product, the true demand
parameters and the true substitution graph. The functions below turn it into contract-v1 inputs
(`simulate_history`, `write_demo_inputs`), respond to published assignments (`simulate_sales`, the
closed loop), and state the exact effects an estimator should recover (`true_effects`).

Demand model
------------
Product i, day t (t = days since `history_start`), expected units per day lambda_it:

    log lambda_it = log mu_i + trend_i * t / 365 + weekly_{s(i), weekday(t)}
                    + A_i * sin(2 pi * ordinal(t) / 365.25 + phase_{category(i)})
                    + e_i * log(p0_it / r_it)                      own promotion
                    + sum_j c_ij * log(p_jt / r_jt)                neighbours' actual prices
                    + D_it                                         own treatment, with carryover
                    + trigger_log_effect * [competitor_discount active for i on t]
                    + L_i * [t >= level-shift start of i]
                    + x_it                                         AR(1) drift (0 by default)

- r_it is the regular price (base price with rare permanent random-walk steps), p0_it the
  untreated shelf price (r_it, or r_it * (1 - discount) during a promotion), p_it the actual
  price: p0_it * (1 + price_change) on a treated product-day, else p0_it.
- c_ij >= 0 is the symmetric cross elasticity of the true substitution graph (`world.true_edges`,
  `world.cross_elasticity` as a scipy.sparse matrix): a neighbour's price cut lowers my demand.
- Own treatment with carryover: D_it = e_i * log(1 + price_change) on a treated day (replacing
  the previous value), else D_it = rho * D_{i,t-1} with rho = `carryover_decay`. A neighbour's
  treatment acts only through its price on the same day (no carryover in cross effects).
  A product-day is treated when an assignment row has arm == 'treatment' (blackout or not);
  several treatment rows on one product-day add their log(1 + price_change).
- Observed units = Poisson(lambda_it * exp(eps_it)), eps from N(0, shock_sd) with probability
  1 - shock_tail_share and N(0, shock_tail_sd) otherwise, shifted so E[exp(eps)] = 1: lambda_it
  is exactly the expected number of units. With `demand_noise='gamma'` the multiplier is
  G ~ Gamma(gamma_shape, 1/gamma_shape) instead (negative binomial units, Var = mu + mu^2/shape)
  times a rare exp(N(0, shock_tail_sd)) spike. The units draw is an exact inverse-CDF draw from one
  uniform per product-day, so runs that differ only in treatment share their random numbers
  (units move monotonically with lambda, product-day by product-day).
- Randomness is keyed by (seed, date, stream): `np.random.default_rng([seed, ordinal, stream])`
  for each day's draws, so a date range simulated in pieces equals one run, and the history is
  the same process as the experiment period. State (regular prices, promotions, trigger windows,
  carryover) is always stepped from `history_start`.

Observation (history and experiment period alike): a share `missing_share` of product-days has
no row (no data, not zero sales), and a share `late_entry_share` of products has no rows before
its entry date (within the history year). `views` = units + Poisson(lambda * exp(eps) *
(1/conversion_i - 1)) unless `observe_views` is False; `revenue` = price * units.

Regimes (`REGIMES`, `regime_config`): the default market, a weak-substitution drifting market
without views, and a market without substitutes; see the comment above `REGIMES`.

True effects (`true_effects`)
-----------------------------
Expected units, no noise, per experiment E over its analysis set: the product-days enrolled in E
(an assignment row of E) with blackout False. Write lambda_it(D, tau) for the expected units with
own treatment term D and neighbour treatment log-factors tau (tau_j = log(1 + price_change) for
a treated neighbour, 0 otherwise); pc = E's price_change; g_i = e_i * log(1 + pc).

- true_direct_effect = mean over the analysis set of
  lambda_it(D = g_i, tau as assigned) - lambda_it(D = 0, tau as assigned).
- true_global_effect = mean over the analysis set of
  lambda_it(D = g_i, tau: every product enrolled in E that day treated)
  - lambda_it(D = 0, tau: no product enrolled in E treated).
- true_spillover_effect = mean over the CONTROL product-days of the analysis set of
  lambda_it(D = 0, tau as assigned) - lambda_it(D = 0, tau: no product enrolled in E treated).
  For a price cut (pc < 0) and substitutes (c > 0) this is negative.
- true_relative_effect = true_direct_effect / mean over the analysis set of
  lambda_it(D = 0, tau as assigned) (the expected units had the product-day been control).
In every counterfactual the treatments of other experiments stay as assigned. The direct effect
is the same-day (steady-state) effect of treatment: carryover left over from earlier treated
days is not part of it, which is what blackout periods are meant to protect.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
import yaml
from scipy import sparse, special

from pipelines.storage import write_text

# Independent random streams; a day's stream is default_rng([seed, date.toordinal(), stream]).
_WORLD_DAY = 0  # world construction uses [seed, 0, part]
_PRICE_STREAM = 1
_TRIGGER_STREAM = 2
_DEMAND_STREAM = 3
_OBSERVE_STREAM = 4
_VIEWS_STREAM = 5
_DRIFT_STREAM = 6

_BRAND_TIERS = ("value", "standard", "premium")
TRIGGER_EVENT = "competitor_discount"
ASSIGNMENT_COLUMNS = ("date", "experiment", "product_id", "arm", "blackout", "price_change")


@dataclass(frozen=True)
class MarketConfig:
    """Size, calendar, seed and every model knob of a simulated market.

    `weak_edge_prob` is per pair of products in a subclass, so the number of weak edges per
    product grows with subclass size: scale `n_subclasses` with `n_products` (~30-50 products a
    subclass) for large markets, e.g. n_products=100_000, n_subclasses=3000.
    """

    n_products: int = 1000
    categories: tuple[str, ...] = ("kitchen", "garden", "toys", "pets", "office")
    n_subclasses: int = 30
    history_start: date = date(2025, 1, 1)
    history_days: int = 365
    seed: int = 42
    # catalogue and demand levels
    base_price_median: float = 20.0
    margin_range: tuple = (0.3, 0.5)  # unit cost = base price x (1 - margin), margin uniform in this range
    base_price_subclass_sd: float = 0.7
    baseline_units_median: float = 15.0
    baseline_units_sd: float = 0.7
    elasticity_noise_sd: float = 0.2
    elasticity_bounds: tuple[float, float] = (-4.0, -0.3)
    trend_sd: float = 0.15
    weekly_amplitude: float = 0.15
    yearly_amplitude_max: float = 0.3
    # true substitution graph (within subclasses only)
    group_size_range: tuple[int, int] = (3, 8)
    group_edge_prob: float = 0.6
    group_cross_elasticity_range: tuple[float, float] = (0.3, 0.8)
    weak_edge_prob: float = 0.02
    weak_cross_elasticity_range: tuple[float, float] = (0.05, 0.15)
    # None: no cap; else each product's cross elasticities add up to at most this x |own| (a pair
    # is scaled by the smaller of its two products' factors, so the graph stays symmetric)
    cross_elasticity_cap: float | None = None
    # price process
    price_steps_per_year: float = 3.0
    price_step_sd: float = 0.05
    promos_per_year_range: tuple[float, float] = (8.0, 12.0)
    promo_days_range: tuple[int, int] = (3, 10)
    promo_discount_range: tuple[float, float] = (0.10, 0.30)
    # trigger events
    trigger_rate_per_day: float = 1.0 / 45.0
    trigger_days: int = 7
    trigger_log_effect: float = -0.15
    # treatment carryover, shocks, outliers
    carryover_decay: float = 0.5
    shock_sd: float = 0.2
    shock_tail_share: float = 0.02
    shock_tail_sd: float = 1.0
    level_shift_share: float = 0.01
    level_shift_log: float = 0.5
    # demand noise: 'lognormal' (Poisson of lambda * exp(eps), eps normal with a heavy tail) or
    # 'gamma' (negative binomial: Poisson of lambda * G, G ~ Gamma(shape, 1/shape), so
    # Var = mu + mu^2 / gamma_shape, times a rare exp(N(0, shock_tail_sd)) spike)
    demand_noise: str = "lognormal"
    gamma_shape: float = 6.0
    # AR(1) drift of log demand per product: x_t = persistence * x_{t-1} + N(0, drift_sd)
    drift_persistence: float = 0.0
    drift_sd: float = 0.0
    # observation
    missing_share: float = 0.02
    late_entry_share: float = 0.03
    observe_views: bool = True  # False: sales carry price and units only (no `views` column)

    def __post_init__(self) -> None:
        if self.n_products < 1:
            raise ValueError(f"MarketConfig.n_products must be >= 1, got {self.n_products}")
        if not 1 <= self.n_subclasses <= self.n_products:
            raise ValueError(
                f"MarketConfig.n_subclasses must be in 1..n_products, got {self.n_subclasses}"
            )
        if len(self.categories) < 1 or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"MarketConfig.categories must be distinct and non-empty: {self.categories}")
        if self.history_days < 1:
            raise ValueError(f"MarketConfig.history_days must be >= 1, got {self.history_days}")
        if not 0 <= self.carryover_decay < 1:
            raise ValueError(f"MarketConfig.carryover_decay must be in [0, 1), got {self.carryover_decay}")
        if self.group_size_range[0] < 2 or self.group_size_range[1] < self.group_size_range[0]:
            raise ValueError(
                f"MarketConfig.group_size_range must be (min>=2, max>=min): {self.group_size_range}"
            )
        if self.demand_noise not in ("lognormal", "gamma"):
            raise ValueError(f"MarketConfig.demand_noise must be 'lognormal' or 'gamma', got {self.demand_noise!r}")
        if not 0 <= self.drift_persistence < 1 or self.drift_sd < 0:
            raise ValueError(
                f"MarketConfig.drift_persistence must be in [0, 1) and drift_sd >= 0, got "
                f"{self.drift_persistence}, {self.drift_sd}"
            )
        if self.cross_elasticity_cap is not None and self.cross_elasticity_cap < 0:
            raise ValueError(f"MarketConfig.cross_elasticity_cap must be >= 0 or None, got {self.cross_elasticity_cap}")

    @property
    def history_end(self) -> date:
        """Last day of the simulated history (inclusive)."""
        return self.history_start + timedelta(days=self.history_days - 1)

    def to_json(self) -> str:
        """The config as JSON (dates ISO, tuples as lists)."""
        values = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.isoformat() if isinstance(v, date) else list(v) if isinstance(v, tuple) else v
        return json.dumps(values, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MarketConfig":
        """Inverse of `to_json`; unknown keys are refused."""
        values = json.loads(text)
        fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields_by_name))
        if unknown:
            raise ValueError(f"unknown MarketConfig field(s) in JSON: {unknown}")
        kwargs = {}
        for name, v in values.items():
            default = fields_by_name[name].default
            if isinstance(default, date):
                v = date.fromisoformat(v)
            elif isinstance(default, tuple):
                v = tuple(v)
            kwargs[name] = v
        return cls(**kwargs)


@dataclass
class MarketWorld:
    """A simulated market: catalogue, per-product truth and the true substitution graph.

    `catalog` is contract v1 (product_id, category, subclass + attributes). `products` holds the
    truth per product, row-aligned with `catalog`. `weekly_profile` is long (subclass, weekday
    0=Monday, log_effect); `category_phase` is (category, yearly_phase). `true_edges` has one row
    per unordered pair (src < dst, cross_elasticity); `cross_elasticity` is the same symmetric
    matrix as scipy.sparse CSR, indexed by catalogue row.
    """

    config: MarketConfig
    catalog: pd.DataFrame
    products: pd.DataFrame
    weekly_profile: pd.DataFrame
    category_phase: pd.DataFrame
    true_edges: pd.DataFrame
    cross_elasticity: sparse.csr_matrix = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.catalog)
        if not (self.catalog["product_id"].to_numpy() == self.products["product_id"].to_numpy()).all():
            raise ValueError("MarketWorld: products must be row-aligned with catalog by product_id")
        position = pd.Series(np.arange(n), index=self.catalog["product_id"].to_numpy())
        src = position.reindex(self.true_edges["src"].to_numpy()).to_numpy()
        dst = position.reindex(self.true_edges["dst"].to_numpy()).to_numpy()
        if np.isnan(src).any() or np.isnan(dst).any():
            raise ValueError("MarketWorld.true_edges names products missing from the catalog")
        src, dst = src.astype(np.int64), dst.astype(np.int64)
        c = self.true_edges["cross_elasticity"].to_numpy(dtype=float)
        self.cross_elasticity = sparse.csr_matrix(
            (np.concatenate([c, c]), (np.concatenate([src, dst]), np.concatenate([dst, src]))),
            shape=(n, n),
        )
        self._arrays = _ModelArrays.from_world(self)

    @property
    def product_ids(self) -> np.ndarray:
        return self.catalog["product_id"].to_numpy()


class _ModelArrays(NamedTuple):
    """Per-product numpy arrays the day loop reads (derived from the world's frames)."""

    log_mu: np.ndarray
    elasticity: np.ndarray
    trend: np.ndarray
    yearly_amplitude: np.ndarray
    yearly_phase: np.ndarray
    weekly: np.ndarray  # (n, 7)
    base_price: np.ndarray
    promo_start_prob: np.ndarray
    conversion: np.ndarray
    level_shift: np.ndarray
    level_shift_start: np.ndarray  # ordinal
    entry: np.ndarray  # ordinal

    @classmethod
    def from_world(cls, world: MarketWorld) -> "_ModelArrays":
        cfg, p, cat = world.config, world.products, world.catalog
        phase = world.category_phase.set_index("category")["yearly_phase"]
        weekly = world.weekly_profile.pivot(index="subclass", columns="weekday", values="log_effect")
        weekly = weekly.reindex(columns=range(7))
        rate = p["promos_per_year"].to_numpy(float)
        mean_len = (cfg.promo_days_range[0] + cfg.promo_days_range[1]) / 2
        # start probability per non-promotion day, so the expected count per year is `rate`
        start_prob = (rate / 365.0) / np.clip(1.0 - rate * mean_len / 365.0, 0.05, None)
        return cls(
            log_mu=np.log(p["baseline_units"].to_numpy(float)),
            elasticity=p["elasticity"].to_numpy(float),
            trend=p["trend"].to_numpy(float),
            yearly_amplitude=p["yearly_amplitude"].to_numpy(float),
            yearly_phase=phase.reindex(cat["category"]).to_numpy(float),
            weekly=weekly.reindex(cat["subclass"]).to_numpy(float),
            base_price=p["base_price"].to_numpy(float),
            promo_start_prob=start_prob,
            conversion=p["conversion_rate"].to_numpy(float),
            level_shift=p["level_shift"].to_numpy(float),
            level_shift_start=_ordinals(p["level_shift_start"]),
            entry=_ordinals(p["entry_date"]),
        )


def _ordinals(dates: pd.Series) -> np.ndarray:
    """Dates (datetime.date or datetime64) as proleptic Gregorian ordinals, vectorised."""
    days = pd.to_datetime(pd.Series(dates)).to_numpy().astype("datetime64[D]").astype(np.int64)
    return days + date(1970, 1, 1).toordinal()


def _day_rng(seed: int, day: date, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, day.toordinal(), stream])


def _dates_as_objects(origin: date, offsets: np.ndarray) -> np.ndarray:
    """Day offsets from `origin` as an object array of datetime.date (vectorised)."""
    return (np.datetime64(origin, "D") + offsets.astype("timedelta64[D]")).astype(object)


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------


def _catalogue(cfg: MarketConfig, r: np.random.Generator, sub_idx: np.ndarray, sub_names: np.ndarray,
               cat_idx: np.ndarray, product_id: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The catalogue's attributes (stream 2): (catalog, tier, pack_size, rating, private_label)."""
    n = cfg.n_products
    tier = r.choice(3, size=n, p=[0.3, 0.5, 0.2])
    pack_size = r.integers(1, 13, size=n)
    rating = np.round(r.uniform(3.0, 5.0, size=n), 1)
    private_label = r.random(n) < np.where(tier == 0, 0.4, np.where(tier == 1, 0.1, 0.0))
    catalog = pd.DataFrame(
        {
            "product_id": product_id,
            "category": np.array(cfg.categories, dtype=object)[cat_idx],
            "subclass": sub_names[sub_idx],
            "brand_tier": np.array(_BRAND_TIERS, dtype=object)[tier],
            "pack_size": pack_size.astype(np.int64),
            "rating": rating,
            "is_private_label": private_label,
        }
    )
    return catalog, tier, pack_size, rating, private_label


def _demand_parameters(cfg: MarketConfig, r: np.random.Generator, sub_idx: np.ndarray, tier, pack_size, rating,
                       private_label) -> dict[str, np.ndarray]:
    """Each product's price, demand level and elasticity, trend, seasonality, promotions and
    conversion (stream 3)."""
    n, n_sub = cfg.n_products, cfg.n_subclasses
    sub_log_price = r.normal(math.log(cfg.base_price_median), cfg.base_price_subclass_sd, n_sub)
    tier_scale = np.array([0.75, 1.0, 1.5])[tier] * np.where(private_label, 0.85, 1.0)
    base_price = np.maximum(
        np.round(np.exp(sub_log_price[sub_idx] + r.normal(0.0, 0.2, n)) * tier_scale, 2), 0.5
    )
    baseline_units = np.exp(
        math.log(cfg.baseline_units_median) + r.normal(0.0, cfg.baseline_units_sd, n) + 0.3 * (rating - 4.0)
    )
    elasticity = np.clip(
        -1.2 - 0.8 * (tier == 0) + 0.4 * (tier == 2) - 0.05 * pack_size
        + r.normal(0.0, cfg.elasticity_noise_sd, n),
        *cfg.elasticity_bounds,
    )
    return {
        "base_price": base_price,
        "baseline_units": baseline_units,
        "elasticity": elasticity,
        "trend": r.normal(0.0, cfg.trend_sd, n),
        "yearly_amplitude": r.uniform(0.0, cfg.yearly_amplitude_max, n),
        "promos_per_year": r.uniform(*cfg.promos_per_year_range, n),
        "conversion_rate": r.uniform(0.04, 0.12, n),
    }


def _breaks(cfg: MarketConfig, r: np.random.Generator) -> dict[str, np.ndarray]:
    """Level shifts and late entries (stream 4): shifts start anywhere in the history or the two
    months after it (the experiment period)."""
    n = cfg.n_products
    shifted = r.random(n) < cfg.level_shift_share
    level_shift = np.where(shifted, np.where(r.random(n) < 0.5, -1.0, 1.0) * cfg.level_shift_log, 0.0)
    level_shift_offset = r.integers(0, cfg.history_days + 60, n)
    late = r.random(n) < cfg.late_entry_share
    lo = cfg.history_days // 10
    entry_offset = np.where(late, r.integers(lo, max(lo + 1, cfg.history_days * 9 // 10), n), 0)
    return {
        "level_shift": level_shift,
        "level_shift_start": _dates_as_objects(cfg.history_start, level_shift_offset),
        "entry_date": _dates_as_objects(cfg.history_start, entry_offset),
    }


def _seasonal_profiles(cfg: MarketConfig, r: np.random.Generator, sub_names: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The subclasses' weekly profiles and the categories' yearly phases (stream 5)."""
    n_sub, n_cat = cfg.n_subclasses, len(cfg.categories)
    weekend = np.array([0, 0, 0, 0, 0, 1, 1], dtype=float)
    amplitude = cfg.weekly_amplitude * r.uniform(0.7, 1.3, (n_sub, 1))
    weekly = amplitude * (weekend - weekend.mean()) + r.normal(0.0, 0.02, (n_sub, 7))
    weekly -= weekly.mean(axis=1, keepdims=True)
    weekly_profile = pd.DataFrame(
        {
            "subclass": np.repeat(sub_names, 7),
            "weekday": np.tile(np.arange(7, dtype=np.int64), n_sub),
            "log_effect": weekly.ravel(),
        }
    )
    category_phase = pd.DataFrame(
        {"category": np.array(cfg.categories, dtype=object), "yearly_phase": r.uniform(0, 2 * np.pi, n_cat)}
    )
    return weekly_profile, category_phase


def simulate_market(config: MarketConfig = MarketConfig()) -> MarketWorld:
    """Draw a market (catalogue, demand parameters, true substitution graph) from `config`.

    Every part draws from its own random stream ([seed, world day, part]), so adding a draw to
    one part leaves every other part as it was."""
    cfg = config
    n, n_sub, n_cat = cfg.n_products, cfg.n_subclasses, len(cfg.categories)

    def rng(part: int) -> np.random.Generator:
        return np.random.default_rng([cfg.seed, _WORLD_DAY, part])

    # Subclasses spread evenly over categories; products spread evenly over subclasses.
    sub_category = np.arange(n_sub) % n_cat
    sub_names = np.array(
        [f"{cfg.categories[c]}-{k + 1:02d}" for c, k in zip(sub_category, np.arange(n_sub) // n_cat)],
        dtype=object,
    )
    sub_idx = rng(1).permutation(np.arange(n) % n_sub)
    cat_idx = sub_category[sub_idx]
    width = max(5, len(str(n)))
    product_id = np.array([f"P{i:0{width}d}" for i in range(1, n + 1)], dtype=object)

    catalog, tier, pack_size, rating, private_label = _catalogue(cfg, rng(2), sub_idx, sub_names, cat_idx, product_id)
    demand = _demand_parameters(cfg, rng(3), sub_idx, tier, pack_size, rating, private_label)
    breaks = _breaks(cfg, rng(4))
    weekly_profile, category_phase = _seasonal_profiles(cfg, rng(5), sub_names)

    group, src, dst, cross = _true_substitution_graph(rng(6), sub_idx, n_sub, cfg)
    if cfg.cross_elasticity_cap is not None and len(cross):
        total = np.bincount(src, weights=cross, minlength=n) + np.bincount(dst, weights=cross, minlength=n)
        budget = cfg.cross_elasticity_cap * np.abs(demand["elasticity"])
        factor = np.where(total > budget, budget / np.where(total > 0, total, 1.0), 1.0)
        cross = cross * np.minimum(factor[src], factor[dst])
    products = pd.DataFrame({"product_id": product_id, **demand, **breaks, "true_group": group.astype(np.int64)})
    true_edges = pd.DataFrame(
        {"src": product_id[src], "dst": product_id[dst], "cross_elasticity": cross}
    )
    # unit costs (issue 16: profit truth), from their own stream so every other draw stays as it was
    margin = rng(8).uniform(*cfg.margin_range, n)
    products["unit_cost"] = np.round(demand["base_price"] * (1.0 - margin), 2)
    return MarketWorld(cfg, catalog, products, weekly_profile, category_phase, true_edges)


def _true_substitution_graph(
    rng: np.random.Generator, sub_idx: np.ndarray, n_sub: int, cfg: MarketConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """True substitute groups and edges (product positions src < dst, cross elasticity).

    Each subclass is cut into groups of `group_size_range` products (in random order; a short
    remainder joins the previous group). Pairs inside a group are edges with probability
    `group_edge_prob`; pairs across groups of one subclass with `weak_edge_prob` (sampled, never
    enumerated, so a large subclass costs memory in its edges only).
    """
    n = len(sub_idx)
    gmin, gmax = cfg.group_size_range
    n_in_sub = np.bincount(sub_idx, minlength=n_sub)
    sub_start = np.concatenate([[0], np.cumsum(n_in_sub)[:-1]])
    by_subclass = np.lexsort((rng.random(n), sub_idx))  # products by subclass, random within
    position = np.empty(n, dtype=np.int64)
    position[by_subclass] = np.arange(n) - sub_start[sub_idx[by_subclass]]

    # group boundaries per subclass: cumulative random sizes; searchsorted on one offset array
    n_slots = int(n_in_sub.max()) // gmin + 2
    bounds = np.cumsum(rng.integers(gmin, gmax + 1, size=(n_sub, n_slots)), axis=1)
    stride = int(bounds.max()) + 1
    flat = (bounds + np.arange(n_sub)[:, None] * stride).ravel()
    group_in_sub = np.searchsorted(flat, position + sub_idx * stride, side="right") - sub_idx * n_slots
    last = np.zeros(n_sub, dtype=np.int64)
    np.maximum.at(last, sub_idx, group_in_sub)
    last_start = np.where(last > 0, bounds[np.arange(n_sub), np.maximum(last - 1, 0)], 0)
    merge = (n_in_sub - last_start < gmin) & (last > 0)
    group_in_sub = group_in_sub - ((group_in_sub == last[sub_idx]) & merge[sub_idx])
    group = np.unique(sub_idx * n_slots + group_in_sub, return_inverse=True)[1]

    # within-group pairs, vectorised per distinct group size
    group_size = np.bincount(group)
    by_group = np.argsort(group, kind="stable")
    group_start = np.concatenate([[0], np.cumsum(group_size)[:-1]])
    pair_a, pair_b = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for size in np.unique(group_size[group_size >= 2]):
        starts = group_start[group_size == size][:, None]
        ia, ib = np.triu_indices(size, 1)
        pair_a.append(by_group[(starts + ia).ravel()])
        pair_b.append(by_group[(starts + ib).ravel()])
    a, b = np.concatenate(pair_a), np.concatenate(pair_b)
    keep = rng.random(len(a)) < cfg.group_edge_prob
    a, b = a[keep], b[keep]
    c_strong = rng.uniform(*cfg.group_cross_elasticity_range, len(a))

    # weak edges across groups of the same subclass: Binomial count, then sampled pairs
    sum_sq = np.bincount(sub_idx, weights=group_size[group], minlength=n_sub)  # sum over groups g^2
    across_pairs = ((n_in_sub.astype(float) ** 2 - sum_sq) / 2).astype(np.int64)
    wanted = rng.binomial(np.maximum(across_pairs, 0), cfg.weak_edge_prob)
    draws = np.where(wanted > 0, 2 * wanted + 8, 0)
    cand_sub = np.repeat(np.arange(n_sub), draws)
    size = n_in_sub[cand_sub]
    wa = by_subclass[sub_start[cand_sub] + (rng.random(len(cand_sub)) * size).astype(np.int64)]
    wb = by_subclass[sub_start[cand_sub] + (rng.random(len(cand_sub)) * size).astype(np.int64)]
    ok = group[wa] != group[wb]
    cand_sub, lo, hi = cand_sub[ok], np.minimum(wa, wb)[ok], np.maximum(wa, wb)[ok]
    _, first = np.unique(lo * n + hi, return_index=True)
    first.sort()  # keep candidates in their random draw order
    cand_sub, lo, hi = cand_sub[first], lo[first], hi[first]
    order = np.argsort(cand_sub, kind="stable")
    cand_sub, lo, hi = cand_sub[order], lo[order], hi[order]
    sub_first = np.searchsorted(cand_sub, cand_sub, side="left")
    keep = (np.arange(len(cand_sub)) - sub_first) < wanted[cand_sub]
    lo, hi = lo[keep], hi[keep]
    c_weak = rng.uniform(*cfg.weak_cross_elasticity_range, len(lo))

    src = np.concatenate([np.minimum(a, b), lo])
    dst = np.concatenate([np.maximum(a, b), hi])
    cross = np.concatenate([c_strong, c_weak])
    order = np.lexsort((dst, src))
    return group, src[order], dst[order], cross[order]


# --------------------------------------------------------------------------------------------
# The day loop
# --------------------------------------------------------------------------------------------


class _MarketDay(NamedTuple):
    day: date
    offset: int  # days since history_start
    regular_price: np.ndarray
    shelf_price: np.ndarray  # untreated price (regular or promotion)
    trigger_started: np.ndarray
    log_base: np.ndarray  # log expected units without any treatment term


def _market_days(world: MarketWorld, last_day: date) -> Iterator[_MarketDay]:
    """Step the exogenous market (prices, promotions, triggers) from `history_start` to `last_day`."""
    cfg, arr = world.config, world._arrays
    n = len(arr.log_mu)
    step_prob = cfg.price_steps_per_year / 365.0
    regular = arr.base_price.copy()
    promo_left = np.zeros(n, dtype=np.int64)
    promo_factor = np.ones(n)
    trigger_left = np.zeros(n, dtype=np.int64)
    drift = np.zeros(n)
    if cfg.drift_sd > 0:  # starts from its stationary distribution
        stationary_sd = cfg.drift_sd / math.sqrt(1.0 - cfg.drift_persistence**2)
        drift = np.random.default_rng([cfg.seed, _WORLD_DAY, 7]).normal(0.0, stationary_sd, n)
    for offset in range((last_day - cfg.history_start).days + 1):
        day = cfg.history_start + timedelta(days=offset)
        ordinal = day.toordinal()
        if cfg.drift_sd > 0 and offset > 0:
            drift = cfg.drift_persistence * drift + _day_rng(cfg.seed, day, _DRIFT_STREAM).normal(0.0, cfg.drift_sd, n)
        r = _day_rng(cfg.seed, day, _PRICE_STREAM)
        step = r.random(n) < step_prob
        step_size = r.normal(0.0, cfg.price_step_sd, n)
        regular = regular * np.exp(np.where(step, step_size, 0.0))
        start_draw = r.random(n)
        length = r.integers(cfg.promo_days_range[0], cfg.promo_days_range[1] + 1, n)
        discount = r.uniform(*cfg.promo_discount_range, n)
        starts = (promo_left == 0) & (start_draw < arr.promo_start_prob)
        promo_left = np.where(starts, length, promo_left)
        promo_factor = np.where(starts, 1.0 - discount, promo_factor)
        on_promo = promo_left > 0
        shelf = regular * np.where(on_promo, promo_factor, 1.0)
        promo_left = promo_left - on_promo

        r = _day_rng(cfg.seed, day, _TRIGGER_STREAM)
        trigger_started = r.random(n) < cfg.trigger_rate_per_day
        trigger_left = np.where(trigger_started, cfg.trigger_days, trigger_left)
        trigger_on = trigger_left > 0
        trigger_left = trigger_left - trigger_on

        log_promo = np.where(on_promo, np.log(promo_factor), 0.0)
        log_base = (
            arr.log_mu
            + arr.trend * (offset / 365.0)
            + arr.weekly[:, day.weekday()]
            + arr.yearly_amplitude * np.sin(2 * np.pi * ordinal / 365.25 + arr.yearly_phase)
            + arr.elasticity * log_promo
            + world.cross_elasticity @ log_promo
            + cfg.trigger_log_effect * trigger_on
            + np.where(ordinal >= arr.level_shift_start, arr.level_shift, 0.0)
            + drift
        )
        yield _MarketDay(day, offset, regular, shelf, trigger_started, log_base)


def _check_dates(world: MarketWorld, start: date, end: date, what: str) -> None:
    if end < start:
        raise ValueError(f"{what}: end {end} is before start {start}")
    if start < world.config.history_start:
        raise ValueError(
            f"{what}: start {start} is before the world's history_start {world.config.history_start}"
        )


def _normalise_assignments(world: MarketWorld, assignments: pd.DataFrame | None) -> pd.DataFrame:
    """Validated assignments with a `day_offset` and catalogue `position` column."""
    if assignments is None:
        assignments = pd.DataFrame({c: [] for c in ASSIGNMENT_COLUMNS})
    missing = [c for c in ASSIGNMENT_COLUMNS if c not in assignments.columns]
    if missing:
        raise ValueError(f"assignments: missing column(s) {missing}; need {list(ASSIGNMENT_COLUMNS)}")
    a = assignments.loc[:, list(ASSIGNMENT_COLUMNS)].copy()
    a["date"] = pd.to_datetime(a["date"]).dt.date if len(a) else pd.Series([], dtype=object)
    bad_arm = ~a["arm"].isin(["treatment", "control"])
    if bad_arm.any():
        row = a[bad_arm].iloc[0]
        raise ValueError(
            f"assignments: arm must be 'treatment' or 'control', got {row['arm']!r} "
            f"(product {row['product_id']}, {row['date']})"
        )
    a["price_change"] = a["price_change"].astype(float)
    treated = a["arm"] == "treatment"
    bad_pc = treated & ~(a["price_change"] > -1.0)
    if bad_pc.any():
        row = a[bad_pc].iloc[0]
        raise ValueError(
            f"assignments: price_change must be a number > -1 on treatment rows, got "
            f"{row['price_change']} (product {row['product_id']}, {row['date']})"
        )
    position = pd.Series(np.arange(len(world.catalog)), index=world.product_ids)
    pos = position.reindex(a["product_id"].to_numpy()).to_numpy()
    if np.isnan(pos).any():
        unknown = a.loc[np.isnan(pos), "product_id"].unique()[:5].tolist()
        raise ValueError(f"assignments: product_id(s) not in the world's catalog: {unknown}")
    a["position"] = pos.astype(np.int64)
    a["day_offset"] = _ordinals(a["date"]) - world.config.history_start.toordinal()
    if (a["day_offset"] < 0).any():
        raise ValueError(
            f"assignments: date {a['date'].min()} is before the world's history_start "
            f"{world.config.history_start}"
        )
    a["blackout"] = a["blackout"].astype(bool)
    return a


class _DaySlices:
    """Rows of a frame grouped by `day_offset`, fetched per day without a Python dict of frames."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame.sort_values("day_offset", kind="stable").reset_index(drop=True)
        self.offsets = self.frame["day_offset"].to_numpy()

    def get(self, offset: int) -> pd.DataFrame:
        lo, hi = np.searchsorted(self.offsets, [offset, offset + 1])
        return self.frame.iloc[lo:hi]


def _treatment_log_factor(n: int, rows: pd.DataFrame) -> np.ndarray:
    """tau: sum of log(1 + price_change) over a day's treatment rows, per catalogue position."""
    tau = np.zeros(n)
    treated = rows[rows["arm"] == "treatment"]
    np.add.at(tau, treated["position"].to_numpy(), np.log1p(treated["price_change"].to_numpy()))
    return tau


class _SimulatedDay(NamedTuple):
    market: _MarketDay
    price: np.ndarray
    own_log_effect: np.ndarray  # D
    cross_log_effect: np.ndarray  # sum_j c_ij tau_j
    expected_units: np.ndarray  # lambda


def _simulated_days(
    world: MarketWorld, assignments: pd.DataFrame | None, start: date, end: date
) -> Iterator[_SimulatedDay]:
    """The closed loop, day by day for [start, end] (state stepped from history_start)."""
    a = _normalise_assignments(world, assignments)
    treated_days = _DaySlices(a[a["arm"] == "treatment"])
    n = len(world.catalog)
    rho = world.config.carryover_decay
    own = np.zeros(n)
    for md in _market_days(world, end):
        rows = treated_days.get(md.offset)
        tau = _treatment_log_factor(n, rows)
        is_treated = np.zeros(n, dtype=bool)
        is_treated[rows["position"].to_numpy()] = True
        own = np.where(is_treated, world._arrays.elasticity * tau, rho * own)
        if md.day < start:
            continue
        cross = world.cross_elasticity @ tau
        yield _SimulatedDay(
            md, md.shelf_price * np.exp(tau), own, cross, np.exp(md.log_base + own + cross)
        )


def _poisson_quantile(u: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Exact Poisson inverse CDF: smallest k with P(K <= k) >= u (vectorised).

    A Cornish-Fisher guess (with continuity correction) is checked and, where needed, corrected
    by stepping with the exact CDF; the guess is exact for almost every draw.
    """
    z = special.ndtri(np.clip(u, 1e-300, 1.0 - 1e-16))
    guess = np.ceil(mean + np.sqrt(mean) * z + (z * z - 1.0) / 6.0 - 0.5)
    k = np.clip(guess, 0.0, None)
    cdf = special.pdtr(k, mean)
    low = cdf < u
    while low.any():
        k[low] += 1.0
        cdf[low] = special.pdtr(k[low], mean[low])
        low[low] = cdf[low] < u[low]
    # P(K <= k - 1) = P(K <= k) - P(K = k): one CDF evaluation per draw instead of two
    pmf = np.exp(k * np.log(mean) - mean - special.gammaln(k + 1.0))
    high = (k > 0) & (cdf - pmf >= u)
    while high.any():
        k[high] -= 1.0
        high[high] = k[high] > 0
        high[high] = special.pdtr(k[high] - 1.0, mean[high]) >= u[high]
    return k


def _observed_sales_rows(world: MarketWorld, sd: _SimulatedDay) -> dict[str, np.ndarray]:
    """One day's observed rows: noisy units and views, minus missing days and not-yet-entered products."""
    cfg, arr = world.config, world._arrays
    n = len(arr.log_mu)
    day = sd.market.day
    r = _day_rng(cfg.seed, day, _DEMAND_STREAM)
    z = r.standard_normal(n)
    tail = r.random(n) < cfg.shock_tail_share
    u_units = r.random(n)
    if cfg.demand_noise == "gamma":  # negative binomial with a rare multiplicative spike
        spike_correction = math.log(1 - cfg.shock_tail_share + cfg.shock_tail_share * math.exp(cfg.shock_tail_sd**2 / 2))
        gamma = r.gamma(cfg.gamma_shape, 1.0 / cfg.gamma_shape, n)
        shocked = sd.expected_units * gamma * np.exp(np.where(tail, cfg.shock_tail_sd * z, 0.0) - spike_correction)
    else:
        mean_correction = math.log(
            (1 - cfg.shock_tail_share) * math.exp(cfg.shock_sd**2 / 2)
            + cfg.shock_tail_share * math.exp(cfg.shock_tail_sd**2 / 2)
        )
        eps = np.where(tail, cfg.shock_tail_sd, cfg.shock_sd) * z - mean_correction
        shocked = sd.expected_units * np.exp(eps)
    units = _poisson_quantile(u_units, shocked)
    r = _day_rng(cfg.seed, day, _OBSERVE_STREAM)
    observed = (r.random(n) >= cfg.missing_share) & (day.toordinal() >= arr.entry)
    idx = np.flatnonzero(observed)
    rows = {
        "product_id": world.product_ids[idx],
        "date": np.full(len(idx), day, dtype=object),
        "price": sd.price[idx],
        "units": units[idx],
    }
    if cfg.observe_views:
        # views: plain Poisson draws from their own stream (not coupled across runs, unlike units)
        browsers = _day_rng(cfg.seed, day, _VIEWS_STREAM).poisson(shocked * (1.0 / arr.conversion - 1.0))
        rows["views"] = (units + browsers)[idx]
    rows["revenue"] = sd.price[idx] * units[idx]
    return rows


def _concat_rows(parts: list[dict[str, np.ndarray]], columns: list[str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame({c: pd.Series([], dtype=object if c in ("product_id", "date", "event") else float)
                             for c in columns})
    # column by column, releasing each day's pieces as they are joined (peak memory ~ 1 copy)
    data = {c: np.concatenate([p.pop(c) for p in parts]) for c in columns}
    return pd.DataFrame(data, copy=False)


def _sales_columns(config: MarketConfig) -> list[str]:
    views = ["views"] if config.observe_views else []
    return ["product_id", "date", "price", "units", *views, "revenue"]


# --------------------------------------------------------------------------------------------
# Public simulation functions
# --------------------------------------------------------------------------------------------


def simulate_sales(
    world: MarketWorld, assignments: pd.DataFrame | None, start: date, end: date
) -> pd.DataFrame:
    """Contract-v1 sales for [start, end] responding to `assignments` (the closed loop).

    Treated product-days (arm == 'treatment', blackout or not) are priced at the shelf price
    times (1 + price_change); carryover from assignments before `start` is honoured. With no
    assignments this returns exactly `simulate_history`'s rows for the same days.
    """
    _check_dates(world, start, end, "simulate_sales")
    parts = [_observed_sales_rows(world, sd) for sd in _simulated_days(world, assignments, start, end)]
    return _concat_rows(parts, _sales_columns(world.config))


def simulate_trigger_events(world: MarketWorld, start: date, end: date) -> pd.DataFrame:
    """Contract-v1 trigger events (product_id, date, event) that start in [start, end]."""
    _check_dates(world, start, end, "simulate_trigger_events")
    parts = []
    for md in _market_days(world, end):
        if md.day >= start:
            parts.append(_trigger_rows(world, md))
    return _concat_rows(parts, ["product_id", "date", "event"])


def _trigger_rows(world: MarketWorld, md: _MarketDay) -> dict[str, np.ndarray]:
    idx = np.flatnonzero(md.trigger_started)
    return {
        "product_id": world.product_ids[idx],
        "date": np.full(len(idx), md.day, dtype=object),
        "event": np.full(len(idx), TRIGGER_EVENT, dtype=object),
    }


def simulate_history(world: MarketWorld) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The history year as contract-v1 (`sales`, `trigger_events`), no experiments running."""
    cfg = world.config
    sales, triggers = [], []
    for sd in _simulated_days(world, None, cfg.history_start, cfg.history_end):
        sales.append(_observed_sales_rows(world, sd))
        triggers.append(_trigger_rows(world, sd.market))
    return _concat_rows(sales, _sales_columns(cfg)), _concat_rows(triggers, ["product_id", "date", "event"])


def expected_sales(
    world: MarketWorld, assignments: pd.DataFrame | None, start: date, end: date
) -> pd.DataFrame:
    """Every product-day in [start, end] with its noise-free truth under `assignments`.

    Columns: product_id, date, price, own_log_effect (D_it, with carryover), cross_log_effect
    (sum_j c_ij log(1 + price_change_j) over treated neighbours), expected_units (lambda_it).
    No rows are dropped (missing days and late entries are an observation matter).
    """
    _check_dates(world, start, end, "expected_sales")
    n = len(world.catalog)
    parts = [
        {
            "product_id": world.product_ids,
            "date": np.full(n, sd.market.day, dtype=object),
            "price": sd.price,
            "own_log_effect": sd.own_log_effect,
            "cross_log_effect": sd.cross_log_effect,
            "expected_units": sd.expected_units,
        }
        for sd in _simulated_days(world, assignments, start, end)
    ]
    return _concat_rows(
        parts, ["product_id", "date", "price", "own_log_effect", "cross_log_effect", "expected_units"]
    )


def unit_costs(world: MarketWorld) -> pd.DataFrame:
    """(product_id, unit_cost) of the world's products; worlds saved before unit costs have none (NaN)."""
    cost = world.products["unit_cost"] if "unit_cost" in world.products.columns else np.full(len(world.products), np.nan)
    return pd.DataFrame({"product_id": world.product_ids, "unit_cost": np.asarray(cost, float)})


TRUTH_METRICS = ("units", "revenue", "profit")


def _treatment_price_changes(a: pd.DataFrame) -> tuple[list[str], dict[str, float]]:
    """The experiments (sorted) and each one's single treatment price change; several values or
    no treatment rows are refused."""
    price_change = {}
    for name, rows in a[a["arm"] == "treatment"].groupby("experiment"):
        values = rows["price_change"].unique()
        if len(values) != 1:
            raise ValueError(
                f"true_effects: experiment {name!r} has several treatment price_change values "
                f"{sorted(values)[:5]}; one per experiment is expected"
            )
        price_change[name] = float(values[0])
    experiments = sorted(a["experiment"].unique())
    no_treatment = [e for e in experiments if e not in price_change]
    if no_treatment:
        raise ValueError(f"true_effects: experiment(s) {no_treatment} have no treatment rows")
    return experiments, price_change


def _truth_rows(totals: dict, counts: dict, experiments: list[str], metrics) -> list[dict]:
    """One row per experiment and metric from the summed truths (direct, global, control
    baseline, spillover, controls, global baseline) over the analysed product-days."""
    out = []
    for name in experiments:
        for metric in metrics:
            direct, global_, control, spill, n_control, untreated = totals[(name, metric)]
            m = counts[name]
            out.append(
                {
                    "experiment": name,
                    "metric": metric,
                    "true_direct_effect": direct / m if m else np.nan,
                    "true_global_effect": global_ / m if m else np.nan,
                    "true_spillover_effect": spill / n_control if n_control else np.nan,
                    "true_relative_effect": direct / control if m else np.nan,
                    "n_product_days": int(m),
                    "true_global_relative_effect": global_ / untreated if m else np.nan,
                }
            )
    return out


def true_effects(world: MarketWorld, assignments: pd.DataFrame, metrics=("units",)) -> pd.DataFrame:
    """The exact effects per experiment and metric (definitions in the module docstring).

    Columns: experiment, metric, true_direct_effect, true_global_effect, true_spillover_effect,
    true_relative_effect, n_product_days (analysis set size), then true_global_relative_effect.
    Metrics (`TRUTH_METRICS`): units (expected units), revenue (actual price x expected units:
    the treated price on a treated day), profit ((actual price - unit cost) x expected units;
    needs the world's unit costs). Relative effects divide by the counterfactual (untreated) level
    of the same product-days: direct by the as-assigned control level, global by the level with
    nothing treated.
    """
    for metric in metrics:
        if metric not in TRUTH_METRICS:
            raise ValueError(f"true_effects: unknown metric {metric!r} (known: {TRUTH_METRICS})")
    a = _normalise_assignments(world, assignments)
    columns = ["experiment", "metric", "true_direct_effect", "true_global_effect",
               "true_spillover_effect", "true_relative_effect", "n_product_days", "true_global_relative_effect"]
    if a.empty:
        return pd.DataFrame({c: [] for c in columns})
    experiments, price_change = _treatment_price_changes(a)

    n = len(world.catalog)
    e_own = world._arrays.elasticity
    cost = unit_costs(world)["unit_cost"].to_numpy(float)
    if "profit" in metrics and not np.isfinite(cost).all():
        raise ValueError("true_effects: this world has no unit costs (saved before they existed): no profit truth")
    # per metric: direct, global, control-baseline, spill, n_ctrl, global-baseline
    totals = {(x, m): np.zeros(6) for x in experiments for m in metrics}
    counts = {x: 0 for x in experiments}
    by_day = _DaySlices(a)
    last = world.config.history_start + timedelta(days=int(a["day_offset"].max()))
    for md in _market_days(world, last):
        rows = by_day.get(md.offset)
        if rows.empty:
            continue
        tau = _treatment_log_factor(n, rows)
        cross_assigned = world.cross_elasticity @ tau
        for name, exp_rows in rows.groupby("experiment"):
            log_factor = math.log1p(price_change[name])
            enrolled = exp_rows["position"].to_numpy()
            tau_all, tau_none = tau.copy(), tau.copy()
            tau_all[enrolled] = log_factor
            tau_none[enrolled] = 0.0
            analysis = exp_rows[~exp_rows["blackout"].to_numpy()]
            idx = analysis["position"].to_numpy()
            if len(idx) == 0:
                continue
            cross_all = (world.cross_elasticity[idx] @ tau_all)
            cross_none = (world.cross_elasticity[idx] @ tau_none)
            base = np.exp(md.log_base[idx])
            own = e_own[idx] * log_factor
            as_assigned_control = base * np.exp(cross_assigned[idx])
            is_control = (analysis["arm"] == "control").to_numpy()
            shelf = md.shelf_price[idx]
            for metric in metrics:
                # value per unit sold untreated (v0) and treated (v1): 1 for units, price, price - cost
                if metric == "units":
                    v0 = v1 = np.ones(len(idx))
                elif metric == "revenue":
                    v0, v1 = shelf, shelf * (1.0 + price_change[name])
                else:
                    v0, v1 = shelf - cost[idx], shelf * (1.0 + price_change[name]) - cost[idx]
                spill = v0 * base * (np.exp(cross_assigned[idx]) - np.exp(cross_none))
                totals[(name, metric)] += [
                    (as_assigned_control * (v1 * np.exp(own) - v0)).sum(),
                    (base * (v1 * np.exp(own + cross_all) - v0 * np.exp(cross_none))).sum(),
                    (v0 * as_assigned_control).sum(),
                    spill[is_control].sum(),
                    is_control.sum(),
                    (v0 * base * np.exp(cross_none)).sum(),
                ]
            counts[name] += len(idx)
    return pd.DataFrame(_truth_rows(totals, counts, experiments, metrics), columns=columns)


# --------------------------------------------------------------------------------------------
# Persistence, demo inputs and CLI
# --------------------------------------------------------------------------------------------

_WORLD_TABLES = ("catalog", "products", "weekly_profile", "category_phase", "true_edges")


def _write_parquet_file(df: pd.DataFrame, path: Path) -> Path:
    """One Parquet file written to a temporary sibling, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_world(world: MarketWorld, directory: str | os.PathLike) -> Path:
    """Write the world as Parquet tables plus `config.json`; `load_world` reads it back exactly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in _WORLD_TABLES:
        _write_parquet_file(getattr(world, name), directory / f"{name}.parquet")
    write_text(world.config.to_json(), directory / "config.json")
    return directory


def load_world(directory: str | os.PathLike) -> MarketWorld:
    """Read a world written by `save_world`."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"load_world: {config_path} not found (not a saved world?)")
    config = MarketConfig.from_json(config_path.read_text())
    tables = {name: pd.read_parquet(directory / f"{name}.parquet") for name in _WORLD_TABLES}
    return MarketWorld(config, **tables)


def demo_experiments(config: MarketConfig = MarketConfig()) -> dict[str, str]:
    """Four non-overlapping demo experiments (file name -> YAML text), one per design.

    Each runs on its own category (the first four of `config.categories`; any further category
    stays unexperimented) for six weeks from the first Monday after the history ends.
    """
    if len(config.categories) < 4:
        raise ValueError(
            f"demo_experiments: needs at least 4 categories (one per design), got {config.categories}"
        )
    first_day = config.history_end + timedelta(days=1)
    start = first_day + timedelta(days=(7 - first_day.weekday()) % 7)
    end = start + timedelta(days=41)
    kitchen, garden, toys, pets = config.categories[:4]
    specs = [
        ("time-bound", kitchen, "time_bound", "cluster", {}, 101),
        ("triggered", garden, "triggered", "product",
         {"trigger_event": TRIGGER_EVENT, "duration_days": 21}, 202),
        ("random-days", toys, "random_days", "product", {}, 303),
        ("crossover", pets, "crossover", "cluster", {"phase_days": 14, "blackout_days": 7}, 404),
    ]
    files = {}
    for prefix, category, design, unit, extra, seed in specs:
        name = f"{prefix}-{category}"
        body = {
            "name": name,
            "design": design,
            "start": start,
            "end": end,
            "unit": unit,
            "population": {"categories": [category]},
            "treated_fraction": 0.5,
            "treatment": {"price_change": -0.08},
            **extra,
            "metrics": ["units", "revenue", "profit"],
            "guardrails": [{"metric": "profit", "direction": "must_not_fall", "tolerance": 0.05}],
            "seed": seed,
        }
        text = f"# pricelab demo experiment ({design} on {category}), written by pipelines.simulation\n"
        text += yaml.safe_dump(body, sort_keys=False, default_flow_style=None)
        files[f"{name}.yaml"] = text
    return files


# Simulator regimes: every statistical benchmark and test runs in each of them. Each one is
# written to break an estimator, not to flatter it.
# - default: today's market; strong substitutes in groups of 3-8, views observed, lognormal noise.
# - weak: weak, realistic substitution (groups of 2-6, 1-4 substitutes each, cross elasticities
#   adding up to at most 0.4 x |own|, mostly 0.1-0.5 a pair), units only (no views),
#   negative-binomial noise (Var = mu + mu^2/6) with 1% spikes, AR(1) demand drift (0.98), about
#   one promotion every 40 days, ~20 units a day.
# - no_substitutes: the weak market without any cross effect (clustering must cost nothing).
# Carryover is a separate knob (`carryover_decay`): pass it as an override.
_WEAK_MARKET = dict(
    n_products=800,
    n_subclasses=32,
    baseline_units_median=17.0,
    baseline_units_sd=0.5,
    group_size_range=(2, 6),
    group_edge_prob=0.7,
    group_cross_elasticity_range=(0.1, 0.5),
    weak_edge_prob=0.004,
    weak_cross_elasticity_range=(0.05, 0.2),
    cross_elasticity_cap=0.4,
    promos_per_year_range=(7.0, 11.0),
    demand_noise="gamma",
    gamma_shape=6.0,
    shock_tail_share=0.01,
    drift_persistence=0.98,
    drift_sd=0.03,
    observe_views=False,
)
REGIMES: dict[str, MarketConfig] = {
    "default": MarketConfig(),
    "weak": MarketConfig(**_WEAK_MARKET),
    "no_substitutes": MarketConfig(**{**_WEAK_MARKET, "group_edge_prob": 0.0, "weak_edge_prob": 0.0}),
}


def regime_config(name: str, **overrides) -> MarketConfig:
    """The MarketConfig of regime `name` (see REGIMES) with `overrides` (any MarketConfig field)."""
    if name not in REGIMES:
        raise ValueError(f"unknown simulator regime {name!r}; known: {sorted(REGIMES)}")
    return dataclasses.replace(REGIMES[name], **overrides)


# The embedded demo market: defaults, with mild carryover (a treated day leaves 10% of its effect
# on the next day). With the default 0.5, random days lose a third of the effect to carryover by
# construction (controls inherit rho/(2-rho) of it); benchmarks/estimators.py shows that case.
DEMO_CONFIG = MarketConfig(carryover_decay=0.1)


def write_demo_inputs(data_dir: str | os.PathLike, config: MarketConfig = DEMO_CONFIG) -> Path:
    """Write the demo's contract-v1 inputs and the simulator's world under `data_dir`.

    input/catalog.parquet, input/sales/history.parquet, input/trigger_events.parquet (history
    and on through the demo experiments' end, so triggered designs find their events),
    input/experiments/*.yaml, and simulator/ (the world, for closed-loop sales and truth).
    """
    root = Path(data_dir)
    print(
        f"simulating a market: {config.n_products} products in {config.n_subclasses} subclasses, "
        f"seed {config.seed}, carryover decay {config.carryover_decay}/day"
    )
    world = simulate_market(config)
    save_world(world, root / "simulator")
    print(f"  world -> {root / 'simulator'} ({len(world.true_edges)} true edges)")
    # the catalogue carries each product's unit cost, so the demo's profit has its cost (issue 16)
    _write_parquet_file(world.catalog.merge(unit_costs(world), on="product_id"), root / "input" / "catalog.parquet")
    print(f"  catalog -> {root / 'input' / 'catalog.parquet'}")
    sales, history_triggers = simulate_history(world)
    _write_parquet_file(sales, root / "input" / "sales" / "history.parquet")
    print(f"  sales {config.history_start}..{config.history_end}: {len(sales)} rows")
    experiments = demo_experiments(config)
    last_day = max(yaml.safe_load(text)["end"] for text in experiments.values())
    later = simulate_trigger_events(world, config.history_end + timedelta(days=1), last_day)
    triggers = pd.concat([history_triggers, later], ignore_index=True)
    _write_parquet_file(triggers, root / "input" / "trigger_events.parquet")
    print(f"  trigger events to {last_day}: {len(triggers)} rows")
    (root / "input" / "experiments").mkdir(parents=True, exist_ok=True)
    for file_name, text in experiments.items():
        write_text(text, root / "input" / "experiments" / file_name)
    print(f"  experiments: {', '.join(sorted(experiments))}")
    for file_name, text in demo_proposals(config).items():
        write_text(text, root / "input" / "proposals" / file_name)
        print(f"  proposal (for advise_job): {file_name}")
    return root


def demo_proposals(config: MarketConfig = MarketConfig()) -> dict[str, str]:
    """One demo proposal for the design advisor (file name -> YAML text): a 5% price cut for six
    weeks on the first category no demo experiment uses, every design and unit as candidates."""
    if len(config.categories) < 5:
        return {}
    first_day = config.history_end + timedelta(days=1)
    start = first_day + timedelta(days=(7 - first_day.weekday()) % 7)
    category = config.categories[4]
    body = {"name": f"cut-5-{category}", "start": start, "end": start + timedelta(days=41),
            "population": {"categories": [category]}, "treatment": {"price_change": -0.05},
            "trigger_event": TRIGGER_EVENT, "phase_days": 14, "seed": 17}
    text = "# pricelab demo proposal (advise_job answers it; it publishes nothing)\n"
    return {f"{body['name']}.yaml": text + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)}


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.simulation generate --data-dir data [--products N] [--seed S] [--force]`."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.simulation", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write the demo inputs (catalogue, history, experiments)")
    gen.add_argument("--data-dir", default="data", help="the data directory (default ./data)")
    gen.add_argument("--products", type=int, default=DEMO_CONFIG.n_products)
    gen.add_argument("--seed", type=int, default=DEMO_CONFIG.seed)
    gen.add_argument("--carryover", type=float, default=DEMO_CONFIG.carryover_decay, help="carryover decay per day")
    gen.add_argument("--force", action="store_true", help="overwrite existing inputs")
    args = parser.parse_args(argv)
    root = Path(args.data_dir)
    catalog = root / "input" / "catalog.parquet"
    if catalog.exists() and not args.force:
        print(f"{catalog} already exists: nothing to do (use --force to regenerate)")
        return 0
    config = dataclasses.replace(DEMO_CONFIG, n_products=args.products, seed=args.seed, carryover_decay=args.carryover)
    write_demo_inputs(root, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
