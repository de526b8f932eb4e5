"""The results of a sweep as a flat table: best runs, per-group statistics, CSV and Parquet.

Each row is one run (one combination, or one step of a combination's chain),
flattened: ``param:<name>`` and ``metric:<name>`` columns next to the run's
key, combo_id, step, status, reason, timings, resources and run_dir. Needs
neither pandas nor scipy; pyarrow only for :meth:`SweepResults.to_parquet`.

Statistics pool only the replicate parameter (``seed`` unless the sweep's space names
another): every other parameter that varies is a group column. Confidence intervals stay
inside a metric's domain (errors, losses, times and counts cannot be negative).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.runs.rundir import STATUSES
from expflow_flows.sweep.store import COMPLETED_STATUSES, RESULTS_FILENAME, ResultStore

PARAM_PREFIX = "param:"
METRIC_PREFIX = "metric:"
# The replicate parameter when the sweep's space does not name one (``replicates.param``).
DEFAULT_REPLICATE = "seed"

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


Domain = tuple[float | None, float | None]

# Words in a metric's name that make it an error, a loss, a time, a cost or a count, so it
# cannot be negative. The metrics registry has no domain field; this is the rule until it has.
_NONNEGATIVE_WORDS = frozenset(
    {
        *("loss", "error", "err", "errors", "mse", "rmse", "nrmse", "crmse", "brmse", "mae"),
        *("mape", "rmsd", "fourier", "pde", "residual", "time", "seconds", "duration", "cost"),
        *("usd", "calls", "count", "epoch", "epochs", "params", "rss", "mb", "gb", "memory"),
        *("acc", "accuracy", "f1", "auc", "precision", "recall", "iou", "dice"),
    }
)


def metric_domain(name: str) -> Domain:
    """The (low, high) bounds ``name``'s values keep: (0, None) for errors, losses, times,
    costs, counts and scores such as accuracy, else (None, None)."""
    short = name.removeprefix(METRIC_PREFIX).rpartition("/")[2].lower()
    words = set(re.split(r"[^a-z0-9]+", short))
    if words & _NONNEGATIVE_WORDS or short.startswith("n_"):
        return 0.0, None
    return None, None


def describe(
    values: list[float], confidence: float = 0.95, domain: Domain = (None, None)
) -> dict[str, Any]:
    """n, mean, std (sample, ddof=1), ci_low/ci_high (t interval of the mean), min, max.

    The interval is clipped to ``domain`` (``ci_clipped`` says when it was). With one value,
    std and the interval are None (undefined); with none, all are None.
    """
    n = len(values)
    out: dict[str, Any] = {
        "n": n,
        "mean": None,
        "std": None,
        "ci_low": None,
        "ci_high": None,
        "ci_clipped": False,
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
        low, high = mean - half, mean + half
        lo, hi = domain
        clipped = (lo is not None and low < lo) or (hi is not None and high > hi)
        if lo is not None:
            low = max(low, lo)
        if hi is not None:
            high = min(high, hi)
        out.update(std=std, ci_low=low, ci_high=high, ci_clipped=clipped)
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


def replicate_of(store: ResultStore) -> str:
    """The sweep's replicate parameter: its space's ``replicates.param``, else ``seed``."""
    meta = store.get_meta("sweep")
    space = meta.get("space") if isinstance(meta, Mapping) else None
    reps = space.get("replicates") if isinstance(space, Mapping) else None
    param = reps.get("param") if isinstance(reps, Mapping) else None
    return param if isinstance(param, str) and param else DEFAULT_REPLICATE


def _text(value: Any, digits: int = 4) -> str:
    """A value as a short cell: floats to ``digits`` significant digits, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, f".{digits}g")
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def _is_number_text(text: str) -> bool:
    if text == "-":
        return True  # a missing number
    try:
        float(text)
    except ValueError:
        return False
    return True


def duration(seconds: Any) -> str:
    """Seconds as a person reads them: ``0.19 s``, ``42 s``, ``1 min 12 s``, ``2 h 03 min``."""
    if not _is_finite(seconds):
        return "-"
    s = float(seconds)
    if s < 10:
        return f"{s:.2g} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        m, rest = divmod(round(s), 60)
        return f"{m} min {rest:02d} s"
    h, rest = divmod(round(s) // 60, 60)
    return f"{h} h {rest:02d} min"


@dataclass(frozen=True)
class TextTable:
    """A table as text cells for a terminal: a title, column names, rows and notes below it."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def print(self, file: Any = None) -> None:
        """Print with rich: folded to a terminal's width, at full width into a pipe or file."""
        from rich.console import Console
        from rich.measure import Measurement
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(self.title))
        for i, name in enumerate(self.columns):
            numeric = all(_is_number_text(r[i]) for r in self.rows)
            table.add_column(Text(name), justify="right" if numeric else "left", overflow="fold")
        for row in self.rows:
            table.add_row(*(Text(c) for c in row))  # Text: a value is never read as markup
        console = Console(file=file, highlight=False)
        if not console.is_terminal:
            # A pipe or a log file: never wrap a row, whatever COLUMNS says.
            wide = console.options.update_width(100_000)
            width = Measurement.get(console, wide, table).maximum
            console = Console(file=file, highlight=False, width=max(80, width))
        console.print(table)
        for note in self.notes:
            console.print(Text(note), soft_wrap=True)


class SweepResults:
    """The flat table of a sweep's runs; build it with :meth:`load` or from row dicts."""

    def __init__(
        self, rows: Iterable[Mapping[str, Any]] = (), *, replicate: str = DEFAULT_REPLICATE
    ) -> None:
        """Rows as the store returns them (params/metrics dicts) or already flat (``param:lr`` ...);
        ``replicate`` names the parameter whose runs statistics pool (the seed)."""
        self.replicate = replicate
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
        return cls(store.rows(), replicate=replicate_of(store))

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
        out.replicate = self.replicate
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

    def _distinct(self, column: str) -> list[Any]:
        """The values of ``column`` in first-seen order."""
        seen: dict[Any, Any] = {}
        for r in self._rows:
            seen.setdefault(_hashable(r[column]), r[column])
        return list(seen.values())

    def varying(self) -> list[str]:
        """Parameter columns with more than one value in the table, in column order."""
        return [
            c for c in self._columns if c.startswith(PARAM_PREFIX) and len(self._distinct(c)) > 1
        ]

    def grouping(
        self, by: list[str] | str | None = None, *, replicate: str | None = None
    ) -> tuple[list[str], list[str]]:
        """The columns statistics group by, and those of them added to ``by``.

        Only the replicate is pooled: every other varying parameter (and ``step``, when
        there are several) is a group column, after the ``by`` columns. ``by=None`` means
        all of them, and nothing counts as added.
        """
        rep = PARAM_PREFIX + (replicate or self.replicate)
        needed = [c for c in self.varying() if c != rep]
        if len(self._distinct("step")) > 1:
            # Chained sweeps: the same metric name from two steps must not be pooled.
            needed.insert(0, "step")
        if by is None:
            return needed, []
        given = [self._group_column(b) for b in ([by] if isinstance(by, str) else by)]
        given = list(dict.fromkeys(given))
        added = [c for c in needed if c not in given]
        return given + added, added

    def grouping_note(self, by: list[str] | str | None) -> str | None:
        """One line naming the columns :meth:`grouping` added to ``by``, or None."""
        columns, added = self.grouping(by)
        if not added:
            return None
        names = ", ".join(c.removeprefix(PARAM_PREFIX) for c in added)
        why = "added: it varies" if len(added) == 1 else "added: they vary"
        if PARAM_PREFIX + self.replicate in columns:
            return f"grouped also by {names} ({why}); statistics never pool other parameters"
        return (
            f"grouped also by {names} ({why}); statistics pool only the replicate {self.replicate}"
        )

    def summary(
        self,
        metric: str,
        by: list[str] | None = None,
        *,
        replicate: str | None = None,
        confidence: float = 0.95,
    ) -> list[dict[str, Any]]:
        """Statistics of ``metric`` per group, pooling only the replicates (see :meth:`grouping`).

        ``by`` defaults to every varying parameter except ``replicate`` (default: the sweep's,
        :attr:`replicate`), plus ``step`` when there are several; the groups are ordered by
        the ``by`` columns' values as first seen. Only ok/warning rows with a finite value
        count; a group with none has n=0 and None statistics, and with n=1 std and the
        interval are None. The interval stays inside :func:`metric_domain`. Each dict: the
        group's column values, ``metric``, n, mean, std, ci_low, ci_high, ci_clipped, min, max.
        """
        column = self._metric_column(metric)
        if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
            raise ExpflowError(
                f"confidence {confidence!r} is not valid; expected a number between 0 and 1, e.g. 0.95"
            )
        group_cols, _ = self.grouping(by, replicate=replicate)
        groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[float]]] = {}
        for r in self._rows:
            ident = tuple(_hashable(r[c]) for c in group_cols)
            if ident not in groups:
                groups[ident] = ({c: r[c] for c in group_cols}, [])
            if r["status"] in COMPLETED_STATUSES and _is_finite(r[column]):
                groups[ident][1].append(float(r[column]))
        rank = [{_hashable(v): i for i, v in enumerate(self._distinct(c))} for c in group_cols]
        order = sorted(groups, key=lambda ident: [rk[v] for rk, v in zip(rank, ident, strict=True)])
        metric_name = column[len(METRIC_PREFIX) :]
        domain = metric_domain(metric_name)
        return [
            {**groups[k][0], "metric": metric_name, **describe(groups[k][1], confidence, domain)}
            for k in order
        ]

    # --- for people --------------------------------------------------------------------

    def overview(self) -> list[str]:
        """A few lines for a terminal: runs by status, the parameters, the metrics."""
        counts = {k: v for k, v in self.status_counts().items() if v}
        if not self._rows:
            return ["0 runs recorded yet"]
        lines = [f"{len(self)} runs: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
        varying = self.varying()
        rep = PARAM_PREFIX + self.replicate
        swept = [
            f"{c[len(PARAM_PREFIX) :]} ({len(self._distinct(c))} values)"
            for c in varying
            if c != rep
        ]
        if swept:
            lines.append("parameters: " + ", ".join(swept))
        if rep in varying:
            lines.append(
                f"replicate: {self.replicate} ({len(self._distinct(rep))} values, "
                "pooled by --by statistics)"
            )
        fixed = self._fixed()
        if fixed:
            lines.append("same in every run: " + fixed)
        lines.append("metrics: " + (", ".join(self.metrics) or "none"))
        return lines

    def _fixed(self) -> str:
        """The parameters with one value, as ``name=value`` text."""
        return ", ".join(
            f"{c[len(PARAM_PREFIX) :]}={_text(self._distinct(c)[0])}"
            for c in self._columns
            if c.startswith(PARAM_PREFIX) and len(self._distinct(c)) == 1
        )

    def best_table(self, metric: str, maximize: bool = False, n: int = 10) -> TextTable:
        """:meth:`best` as a table: rank, varying parameters, metrics (``metric`` first), status."""
        rows = self.best(metric, maximize=maximize, n=n)
        column = self._metric_column(metric)
        name = column[len(METRIC_PREFIX) :]
        rep = PARAM_PREFIX + self.replicate
        params = sorted(self.varying(), key=lambda c: c == rep)  # the replicate last
        metrics = [column] + [
            c for c in self._columns if c.startswith(METRIC_PREFIX) and c != column
        ]
        steps = len(self._distinct("step")) > 1
        usable = sum(
            1 for r in self._rows if r["status"] in COMPLETED_STATUSES and _is_finite(r[column])
        )
        columns = ["rank", *(["step"] if steps else [])]
        columns += [c[len(PARAM_PREFIX) :] for c in params]
        columns += [c[len(METRIC_PREFIX) :] for c in metrics] + ["status", "wall"]
        cells = []
        for i, r in enumerate(rows, 1):
            cells.append(
                [str(i), *([_text(r["step"])] if steps else [])]
                + [_text(r[c]) for c in params]
                + [_text(r[c], digits=5) for c in metrics]
                + [_text(r["status"]), duration(r["wall_s"])]
            )
        notes = [] if rows else [f"no ok or warning run has a finite {name}"]
        fixed = self._fixed()
        if fixed:
            notes.append(f"same in every run: {fixed}")
        notes.append("--json prints every column (run folders, timings) for scripts")
        direction = "highest" if maximize else "lowest"
        title = f"Best {len(rows)} of {usable} ok/warning runs by {name} ({direction} first)"
        return TextTable(title, columns, cells, notes)

    def summary_table(
        self, metric: str, by: list[str] | None = None, *, confidence: float = 0.95
    ) -> TextTable:
        """:meth:`summary` as a table, with notes on what was added to ``by`` and pooled."""
        stats = self.summary(metric, by, confidence=confidence)
        group_cols, _ = self.grouping(by)
        name = self._metric_column(metric)[len(METRIC_PREFIX) :]
        ci_name = f"{confidence:.0%} CI"
        columns = [c.removeprefix(PARAM_PREFIX) for c in group_cols]
        columns += ["n", "mean", "std", ci_name, "min", "max"]
        low, high = metric_domain(name)
        cells = []
        for s in stats:
            if s["ci_low"] is None:
                ci = "none (n<2)" if s["n"] else "no ok runs"
            else:
                ci = f"[{_text(s['ci_low'])}, {_text(s['ci_high'])}]" + (
                    "*" if s["ci_clipped"] else ""
                )
            cells.append(
                [_text(s[c]) for c in group_cols]
                + [str(s["n"])]
                + [_text(s[k]) for k in ("mean", "std")]
                + [ci]
                + [_text(s[k]) for k in ("min", "max")]
            )
        rep = PARAM_PREFIX + self.replicate
        note = self.grouping_note(by)
        notes = [note] if note else []
        if rep in group_cols:
            notes.append(f"{self.replicate} is a group column here, so no replicates are pooled")
        elif rep in self._columns:
            notes.append(f"n counts the {self.replicate} replicates with an ok/warning {name}")
        else:
            notes.append(
                f"no replicate parameter {self.replicate!r} in these results: each group is one run"
            )
        if any(s["ci_clipped"] for s in stats):
            bound = "cannot be negative" if (low, high) == (0.0, None) else f"stays in {low}…{high}"
            notes.append(f"* interval clipped to the domain: {name} {bound}")
        if any(s["ci_low"] is None and s["n"] == 1 for s in stats):
            notes.append("n<2: one run gives a mean but no interval")
        groups = ", ".join(columns[: len(group_cols)]) or "all runs"
        title = f"{name} by {groups}: mean over {self.replicate} replicates, {ci_name} (t)"
        return TextTable(title, columns, cells, notes)

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
