"""Spillover: exposure to treated substitutes, design-based exposure probabilities, IPW estimates.

Exposure mapping
----------------
Product i on day t has exposure e_it = sum_j w_ij T_jt / sum_j w_ij over its neighbours j in the
substitution graph (`edges`: src, dst, weight; direction ignored). T_jt = 1 when j has a treatment
row of this experiment that day (blackout or not: the price engine applies it). A neighbour that
is not enrolled counts in the denominator and is never treated. A product without neighbours is
'isolated' and has e = 0. Treatments of other experiments are ignored: the probabilities below
come from this experiment's randomisation only.

For the between-product designs (time_bound, triggered) the outcome is a product's first
difference (mean detrended residual over its analysis days, `estimation.first_differences`), so
the product's exposure is the mean of e_it over those days. With arms fixed per unit, that is
e_i = sum_j M_ij T_j, M_ij = w_ij / w_i * (days of i's analysis on which j is enrolled) / (i's
analysis days): one sparse matrix, reused for every redraw.

Exposure conditions (product level, `CONDITIONS`), theta = `mostly_treated_share`:
- treated_mostly_treated  T = 1, e >= theta
- treated_few_treated     T = 1, e <  theta (includes isolated treated products)
- control_some_treated    T = 0, e >  0
- control_none_treated    T = 0, e =  0 (includes isolated controls)

Exposure probabilities
----------------------
`draw_arms` is a numpy twin of `assignment.assign_days` for the designs whose arms are drawn once
(time_bound, triggered): the same sha256 uniform of (name, seed, unit, 'experiment'), the same
stratified balanced quota floor(n * treated_fraction + v). `estimate_spillover` re-draws it with
`n_redraws` other seeds (`redraw_seeds`), checks that the experiment's own seed reproduces the
published arms exactly (otherwise it refuses: the probabilities would describe another design),
and takes each product's condition probabilities pi_ik and the pairwise joint probabilities from
the redraws.

Estimands and estimators (y = first difference)
-----------------------------------------------
- spillover_effect: the mean over the experiment's control products of y_i(0, e_i as assigned) -
  y_i(0, e = 0), the simulator's `true_spillover_effect`. Only exposed controls contribute, so it
  is (share of controls exposed) x (mean y of exposed controls - the mean y they would have had
  unexposed). The latter is the Hajek mean of the unexposed controls weighted by a_i / pi_i00
  with a_i = pi_i01 (the odds of exposure, as in an effect-on-the-treated weighting): a contrast
  of control_some_treated vs control_none_treated with estimand weights a_i = pi_i01. Products
  that can never be exposed (pi_i01 = 0, e.g. a cluster that holds all of its neighbours) get
  weight 0: their spillover is 0 and the estimate does not need them. The HT version divides the
  two weighted totals by the expected number of controls instead.
- global_effect: treated_mostly_treated vs control_none_treated (everything around me treated vs
  nothing treated; with theta < 1 it is an approximation of the global effect).
- direct_effect: treated_few_treated vs control_none_treated (own price effect at low neighbour
  exposure, e < theta).
  Both over the products with a positive probability of each condition (the rest are counted
  in `n_not_estimable`). HT: weighted totals / number of products; Hajek: difference of the two
  weighted means.

Stabilisation rule: every condition probability used as a denominator is at least
`min_probability` (default 0.01, a weight of at most 100); `n_stabilised` counts the products,
in a condition that enters an estimate, whose probability was raised.

Variance: Aronow & Samii (2017) conservative estimator from the joint probabilities of the
redraws (pairs that can never be together get Young's bound), for HT on a_i y_i and for Hajek on
the linearised residuals a_i (y_i - mean of its condition) / N_k. Pairs of products whose
conditions depend on disjoint sets of strata are independent (each stratum is drawn on its own),
so the double sums run only inside blocks of linked strata. The 95% interval is estimate +-
1.96 SE. Few exposed controls (typical when clusters were randomised: treated and control
products rarely share an edge) give a wide interval; fewer than `min_exposed_controls` give no
estimate (NaN) and a message saying why.

Spillover from forecasts
------------------------
`spillover_from_forecasts` (the estimate `experiment_results` reports, `experiment_spillover`)
needs no graph: the controls' mean departure from their own counterfactual forecasts, with the
forecasts' common error measured on placebo windows before the experiment. The IPW contrast
above is reported beside it (`spillover_ipw`); where the graph is incomplete it is the one pulled
towards zero.

Limit: exposures are only as good as the graph. A substitute edge the graph stage did not detect
leaves an exposed control classed control_none_treated, which biases the spillover estimate towards
zero. After cluster randomisation most of the remaining spillover runs through such edges
(`benchmarks/spillover.py` prints the estimate on the learned and on the true graph).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from pipelines import assignment
from pipelines.experiments import ExperimentSpec

CONDITIONS = ("treated_mostly_treated", "treated_few_treated", "control_some_treated", "control_none_treated")
TMT, TFT, CST, CNT = range(4)
DRAWN_ONCE_DESIGNS = ("time_bound", "triggered")
Z_95 = 1.959963984540054


# ----------------------------------------------------------------------------------------------
# Graph and exposure mapping
# ----------------------------------------------------------------------------------------------

def _neighbour_matrix(edges: pd.DataFrame, product_ids: np.ndarray) -> sparse.csr_matrix:
    """Row-normalised symmetric weights among `product_ids` (w_ij / sum_j w_ij; 0 rows when isolated).

    Every neighbour counts in the row sum, even one outside `product_ids` (it is never treated).
    """
    for column in ("src", "dst", "weight"):
        if column not in edges.columns:
            raise ValueError(f"edges: missing column {column!r} (need src, dst, weight)")
    src = edges["src"].astype(str).to_numpy()
    dst = edges["dst"].astype(str).to_numpy()
    weight = edges["weight"].to_numpy(float)
    bad = ~np.isfinite(weight) | (weight <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"edges: weight must be > 0, got {weight[i]} for src={src[i]}, dst={dst[i]}")
    names = pd.Index(np.unique(np.concatenate([product_ids.astype(str), src, dst])))
    a, b = names.get_indexer(src), names.get_indexer(dst)
    keep = a != b
    rows, cols, w = np.concatenate([a[keep], b[keep]]), np.concatenate([b[keep], a[keep]]), np.tile(weight[keep], 2)
    full = sparse.coo_matrix((w, (rows, cols)), shape=(len(names), len(names))).tocsr()
    full.sum_duplicates()
    # duplicates (an edge listed both ways) are summed above; keep the larger weight instead
    if len(edges):
        pairs = pd.DataFrame({"r": rows, "c": cols, "w": w}).groupby(["r", "c"])["w"].max().reset_index()
        full = sparse.csr_matrix((pairs["w"].to_numpy(), (pairs["r"].to_numpy(), pairs["c"].to_numpy())),
                                 shape=(len(names), len(names)))
    total = np.asarray(full.sum(axis=1)).ravel()
    position = names.get_indexer(product_ids.astype(str))
    sub = full[position][:, position]
    scale = np.where(total[position] > 0, 1.0 / np.where(total[position] > 0, total[position], 1.0), 0.0)
    return sparse.diags(scale) @ sub, total[position] > 0


def exposure_edges(edges: pd.DataFrame, blocks: pd.DataFrame | None, catalog: pd.DataFrame) -> pd.DataFrame:
    """The neighbours exposure is mapped on: the graph's edges, and whole blocks where evidence says so.

    A block whose substitution is likely but not carried by its edges (`blocks.exposure_by_block`,
    from `graph.block_evidence`: the blocks randomised whole and, in a market that shows
    substitution, those just short of it) has its own edges replaced by every pair of its members
    at equal weight: a product's exposure there is the treated share of its block. Edges leaving
    the block stay. catalog: product_id, subclass.
    """
    column = "exposure_by_block" if blocks is not None and "exposure_by_block" in blocks.columns else "randomise_whole"
    if blocks is None or blocks.empty or not blocks[column].any():
        return edges[["src", "dst", "weight"]]
    whole = set(blocks.loc[blocks[column].astype(bool), "block"].astype(str))
    block_of = catalog.assign(product_id=catalog["product_id"].astype(str)).set_index("product_id")["subclass"].astype(str)
    src_block = block_of.reindex(edges["src"].astype(str)).to_numpy()
    dst_block = block_of.reindex(edges["dst"].astype(str)).to_numpy()
    inside = (src_block == dst_block) & pd.Series(src_block).isin(whole).to_numpy()
    kept = edges.loc[~inside, ["src", "dst", "weight"]]
    pairs = []
    for block, ids in block_of[block_of.isin(whole)].groupby(block_of[block_of.isin(whole)]):
        members = np.sort(ids.index.to_numpy())
        a, b = np.triu_indices(len(members), 1)
        pairs.append(pd.DataFrame({"src": members[a], "dst": members[b], "weight": 1.0}))
    return pd.concat([kept, *pairs], ignore_index=True)


def condition_of(treated: np.ndarray, exposure: np.ndarray, mostly_treated_share: float) -> np.ndarray:
    """Exposure condition codes (index into `CONDITIONS`), elementwise; works on (draws x products)."""
    some = exposure > 1e-12
    mostly = exposure >= mostly_treated_share - 1e-12
    return np.where(treated, np.where(mostly, TMT, TFT), np.where(some, CST, CNT)).astype(np.int8)


def exposure_mapping(assignments: pd.DataFrame, edges: pd.DataFrame, mostly_treated_share: float = 0.5) -> pd.DataFrame:
    """Per assignment row (product i, day t): the weighted share of i's neighbours treated that day.

    `assignments`: one experiment's contract rows (date, product_id, arm, blackout, ...);
    `edges`: src, dst, weight. Returns the rows with `exposure`, `has_neighbours` and `condition`
    (one of `CONDITIONS`, from the row's arm and exposure). Any design.
    """
    _check_columns(assignments, ("date", "product_id", "arm"), "assignments")
    rows = assignments.reset_index(drop=True)
    products = np.asarray(pd.unique(rows["product_id"].astype(str)))
    matrix, has_neighbours = _neighbour_matrix(edges, products)
    product_index = pd.Index(products).get_indexer(rows["product_id"].astype(str))
    days, day_index = np.unique(pd.to_datetime(rows["date"]).to_numpy(), return_inverse=True)
    treated = (rows["arm"] == "treatment").to_numpy()
    t_matrix = sparse.csr_matrix((treated.astype(float), (product_index, day_index)), shape=(len(products), len(days)))
    exposure_by_day = (matrix @ t_matrix).toarray()
    exposure = exposure_by_day[product_index, day_index]
    codes = condition_of(treated, exposure, mostly_treated_share)
    return rows.assign(exposure=exposure, has_neighbours=has_neighbours[product_index],
                       condition=np.asarray(CONDITIONS, dtype=object)[codes])


def _check_columns(frame: pd.DataFrame, needed: Sequence[str], name: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; has {list(frame.columns)}")


# ----------------------------------------------------------------------------------------------
# Redrawing the design
# ----------------------------------------------------------------------------------------------

REDRAW_SEED_STREAM = 7_654_321


def redraw_seeds(spec: ExperimentSpec, n_redraws: int) -> np.ndarray:
    """`n_redraws` other seeds for the experiment's randomisation: a fixed pseudo-random sequence
    (the design's distribution does not depend on the seed used), without the experiment's own."""
    seeds = np.random.default_rng(REDRAW_SEED_STREAM).choice(2**31 - 1, size=n_redraws + 1, replace=False)
    return seeds[seeds != spec.seed][:n_redraws]


def distinct_units(units: pd.DataFrame) -> pd.DataFrame:
    """One row per unit (unit_id, stratum), as `assignment.assign_days` draws them: the smallest
    stratum given (null -> ''), sorted by stratum then unit_id."""
    _check_columns(units, ("unit_id", "stratum"), "units")
    frame = pd.DataFrame({"unit_id": units["unit_id"].astype(str),
                          "stratum": units["stratum"].astype(object).where(units["stratum"].notna(), "").astype(str)})
    return frame.groupby("unit_id", as_index=False)["stratum"].min().sort_values(["stratum", "unit_id"]).reset_index(drop=True)


def draw_arms(spec: ExperimentSpec, units: pd.DataFrame, seeds: Sequence[int]) -> tuple[pd.DataFrame, np.ndarray]:
    """The arms `assign_days` would give each unit under each seed (designs drawn once).

    `units`: unit_id, stratum (e.g. `enrolment_units` output; products of a unit may repeat).
    Returns (unit table from `distinct_units`, bool matrix seeds x units, True = treatment).
    The draw is `assignment.first_group_draws` (the rule's one home) with `seed` replaced.
    """
    if spec.design not in DRAWN_ONCE_DESIGNS:
        raise ValueError(
            f"experiment '{spec.name}': redraws are implemented for designs drawn once {DRAWN_ONCE_DESIGNS}, "
            f"not {spec.design!r}"
        )
    table = distinct_units(units)
    treated = assignment.first_group_draws(spec.name, seeds, table["unit_id"].to_numpy(), table["stratum"].to_numpy(),
                                           assignment.PERIOD_WHOLE_EXPERIMENT, spec.treated_fraction)
    return table, treated


def units_from_catalog(assignments: pd.DataFrame, catalog: pd.DataFrame) -> pd.DataFrame:
    """product_id, unit_id, stratum from assignment rows and the catalogue's subclass, with
    `assignment.enrolment_units`' rule: a unit's stratum is the subclass most of its products
    share (ties: the smallest)."""
    _check_columns(catalog, ("product_id", "subclass"), "catalog")
    products = assignments[["product_id", "unit_id"]].astype(str).drop_duplicates()
    subclass = catalog.assign(product_id=catalog["product_id"].astype(str)).drop_duplicates("product_id").set_index("product_id")["subclass"]
    products = products.assign(subclass=products["product_id"].map(subclass))
    unknown = products["subclass"].isna()
    if unknown.any():
        raise ValueError(f"catalog: no subclass for enrolled product(s) {products.loc[unknown, 'product_id'].head(5).tolist()}")
    products["subclass"] = products["subclass"].astype(str)
    counts = products.groupby(["unit_id", "subclass"]).size().rename("n").reset_index()
    counts = counts.sort_values(["unit_id", "n", "subclass"], ascending=[True, False, True]).drop_duplicates("unit_id")
    return products.merge(counts[["unit_id", "subclass"]].rename(columns={"subclass": "stratum"}), on="unit_id")[
        ["product_id", "unit_id", "stratum"]]


# ----------------------------------------------------------------------------------------------
# Estimation
# ----------------------------------------------------------------------------------------------

def _product_exposure_matrix(rows: pd.DataFrame, edges: pd.DataFrame, products: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray]:
    """M (products x products): e_i = M @ T for fixed arms; mean over i's analysis days of its share."""
    matrix, has_neighbours = _neighbour_matrix(edges, products)
    index = pd.Index(products)
    days, day_index = np.unique(pd.to_datetime(rows["date"]).to_numpy(), return_inverse=True)
    p = index.get_indexer(rows["product_id"].astype(str))
    enrolled = sparse.csr_matrix((np.ones(len(rows)), (p, day_index)), shape=(len(products), len(days)))
    enrolled.data[:] = 1.0
    analysed = rows["blackout"].astype(bool).to_numpy() == False  # noqa: E712
    analysis = sparse.csr_matrix((np.ones(analysed.sum()), (p[analysed], day_index[analysed])), shape=(len(products), len(days)))
    analysis.data[:] = 1.0
    n_days = np.asarray(analysis.sum(axis=1)).ravel()
    coo = matrix.tocoo()
    overlap = np.asarray(analysis[coo.row].multiply(enrolled[coo.col]).sum(axis=1)).ravel()
    share = coo.data * overlap / np.where(n_days[coo.row] > 0, n_days[coo.row], 1.0)
    return sparse.csr_matrix((share, (coo.row, coo.col)), shape=matrix.shape), has_neighbours


def _dependence_blocks(product_stratum: np.ndarray, m: sparse.csr_matrix, n_strata: int) -> np.ndarray:
    """Block label per product: strata linked by a product whose condition depends on both."""
    coo = m.tocoo()
    link = sparse.coo_matrix((np.ones(len(coo.row)), (product_stratum[coo.row], product_stratum[coo.col])),
                             shape=(n_strata, n_strata))
    _, label = connected_components(link, directed=False)
    return label[product_stratum]


class _Draws:
    """Condition indicators of every redraw, kept per dependence block (draws x block products)."""

    def __init__(self, codes: np.ndarray, blocks: np.ndarray):
        self.codes, self.blocks = codes, blocks
        self.members = [np.flatnonzero(blocks == b) for b in np.unique(blocks)]
        self.pi = np.stack([(codes == k).mean(axis=0) for k in range(len(CONDITIONS))])
        self._joint: dict = {}
        self._indicators: dict = {}

    def joint(self, block: int, k: int, l: int) -> np.ndarray:
        """pi_ij(k, l) = P(i in k and j in l) among the block's products."""
        key = (block, k, l)
        if key not in self._joint:
            self._joint[key] = (self._indicator(block, k).T @ self._indicator(block, l)) / len(self.codes)
        return self._joint[key]

    def _indicator(self, block: int, k: int) -> np.ndarray:
        if (block, k) not in self._indicators:
            self._indicators[(block, k)] = (self.codes[:, self.members[block]] == k).astype(float)
        return self._indicators[(block, k)]


def _as_variance(draws: _Draws, k: int, l: int, realised: np.ndarray, x_k: np.ndarray, x_l: np.ndarray,
                 in_population: np.ndarray, pi_floor: float) -> float:
    """Aronow-Samii conservative variance of sum_{i in k} x_k,i / pi_ik - sum_{i in l} x_l,i / pi_il.

    x_k, x_l: per product, the estimand-scale value (only realised members' values are used).
    Pairs with a zero joint probability get Young's bound; only products of the estimand
    population (`in_population`) enter those bounds.
    """
    total = 0.0
    for b, idx in enumerate(draws.members):
        pop = in_population[idx]
        if not pop.any():
            continue
        parts = []
        for cond, x in ((k, x_k), (l, x_l)):
            pi = draws.pi[cond, idx]
            member = (realised[idx] == cond) & pop
            c = np.where(member, x[idx] / np.maximum(pi, pi_floor), 0.0)
            parts.append((cond, pi, member, c, x[idx]))
        for (cond, pi, member, c, x) in parts:
            joint = draws.joint(b, cond, cond).astype(float)
            np.fill_diagonal(joint, pi)
            with np.errstate(invalid="ignore", divide="ignore"):
                factor = np.where(joint > 0, (joint - np.outer(pi, pi)) / joint, 0.0)
            total += float(c @ factor @ c)
            never = (joint <= 0) & pop[None, :]
            np.fill_diagonal(never, False)
            n_never = never.sum(axis=1)
            total += float(np.sum(np.where(member, x**2 / np.maximum(pi, pi_floor), 0.0) * n_never))
        (_, pi_k, mem_k, c_k, xk), (_, pi_l, mem_l, c_l, xl) = parts
        joint = draws.joint(b, k, l).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            factor = np.where(joint > 0, (joint - np.outer(pi_k, pi_l)) / joint, 0.0)
        total -= 2.0 * float(c_k @ factor @ c_l)
        never = (joint <= 0) & pop[None, :] & pop[:, None]
        total += float(np.sum(np.where(mem_k, xk**2 / np.maximum(pi_k, pi_floor), 0.0) * never.sum(axis=1)))
        total += float(np.sum(np.where(mem_l, xl**2 / np.maximum(pi_l, pi_floor), 0.0) * never.sum(axis=0)))
    return max(total, 0.0)


def _contrast(draws: _Draws, realised: np.ndarray, y: np.ndarray, k: int, l: int, weight: np.ndarray,
              normaliser: float, pi_floor: float) -> dict:
    """HT and Hajek estimates of sum_i a_i (y_i(k) - y_i(l)) / normaliser (HT) and of the
    difference of a-weighted means (Hajek), with Aronow-Samii SEs."""
    population = weight > 0
    pi_k = np.maximum(draws.pi[k], pi_floor)
    pi_l = np.maximum(draws.pi[l], pi_floor)
    in_k, in_l = (realised == k) & population, (realised == l) & population
    out = {"n_k": int(in_k.sum()), "n_l": int(in_l.sum())}
    if out["n_k"] == 0 or out["n_l"] == 0 or normaliser <= 0:
        return {**out, "ht": np.nan, "ht_se": np.nan, "hajek": np.nan, "hajek_se": np.nan, "share_k": np.nan}
    total_k = np.sum(np.where(in_k, weight * y / pi_k, 0.0))
    total_l = np.sum(np.where(in_l, weight * y / pi_l, 0.0))
    size_k = np.sum(np.where(in_k, weight / pi_k, 0.0))
    size_l = np.sum(np.where(in_l, weight / pi_l, 0.0))
    mean_k, mean_l = total_k / size_k, total_l / size_l
    x = weight * y / normaliser
    ht_var = _as_variance(draws, k, l, realised, x, x, population, pi_floor)
    hajek_var = _as_variance(draws, k, l, realised, weight * (y - mean_k) / size_k, weight * (y - mean_l) / size_l,
                             population, pi_floor)
    return {**out, "ht": (total_k - total_l) / normaliser, "ht_se": float(np.sqrt(ht_var)),
            "hajek": mean_k - mean_l, "hajek_se": float(np.sqrt(hajek_var))}


class _Redraws:
    """The design drawn again: draw 0 with the experiment's own seed, then `n_redraws` other seeds
    (the same rule as the published assignments), and each draw's treated indicator per product."""

    def __init__(self, spec: ExperimentSpec, rows: pd.DataFrame, units: pd.DataFrame, edges: pd.DataFrame, n_redraws: int):
        self.unit_table, arms = draw_arms(spec, units, [spec.seed, *redraw_seeds(spec, n_redraws)])
        product_unit = rows.drop_duplicates("product_id").set_index("product_id")["unit_id"]
        self.products, self.unit_ids = product_unit.index.to_numpy(), product_unit.to_numpy()
        self.unit_pos = pd.Index(self.unit_table["unit_id"]).get_indexer(self.unit_ids)
        if (self.unit_pos < 0).any():
            missing = product_unit[self.unit_pos < 0].head(5).tolist()
            raise ValueError(f"experiment '{spec.name}': unit(s) {missing} of the assignments are not in `units`")
        self.m, self.has_neighbours = _product_exposure_matrix(rows, edges, self.products)
        self.treated = arms[:, self.unit_pos]  # draws x products; row 0 is the seed's own draw

    def conditions(self, treated: np.ndarray, mostly_treated_share: float) -> tuple[np.ndarray, np.ndarray]:
        """(exposure, condition code) of each draw's treated indicators (draws x products)."""
        exposure = np.asarray((self.m @ treated.T.astype(float)).T)
        return exposure, condition_of(treated, exposure, mostly_treated_share)

    def product_strata(self) -> tuple[np.ndarray, int]:
        """Per product, the index of its unit's stratum, and the number of strata."""
        strata = pd.Index(np.unique(self.unit_table["stratum"]))
        return strata.get_indexer(self.unit_table["stratum"].to_numpy()[self.unit_pos]), len(strata)


def _experiment_rows(assignments: pd.DataFrame, spec: ExperimentSpec) -> pd.DataFrame:
    """The experiment's assignment rows, with string product and unit ids."""
    rows = assignments[assignments["experiment"] == spec.name] if "experiment" in assignments.columns else assignments
    return rows.assign(product_id=rows["product_id"].astype(str), unit_id=rows["unit_id"].astype(str))


def exposure_probabilities(
    spec: ExperimentSpec, assignments: pd.DataFrame, edges: pd.DataFrame, units: pd.DataFrame,
    n_redraws: int = 1000, mostly_treated_share: float = 0.5,
) -> pd.DataFrame:
    """Per enrolled product: its realised exposure and condition and, from `n_redraws` redraws of
    the design, the probability of each exposure condition (columns p_<condition>)."""
    design = _Redraws(spec, _experiment_rows(assignments, spec), units, edges, n_redraws)
    exposure, codes = design.conditions(design.treated, mostly_treated_share)
    out = pd.DataFrame({"product_id": design.products, "unit_id": design.unit_ids, "treated": design.treated[0],
                        "exposure": exposure[0], "has_neighbours": design.has_neighbours,
                        "condition": np.asarray(CONDITIONS, dtype=object)[codes[0]]})
    for k, name in enumerate(CONDITIONS):
        out[f"p_{name}"] = (codes[1:] == k).mean(axis=0)
    return out


def _published_arms(rows: pd.DataFrame, spec: ExperimentSpec, design: _Redraws) -> np.ndarray:
    """Per product, treated in the published rows; refused unless the seed's redraw gives the same."""
    published = rows.groupby("product_id")["arm"].agg(lambda a: (a == "treatment").mean() >= 0.5).reindex(design.products).to_numpy()
    drawn = design.treated[0]
    if (published != drawn).any():
        bad = design.products[published != drawn][:5].tolist()
        raise ValueError(
            f"experiment '{spec.name}': re-drawing seed {spec.seed} does not reproduce the published arms of "
            f"product(s) {bad}; the units, strata or spec differ from the ones the assignments used"
        )
    return published


def estimate_spillover(
    first_differences: pd.DataFrame,
    assignments: pd.DataFrame,
    edges: pd.DataFrame,
    spec: ExperimentSpec,
    catalog: pd.DataFrame | None = None,
    units: pd.DataFrame | None = None,
    n_redraws: int = 1000,
    mostly_treated_share: float = 0.5,
    min_probability: float = 0.01,
    min_exposed_controls: int = 5,
    max_unsupported_share: float = 0.25,
) -> dict:
    """Spillover, direct and global effects of one between-product experiment by inverse
    probability weighting over its exposure conditions (module docstring has the definitions).

    Needs, for experiment `spec` (design time_bound or triggered), as pandas:
    - `first_differences`: product_id, first_difference (and arm) of its products, from
      `estimation.first_differences` / `first_differences_pandas` (rows of other experiments are
      ignored when an `experiment` column is present);
    - `assignments`: its published rows (date, product_id, unit_id, arm, blackout);
    - `edges`: the substitution graph snapshot in force at its start (src, dst, weight);
    - `units` (product_id, unit_id, stratum: `assignment.enrolment_units` output) or else
      `catalog` (product_id, subclass), from which the strata are rebuilt with the same rule.
    Returns a dict: spillover_effect, spillover_se, spillover_ci_low/high (Hajek, A-S variance),
    spillover_effect_ht, spillover_se_ht, direct_effect_ht/_hajek (+ _se), global_effect_ht/
    _hajek (+ _se), exposure_counts (products per condition, plus isolated), n_stabilised,
    n_not_estimable (per contrast), exposed_control_share, n_redraws, message ('' when fine).
    Not estimable (NaN, with a message) when more than `max_unsupported_share` of the exposed
    controls were unexposed in none of the redraws (positivity fails: e.g. exposure by block share
    under product randomisation, where every control has about half its block treated; a few
    high-degree products are left to the probability floor).
    Raises ValueError when the redraw of the experiment's own seed does not reproduce the
    published arms (wrong units/strata/spec) or the design is not drawn once.
    """
    if spec.design not in DRAWN_ONCE_DESIGNS:
        raise ValueError(
            f"experiment '{spec.name}': spillover is estimated for between-product designs {DRAWN_ONCE_DESIGNS}; "
            f"{spec.design!r} switches arms over time (not implemented)"
        )
    if n_redraws < 50:
        raise ValueError(f"n_redraws must be >= 50, got {n_redraws}")
    if not 0 < min_probability < 1:
        raise ValueError(f"min_probability must be in (0, 1), got {min_probability}")
    _check_columns(assignments, ("date", "product_id", "unit_id", "arm", "blackout"), "assignments")
    _check_columns(first_differences, ("product_id", "first_difference"), "first_differences")
    rows = _experiment_rows(assignments, spec)
    if rows.empty:
        raise ValueError(f"experiment '{spec.name}': no assignment rows")
    fd = first_differences
    if "experiment" in fd.columns:
        fd = fd[fd["experiment"] == spec.name]
    if units is None:
        if catalog is None:
            raise ValueError("estimate_spillover: pass `units` (enrolment_units output) or `catalog` (product_id, subclass)")
        units = units_from_catalog(rows, catalog)

    design = _Redraws(spec, rows, units, edges, n_redraws)
    published = _published_arms(rows, spec, design)
    treated_draws = design.treated[1:]
    _, codes = design.conditions(treated_draws, mostly_treated_share)
    realised = condition_of(published, design.m @ published.astype(float), mostly_treated_share)
    product_stratum, n_strata = design.product_strata()
    draws = _Draws(codes, _dependence_blocks(product_stratum, design.m, n_strata))

    y_by_product = fd.assign(product_id=fd["product_id"].astype(str)).drop_duplicates("product_id").set_index("product_id")["first_difference"]
    y = y_by_product.reindex(design.products).to_numpy(float)
    observed = np.isfinite(y)
    y = np.where(observed, y, 0.0)

    counts = {name: int(((realised == k) & observed).sum()) for k, name in enumerate(CONDITIONS)}
    counts["isolated"] = int((~design.has_neighbours & observed).sum())
    result: dict = {"exposure_counts": counts, "n_redraws": int(n_redraws), "n_products": int(observed.sum())}
    messages = []
    a_spill = _spillover_on_controls(result, messages, draws, realised, y, observed, published, treated_draws,
                                     min_probability, min_exposed_controls, max_unsupported_share, n_redraws)
    stabilised = np.zeros(len(design.products), dtype=bool)
    for k in (CST, CNT):
        stabilised |= (realised == k) & (a_spill > 0) & (draws.pi[k] < min_probability)
    stabilised |= _direct_and_global(result, messages, draws, realised, y, observed, min_probability)
    result["n_stabilised"] = int(stabilised.sum())
    result["min_probability"] = float(min_probability)
    result["message"] = "; ".join(messages)
    return result


def _spillover_on_controls(result: dict, messages: list, draws: _Draws, realised, y, observed, published, treated_draws,
                           min_probability, min_exposed_controls, max_unsupported_share, n_redraws) -> np.ndarray:
    """Exposed controls against odds-weighted unexposed controls (Hajek, scaled by the exposed
    share), or 0 by design / NaN with the reason; fills `result`, returns the contrast's weights."""
    pi = draws.pi
    control = ~published & observed
    a_spill = np.where(observed, pi[CST], 0.0)
    spill = _contrast(draws, realised, y, CST, CNT, a_spill, float(np.sum(np.where(observed, 1.0 - np.mean(treated_draws, axis=0), 0.0))), min_probability)
    share_exposed = spill["n_k"] / max(control.sum(), 1)
    result["exposed_control_share"] = float(share_exposed)
    exposed = (realised == CST) & observed
    unsupported = exposed & (pi[CNT] == 0)  # unexposed in none of the redraws
    if not (a_spill[control] > 0).any():
        messages.append("spillover 0 by design: no control can ever be exposed to a treated neighbour "
                        "(every neighbour, by edge or block evidence, shares its unit); substitutes the graph "
                        "missed are not in this figure")
        result.update(spillover_effect=0.0, spillover_se=0.0, spillover_effect_ht=0.0, spillover_se_ht=0.0)
    elif unsupported.sum() > max_unsupported_share * max(exposed.sum(), 1):
        messages.append(f"spillover not estimable: {int(unsupported.sum())} of {int(exposed.sum())} exposed controls were "
                        f"unexposed in none of {n_redraws} redraws of the design; their spillover has no design-based "
                        "counterfactual")
        result.update(spillover_effect=np.nan, spillover_se=np.nan, spillover_effect_ht=np.nan, spillover_se_ht=np.nan)
    elif spill["n_k"] < min_exposed_controls or spill["n_l"] == 0:
        messages.append(f"spillover not estimable: {spill['n_k']} exposed control(s) (need >= {min_exposed_controls}) "
                        f"and {spill['n_l']} unexposed")
        result.update(spillover_effect=np.nan, spillover_se=np.nan, spillover_effect_ht=np.nan, spillover_se_ht=np.nan)
    else:
        result.update(
            spillover_effect=share_exposed * spill["hajek"], spillover_se=share_exposed * spill["hajek_se"],
            spillover_effect_ht=spill["ht"], spillover_se_ht=spill["ht_se"],
        )
    result["spillover_ci_low"] = result["spillover_effect"] - Z_95 * result["spillover_se"]
    result["spillover_ci_high"] = result["spillover_effect"] + Z_95 * result["spillover_se"]
    return a_spill


def _direct_and_global(result: dict, messages: list, draws: _Draws, realised, y, observed, min_probability) -> np.ndarray:
    """Direct (treated, few neighbours treated) and global (treated, most treated) effects against
    unexposed controls, on the products with support in both conditions; fills `result`, returns
    the products whose probability was floored."""
    pi = draws.pi
    stabilised = np.zeros(len(y), dtype=bool)
    result["n_not_estimable"] = {}
    for name, k in (("direct_effect", TFT), ("global_effect", TMT)):
        both = observed & (pi[k] > 0) & (pi[CNT] > 0)
        result["n_not_estimable"][name] = int((observed & ~both).sum())
        est = _contrast(draws, realised, y, k, CNT, both.astype(float), float(both.sum()), min_probability)
        result.update({f"{name}_ht": est["ht"], f"{name}_ht_se": est["ht_se"],
                       f"{name}_hajek": est["hajek"], f"{name}_hajek_se": est["hajek_se"]})
        if not np.isfinite(est["hajek"]):
            messages.append(f"{name} not estimable: {est['n_k']} product(s) in {CONDITIONS[k]}, {est['n_l']} in {CONDITIONS[CNT]}")
        for cond in (k, CNT):
            stabilised |= (realised == cond) & both & (pi[cond] < min_probability)
    return stabilised


# ----------------------------------------------------------------------------------------------
# Spillover from the controls' own forecasts (needs no graph)
# ----------------------------------------------------------------------------------------------

def _weighted_mean_and_variance(values: np.ndarray, weights: np.ndarray, groups: np.ndarray) -> tuple[float, float, int, int]:
    """Weighted mean and the cluster-robust variance of that mean, errors correlated inside a group.

    Returns (mean, variance, values used, groups used); with fewer than two groups each value is
    its own group."""
    ok = np.isfinite(values) & (weights > 0)
    n = int(ok.sum())
    if n < 2:
        return float("nan"), float("nan"), n, 0
    v, w, g = values[ok], weights[ok] / weights[ok].sum(), groups[ok]
    mean = float(w @ v)
    labels, index = np.unique(g, return_inverse=True)
    if len(labels) < 2:
        index, labels = np.arange(n), np.arange(n)
    sums = np.bincount(index, weights=w * (v - mean), minlength=len(labels))
    return mean, float(len(labels) / (len(labels) - 1) * np.sum(sums**2)), n, len(labels)


def spillover_from_forecasts(first_differences: pd.DataFrame, min_controls: int = 20, alpha: float = 0.05,
                             group_column: str = "pool") -> dict:
    """Spillover on the controls as their departure from their own counterfactual forecast.

    A control product's first difference is its mean residual in the window (units minus the
    counterfactual fitted on its own pre-period, `estimation.product_first_difference`). Without a
    spillover it is forecast error: idiosyncratic noise, which averages out over the controls,
    plus an error common to every product (a market-wide shock or a shared misfit of trend or
    season), which does not. So the estimate is the day-weighted mean first difference of the
    controls (the estimand is `simulation.true_effects`' mean over control product-days), and its
    variance is the part that differs between the controls (cluster-robust over `group_column`, the
    counterfactual's pool: products of a subclass share season and weekday misfits, so their errors
    are correlated; each product is its own group when the column is absent) plus the part common
    to every product, measured where no
    product was treated: on the back-test windows of every enrolled product (`placebo_windows`,
    stretches of the window's length just before it, forecast the same way). Per window b, the
    mean placebo P_b over the products has E[P_b^2] = common^2 + bias^2 + its own noise / n, so
    common^2 = mean_b(P_b^2 - noise_b) (at least 0): a bias the forecast shows in the placebos
    widens the interval instead of being assumed away. The interval uses Student's t with the
    Satterthwaite degrees of freedom (few pools or placebo windows make the variance uncertain). Its
    limit: with the default three windows, a common error that dominates is itself estimated
    roughly, and coverage then sits a little below 95% (about 0.90-0.92 in
    `tests/test_spillover.py`'s synthetic worlds where it is twice the idiosyncratic part).

    It needs no substitution graph, so it is not pulled towards zero by substitutes the graph
    could not see, and it is the same under product and cluster randomisation. Its assumption is
    stated in `message`: without the experiment, the controls would have followed their forecasts
    up to errors like those in the placebo windows. Anything else that moves only the controls
    in the window (another experiment, a shock after the last placebo window) is read as spillover.

    first_differences: one experiment's rows (arm, first_difference, n_window_days, placebo_windows).
    Returns estimate, se, ci_low, ci_high, df, n_controls, common_sd, placebo_mean (mean of P_b),
    n_placebo_windows, message.
    """
    from scipy import stats

    _check_columns(first_differences, ("arm", "first_difference"), "first_differences")
    fd = first_differences
    days = fd["n_window_days"].to_numpy(float) if "n_window_days" in fd.columns else np.ones(len(fd))
    control = (fd["arm"] == "control").to_numpy()
    groups = fd[group_column].astype(str).to_numpy() if group_column in fd.columns else np.arange(len(fd)).astype(str)
    estimate, idio_var, n_controls, n_groups = _weighted_mean_and_variance(
        fd["first_difference"].to_numpy(float)[control], days[control], groups[control])
    out = {"estimate": np.nan, "se": np.nan, "ci_low": np.nan, "ci_high": np.nan, "df": np.nan,
           "n_controls": n_controls, "common_sd": np.nan, "placebo_mean": np.nan, "n_placebo_windows": 0}
    if n_controls < min_controls:
        return {**out, "message": f"spillover not estimable from forecasts: {n_controls} control product(s) with a first "
                                  f"difference (need >= {min_controls})"}
    windows = (np.array([np.asarray(w, dtype=float) for w in fd["placebo_windows"]])
               if "placebo_windows" in fd.columns and len(fd) else np.empty((len(fd), 0)))
    placebo_means, excess = [], []
    for b in range(windows.shape[1] if windows.ndim == 2 else 0):
        mean_b, var_b, n_b, _ = _weighted_mean_and_variance(windows[:, b], np.ones(len(fd)), groups)
        if n_b >= min_controls:
            placebo_means.append(mean_b)
            excess.append(mean_b**2 - var_b)
    if not placebo_means:
        return {**out, "estimate": estimate, "message": "spillover not estimable from forecasts: no placebo window to "
                                                        "measure the forecasts' common error on"}
    common_var = max(float(np.mean(excess)), 0.0)
    n_windows = len(placebo_means)
    se = float(np.sqrt(idio_var + common_var))
    df = float((idio_var + common_var) ** 2 / (idio_var**2 / (n_groups - 1) + common_var**2 / n_windows))
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    return {**out, "estimate": estimate, "se": se, "ci_low": estimate - half, "ci_high": estimate + half, "df": df,
            "common_sd": float(np.sqrt(common_var)), "placebo_mean": float(np.mean(placebo_means)),
            "n_placebo_windows": n_windows,
            "message": (f"assumes the {n_controls} controls would have followed their forecasts up to errors like those "
                        f"of {n_windows} placebo window(s) before the experiment (common error sd {np.sqrt(common_var):.3g})")}


def experiment_spillover(first_differences: pd.DataFrame, spec: ExperimentSpec, assignments: pd.DataFrame | None = None,
                         edges: pd.DataFrame | None = None, units: pd.DataFrame | None = None) -> dict:
    """The spillover figures of one between-product experiment, as `experiment_results` reports them.

    The reported estimate (`spillover_effect`, `spillover_se`, `spillover_ci_low/high`) is
    `spillover_from_forecasts`: it holds whether or not the graph found the substitutes. With the
    graph's exposure edges (and the published `assignments` and `units`), the design-based IPW
    contrast of `estimate_spillover` comes beside it (`spillover_ipw`, `spillover_ipw_se`,
    `exposure_counts`): it is exact when the graph is complete and pulled towards zero by every
    substitute it missed, so a gap between the two says the graph is missing spillover.
    Raises ValueError for a design that switches arms over time.
    """
    if spec.design not in DRAWN_ONCE_DESIGNS:
        raise ValueError(f"experiment '{spec.name}': spillover is estimated for between-product designs "
                         f"{DRAWN_ONCE_DESIGNS}; {spec.design!r} switches arms over time, so no product is a control throughout")
    forecast = spillover_from_forecasts(first_differences)
    out = {"spillover_effect": forecast["estimate"], "spillover_se": forecast["se"],
           "spillover_ci_low": forecast["ci_low"], "spillover_ci_high": forecast["ci_high"],
           "spillover_ipw": np.nan, "spillover_ipw_se": np.nan, "exposure_counts": {},
           "forecast": forecast, "message": forecast["message"], "ipw_message": "no graph snapshot in force at the start"}
    if edges is not None and assignments is not None and units is not None:
        try:
            ipw = estimate_spillover(first_differences, assignments, edges, spec, units=units)
        except ValueError as exc:
            out["ipw_message"] = f"not estimated: {exc}"
        else:
            out.update(spillover_ipw=ipw["spillover_effect"], spillover_ipw_se=ipw["spillover_se"],
                       exposure_counts=ipw["exposure_counts"], ipw_message=ipw["message"],
                       exposed_control_share=ipw["exposed_control_share"], stabilised_products=ipw["n_stabilised"])
    return out


SPILLOVER_COLUMNS = ("spillover_effect", "spillover_se", "spillover_ci_low", "spillover_ci_high", "spillover_ipw", "spillover_ipw_se")


def results_with_spillover(results: pd.DataFrame, first_differences: pd.DataFrame, specs: Sequence[ExperimentSpec],
                           assignments: pd.DataFrame, exposure_inputs: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict, list[str]]:
    """`results` (a copy) with the spillover columns of each between-product experiment filled on
    its primary metric's rows (`experiment_spillover`); `exposure_inputs`: name -> (edges, units) of
    the graph snapshot in force at its start, or missing when there is none. Returns the results,
    the products per exposure condition, a note per experiment and the warnings to log."""
    results = results.copy()
    rows, notes, warnings = [], {}, []
    estimated = set(results["experiment"])
    for spec in specs:
        if spec.name not in estimated:
            continue
        if spec.design not in DRAWN_ONCE_DESIGNS:
            notes[spec.name] = "not estimated: no product is a control throughout a design that switches arms over time"
            continue
        edges, units = exposure_inputs.get(spec.name, (None, None))
        primary = spec.all_metrics[0]  # the spillover is estimated on the primary metric and reported on its rows
        found = experiment_spillover(
            first_differences[(first_differences["experiment"] == spec.name) & (first_differences["metric"] == primary)],
            spec, assignments[assignments["experiment"] == spec.name], edges, units,
        )
        mask = (results["experiment"] == spec.name) & (results["metric"] == primary)
        for column in SPILLOVER_COLUMNS:
            results.loc[mask, column] = found[column]
        if found["ipw_message"].startswith("not estimated"):
            warnings.append(f"spillover IPW of '{spec.name}' {found['ipw_message']}")
        rows += [{"experiment": spec.name, "condition": c, "products": int(n)} for c, n in found["exposure_counts"].items()]
        notes[spec.name] = {key: found[key] for key in ("spillover_effect", "spillover_se", "spillover_ipw", "spillover_ipw_se",
                                                        "message", "ipw_message")}
    return results, pd.DataFrame(rows, columns=["experiment", "condition", "products"]), notes, warnings
