"""Experiment files: every refusal names file, field and reason; good files parse exactly."""
from __future__ import annotations

import pickle
import textwrap
from datetime import date

import pandas as pd
import pyarrow as pa
import pytest

from pipelines.experiments import (
    ExperimentFileError,
    ExperimentSpec,
    frame_to_specs,
    load_experiments,
    parse_experiment_file,
    population_products,
    spec_fingerprint,
    specs_to_frame,
)

GOOD = """\
name: crossover-demo
design: crossover
start: 2025-06-01
end: 2025-07-12
unit: cluster
population:
  categories: [kitchen]
treated_fraction: 0.5
treatment: {price_change: -0.05}
phase_days: 14
blackout_days: 7
metric: units
seed: 7
"""

MINIMAL = {
    "name": "tb",
    "design": "time_bound",
    "start": "2025-02-01",
    "end": "2025-02-28",
    "treatment": "{price_change: 0.03}",
    "seed": "1",
}


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    """4 subclasses x 25 products in 2 categories."""
    rows = []
    for s, (category, subclass) in enumerate(
        [("kitchen", "knives"), ("kitchen", "pans"), ("garden", "hoses"), ("garden", "seeds")]
    ):
        for i in range(25):
            rows.append({"product_id": f"p{s}{i:02d}", "category": category, "subclass": subclass})
    return pd.DataFrame(rows)


def write(directory, file_name: str, text: str):
    path = directory / file_name
    path.write_text(textwrap.dedent(text))
    return path


def minimal(**changes) -> str:
    """A valid time_bound file with some fields changed (None drops a field)."""
    fields = dict(MINIMAL)
    fields.update(changes)
    return "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None)


def refusal(tmp_path, text: str, file_name: str = "tb.yaml") -> ExperimentFileError:
    path = write(tmp_path, file_name, text)
    with pytest.raises(ExperimentFileError) as caught:
        parse_experiment_file(path)
    error = caught.value
    assert error.file == str(path)
    assert str(error).startswith(f"{path}: ")
    if error.field:
        assert f"field '{error.field}'" in str(error)
    assert error.reason and error.reason in str(error)
    return error


def test_good_file_parses_to_the_right_spec(tmp_path):
    path = write(tmp_path, "crossover-demo.yaml", GOOD)
    assert parse_experiment_file(path) == ExperimentSpec(
        name="crossover-demo", design="crossover", start=date(2025, 6, 1), end=date(2025, 7, 12),
        unit="cluster", population={"categories": ["kitchen"]}, treated_fraction=0.5,
        price_change=-0.05, phase_days=14, blackout_days=7, trigger_event=None, duration_days=None,
        metric="units", seed=7, source=str(path),
    )


def test_defaults_fill_what_the_contract_allows(tmp_path):
    spec = parse_experiment_file(write(tmp_path, "tb.yaml", minimal()))
    assert (spec.unit, spec.treated_fraction, spec.metric, spec.population) == ("product", 0.5, "units", {})
    assert (spec.phase_days, spec.blackout_days, spec.trigger_event, spec.duration_days) == (None,) * 4
    crossover = parse_experiment_file(write(tmp_path, "x.yaml", minimal(design="crossover")))
    assert (crossover.phase_days, crossover.blackout_days) == (14, 7)
    triggered = parse_experiment_file(
        write(tmp_path, "t.yaml", minimal(design="triggered", trigger_event="competitor_discount"))
    )
    assert (triggered.trigger_event, triggered.duration_days) == ("competitor_discount", 21)


def test_fields_of_another_design_are_ignored(tmp_path):
    spec = parse_experiment_file(write(tmp_path, "tb.yaml", minimal(phase_days=10, trigger_event="x")))
    assert spec.phase_days is None and spec.trigger_event is None


def test_end_before_start_message(tmp_path):
    error = refusal(tmp_path, minimal(start="2025-02-01", end="2025-01-01"))
    assert error.field == "end"
    assert str(error) == f"{tmp_path / 'tb.yaml'}: field 'end': 2025-01-01 is before start 2025-02-01"


def test_unreadable_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ExperimentFileError) as caught:
        parse_experiment_file(path)
    assert caught.value.file == str(path) and "cannot read" in caught.value.reason


def test_invalid_yaml(tmp_path):
    error = refusal(tmp_path, "name: [unclosed\ndesign: time_bound\n")
    assert error.field is None and "invalid YAML" in error.reason


@pytest.mark.parametrize("text, found", [("- a\n- b\n", "list"), ("", "empty file"), ("42\n", "int")])
def test_not_a_mapping(tmp_path, text, found):
    error = refusal(tmp_path, text)
    assert "expected a mapping" in error.reason and found in error.reason


def test_yaml_tags_are_not_executed(tmp_path):
    error = refusal(tmp_path, "!!python/object/apply:os.system ['echo hi']\n")
    assert "invalid YAML" in error.reason


def test_unknown_field(tmp_path):
    error = refusal(tmp_path, minimal(colour="blue"))
    assert error.field == "colour" and "unknown field" in error.reason


@pytest.mark.parametrize("missing", ["name", "design", "start", "end", "treatment", "seed"])
def test_missing_required_field(tmp_path, missing):
    error = refusal(tmp_path, minimal(**{missing: None}))
    assert error.field == missing and "missing" in error.reason


def test_missing_price_change(tmp_path):
    error = refusal(tmp_path, minimal(treatment="{}"))
    assert error.field == "treatment.price_change" and "missing" in error.reason


def test_unknown_design(tmp_path):
    error = refusal(tmp_path, minimal(design="ab_test"))
    assert error.field == "design" and "unknown design 'ab_test'" in error.reason


def test_unknown_unit(tmp_path):
    error = refusal(tmp_path, minimal(unit="store"))
    assert error.field == "unit" and "unknown unit 'store'" in error.reason


@pytest.mark.parametrize("name", ["Bad-Name", "-leading", "has space", "'../escape'", "under_score", "a" * 64, "12"])
def test_unsafe_name(tmp_path, name):
    error = refusal(tmp_path, minimal(name=name))
    assert error.field == "name"
    assert "safe name" in error.reason or "longer than 63" in error.reason


def test_longest_safe_name_is_accepted(tmp_path):
    assert parse_experiment_file(write(tmp_path, "tb.yaml", minimal(name="a" * 63))).name == "a" * 63


@pytest.mark.parametrize("field, value", [
    ("start", "2025-02-30"), ("start", "'next monday'"), ("end", "20250301"), ("end", "2025-03-01 10:00:00"),
])
def test_bad_dates(tmp_path, field, value):
    error = refusal(tmp_path, minimal(**{field: value}))
    assert error.field == field and ("not a date" in error.reason or "time of day" in error.reason)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "half", "true", ".nan"])
def test_treated_fraction_outside_open_unit_interval(tmp_path, value):
    error = refusal(tmp_path, minimal(treated_fraction=value))
    assert error.field == "treated_fraction" and "between 0 and 1" in error.reason


@pytest.mark.parametrize("value, reason", [
    ("'-5%'", "not a number"), ("true", "not a number"), (".inf", "not a number"),
    ("-1", "must be > -1"), ("-1.5", "must be > -1"),
])
def test_bad_price_change(tmp_path, value, reason):
    error = refusal(tmp_path, minimal(treatment=f"{{price_change: {value}}}"))
    assert error.field == "treatment.price_change" and reason in error.reason


@pytest.mark.parametrize("value", ["1.5", "'7'", "true"])
def test_non_integer_seed(tmp_path, value):
    error = refusal(tmp_path, minimal(seed=value))
    assert error.field == "seed" and "not an integer" in error.reason


@pytest.mark.parametrize("changes, field, reason", [
    ({"design": "crossover", "blackout_days": -1}, "blackout_days", "negative"),
    ({"design": "crossover", "phase_days": 0}, "phase_days", "must be >= 1"),
    ({"design": "crossover", "phase_days": 2.5}, "phase_days", "whole number"),
    ({"design": "triggered", "trigger_event": "e", "duration_days": -3}, "duration_days", "negative"),
])
def test_negative_or_bad_days(tmp_path, changes, field, reason):
    error = refusal(tmp_path, minimal(**changes))
    assert error.field == field and reason in error.reason


def test_crossover_needs_phase_longer_than_blackout(tmp_path):
    error = refusal(tmp_path, minimal(design="crossover", phase_days=7, blackout_days=7))
    assert error.field == "blackout_days" and "must be < phase_days" in error.reason


def test_triggered_needs_trigger_event(tmp_path):
    error = refusal(tmp_path, minimal(design="triggered"))
    assert error.field == "trigger_event" and "missing" in error.reason


@pytest.mark.parametrize("population, field", [
    ("{brands: [acme]}", "population.brands"),
    ("{categories: kitchen}", "population.categories"),
    ("{product_ids: []}", "population.product_ids"),
    ("[kitchen]", "population"),
])
def test_malformed_population(tmp_path, population, field):
    assert refusal(tmp_path, minimal(population=population)).field == field


@pytest.mark.parametrize("population, field, named", [
    ("{categories: [toys]}", "population.categories", "toys"),
    ("{subclasses: [knives, forks]}", "population.subclasses", "forks"),
    ("{product_ids: [p000, nope]}", "population.product_ids", "nope"),
])
def test_population_with_unknown_names_is_refused(tmp_path, catalog, population, field, named):
    write(tmp_path, "tb.yaml", minimal(population=population))
    specs, refused = load_experiments(tmp_path, catalog)
    assert specs == [] and len(refused) == 1
    assert refused[0].field == field and named in refused[0].reason
    assert str(refused[0]).startswith(f"{tmp_path / 'tb.yaml'}: field '{field}'")


def test_population_filters_intersect_and_may_select_nothing(tmp_path, catalog):
    write(tmp_path, "a.yaml", minimal(name="a", population="{categories: [kitchen], subclasses: [pans, hoses]}"))
    write(tmp_path, "b.yaml", minimal(name="b", population="{categories: [garden], product_ids: [p000]}"))
    specs, refused = load_experiments(tmp_path, catalog)
    assert [s.name for s in specs] == ["a"]
    assert list(population_products(specs[0], catalog)) == [f"p1{i:02d}" for i in range(25)]
    assert refused[0].field == "population" and "selects no product" in refused[0].reason


def test_whole_catalogue_when_population_is_omitted(tmp_path, catalog):
    spec = parse_experiment_file(write(tmp_path, "tb.yaml", minimal()))
    assert population_products(spec, catalog).equals(pd.Index(catalog["product_id"], name="product_id"))


def test_one_bad_file_does_not_stop_the_others(tmp_path, catalog):
    write(tmp_path, "a.yaml", minimal(name="a", population="{subclasses: [knives]}"))
    write(tmp_path, "b.yml", "name: [broken\n")
    write(tmp_path, "c.yaml", minimal(name="c", population="{subclasses: [pans]}", design="nope"))
    write(tmp_path, "d.yaml", minimal(name="d", population="{subclasses: [hoses]}"))
    write(tmp_path, "notes.txt", "not an experiment")
    specs, refused = load_experiments(tmp_path, catalog)
    assert [s.name for s in specs] == ["a", "d"]
    assert [(e.file, e.field) for e in refused] == [
        (str(tmp_path / "b.yml"), None), (str(tmp_path / "c.yaml"), "design"),
    ]


def test_duplicate_name_refuses_the_later_file(tmp_path, catalog):
    write(tmp_path, "a.yaml", minimal(name="same", population="{subclasses: [knives]}"))
    write(tmp_path, "b.yaml", minimal(name="same", population="{subclasses: [pans]}"))
    specs, refused = load_experiments(tmp_path, catalog)
    assert [s.source for s in specs] == [str(tmp_path / "a.yaml")]
    assert refused[0].file == str(tmp_path / "b.yaml") and refused[0].field == "name"
    assert "already used by" in refused[0].reason and "a.yaml" in refused[0].reason


def test_overlap_refuses_the_later_file_naming_the_other(tmp_path, catalog):
    write(tmp_path, "1-first.yaml", minimal(name="first", population="{categories: [kitchen]}"))
    # shares knives with `first` on Feb 20-28
    write(tmp_path, "2-second.yaml", minimal(name="second", start="2025-02-20", end="2025-03-10",
                                             population="{subclasses: [knives, hoses]}"))
    # same products as `first` but after it ends: fine
    write(tmp_path, "3-later.yaml", minimal(name="later", start="2025-03-01", end="2025-03-31",
                                            population="{categories: [kitchen]}"))
    # same dates as `first` but other products: fine
    write(tmp_path, "4-garden.yaml", minimal(name="garden", population="{categories: [garden]}"))
    specs, refused = load_experiments(tmp_path, catalog)
    assert [s.name for s in specs] == ["first", "later", "garden"]
    assert len(refused) == 1
    error = refused[0]
    assert error.file == str(tmp_path / "2-second.yaml") and error.field == "population"
    assert "overlaps experiment 'first'" in error.reason
    assert "25 shared products" in error.reason and "2025-02-20..2025-02-28" in error.reason


def test_specs_round_trip_through_a_frame_and_arrow(tmp_path):
    specs = [
        parse_experiment_file(write(tmp_path, "x.yaml", GOOD)),
        parse_experiment_file(write(tmp_path, "t.yaml", minimal(
            name="trig", design="triggered", trigger_event="competitor_discount", duration_days=10,
            population="{product_ids: [p001, p000], subclasses: [knives]}", treated_fraction=0.3,
        ))),
        parse_experiment_file(write(tmp_path, "r.yaml", minimal(name="rd", design="random_days"))),
    ]
    frame = specs_to_frame(specs)
    assert len(frame) == 3 and frame.loc[1, "population"] == '{"product_ids": ["p000", "p001"], "subclasses": ["knives"]}'
    assert frame_to_specs(frame) == specs
    through_arrow = pa.Table.from_pandas(frame).to_pandas()
    assert frame_to_specs(through_arrow) == specs


def test_fingerprint_covers_everything_but_source(tmp_path):
    spec = parse_experiment_file(write(tmp_path, "x.yaml", GOOD))
    moved = parse_experiment_file(write(tmp_path, "y.yaml", GOOD))
    reseeded = parse_experiment_file(write(tmp_path, "z.yaml", GOOD.replace("seed: 7", "seed: 8")))
    assert moved.source != spec.source and spec_fingerprint(moved) == spec_fingerprint(spec)
    assert spec_fingerprint(reseeded) != spec_fingerprint(spec)
    assert len(spec_fingerprint(spec)) == 64


def test_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ExperimentFileError("e.yaml", "seed", "bad")))
    assert (error.file, error.field, error.reason, str(error)) == ("e.yaml", "seed", "bad", "e.yaml: field 'seed': bad")
