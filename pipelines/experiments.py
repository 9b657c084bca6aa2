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
- A name that is running (it has an enrolment) belongs to the file that enrolled it, for good:
  another file claiming it is refused, whatever the file names' order. If that file is later
  refused or removed, the experiment keeps its last valid spec, with a loud warning, so a
  published day never silently drops a running experiment.
- `treatment.price_change` must lie within +-MAX_PRICE_CHANGE (0.5): a price experiment moves
  prices by percents, and `5` (+500%) is a typo far more often than an intent.
- Metrics (issue 16): `metrics: [units, revenue, profit]`, the first primary; `metric: units` is
  the one-metric list (give one of the two). `guardrails: [{metric: profit, direction:
  must_not_fall, tolerance: 0.02}]` name metrics of the list. `costs: {kitchen: {unit_cost: 3.5}}`
  or `{kitchen: {margin_rate: 0.3}}` per category give profit its unit cost; without them the
  catalogue's `unit_cost` column must cover the population (`pipelines.metrics`). These
  analysis-only fields never change assignments, so they stay out of the fingerprint.
- YAML is parsed safely and strictly: no aliases (`*name`, the "billion laughs" expansion), no
  duplicate keys, files of at most MAX_FILE_BYTES; every bad value a message quotes is cut to
  EXCERPT_CHARS characters.
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
from typing import Annotated, Any, Literal

import pandas as pd
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from pipelines import metrics as metric_rules

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
    "metrics", "guardrails", "costs",
)
ANALYSIS_FIELDS = ("metrics", "guardrails", "costs")  # analysis only: outside the fingerprint
REQUIRED_FIELDS = ("name", "design", "start", "end", "treatment", "seed")
TREATMENT_FIELDS = ("price_change",)

DEFAULT_UNIT = "product"
DEFAULT_TREATED_FRACTION = 0.5
DEFAULT_METRIC = "units"
DEFAULT_PHASE_DAYS = 14
DEFAULT_BLACKOUT_DAYS = 7
DEFAULT_DURATION_DAYS = 21
MAX_PRICE_CHANGE = 0.5
MAX_FILE_BYTES = 64 * 1024
EXCERPT_CHARS = 80


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
    # issue 16: every metric analysed (empty: just `metric`), guardrails ((metric, direction,
    # tolerance), ...), per-category costs {category: {unit_cost | margin_rate: value}}
    metrics: tuple = ()
    guardrails: tuple = ()
    costs: dict = field(default_factory=dict, hash=False)

    @property
    def all_metrics(self) -> tuple[str, ...]:
        """The metrics analysed, the primary first."""
        return tuple(self.metrics) or (self.metric,)

    @property
    def n_days(self) -> int:
        """Number of calendar days in the experiment, both ends included."""
        return (self.end - self.start).days + 1

    def is_active_on(self, day: date) -> bool:
        """True when `day` lies inside [start, end]."""
        return self.start <= day <= self.end


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """`repr(value)` cut to `limit` characters, so no message ever quotes a huge value."""
    text = repr(value) if not isinstance(value, str) or len(value) <= limit else repr(value[:limit])
    return text if len(text) <= limit + 2 else text[:limit] + "...(cut)"


class ExperimentFileError(ValueError):
    """A refused experiment file: which file, which field (None for the whole file), and why."""

    def __init__(self, file: str, field: str | None, reason: str):
        self.file = str(file)
        self.field = field
        self.reason = reason if len(reason) <= 4 * EXCERPT_CHARS else reason[: 4 * EXCERPT_CHARS] + "...(cut)"
        where = f"field '{field}': " if field else ""
        super().__init__(f"{self.file}: {where}{reason}")

    def __reduce__(self):  # keep the attributes when pickled (multiprocess executors)
        return (type(self), (self.file, self.field, self.reason))


# ----------------------------------------------------------------------------------------------
# Parsing one file
# ----------------------------------------------------------------------------------------------

class _StrictSafeLoader(yaml.SafeLoader):
    """yaml's SafeLoader (no tags that build objects), with timestamps left as text, refusing
    aliases before anything is expanded and refusing duplicate keys.

    PyYAML itself raises a bare ValueError on `2025-02-30`; keeping dates as text lets `_as_date`
    refuse them naming the field. An alias is refused as the composer meets it, so nested
    aliases ("billion laughs") never grow in memory.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML alias '*{str(event.anchor)[:EXCERPT_CHARS]}' is not allowed in an experiment file "
                "(write the value out)", event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader refuses it itself
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {excerpt(key)} (each field may appear once)", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictSafeLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
_SafeLoaderDatesAsText = _StrictSafeLoader  # the name earlier code used


class _Refused(ValueError):
    """A validator's refusal: why, and which field when not the validator's own (`population.categories`)."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.field = field


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_date(value) -> date:
    if isinstance(value, datetime):
        raise _Refused(f"{excerpt(str(value))} has a time of day; expected a date YYYY-MM-DD")
    if isinstance(value, date):
        return value
    if isinstance(value, str) and ISO_DATE_PATTERN.fullmatch(value.strip()):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise _Refused(f"{excerpt(value)} is not a date (expected YYYY-MM-DD)")


def _as_days(value, _info=None, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Refused(f"{excerpt(value)} is not a whole number of days")
    if value < minimum:
        what = "negative" if value < 0 else f"below {minimum}"
        raise _Refused(f"{value} is {what} (must be >= {minimum})")
    return int(value)


def _name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise _Refused(f"{excerpt(name)} is not a safe name (lowercase letters, digits and '-', starting with a letter or digit)")
    if len(name) > NAME_MAX_LENGTH:
        raise _Refused(f"{len(name)} characters is longer than {NAME_MAX_LENGTH}")
    return name


def _end(value, info) -> date:
    end, start = _as_date(value), info.data.get("start")
    if start is not None and end < start:
        raise _Refused(f"{end} is before start {start}")
    return end


def _population(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Refused(f"expected a mapping with keys {', '.join(POPULATION_KEYS)}")
    for key in value:
        if key not in POPULATION_KEYS:
            raise _Refused(f"unknown key (known: {', '.join(POPULATION_KEYS)})", f"population.{str(key)[:EXCERPT_CHARS]}")
    population = {}
    for key in (k for k in POPULATION_KEYS if k in value):
        names, where = value[key], f"population.{key}"
        if not isinstance(names, list):
            raise _Refused("expected a list of names", where)
        if not names:
            raise _Refused("empty list (omit the key to select the whole catalogue)", where)
        bad = [n for n in names if not isinstance(n, (str, int)) or isinstance(n, bool)]
        if bad:
            raise _Refused(f"{excerpt(bad[0])} is not a name", where)
        population[key] = sorted({str(n) for n in names})
    return population


def _price_change(treatment) -> float:
    """`treatment: {price_change: x}`: a finite number above -1 and within the sane range."""
    if not isinstance(treatment, dict):
        raise _Refused("expected a mapping like {price_change: -0.05}")
    for key in treatment:
        if key not in TREATMENT_FIELDS:
            raise _Refused(f"unknown field (known: {', '.join(TREATMENT_FIELDS)})", f"treatment.{str(key)[:EXCERPT_CHARS]}")
    where, price_change = "treatment.price_change", treatment.get("price_change")
    if price_change is None:
        raise _Refused("missing required field", where)
    if not _is_number(price_change) or not math.isfinite(price_change):
        raise _Refused(f"{excerpt(price_change)} is not a number", where)
    if price_change <= -1:
        raise _Refused(f"{price_change} would make the price zero or negative (must be > -1)", where)
    if abs(price_change) > MAX_PRICE_CHANGE:
        raise _Refused(f"{price_change} is a {price_change:+.0%} price change, outside the sane range "
                       f"-{MAX_PRICE_CHANGE}..{MAX_PRICE_CHANGE} (write -0.05 for 5% off)", where)
    return float(price_change)


def _metrics(names, info) -> tuple:
    """Every metric, the primary first, from `metric` or `metrics` (a list), not both."""
    metric, where = info.data.get("metric", _ABSENT), "metrics"
    if names is _ABSENT:
        names, where = [DEFAULT_METRIC if metric is _ABSENT else metric], "metric"
    elif metric is not _ABSENT:
        raise _Refused("give either `metric` or `metrics` (a list, the first primary), not both")
    elif not isinstance(names, list) or not names:
        raise _Refused(f"{excerpt(names)} is not a non-empty list of metric names")
    for name in names:
        if not isinstance(name, str) or not METRIC_PATTERN.fullmatch(name):
            raise _Refused(f"{excerpt(name)} is not a metric (units, revenue, profit or a sales column)", where)
    if len(set(names)) != len(names):
        raise _Refused(f"{excerpt(next(n for n in names if names.count(n) > 1))} is listed twice", where)
    if len(names) > metric_rules.MAX_METRICS:
        raise _Refused(f"{len(names)} metrics is more than {metric_rules.MAX_METRICS}", where)
    return tuple(names)


def _guardrails(value, info) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Refused("expected a list like [{metric: profit, direction: must_not_fall, tolerance: 0.02}]")
    metrics, out, seen = info.data.get("metrics", ()), [], set()
    for i, item in enumerate(value):
        where = f"guardrails[{i}]"
        if not isinstance(item, dict):
            raise _Refused("expected a mapping {metric, direction, tolerance}", where)
        for key in item:
            if key not in metric_rules.GUARDRAIL_FIELDS:
                raise _Refused(f"unknown field (known: {', '.join(metric_rules.GUARDRAIL_FIELDS)})",
                               f"{where}.{str(key)[:EXCERPT_CHARS]}")
        for key in metric_rules.GUARDRAIL_FIELDS:
            if item.get(key) is None:
                raise _Refused("missing required field", f"{where}.{key}")
        metric, direction, tolerance = item["metric"], item["direction"], item["tolerance"]
        if metric not in metrics:
            raise _Refused(f"{excerpt(metric)} is not one of the experiment's metrics ({', '.join(metrics)}): "
                           "add it to `metrics`", f"{where}.metric")
        if metric in seen:
            raise _Refused(f"{excerpt(metric)} has a guardrail already", f"{where}.metric")
        if direction not in metric_rules.GUARDRAIL_DIRECTIONS:
            raise _Refused(f"{excerpt(direction)} is not a direction (known: {', '.join(metric_rules.GUARDRAIL_DIRECTIONS)})",
                           f"{where}.direction")
        if not _is_number(tolerance) or not (0 <= tolerance < 1):
            raise _Refused(f"{excerpt(tolerance)} is not a relative change in [0, 1) (write 0.02 for 2%)", f"{where}.tolerance")
        seen.add(metric)
        out.append((metric, direction, float(tolerance)))
    return tuple(out)


def _costs(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not value:
        raise _Refused("expected a mapping category -> {unit_cost: 3.5} or {margin_rate: 0.3}")
    out = {}
    for category, given in value.items():
        where = f"costs.{str(category)[:EXCERPT_CHARS]}"
        if not isinstance(given, dict) or len(given) != 1 or next(iter(given)) not in metric_rules.COST_FIELDS:
            raise _Refused("expected exactly one of {unit_cost: <money>} or {margin_rate: <share>}", where)
        key, number = next(iter(given.items()))
        if not _is_number(number) or not math.isfinite(number):
            raise _Refused(f"{excerpt(number)} is not a number", f"{where}.{key}")
        if key == "unit_cost" and number < 0:
            raise _Refused(f"{number} is negative", f"{where}.{key}")
        if key == "margin_rate" and not (-1 < number < 1):
            raise _Refused(f"{number} is not a share of the price in (-1, 1) (write 0.3 for 30%)", f"{where}.{key}")
        out[str(category)] = {key: float(number)}
    return dict(sorted(out.items()))


def _for_design(design: str, check) -> AfterValidator:
    """A design's own field: `check(value, info)` for that design (its default when absent), None for the others."""
    return AfterValidator(lambda value, info: check(value, info) if info.data.get("design") == design else None)


def _blackout_days(value, info) -> int:
    blackout_days, phase_days = _as_days(value, minimum=0), info.data.get("phase_days")
    if phase_days is not None and blackout_days >= phase_days:
        raise _Refused(f"{blackout_days} leaves no analysable day in a phase of {phase_days} days (must be < phase_days)")
    return blackout_days


def _trigger_event(value, _info) -> str:
    if value is None:
        raise _Refused("missing: a triggered experiment needs one")
    if not isinstance(value, str) or not value.strip():
        raise _Refused(f"{excerpt(value)} is not an event name")
    return value


_ABSENT = object()  # `metric` / `metrics` not given (`metric: null` is a value, refused)
_TYPE_MESSAGES = {  # why a value of these fields fails its pydantic type (`{}`: the value, excerpted)
    "design": f"unknown design {{}} (known: {', '.join(DESIGNS)})",
    "unit": f"unknown unit {{}} (known: {', '.join(UNITS)})",
    "treated_fraction": "{} is not a number strictly between 0 and 1",
    "seed": "{} is not an integer",
}


class _ExperimentFile(BaseModel):
    """An experiment file's fields, checked after `_known_and_required` in this order (a validator sees
    the fields above it); the first refusal is reported. Design fields are None for the other designs."""

    model_config = ConfigDict(validate_default=True)

    name: Annotated[Any, AfterValidator(_name)]
    design: Literal[DESIGNS]
    unit: Literal[UNITS] = DEFAULT_UNIT
    start: Annotated[Any, AfterValidator(_as_date)]
    end: Annotated[Any, AfterValidator(_end)]
    population: Annotated[Any, AfterValidator(_population)] = None
    treated_fraction: Annotated[float, Field(strict=True, gt=0, lt=1)] = DEFAULT_TREATED_FRACTION
    treatment: Annotated[Any, AfterValidator(_price_change)]  # validated into its price_change
    seed: StrictInt
    metric: Any = _ABSENT
    metrics: Annotated[Any, AfterValidator(_metrics)] = _ABSENT
    guardrails: Annotated[Any, AfterValidator(_guardrails)] = None
    costs: Annotated[Any, AfterValidator(_costs)] = None
    phase_days: Annotated[Any, _for_design("crossover", _as_days)] = DEFAULT_PHASE_DAYS
    blackout_days: Annotated[Any, _for_design("crossover", _blackout_days)] = DEFAULT_BLACKOUT_DAYS
    trigger_event: Annotated[Any, _for_design("triggered", _trigger_event)] = None
    duration_days: Annotated[Any, _for_design("triggered", _as_days)] = DEFAULT_DURATION_DAYS

    @model_validator(mode="before")
    @classmethod
    def _known_and_required(cls, raw: dict) -> dict:
        unknown = sorted(str(k)[:EXCERPT_CHARS] for k in raw if k not in FILE_FIELDS)
        if unknown:
            raise _Refused(f"unknown field (known: {', '.join(FILE_FIELDS)})", unknown[0])
        for required in REQUIRED_FIELDS:
            if raw.get(required) is None:
                raise _Refused("missing required field", required)
        return raw

    def spec(self, source: str) -> ExperimentSpec:
        fields = {name: value for name, value in self if name not in ("treatment", "metric", "metrics")}
        return ExperimentSpec(**fields, price_change=self.treatment, metric=self.metrics[0],
                              metrics=self.metrics if len(self.metrics) > 1 else (), source=source)


def _parse_mapping(raw: dict, file: str) -> ExperimentSpec:
    """The validated spec of one file's mapping, or its first refusal as an `ExperimentFileError`."""
    try:
        return _ExperimentFile.model_validate(raw).spec(file)
    except ValidationError as exc:
        error = exc.errors()[0]
        refused = error.get("ctx", {}).get("error")
        if not isinstance(refused, _Refused):  # a value failing its pydantic type: our message, not pydantic's
            refused = _Refused(_TYPE_MESSAGES[error["loc"][0]].format(excerpt(error["input"])))
        raise ExperimentFileError(file, refused.field or error["loc"][0], str(refused)) from None


def parse_experiment_file(path) -> ExperimentSpec:
    """Read one experiment YAML (a SafeLoader only) into a validated `ExperimentSpec`.

    Raises `ExperimentFileError` naming the file, the field and the reason. The catalogue-dependent
    checks (unknown products, overlaps, duplicate names) are `load_experiments`'s.
    """
    return _parse_mapping(read_yaml_mapping(path), str(path))


def read_yaml_mapping(path) -> dict:
    """The mapping of one YAML file (size-capped, strict SafeLoader, dates as text), or
    `ExperimentFileError` naming the file and the reason (shared with `pipelines.advisor`'s proposals)."""
    file = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            raise ExperimentFileError(file, None, f"{size} bytes is larger than {MAX_FILE_BYTES} (an experiment file is a few lines)")
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentFileError(file, None, f"cannot read the file ({exc.__class__.__name__}: {str(exc)[:EXCERPT_CHARS]})") from exc
    try:
        raw = yaml.load(text, Loader=_StrictSafeLoader)  # safe, strict, dates kept as text
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        detail = " ".join(str(problem).split())[: 2 * EXCERPT_CHARS]
        raise ExperimentFileError(file, None, f"invalid YAML{where}: {detail}") from None
    except RecursionError:
        raise ExperimentFileError(file, None, "invalid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        kind = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ExperimentFileError(file, None, f"expected a mapping of fields, found {kind}")
    return raw


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
    _check_costs(spec, catalog, keep)
    return products


def _check_costs(spec: ExperimentSpec, catalog: pd.DataFrame, keep: pd.Series) -> None:
    """Profit needs a unit cost for every product of the population (`metrics.unit_costs`)."""
    if spec.costs and "category" in catalog.columns:
        known = set(catalog["category"].astype(str))
        unknown = [c for c in spec.costs if c not in known]
        if unknown:
            raise ExperimentFileError(spec.source, f"costs.{unknown[0][:EXCERPT_CHARS]}", "unknown category, not in the catalogue")
    if "profit" not in spec.all_metrics:
        return
    field_name = "metrics" if spec.metrics else "metric"
    if "category" not in catalog.columns:
        return
    missing = metric_rules.missing_costs(spec.costs, catalog.loc[keep])
    if missing:
        raise ExperimentFileError(
            spec.source, field_name,
            f"profit needs a unit cost: {len(missing)} product(s) ({_examples(missing)}) have none; give "
            "`costs: {<category>: {unit_cost: ...}}` or `{margin_rate: ...}` in this file, or a catalogue "
            "`unit_cost` column",
        )


EXPERIMENT_FILE_SUFFIXES = (".yaml", ".yml")


def experiment_file_paths(directory) -> list[Path]:
    """The experiment files of `directory` (`*.yaml`, `*.yml` in any case, not hidden), sorted
    by file name.

    The one definition of "an experiment file", shared by `load_experiments` and the sensor that
    watches the directory. A missing directory has no files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir()
         if p.suffix.lower() in EXPERIMENT_FILE_SUFFIXES and not p.name.startswith(".") and p.is_file()),
        key=lambda p: p.name,
    )


def ignored_experiment_directory_entries(directory) -> list[str]:
    """One message per visible entry of `directory` that is not an experiment file (so a
    `plan.yaml.txt` or `exp.json` is said, not silently skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    wanted = set(experiment_file_paths(directory))
    return [
        f"{p}: ignored: not an experiment file (only *.yaml / *.yml are read)"
        for p in sorted(directory.iterdir(), key=lambda p: p.name)
        if p not in wanted and not p.name.startswith((".", "_"))
    ]


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


@dataclass
class ExperimentLoad:
    """What `load_experiment_directory` found: the accepted specs, the refused files, the loud
    warnings about running experiments kept on their last valid spec, and ignored entries."""

    specs: list[ExperimentSpec]
    refused: list[ExperimentFileError]
    kept: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _file_name(source: str) -> str:
    return Path(source).name


def _claim_names(parsed: list[ExperimentSpec], owner_file: dict[str, str], refused: list, file_errors: dict) -> dict[str, ExperimentSpec]:
    """Names: a running name belongs to its enrolling file for good; another name to its first
    file. Returns the spec that holds each name; the others are refused (appended to `refused`,
    and by file to `file_errors`)."""
    claimed: dict[str, ExperimentSpec] = {}
    for spec in parsed:
        name, file = spec.name, _file_name(spec.source)
        if name in owner_file and file != owner_file[name]:
            error = ExperimentFileError(
                spec.source, "name",
                f"'{name}' belongs to running experiment file {owner_file[name]} (it has an enrolment); "
                "a running name stays with its file for good: give this experiment another name",
            )
        elif name in claimed:
            error = ExperimentFileError(spec.source, "name", f"'{name}' is already used by {claimed[name].source}")
        else:
            claimed[name] = spec
            continue
        refused.append(error)
        file_errors.setdefault(file, error)
    return claimed


def _running_first(running: dict[str, ExperimentSpec], claimed: dict[str, ExperimentSpec], owner_file: dict[str, str],
                   catalog: pd.DataFrame, present: set, refused: list, file_errors: dict) -> tuple[list, list[str]]:
    """Running experiments are accepted first: their file's current spec when it passes, else
    their last valid one, with a warning saying why (`kept`). Takes them out of `claimed`;
    returns (accepted (spec, products) pairs, kept warnings)."""
    accepted: list[tuple[ExperimentSpec, pd.Index]] = []
    kept: list[str] = []

    def products_of(spec: ExperimentSpec) -> pd.Index:
        try:
            return population_products(spec, catalog)
        except ExperimentFileError:  # a kept spec whose names left the catalogue: its enrolment is frozen anyway
            return pd.Index([], name="product_id")

    for name in sorted(running):
        last = running[name]
        current = claimed.pop(name, None)
        if current is not None:
            try:
                accepted.append((current, population_products(current, catalog)))
                continue
            except ExperimentFileError as error:
                refused.append(error)
                file_errors.setdefault(owner_file[name], error)
        file = owner_file[name]
        if file in file_errors:
            why = f"{file} is refused ({file_errors[file].reason})"
        elif file in present:
            why = f"{file} no longer names it"
        else:
            why = f"its file {file} is gone"
        kept.append(
            f"experiment '{name}' is running but {why}; keeping its last valid spec so published days stay "
            "as they are. Fix the file (or restore it) to change the experiment."
        )
        accepted.append((last, products_of(last)))
    return accepted, kept


def _accept_without_overlap(claimed: dict[str, ExperimentSpec], catalog: pd.DataFrame, accepted: list, refused: list) -> None:
    """Then the other files in file-name order: one sharing products with an accepted experiment
    on overlapping dates is refused, naming the other; the rest join `accepted`."""
    for spec in sorted(claimed.values(), key=lambda s: _file_name(s.source)):
        try:
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


def load_experiment_directory(
    directory, catalog: pd.DataFrame, running: dict[str, ExperimentSpec] | None = None
) -> ExperimentLoad:
    """Parse every experiment file of `directory` and validate them together.

    `running` maps the name of each experiment that has an enrolment to its last valid spec (its
    `source` names the file that owns the name). Refused: files that do not parse, populations
    naming unknown categories/subclasses/products or selecting nothing, a name owned by another
    file (a running name belongs to its enrolling file; otherwise to the first file, by file name,
    that parses with it), and an experiment sharing products with an accepted one on overlapping
    dates (running experiments are accepted first; then files in file-name order, the later one
    refused naming the other). A running experiment whose file is refused or gone keeps its last
    valid spec and gets a warning in `kept`. Each refusal is independent.
    """
    running = running or {}
    owner_file = {name: _file_name(spec.source) for name, spec in running.items()}
    refused: list[ExperimentFileError] = []
    file_errors: dict[str, ExperimentFileError] = {}
    parsed: list[ExperimentSpec] = []
    present = set()
    for path in experiment_file_paths(directory):
        present.add(path.name)
        try:
            parsed.append(parse_experiment_file(path))
        except ExperimentFileError as error:
            refused.append(error)
            file_errors[path.name] = error

    claimed = _claim_names(parsed, owner_file, refused, file_errors)
    accepted, kept = _running_first(running, claimed, owner_file, catalog, present, refused, file_errors)
    _accept_without_overlap(claimed, catalog, accepted, refused)
    specs = sorted((spec for spec, _ in accepted), key=lambda s: (_file_name(s.source), s.name))
    order = {path.name: i for i, path in enumerate(experiment_file_paths(directory))}
    refused.sort(key=lambda e: order.get(_file_name(e.file), len(order)))
    return ExperimentLoad(specs, refused, kept, ignored_experiment_directory_entries(directory))


def load_experiments(directory, catalog: pd.DataFrame) -> tuple[list[ExperimentSpec], list[ExperimentFileError]]:
    """`load_experiment_directory` with no running experiment: (accepted specs, refusals)."""
    loaded = load_experiment_directory(directory, catalog)
    return loaded.specs, loaded.refused


REGISTRY_TABLE = "experiment_registry"


def registry_frame(spec: ExperimentSpec) -> pd.DataFrame:
    """The registry row of an enrolled experiment: its spec, the file that owns its name, and the
    spec's fingerprint at enrolment (`warehouse/experiment_registry/experiment=<name>/`)."""
    return specs_to_frame([spec]).assign(file=_file_name(spec.source), fingerprint=spec_fingerprint(spec))


def read_registry(warehouse, start_spark=None) -> pd.DataFrame | None:
    """The enrolled experiments (one row each: spec, owning file, fingerprint), or None.
    `start_spark` makes a session when none is active (the CLI's `retire` has none yet; default:
    an embedded one)."""
    from pyspark.sql import SparkSession

    from pipelines.spark import get_spark

    if not warehouse.partitions(REGISTRY_TABLE, "experiment"):  # read from the log, no Spark
        return None
    spark = SparkSession.getActiveSession() or (start_spark or get_spark)()
    frame = warehouse.read(spark, REGISTRY_TABLE).toPandas()
    return frame.drop(columns="experiment").sort_values("name").reset_index(drop=True)


def running_specs(registry: pd.DataFrame | None, previous: pd.DataFrame | None) -> dict[str, ExperimentSpec]:
    """Name -> last valid spec of every enrolled experiment: the previous accepted spec when it
    still came from the enrolling file, else the spec as enrolled."""
    if registry is None or registry.empty:
        return {}
    enrolled = {s.name: s for s in frame_to_specs(registry[[c for c in SPEC_COLUMNS if c in registry.columns]])}
    files = dict(zip(registry["name"], registry["file"]))
    last = {} if previous is None or previous.empty else {s.name: s for s in frame_to_specs(previous)}
    out = {}
    for name, spec in enrolled.items():
        before = last.get(name)
        out[name] = before if before is not None and _file_name(before.source) == files[name] else spec
    return out


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
        row["metrics"] = json.dumps(list(spec.metrics))
        row["guardrails"] = json.dumps([list(g) for g in spec.guardrails])
        row["costs"] = json.dumps(spec.costs, sort_keys=True)
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
            # tables written before issue 16 have no metrics, guardrails or costs columns
            metrics=tuple(_json_cell(row, "metrics", [])),
            guardrails=tuple(tuple(g) for g in _json_cell(row, "guardrails", [])),
            costs=_json_cell(row, "costs", {}),
        ))
    return specs


def _json_cell(row: dict, column: str, default):
    value = row.get(column)
    return default if _missing(value) or value == "" else json.loads(value)


def spec_fingerprint(spec: ExperimentSpec) -> str:
    """sha256 of every field but `source`, canonically encoded: equal fingerprints, equal assignments.

    Lets a daily run notice that a running experiment's file was edited in a way that would
    change what was already published.
    """
    canonical = {}
    for name in SPEC_COLUMNS:
        if name == "source" or name in ANALYSIS_FIELDS:
            continue
        value = getattr(spec, name)
        canonical[name] = value.isoformat() if isinstance(value, date) else value
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Retiring an ended experiment whose file is gone
# ----------------------------------------------------------------------------------------------

RETIRED_DIR = "retired_experiments"  # warehouse/retired_experiments/<name>.json, one marker each


def retired_names(tables_dir) -> set[str]:
    """Names retired with `pricelab retire` (their markers under `warehouse/retired_experiments/`)."""
    directory = Path(tables_dir) / RETIRED_DIR
    if not directory.is_dir():
        return set()
    return {p.name[: -len(".json")] for p in directory.iterdir() if p.name.endswith(".json") and not p.name.startswith(".")}


def retire_refusal(name: str, running: dict[str, ExperimentSpec], directory, today: date) -> str | None:
    """Why experiment `name` may not be retired, or None when it may: it must be running (enrolled,
    so it keeps its last valid spec), have ended before `today`, and have no file naming it any more."""
    spec = running.get(name)
    if spec is None:
        known = ", ".join(sorted(running)) or "none"
        return f"{excerpt(name)} is not an enrolled experiment (enrolled: {known[:EXCERPT_CHARS]})"
    if spec.end >= today:
        return f"experiment '{name}' has not ended (end {spec.end}, today {today}); only an ended experiment is retired"
    for path in experiment_file_paths(directory):
        try:
            if parse_experiment_file(path).name == name:
                return f"experiment '{name}' still has a file ({path.name}); remove it first, or keep the experiment"
        except ExperimentFileError:
            if path.name == _file_name(spec.source):
                return f"experiment '{name}' still has a file ({path.name}, refused); remove it first"
    return None
