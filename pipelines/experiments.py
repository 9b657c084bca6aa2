"""Experiment files (`experiments/*.yaml`, data contract v1), parsed and validated.

An experiment file is refused with an `ExperimentFileError` naming the file, the field and the
reason; `load_experiments` refuses bad files one by one and keeps going with the others, so one
typo never stops the experiments that are fine.

Decisions the contract leaves open, taken here:
- Required fields: `name`, `design`, `start`, `end`, `treatment: {price_change}`, `seed`.
  Defaults: `unit: product`, `treated_fraction: 0.5`, `metric: units`; crossover
  `phase_days: 14`, `blackout_days: 7`; triggered `duration_days: 21`.
- Design-specific fields given to another design (e.g. `phase_days` on a time_bound experiment)
  are accepted and ignored: the spec stores None for them, so they do not change its fingerprint.
- `population` keys are filters that all apply (intersection): `categories: [kitchen]` with
  `subclasses: [knives]` selects kitchen knives. An omitted or empty `population` means the whole
  catalogue; an empty list under a key is refused (omit the key instead).
- The file stem need not equal `name`, but names are unique across the directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import pandas as pd
import yaml

DESIGNS = ("time_bound", "triggered", "random_days", "crossover")
UNITS = ("product", "cluster")
POPULATION_KEYS = ("categories", "subclasses", "product_ids")
# Which catalogue column each population key filters on.
POPULATION_COLUMNS = {"categories": "category", "subclasses": "subclass", "product_ids": "product_id"}

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]*")
NAME_MAX_LENGTH = 63
METRIC_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ISO_DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")

FILE_FIELDS = (
    "name", "design", "start", "end", "unit", "population", "treated_fraction", "treatment",
    "phase_days", "blackout_days", "trigger_event", "duration_days", "metric", "seed",
)
REQUIRED_FIELDS = ("name", "design", "start", "end", "treatment", "seed")
TREATMENT_FIELDS = ("price_change",)

DEFAULT_UNIT = "product"
DEFAULT_TREATED_FRACTION = 0.5
DEFAULT_METRIC = "units"
DEFAULT_PHASE_DAYS = 14
DEFAULT_BLACKOUT_DAYS = 7
DEFAULT_DURATION_DAYS = 21


@dataclass(frozen=True)
class ExperimentSpec:
    """One validated experiment: everything needed to compute and analyse its assignments.

    `population` holds only the keys given, each a sorted list of unique names; design-specific
    fields are None for designs that do not use them.
    """

    name: str
    design: str
    start: date
    end: date  # inclusive
    unit: str = DEFAULT_UNIT
    population: dict = field(default_factory=dict, hash=False)
    treated_fraction: float = DEFAULT_TREATED_FRACTION
    price_change: float = 0.0
    phase_days: int | None = None
    blackout_days: int | None = None
    trigger_event: str | None = None
    duration_days: int | None = None
    metric: str = DEFAULT_METRIC
    seed: int = 0
    source: str = ""

    @property
    def n_days(self) -> int:
        """Number of calendar days in the experiment, both ends included."""
        return (self.end - self.start).days + 1

    def is_active_on(self, day: date) -> bool:
        """True when `day` lies inside [start, end]."""
        return self.start <= day <= self.end


class ExperimentFileError(ValueError):
    """A refused experiment file: which file, which field (None for the whole file), and why."""

    def __init__(self, file: str, field: str | None, reason: str):
        self.file = str(file)
        self.field = field
        self.reason = reason
        where = f"field '{field}': " if field else ""
        super().__init__(f"{self.file}: {where}{reason}")

    def __reduce__(self):  # keep the attributes when pickled (multiprocess executors)
        return (type(self), (self.file, self.field, self.reason))


# ----------------------------------------------------------------------------------------------
# Parsing one file
# ----------------------------------------------------------------------------------------------

class _SafeLoaderDatesAsText(yaml.SafeLoader):
    """yaml's SafeLoader (no tags that build objects), with timestamps left as text.

    PyYAML itself raises a bare ValueError on `2025-02-30`; keeping dates as text lets `_as_date`
    refuse them naming the field.
    """


_SafeLoaderDatesAsText.add_constructor(
    "tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str
)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_date(value, file: str, name: str) -> date:
    if isinstance(value, datetime):
        raise ExperimentFileError(file, name, f"{value} has a time of day; expected a date YYYY-MM-DD")
    if isinstance(value, date):
        return value
    if isinstance(value, str) and ISO_DATE_PATTERN.fullmatch(value.strip()):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ExperimentFileError(file, name, f"{value!r} is not a date (expected YYYY-MM-DD)")


def _as_days(value, file: str, name: str, minimum: int) -> int:
    if not _is_int(value):
        raise ExperimentFileError(file, name, f"{value!r} is not a whole number of days")
    if value < minimum:
        what = "negative" if value < 0 else f"below {minimum}"
        raise ExperimentFileError(file, name, f"{value} is {what} (must be >= {minimum})")
    return int(value)


def _parse_population(value, file: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ExperimentFileError(
            file, "population", f"expected a mapping with keys {', '.join(POPULATION_KEYS)}"
        )
    population = {}
    for key in value:
        if key not in POPULATION_KEYS:
            raise ExperimentFileError(
                file, f"population.{key}", f"unknown key (known: {', '.join(POPULATION_KEYS)})"
            )
    for key in POPULATION_KEYS:
        if key not in value:
            continue
        names = value[key]
        if not isinstance(names, list):
            raise ExperimentFileError(file, f"population.{key}", "expected a list of names")
        if not names:
            raise ExperimentFileError(
                file, f"population.{key}", "empty list (omit the key to select the whole catalogue)"
            )
        bad = [n for n in names if not isinstance(n, (str, int)) or isinstance(n, bool)]
        if bad:
            raise ExperimentFileError(file, f"population.{key}", f"{bad[0]!r} is not a name")
        population[key] = sorted({str(n) for n in names})
    return population


def _parse_mapping(raw: dict, file: str) -> ExperimentSpec:
    unknown = sorted(str(k) for k in raw if k not in FILE_FIELDS)
    if unknown:
        raise ExperimentFileError(file, unknown[0], f"unknown field (known: {', '.join(FILE_FIELDS)})")
    for required in REQUIRED_FIELDS:
        if raw.get(required) is None:
            raise ExperimentFileError(file, required, "missing required field")

    name = raw["name"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ExperimentFileError(
            file, "name", f"{name!r} is not a safe name (lowercase letters, digits and '-', "
            "starting with a letter or digit)"
        )
    if len(name) > NAME_MAX_LENGTH:
        raise ExperimentFileError(
            file, "name", f"{len(name)} characters is longer than {NAME_MAX_LENGTH}"
        )

    design = raw["design"]
    if design not in DESIGNS:
        raise ExperimentFileError(file, "design", f"unknown design {design!r} (known: {', '.join(DESIGNS)})")
    unit = raw.get("unit", DEFAULT_UNIT)
    if unit not in UNITS:
        raise ExperimentFileError(file, "unit", f"unknown unit {unit!r} (known: {', '.join(UNITS)})")

    start = _as_date(raw["start"], file, "start")
    end = _as_date(raw["end"], file, "end")
    if end < start:
        raise ExperimentFileError(file, "end", f"{end} is before start {start}")

    population = _parse_population(raw.get("population"), file)

    treated_fraction = raw.get("treated_fraction", DEFAULT_TREATED_FRACTION)
    if not _is_number(treated_fraction) or not (0 < treated_fraction < 1):
        raise ExperimentFileError(
            file, "treated_fraction", f"{treated_fraction!r} is not a number strictly between 0 and 1"
        )

    treatment = raw["treatment"]
    if not isinstance(treatment, dict):
        raise ExperimentFileError(file, "treatment", "expected a mapping like {price_change: -0.05}")
    for key in treatment:
        if key not in TREATMENT_FIELDS:
            raise ExperimentFileError(
                file, f"treatment.{key}", f"unknown field (known: {', '.join(TREATMENT_FIELDS)})"
            )
    if treatment.get("price_change") is None:
        raise ExperimentFileError(file, "treatment.price_change", "missing required field")
    price_change = treatment["price_change"]
    if not _is_number(price_change) or not math.isfinite(price_change):
        raise ExperimentFileError(file, "treatment.price_change", f"{price_change!r} is not a number")
    if price_change <= -1:
        raise ExperimentFileError(
            file, "treatment.price_change", f"{price_change} would make the price zero or negative (must be > -1)"
        )

    seed = raw["seed"]
    if not _is_int(seed):
        raise ExperimentFileError(file, "seed", f"{seed!r} is not an integer")

    metric = raw.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not METRIC_PATTERN.fullmatch(metric):
        raise ExperimentFileError(file, "metric", f"{metric!r} is not a column name")

    phase_days = blackout_days = duration_days = None
    trigger_event = None
    if design == "crossover":
        phase_days = _as_days(raw.get("phase_days", DEFAULT_PHASE_DAYS), file, "phase_days", 1)
        blackout_days = _as_days(raw.get("blackout_days", DEFAULT_BLACKOUT_DAYS), file, "blackout_days", 0)
        if blackout_days >= phase_days:
            raise ExperimentFileError(
                file, "blackout_days",
                f"{blackout_days} leaves no analysable day in a phase of {phase_days} days "
                "(must be < phase_days)",
            )
    elif design == "triggered":
        trigger_event = raw.get("trigger_event")
        if trigger_event is None:
            raise ExperimentFileError(file, "trigger_event", "missing: a triggered experiment needs one")
        if not isinstance(trigger_event, str) or not trigger_event.strip():
            raise ExperimentFileError(file, "trigger_event", f"{trigger_event!r} is not an event name")
        duration_days = _as_days(raw.get("duration_days", DEFAULT_DURATION_DAYS), file, "duration_days", 1)

    return ExperimentSpec(
        name=name, design=design, start=start, end=end, unit=unit, population=population,
        treated_fraction=float(treated_fraction), price_change=float(price_change),
        phase_days=phase_days, blackout_days=blackout_days, trigger_event=trigger_event,
        duration_days=duration_days, metric=metric, seed=int(seed), source=file,
    )


def parse_experiment_file(path) -> ExperimentSpec:
    """Read one experiment YAML (a SafeLoader only) into a validated `ExperimentSpec`.

    Raises `ExperimentFileError` naming the file, the field and the reason. The catalogue-dependent
    checks (unknown products, overlaps, duplicate names) are `load_experiments`'s.
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentFileError(file, None, f"cannot read the file ({exc.__class__.__name__}: {exc})") from exc
    try:
        raw = yaml.load(text, Loader=_SafeLoaderDatesAsText)  # safe_load, dates kept as text
    except yaml.YAMLError as exc:
        detail = str(exc).replace("\n", " ")
        raise ExperimentFileError(file, None, f"invalid YAML ({detail})") from exc
    if not isinstance(raw, dict):
        kind = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ExperimentFileError(file, None, f"expected a mapping of fields, found {kind}")
    return _parse_mapping(raw, file)


# ----------------------------------------------------------------------------------------------
# Catalogue-dependent checks
# ----------------------------------------------------------------------------------------------

def _examples(names, limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def population_products(spec: ExperimentSpec, catalog: pd.DataFrame) -> pd.Index:
    """Product ids of the spec's population in `catalog` (columns product_id, category, subclass).

    Every population key is a filter and all of them apply. Raises `ExperimentFileError` when a
    key names something absent from the catalogue or when the filters select no product.
    """
    keep = pd.Series(True, index=catalog.index)
    for key, names in spec.population.items():
        column = catalog[POPULATION_COLUMNS[key]].astype(str)
        known = set(column.unique())
        unknown = [n for n in names if n not in known]
        if unknown:
            noun = {"categories": "category", "subclasses": "subclass", "product_ids": "product id"}[key]
            raise ExperimentFileError(
                spec.source, f"population.{key}",
                f"unknown {noun}{'s' if len(unknown) > 1 else ''} not in the catalogue: {_examples(unknown)}",
            )
        keep &= column.isin(names)
    products = pd.Index(catalog.loc[keep, "product_id"].astype(str), name="product_id")
    if products.empty:
        raise ExperimentFileError(spec.source, "population", "selects no product of the catalogue")
    return products


EXPERIMENT_FILE_SUFFIXES = (".yaml", ".yml")


def experiment_file_paths(directory) -> list[Path]:
    """The experiment files of `directory` (`*.yaml`, `*.yml`, not hidden), sorted by file name.

    The one definition of "an experiment file", shared by `load_experiments` and the sensor that
    watches the directory. A missing directory has no files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir()
         if p.suffix in EXPERIMENT_FILE_SUFFIXES and not p.name.startswith(".") and p.is_file()),
        key=lambda p: p.name,
    )


def experiment_file_digests(directory) -> dict[str, str]:
    """File name -> sha256 of the file's bytes, for every experiment file of `directory`.

    Content digests (not modification times) so a touched but unchanged file is no change, and a
    file rewritten within the same second still is.
    """
    digests = {}
    for path in experiment_file_paths(directory):
        try:
            digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:  # removed between listing and reading: it is gone
            continue
    return digests


def compare_digests(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """Which file names were `added`, `changed` (other digest) and `removed` between two listings."""
    return {
        "added": sorted(set(after) - set(before)),
        "changed": sorted(name for name in set(after) & set(before) if after[name] != before[name]),
        "removed": sorted(set(before) - set(after)),
    }


def load_experiments(directory, catalog: pd.DataFrame) -> tuple[list[ExperimentSpec], list[ExperimentFileError]]:
    """Parse every `*.yaml` / `*.yml` in `directory` (sorted by file name) and validate them together.

    Returns (accepted specs, refusals). Refused: files that do not parse, populations naming
    unknown categories/subclasses/products or selecting nothing, a name already used by an earlier
    file, and an experiment sharing products with an earlier accepted one on overlapping dates
    (the later file is refused, naming the other experiment). Each refusal is independent.
    """
    files = experiment_file_paths(directory)
    accepted: list[tuple[ExperimentSpec, pd.Index]] = []
    refused: list[ExperimentFileError] = []
    name_owner: dict[str, str] = {}
    for path in files:
        try:
            spec = parse_experiment_file(path)
            # A name belongs to the first file that parses with it, whatever its later checks say,
            # so fixing an earlier file can never silently take a name over.
            if spec.name in name_owner:
                raise ExperimentFileError(
                    spec.source, "name", f"'{spec.name}' is already used by {name_owner[spec.name]}"
                )
            name_owner[spec.name] = spec.source
            products = population_products(spec, catalog)
            for other, other_products in accepted:
                if spec.start > other.end or other.start > spec.end:
                    continue
                shared = products.intersection(other_products)
                if len(shared):
                    raise ExperimentFileError(
                        spec.source, "population",
                        f"overlaps experiment '{other.name}' ({other.source}): {len(shared)} shared "
                        f"product{'s' if len(shared) > 1 else ''} ({_examples(shared.sort_values())}) "
                        f"on {max(spec.start, other.start)}..{min(spec.end, other.end)}",
                    )
            accepted.append((spec, products))
        except ExperimentFileError as error:
            refused.append(error)
    return [spec for spec, _ in accepted], refused


# ----------------------------------------------------------------------------------------------
# Tables and fingerprints
# ----------------------------------------------------------------------------------------------

SPEC_COLUMNS = tuple(f.name for f in dataclasses.fields(ExperimentSpec))
_OPTIONAL_INT_FIELDS = ("phase_days", "blackout_days", "duration_days")


def specs_to_frame(specs: list[ExperimentSpec]) -> pd.DataFrame:
    """One row per spec (population as a canonical JSON string), for storing beside assignments."""
    rows = []
    for spec in specs:
        row = dataclasses.asdict(spec)
        row["population"] = json.dumps(spec.population, sort_keys=True)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(SPEC_COLUMNS))
    for column in _OPTIONAL_INT_FIELDS:
        frame[column] = frame[column].astype("Int64")
    frame["seed"] = frame["seed"].astype("int64")
    frame["treated_fraction"] = frame["treated_fraction"].astype("float64")
    frame["price_change"] = frame["price_change"].astype("float64")
    return frame


def _cell_to_date(value) -> date:
    if isinstance(value, pd.Timestamp) or isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _missing(value) -> bool:
    return value is None or (not isinstance(value, (str, list, dict)) and pd.isna(value))


def frame_to_specs(frame: pd.DataFrame) -> list[ExperimentSpec]:
    """Inverse of `specs_to_frame` (also after a Parquet round trip): the exact same specs."""
    specs = []
    for row in frame.to_dict("records"):
        specs.append(ExperimentSpec(
            name=str(row["name"]), design=str(row["design"]),
            start=_cell_to_date(row["start"]), end=_cell_to_date(row["end"]),
            unit=str(row["unit"]), population=json.loads(row["population"]),
            treated_fraction=float(row["treated_fraction"]), price_change=float(row["price_change"]),
            phase_days=None if _missing(row["phase_days"]) else int(row["phase_days"]),
            blackout_days=None if _missing(row["blackout_days"]) else int(row["blackout_days"]),
            trigger_event=None if _missing(row["trigger_event"]) else str(row["trigger_event"]),
            duration_days=None if _missing(row["duration_days"]) else int(row["duration_days"]),
            metric=str(row["metric"]), seed=int(row["seed"]),
            source="" if _missing(row["source"]) else str(row["source"]),
        ))
    return specs


def spec_fingerprint(spec: ExperimentSpec) -> str:
    """sha256 of every field but `source`, canonically encoded: equal fingerprints, equal assignments.

    Lets a daily run notice that a running experiment's file was edited in a way that would
    change what was already published.
    """
    canonical = {}
    for name in SPEC_COLUMNS:
        if name == "source":
            continue
        value = getattr(spec, name)
        canonical[name] = value.isoformat() if isinstance(value, date) else value
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()
