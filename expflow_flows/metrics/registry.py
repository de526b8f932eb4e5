"""The standard metrics registry: every metric's group, type, direction and default threshold.

A metric has a short name (``nrmse``) and a ClearML-style full name ``Group/name``
(``PDE/nrmse``); lookups accept either. A threshold (``lt:18.09``) makes a default gate.
The built-ins cover the competition scores and what the built-in trainables report, plus
the metrics each installed workload registers (the PDE workload adds PDEBench's, see
:mod:`expflow_flows.workloads`); ``<expflow home>/metrics.yaml`` (or the file named by
``$EXPFLOW_METRICS_REGISTRY``) extends or overrides them.

The YAML file is either a list of specs or a mapping ``name -> fields``::

    - name: Score/seg_total           # or name: seg_total with group: Score
      direction: maximize
      threshold: ge:0.5               # 'op:value', [op, value] or null
    PDE/pde_mean: {threshold: lt:17}  # mapping form; a known metric keeps unnamed fields

A new metric needs a group and a direction; an entry for a known metric overrides only the
fields it names (``threshold: null`` removes a threshold).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from expflow_flows import workloads
from expflow_flows.errors import ExpflowError
from expflow_flows.home import expflow_home
from expflow_flows.metrics.gates import Gate, parse_gates
from expflow_flows.metrics.rules import (
    OPS_TEXT,
    RuleSyntaxError,
    condition,
    parse_condition,
    parse_rule,
)

TYPES = ("float", "int")
DIRECTIONS = ("minimize", "maximize")
FIELDS = ("name", "group", "type", "direction", "threshold", "description")
REGISTRY_ENV = "EXPFLOW_METRICS_REGISTRY"
REGISTRY_FILE = "metrics.yaml"
_THRESHOLD_FORMS = f"'op:value' such as 'lt:0.05', [op, value], or null; op one of {OPS_TEXT}"
# Characters a name cannot hold: '/' separates the group, ':' and ',' separate gates.
_FORBIDDEN = "/:,"

Threshold = tuple[str, float]


def _check_part(what: str, value: object, metric: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ExpflowError(
            f"metric {metric!r}: {what} {value!r} is not accepted; expected non-empty text"
        )
    bad = [c for c in _FORBIDDEN if c in value]
    if bad or value != value.strip():
        raise ExpflowError(
            f"metric {metric!r}: {what} {value!r} is not accepted; expected text without "
            f"'/', ':', ',' or surrounding spaces"
        )
    return value


def _threshold(raw: object, name: str, group: str) -> Threshold | None:
    """Normalise a threshold to ``(op, value)``; text may name the metric (``m:lt:1``)."""
    full = f"{group}/{name}"
    bad = ExpflowError(
        f"metric {full!r}: threshold {raw!r} is not accepted; expected {_THRESHOLD_FORMS}"
    )
    if raw is None:
        return None
    try:
        if isinstance(raw, str) and raw.count(":") == 2:
            rule = parse_rule(raw)
            if rule.metric not in (name, full):
                raise bad
            cond = rule.condition
        elif isinstance(raw, str):
            cond = parse_condition(raw)
        elif isinstance(raw, (list, tuple)) and len(raw) == 2:
            cond = condition(*raw)
        else:
            raise bad
    except RuleSyntaxError:
        raise bad from None
    return cond.op, cond.value


@dataclass(frozen=True)
class MetricSpec:
    """One metric: name, group, value type, which way is better and an optional threshold."""

    name: str
    group: str
    type: str = "float"
    direction: str = "minimize"
    # Accepts 'op:value', 'name:op:value' or (op, value); stored as (op, float) or None.
    threshold: Threshold | str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        shown = f"{self.group}/{self.name}"
        _check_part("name", self.name, shown)
        _check_part("group", self.group, shown)
        if self.type not in TYPES:
            raise ExpflowError(
                f"metric {shown!r}: type {self.type!r} is not accepted; accepted: {', '.join(TYPES)}"
            )
        if self.direction not in DIRECTIONS:
            raise ExpflowError(
                f"metric {shown!r}: direction {self.direction!r} is not accepted; "
                f"accepted: {', '.join(DIRECTIONS)}"
            )
        if not isinstance(self.description, str):
            raise ExpflowError(
                f"metric {shown!r}: description {self.description!r} is not accepted; expected text"
            )
        # Frozen, so normalise through object.__setattr__ once, here.
        object.__setattr__(self, "threshold", _threshold(self.threshold, self.name, self.group))

    @property
    def full_name(self) -> str:
        """The ClearML-style name ``Group/name``."""
        return f"{self.group}/{self.name}"

    def gate(self) -> Gate | None:
        """The default gate this metric's threshold implies, or None without a threshold."""
        if self.threshold is None:
            return None
        op, value = self.threshold
        # repr round-trips the float, so the gate text states the exact threshold.
        return Gate.parse(f"{self.full_name}:{op}:{value!r}")

    def to_dict(self) -> dict[str, Any]:
        """A YAML/JSON-friendly view (threshold as ``'op:value'`` text)."""
        threshold = None
        if self.threshold is not None:
            threshold = f"{self.threshold[0]}:{self.threshold[1]!r}"
        return {
            "name": self.name,
            "group": self.group,
            "type": self.type,
            "direction": self.direction,
            "threshold": threshold,
            "description": self.description,
        }


def _spec(name: str, group: str, direction: str = "minimize", **kw: Any) -> MetricSpec:
    return MetricSpec(name=name, group=group, direction=direction, **kw)


# The core's own metrics; builtin_specs() adds the workloads' (BUILTIN is both).
CORE_METRICS: tuple[MetricSpec, ...] = (
    _spec("seg_total", "Score", "maximize", description="competition segmentation total score"),
    _spec(
        "pde_mean",
        "PDE",
        threshold=("lt", 18.09),
        description="competition PDE score: mean over the PDE tasks",
    ),
    _spec(
        "train_time_min",
        "Time",
        threshold=("lt", 60.0),
        description="training wall time in minutes (competition limit)",
    ),
    _spec("val_mse", "Loss", description="validation mean squared error"),
    _spec("train_loss", "Loss", description="training loss (last epoch)"),
    _spec("val_nrmse", "Loss", description="validation nRMSE (the HPO objective)"),
    _spec("val_rmse", "Loss", description="validation RMSE at the best epoch"),
    _spec("train_time_s", "Time", description="training wall time in seconds"),
    _spec("eval_time_s", "Time", description="evaluation wall time in seconds"),
    _spec("best_epoch", "Train", type="int", description="epoch of the best validation nRMSE"),
    _spec("epochs", "Train", type="int", description="epochs run"),
    _spec("n_params", "Model", type="int", description="trainable parameters of the model"),
    _spec("n_test", "Data", "maximize", type="int", description="test samples evaluated"),
    _spec(
        "llm_cost_usd",
        "LLM",
        description="USD spent on LLM calls by the run's trials and stages (llm_calls.jsonl)",
    ),
    _spec(
        "llm_calls", "LLM", type="int", description="LLM calls made by the run's trials and stages"
    ),
)


def builtin_specs() -> tuple[MetricSpec, ...]:
    """The core's metrics and those the installed workloads register (loaded on first call)."""
    return (*CORE_METRICS, *workloads.loaded().metrics)


def __getattr__(name: str) -> Any:
    # BUILTIN includes the workloads' metrics, so it is built on first use, not at import.
    if name == "BUILTIN":
        return builtin_specs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MetricsRegistry:
    """Metric specs by full name; lookups accept ``name`` or ``Group/name``."""

    def __init__(self, specs: Iterable[MetricSpec] = ()) -> None:
        self._specs: dict[str, MetricSpec] = {}
        for spec in specs:
            if spec.full_name in self._specs:
                raise ExpflowError(f"metric {spec.full_name!r} is registered twice")
            self._specs[spec.full_name] = spec

    @classmethod
    def builtin(cls) -> MetricsRegistry:
        """The built-in registry: the core's metrics and the installed workloads'."""
        return cls(builtin_specs())

    @classmethod
    def from_yaml(cls, path: Path | str, base: MetricsRegistry | None = None) -> MetricsRegistry:
        """``base`` (default: the built-ins) extended or overridden by the specs in a YAML file."""
        path = Path(path).expanduser()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ExpflowError(
                f"metrics registry file {str(path)!r} does not exist; expected a YAML list "
                "or mapping of metric specs"
            ) from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ExpflowError(
                f"metrics registry file {str(path)!r} is not readable YAML ({reason})"
            ) from None
        base = base if base is not None else cls.builtin()
        try:
            return base.extended(_entries(data))
        except ExpflowError as exc:
            raise ExpflowError(f"{path}: {exc}") from None

    def extended(self, entries: Iterable[tuple[str, Mapping[str, Any]]]) -> MetricsRegistry:
        """A new registry with ``(key, fields)`` entries added or merged over existing specs."""
        specs = dict(self._specs)
        seen: set[str] = set()
        for key, entry in entries:
            spec = _merge(key, entry, self)
            if spec.full_name in seen:
                raise ExpflowError(f"metric {spec.full_name!r} is given twice")
            seen.add(spec.full_name)
            specs[spec.full_name] = spec
        return MetricsRegistry(specs.values())

    def _find(self, name: str) -> list[MetricSpec]:
        if name in self._specs:
            return [self._specs[name]]
        if "/" in name:
            return []  # a full name must match exactly: a wrong group is a different metric
        return [s for s in self._specs.values() if s.name == name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self._find(name))

    def __iter__(self) -> Iterator[MetricSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: s.full_name))

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, name: str) -> MetricSpec:
        """The spec for ``name`` or ``Group/name``; unknown or ambiguous names are ExpflowErrors."""
        found = self._find(name) if isinstance(name, str) else []
        if len(found) == 1:
            return found[0]
        if found:
            options = ", ".join(sorted(s.full_name for s in found))
            raise ExpflowError(f"metric {name!r} is ambiguous; use one of: {options}")
        raise ExpflowError(
            f"metric {name!r} is not known; known metrics: {', '.join(self.names())}"
        )

    def names(self) -> list[str]:
        """Every full name, sorted."""
        return sorted(self._specs)

    def direction(self, name: str) -> str:
        """``minimize`` or ``maximize`` for ``name``."""
        return self.get(name).direction

    def thresholds(self) -> list[Gate]:
        """The default gates implied by the thresholds, sorted by full name."""
        return [gate for spec in self if (gate := spec.gate()) is not None]

    def to_list(self) -> list[dict[str, Any]]:
        """Every spec as a dict, sorted by full name."""
        return [spec.to_dict() for spec in self]


def _entries(data: object) -> list[tuple[str, Mapping[str, Any]]]:
    """(key, fields) pairs from a YAML list or mapping; an empty file gives none."""
    if data is None:
        return []
    if isinstance(data, list):
        out = []
        for i, entry in enumerate(data):
            if not isinstance(entry, Mapping):
                raise ExpflowError(
                    f"entry {i} ({entry!r}) is not a mapping; expected fields {', '.join(FIELDS)}"
                )
            name = entry.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ExpflowError(
                    f"entry {i} has no 'name' (got {name!r}); expected fields {', '.join(FIELDS)}"
                )
            out.append((name, entry))
        return out
    if isinstance(data, Mapping):
        out = []
        for key, entry in data.items():
            if entry is None:
                entry = {}
            if not isinstance(key, str) or not isinstance(entry, Mapping):
                raise ExpflowError(
                    f"metric {key!r}: value {entry!r} is not a mapping; expected fields "
                    f"{', '.join(FIELDS)}"
                )
            out.append((key, entry))
        return out
    raise ExpflowError(
        f"the file holds {type(data).__name__}; expected a list of metric specs or a "
        "mapping of metric name -> fields"
    )


def _merge(key: str, entry: Mapping[str, Any], base: MetricsRegistry) -> MetricSpec:
    """The spec an entry describes: merged over the known spec it names, or new."""
    unknown = sorted(str(k) for k in entry if k not in FIELDS)
    if unknown:
        raise ExpflowError(
            f"metric {key!r}: unknown field {unknown[0]!r}; accepted fields: {', '.join(FIELDS)}"
        )
    name = entry.get("name", key)
    if not isinstance(name, str) or name != key:
        raise ExpflowError(
            f"metric {key!r}: name {name!r} differs from its key; give the name once"
        )
    group = entry.get("group")
    if "/" in name:
        head, _, name = name.rpartition("/")
        if group is not None and group != head:
            raise ExpflowError(
                f"metric {key!r}: group {group!r} differs from the group {head!r} in its name"
            )
        group = head
    known = None
    if group is not None:
        if f"{group}/{name}" in base:
            known = base.get(f"{group}/{name}")
    elif name in base:
        known = base.get(name)  # raises when the short name is ambiguous
    values = {k: entry[k] for k in FIELDS if k in entry and k != "name"}
    values["name"] = name
    values["group"] = group
    if known is not None:
        values["group"] = known.group
        # Fields the entry does not name keep the known spec's values.
        return replace(known, **values)
    missing = [f for f in ("group", "direction") if values.get(f) is None]
    if missing:
        raise ExpflowError(
            f"metric {key!r} is new and lacks {' and '.join(repr(m) for m in missing)}; "
            f"a new metric needs a group (or 'Group/name') and a direction "
            f"({', '.join(DIRECTIONS)})"
        )
    return MetricSpec(**values)


def registry_path() -> Path | None:
    """The registry file in use: ``$EXPFLOW_METRICS_REGISTRY``, else ``<home>/metrics.yaml`` when present."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env).expanduser()
    path = expflow_home() / REGISTRY_FILE
    return path if path.exists() else None


def load_registry(path: Path | str | None = None) -> MetricsRegistry:
    """The registry from ``path``, else :func:`registry_path`, else the built-ins.

    A file named explicitly or by the environment must exist (fail closed).
    """
    chosen = Path(path).expanduser() if path is not None else registry_path()
    if chosen is None:
        return MetricsRegistry.builtin()
    return MetricsRegistry.from_yaml(chosen)


def parse_gates_strict(
    items: str | Gate | Iterable[str | Gate] | None, registry: MetricsRegistry
) -> list[Gate]:
    """Parse gates like :func:`gates.parse_gates`, rejecting metrics the registry does not know."""
    parsed = parse_gates(items)
    for gate in parsed:
        if gate.metric not in registry:
            raise ExpflowError(
                f"gate {gate.text!r}: unknown metric {gate.metric!r}; known metrics: "
                f"{', '.join(registry.names())}"
            )
    return parsed


__all__ = [
    "CORE_METRICS",
    "DIRECTIONS",
    "FIELDS",
    "REGISTRY_ENV",
    "REGISTRY_FILE",
    "TYPES",
    "MetricSpec",
    "MetricsRegistry",
    "builtin_specs",
    "load_registry",
    "parse_gates_strict",
    "registry_path",
]
