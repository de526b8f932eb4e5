"""HPO search spaces from YAML or a dict, turned into Optuna suggestions.

Each key is a parameter. Its value is either a mapping that says how to search
it::

    lr:      {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
    layers:  {type: int, low: 1, high: 6}
    width:   {type: int, low: 32, high: 256, step: 32}
    act:     {type: categorical, choices: [relu, tanh, gelu]}

or a plain value (string, number, boolean, null), passed through unchanged as a
fixed parameter. Parameters are suggested in the order they are written.
Optuna is imported only when a space is used with it, so importing this module
stays light.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expflow_flows.errors import ExpflowError
from expflow_flows.yamlfile import read_mapping

if TYPE_CHECKING:
    import optuna

TYPES = ("float", "int", "categorical")
KEYS: dict[str, tuple[str, ...]] = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
Scalar = str | int | float | bool | None


def _err(key: object, message: str) -> ExpflowError:
    return ExpflowError(f"search space key {key!r}: {message}")


@dataclass(frozen=True)
class FloatParam:
    """A float searched between ``low`` and ``high`` (log scale or stepped, not both)."""

    name: str
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def suggest(self, trial: optuna.trial.BaseTrial) -> float:
        """Ask the trial for a value."""
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The matching Optuna distribution."""
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def to_value(self) -> dict[str, Any]:
        """The mapping this parameter is written as."""
        out: dict[str, Any] = {"type": "float", "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class IntParam:
    """An integer searched from ``low`` to ``high`` inclusive."""

    name: str
    low: int
    high: int
    log: bool = False
    step: int = 1

    def suggest(self, trial: optuna.trial.BaseTrial) -> int:
        """Ask the trial for a value."""
        return trial.suggest_int(self.name, self.low, self.high, step=self.step, log=self.log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The matching Optuna distribution."""
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def to_value(self) -> dict[str, Any]:
        """The mapping this parameter is written as."""
        out: dict[str, Any] = {"type": "int", "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step != 1:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class CategoricalParam:
    """One of a fixed list of choices."""

    name: str
    choices: tuple[Scalar, ...]

    def suggest(self, trial: optuna.trial.BaseTrial) -> Scalar:
        """Ask the trial for a value."""
        return trial.suggest_categorical(self.name, list(self.choices))

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The matching Optuna distribution."""
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choices)

    def to_value(self) -> dict[str, Any]:
        """The mapping this parameter is written as."""
        return {"type": "categorical", "choices": list(self.choices)}


@dataclass(frozen=True)
class Fixed:
    """A value passed through unchanged, never searched."""

    name: str
    value: Scalar

    def to_value(self) -> Scalar:
        """The plain value this parameter is written as."""
        return self.value


Param = FloatParam | IntParam | CategoricalParam | Fixed
Searched = FloatParam | IntParam | CategoricalParam


def _number(key: str, field: str, raw: object, *, integer: bool = False) -> float | int:
    # PyYAML reads 1e-5 (no dot) as a string, so numeric text is accepted.
    kind = "an integer" if integer else "a number"
    if isinstance(raw, bool) or raw is None:
        raise _err(key, f"{field} {raw!r} is not {kind}")
    if isinstance(raw, str):
        try:
            raw = int(raw) if integer and raw.strip().lstrip("+-").isdigit() else float(raw)
        except ValueError:
            raise _err(key, f"{field} {raw!r} is not {kind}") from None
    if not isinstance(raw, (int, float)):
        raise _err(key, f"{field} {raw!r} is not {kind}")
    if not math.isfinite(raw):
        raise _err(key, f"{field} {raw!r} is not a finite number")
    if integer:
        if isinstance(raw, float) and not raw.is_integer():
            raise _err(key, f"{field} {raw!r} is not an integer (type int needs whole numbers)")
        return int(raw)
    return float(raw)


def _bool(key: str, field: str, raw: object) -> bool:
    if not isinstance(raw, bool):
        raise _err(key, f"{field} {raw!r} must be true or false")
    return raw


def _parse_range(key: str, spec: Mapping[str, Any], kind: str) -> Param:
    integer = kind == "int"
    missing = [f for f in ("low", "high") if f not in spec]
    if missing:
        raise _err(key, f"type {kind} needs low and high; missing {' and '.join(missing)}")
    low = _number(key, "low", spec["low"], integer=integer)
    high = _number(key, "high", spec["high"], integer=integer)
    if low > high:
        raise _err(key, f"low {low!r} is greater than high {high!r}")
    log = _bool(key, "log", spec.get("log", False))
    step = None
    if "step" in spec:
        if log:
            raise _err(key, "log and step cannot be used together; drop one of them")
        step = _number(key, "step", spec["step"], integer=integer)
        if step <= 0:
            raise _err(key, f"step {step!r} must be greater than 0")
    if log and low <= 0:
        raise _err(key, f"log scale needs low > 0, got low {low!r}")
    if integer:
        return IntParam(key, int(low), int(high), log, int(step) if step is not None else 1)
    return FloatParam(key, float(low), float(high), log, step)


def _parse_categorical(key: str, spec: Mapping[str, Any]) -> CategoricalParam:
    if "choices" not in spec:
        raise _err(key, "type categorical needs choices (a list)")
    raw = spec["choices"]
    if not isinstance(raw, (list, tuple)):
        raise _err(key, f"choices {raw!r} must be a list")
    if not raw:
        raise _err(key, "choices is empty; give at least one choice")
    seen: list[Scalar] = []
    for choice in raw:
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise _err(
                key,
                f"choice {choice!r} is a {type(choice).__name__}; choices must be "
                "strings, numbers, booleans or null",
            )
        # 1 == 1.0 == True in Python, so compare with the type to find real repeats.
        if any(type(choice) is type(s) and choice == s for s in seen):
            raise _err(key, f"choice {choice!r} is listed twice")
        seen.append(choice)
    return CategoricalParam(key, tuple(seen))


def parse_param(key: object, value: object) -> Param:
    """One parameter from its key and value; any problem is an ExpflowError naming the key."""
    if not isinstance(key, str) or not key.strip():
        raise ExpflowError(f"search space key {key!r} must be a non-empty parameter name")
    if isinstance(value, Mapping):
        if "type" not in value:
            raise _err(
                key,
                f"mapping has no type; expected type one of {', '.join(TYPES)} "
                "(or a plain value for a fixed parameter)",
            )
        kind = value["type"]
        if not isinstance(kind, str) or kind.lower() not in TYPES:
            raise _err(key, f"unknown type {kind!r}; expected one of {', '.join(TYPES)}")
        kind = kind.lower()
        extra = [k for k in value if k not in KEYS[kind]]
        if extra:
            raise _err(
                key,
                f"unknown key {extra[0]!r} for type {kind}; accepted: {', '.join(KEYS[kind])}",
            )
        if kind == "categorical":
            return _parse_categorical(key, value)
        return _parse_range(key, value, kind)
    if isinstance(value, (list, tuple)):
        raise _err(
            key,
            f"a list {list(value)!r} is ambiguous; to search it write "
            "{type: categorical, choices: [...]}",
        )
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise _err(
            key,
            f"value {value!r} ({type(value).__name__}) is neither a search mapping nor a plain "
            "value (string, number, boolean, null)",
        )
    return Fixed(key, value)


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of searched and fixed parameters."""

    params: tuple[Param, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Build a space from ``{name: spec-or-value}``; an empty or bad space is an error."""
        if not isinstance(data, Mapping):
            raise ExpflowError(
                f"search space must be a mapping of parameter names, got {type(data).__name__}"
            )
        if not data:
            raise ExpflowError("search space is empty; expected at least one parameter")
        return cls(tuple(parse_param(k, v) for k, v in data.items()))

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """Read a space from a YAML file; a missing, invalid or non-mapping file is an error."""

        data = read_mapping(
            path,
            "search space file",
            "expected a mapping of parameter names",
            mapping="a mapping of parameter names",
        )
        return cls.from_dict(data)

    @classmethod
    def load(cls, value: str | Path | Mapping[str, Any] | SearchSpace) -> SearchSpace:
        """A space from a YAML path, a mapping, or an existing space."""
        if isinstance(value, SearchSpace):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if isinstance(value, (str, Path)):
            return cls.from_yaml(value)
        raise ExpflowError(
            f"search space {value!r} is a {type(value).__name__}; expected a YAML path or a mapping"
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Every parameter name, searched and fixed, in order."""
        return tuple(p.name for p in self.params)

    @property
    def searched(self) -> tuple[Searched, ...]:
        """The parameters that are searched (not fixed), in order."""
        return tuple(p for p in self.params if not isinstance(p, Fixed))

    @property
    def fixed(self) -> dict[str, Scalar]:
        """The fixed values, in order."""
        return {p.name: p.value for p in self.params if isinstance(p, Fixed)}

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """All parameters for one trial: suggested values and fixed ones, in space order."""
        return {
            p.name: (p.value if isinstance(p, Fixed) else p.suggest(trial)) for p in self.params
        }

    def to_optuna_distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Distributions of the searched parameters, for ``study.ask(fixed_distributions=...)``."""
        return {p.name: p.distribution() for p in self.searched}

    def complete(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Searched ``values`` (e.g. ``trial.params``) plus the fixed ones, in space order."""
        missing = [p.name for p in self.searched if p.name not in values]
        if missing:
            raise ExpflowError(
                f"values lack searched parameter(s) {', '.join(missing)}; "
                f"expected all of {', '.join(p.name for p in self.searched)}"
            )
        return {p.name: (p.value if isinstance(p, Fixed) else values[p.name]) for p in self.params}

    def to_dict(self) -> dict[str, Any]:
        """The mapping form; ``SearchSpace.from_dict(space.to_dict()) == space``."""
        return {p.name: p.to_value() for p in self.params}
