"""Assignments: deterministic, balanced per stratum, and exactly the four designs' calendars."""
from __future__ import annotations

import math
import struct
import zlib
from datetime import date, timedelta
from functools import reduce

import pandas as pd
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.assignment import (
    ASSIGNMENT_COLUMNS,
    QUOTA_TAG,
    assign_days,
    assign_experiments,
    assignment_calendar_png,
    enrolment_units,
    first_group_draws,
    hash_uniform,
    stable_uniform,
)
from pipelines.experiments import ExperimentSpec

SUBCLASSES = [("kitchen", "knives"), ("kitchen", "pans"), ("garden", "hoses"), ("garden", "seeds")]
START = date(2025, 6, 1)


def days(first: date, n: int) -> list[date]:
    return [first + timedelta(days=i) for i in range(n)]


def spec(**changes) -> ExperimentSpec:
    fields = dict(name="exp", design="time_bound", start=START, end=START + timedelta(days=9),
                  unit="product", treated_fraction=0.5, price_change=-0.05, seed=7, source="t.yaml")
    fields.update(changes)
    return ExperimentSpec(**fields)


@pytest.fixture(scope="module")
def catalog_pd() -> pd.DataFrame:
    """4 subclasses x 25 products: p{s}{i:02d}."""
    return pd.DataFrame([
        {"product_id": f"p{s}{i:02d}", "category": category, "subclass": subclass}
        for s, (category, subclass) in enumerate(SUBCLASSES) for i in range(25)
    ])


@pytest.fixture(scope="module")
def catalog(spark, catalog_pd):
    return spark.createDataFrame(catalog_pd)


@pytest.fixture(scope="module")
def clusters(spark, catalog_pd):
    """Mostly 5 products of one subclass per cluster, with a few deliberate oddities:
    p000 sits in a pans cluster (majority pans), 'tie' holds one knife and one pan,
    p324 is in no cluster at all (a product the snapshot does not know)."""
    rows = []
    for pid in catalog_pd["product_id"]:
        s, i = int(pid[1]), int(pid[2:])
        rows.append((pid, f"c{s}{i // 5}"))
    moved = {"p000": "c10", "p001": "tie", "p101": "tie"}
    rows = [(pid, moved.get(pid, cid)) for pid, cid in rows if pid != "p324"]
    return spark.createDataFrame(pd.DataFrame(rows, columns=["product_id", "cluster_id"]))


@pytest.fixture(scope="module")
def product_units(catalog):
    return enrolment_units(spec(), catalog, None).cache()


@pytest.fixture(scope="module")
def cluster_units(catalog, clusters):
    return enrolment_units(spec(unit="cluster"), catalog, clusters).cache()


def collect(df) -> pd.DataFrame:
    frame = df.toPandas()
    return frame.sort_values(["experiment", "date", "product_id"]).reset_index(drop=True)


def test_enrolment_of_products_follows_the_population(catalog, product_units):
    units = product_units.toPandas()
    assert len(units) == 100 and (units["unit_id"] == units["product_id"]).all()
    assert units.set_index("product_id").loc["p205", "stratum"] == "hoses"
    kitchen = enrolment_units(spec(population={"categories": ["kitchen"]}), catalog, None).toPandas()
    assert sorted(kitchen["stratum"].unique()) == ["knives", "pans"] and len(kitchen) == 50


def test_enrolment_of_clusters(catalog, clusters, cluster_units):
    units = cluster_units.toPandas().set_index("product_id")
    assert len(units) == 100
    assert units.loc["p000", "unit_id"] == "c10" and units.loc["p000", "stratum"] == "pans"  # majority
    assert units.loc["p001", "stratum"] == units.loc["p101", "stratum"] == "knives"  # tie -> smallest
    assert units.loc["p324", "unit_id"] == "product:p324"  # unknown to the snapshot: its own unit
    # a cluster partly inside the population: only its in-population products, still one unit
    knives = enrolment_units(spec(unit="cluster", population={"subclasses": ["knives"]}), catalog, clusters)
    knives = knives.toPandas().set_index("product_id")
    assert len(knives) == 25 and knives.loc["p000", "unit_id"] == "c10"
    assert knives.loc["p001", "unit_id"] == "tie" and "p101" not in knives.index
    assert knives.loc["p000", "stratum"] == "knives"  # its only in-population product is a knife
    with pytest.raises(ValueError, match="needs a product_clusters snapshot"):
        enrolment_units(spec(unit="cluster"), catalog, None)


@pytest.mark.parametrize("design, extra", [
    ("time_bound", {}),
    ("random_days", {}),
    ("crossover", {"phase_days": 2, "blackout_days": 1}),
])
def test_days_alone_in_any_order_equal_the_whole_range(product_units, design, extra):
    experiment = spec(design=design, **extra)
    dates = days(START - timedelta(days=1), 4)  # the day before the start produces nothing
    whole = collect(assign_days(experiment, product_units, dates))
    one_by_one = reduce(
        lambda a, b: a.unionByName(b),
        [assign_days(experiment, product_units, [d]) for d in reversed(dates)],
    )
    reversed_range = collect(assign_days(experiment, product_units, list(reversed(dates))))
    assert len(whole) == 100 * 3
    pd.testing.assert_frame_equal(whole, collect(one_by_one))
    pd.testing.assert_frame_equal(whole, reversed_range)
    assert whole["date"].min() == START


def test_contract_schema_and_price_change_per_arm(product_units):
    out = assign_days(spec(price_change=0.04), product_units, days(START, 2))
    assert tuple(out.columns) == ASSIGNMENT_COLUMNS
    types = dict(out.dtypes)
    assert types == {"date": "date", "experiment": "string", "product_id": "string", "unit_id": "string",
                     "arm": "string", "blackout": "boolean", "price_change": "double"}
    frame = out.toPandas()
    assert set(frame["arm"]) == {"treatment", "control"} and not frame["blackout"].any()
    assert (frame.loc[frame["arm"] == "treatment", "price_change"] == 0.04).all()
    assert (frame.loc[frame["arm"] == "control", "price_change"] == 0.0).all()


def test_time_bound_is_balanced_per_stratum_and_fixed_over_time(spark, product_units, cluster_units):
    checks = []
    for seed in range(2):
        for fraction in (0.3, 0.5):
            for kind, units in (("product", product_units), ("cluster", cluster_units)):
                experiment = spec(seed=seed, treated_fraction=fraction, name=f"s{seed}", unit=kind)
                out = assign_days(experiment, units, [START, START + timedelta(days=5)])
                checks.append(out.withColumn("fraction", F.lit(fraction)).withColumn("kind", F.lit(kind)))
    frame = reduce(lambda a, b: a.unionByName(b), checks).toPandas()
    strata = pd.concat([product_units.toPandas(), cluster_units.toPandas()]).drop_duplicates("unit_id")
    frame = frame.merge(strata[["unit_id", "stratum"]], on="unit_id")
    # one arm per unit for the whole experiment
    assert (frame.groupby(["kind", "experiment", "fraction", "unit_id"])["arm"].nunique() == 1).all()
    units = frame.drop_duplicates(["kind", "experiment", "fraction", "unit_id"])
    per_stratum = units.groupby(["kind", "experiment", "fraction", "stratum"]).agg(
        n=("unit_id", "size"), treated=("arm", lambda a: (a == "treatment").sum()))
    expected = per_stratum["n"] * per_stratum.index.get_level_values("fraction")
    assert ((per_stratum["treated"] - expected).abs() <= 1).all()
    # the draw actually depends on the seed
    treated_sets = units[(units["kind"] == "product") & (units["arm"] == "treatment")].groupby(
        ["experiment", "fraction"])["unit_id"].apply(frozenset)
    assert treated_sets.nunique() == len(treated_sets)


def test_random_days_balanced_per_day_and_varying(product_units):
    experiment = spec(design="random_days", treated_fraction=0.4)
    frame = collect(assign_days(experiment, product_units, days(START, 10)))
    frame["stratum"] = frame["product_id"].str[1]
    treated = frame.assign(t=frame["arm"] == "treatment").groupby(["date", "stratum"])["t"].sum()
    assert ((treated - 25 * 0.4).abs() <= 1).all()
    # different units treated on different days, and most products switch arm at least once
    daily_sets = frame[frame["arm"] == "treatment"].groupby("date")["product_id"].apply(frozenset)
    assert daily_sets.nunique() == 10
    assert (frame.groupby("product_id")["arm"].nunique() == 2).mean() > 0.9


def test_crossover_phases_swap_and_blackout_starts_each_phase(product_units):
    experiment = spec(design="crossover", phase_days=4, blackout_days=2, end=START + timedelta(days=11))
    frame = collect(assign_days(experiment, product_units, days(START, 12)))
    frame["offset"] = frame["date"].map(lambda d: (d - START).days)
    frame["phase"] = frame["offset"] // 4
    assert (frame["blackout"] == (frame["offset"] % 4 < 2)).all()
    arms = frame.groupby(["product_id", "phase"])["arm"].agg(lambda a: set(a))
    assert (arms.map(len) == 1).all()  # constant inside a phase
    arm = arms.map(lambda s: next(iter(s))).unstack("phase")
    assert (arm[0] != arm[1]).all() and (arm[0] == arm[2]).all()  # swaps exactly, every phase
    sequence_a = arm[0] == "treatment"
    per_stratum = sequence_a.groupby(arm.index.str[1]).sum()
    assert ((per_stratum - 12.5).abs() <= 1).all()


def test_triggered_windows(spark, catalog, clusters, product_units):
    experiment = spec(design="triggered", trigger_event="competitor_discount", duration_days=3,
                      end=START + timedelta(days=9))
    d = lambda k: START + timedelta(days=k)  # noqa: E731
    events = spark.createDataFrame(pd.DataFrame([
        ("p000", d(-1), "competitor_discount"),  # before start: ignored ...
        ("p000", d(2), "competitor_discount"),   # ... so the window starts here
        ("p000", d(5), "competitor_discount"),   # later events do not restart it
        ("p001", d(1), "stockout"),              # another event type: ignored
        ("p002", d(8), "competitor_discount"),   # clipped at the end (days 8, 9)
        ("p003", d(12), "competitor_discount"),  # after the end: never enrolled
        ("p100", d(0), "competitor_discount"),   # c10 holds p000 and p100: earliest event wins
        ("p105", d(4), "competitor_discount"),
    ], columns=["product_id", "date", "event"]))
    frame = collect(assign_days(experiment, product_units, days(START, 10), events))
    windows = frame.groupby("product_id")["date"].agg(["min", "max", "size"])
    assert windows.to_dict("index") == {
        "p000": {"min": d(2), "max": d(4), "size": 3},
        "p002": {"min": d(8), "max": d(9), "size": 2},
        "p100": {"min": d(0), "max": d(2), "size": 3},
        "p105": {"min": d(4), "max": d(6), "size": 3},
    }
    assert (frame.groupby("product_id")["arm"].nunique() == 1).all()
    # cluster units: the window of a cluster starts at the earliest event of any of its products
    cluster_experiment = spec(design="triggered", trigger_event="competitor_discount", duration_days=3,
                              unit="cluster", end=START + timedelta(days=9))
    units = enrolment_units(cluster_experiment, catalog, clusters)
    by_cluster = collect(assign_days(cluster_experiment, units, days(START, 10), events))
    c10 = by_cluster[by_cluster["unit_id"] == "c10"]
    assert set(c10["product_id"]) == {"p000", "p100", "p102", "p103", "p104"}
    assert set(c10["date"]) == {d(0), d(1), d(2)}
    assert set(by_cluster["unit_id"]) == {"c10", "c00", "c11"}  # c00 holds p002, c11 holds p105
    assert set(by_cluster.loc[by_cluster["unit_id"] == "c00", "date"]) == {d(8), d(9)}
    # a day computed alone agrees, and arms do not depend on which units were triggered
    alone = collect(assign_days(experiment, product_units, [d(4)], events))
    pd.testing.assert_frame_equal(alone, frame[frame["date"] == d(4)].reset_index(drop=True))
    time_bound = collect(assign_days(spec(), product_units, [START])).set_index("product_id")["arm"]
    assert (frame.set_index("product_id")["arm"] == time_bound.reindex(frame["product_id"])).all()
    with pytest.raises(ValueError, match="needs the trigger_events"):
        assign_days(experiment, product_units, [START])


def test_clusters_keep_one_arm_on_every_day(cluster_units):
    for design, extra in [("random_days", {}), ("crossover", {"phase_days": 3, "blackout_days": 1})]:
        experiment = spec(design=design, unit="cluster", **extra)
        frame = collect(assign_days(experiment, cluster_units, days(START, 6)))
        assert len(frame) == 100 * 6
        assert (frame.groupby(["date", "unit_id"])["arm"].nunique() == 1).all()
        assert (frame.groupby(["date", "unit_id"])["blackout"].nunique() == 1).all()


def test_hash_is_reproducible_in_pure_python(spark, product_units):
    name, seed, unit_id, period = "exp", 7, "p013", "2025-06-03"
    spark_value = spark.range(1).select(
        hash_uniform(F.lit(name), F.lit(str(seed)), F.lit(unit_id), F.lit(period)).alias("u")
    ).first()["u"]
    assert spark_value == stable_uniform(name, seed, unit_id, period)
    assert 0 <= spark_value < 1
    # the whole time_bound draw of a stratum, re-derived from the documented rule in pure Python
    experiment = spec(treated_fraction=0.3)
    arms = collect(assign_days(experiment, product_units, [START])).set_index("product_id")["arm"]
    stratum = [f"p2{i:02d}" for i in range(25)]  # hoses
    ordered = sorted(stratum, key=lambda p: (stable_uniform("exp", 7, p, "experiment"), p))
    quota = math.floor(25 * 0.3 + stable_uniform("exp", 7, "hoses", "experiment", QUOTA_TAG))
    assert {p for p in stratum if arms[p] == "treatment"} == set(ordered[:quota])


def test_assign_experiments_unions_the_active_ones(spark, product_units, catalog):
    kitchen = spec(name="kitchen", population={"categories": ["kitchen"]})
    garden = spec(name="garden", design="random_days", population={"categories": ["garden"]},
                  start=START + timedelta(days=5))
    units = {s.name: enrolment_units(s, catalog, None) for s in (kitchen, garden)}
    frame = collect(assign_experiments([kitchen, garden], units, [START, START + timedelta(days=6)]))
    counts = frame.groupby(["experiment", "date"]).size().to_dict()
    assert counts == {("garden", START + timedelta(days=6)): 50, ("kitchen", START): 50,
                      ("kitchen", START + timedelta(days=6)): 50}
    none = assign_experiments([kitchen, garden], units, [date(2024, 1, 1)])
    assert none.count() == 0 and none.schema["date"].dataType == T.DateType()
    assert tuple(none.columns) == ASSIGNMENT_COLUMNS
    with pytest.raises(ValueError, match="kitchen"):
        assign_experiments([kitchen], {}, [START])


def test_calendar_png_is_a_valid_png(product_units):
    experiment = spec(design="crossover", phase_days=4, blackout_days=1)
    frame = assign_days(experiment, product_units, days(START, 10)).toPandas()
    png = assignment_calendar_png(frame, "exp", max_units=30, design="crossover")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", png[8:16])
    width, height = struct.unpack(">II", png[16:24])
    assert kind == b"IHDR" and length == 13 and width > 200 and height > 200
    assert zlib.crc32(png[12:29]) == struct.unpack(">I", png[29:33])[0]
    assert png.endswith(b"IEND\xaeB`\x82")
    with pytest.raises(ValueError, match="no assignments"):
        assignment_calendar_png(frame, "other")


# ----------------------------------------------------------------------------------------------
# Determinism across processes
# ----------------------------------------------------------------------------------------------

OTHER_PROCESS_SCRIPT = '''
"""Recompute the assignments in a fresh process: own JVM, one core, other shuffle partitions,
no adaptive execution, other PYTHONHASHSEED; experiments in reverse order, each day computed
alone, latest first."""
import json, sys
from datetime import date
from functools import reduce
from pathlib import Path

import pandas as pd

from pipelines.assignment import assign_days, enrolment_units
from pipelines.experiments import frame_to_specs
from pipelines.spark import get_spark

workdir = Path(sys.argv[1])
spark = get_spark(master="local[1]", app_name="pricelab-other-process",
                  conf={"spark.sql.shuffle.partitions": "1", "spark.default.parallelism": "1",
                        "spark.driver.memory": "1g", "spark.sql.adaptive.enabled": "false"})
table = lambda name: spark.createDataFrame(pd.read_parquet(workdir / f"{name}.parquet"))
catalog, clusters, events = table("catalog"), table("clusters"), table("events")
specs = frame_to_specs(pd.read_parquet(workdir / "specs.parquet"))
days = [date.fromisoformat(d) for d in json.loads((workdir / "days.json").read_text())]
parts = []
for spec in reversed(specs):
    units = enrolment_units(spec, catalog, clusters if spec.unit == "cluster" else None).cache()  # as if frozen
    parts += [assign_days(spec, units, [day], events) for day in reversed(days)]
reduce(lambda a, b: a.unionByName(b), parts).toPandas().to_parquet(workdir / "assignments.parquet")
spark.stop()
'''


def determinism_specs() -> list[ExperimentSpec]:
    """Every design for product and cluster units, with varied seeds and treated shares."""
    extras = {
        "time_bound": {},
        "triggered": {"trigger_event": "competitor_discount", "duration_days": 2},
        "random_days": {},
        "crossover": {"phase_days": 2, "blackout_days": 1},
    }
    return [
        spec(name=f"{design.replace('_', '-')}-{unit}", design=design, unit=unit, seed=11 + i,
             treated_fraction=(0.3, 0.5)[i % 2], end=START + timedelta(days=4), **extra)
        for i, (design, extra) in enumerate(extras.items()) for unit in ("product", "cluster")
    ]


@pytest.mark.slow  # a second JVM: ~30 s on a quiet 2-core machine, minutes when it is loaded
def test_same_rows_in_another_process_and_in_reverse_day_order(tmp_path, spark, catalog_pd, catalog, clusters):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pipelines.experiments import specs_to_frame

    specs = determinism_specs()
    # the day before the start (no rows), the first day, and the first day of the second phase
    dates = [START - timedelta(days=1), START, START + timedelta(days=2)]
    events_pd = pd.DataFrame(
        [("p000", START + timedelta(days=1), "competitor_discount"), ("p213", START, "competitor_discount"),
         ("p310", START + timedelta(days=2), "competitor_discount"), ("p101", START, "stockout")],
        columns=["product_id", "date", "event"],
    )
    catalog_pd.to_parquet(tmp_path / "catalog.parquet")
    clusters.toPandas().to_parquet(tmp_path / "clusters.parquet")
    events_pd.to_parquet(tmp_path / "events.parquet")
    specs_to_frame(specs).to_parquet(tmp_path / "specs.parquet")
    (tmp_path / "days.json").write_text(json.dumps([d.isoformat() for d in dates]))
    (tmp_path / "other_process.py").write_text(OTHER_PROCESS_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    # the other process runs while this one computes its own answer
    other = subprocess.Popen([sys.executable, str(tmp_path / "other_process.py"), str(tmp_path)], cwd=root,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events = spark.createDataFrame(events_pd)
        parts = [
            assign_days(s, enrolment_units(s, catalog, clusters if s.unit == "cluster" else None), dates, events)
            for s in specs
        ]
        here = collect(reduce(lambda a, b: a.unionByName(b), parts))
        _, stderr = other.communicate(timeout=600)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode == 0, stderr[-3000:]
    there = pd.read_parquet(tmp_path / "assignments.parquet")
    there = there.sort_values(["experiment", "date", "product_id"]).reset_index(drop=True)
    # the comparison is not vacuous: every experiment produced rows, both arms, on its days only
    assert set(here["experiment"]) == {s.name for s in specs}
    assert set(here["arm"]) == {"treatment", "control"} and here["blackout"].any()
    assert set(here["date"]) == {START, START + timedelta(days=2)}
    # 100 products x 2 days; triggered: 3 windows, each on 1 computed day, of 1 product or a 5-product cluster
    expected_rows = {s.name: 200 for s in specs} | {"triggered-product": 3, "triggered-cluster": 15}
    assert here.groupby("experiment").size().to_dict() == expected_rows
    pd.testing.assert_frame_equal(here, there, check_exact=True)


def test_the_numpy_draw_is_the_published_one_for_every_period(spark, catalog, catalog_pd):
    """`first_group_draws` (spillover redraws, the advisor and the benchmarks use it) gives the
    arms `assign_days` publishes: per day for random days, per sequence for a crossover, once
    for a time-bound design; in any order of the units."""
    shuffled = catalog_pd.sample(frac=1.0, random_state=3)
    for design, extra in (("random_days", {}), ("crossover", {"phase_days": 2}), ("time_bound", {})):
        s = spec(design=design, treated_fraction=0.3, **extra)
        published = assign_days(s, enrolment_units(s, catalog, None), days(START, 4)).toPandas()
        for day, rows in published.groupby("date"):
            period = {"random_days": pd.Timestamp(day).date().isoformat(), "crossover": "sequence",
                      "time_bound": "experiment"}[design]
            first = first_group_draws(s.name, [s.seed], shuffled["product_id"], shuffled["subclass"], period, 0.3)[0]
            drawn = pd.Series(first, index=shuffled["product_id"].to_numpy())
            treated = rows.set_index("product_id")["arm"].eq("treatment")
            if design == "crossover":  # sequence A (the first group) is treated in even phases
                even_phase = ((pd.Timestamp(day).date() - START).days // 2) % 2 == 0
                treated = treated == even_phase
            assert (drawn.reindex(treated.index) == treated).all(), (design, day)
