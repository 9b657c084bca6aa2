"""Design advisor: proposals, replays through pipelines.assignment, A/A calibration, carryover."""
from __future__ import annotations

import warnings
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from pipelines import advisor, simulation
from pipelines.experiments import ExperimentFileError, ExperimentSpec

BASE = {"name": "cut5", "start": "2026-02-02", "end": "2026-02-22", "treatment": {"price_change": -0.05}, "seed": 3}


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path / name


# ---------------------------------------------------------------------------------------------- proposals

def test_proposal_defaults_every_design_and_unit_but_triggered_needs_its_event():
    proposal = advisor.parse_proposal_mapping(dict(BASE), "p.yaml")
    assert {(c.design, c.unit) for c in proposal.candidates} == {
        (d, u) for d in ("time_bound", "random_days", "crossover") for u in ("product", "cluster")}
    assert proposal.alpha == 0.05 and proposal.power == 0.8 and proposal.expected_effect is None
    assert any("trigger_event" in n for n in proposal.notes)


def test_proposal_lists_of_candidates_and_blackouts():
    raw = {**BASE, "design": ["crossover", "time_bound"], "unit": "cluster", "blackout_days": [0, 3],
           "phase_days": 7, "expected_effect": 0.04, "alpha": 0.1, "power": 0.9}
    proposal = advisor.parse_proposal_mapping(raw, "p.yaml")
    got = [(c.design, c.unit, c.blackout_days) for c in proposal.candidates]
    assert got == [("crossover", "cluster", 0), ("crossover", "cluster", 3), ("time_bound", "cluster", None)]
    assert (proposal.expected_effect, proposal.alpha, proposal.power) == (0.04, 0.1, 0.9)


@pytest.mark.parametrize("text, field", [
    ("design: [time_bound, zigzag]\n", "design"),
    ("alpha: 1.5\n", "alpha"),
    ("power: yes\n", "power"),
    ("expected_effect: 0\n", "expected_effect"),
    ("colour: red\n", "colour"),
    ("blackout_days: [3, 30]\nphase_days: 14\ndesign: crossover\n", "blackout_days"),
    ("unit: []\n", "unit"),
])
def test_bad_proposal_is_one_line_naming_file_and_field(tmp_path, text, field):
    body = "name: cut5\nstart: 2026-02-02\nend: 2026-02-22\ntreatment: {price_change: -0.05}\nseed: 3\n" + text
    path = _write(tmp_path, "bad.yaml", body)
    with pytest.raises(ExperimentFileError) as caught:
        advisor.parse_proposal_file(path)
    message = str(caught.value)
    assert "\n" not in message and "bad.yaml" in message and f"'{field}'" in message


def test_load_proposals_keeps_the_good_files(tmp_path):
    _write(tmp_path, "a.yaml", "name: a\nstart: 2026-02-02\nend: 2026-02-22\ntreatment: {price_change: -0.05}\nseed: 3\n")
    _write(tmp_path, "b.yaml", "name: b\nstart: 2026-02-22\nend: 2026-02-02\ntreatment: {price_change: -0.05}\nseed: 3\n")
    proposals, errors = advisor.load_proposals(tmp_path)
    assert [p.name for p in proposals] == ["a"]
    assert len(errors) == 1 and "b.yaml" in str(errors[0]) and "'end'" in str(errors[0])


# ---------------------------------------------------------------------------------------------- a small market

@pytest.fixture(scope="module")
def market():
    warnings.simplefilter("ignore")
    config = simulation.regime_config("weak", n_products=240, n_subclasses=8, carryover_decay=0.0, history_days=300)
    world = simulation.simulate_market(config)
    sales, triggers = simulation.simulate_history(world)
    clusters = pd.DataFrame({"product_id": world.products["product_id"].astype(str),
                             "cluster_id": "G" + world.products["true_group"].astype(str)})
    return world, sales, triggers, clusters


def _spec(design: str, unit: str = "product", days: int = 21, **extra) -> ExperimentSpec:
    start = simulation.MarketConfig().history_start + timedelta(days=400)
    return ExperimentSpec(name="adv", design=design, start=start, end=start + timedelta(days=days - 1), unit=unit,
                          price_change=-0.05, seed=5, **extra)


def test_replays_are_the_assignment_rule_balanced_per_stratum_and_independent(spark, market):
    world, sales, triggers, clusters = market
    history = advisor.build_history(sales, world.catalog)
    replays = advisor.replay_candidate(spark, _spec("time_bound"), history, world.catalog, clusters, triggers, 30)
    treated = (replays.role == 1).any(axis=2)  # replays x products
    strata = history.subclass[replays.rows]
    for s in np.unique(strata):
        counts = treated[:, strata == s].sum(axis=1)
        assert np.all(np.abs(counts - 0.5 * (strata == s).sum()) <= 1)
    assert len({tuple(r) for r in treated}) == 30  # every replay its own draw
    crossover = advisor.replay_candidate(spark, _spec("crossover", phase_days=7, blackout_days=2), history,
                                         world.catalog, clusters, triggers, 5)
    role = crossover.role[0]
    assert (role[:, [0, 1, 7, 8, 14, 15]] == -1).all()  # blackout days are not analysed
    assert ((role[:, 2] == 1) == (role[:, 9] == 0)).all()  # sequences swap every phase


def test_aa_rejection_and_calibration_floors(spark, market):
    world, sales, triggers, clusters = market
    history = advisor.build_history(sales, world.catalog)
    proposal = advisor.Proposal(name="adv", source="t", candidates=(_spec("time_bound"), _spec("random_days")))
    table, evidence = advisor.advise(spark, proposal, advisor.AdviceInputs(sales, world.catalog, clusters, None, triggers),
                                     n_replays=80, n_calibration=2, calibration_products=120, history=history)
    assert list(table.columns) == list(advisor.ADVICE_COLUMNS)
    assert table["recommended"].sum() == 1 and table["reason"].str.len().max() > 20
    assert (table["aa_rejection_rate"] <= 0.15).all()  # floors: alpha 5%, 80 replays
    assert table["calibration_ratio"].between(0.5, 2.0).all() and (table["calibration_replays"] == 2).all()
    assert (table["predicted_se"] > 0).all() and np.isfinite(table["mde_rel"]).all()
    assert evidence["carryover"]["blackout_days"] == 0


def _history_with_past_experiment(spark, carryover: float):
    config = simulation.regime_config("weak", n_products=200, n_subclasses=8, carryover_decay=carryover, history_days=200)
    world = simulation.simulate_market(config)
    start = config.history_start + timedelta(days=60)
    past = ExperimentSpec(name="past", design="random_days", start=start, end=start + timedelta(days=41),
                          population={"categories": list(config.categories[:3])}, price_change=-0.2, seed=11)
    from pipelines import assignment

    units = assignment.enrolment_units(past, spark.createDataFrame(world.catalog[["product_id", "category", "subclass"]]), None)
    a = assignment.assign_days(past, units, [past.start + timedelta(days=i) for i in range(past.n_days)]).toPandas()
    sales = simulation.simulate_sales(world, a, config.history_start, config.history_end)
    return advisor.build_history(sales, world.catalog, past_assignments=a)


def test_carryover_from_past_experiments_sets_the_blackout(spark):
    on = advisor.carryover_from_history(_history_with_past_experiment(spark, 0.5))
    assert on["source"] == "past experiments"
    assert on["blackout_days"] >= 3  # true half-life 1 day, x 3
    off = advisor.carryover_from_history(_history_with_past_experiment(spark, 0.0))
    assert off["blackout_days"] == 0 and off["carryover_days"] == 0


def test_carryover_bias_formulas():
    assert advisor.carryover_bias("random_days", 0.5, None, None) == pytest.approx(-1 / 3)
    assert advisor.carryover_bias("crossover", 0.5, 14, 7) > advisor.carryover_bias("crossover", 0.5, 14, 0)
    assert advisor.carryover_bias("time_bound", 0.5, None, None) == 0.0
