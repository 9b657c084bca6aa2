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

import pandas as pd
import yaml

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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_date(value, file: str, name: str) -> date:
    if isinstance(value, datetime):
        raise ExperimentFileError(file, name, f"{excerpt(str(value))} has a time of day; expected a date YYYY-MM-DD")
    if isinstance(value, date):
        return value
    if isinstance(value, str) and ISO_DATE_PATTERN.fullmatch(value.strip()):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ExperimentFileError(file, name, f"{excerpt(value)} is not a date (expected YYYY-MM-DD)")


def _as_days(value, file: str, name: str, minimum: int) -> int:
    if not _is_int(value):
        raise ExperimentFileError(file, name, f"{excerpt(value)} is not a whole number of days")
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
                file, f"population.{str(key)[:EXCERPT_CHARS]}", f"unknown key (known: {', '.join(POPULATION_KEYS)})"
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
            raise ExperimentFileError(file, f"population.{key}", f"{excerpt(bad[0])} is not a name")
        population[key] = sorted({str(n) for n in names})
    return population


def _parse_price_change(treatment, file: str) -> float:
    """`treatment: {price_change: x}`: a finite number above -1 and within the sane range."""
    if not isinstance(treatment, dict):
        raise ExperimentFileError(file, "treatment", "expected a mapping like {price_change: -0.05}")
    for key in treatment:
        if key not in TREATMENT_FIELDS:
            raise ExperimentFileError(
                file, f"treatment.{str(key)[:EXCERPT_CHARS]}", f"unknown field (known: {', '.join(TREATMENT_FIELDS)})"
            )
    if treatment.get("price_change") is None:
        raise ExperimentFileError(file, "treatment.price_change", "missing required field")
    price_change = treatment["price_change"]
    if not _is_number(price_change) or not math.isfinite(price_change):
        raise ExperimentFileError(file, "treatment.price_change", f"{excerpt(price_change)} is not a number")
    if price_change <= -1:
        raise ExperimentFileError(
            file, "treatment.price_change", f"{price_change} would make the price zero or negative (must be > -1)"
        )
    if abs(price_change) > MAX_PRICE_CHANGE:
        raise ExperimentFileError(
            file, "treatment.price_change",
            f"{price_change} is a {price_change:+.0%} price change, outside the sane range "
            f"-{MAX_PRICE_CHANGE}..{MAX_PRICE_CHANGE} (write -0.05 for 5% off)",
        )
    return price_change


def _design_fields(raw: dict, design: str, file: str) -> tuple:
    """(phase_days, blackout_days, trigger_event, duration_days): a crossover's phases and
    blackout (shorter than a phase), a triggered design's event and window; None elsewhere."""
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
            raise ExperimentFileError(file, "trigger_event", f"{excerpt(trigger_event)} is not an event name")
        duration_days = _as_days(raw.get("duration_days", DEFAULT_DURATION_DAYS), file, "duration_days", 1)
    return phase_days, blackout_days, trigger_event, duration_days


def _parse_mapping(raw: dict, file: str) -> ExperimentSpec:
    unknown = sorted(str(k)[:EXCERPT_CHARS] for k in raw if k not in FILE_FIELDS)
    if unknown:
        raise ExperimentFileError(file, unknown[0], f"unknown field (known: {', '.join(FILE_FIELDS)})")
    for required in REQUIRED_FIELDS:
        if raw.get(required) is None:
            raise ExperimentFileError(file, required, "missing required field")

    name = raw["name"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ExperimentFileError(
            file, "name", f"{excerpt(name)} is not a safe name (lowercase letters, digits and '-', "
            "starting with a letter or digit)"
        )
    if len(name) > NAME_MAX_LENGTH:
        raise ExperimentFileError(
            file, "name", f"{len(name)} characters is longer than {NAME_MAX_LENGTH}"
        )

    design = raw["design"]
    if design not in DESIGNS:
        raise ExperimentFileError(file, "design", f"unknown design {excerpt(design)} (known: {', '.join(DESIGNS)})")
    unit = raw.get("unit", DEFAULT_UNIT)
    if unit not in UNITS:
        raise ExperimentFileError(file, "unit", f"unknown unit {excerpt(unit)} (known: {', '.join(UNITS)})")

    start = _as_date(raw["start"], file, "start")
    end = _as_date(raw["end"], file, "end")
    if end < start:
        raise ExperimentFileError(file, "end", f"{end} is before start {start}")

    population = _parse_population(raw.get("population"), file)

    treated_fraction = raw.get("treated_fraction", DEFAULT_TREATED_FRACTION)
    if not _is_number(treated_fraction) or not (0 < treated_fraction < 1):
        raise ExperimentFileError(
            file, "treated_fraction", f"{excerpt(treated_fraction)} is not a number strictly between 0 and 1"
        )

    price_change = _parse_price_change(raw["treatment"], file)

    seed = raw["seed"]
    if not _is_int(seed):
        raise ExperimentFileError(file, "seed", f"{excerpt(seed)} is not an integer")

    metric, metrics = _parse_metrics(raw, file)
    guardrails = _parse_guardrails(raw.get("guardrails"), file, metrics or (metric,))
    costs = _parse_costs(raw.get("costs"), file)

    phase_days, blackout_days, trigger_event, duration_days = _design_fields(raw, design, file)

    return ExperimentSpec(
        name=name, design=design, start=start, end=end, unit=unit, population=population,
        treated_fraction=float(treated_fraction), price_change=float(price_change),
        phase_days=phase_days, blackout_days=blackout_days, trigger_event=trigger_event,
        duration_days=duration_days, metric=metric, seed=int(seed), source=file,
        metrics=metrics, guardrails=guardrails, costs=costs,
    )


def _parse_metrics(raw: dict, file: str) -> tuple[str, tuple]:
    """(primary metric, metrics tuple: empty when only one) from `metric` / `metrics`."""
    if "metric" in raw and "metrics" in raw:
        raise ExperimentFileError(file, "metrics", "give either `metric` or `metrics` (a list, the first primary), not both")
    if "metrics" in raw:
        names, where = raw["metrics"], "metrics"
        if not isinstance(names, list) or not names:
            raise ExperimentFileError(file, "metrics", f"{excerpt(names)} is not a non-empty list of metric names")
    else:
        names, where = [raw.get("metric", DEFAULT_METRIC)], "metric"
    for name in names:
        if not isinstance(name, str) or not METRIC_PATTERN.fullmatch(name):
            raise ExperimentFileError(file, where, f"{excerpt(name)} is not a metric (units, revenue, profit or a sales column)")
    if len(set(names)) != len(names):
        raise ExperimentFileError(file, where, f"{excerpt(next(n for n in names if names.count(n) > 1))} is listed twice")
    if len(names) > metric_rules.MAX_METRICS:
        raise ExperimentFileError(file, where, f"{len(names)} metrics is more than {metric_rules.MAX_METRICS}")
    return names[0], (tuple(names) if len(names) > 1 else ())


def _parse_guardrails(value, file: str, metrics: tuple) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ExperimentFileError(file, "guardrails", "expected a list like [{metric: profit, direction: must_not_fall, tolerance: 0.02}]")
    out, seen = [], set()
    for i, item in enumerate(value):
        where = f"guardrails[{i}]"
        if not isinstance(item, dict):
            raise ExperimentFileError(file, where, "expected a mapping {metric, direction, tolerance}")
        for key in item:
            if key not in metric_rules.GUARDRAIL_FIELDS:
                raise ExperimentFileError(file, f"{where}.{str(key)[:EXCERPT_CHARS]}",
                                          f"unknown field (known: {', '.join(metric_rules.GUARDRAIL_FIELDS)})")
        for key in metric_rules.GUARDRAIL_FIELDS:
            if item.get(key) is None:
                raise ExperimentFileError(file, f"{where}.{key}", "missing required field")
        metric, direction, tolerance = item["metric"], item["direction"], item["tolerance"]
        if metric not in metrics:
            raise ExperimentFileError(file, f"{where}.metric", f"{excerpt(metric)} is not one of the experiment's metrics "
                                      f"({', '.join(metrics)}): add it to `metrics`")
        if metric in seen:
            raise ExperimentFileError(file, f"{where}.metric", f"{excerpt(metric)} has a guardrail already")
        if direction not in metric_rules.GUARDRAIL_DIRECTIONS:
            raise ExperimentFileError(file, f"{where}.direction", f"{excerpt(direction)} is not a direction "
                                      f"(known: {', '.join(metric_rules.GUARDRAIL_DIRECTIONS)})")
        if not _is_number(tolerance) or not (0 <= tolerance < 1):
            raise ExperimentFileError(file, f"{where}.tolerance", f"{excerpt(tolerance)} is not a relative change in [0, 1) "
                                      "(write 0.02 for 2%)")
        seen.add(metric)
        out.append((metric, direction, float(tolerance)))
    return tuple(out)


def _parse_costs(value, file: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not value:
        raise ExperimentFileError(file, "costs", "expected a mapping category -> {unit_cost: 3.5} or {margin_rate: 0.3}")
    out = {}
    for category, given in value.items():
        where = f"costs.{str(category)[:EXCERPT_CHARS]}"
        if not isinstance(given, dict) or len(given) != 1 or next(iter(given)) not in metric_rules.COST_FIELDS:
            raise ExperimentFileError(file, where, "expected exactly one of {unit_cost: <money>} or {margin_rate: <share>}")
        key, number = next(iter(given.items()))
        if not _is_number(number) or not math.isfinite(number):
            raise ExperimentFileError(file, f"{where}.{key}", f"{excerpt(number)} is not a number")
        if key == "unit_cost" and number < 0:
            raise ExperimentFileError(file, f"{where}.{key}", f"{number} is negative")
        if key == "margin_rate" and not (-1 < number < 1):
            raise ExperimentFileError(file, f"{where}.{key}", f"{number} is not a share of the price in (-1, 1) (write 0.3 for 30%)")
        out[str(category)] = {key: float(number)}
    return dict(sorted(out.items()))


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
