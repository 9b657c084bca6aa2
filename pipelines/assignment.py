"""Daily assignments for the four designs: deterministic, stateless, Spark DataFrame code.

A unit's arm is a pure function of (experiment name, seed, unit, period) through a stable hash
that any machine reproduces (`stable_uniform` is the same hash in pure Python, and
`first_group_draws` the same draw in numpy, for spillover redraws, the design advisor and the
benchmarks: this module is the rule's one home):

    u = conv(substr(sha2(concat_ws('|', name, seed, unit_id, period), 256), 1, 13), 16, 10) / 16**13

Randomisation is balanced and stratified: inside each stratum (the subclass) and period, units are
ordered by u and the first n_t = floor(n * treated_fraction + v) are treated, where v is a
uniform hashed from (name, seed, stratum, period, 'quota'). So the expected treated share is
exactly `treated_fraction` and every stratum is within one unit of it.

Periods: time_bound and triggered draw once ('experiment'); random_days draws per day (the ISO
date); crossover draws each unit's sequence once ('sequence': the first n_t units of a stratum
follow sequence A, treated in even phases, the others sequence B, treated in odd phases).

Triggered arms are drawn over the whole enrolment, not over the units already triggered, so an
event arriving later never changes an arm that was already published; balance is exact over the
enrolment and holds in expectation among triggered units. The enrolment itself (catalogue and
cluster snapshot) must be the one in force at the experiment's start.
"""
from __future__ import annotations

import hashlib
import io
from datetime import date, datetime, timedelta

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.experiments import ExperimentSpec, POPULATION_COLUMNS

ARM_TREATMENT = "treatment"
ARM_CONTROL = "control"
PERIOD_WHOLE_EXPERIMENT = "experiment"
PERIOD_CROSSOVER_SEQUENCE = "sequence"
QUOTA_TAG = "quota"
HASH_HEX_DIGITS = 13  # 52 bits: exact in a double and in a long
HASH_SCALE = float(16 ** HASH_HEX_DIGITS)
SOLO_UNIT_PREFIX = "product:"  # unit id of a product the cluster snapshot does not know

ASSIGNMENT_SCHEMA = T.StructType([
    T.StructField("date", T.DateType()),
    T.StructField("experiment", T.StringType()),
    T.StructField("product_id", T.StringType()),
    T.StructField("unit_id", T.StringType()),
    T.StructField("arm", T.StringType()),
    T.StructField("blackout", T.BooleanType()),
    T.StructField("price_change", T.DoubleType()),
])
ASSIGNMENT_COLUMNS = tuple(f.name for f in ASSIGNMENT_SCHEMA.fields)
UNITS_COLUMNS = ("product_id", "unit_id", "stratum")


# ----------------------------------------------------------------------------------------------
# The stable hash
# ----------------------------------------------------------------------------------------------

def stable_uniform(*parts) -> float:
    """Pure-Python twin of `hash_uniform`: the uniform in [0, 1) of '|'-joined parts."""
    key = "|".join(str(p) for p in parts)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return int(digest[:HASH_HEX_DIGITS], 16) / HASH_SCALE


_UNIFORM_CACHE: dict = {}  # (name, seed, period, units key) -> hashed uniforms; redraws repeat across calls


def _unit_uniforms(name: str, seed, unit_ids: np.ndarray, period: str) -> np.ndarray:
    key = (name, str(seed), period, hash(tuple(unit_ids)))
    row = _UNIFORM_CACHE.get(key)
    if row is None:
        if len(_UNIFORM_CACHE) > 20_000:
            _UNIFORM_CACHE.clear()
        row = np.array([stable_uniform(name, seed, unit, period) for unit in unit_ids])
        _UNIFORM_CACHE[key] = row
    return row


def first_group_draws(name: str, seeds, unit_ids, strata, period: str, treated_fraction: float) -> np.ndarray:
    """The balanced stratified draw in numpy: bool matrix (seeds x units), True = first group.

    The rule of `_balanced_first_group` (the module docstring) for any `seeds` (the published
    one, or the redraws of `pipelines.spillover`), in the order of `unit_ids` (one row per
    unit, with its stratum): inside each stratum the units with the smallest u (ties: unit_id)
    are the first group, up to floor(n * treated_fraction + v). Tests check it against Spark.
    """
    unit_ids = np.asarray(unit_ids, dtype=object).astype(str)
    strata = np.asarray(strata, dtype=object).astype(str)
    order = np.lexsort((unit_ids, strata))  # by stratum, then unit_id
    ids, groups = unit_ids[order], strata[order]
    seeds = list(seeds)
    first = np.zeros((len(seeds), len(ids)), dtype=bool)
    u = np.array([_unit_uniforms(name, s, ids, period) for s in seeds]).reshape(len(seeds), len(ids))
    bounds = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1], True])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        v = np.array([stable_uniform(name, s, groups[lo], period, QUOTA_TAG) for s in seeds])
        quota = np.floor((hi - lo) * float(treated_fraction) + v)
        # ids are sorted inside the stratum, so a stable sort on u breaks ties by unit_id
        rank = np.argsort(np.argsort(u[:, lo:hi], axis=1, kind="stable"), axis=1, kind="stable")
        first[:, lo:hi] = rank < quota[:, None]
    out = np.empty_like(first)
    out[:, order] = first
    return out


def hash_uniform(*parts) -> F.Column:
    """Spark column: a uniform in [0, 1) from sha256 of the '|'-joined parts (columns or literals)."""
    columns = [p if isinstance(p, F.Column) else F.lit(str(p)) for p in parts]
    digest = F.sha2(F.concat_ws("|", *columns), 256)
    as_long = F.conv(F.substring(digest, 1, HASH_HEX_DIGITS), 16, 10).cast("long")
    return as_long.cast("double") / F.lit(HASH_SCALE)


# ----------------------------------------------------------------------------------------------
# Enrolment
# ----------------------------------------------------------------------------------------------

def _population_filter(spec: ExperimentSpec) -> F.Column:
    condition = F.lit(True)
    for key, names in spec.population.items():
        condition = condition & F.col(POPULATION_COLUMNS[key]).cast("string").isin(list(names))
    return condition


def enrolment_units(spec: ExperimentSpec, catalog: DataFrame, clusters: DataFrame | None) -> DataFrame:
    """The population's products with their randomisation unit and stratum.

    Columns product_id, unit_id, stratum. For unit 'product' the unit is the product and the
    stratum its subclass. For unit 'cluster' the unit is the cluster_id from `clusters` (pass the
    snapshot in force at the experiment's start); only a cluster's in-population products are
    enrolled, together as one unit, with the subclass most of them share as stratum (ties: the
    smallest). A product the snapshot does not know is its own unit ('product:<id>').
    A subclass that holds a single cluster (a block randomised whole) cannot be balanced on its
    own, so such units share one stratum per category, 'pooled:<category>'.
    """
    products = (
        catalog.where(_population_filter(spec))
        .select(F.col("product_id").cast("string").alias("product_id"),
                F.col("subclass").cast("string").alias("subclass"),
                F.col("category").cast("string").alias("category"))
    )
    if spec.unit == "product":
        return products.select("product_id", F.col("product_id").alias("unit_id"),
                               F.col("subclass").alias("stratum"))
    if clusters is None:
        raise ValueError(
            f"experiment '{spec.name}' ({spec.source}): unit 'cluster' needs a product_clusters snapshot"
        )
    membership = clusters.select(F.col("product_id").cast("string").alias("product_id"),
                                 F.col("cluster_id").cast("string").alias("cluster_id"))
    enrolled = (
        products.join(membership, "product_id", "left")
        .withColumn("unit_id", F.coalesce("cluster_id", F.concat(F.lit(SOLO_UNIT_PREFIX), "product_id")))
    )
    by_share = Window.partitionBy("unit_id").orderBy(F.desc("n_products"), F.asc("subclass"))
    strata = (
        enrolled.groupBy("unit_id", "subclass").agg(F.count("*").alias("n_products"), F.min("category").alias("category"))
        .withColumn("rank", F.row_number().over(by_share))
        .where(F.col("rank") == 1)
        .select("unit_id", F.col("subclass").alias("stratum"), "category")
    )
    units_in_stratum = F.count(F.lit(1)).over(Window.partitionBy("stratum"))
    strata = strata.withColumn(
        "stratum", F.when(units_in_stratum == 1, F.concat(F.lit("pooled:"), F.col("category"))).otherwise(F.col("stratum"))
    ).drop("category")
    return enrolled.drop("category").join(strata, "unit_id").select(*UNITS_COLUMNS)


# ----------------------------------------------------------------------------------------------
# Balanced stratified draws
# ----------------------------------------------------------------------------------------------

def _balanced_first_group(spec: ExperimentSpec, units: DataFrame, period: F.Column) -> DataFrame:
    """Add `first_group` (bool): the unit is among the first n_t of its (stratum, period) by u."""
    seed = str(spec.seed)
    in_stratum = Window.partitionBy("stratum", "period")
    by_draw = in_stratum.orderBy("u", "unit_id")
    quota = F.floor(
        F.col("n_units") * F.lit(float(spec.treated_fraction))
        + hash_uniform(F.lit(spec.name), F.lit(seed), F.col("stratum"), F.col("period"), F.lit(QUOTA_TAG))
    )
    return (
        units.withColumn("period", period)
        .withColumn("u", hash_uniform(F.lit(spec.name), F.lit(seed), F.col("unit_id"), F.col("period")))
        .withColumn("n_units", F.count(F.lit(1)).over(in_stratum))
        .withColumn("draw_rank", F.row_number().over(by_draw))
        .withColumn("first_group", F.col("draw_rank") <= quota)
        .drop("u", "n_units", "draw_rank")
    )


def _distinct_units(units: DataFrame) -> DataFrame:
    """One row per unit with one stratum (the smallest given, should a caller pass several)."""
    return units.groupBy(F.col("unit_id").cast("string").alias("unit_id")).agg(
        F.min(F.coalesce(F.col("stratum").cast("string"), F.lit(""))).alias("stratum")
    )


def _as_date(value) -> date:
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


def _empty_assignments(spark: SparkSession) -> DataFrame:
    return spark.createDataFrame([], ASSIGNMENT_SCHEMA)


def _trigger_windows(spec: ExperimentSpec, units: DataFrame, trigger_events: DataFrame | None) -> DataFrame:
    """unit_id, window_start, window_end: from the unit's first `trigger_event` in [start, end]."""
    if trigger_events is None:
        raise ValueError(
            f"experiment '{spec.name}' ({spec.source}): a triggered design needs the trigger_events input"
        )
    events = (
        trigger_events
        .where((F.col("event") == F.lit(spec.trigger_event)))
        .select(F.col("product_id").cast("string").alias("product_id"),
                F.to_date("date").alias("event_date"))
        .where(F.col("event_date").between(F.lit(spec.start), F.lit(spec.end)))
    )
    last_window_day = F.date_add(F.col("window_start"), spec.duration_days - 1)
    return (
        units.select(F.col("product_id").cast("string").alias("product_id"),
                     F.col("unit_id").cast("string").alias("unit_id"))
        .join(events, "product_id")
        .groupBy("unit_id").agg(F.min("event_date").alias("window_start"))
        .withColumn("window_end", F.least(last_window_day, F.lit(spec.end)))
    )


def assign_days(
    spec: ExperimentSpec,
    units: DataFrame,
    dates: list[date],
    trigger_events: DataFrame | None = None,
) -> DataFrame:
    """The contract rows (date, experiment, product_id, unit_id, arm, blackout, price_change).

    `units` is `enrolment_units` output. Only `dates` inside the experiment (and, for triggered,
    inside each unit's window) produce rows; each day depends on nothing but the spec, the
    enrolment and the day, so days can be computed alone, in any order, anywhere. Blackout rows
    keep their arm's price change: the price engine still applies it; the analysis drops the day.
    Requires a triggered spec's `trigger_events` (product_id, date, event).
    """
    spark = units.sparkSession
    days = sorted({_as_date(d) for d in dates if spec.is_active_on(_as_date(d))})
    if not days:
        return _empty_assignments(spark)
    # The days as literals exploded onto each row: no join, no broadcast job, no Python worker.
    day_list = F.array(*[F.lit(d) for d in days])
    products = units.select(F.col("product_id").cast("string").alias("product_id"),
                            F.col("unit_id").cast("string").alias("unit_id"))
    # A product unit is one row already: draw on it directly (no shuffle to de-duplicate, no join
    # back). Clusters are drawn once per cluster, then joined back to their products.
    one_row_per_unit = spec.unit == "product"
    if one_row_per_unit:
        unit_table = units.select(
            F.col("product_id").cast("string").alias("product_id"),
            F.col("unit_id").cast("string").alias("unit_id"),
            F.coalesce(F.col("stratum").cast("string"), F.lit("")).alias("stratum"),
        )
    else:
        unit_table = _distinct_units(units)

    def with_products(frame: DataFrame) -> DataFrame:
        return frame if one_row_per_unit else frame.join(products, "unit_id")

    offset = F.datediff(F.col("date"), F.lit(spec.start))
    blackout = F.lit(False)
    if spec.design == "random_days":
        drawn = _balanced_first_group(
            spec, unit_table.withColumn("date", F.explode(day_list)), F.date_format("date", "yyyy-MM-dd")
        )
        product_days = with_products(drawn).withColumn("treated", F.col("first_group"))
    elif spec.design == "crossover":
        sequences = _balanced_first_group(spec, unit_table, F.lit(PERIOD_CROSSOVER_SEQUENCE))
        phase = F.floor(offset / F.lit(spec.phase_days))
        even_phase = F.pmod(phase, F.lit(2)) == 0
        product_days = (
            with_products(sequences).withColumn("date", F.explode(day_list))
            .withColumn("treated", F.col("first_group") == even_phase)  # A: even phases, B: odd
        )
        blackout = F.pmod(offset, F.lit(spec.phase_days)) < F.lit(spec.blackout_days)
    elif spec.design in ("time_bound", "triggered"):
        arms = _balanced_first_group(spec, unit_table, F.lit(PERIOD_WHOLE_EXPERIMENT))
        if spec.design == "triggered":
            arms = arms.join(_trigger_windows(spec, units, trigger_events), "unit_id")
        product_days = with_products(arms).withColumn("date", F.explode(day_list))
        if spec.design == "triggered":
            product_days = product_days.where(F.col("date").between(F.col("window_start"), F.col("window_end")))
        product_days = product_days.withColumn("treated", F.col("first_group"))
    else:
        raise ValueError(f"experiment '{spec.name}' ({spec.source}): unknown design {spec.design!r}")

    return (
        product_days.select(
            F.col("date").cast("date").alias("date"),
            F.lit(spec.name).alias("experiment"),
            "product_id",
            "unit_id",
            F.when(F.col("treated"), F.lit(ARM_TREATMENT)).otherwise(F.lit(ARM_CONTROL)).alias("arm"),
            blackout.alias("blackout"),
            F.when(F.col("treated"), F.lit(float(spec.price_change))).otherwise(F.lit(0.0))
            .cast("double").alias("price_change"),
        )
    )


def assign_experiments(
    specs: list[ExperimentSpec],
    units_by_experiment: dict[str, DataFrame],
    dates: list[date],
    trigger_events: DataFrame | None = None,
) -> DataFrame:
    """All experiments' rows for `dates`: the union over the specs active on any of them.

    Returns an empty DataFrame with the contract schema when none is active.
    """
    days = [_as_date(d) for d in dates]
    active = [s for s in specs if any(s.is_active_on(d) for d in days)]
    missing = [s.name for s in active if s.name not in units_by_experiment]
    if missing:
        raise ValueError(f"no enrolment units given for experiment(s): {', '.join(missing)}")
    parts = [assign_days(s, units_by_experiment[s.name], days, trigger_events) for s in active]
    if not parts:
        spark = next((u.sparkSession for u in units_by_experiment.values()), None)
        if spark is None:
            spark = SparkSession.getActiveSession()
        if spark is None:
            from pipelines.spark import get_spark

            spark = get_spark()
        return _empty_assignments(spark)
    result = parts[0]
    for part in parts[1:]:
        result = result.unionByName(part)
    return result


# ----------------------------------------------------------------------------------------------
# Picture
# ----------------------------------------------------------------------------------------------

CALENDAR_COLOURS = {  # the article's figures: red treatment, green control
    "absent": "#ffffff",
    "control": "#4caf50",
    "treatment": "#e53935",
    "blackout control": "#c8e6c9",
    "blackout treatment": "#ffcdd2",
}


def _guess_design(frame: pd.DataFrame) -> str:
    if frame["blackout"].any():
        return "crossover"
    first_days = frame.groupby("unit_id")["date"].min()
    if first_days.nunique() > 1:
        return "triggered"
    if (frame.groupby("unit_id")["arm"].nunique() > 1).any():
        return "random_days"
    return "time_bound"


def assignment_calendar_png(
    assignments: pd.DataFrame, experiment: str, max_units: int = 40, design: str | None = None
) -> bytes:
    """A PNG calendar like the article's figures: units (rows) x days (columns).

    Treatment red, control green, blackout days in pale versions of the arm's colour, days
    without a row white. At most `max_units` units (ordered by first day, then unit id). The title
    names the experiment and its design (given, or guessed from the pattern when omitted).
    """
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend state touched
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    frame = assignments.loc[assignments["experiment"] == experiment,
                            ["date", "unit_id", "arm", "blackout"]].copy()
    if frame.empty:
        raise ValueError(f"no assignments for experiment '{experiment}'")
    frame["date"] = pd.to_datetime(frame["date"]).dt.date
    frame = frame.drop_duplicates(["date", "unit_id"])
    design = design or _guess_design(frame)

    order = frame.groupby("unit_id")["date"].min().reset_index().sort_values(["date", "unit_id"])
    units = list(order["unit_id"].head(max_units))
    first_day, last_day = min(frame["date"]), max(frame["date"])
    days = [first_day + timedelta(days=i) for i in range((last_day - first_day).days + 1)]

    labels = list(CALENDAR_COLOURS)
    frame = frame[frame["unit_id"].isin(units)]
    code = np.where(frame["arm"] == ARM_TREATMENT, labels.index("treatment"), labels.index("control"))
    code = code + np.where(frame["blackout"].astype(bool), 2, 0)
    row = frame["unit_id"].map({u: i for i, u in enumerate(units)}).to_numpy()
    col = np.array([(d - first_day).days for d in frame["date"]])
    grid = np.zeros((len(units), len(days)), dtype=int)
    grid[row, col] = code

    fig = Figure(figsize=(min(4 + 0.12 * len(days), 16), min(2 + 0.22 * len(units), 12)))
    ax = fig.subplots()
    ax.imshow(grid, cmap=ListedColormap([CALENDAR_COLOURS[k] for k in labels]), vmin=0,
              vmax=len(labels) - 1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(units)))
    ax.set_yticklabels(units, fontsize=6)
    step = max(1, len(days) // 12)
    ax.set_xticks(range(0, len(days), step))
    ax.set_xticklabels([days[i].isoformat() for i in range(0, len(days), step)], rotation=45,
                       ha="right", fontsize=7)
    ax.set_xlabel("day")
    ax.set_ylabel("unit")
    n_all = assignments.loc[assignments["experiment"] == experiment, "unit_id"].nunique()
    shown = f" (first {len(units)} of {n_all} units)" if n_all > len(units) else ""
    ax.set_title(f"{experiment}: {design}{shown}")
    present = set(np.unique(grid[grid > 0]))
    handles = [Patch(facecolor=CALENDAR_COLOURS[k], edgecolor="grey", label=k)
               for i, k in enumerate(labels) if i > 0 and (i in present or i <= 2)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
