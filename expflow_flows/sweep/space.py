"""Parameter spaces for sweeps (1,000 to 100,000 combinations), from YAML or a dict.

A space has these parts, all optional, though together they must define at least one
parameter::

    fixed: {problem: advection}                 # constant in every combination
    grid: {lr: [0.001, 0.01], modes: [8, 16]}   # cartesian product
    zip:                                        # groups of equally long lists, zipped
      - {nx: [64, 128], nt: [21, 41]}
    sample:                                     # seeded random or latin-hypercube samples
      n: 20
      seed: 0                                   # default 0
      method: random                            # or lhs; default random
      params:
        l2: {low: 1.0e-8, high: 1.0e-2, log: true}
        width: {low: 0, high: 8, type: int}
        act: {choices: [relu, gelu]}
    conditional:                                # extra params only where others match
      - when: {optimizer: sgd}                  # a list means any of; [[64, 64]] one list
        grid: {momentum: [0.0, 0.9]}
    constraints: ["modes <= nx // 2"]           # combinations where any is false are dropped
    derived: {epochs: "200 // batch_size"}      # computed after constraints, in written order
    replicates: {param: seed, values: [0, 1, 2]}  # or {param: seed, n: 3} for 0, 1, 2

Order. Combinations are the product of these axes, the last varying fastest: each grid
param in written order, then each zip group, then the sample (one axis of ``n`` rows),
then the conditional blocks (applied in written order to each combination so far; a
block whose ``when`` matches multiplies it by its own grid, later blocks may test
params added by earlier ones), then the replicates, innermost, so the replicates of one
configuration come one after another. Params appear in each dict in that order too:
fixed, grid, zip, sample, conditional, replicate, derived.

Sampling. Values come from numpy's PCG64 bit generator, whose raw stream is fixed for a
seed on every platform and numpy version; each param has its own stream, seeded from
the sample seed and the param's name, so adding a param leaves the others' values
alone. Floats lie in [low, high), ints in [low, high]; ``log: true`` samples the
logarithm uniformly. Linear values use only IEEE arithmetic, so they are bit-identical
everywhere; log-scaled ones go through ``math.exp``/``math.log``, which could differ in
the last bit between C libraries.

Expressions. Constraints and derived values are parsed with ``ast`` and run by a small
interpreter, never ``eval``: only param names, constants, arithmetic, comparisons
(including ``in`` with a tuple or list literal), and/or/not, ``x if c else y`` and calls to
the functions in ``FUNCTIONS`` are accepted. Names are checked against the params when
the space is loaded. A conditional param can be absent from a combination; the rule is
that an expression that *needs* an absent param (``and``/``or``/``if`` short-circuit, so
``optimizer != 'sgd' or momentum > 0`` never needs it for adam) drops the combination,
for constraints and derived values alike, rather than guessing a value.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import itertools
import json
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.yamlfile import read_mapping

# A sweep is planned and stored one row per combination: past this many, a space is a typo
# (an extra zero, a range written out as a list) and is refused before it is enumerated.
MAX_COMBINATIONS = 10_000_000
PARTS = ("fixed", "grid", "zip", "sample", "conditional", "constraints", "derived", "replicates")
METHODS = ("random", "lhs")
SAMPLE_KEYS = ("n", "seed", "method", "params")
RANGE_KEYS = ("low", "high", "log", "type")
CHOICE_KEYS = ("choices", "type")
SAMPLE_TYPES = ("float", "int", "categorical")
CONDITIONAL_KEYS = ("when", "grid")
REPLICATE_KEYS = ("param", "values", "n")
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "round": round,
    "int": int,
    "float": float,
    "len": len,
    "log": math.log,
    "exp": math.exp,
    "sqrt": math.sqrt,
}
ALLOWED = (
    "param names, numbers, strings, booleans, arithmetic (+ - * / // % **), comparisons, "
    f"and/or/not, 'x if c else y', and calls to {', '.join(FUNCTIONS)}"
)
Params = dict[str, Any]
Part = tuple[tuple[str, Any], ...]


def _err(where: str, message: str) -> ExpflowError:
    return ExpflowError(f"sweep space {where}: {message}")


# ---------------------------------------------------------------- values and identity


def _is_numpy(value: object) -> bool:
    # Checked by module name so this module does not import numpy unless it samples.
    return type(value).__module__ == "numpy" and hasattr(value, "tolist")


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON-like data (lists, str-keyed dicts, scalars), or an error."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if _is_numpy(value):
        return _plain(value.tolist(), where)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _err(where, f"mapping key {k!r} in a value must be a string")
            out[k] = _plain(v, where)
        return out
    raise _err(
        where,
        f"value {value!r} is a {type(value).__name__}; values must be strings, numbers, "
        "booleans, null, or lists/mappings of them",
    )


def _json_default(value: Any) -> Any:
    if _is_numpy(value):
        return value.tolist()
    raise TypeError(f"{value!r} ({type(value).__name__}) is not JSON-like")


def _check_keys(value: Any) -> None:
    # json.dumps would turn {1: x} into {"1": x} and give it the id of {"1": x}.
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ExpflowError(f"combination_id: mapping key {k!r} must be a string")
            _check_keys(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_keys(v)


def canonical_json(params: Mapping[str, Any]) -> str:
    """Params as canonical JSON: sorted keys, no spaces, floats by ``repr``, numpy made plain."""
    for key, value in params.items():
        if not isinstance(key, str):
            raise ExpflowError(f"combination_id: param name {key!r} must be a string")
        if isinstance(value, (Mapping, list, tuple)):
            _check_keys(value)
    try:
        # json writes floats with float.__repr__ (0.1 -> "0.1", 1.0 -> "1.0", 1 -> "1").
        return json.dumps(params, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ExpflowError(f"combination_id: params are not JSON-like ({exc})") from None


def combination_id(params: Mapping[str, Any]) -> str:
    """Stable identity of a params dict: first 16 hex chars of sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(params).encode("utf-8")).hexdigest()[:16]


def _key(value: Any) -> str:
    # Strict identity of one value (1, 1.0 and True differ), for finding repeats.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _same(a: Any, b: Any) -> bool:
    # Loose equality for ``when`` (1 matches 1.0) that still keeps booleans apart from 1/0.
    return (type(a) is bool) == (type(b) is bool) and a == b


# ---------------------------------------------------------------- safe expressions


class _MissingParam(Exception):
    """An expression needed a param that this combination does not have."""


_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
    ast.Not: operator.not_,
    ast.Invert: operator.invert,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_MAX_EXPONENT = 10_000
_MAX_REPEAT = 1_000_000


def _mul(a: Any, b: Any) -> Any:
    # Refuse "'x' * 10**9"-style memory bombs; numbers multiply freely.
    for seq, times in ((a, b), (b, a)):
        if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
            if len(seq) * max(times, 0) > _MAX_REPEAT:
                raise ValueError(f"repetition longer than {_MAX_REPEAT} items")
    return a * b


def _pow(a: Any, b: Any) -> Any:
    # A huge integer power (2 ** 10**9) would hang the sweep; floats just overflow.
    if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > _MAX_EXPONENT:
        raise ValueError(f"integer exponent {b} is larger than {_MAX_EXPONENT}")
    return a**b


_BINOPS[ast.Mult] = _mul
_BINOPS[ast.Pow] = _pow

Evaluator = Callable[[Mapping[str, Any]], Any]


class _Checker:
    """Walks a parsed expression, refusing anything outside the whitelist."""

    def __init__(self, source: str, where: str) -> None:
        self.source = source
        self.where = where
        self.names: list[str] = []

    def refuse(self, what: str) -> ExpflowError:
        return _err(
            self.where,
            f"expression {self.source!r} uses {what}, which is not allowed; allowed: {ALLOWED}",
        )

    def build(self, node: ast.AST) -> Evaluator:
        """Check ``node`` and return a function that evaluates it against a params mapping."""
        if isinstance(node, ast.Constant):
            value = node.value
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise self.refuse(f"the constant {value!r}")
            return lambda env: value
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.BinOp):
            op = _BINOPS.get(type(node.op))
            if op is None:
                raise self.refuse(f"the operator {type(node.op).__name__}")
            left, right = self.build(node.left), self.build(node.right)
            return lambda env: op(left(env), right(env))
        if isinstance(node, ast.UnaryOp):
            unary = _UNARY[type(node.op)]
            operand = self.build(node.operand)
            return lambda env: unary(operand(env))
        if isinstance(node, ast.BoolOp):
            return self._boolop(node)
        if isinstance(node, ast.Compare):
            return self._compare(node)
        if isinstance(node, ast.IfExp):
            test, body, orelse = (self.build(n) for n in (node.test, node.body, node.orelse))
            return lambda env: body(env) if test(env) else orelse(env)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, (ast.Tuple, ast.List)):
            # Only so that "act in ('relu', 'gelu')" can be written.
            items = [self.build(n) for n in node.elts]
            return lambda env: tuple(item(env) for item in items)
        if isinstance(node, ast.Attribute):
            raise self.refuse(f"attribute access (.{node.attr})")
        if isinstance(node, ast.Subscript):
            raise self.refuse("subscripts ([...])")
        if isinstance(node, ast.Lambda):
            raise self.refuse("lambda")
        raise self.refuse(f"a {type(node).__name__} node")

    def _name(self, name: str) -> Evaluator:
        if name.startswith("__"):
            raise self.refuse(f"the dunder name {name!r}")
        if name not in self.names:
            self.names.append(name)

        def get(env: Mapping[str, Any]) -> Any:
            try:
                return env[name]
            except KeyError:
                raise _MissingParam(name) from None

        return get

    def _boolop(self, node: ast.BoolOp) -> Evaluator:
        parts = [self.build(n) for n in node.values]
        if isinstance(node.op, ast.And):

            def all_of(env: Mapping[str, Any]) -> Any:
                value: Any = True
                for part in parts:
                    value = part(env)
                    if not value:
                        return value
                return value

            return all_of

        def any_of(env: Mapping[str, Any]) -> Any:
            value: Any = False
            for part in parts:
                value = part(env)
                if value:
                    return value
            return value

        return any_of

    def _compare(self, node: ast.Compare) -> Evaluator:
        for op in node.ops:
            if type(op) not in _COMPARE:
                # "is" compares identity, which differs between equal numbers; use ==.
                raise self.refuse(f"the comparison {type(op).__name__}")
        first = self.build(node.left)
        rest = [
            (_COMPARE[type(op)], self.build(n))
            for op, n in zip(node.ops, node.comparators, strict=True)
        ]

        def compare(env: Mapping[str, Any]) -> bool:
            left = first(env)
            for op, get in rest:
                right = get(env)
                if not op(left, right):
                    return False
                left = right
            return True

        return compare

    def _call(self, node: ast.Call) -> Evaluator:
        func = node.func
        if not isinstance(func, ast.Name):
            if isinstance(func, ast.Attribute):
                raise self.refuse(f"attribute access (.{func.attr})")
            raise self.refuse("a call to something other than a named function")
        if func.id.startswith("__"):
            raise self.refuse(f"the dunder name {func.id!r}")
        if func.id not in FUNCTIONS:
            raise self.refuse(f"a call to {func.id!r}")
        if node.keywords:
            raise self.refuse(f"keyword arguments in {func.id}(...)")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.refuse(f"*arguments in {func.id}(...)")
        target = FUNCTIONS[func.id]
        args = [self.build(a) for a in node.args]
        return lambda env: target(*(a(env) for a in args))


@dataclass(frozen=True)
class Expression:
    """A checked, safely evaluated expression over params (a constraint or a derived value).

    ``where`` names it in messages (e.g. ``constraints[0]``); ``names`` are the params it reads.
    """

    source: str
    where: str = field(default="expression", compare=False)
    names: tuple[str, ...] = field(init=False)
    _run: Evaluator = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        source, where = self.source, self.where
        if not isinstance(source, str) or not source.strip():
            raise _err(where, f"expression {source!r} must be a non-empty string")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise _err(where, f"expression {source!r} is not valid: {exc.msg}") from None
        checker = _Checker(source, where)
        run = checker.build(tree.body)
        # Frozen, so the parsed parts are set once here.
        object.__setattr__(self, "names", tuple(checker.names))
        object.__setattr__(self, "_run", run)

    @classmethod
    def parse(cls, source: object, where: str = "expression") -> Expression:
        """Parse and check ``source``; syntax errors and unsafe constructs are ExpflowErrors."""
        return cls(source, where)  # type: ignore[arg-type]

    def evaluate(self, params: Mapping[str, Any]) -> Any:
        """The value for ``params``; a failing operation is an ExpflowError naming the values."""
        try:
            return self._run(params)
        except _MissingParam:
            raise
        except (ArithmeticError, TypeError, ValueError) as exc:
            used = ", ".join(f"{n}={params[n]!r}" for n in self.names if n in params)
            raise _err(
                self.where,
                f"expression {self.source!r} failed for {used or 'these params'}: "
                f"{type(exc).__name__}: {exc}",
            ) from None

    def check_names(self, known: Sequence[str]) -> None:
        """Refuse names that are not among ``known`` (the params the expression may use)."""
        for name in self.names:
            if name not in known:
                listed = ", ".join(known) if known else "(none)"
                raise _err(
                    self.where,
                    f"expression {self.source!r} names unknown param {name!r}; known: {listed}",
                )


# ---------------------------------------------------------------- parts of a space


@dataclass(frozen=True)
class GridAxis:
    """One grid param and its values."""

    name: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class ZipGroup:
    """Params whose lists are zipped: row ``i`` takes the ``i``-th value of each."""

    names: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class RangeParam:
    """A sampled number in [low, high) (floats) or [low, high] (ints), optionally log-scaled."""

    name: str
    low: float | int
    high: float | int
    log: bool = False
    integer: bool = False

    def values(self, u: Sequence[float]) -> list[Any]:
        """Map uniform draws in [0, 1) onto this range."""
        low, high = self.low, self.high
        if self.integer:
            if self.log:
                a, b = math.log(low), math.log(high + 1)
                raw = [math.floor(math.exp(a + x * (b - a))) for x in u]
            else:
                raw = [low + math.floor(x * (high - low + 1)) for x in u]
            # Rounding at the top edge must not step outside the bounds.
            return [int(min(max(v, low), high)) for v in raw]
        if self.log:
            a, b = math.log(low), math.log(high)
            out = [math.exp(a + x * (b - a)) for x in u]
        else:
            out = [low + x * (high - low) for x in u]
        return [float(min(max(v, low), high)) for v in out]

    def to_value(self) -> dict[str, Any]:
        """The mapping this param is written as."""
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.integer:
            out["type"] = "int"
        return out


@dataclass(frozen=True)
class ChoiceParam:
    """A sampled choice among a fixed list."""

    name: str
    choices: tuple[Any, ...]

    def values(self, u: Sequence[float]) -> list[Any]:
        """Map uniform draws in [0, 1) onto the choices (equal chance each)."""
        k = len(self.choices)
        # The yielded combinations copy lists/dicts, so sharing the choice objects is safe.
        return [self.choices[min(int(x * k), k - 1)] for x in u]

    def to_value(self) -> dict[str, Any]:
        """The mapping this param is written as."""
        return {"choices": list(self.choices)}


SampledParam = RangeParam | ChoiceParam


def _stream(seed: int, name: str, size: int) -> Any:
    """``size`` uniforms in [0, 1) for one param (a numpy array), the same on every platform."""
    import numpy as np

    # BitGenerator streams (unlike Generator methods) are guaranteed fixed for a seed.
    name_key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    bits = np.random.PCG64(np.random.SeedSequence([seed, name_key])).random_raw(size)
    # The top 53 bits as a float in [0, 1), the same conversion numpy uses internally.
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


@dataclass(frozen=True)
class SampleSpec:
    """``n`` seeded samples of some params, by plain random draws or a latin hypercube."""

    n: int
    params: tuple[SampledParam, ...]
    seed: int = 0
    method: str = "random"

    def uniforms(self, name: str) -> list[float]:
        """The ``n`` draws in [0, 1) behind param ``name`` (for LHS, one per stratum)."""
        import numpy as np

        n = self.n
        if self.method == "random":
            return _stream(self.seed, name, n).tolist()
        draws = _stream(self.seed, name, 2 * n)
        keys, jitter = draws[:n], draws[n:]
        # Ranking random keys gives a random permutation of the strata 0..n-1.
        strata = np.empty(n, dtype=np.int64)
        strata[np.argsort(keys, kind="stable")] = np.arange(n)
        u = (strata + jitter) / n
        # Rounding must not push a draw into a neighbouring stratum.
        top = np.nextafter((strata + 1) / n, 0.0)
        return np.minimum(np.maximum(u, strata / n), top).tolist()

    def rows(self) -> list[Part]:
        """The samples, each as ``((name, value), ...)`` in param order."""
        columns = [p.values(self.uniforms(p.name)) for p in self.params]
        names = [p.name for p in self.params]
        return [tuple(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]

    def to_value(self) -> dict[str, Any]:
        """The mapping this sample is written as."""
        return {
            "n": self.n,
            "seed": self.seed,
            "method": self.method,
            "params": {p.name: p.to_value() for p in self.params},
        }


@dataclass(frozen=True)
class Conditional:
    """Params present only where every ``when`` param has one of its listed values."""

    when: tuple[tuple[str, tuple[Any, ...]], ...]
    grid: tuple[GridAxis, ...]

    def matches(self, params: Mapping[str, Any]) -> bool:
        """Whether ``params`` has every ``when`` param at one of its values."""
        for name, accepted in self.when:
            if name not in params:
                return False
            value = params[name]
            if not any(_same(value, a) for a in accepted):
                return False
        return True

    def excludes(self, other: Conditional) -> bool:
        """Whether the two blocks can never both match (a shared param, no common value)."""
        mine = dict(self.when)
        for name, theirs in other.when:
            if name in mine and not any(_same(a, b) for a in mine[name] for b in theirs):
                return True
        return False

    def size(self) -> int:
        """How many combinations one matching combination becomes."""
        return math.prod(len(a.values) for a in self.grid)

    def to_value(self) -> dict[str, Any]:
        """The mapping this block is written as."""
        when = {}
        for name, accepted in self.when:
            single = len(accepted) == 1 and not isinstance(accepted[0], list)
            when[name] = accepted[0] if single else list(accepted)
        return {"when": when, "grid": {a.name: list(a.values) for a in self.grid}}


@dataclass(frozen=True)
class Derived:
    """A param computed from the others after the constraints."""

    name: str
    expression: Expression


@dataclass(frozen=True)
class Replicates:
    """A param varied innermost over ``values`` (replicate seeds), for CI statistics."""

    param: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Combination:
    """One point of a sweep: its position among the yielded ones, its params and their id."""

    index: int
    params: dict[str, Any]
    id: str


# ---------------------------------------------------------------- parsing


def _name(where: str, name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise _err(where, f"param name {name!r} must be a non-empty string")
    return name


def _mapping(where: str, raw: object, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise _err(where, f"must be a mapping of {what}, got {type(raw).__name__} {raw!r}")
    return raw


def _unknown_keys(where: str, raw: Mapping[str, Any], accepted: Sequence[str]) -> None:
    for key in raw:
        if key not in accepted:
            raise _err(where, f"unknown key {key!r}; accepted: {', '.join(accepted)}")


def _values(where: str, raw: object) -> tuple[Any, ...]:
    """A non-empty list of distinct values (repeats would give repeated combinations)."""
    if not isinstance(raw, (list, tuple)):
        raise _err(where, f"value {raw!r} must be a non-empty list of values")
    if not raw:
        raise _err(where, "list is empty; give at least one value")
    values = tuple(_plain(v, where) for v in raw)
    seen: set[str] = set()
    for v in values:
        k = _key(v)
        if k in seen:
            raise _err(where, f"value {v!r} is listed twice")
        seen.add(k)
    return values


def _int(where: str, field_name: str, raw: object, *, minimum: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise _err(where, f"{field_name} {raw!r} must be an integer >= {minimum}")
    return raw


def _number(where: str, field_name: str, raw: object, *, integer: bool) -> float | int:
    kind = "an integer (type int)" if integer else "a number"
    value = raw
    if isinstance(value, str):
        # PyYAML's own loader reads 1e-5 (no dot) as a string; from_dict may get such text.
        try:
            value = float(value)
        except ValueError:
            raise _err(where, f"{field_name} {raw!r} is not {kind}") from None
    if _is_numpy(value):
        value = value.tolist()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(where, f"{field_name} {raw!r} is not {kind}")
    if not math.isfinite(value):
        raise _err(where, f"{field_name} {raw!r} is not a finite number")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise _err(where, f"{field_name} {raw!r} is not {kind}; int bounds must be whole")
        return int(value)
    return float(value)


def _sampled(where: str, name: str, raw: object) -> SampledParam:
    spec = _mapping(where, raw, "low/high/log/type or choices")
    kind = spec.get("type", "categorical" if "choices" in spec else "float")
    if kind not in SAMPLE_TYPES:
        raise _err(where, f"unknown type {kind!r}; accepted: {', '.join(SAMPLE_TYPES)}")
    if kind == "categorical":
        _unknown_keys(where, spec, CHOICE_KEYS)
        if "choices" not in spec:
            raise _err(where, "type categorical needs choices (a non-empty list)")
        raw_choices = spec["choices"]
        if isinstance(raw_choices, (list, tuple)) and not raw_choices:
            raise _err(where, "choices is empty; give at least one choice")
        return ChoiceParam(name, _values(f"{where}.choices", raw_choices))
    _unknown_keys(where, spec, RANGE_KEYS)
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise _err(where, f"needs low and high (or choices); missing {' and '.join(missing)}")
    integer = kind == "int"
    low = _number(where, "low", spec["low"], integer=integer)
    high = _number(where, "high", spec["high"], integer=integer)
    if low > high:
        raise _err(where, f"low {low!r} is greater than high {high!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _err(where, f"log {log!r} must be true or false")
    if log and low <= 0:
        raise _err(where, f"log scale needs low > 0, got low {low!r}")
    return RangeParam(name, low, high, log, integer)


def _parse_sample(raw: object) -> SampleSpec:
    spec = _mapping("sample", raw, "n, seed, method and params")
    _unknown_keys("sample", spec, SAMPLE_KEYS)
    if "n" not in spec:
        raise _err("sample", "needs n, the number of samples (an integer >= 1)")
    n = _int("sample.n", "n", spec["n"], minimum=1)
    if n > MAX_COMBINATIONS:
        raise _err(
            "sample.n",
            f"n {n} is more than the {MAX_COMBINATIONS:,} combinations a sweep may have "
            "(MAX_COMBINATIONS); draw fewer samples",
        )
    seed = _int("sample.seed", "seed", spec.get("seed", 0), minimum=0)
    method = spec.get("method", "random")
    if method not in METHODS:
        raise _err("sample.method", f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    raw_params = _mapping("sample.params", spec.get("params"), "param specs")
    if not raw_params:
        raise _err("sample.params", "is empty; give at least one param to sample")
    params = tuple(
        _sampled(f"sample.params.{_name('sample.params', k)}", k, v) for k, v in raw_params.items()
    )
    return SampleSpec(n, params, seed, method)


def _parse_grid(where: str, raw: object) -> tuple[GridAxis, ...]:
    grid = _mapping(where, raw, "param names to lists of values")
    return tuple(GridAxis(_name(where, k), _values(f"{where}.{k}", v)) for k, v in grid.items())


def _parse_zip(raw: object) -> tuple[ZipGroup, ...]:
    # A single mapping is taken as one group, the common case.
    groups = [raw] if isinstance(raw, Mapping) else raw
    if not isinstance(groups, list):
        raise _err("zip", f"must be a list of mappings of equally long lists, got {raw!r}")
    out = []
    for i, group in enumerate(groups):
        where = f"zip[{i}]"
        mapping = _mapping(where, group, "param names to equally long lists")
        if not mapping:
            raise _err(where, "is empty; give at least one param")
        columns = {_name(where, k): _values(f"{where}.{k}", v) for k, v in mapping.items()}
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            raise _err(where, f"lists have unequal lengths ({listed}); zipped lists must match")
        rows = tuple(zip(*columns.values(), strict=True))
        seen: set[str] = set()
        for row in rows:
            if _key(list(row)) in seen:
                raise _err(where, f"row {dict(zip(columns, row, strict=True))!r} is listed twice")
            seen.add(_key(list(row)))
        out.append(ZipGroup(tuple(columns), rows))
    return tuple(out)


def _parse_conditional(raw: object) -> tuple[Conditional, ...]:
    if not isinstance(raw, list):
        raise _err("conditional", f"must be a list of {{when: ..., grid: ...}} blocks, got {raw!r}")
    out = []
    for i, block in enumerate(raw):
        where = f"conditional[{i}]"
        spec = _mapping(where, block, "when and grid")
        _unknown_keys(where, spec, CONDITIONAL_KEYS)
        for key in CONDITIONAL_KEYS:
            if key not in spec:
                raise _err(where, f"needs {key} (a mapping)")
        when_raw = _mapping(f"{where}.when", spec["when"], "param names to values")
        if not when_raw:
            raise _err(f"{where}.when", "is empty; name at least one param and its value")
        when = []
        for name, value in when_raw.items():
            _name(f"{where}.when", name)
            accepted = value if isinstance(value, list) else [value]
            when.append((name, _values(f"{where}.when.{name}", accepted)))
        grid = _parse_grid(f"{where}.grid", spec["grid"])
        if not grid:
            raise _err(f"{where}.grid", "is empty; give at least one param")
        out.append(Conditional(tuple(when), grid))
    return tuple(out)


def _parse_replicates(raw: object) -> Replicates:
    spec = _mapping("replicates", raw, "param and values (or n)")
    _unknown_keys("replicates", spec, REPLICATE_KEYS)
    if "param" not in spec:
        raise _err("replicates", "needs param, the name of the replicate param (e.g. seed)")
    param = _name("replicates.param", spec["param"])
    if ("values" in spec) == ("n" in spec):
        raise _err("replicates", "needs exactly one of values (a list) or n (values 0..n-1)")
    if "n" in spec:
        n = _int("replicates.n", "n", spec["n"], minimum=1)
        return Replicates(param, tuple(range(n)))
    return Replicates(param, _values("replicates.values", spec["values"]))


def _parse_constraints(raw: object) -> tuple[Expression, ...]:
    if not isinstance(raw, list):
        raise _err("constraints", f"must be a list of expression strings, got {raw!r}")
    return tuple(Expression.parse(c, f"constraints[{i}]") for i, c in enumerate(raw))


def _parse_derived(raw: object) -> tuple[Derived, ...]:
    spec = _mapping("derived", raw, "param names to expression strings")
    return tuple(
        Derived(_name("derived", k), Expression.parse(v, f"derived.{k}")) for k, v in spec.items()
    )


# ---------------------------------------------------------------- YAML


def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that also reads 1e-5 (YAML 1.2 style, no dot) as a float."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


# ---------------------------------------------------------------- the space


@dataclass(frozen=True)
class SweepSpace:
    """A sweep's parameter space; build it with ``load``/``from_dict``/``from_yaml``."""

    fixed: tuple[tuple[str, Any], ...] = ()
    grid: tuple[GridAxis, ...] = ()
    zip: tuple[ZipGroup, ...] = ()
    sample: SampleSpec | None = None
    conditional: tuple[Conditional, ...] = ()
    constraints: tuple[Expression, ...] = ()
    derived: tuple[Derived, ...] = ()
    replicates: Replicates | None = None

    # ------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpace:
        """Build and validate a space; any problem is one ExpflowError line naming the key."""
        if not isinstance(data, Mapping):
            raise ExpflowError(
                f"sweep space must be a mapping with keys among {', '.join(PARTS)}, "
                f"got {type(data).__name__}"
            )
        for key in data:
            if key not in PARTS:
                raise ExpflowError(
                    f"sweep space: unknown key {key!r}; accepted: {', '.join(PARTS)}"
                )
        fixed_raw = _mapping("fixed", data.get("fixed", {}), "param names to values")
        space = cls(
            fixed=tuple((_name("fixed", k), _plain(v, f"fixed.{k}")) for k, v in fixed_raw.items()),
            grid=_parse_grid("grid", data.get("grid", {})),
            zip=_parse_zip(data.get("zip", [])),
            sample=_parse_sample(data["sample"]) if "sample" in data else None,
            conditional=_parse_conditional(data.get("conditional", [])),
            constraints=_parse_constraints(data.get("constraints", [])),
            derived=_parse_derived(data.get("derived", {})),
            replicates=_parse_replicates(data["replicates"]) if "replicates" in data else None,
        )
        space.validate()
        return space

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpace:
        """Read a space from a YAML file; a missing, invalid or non-mapping file is an error."""

        data = read_mapping(
            path,
            "sweep space file",
            f"expected a mapping with keys among {', '.join(PARTS)}",
            loader=_yaml_loader(),
        )
        return cls.from_dict(data)

    @classmethod
    def load(cls, value: str | Path | Mapping[str, Any] | SweepSpace) -> SweepSpace:
        """A space from a YAML path, a mapping, or an existing space."""
        if isinstance(value, SweepSpace):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if isinstance(value, (str, Path)):
            return cls.from_yaml(value)
        raise ExpflowError(
            f"sweep space {value!r} is a {type(value).__name__}; expected a YAML path or a mapping"
        )

    def validate(self) -> None:
        """Cross-part checks: each param defined once, known names in expressions, not empty."""
        places: dict[str, str] = {}

        def define(name: str, where: str) -> None:
            if name in places and places[name] != where:
                raise ExpflowError(
                    f"sweep space: param {name!r} is defined twice, in {places[name]} and in "
                    f"{where}; define it in one place"
                )
            places[name] = where

        for name, _ in self.fixed:
            define(name, "fixed")
        for axis in self.grid:
            define(axis.name, "grid")
        for i, group in enumerate(self.zip):
            for name in group.names:
                define(name, f"zip[{i}]")
        if self.sample is not None:
            for p in self.sample.params:
                define(p.name, "sample.params")
        blocks_of: dict[str, list[int]] = {}
        for i, block in enumerate(self.conditional):
            where = f"conditional[{i}]"
            for name, _ in block.when:
                if name not in places:
                    raise _err(
                        f"{where}.when",
                        f"names unknown param {name!r}; known: {', '.join(places) or '(none)'}",
                    )
            for axis in block.grid:
                # The same conditional param in two blocks is fine when they exclude each
                # other, e.g. momentum for sgd and for rmsprop.
                for j in blocks_of.get(axis.name, []):
                    if not block.excludes(self.conditional[j]):
                        raise ExpflowError(
                            f"sweep space: param {axis.name!r} is defined twice, in "
                            f"conditional[{j}].grid and in {where}.grid, whose when-conditions "
                            "can both hold; give them a common when-param with different values"
                        )
                if axis.name not in blocks_of:
                    define(axis.name, f"{where}.grid")
                blocks_of.setdefault(axis.name, []).append(i)
        if self.replicates is not None:
            define(self.replicates.param, "replicates.param")
        if not places:
            raise ExpflowError(
                "sweep space is empty; give at least one of fixed, grid, zip, sample, replicates"
            )
        known = list(places)
        later = [d.name for d in self.derived]
        for expression in self.constraints:
            for name in expression.names:
                if name in later:
                    raise _err(
                        expression.where,
                        f"expression {expression.source!r} names derived param {name!r}, which "
                        "is computed after the constraints; use the expression it is derived "
                        "from instead",
                    )
            expression.check_names(known)
        for item in self.derived:
            item.expression.check_names(known)
            define(item.name, "derived")
            known.append(item.name)
        size = self.size_upper_bound()
        if size > MAX_COMBINATIONS:
            raise ExpflowError(
                f"sweep space has {size:,} combinations before constraints"
                f"{' or more' if self.conditional else ''}, more than the {MAX_COMBINATIONS:,} "
                "a sweep may have (MAX_COMBINATIONS); use fewer grid values, or sample the "
                "space (sample: {n: ..., params: ...})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The mapping form (plain lists and dicts); ``from_dict(s.to_dict()) == s``."""
        out: dict[str, Any] = {}
        if self.fixed:
            out["fixed"] = {k: copy.deepcopy(v) for k, v in self.fixed}
        if self.grid:
            out["grid"] = {a.name: copy.deepcopy(list(a.values)) for a in self.grid}
        if self.zip:
            out["zip"] = [
                {name: [copy.deepcopy(row[i]) for row in g.rows] for i, name in enumerate(g.names)}
                for g in self.zip
            ]
        if self.sample is not None:
            out["sample"] = self.sample.to_value()
        if self.conditional:
            out["conditional"] = [copy.deepcopy(b.to_value()) for b in self.conditional]
        if self.constraints:
            out["constraints"] = [c.source for c in self.constraints]
        if self.derived:
            out["derived"] = {d.name: d.expression.source for d in self.derived}
        if self.replicates is not None:
            out["replicates"] = {
                "param": self.replicates.param,
                "values": copy.deepcopy(list(self.replicates.values)),
            }
        return out

    # ------------------------------------------------------------ size and names

    def param_names(self) -> list[str]:
        """Every param that can appear, in the order they appear in combinations."""
        names = [k for k, _ in self.fixed] + [a.name for a in self.grid]
        names += [n for g in self.zip for n in g.names]
        if self.sample is not None:
            names += [p.name for p in self.sample.params]
        for block in self.conditional:
            names += [a.name for a in block.grid if a.name not in names]
        if self.replicates is not None:
            names.append(self.replicates.param)
        return names + [d.name for d in self.derived]

    def size_upper_bound(self) -> int:
        """Combinations before constraints, known without enumerating them; exact unless
        there are conditional blocks. Past ``MAX_COMBINATIONS`` the conditional blocks are
        counted only as far as needed to know the space is too large."""
        size = math.prod(len(a.values) for a in self.grid)
        size *= math.prod(len(g.rows) for g in self.zip)
        if self.sample is not None:
            size *= self.sample.n
        if self.replicates is not None:
            size *= len(self.replicates.values)
        if size and self.conditional:
            size *= self._conditional_factor(MAX_COMBINATIONS // size)
        return size

    def _conditional_factor(self, cap: int) -> int:
        """The most the conditional blocks can multiply one combination by: the largest
        product of sizes of blocks that can all match together (blocks whose when-conditions
        exclude each other never do). The search stops once the product passes ``cap``."""
        blocks = sorted(
            (b for b in self.conditional if b.size() > 1), key=lambda b: b.size(), reverse=True
        )
        rest = [math.prod(b.size() for b in blocks[i:]) for i in range(len(blocks) + 1)]
        best = 1

        def search(start: int, chosen: list[Conditional], product: int) -> None:
            nonlocal best
            best = max(best, product)
            for i in range(start, len(blocks)):
                if best > cap or product * rest[i] <= best:
                    return
                block = blocks[i]
                if not any(block.excludes(c) or c.excludes(block) for c in chosen):
                    search(i + 1, [*chosen, block], product * block.size())

        search(0, [], 1)
        return best

    def count(self) -> int:
        """The exact number of combinations after constraints (iterates, without hashing)."""
        return sum(1 for _ in self._params(copy_values=False))

    # ------------------------------------------------------------ iteration

    def combinations(self) -> Iterator[Combination]:
        """Every combination, lazily and in a fixed order; ``index`` counts from 0.

        Raises ExpflowError at the end if the constraints left no combination at all.
        """
        index = -1
        for index, params in enumerate(self._params(copy_values=True)):
            yield Combination(index, params, combination_id(params))
        if index < 0:
            # Only knowable by iterating; an empty sweep is always a mistake in the space.
            raise ExpflowError(
                f"sweep space: the constraints exclude all {self.size_upper_bound()} candidate "
                "combinations (or derived values need conditional params that are absent); "
                "loosen the constraints"
            )

    def _axes(self) -> list[Sequence[Part]]:
        axes: list[Sequence[Part]] = [tuple(((a.name, v),) for v in a.values) for a in self.grid]
        axes += [tuple(tuple(zip(g.names, row, strict=True)) for row in g.rows) for g in self.zip]
        if self.sample is not None:
            axes.append(self.sample.rows())
        return axes

    def _expand(self, params: Params, start: int) -> Iterator[Params]:
        """``params`` multiplied by each conditional block from ``start`` on that matches."""
        for i in range(start, len(self.conditional)):
            block = self.conditional[i]
            if block.matches(params):
                names = [a.name for a in block.grid]
                for values in itertools.product(*(a.values for a in block.grid)):
                    extended = params.copy()
                    extended.update(zip(names, values, strict=True))
                    yield from self._expand(extended, i + 1)
                return
        yield params

    def _params(self, *, copy_values: bool) -> Iterator[Params]:
        """The params of each combination, built one at a time from lazy products."""
        fixed = dict(self.fixed)
        rep = self.replicates
        rep_values: Sequence[Any] = rep.values if rep is not None else (None,)
        # Constraints that ignore the replicate param are checked once per configuration.
        early = [c for c in self.constraints if rep is None or rep.param not in c.names]
        late = [c for c in self.constraints if rep is not None and rep.param in c.names]
        derived = self.derived
        mutable = copy_values and self._has_mutable_values()
        for parts in itertools.product(*self._axes()):
            base = fixed.copy()
            for part in parts:
                base.update(part)
            for params in self._expand(base, 0) if self.conditional else (base,):
                if early and not _passes(params, early):
                    continue
                for value in rep_values:
                    out = params.copy()
                    if rep is not None:
                        out[rep.param] = value
                    if late and not _passes(out, late):
                        continue
                    if derived and not _derive(out, derived):
                        continue
                    if mutable:
                        # Lists/dicts are shared by every combination; hand out copies.
                        out = {k: copy.deepcopy(v) for k, v in out.items()}
                    yield out

    def _has_mutable_values(self) -> bool:
        values: list[Any] = [v for _, v in self.fixed]
        values += [v for a in self.grid for v in a.values]
        values += [v for g in self.zip for row in g.rows for v in row]
        values += [v for b in self.conditional for a in b.grid for v in a.values]
        if self.sample is not None:
            values += [
                v for p in self.sample.params if isinstance(p, ChoiceParam) for v in p.choices
            ]
        if self.replicates is not None:
            values += list(self.replicates.values)
        return any(isinstance(v, (list, dict)) for v in values)


def _passes(params: Params, constraints: Sequence[Expression]) -> bool:
    for constraint in constraints:
        try:
            if not constraint.evaluate(params):
                return False
        except _MissingParam:
            return False
    return True


def _derive(params: Params, derived: Sequence[Derived]) -> bool:
    """Add the derived params in order; False when one needs a param this combination lacks."""
    for item in derived:
        try:
            params[item.name] = _plain(item.expression.evaluate(params), item.expression.where)
        except _MissingParam:
            return False
    return True
