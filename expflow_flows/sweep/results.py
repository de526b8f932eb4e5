"""The results of a sweep as a flat table: best runs, per-group statistics, CSV and Parquet.

Each row is one run (one combination, or one step of a combination's chain),
flattened: ``param:<name>`` and ``metric:<name>`` columns next to the run's
key, combo_id, step, status, reason, timings, resources and run_dir. Needs
neither pandas nor scipy; pyarrow only for :meth:`SweepResults.to_parquet`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.runs.rundir import STATUSES
from expflow_flows.sweep.store import COMPLETED_STATUSES, RESULTS_FILENAME, ResultStore

PARAM_PREFIX = "param:"
METRIC_PREFIX = "metric:"

# Fixed columns, before and after the param:/metric: columns (a stable order for files).
LEAD_COLUMNS: tuple[str, ...] = ("key", "combo_id", "combo_index", "step", "status", "reason")
TAIL_COLUMNS: tuple[str, ...] = (
    "wall_s",
    "cpu_s",
    "peak_rss_mb",
    "started_at",
    "ended_at",
    "attempts",
    "worker",
    "run_dir",
    "recorded_at",
    "log_excerpt",
)
_INT_COLUMNS = frozenset({"combo_index", "attempts"})
_FLOAT_COLUMNS = frozenset(
    {"wall_s", "cpu_s", "peak_rss_mb", "started_at", "ended_at", "recorded_at"}
)
_STRING_COLUMNS = frozenset(
    {"key", "combo_id", "step", "status", "reason", "worker", "run_dir", "log_excerpt"}
)


# --- statistics ------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The continued fraction converges fast only below (a+1)/(a+b+2); use symmetry above.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t cumulative distribution function with ``df`` degrees of freedom."""
    if not df > 0:
        raise ExpflowError(f"degrees of freedom {df!r} are not valid; expected a positive number")
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. 4.303 for 0.975, 2)."""
    if not 0.0 < p < 1.0:
        raise ExpflowError(f"probability {p!r} is not valid; expected a number between 0 and 1")
    if not df > 0:
        raise ExpflowError(f"degrees of freedom {df!r} are not valid; expected a positive number")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if df == 1:
        return math.tan(math.pi * (p - 0.5))  # Cauchy: exact
    if df == 2:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))  # exact closed form
    # Bisection on the CDF: slow-ish but exact to double precision, and cached.
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def describe(values: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """n, mean, std (sample, ddof=1), ci_low/ci_high (t interval of the mean), min, max.

    With one value, std and the interval are None (undefined); with none, all are None.
    """
    n = len(values)
    out: dict[str, Any] = {
        "n": n,
        "mean": None,
        "std": None,
        "ci_low": None,
        "ci_high": None,
        "min": None,
        "max": None,
    }
    if n == 0:
        return out
    mean = math.fsum(values) / n
    out.update(mean=mean, min=min(values), max=max(values))
    if n > 1:
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return out


# --- the table -------------------------------------------------------------------------


def _flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    """A store row (params/metrics dicts) or an already flat row, as a flat dict."""
    if not isinstance(row, Mapping):
        raise ExpflowError(f"result row {row!r} is not a dict; expected a dict of column: value")
    flat: dict[str, Any] = {}
    for name, value in row.items():
        if name in ("params", "metrics") and value is None:
            continue
        if name in ("params", "metrics") and isinstance(value, Mapping):
            prefix = PARAM_PREFIX if name == "params" else METRIC_PREFIX
            for sub, sub_value in value.items():
                flat[f"{prefix}{sub}"] = sub_value
        else:
            flat[str(name)] = value
    return flat


def _hashable(value: Any) -> Any:
    # Group keys may be lists or dicts (a param like hidden=[64, 64]).
    try:
        hash(value)
        return value
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str)


class SweepResults:
    """The flat table of a sweep's runs; build it with :meth:`load` or from row dicts."""

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        """Rows as the store returns them (params/metrics dicts) or already flat (``param:lr`` ...)."""
        flat = [_flatten(r) for r in rows]
        seen: dict[str, None] = {}
        for r in flat:
            seen.update(dict.fromkeys(r))
        params = sorted(c for c in seen if c.startswith(PARAM_PREFIX))
        metrics = sorted(c for c in seen if c.startswith(METRIC_PREFIX))
        fixed = set(LEAD_COLUMNS) | set(TAIL_COLUMNS) | set(params) | set(metrics)
        extra = sorted(c for c in seen if c not in fixed)
        self._columns = [*LEAD_COLUMNS, *params, *metrics, *extra, *TAIL_COLUMNS]
        # Every row has every column (None where absent): a rectangular table.
        self._rows = [{c: r.get(c) for c in self._columns} for r in flat]

    @classmethod
    def load(cls, source: ResultStore | str | os.PathLike[str]) -> SweepResults:
        """All rows of a store: a :class:`ResultStore`, a sweep folder, or its ``results.sqlite``."""
        if isinstance(source, ResultStore):
            store = source
        else:
            p = Path(source).expanduser()
            if not p.exists():
                raise ExpflowError(
                    f"sweep results {str(source)!r} not found; expected a sweep folder holding "
                    f"{RESULTS_FILENAME} or the path of that file"
                )
            store = ResultStore(p, create=False)
        return cls(store.rows())

    # --- the table ---------------------------------------------------------------------

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows, flat, every column present (a new list of the same dicts)."""
        return list(self._rows)

    @property
    def columns(self) -> list[str]:
        """Column names in their stable order: lead, params, metrics, other, timings and resources."""
        return list(self._columns)

    @property
    def params(self) -> list[str]:
        """Parameter names (without the ``param:`` prefix)."""
        return [c[len(PARAM_PREFIX) :] for c in self._columns if c.startswith(PARAM_PREFIX)]

    @property
    def metrics(self) -> list[str]:
        """Metric names (without the ``metric:`` prefix)."""
        return [c[len(METRIC_PREFIX) :] for c in self._columns if c.startswith(METRIC_PREFIX)]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.status_counts().items() if v)
        return f"SweepResults({len(self)} rows: {counts or 'empty'})"

    def _derive(self, rows: list[dict[str, Any]]) -> SweepResults:
        out = SweepResults.__new__(SweepResults)
        out._columns = list(self._columns)
        out._rows = rows
        return out

    def filter(
        self, status: str | Iterable[str] | None = None, step: str | None = None
    ) -> SweepResults:
        """The rows with one of the statuses given and the step given (None: any)."""
        wanted: tuple[str, ...] | None = None
        if status is not None:
            wanted = (status,) if isinstance(status, str) else tuple(status)
            for s in wanted:
                if s not in STATUSES:
                    raise ExpflowError(
                        f"status {s!r} is not valid; expected one of {', '.join(STATUSES)}"
                    )
        if step is not None and not isinstance(step, str):
            raise ExpflowError(f"step {step!r} is not valid; expected a step name ('' for none)")
        return self._derive(
            [
                r
                for r in self._rows
                if (wanted is None or r["status"] in wanted)
                and (step is None or (r["step"] or "") == step)
            ]
        )

    def status_counts(self) -> dict[str, int]:
        """How many rows have each status; every status is present, 0 when none."""
        out = dict.fromkeys(STATUSES, 0)
        for r in self._rows:
            status = str(r["status"])
            out[status] = out.get(status, 0) + 1
        return out

    def _metric_column(self, metric: str) -> str:
        if not isinstance(metric, str) or not metric:
            raise ExpflowError(f"metric {metric!r} is not valid; expected a metric name")
        column = metric if metric.startswith(METRIC_PREFIX) else METRIC_PREFIX + metric
        if column not in self._columns:
            present = ", ".join(self.metrics) or "none"
            raise ExpflowError(
                f"metric {metric!r} is not in these results; metrics present: {present}"
            )
        return column

    def _group_column(self, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise ExpflowError(f"group column {name!r} is not valid; expected a parameter name")
        if name in self._columns:
            return name
        if PARAM_PREFIX + name in self._columns:
            return PARAM_PREFIX + name
        raise ExpflowError(
            f"group column {name!r} is not in these results; expected a parameter "
            f"({', '.join(self.params) or 'none'}) or a column"
        )

    def best(self, metric: str, maximize: bool = False, n: int = 1) -> list[dict[str, Any]]:
        """The ``n`` ok/warning rows with the lowest (or highest) finite ``metric``; ties keep row order."""
        column = self._metric_column(metric)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ExpflowError(f"n {n!r} is not valid; expected a positive integer")
        usable = [
            r for r in self._rows if r["status"] in COMPLETED_STATUSES and _is_finite(r[column])
        ]
        # sorted() is stable, so equal values keep their order in the table.
        ranked = sorted(usable, key=lambda r: -r[column] if maximize else r[column])
        return [dict(r) for r in ranked[:n]]

    def summary(
        self,
        metric: str,
        by: list[str] | None = None,
        *,
        replicate: str = "seed",
        confidence: float = 0.95,
    ) -> list[dict[str, Any]]:
        """Statistics of ``metric`` per group of ``by`` columns, across replicates, in first-seen order.

        ``by`` defaults to every parameter except ``replicate`` (plus ``step`` when there
        are several). Only ok/warning rows with a finite value count; a group with
        none has n=0 and None statistics, and with n=1 std and the interval are None.
        Each dict: the group's column values, ``metric``, n, mean, std, ci_low, ci_high, min, max.
        """
        column = self._metric_column(metric)
        if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
            raise ExpflowError(
                f"confidence {confidence!r} is not valid; expected a number between 0 and 1, e.g. 0.95"
            )
        if by is None:
            skip = PARAM_PREFIX + replicate
            group_cols = [c for c in self._columns if c.startswith(PARAM_PREFIX) and c != skip]
            if len({r["step"] or "" for r in self._rows}) > 1:
                # Chained sweeps: the same metric name from two steps must not be pooled.
                group_cols.insert(0, "step")
        else:
            if isinstance(by, str):
                by = [by]
            group_cols = [self._group_column(b) for b in by]
        groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[float]]] = {}
        for r in self._rows:
            ident = tuple(_hashable(r[c]) for c in group_cols)
            if ident not in groups:
                groups[ident] = ({c: r[c] for c in group_cols}, [])
            if r["status"] in COMPLETED_STATUSES and _is_finite(r[column]):
                groups[ident][1].append(float(r[column]))
        metric_name = column[len(METRIC_PREFIX) :]
        return [
            {**values, "metric": metric_name, **describe(found, confidence)}
            for values, found in groups.values()
        ]

    # --- export ------------------------------------------------------------------------

    def to_records(self) -> list[dict[str, Any]]:
        """The rows as new plain dicts (columns in order)."""
        return [dict(r) for r in self._rows]

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as CSV (header, stable column order; None empty, lists/dicts as JSON)."""

        def cell(value: Any) -> Any:
            if value is None:
                return ""
            if isinstance(value, (list, tuple, dict)):
                return json.dumps(value, sort_keys=True, default=str)
            if isinstance(value, float):
                return repr(value)  # shortest text that reads back to the same float
            return value

        out = Path(path).expanduser()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(self._columns)
                for r in self._rows:
                    writer.writerow([cell(r[c]) for c in self._columns])
        except OSError as exc:
            raise ExpflowError(
                f"cannot write CSV {out} ({exc.strerror or exc}); expected a writable path"
            ) from None
        return out

    def _arrow_table(self) -> Any:
        import pyarrow as pa

        arrays = []
        fields = []
        for c in self._columns:
            values = [r[c] for r in self._rows]
            typ, values = _arrow_column(c, values)
            fields.append(pa.field(c, typ, nullable=True))
            arrays.append(pa.array(values, type=typ))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def to_parquet(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as Parquet: numbers as int64/float64, text as string, None as null."""
        import pyarrow.parquet as pq

        out = Path(path).expanduser()
        table = self._arrow_table()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out)
        except OSError as exc:
            raise ExpflowError(
                f"cannot write Parquet {out} ({exc.strerror or exc}); expected a writable path"
            ) from None
        return out


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _arrow_column(name: str, values: list[Any]) -> tuple[Any, list[Any]]:
    """The Arrow type for one column and its values converted to fit it."""
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if name in _STRING_COLUMNS:
        kind = "string"
    elif name in _INT_COLUMNS and all(isinstance(v, int) for v in present):
        kind = "int"
    elif name in _FLOAT_COLUMNS or (not present and name.startswith(METRIC_PREFIX)):
        kind = "float"
    elif not present:
        kind = "string"
    elif all(isinstance(v, bool) for v in present):
        kind = "bool"
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        kind = "int" if all(_INT64_MIN <= v <= _INT64_MAX for v in present) else "float"
    elif all(_is_number(v) for v in present):
        kind = "float"
    else:
        kind = "string"
    if kind == "int":
        return pa.int64(), values
    if kind == "float":
        if all(v is None or _is_number(v) for v in values):
            return pa.float64(), [None if v is None else float(v) for v in values]
        kind = "string"
    if kind == "bool":
        return pa.bool_(), values
    # Mixed or nested values: text, JSON for lists and dicts, so nothing is lost.
    return pa.string(), [
        None
        if v is None
        else v
        if isinstance(v, str)
        else json.dumps(v, sort_keys=True, default=str)
        if isinstance(v, (list, tuple, dict, bool))
        else str(v)
        for v in values
    ]
