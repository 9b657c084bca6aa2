"""Design advisor (issue 17): which design, unit and blackout, and what effect each could detect,
answered from the user's own history before any price changes.

A **proposal** (`input/proposals/*.yaml`) takes the experiment-file fields, validated by the same
code (`experiments._parse_mapping`, one candidate at a time), except that `design` and `unit` may
be lists (default: all four designs, both units), `blackout_days` may be a list, and three fields
are new: `expected_effect` (relative, optional), `alpha` (default 0.05), `power` (default 0.8).
A proposal never publishes anything.

Method, per candidate (design x unit x blackout):

- **A/A replays** (`replay_candidate`). The candidate is replayed on `n_replays` windows of the
  history, without treatment. Arms come from the real randomisation code,
  `pipelines.assignment.assign_days`, in one Spark job per candidate: every replay's units are
  enrolled under their own ids (`<replay>|<unit>`, strata `<replay>|<stratum>`), so the stable hash
  draws each replay independently and the balanced stratified quota holds per replay; triggered
  windows come from each window's own trigger events. Each replay gives a placebo effect and its
  own standard error from a fast DiD (`fast_did`: first difference = window mean minus the mean of
  the `PRE_LEVEL_DAYS` before it, or treated-day minus control-day mean for switchbacks; SE from
  the same resampling units pricelab's bootstrap uses, with a t critical value on the blocks'
  degrees of freedom). `aa_rejection_rate` is the share of replays rejecting at `alpha`.
- **Calibration on the real estimator** (`calibrate`). On `n_calibration` of the replays (at most
  `calibration_products` products, whole units) the real path runs: `estimation.
  first_differences_pandas` (the pipeline's counterfactuals, back-tests and known factors) and
  `estimation.DiDEstimator` with its own SE (the jackknife in between designs, the cluster-aware
  bootstrap in switchback designs). The ratio of the real SE to the
  fast SE on the same replays scales the fast replays' spread into `predicted_se` (units per
  product-day, the estimator pricelab reports).
- **Carryover** (`carryover_from_history`). From the ends of past price changes: the treated days
  of pricelab's own past experiments (published assignments) when there are any, else promotions
  read from the price column. Demand on the days after a change ends is compared with its own
  baseline, net of the day's common movement among untouched products; the excess on the first
  untreated day relative to the effect on the last treated day estimates the daily decay rho.
  `carryover_days` is the number of consecutive days the excess stays significant; the
  recommended blackout is ceil(3 x half-life) at rho's upper 95% bound (0 when the first day's
  excess is not significant at z > `CARRYOVER_Z`).
- **Spillover risk** (`spillover_risk`). A pooled two-way fixed-effects regression of log demand
  on own log price and the graph neighbours' (weighted) mean log price gives own and cross
  elasticities; product randomisation misattributes the cross share of the global effect,
  cluster randomisation the share of neighbour weight outside each product's cluster.
- **Recommendation** (`recommend`). Expected RMSE relative to the effect, sqrt(bias^2 + SE^2),
  bias = spillover plus carryover bias; the smallest among the candidates whose MDE reaches the
  expected effect, else the smallest MDE (saying that nothing reaches it).

Limits, stated in every advice: predictions hold for markets like the history (a structural
break after it is not seen); carryover of a price change is only measured where the history holds
price changes like it (past experiments; promotions when there are none); spillover comes from the
graph (an undetected substitute edge is invisible); the fast first difference is calibrated on a
few replays only.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
import pandas as pd
from scipy import stats

from pipelines import assignment, estimation
from pipelines.experiments import (
    DESIGNS,
    UNITS,
    ExperimentFileError,
    ExperimentSpec,
    _parse_mapping,
    excerpt,
    experiment_file_paths,
    population_products,
    read_yaml_mapping,
)

PROPOSAL_FIELDS = ("expected_effect", "alpha", "power")
DEFAULT_ALPHA = 0.05
DEFAULT_POWER = 0.8
DEFAULT_REPLAYS = 200
DEFAULT_CALIBRATION_REPLAYS = 4
DEFAULT_CALIBRATION_PRODUCTS = 300
CALIBRATION_MIN_PRE_DAYS = 120  # calibrating replays start this far into the history (when it is long enough)
PRE_LEVEL_DAYS = 28  # the fast first difference's counterfactual: the level of the 4 weeks before
CARRYOVER_MAX_LAG = 14
CARRYOVER_Z = 4.0  # first-day excess needed to call carryover present (many events: a strict bar)
CARRYOVER_EXCLUDE_DAYS = 14  # days after a past treatment kept out of the A/A replays
PROMOTION_DROP = 0.03  # a price this far below its rolling median is a promotion
AA_SEED_OFFSET = 1_000_003  # replays never use the proposal's own seed
ADVICE_COLUMNS = (
    "proposal", "design", "unit", "phase_days", "blackout_days", "n_units", "n_products", "replays",
    "predicted_se", "mde_abs", "mde_rel", "aa_rejection_rate", "carryover_days", "spillover_bias_rel",
    "rmse_rel", "recommended", "baseline", "expected_rel", "fast_se", "calibration_ratio",
    "calibration_replays", "carryover_bias_rel", "reason",
)

_TEXT = ("proposal", "design", "unit", "reason")
_INTEGER = ("n_units", "n_products", "replays", "carryover_days", "calibration_replays")
ADVICE_SCHEMA = ", ".join(
    f"{c} {'string' if c in _TEXT else 'bigint' if c in _INTEGER else 'boolean' if c == 'recommended' else 'double'}"
    for c in ADVICE_COLUMNS)


# ----------------------------------------------------------------------------------------------
# Proposals
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Proposal:
    """One validated proposal: its candidate specs (blackout None = from the history's carryover)."""

    name: str
    source: str
    candidates: tuple[ExperimentSpec, ...]
    expected_effect: float | None = None
    alpha: float = DEFAULT_ALPHA
    power: float = DEFAULT_POWER
    blackout_given: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def _as_list(value, file: str, name: str, allowed=None) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ExperimentFileError(file, name, "an empty list (give one value or a list of candidates)")
    if len(set(map(str, values))) != len(values):
        raise ExperimentFileError(file, name, f"{excerpt(value)} repeats a candidate")
    for v in values:
        if allowed is not None and v not in allowed:
            raise ExperimentFileError(file, name, f"unknown {name} {excerpt(v)} (known: {', '.join(allowed)})")
    return values


def _probability(raw: dict, file: str, name: str, default: float | None):
    value = raw.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ExperimentFileError(file, name, f"{excerpt(value)} is not a number")
    if name != "expected_effect" and not 0 < value < 1:
        raise ExperimentFileError(file, name, f"{value} is not strictly between 0 and 1")
    if name == "expected_effect" and (value == 0 or abs(value) > 5):
        raise ExperimentFileError(file, name, f"{value} is not a relative effect (non-zero, e.g. 0.08 for +8%)")
    return float(value)


def parse_proposal_mapping(raw: dict, file: str) -> Proposal:
    """A proposal from its YAML mapping; `ExperimentFileError` (file, field, reason) when refused."""
    raw = dict(raw)
    extra = {k: raw.pop(k) for k in PROPOSAL_FIELDS if k in raw}
    expected = _probability(extra, file, "expected_effect", None)
    alpha = _probability(extra, file, "alpha", DEFAULT_ALPHA)
    power = _probability(extra, file, "power", DEFAULT_POWER)
    designs_given = "design" in raw and raw["design"] is not None
    designs = _as_list(raw.pop("design"), file, "design", DESIGNS) if designs_given else list(DESIGNS)
    units = _as_list(raw.pop("unit"), file, "unit", UNITS) if raw.get("unit") is not None else list(UNITS)
    raw.pop("unit", None)
    blackout_given = raw.get("blackout_days") is not None
    blackouts = _as_list(raw.pop("blackout_days"), file, "blackout_days") if blackout_given else [None]
    raw.pop("blackout_days", None)
    candidates, notes = [], []
    for design in designs:
        if design == "triggered" and raw.get("trigger_event") is None and not designs_given:
            notes.append("triggered left out: the proposal names no trigger_event")
            continue
        for unit in units:
            for blackout in (blackouts if design == "crossover" else [None]):
                mapping = {**raw, "design": design, "unit": unit}
                if blackout is not None:
                    mapping["blackout_days"] = blackout
                elif design == "crossover":
                    mapping["blackout_days"] = 0  # placeholder: replaced by the carryover recommendation
                    mapping.setdefault("phase_days", mapping.get("phase_days"))
                    if mapping["phase_days"] is None:
                        mapping.pop("phase_days")
                spec = _parse_mapping(mapping, file)
                if design == "crossover" and blackout is None:
                    spec = dataclasses.replace(spec, blackout_days=None)
                candidates.append(spec)
    if not candidates:
        raise ExperimentFileError(file, "design", "no candidate design left")
    return Proposal(name=candidates[0].name, source=file, candidates=tuple(candidates), expected_effect=expected,
                    alpha=alpha, power=power, blackout_given=blackout_given, notes=tuple(notes))


def parse_proposal_file(path) -> Proposal:
    """Read and validate one proposal file (same reader and rules as experiment files)."""
    return parse_proposal_mapping(read_yaml_mapping(path), str(path))


def load_proposals(directory, catalog: pd.DataFrame | None = None) -> tuple[list[Proposal], list[ExperimentFileError]]:
    """Every proposal of `directory`; refused files come back as errors (one line each), the rest
    still load. With `catalog`, populations are checked against it; names must be unique."""
    proposals, errors, seen = [], [], set()
    for path in experiment_file_paths(directory):
        try:
            proposal = parse_proposal_file(path)
            if catalog is not None:
                population_products(proposal.candidates[0], catalog)
            if proposal.name in seen:
                raise ExperimentFileError(str(path), "name", f"'{proposal.name}' is already the name of another proposal")
            seen.add(proposal.name)
            proposals.append(proposal)
        except ExperimentFileError as error:
            errors.append(error)
    return proposals, errors


# ----------------------------------------------------------------------------------------------
# History as arrays
# ----------------------------------------------------------------------------------------------

@dataclass
class History:
    """Products x days arrays of the history: the metric (NaN = no row), log price, past-treated days."""

    products: np.ndarray
    days: np.ndarray  # datetime64[D], consecutive
    y: np.ndarray
    log_price: np.ndarray
    treated: np.ndarray  # treated by a past experiment (published assignments)
    subclass: np.ndarray
    category: np.ndarray

    def index_of(self, day) -> int:
        return int((np.datetime64(day, "D") - self.days[0]).astype(int))


def build_history(sales: pd.DataFrame, catalog: pd.DataFrame, metric: str = "units",
                  past_assignments: pd.DataFrame | None = None) -> History:
    """`sales` (product_id, date, price, metric) pivoted on the catalogue's products and every day
    from the first to the last sales day; `past_assignments` (contract rows) mark treated days."""
    if metric not in sales.columns:
        raise ValueError(f"sales: no column '{metric}' (columns: {', '.join(map(str, sales.columns))})")
    products = catalog["product_id"].astype(str).to_numpy()
    index = pd.Index(products)
    dates = pd.to_datetime(sales["date"]).to_numpy().astype("datetime64[D]")
    first, last = dates.min(), dates.max()
    days = np.arange(first, last + np.timedelta64(1, "D"))
    row = index.get_indexer(sales["product_id"].astype(str))
    ok = row >= 0
    col = (dates - first).astype(int)
    y = np.full((len(products), len(days)), np.nan)
    y[row[ok], col[ok]] = sales[metric].to_numpy(float)[ok]
    log_price = np.full_like(y, np.nan)
    if "price" in sales.columns:
        price = sales["price"].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_price[row[ok], col[ok]] = np.where(price[ok] > 0, np.log(price[ok]), np.nan)
    treated = np.zeros(y.shape, dtype=bool)
    if past_assignments is not None and len(past_assignments):
        a = past_assignments[past_assignments["arm"] == assignment.ARM_TREATMENT]
        a_row = index.get_indexer(a["product_id"].astype(str))
        a_col = (pd.to_datetime(a["date"]).to_numpy().astype("datetime64[D]") - first).astype(int)
        keep = (a_row >= 0) & (a_col >= 0) & (a_col < len(days))
        treated[a_row[keep], a_col[keep]] = True
    by_id = catalog.assign(product_id=catalog["product_id"].astype(str)).set_index("product_id")
    return History(products=products, days=days, y=y, log_price=log_price, treated=treated,
                   subclass=by_id["subclass"].astype(str).reindex(products).to_numpy(),
                   category=by_id["category"].astype(str).reindex(products).to_numpy())


# ----------------------------------------------------------------------------------------------
# Carryover from history
# ----------------------------------------------------------------------------------------------

def _promotion_days(history: History) -> np.ndarray:
    """Days priced more than PROMOTION_DROP below the product's rolling 29-day median price."""
    frame = pd.DataFrame(history.log_price.T)
    median = frame.rolling(29, center=True, min_periods=7).median().to_numpy().T
    return np.nan_to_num(history.log_price - median, nan=0.0) < np.log1p(-PROMOTION_DROP)


def _residual_demand(history: History, changed: np.ndarray, max_lag: int) -> np.ndarray:
    """(products x days) log(1 + y) minus the product's mean on untouched days and minus the day's
    mean among products untouched for `max_lag` days (the category's own where it has >= 10)."""
    logy = np.log1p(history.y)
    touched_recently = pd.DataFrame(changed.T).rolling(max_lag + 1, min_periods=1).max().to_numpy().T.astype(bool)
    quiet = ~touched_recently & np.isfinite(logy)
    level = np.nanmean(np.where(quiet, logy, np.nan), axis=1, keepdims=True)
    centred = logy - np.nan_to_num(level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        quiet_values = np.where(quiet, centred, np.nan)
        overall = np.nan_to_num(np.nanmean(quiet_values, axis=0))
        day_effect = np.tile(overall, (len(logy), 1))
        for cat in np.unique(history.category):  # the category's own day movement where it has quiet products
            rows = history.category == cat
            enough = quiet[rows].sum(axis=0) >= 10
            means = np.nanmean(quiet_values[rows], axis=0)
            day_effect[rows] = np.where(enough, np.nan_to_num(means), overall)[None, :]
    r = centred - day_effect
    return r


def carryover_from_history(history: History, max_lag: int = CARRYOVER_MAX_LAG) -> dict:
    """How long demand stays away from its baseline after a price change ends.

    Events: product i changed on day t-1 and not on day t (past experiment treatment; promotions
    when no experiment treated anything). Residual r_it = log(1 + y_it) minus the product's mean on
    untouched days minus the day's mean among products untouched for `max_lag` days (per
    category). excess_k = mean r over events still untouched on t..t+k; effect = mean r on t-1.
    Returns rho (excess_0 / effect), its upper 95% bound, carryover_days (consecutive significant
    lags), blackout_days (ceil(3 x half-life at the upper bound); 0 when excess_0's z <= CARRYOVER_Z)
    and the evidence.
    """
    changed, source = history.treated, "past experiments"
    if not changed.any():
        changed, source = _promotion_days(history), "promotions"
    r = _residual_demand(history, changed, max_lag)
    n_days = r.shape[1]
    ends_p, ends_t = np.nonzero(changed[:, :-1] & ~changed[:, 1:])
    ends_t = ends_t + 1
    out = {"source": source, "n_events": int(len(ends_p)), "rho": 0.0, "rho_high": 0.0, "carryover_days": 0,
           "blackout_days": 0, "excess": [], "excess_z": [], "effect": float("nan"), "effect_z": float("nan")}
    if len(ends_p) < 30:
        out["note"] = f"only {len(ends_p)} ends of past price changes: carryover not measurable"
        return out
    on = r[ends_p, ends_t - 1]
    on = on[np.isfinite(on)]
    effect, effect_se = float(on.mean()), float(on.std(ddof=1) / np.sqrt(len(on)))
    excess, excess_se, excess_z = [], [], []
    still = np.ones(len(ends_p), dtype=bool)
    for k in range(max_lag):
        t = ends_t + k
        inside = t < n_days
        still &= inside
        still[inside] &= ~changed[ends_p[inside], t[inside]]
        values = r[ends_p[still], t[still]]
        values = values[np.isfinite(values)]
        if len(values) < 30:
            break
        m, s = float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))
        excess.append(m), excess_se.append(s), excess_z.append(m / s if s > 0 else 0.0)
    out.update(effect=effect, effect_z=effect / effect_se if effect_se > 0 else 0.0,
               excess=excess, excess_z=excess_z)
    if not excess or abs(out["effect_z"]) < 3:
        out["note"] = "past price changes moved demand too little to measure carryover against"
        return out
    z0 = excess_z[0] * np.sign(effect)
    days = 0
    for z in excess_z:
        if z * np.sign(effect) > 2.58:
            days += 1
        else:
            break
    if z0 <= CARRYOVER_Z:
        out["note"] = f"no carryover: the first day after a change is {z0:.1f} SE from baseline (needs > {CARRYOVER_Z:g})"
        return out
    out["carryover_days"] = days
    # rho = excess_0 / effect, delta-method SE
    rho = excess[0] / effect
    rho_se = abs(rho) * math.sqrt((excess_se[0] / excess[0]) ** 2 + (effect_se / effect) ** 2)
    rho_high = float(min(max(rho + 1.96 * rho_se, 1e-6), 0.99))
    half_life = math.log(2) / -math.log(rho_high)
    out.update(rho=float(max(rho, 0.0)), rho_high=rho_high, half_life_days=half_life,
               blackout_days=int(max(days, math.ceil(3 * half_life))))
    return out


def carryover_bias(design: str, rho: float, phase_days: int | None, blackout_days: int | None) -> float:
    """Expected relative bias of the design's estimate from a geometric carryover rho per day.

    random_days: controls after treated days inherit rho/(2 - rho) of the effect; crossover: the
    analysed control days of a phase keep rho^(b+1) (1 - rho^(P-b)) / ((1 - rho)(P - b)) of it;
    designs drawn once: none (nothing switches back)."""
    if rho <= 0:
        return 0.0
    if design == "random_days":
        return -rho / (2 - rho)
    if design == "crossover":
        p, b = int(phase_days), int(blackout_days or 0)
        return -(rho ** (b + 1)) * (1 - rho ** (p - b)) / ((1 - rho) * (p - b))
    return 0.0


# ----------------------------------------------------------------------------------------------
# Spillover risk from the graph
# ----------------------------------------------------------------------------------------------

def _two_way_demean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = np.where(mask, values, np.nan)
    for _ in range(3):
        x = x - np.nanmean(x, axis=1, keepdims=True)
        x = x - np.nanmean(x, axis=0, keepdims=True)
    return np.where(mask, x, 0.0)


def spillover_risk(history: History, rows: np.ndarray, edges: pd.DataFrame | None,
                   clusters: pd.DataFrame | None) -> dict:
    """Own and cross elasticities from the history and the graph, and the spillover bias each unit
    leaves against the global effect (relative): product -f*c/(own + f*c), cluster
    -mean(f_i s_i)*c/(own + f*c), with f the share of products with neighbours, s_i the share of
    their neighbour weight outside their cluster, c the cross elasticity on the neighbours' mean
    log price. Without a graph: NaN (unknown) and a note."""
    out = {"own": float("nan"), "cross": float("nan"), "bias_product": float("nan"), "bias_cluster": float("nan"),
           "share_with_neighbours": float("nan"), "outside_share": float("nan")}
    products = history.products[rows]
    if edges is None or edges.empty:
        out["note"] = "no substitution graph: spillover risk unknown"
        return out
    index = pd.Index(products)
    a, b = index.get_indexer(edges["src"].astype(str)), index.get_indexer(edges["dst"].astype(str))
    w = edges["weight"].abs().to_numpy(float) if "weight" in edges.columns else np.ones(len(edges))
    keep = (a >= 0) & (b >= 0) & (a != b)
    a, b, w = np.r_[a[keep], b[keep]], np.r_[b[keep], a[keep]], np.r_[w[keep], w[keep]]
    from scipy import sparse

    m = sparse.csr_matrix((w, (a, b)), shape=(len(products), len(products)))
    m.sum_duplicates()
    weight = np.asarray(m.sum(axis=1)).ravel()
    has = weight > 0
    lp = history.log_price[rows]
    y = np.log1p(history.y[rows])
    ok = np.isfinite(lp) & np.isfinite(y)
    lp0 = np.where(ok, lp, np.nanmean(np.where(ok, lp, np.nan), axis=1, keepdims=True))
    lp0 = np.nan_to_num(lp0)
    neighbour = np.where(has[:, None], (m @ lp0) / np.maximum(weight, 1e-12)[:, None], 0.0)
    yd, pd_, nd = _two_way_demean(y, ok), _two_way_demean(lp, ok), _two_way_demean(neighbour, ok & has[:, None])
    x = np.column_stack([pd_.ravel(), nd.ravel()])
    coef, *_ = np.linalg.lstsq(x[ok.ravel()], yd.ravel()[ok.ravel()], rcond=None)
    own, cross = float(coef[0]), float(coef[1])
    f = float(has.mean())
    outside = np.zeros(len(products))
    if clusters is not None and len(clusters):
        cluster_of = clusters.assign(product_id=clusters["product_id"].astype(str)).drop_duplicates("product_id")
        cid = cluster_of.set_index("product_id")["cluster_id"].astype(str).reindex(products).fillna("").to_numpy()
        same = cid[a] == cid[b]
        same &= cid[a] != ""
        inside = np.bincount(a[same], weights=w[same], minlength=len(products))
        outside = np.where(has, 1 - inside / np.maximum(weight, 1e-12), 0.0)
    else:
        outside = has.astype(float)
    global_ = own + f * cross
    out.update(own=own, cross=cross, share_with_neighbours=f, outside_share=float(outside[has].mean()) if has.any() else 0.0)
    if abs(global_) > 1e-9:
        out["bias_product"] = float(-f * cross / global_)
        out["bias_cluster"] = float(-np.mean(has * outside) * cross / global_)
    return out


# ----------------------------------------------------------------------------------------------
# A/A replays: windows, assignments through pipelines.assignment, fast DiD
# ----------------------------------------------------------------------------------------------

def replay_windows(history: History, n_days: int, n_replays: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Start indices (into history.days) of `n_replays` windows of `n_days`, each with
    PRE_LEVEL_DAYS before it, spread evenly over the history (repeating starts when the history
    holds fewer), none touching an excluded day."""
    total = len(history.days)
    starts = np.arange(PRE_LEVEL_DAYS, total - n_days + 1)
    if exclude is not None and exclude.any():
        bad = np.cumsum(np.r_[0, exclude.astype(int)])
        span = bad[starts + n_days] - bad[starts - PRE_LEVEL_DAYS]
        starts = starts[span == 0]
    if len(starts) == 0:
        raise ValueError(f"the history ({total} days) holds no window of {n_days} days with "
                         f"{PRE_LEVEL_DAYS} days before it clear of past experiments")
    pick = np.round(np.linspace(0, len(starts) - 1, n_replays)).astype(int) if len(starts) >= n_replays \
        else np.arange(n_replays) % len(starts)
    return starts[pick]


@dataclass
class Replays:
    """One candidate's replays: role[k, p, d] = 1 treated, 0 control, -1 not analysed."""

    spec: ExperimentSpec
    rows: np.ndarray  # population rows of the history
    starts: np.ndarray
    role: np.ndarray
    unit: np.ndarray  # unit index per population row
    block: np.ndarray  # bootstrap block per population row (the estimator's rule)
    n_units: int


def _analysis_dates(spec: ExperimentSpec) -> list[date]:
    """The dates `assign_days` must be asked for: every day where arms may change within a day's
    step, else only the days where the rule can change them (arms are piecewise constant)."""
    days = [spec.start + timedelta(days=i) for i in range(spec.n_days)]
    if spec.design == "time_bound":
        return days[:1]
    if spec.design == "crossover":
        return [d for i, d in enumerate(days) if i % spec.phase_days in (0, spec.blackout_days)]
    return days


def _replay_triggers(history: History, rows: np.ndarray, spec: ExperimentSpec, starts: np.ndarray,
                     events: pd.DataFrame | None) -> pd.DataFrame:
    columns = ["product_id", "date", "event"]
    if events is None or events.empty:
        return pd.DataFrame(columns=columns)
    e = events[events["event"] == spec.trigger_event]
    pos = pd.Index(history.products[rows]).get_indexer(e["product_id"].astype(str))
    day = (pd.to_datetime(e["date"]).to_numpy().astype("datetime64[D]") - history.days[0]).astype(int)
    keep = pos >= 0
    pos, day = pos[keep], day[keep]
    offset = day[None, :] - starts[:, None]  # replays x events
    k, j = np.nonzero((offset >= 0) & (offset < spec.n_days))
    return pd.DataFrame({
        "product_id": [f"{a}|{b}" for a, b in zip(k, pos[j])],
        "date": pd.to_datetime(spec.start) + pd.to_timedelta(offset[k, j], unit="D"),
        "event": spec.trigger_event,
    })


def _blocks_for(spec: ExperimentSpec, products: np.ndarray, unit_of: np.ndarray, clusters: pd.DataFrame | None) -> np.ndarray:
    """Bootstrap blocks as `estimation.BootstrapBlocks` forms them: units, or for switchback designs
    the substitute clusters when they are coarser and at least MIN_BOOTSTRAP_BLOCKS."""
    if spec.design in estimation.SWITCHBACK_DESIGNS and clusters is not None and len(clusters):
        cluster_of = clusters.assign(product_id=clusters["product_id"].astype(str)).drop_duplicates("product_id")
        cid = cluster_of.set_index("product_id")["cluster_id"].astype(str).reindex(products).to_numpy(dtype=object)
        cid = np.where(pd.isna(cid), "unit:" + unit_of.astype(str), cid)
        first = pd.Series(cid).groupby(unit_of, sort=False).transform("first").to_numpy()
        blocks = np.unique(first, return_inverse=True)[1]
        if estimation.MIN_BOOTSTRAP_BLOCKS <= blocks.max() + 1 < len(np.unique(unit_of)):
            return blocks
    return np.unique(unit_of, return_inverse=True)[1]


def replay_candidate(spark, spec: ExperimentSpec, history: History, catalog: pd.DataFrame,
                     clusters: pd.DataFrame | None, events: pd.DataFrame | None, n_replays: int,
                     exclude: np.ndarray | None = None) -> Replays:
    """Arms of `n_replays` A/A replays of `spec` on history windows, from `assignment.assign_days`
    (one Spark job). The replays use seed `spec.seed + AA_SEED_OFFSET` and ids `<replay>|<id>`."""
    from pyspark.sql import functions as F

    rows = np.flatnonzero(pd.Index(history.products).isin(population_products(spec, catalog)))
    products = history.products[rows]
    catalog_sdf = spark.createDataFrame(catalog[["product_id", "category", "subclass"]].astype(str))
    clusters_sdf = (spark.createDataFrame(clusters[["product_id", "cluster_id"]].astype(str))
                    if spec.unit == "cluster" and clusters is not None else None)
    units = assignment.enrolment_units(spec, catalog_sdf, clusters_sdf).toPandas()
    units = units.set_index("product_id").reindex(products).reset_index()
    units["unit_id"] = units["unit_id"].fillna(assignment.SOLO_UNIT_PREFIX + units["product_id"])
    units["stratum"] = units["stratum"].fillna("")
    unit_index = np.unique(units["unit_id"].to_numpy(dtype=str), return_inverse=True)[1]
    starts = replay_windows(history, spec.n_days, n_replays, exclude)
    k = np.repeat(np.arange(n_replays), len(units))
    position = np.tile(np.arange(len(units)), n_replays)
    prefix = pd.Series(k).astype(str) + "|"
    replayed = pd.DataFrame({
        "product_id": (prefix + pd.Series(position).astype(str)).to_numpy(),
        "unit_id": (prefix + np.tile(units["unit_id"].to_numpy(dtype=str), n_replays)).to_numpy(),
        "stratum": (prefix + np.tile(units["stratum"].to_numpy(dtype=str), n_replays)).to_numpy(),
    })
    aa = dataclasses.replace(spec, name=f"{spec.name}-aa", seed=spec.seed + AA_SEED_OFFSET,
                             blackout_days=spec.blackout_days if spec.design == "crossover" else None)
    trigger_sdf = None
    if spec.design == "triggered":
        trig = _replay_triggers(history, rows, spec, starts, events)
        trigger_sdf = spark.createDataFrame(trig.astype({"product_id": str, "event": str}), "product_id string, date timestamp, event string") \
            if len(trig) else spark.createDataFrame([], "product_id string, date date, event string")
    units_sdf = spark.createDataFrame(replayed, "product_id string, unit_id string, stratum string")
    rows_sdf = assignment.assign_days(aa, units_sdf, _analysis_dates(aa), trigger_sdf)
    parts = F.split("product_id", r"\|")
    got = rows_sdf.select(
        parts.getItem(0).cast("int").alias("k"), parts.getItem(1).cast("int").alias("p"),
        F.datediff("date", F.lit(aa.start)).alias("d"),
        (F.col("arm") == assignment.ARM_TREATMENT).cast("byte").alias("t"), F.col("blackout").cast("byte").alias("b"),
    ).toPandas()
    asked = np.full((n_replays, len(units), spec.n_days), -2, dtype=np.int8)  # -2: not asked
    asked_days = np.array([(d - aa.start).days for d in _analysis_dates(aa)])
    asked[:, :, asked_days] = -1
    asked[got["k"].to_numpy(), got["p"].to_numpy(), got["d"].to_numpy()] = np.where(
        got["b"].to_numpy() == 1, -1, got["t"].to_numpy()).astype(np.int8)
    if spec.design in ("time_bound", "crossover"):  # piecewise constant: carry each asked day forward
        fill = np.maximum.accumulate(np.where(np.isin(np.arange(spec.n_days), asked_days), np.arange(spec.n_days), 0))
        asked = asked[:, :, fill]
    role = np.where(asked == -2, -1, asked).astype(np.int8)
    blocks = _blocks_for(spec, products, unit_index, clusters)
    return Replays(spec=spec, rows=rows, starts=starts, role=role, unit=unit_index, block=blocks,
                   n_units=int(unit_index.max() + 1) if len(unit_index) else 0)


def _window_values(history: History, rows: np.ndarray, starts: np.ndarray, n_days: int) -> np.ndarray:
    offsets = starts[:, None] + np.arange(n_days)[None, :]
    return history.y[rows][:, offsets].transpose(1, 0, 2)  # replays x products x days


def _cluster_se(influence: np.ndarray, block: np.ndarray, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per replay: SE from summed influences per block (replays x products), and the blocks used."""
    finite = np.isfinite(influence)
    sums = np.zeros((influence.shape[0], n_blocks))
    used = np.zeros((influence.shape[0], n_blocks), dtype=bool)
    for k in range(influence.shape[0]):
        sums[k] = np.bincount(block[finite[k]], weights=influence[k, finite[k]], minlength=n_blocks)
        used[k] = np.bincount(block[finite[k]], minlength=n_blocks) > 0
    g = used.sum(axis=1)
    correction = g / np.maximum(g - 1, 1)
    return np.sqrt(correction * (sums ** 2).sum(axis=1)), g


def fast_first_differences(history: History, replays: Replays) -> np.ndarray:
    """replays x products first differences (NaN = not analysed): between designs the window mean
    over analysed days minus the mean of the PRE_LEVEL_DAYS before the product's first analysed
    day; switchbacks the treated-day mean minus the control-day mean."""
    spec, role = replays.spec, replays.role
    y = _window_values(history, replays.rows, replays.starts, spec.n_days)
    if spec.design in estimation.SWITCHBACK_DESIGNS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t = np.nanmean(np.where(role == 1, y, np.nan), axis=2)
            c = np.nanmean(np.where(role == 0, y, np.nan), axis=2)
        return t - c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        window = np.nanmean(np.where(role >= 0, y, np.nan), axis=2)
    analysed = role >= 0
    first = np.where(analysed.any(axis=2), analysed.argmax(axis=2), -1)
    hy = history.y[replays.rows]
    values = np.nan_to_num(hy)
    counts = np.isfinite(hy).astype(float)
    csum = np.concatenate([np.zeros((len(hy), 1)), np.cumsum(values, axis=1)], axis=1)
    ccnt = np.concatenate([np.zeros((len(hy), 1)), np.cumsum(counts, axis=1)], axis=1)
    begin = replays.starts[:, None] + np.maximum(first, 0)  # replays x products
    lo = np.maximum(begin - PRE_LEVEL_DAYS, 0)
    p = np.arange(len(hy))[None, :]
    n = ccnt[p, begin] - ccnt[p, lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        pre = (csum[p, begin] - csum[p, lo]) / n
    fd = window - pre
    fd[(first < 0) | (n < PRE_LEVEL_DAYS // 2)] = np.nan
    return fd


def fast_did(history: History, replays: Replays, alpha: float) -> dict:
    """Per replay: the placebo effect, its SE (blocks as the estimator's bootstrap) and whether it
    rejects at `alpha` (t critical value on blocks - 1 degrees of freedom)."""
    fd = fast_first_differences(history, replays)
    n_blocks = int(replays.block.max() + 1)
    if replays.spec.design in estimation.SWITCHBACK_DESIGNS:
        ok = np.isfinite(fd)
        n = ok.sum(axis=1)
        effect = np.nansum(fd, axis=1) / np.maximum(n, 1)
        influence = np.where(ok, (fd - effect[:, None]) / np.maximum(n, 1)[:, None], np.nan)
    else:
        treated = (replays.role == 1).any(axis=2)
        ok = np.isfinite(fd)
        effect = np.zeros(len(fd))
        influence = np.full(fd.shape, np.nan)
        for arm, sign in ((True, 1.0), (False, -1.0)):
            mask = ok & (treated == arm)
            n = np.maximum(mask.sum(axis=1), 1)
            mean = np.where(mask, fd, 0.0).sum(axis=1) / n
            effect += sign * mean
            influence = np.where(mask, sign * (fd - mean[:, None]) / n[:, None], influence)
    se, g = _cluster_se(influence, replays.block, n_blocks)
    critical = stats.t.ppf(1 - alpha / 2, np.maximum(g - 1, 1))
    return {"effect": effect, "se": se, "reject": np.abs(effect) > critical * se, "fd": fd, "blocks": g}


def _calibration_assignments(history: History, replays: Replays, k: int, keep: np.ndarray) -> pd.DataFrame:
    """Contract rows of replay k on the kept products (analysed days only, no treatment)."""
    role = replays.role[k][keep]
    p, d = np.nonzero(role >= 0)
    dates = history.days[replays.starts[k] + d]
    return pd.DataFrame({
        "date": pd.to_datetime(dates), "experiment": f"aa{k}", "product_id": history.products[replays.rows][keep][p],
        "unit_id": ["u" + str(u) for u in replays.unit[keep][p]],
        "arm": np.where(role[p, d] == 1, assignment.ARM_TREATMENT, assignment.ARM_CONTROL),
        "blackout": False, "price_change": 0.0,
    })


def calibrate(history: History, replays: Replays, fast: dict, sales: pd.DataFrame, catalog: pd.DataFrame,
              clusters: pd.DataFrame | None, events: pd.DataFrame | None, n_calibration: int,
              max_products: int, metric: str = "units", seed: int = 0) -> dict:
    """The real estimator on a few replays: `first_differences_pandas` + `DiDEstimator` (cluster-aware
    bootstrap), on at most `max_products` products (whole units). Returns the ratio of the real
    SE to the fast SE on the same replays and products, and the real placebo z-scores."""
    if n_calibration <= 0:
        return {"ratio": 1.0, "replays": 0, "z": []}
    rng = np.random.default_rng(seed)
    units = np.unique(replays.unit)
    order = rng.permutation(units)
    sizes = np.bincount(replays.unit)
    chosen = order[np.cumsum(sizes[order]) <= max_products] if sizes.sum() > max_products else units
    keep = np.isin(replays.unit, chosen)
    # calibrating replays: spread over the windows with a long pre-period (the real counterfactuals need one)
    late = np.flatnonzero(replays.starts >= min(CALIBRATION_MIN_PRE_DAYS, replays.starts.max()))
    which = late[np.linspace(0, len(late) - 1, n_calibration).round().astype(int)]
    sub = dataclasses.replace(replays, rows=replays.rows[keep], role=replays.role[:, keep], unit=replays.unit[keep],
                              block=np.unique(replays.block[keep], return_inverse=True)[1])
    fast_sub = fast_did(history, sub, 0.05)
    real_se, fast_se, z = [], [], []
    keep_products = set(history.products[replays.rows][keep])
    sales_sub = sales[sales["product_id"].astype(str).isin(keep_products)]
    events_sub = events[events["product_id"].astype(str).isin(keep_products)] if events is not None else None
    for k in which:
        a = _calibration_assignments(history, replays, int(k), keep)
        last = a["date"].max()
        try:
            fd = estimation.first_differences_pandas(
                sales_sub[pd.to_datetime(sales_sub["date"]) <= last], a, {f"aa{k}": replays.spec.design},
                {f"aa{k}": metric}, catalog=catalog, events=events_sub)
            if fd.empty:
                continue
            model = estimation.DiDEstimator(n_bootstrap=200, random_state=int(k)).fit(fd, clusters)
        except ValueError:
            continue
        real_se.append(model.se_), fast_se.append(fast_sub["se"][k]), z.append(model.effect_ / model.se_)
    if not real_se:
        return {"ratio": 1.0, "replays": 0, "z": []}
    ratio = float(np.sqrt(np.mean(np.square(real_se)) / np.mean(np.square(fast_se))))
    return {"ratio": ratio, "replays": len(real_se), "z": z}


# ----------------------------------------------------------------------------------------------
# Advice
# ----------------------------------------------------------------------------------------------

@dataclass
class AdviceInputs:
    """What the advisor reads: sales (product_id, date, price, metric), catalog, and optionally
    clusters (product_id, cluster_id), graph edges (src, dst, weight), trigger events and the
    published assignments of past experiments."""

    sales: pd.DataFrame
    catalog: pd.DataFrame
    clusters: pd.DataFrame | None = None
    edges: pd.DataFrame | None = None
    events: pd.DataFrame | None = None
    past_assignments: pd.DataFrame | None = None


def _excluded_days(history: History) -> np.ndarray:
    """Days on which any past experiment treated a product, and CARRYOVER_EXCLUDE_DAYS after."""
    any_treated = history.treated.any(axis=0)
    if not any_treated.any():
        return any_treated
    return pd.Series(any_treated.astype(float)).rolling(CARRYOVER_EXCLUDE_DAYS + 1, min_periods=1).max().to_numpy() > 0


def advise(spark, proposal: Proposal, inputs: AdviceInputs, n_replays: int = DEFAULT_REPLAYS,
           n_calibration: int = DEFAULT_CALIBRATION_REPLAYS, calibration_products: int = DEFAULT_CALIBRATION_PRODUCTS,
           history: History | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per candidate of `proposal` (ADVICE_COLUMNS) and the evidence (carryover, spillover)."""
    metric = proposal.candidates[0].metric
    history = history or build_history(inputs.sales, inputs.catalog, metric, inputs.past_assignments)
    carry = carryover_from_history(history)
    exclude = _excluded_days(history)
    rows_out, timings = [], []
    spill = None
    for spec in proposal.candidates:
        if spec.design == "crossover" and spec.blackout_days is None:
            spec = dataclasses.replace(spec, blackout_days=min(carry["blackout_days"], spec.phase_days - 1))
        clock = time.perf_counter()
        replays = replay_candidate(spark, spec, history, inputs.catalog, inputs.clusters, inputs.events, n_replays, exclude)
        seconds = {"assign": time.perf_counter() - clock}
        if spill is None:
            spill = spillover_risk(history, replays.rows, inputs.edges, inputs.clusters)
        clock = time.perf_counter()
        fast = fast_did(history, replays, proposal.alpha)
        seconds["fast"] = time.perf_counter() - clock
        clock = time.perf_counter()
        cal = calibrate(history, replays, fast, inputs.sales, inputs.catalog, inputs.clusters, inputs.events,
                        n_calibration, calibration_products, metric, seed=spec.seed)
        seconds["calibrate"] = time.perf_counter() - clock
        timings.append({"design": spec.design, "unit": spec.unit, **seconds})
        fast_spread = float(np.sqrt(np.nanmean(fast["effect"] ** 2)))
        predicted = cal["ratio"] * fast_spread
        recent = history.y[replays.rows][:, -56:]
        baseline = float(np.nanmean(recent))
        z = stats.norm.ppf(1 - proposal.alpha / 2) + stats.norm.ppf(proposal.power)
        bias_spill = spill["bias_product" if spec.unit == "product" else "bias_cluster"]
        bias_carry = carryover_bias(spec.design, carry["rho"], spec.phase_days, spec.blackout_days)
        rows_out.append({
            "proposal": proposal.name, "design": spec.design, "unit": spec.unit,
            "phase_days": spec.phase_days, "blackout_days": spec.blackout_days,
            "n_units": replays.n_units, "n_products": len(replays.rows), "replays": n_replays,
            "predicted_se": predicted, "mde_abs": z * predicted, "mde_rel": z * predicted / baseline if baseline > 0 else np.nan,
            "aa_rejection_rate": float(np.mean(fast["reject"])), "carryover_days": carry["carryover_days"],
            "spillover_bias_rel": bias_spill, "baseline": baseline, "fast_se": fast_spread,
            "calibration_ratio": cal["ratio"], "calibration_replays": cal["replays"], "carryover_bias_rel": bias_carry,
        })
    table = pd.DataFrame(rows_out)
    expected = proposal.expected_effect
    if expected is None and spill is not None and np.isfinite(spill["own"]):
        pc = proposal.candidates[0].price_change
        expected = float(np.expm1((spill["own"] + spill["share_with_neighbours"] * spill["cross"]) * np.log1p(pc)))
    table["expected_rel"] = expected if expected is not None else np.nan
    recommend(table, proposal)
    evidence = {"carryover": carry, "spillover": spill, "expected_rel": expected, "seconds": timings,
                "expected_from": "proposal" if proposal.expected_effect is not None else "history's elasticities"}
    table = table[list(ADVICE_COLUMNS)].copy()
    for column in ADVICE_COLUMNS:  # the schema of ADVICE_SCHEMA, whatever the candidates held
        if column in _INTEGER:
            table[column] = table[column].astype("int64")
        elif column == "recommended":
            table[column] = table[column].astype(bool)
        elif column not in _TEXT:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    return table, evidence


def recommend(table: pd.DataFrame, proposal: Proposal) -> None:
    """Fill rmse_rel, recommended and reason in place (see the module docstring)."""
    bias = table["spillover_bias_rel"].fillna(0.0) + table["carryover_bias_rel"]
    expected = table["expected_rel"].abs()
    scale = np.where(expected > 0, expected, table["mde_rel"])
    table["rmse_rel"] = np.sqrt(bias ** 2 + (table["predicted_se"] / table["baseline"] / scale) ** 2)
    meets = table["mde_rel"] <= expected if np.isfinite(expected).all() else pd.Series(False, index=table.index)
    honest = table["aa_rejection_rate"] <= 2 * proposal.alpha
    pool = table[meets & honest] if (meets & honest).any() else table[meets] if meets.any() else None
    if pool is not None:
        best = pool["rmse_rel"].idxmin()
    else:
        best = table["mde_rel"].idxmin()
    table["recommended"] = table.index == best
    row = table.loc[best]
    design = f"{row['design'].replace('_', ' ')} by {row['unit']}"
    if row["design"] == "crossover":
        design += f" ({int(row['phase_days'])}-day phases, {int(row['blackout_days'])} blackout days)"
    if pool is not None:
        reason = (f"{design}: it can detect {row['mde_rel']:.1%} (expected {expected[best]:.1%}) with the smallest "
                  f"expected error, {row['rmse_rel']:.0%} of the effect (bias {row['spillover_bias_rel'] + row['carryover_bias_rel']:+.0%}).")
    elif np.isfinite(expected[best]):
        reason = (f"{design}: no candidate can detect the expected {expected[best]:.1%}; this one comes closest "
                  f"(detects {row['mde_rel']:.1%} at {proposal.power:.0%} power). Run longer or on more products.")
    else:
        reason = f"{design}: the smallest detectable effect, {row['mde_rel']:.1%} (no expected effect known)."
    table["reason"] = np.where(table["recommended"], reason, "")


def advice_markdown(table: pd.DataFrame, evidence: dict, plot_path: str | None = None) -> str:
    """The report section of one proposal: the sentence, the candidates' table, the limits."""
    name = table["proposal"].iloc[0]
    best = table[table["recommended"]].iloc[0]
    carry, spill = evidence["carryover"], evidence["spillover"] or {}
    lines = [f"### Design advice: {name}", "", f"**Recommendation.** {best['reason']}", ""]
    shown = table[["design", "unit", "blackout_days", "n_units", "n_products", "replays", "predicted_se", "mde_rel",
                   "aa_rejection_rate", "spillover_bias_rel", "carryover_bias_rel", "rmse_rel", "recommended"]]
    lines.append("| " + " | ".join(shown.columns) + " |")
    lines.append("|" + "---|" * len(shown.columns))
    for _, r in shown.iterrows():
        cells = []
        for c in shown.columns:
            v = r[c]
            if c in ("mde_rel", "aa_rejection_rate", "spillover_bias_rel", "carryover_bias_rel", "rmse_rel"):
                cells.append("" if pd.isna(v) else f"{v:.1%}")
            elif c == "predicted_se":
                cells.append(f"{v:.3f}")
            elif c == "blackout_days":
                cells.append("" if pd.isna(v) else str(int(v)))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Carryover (from {carry['source']}, {carry['n_events']} ends of a price change): decay "
        f"{carry['rho']:.2f}/day (upper bound {carry['rho_high']:.2f}), demand away from baseline for "
        f"{carry['carryover_days']} day(s); recommended blackout {carry['blackout_days']} day(s)." + (f" {carry['note']}." if carry.get("note") else ""),
        f"Expected effect {evidence['expected_rel']:.1%} (from the {evidence['expected_from']})." if evidence.get("expected_rel") is not None
        else "No expected effect: the table ranks by detectable effect.",
        f"Spillover: own elasticity {spill.get('own', float('nan')):.2f}, cross {spill.get('cross', float('nan')):.2f} on the "
        f"neighbours' mean price; {spill.get('note', '')}",
        "",
        "Limits: predictions hold for a market like the history (a break after it is not seen); the detectable effect "
        "is at the stated power and alpha, for the estimator's SE scaled from a few real-estimator replays; carryover "
        "is measured only from price changes the history holds; spillover only through the graph's edges.",
    ]
    if plot_path:
        lines += ["", f"![MDE by design and unit]({plot_path})"]
    return "\n".join(lines) + "\n"


def mde_png(table: pd.DataFrame) -> bytes:
    """Bar chart: relative MDE per design (bars) and unit (colours), the recommended one outlined."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    labels = [f"{d}\n(b={int(b)})" if d == "crossover" and pd.notna(b) else d
              for d, b in zip(table["design"], table["blackout_days"])]
    x = np.arange(len(table))
    colours = np.where(table["unit"] == "cluster", "#1f77b4", "#ff7f0e")
    bars = ax.bar(x, table["mde_rel"] * 100, color=colours)
    for bar, best in zip(bars, table["recommended"]):
        if best:
            bar.set_edgecolor("black"), bar.set_linewidth(2.5)
    if np.isfinite(table["expected_rel"]).any():
        ax.axhline(abs(table["expected_rel"].iloc[0]) * 100, color="grey", linestyle="--", label="expected effect")
        ax.legend(fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{l}\n{u}" for l, u in zip(labels, table["unit"])], fontsize=7)
    ax.set_ylabel("MDE, % of baseline")
    ax.set_title(f"{table['proposal'].iloc[0]}: minimum detectable effect (orange product, blue cluster)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
