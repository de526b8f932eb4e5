"""Sweep reports: an offline plotly dashboard, a light live status page, and PNG export.

Rows are a sweep's results table as dicts (``combo_id``, ``combo_index``, ``step``, ``status``,
``reason``, ``log_excerpt``, ``run_dir``, ``wall_s``, ``cpu_s``, ``peak_rss_mb`` and flattened
``param:<name>`` / ``metric:<name>`` keys). The pages are the autoescaped templates
``templates/sweep_dashboard.html.j2`` and ``sweep_status.html.j2``; figure JSON inside
``<script>`` has ``<``, ``>``, ``&`` written as ``\\u003c`` … so a value such as ``</script>``
cannot end the script. Text inside plotly figures is escaped for plotly's own markup (``_t``).
"""

from __future__ import annotations

import html
import itertools
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from expflow_flows.errors import ExpflowError
from expflow_flows.html import render, shared_plotly_js
from expflow_flows.sweep.results import DEFAULT_REPLICATE, metric_domain

log = logging.getLogger(__name__)

PARAM = "param:"
METRIC = "metric:"
STATUSES = ("ok", "warning", "pruned", "failed")
GOOD = frozenset({"ok", "warning"})
# Worst first wins when a combination has several rows (one per step).
_SEVERITY = {"ok": 0, "warning": 1, "pruned": 2, "failed": 3}
COLOURS = {
    "ok": "#2e7d32",
    "warning": "#ef6c00",
    "failed": "#c62828",
    "pruned": "#9e9e9e",
}
_OTHER_COLOUR = "#6a1b9a"
_MAX_DISTINCT = 12  # numeric params with more values than this are binned
_N_BINS = 8
_MAX_CATEGORIES = 30  # categorical params keep this many labels, the rest become "(other)"
_MAX_FACETS = 12
_FEW_VALUES = 5  # a third param with at most this many values facets the heatmaps
_MAX_PANELS = 24
_DECADES = 100.0  # positive values with max/min at least this are drawn on a log axis
# Log axes label 1e-04 (not plotly's SI 100µ, odd for a learning rate) and only 2 and 5
# between the powers of ten.
_LOG_AXIS = {"exponentformat": "e", "dtick": "D2"}
_REFRESH = re.compile(r"<meta\s+http-equiv=['\"]?refresh['\"]?[^>]*>", re.IGNORECASE)
# A page's <script> loading the folder's plotly.js (shared_plotly_js), by its relative name.
_SHARED_PLOTLY = re.compile(r"<script src=['\"]plotly-[^'\"/]+\.min\.js['\"]")
_CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# --------------------------------------------------------------------------- plotly text


def _t(value: Any) -> str:
    """Escape for plotly text: plotly decodes ``&lt;`` ``&gt;`` ``&amp;`` but not ``&quot;``."""
    return html.escape(str(value), quote=False)


def _tpl(value: Any) -> str:
    """Escape for a plotly hovertemplate, where ``%{`` would start a placeholder."""
    return _t(value).replace("%", "&#37;")


# --------------------------------------------------------------------------- data shaping


def _combine(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict per combination: rows of the same ``combo_id`` (one per step) are merged."""
    merged: dict[Any, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        key = row.get("combo_id")
        key = ("#row", i) if key is None else key
        cur = merged.get(key)
        if cur is None:
            merged[key] = dict(row)
            continue
        old, new = str(cur.get("status", "")), str(row.get("status", ""))
        worse = _SEVERITY.get(new, 4) >= _SEVERITY.get(old, 4)
        for k, v in row.items():
            if v is None:
                continue
            if k in ("status", "reason", "log_excerpt", "step") and not worse:
                continue  # the worst step's status explains the combination
            cur[k] = v
    return list(merged.values())


def _names(rows: list[dict[str, Any]], prefix: str) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k.startswith(prefix):
                seen.setdefault(k[len(prefix) :], None)
    return list(seen)


def _num(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan if value is None else float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def _clip(value: Any, n: int = 200) -> str:
    text = str(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _status(row: Mapping[str, Any]) -> str:
    return str(row.get("status") or "unknown")


@dataclass
class _Axis:
    """A parameter as categories (for grouping) and, when numeric, raw values (for parcoords)."""

    name: str
    labels: list[str]  # raw (unescaped) labels in display order
    codes: np.ndarray  # per row: index into labels
    values: np.ndarray | None  # per row: float value when every value is a real number
    binned: bool

    @property
    def n(self) -> int:
        return len(self.labels)


def _bin_labels(edges: list[float]) -> list[str]:
    """Half-open interval labels, the last one closed: ``[1, 2)`` … ``[8, 9]``."""
    for digits in (3, 6, 12):  # as short as keeps the edges apart
        text = [format(e, f".{digits}g") for e in edges]
        if len(set(text)) == len(text):
            break
    last = len(edges) - 2
    return [
        f"[{lo}, {hi}{']' if i == last else ')'}"
        for i, (lo, hi) in enumerate(itertools.pairwise(text))
    ]


def _axis(name: str, raw: list[Any]) -> _Axis:
    numeric = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in raw
    )
    if numeric and raw:
        vals = np.asarray(raw, dtype=float)
        distinct = np.unique(vals)
        if len(distinct) > _MAX_DISTINCT:
            edges = np.unique(np.quantile(vals, np.linspace(0, 1, _N_BINS + 1)))
            if len(edges) >= 3:
                codes = np.searchsorted(edges[1:-1], vals, side="right")
                labels = _bin_labels(edges.tolist())
                return _Axis(name, labels, codes, vals, True)
        codes = np.searchsorted(distinct, vals)
        # Ints stay ints in the labels (32, not 32.0) when every value is integral.
        ints = all(isinstance(v, int) for v in raw)
        labels = [str(int(v)) if ints else _fmt(float(v)) for v in distinct]
        return _Axis(name, labels, codes, vals, False)
    text = [_fmt(v) for v in raw]
    counts = Counter(text)
    order = list(dict.fromkeys(text))  # first appearance follows the space's own order
    if len(order) > _MAX_CATEGORIES:
        keep = {k for k, _ in counts.most_common(_MAX_CATEGORIES - 1)}
        order = [k for k in order if k in keep] + ["(other)"]
    index = {k: i for i, k in enumerate(order)}
    other = index.get("(other)", len(order) - 1)
    codes = np.fromiter((index.get(t, other) for t in text), dtype=np.int64, count=len(text))
    return _Axis(name, order, codes, None, False)


def _importance(axis: _Axis, y: np.ndarray) -> float:
    """Correlation ratio eta² of the objective on the parameter's categories (0…1)."""
    if len(y) < 2 or axis.n < 2:
        return 0.0
    total = float(np.sum((y - y.mean()) ** 2))
    if total <= 0:
        return 0.0
    cnt = np.bincount(axis.codes, minlength=axis.n)
    sums = np.bincount(axis.codes, weights=y, minlength=axis.n)
    present = cnt > 0
    means = sums[present] / cnt[present]
    return float(np.sum(cnt[present] * (means - y.mean()) ** 2) / total)


def _decades(values: np.ndarray | None) -> bool:
    """Whether ``values`` are all positive and span two decades or more (a log axis then)."""
    if values is None or not len(values) or not np.all(np.isfinite(values)):
        return False
    return bool(values.min() > 0 and values.max() >= _DECADES * values.min())


def _log_ticks(values: np.ndarray) -> dict[str, list[Any]]:
    """Ticks for log10 of the data, labelled in data units: at the powers of ten inside
    ``values``, or at 1, 2 and 5 times them when fewer than three powers are inside."""
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    steps = (1,) if math.floor(hi) - math.ceil(lo) >= 2 else (1, 2, 5)
    ticks = [
        m * 10.0**k
        for k in range(math.floor(lo), math.ceil(hi) + 1)
        for m in steps
        if lo - 1e-9 <= math.log10(m * 10.0**k) <= hi + 1e-9
    ]
    return {"tickvals": [math.log10(t) for t in ticks], "ticktext": [_fmt(t) for t in ticks]}


@dataclass(frozen=True)
class _Scale:
    """How the objective is drawn: log when it spans decades, and the bounds it keeps."""

    name: str
    log: bool
    low: float | None
    high: float | None

    @classmethod
    def of(cls, name: str, y: np.ndarray) -> _Scale:
        low, high = metric_domain(name)
        return cls(name, _decades(y), low, high)

    @property
    def label(self) -> str:
        return f"{self.name} (log scale)" if self.log else self.name

    def values(self, y: np.ndarray) -> np.ndarray:
        return np.log10(y) if self.log else y


# --------------------------------------------------------------------------- figures


def _layout(fig: Any, title: str, height: int) -> None:
    fig.update_layout(
        title=_t(title), height=height, template="plotly_white", margin=dict(t=70, b=50)
    )


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    c = max(1, min(n, cols))
    return math.ceil(n / c), c


def _heatmap(
    a: _Axis, b: _Axis, f: _Axis | None, y: np.ndarray, scale: _Scale, maximize: bool
) -> Any:
    from plotly.subplots import make_subplots

    if f is None:
        facets: list[tuple[str | None, np.ndarray]] = [(None, np.ones(len(y), dtype=bool))]
    else:
        ranked = Counter(f.codes.tolist()).most_common(_MAX_FACETS)
        facets = [(f.labels[k], f.codes == k) for k, _ in sorted(ranked)]
    nr, nc = _grid(len(facets))
    titles = [_t(f"{f.name} = {lab}") for lab, _ in facets] if f is not None else None
    fig = make_subplots(
        rows=nr,
        cols=nc,
        subplot_titles=titles,
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.06,
        vertical_spacing=0.12 if nr > 1 else 0.0,
    )
    xs, ys = [_t(x) for x in a.labels], [_t(x) for x in b.labels]
    objective = scale.name
    hover = (
        f"{_tpl(a.name)} = %{{x}}<br>{_tpl(b.name)} = %{{y}}<br>"
        f"mean {_tpl(objective)} = %{{customdata[1]:.4g}}<br>n = %{{customdata[0]}}<extra></extra>"
    )
    shown: list[np.ndarray] = []
    for i, (_lab, sel) in enumerate(facets):
        idx = b.codes[sel] * a.n + a.codes[sel]
        cnt = np.bincount(idx, minlength=a.n * b.n)
        sums = np.bincount(idx, weights=y[sel], minlength=a.n * b.n)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)
            z = scale.values(mean)  # a log scale colours by decades, the hover shows the mean
        shown.append(z)
        fig.add_heatmap(
            x=xs,
            y=ys,
            z=z.reshape(b.n, a.n),
            customdata=np.stack([cnt.astype(float), mean], axis=-1).reshape(b.n, a.n, 2),
            coloraxis="coloraxis",
            hovertemplate=hover,
            row=i // nc + 1,
            col=i % nc + 1,
        )
    fig.update_xaxes(type="category", title_text=_t(a.name))
    fig.update_yaxes(type="category", title_text=_t(b.name))
    colorbar: dict[str, Any] = dict(title=dict(text=_t(f"mean {scale.label}")))
    if scale.log:
        colorbar.update(_log_ticks(np.concatenate(shown)))
    fig.update_layout(
        coloraxis=dict(
            colorscale="Viridis",
            reversescale=not maximize,  # the better end is always the bright one
            colorbar=colorbar,
        )
    )
    title = f"mean {objective} over {a.name} × {b.name}"
    _layout(fig, title + (f", by {f.name}" if f is not None else ""), 180 + 330 * nr)
    return fig


def _parcoords(axes: list[_Axis], y: np.ndarray, scale: _Scale, maximize: bool) -> Any:
    import plotly.graph_objects as go

    dims = []
    for ax in axes:
        if ax.values is not None and _decades(ax.values):
            # Spans of decades (learning rates) crowd one end of a linear axis.
            logs = np.log10(ax.values)
            dims.append(dict(label=_t(f"{ax.name} (log scale)"), values=logs, **_log_ticks(logs)))
        elif ax.values is not None:
            dims.append(dict(label=_t(ax.name), values=ax.values))
        else:
            dims.append(
                dict(
                    label=_t(ax.name),
                    values=ax.codes,
                    tickvals=list(range(ax.n)),
                    ticktext=[_t(x) for x in ax.labels],
                    range=[-0.5, ax.n - 0.5] if ax.n == 1 else [0, ax.n - 1],
                )
            )
    shown = scale.values(y)
    ticks = _log_ticks(shown) if scale.log else {}
    dims.append(dict(label=_t(scale.label), values=shown, **ticks))
    fig = go.Figure(
        go.Parcoords(
            dimensions=dims,
            line=dict(
                color=shown,
                colorscale="Viridis",
                reversescale=not maximize,
                showscale=True,
                colorbar=dict(title=dict(text=_t(scale.label)), **ticks),
            ),
        )
    )
    _layout(fig, f"parameters and {scale.name}", 520)
    fig.update_layout(margin=dict(l=80, r=80, t=100, b=40))
    return fig


def _marginals(
    axes: list[_Axis], imps: dict[str, float], y: np.ndarray, scale: _Scale
) -> tuple[Any, bool]:
    """The objective per value of each parameter, and whether an error bar met the domain's edge.

    A log-scale objective shows the geometric mean ×/÷ the geometric std (always positive);
    otherwise the mean ± std, cut where the metric's domain ends (an error is never below 0).
    """
    from plotly.subplots import make_subplots

    nr, nc = _grid(len(axes))
    titles = [_t(f"{ax.name}  (η² = {imps[ax.name]:.2f})") for ax in axes]
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=titles, vertical_spacing=0.5 / nr)
    v = scale.values(y)
    clipped = False
    for i, ax in enumerate(axes):
        row, col = i // nc + 1, i % nc + 1
        cnt = np.bincount(ax.codes, minlength=ax.n)
        sums = np.bincount(ax.codes, weights=v, minlength=ax.n)
        sq = np.bincount(ax.codes, weights=v * v, minlength=ax.n)
        present = cnt > 0
        mean = sums[present] / cnt[present]
        std = np.sqrt(np.maximum(sq[present] / cnt[present] - mean**2, 0.0))
        if scale.log:
            centre = 10.0**mean
            plus, minus = 10.0 ** (mean + std) - centre, centre - 10.0 ** (mean - std)
        else:
            centre, plus, minus = mean, std.copy(), std.copy()
            if scale.low is not None:
                minus = np.minimum(minus, np.maximum(centre - scale.low, 0.0))
            if scale.high is not None:
                plus = np.minimum(plus, np.maximum(scale.high - centre, 0.0))
            clipped = clipped or bool(np.any(minus < std) or np.any(plus < std))
        numeric = ax.values is not None and not ax.binned
        if numeric:
            # Numbers on a numeric axis, so their spacing shows (log when they span decades).
            x: Any = np.unique(ax.values)[present]
            xtype = "log" if _decades(ax.values) else "linear"
        else:
            x = [_t(lab) for lab, p in zip(ax.labels, present, strict=True) if p]
            xtype = "category"
        fig.add_scatter(
            x=x,
            y=centre,
            error_y=dict(type="data", symmetric=False, array=plus, arrayminus=minus, visible=True),
            customdata=cnt[present],
            mode="lines+markers" if ax.values is not None else "markers",
            marker_color="#1f77b4",
            line_color="#1f77b4",
            name=_t(ax.name),
            showlegend=False,
            hovertemplate=(
                f"{_tpl(ax.name)} = %{{x}}<br>mean {_tpl(scale.name)} = %{{y:.4g}}"
                "<br>n = %{customdata}<extra></extra>"
            ),
            row=row,
            col=col,
        )
        fig.update_xaxes(type=xtype, **(_LOG_AXIS if xtype == "log" else {}), row=row, col=col)
    fig.update_yaxes(type="log" if scale.log else "linear", **(_LOG_AXIS if scale.log else {}))
    fig.update_yaxes(title_text=_t(scale.name), col=1)
    how = "geometric mean ×/÷ geometric std" if scale.log else "mean ± std"
    _layout(fig, f"marginal effect on {scale.name} ({how})", 120 + 300 * nr)
    return fig, clipped


def _histograms(metrics: list[tuple[str, np.ndarray]]) -> Any:
    from plotly.subplots import make_subplots

    nr, nc = _grid(len(metrics))
    fig = make_subplots(
        rows=nr, cols=nc, subplot_titles=[_t(m) for m, _ in metrics], vertical_spacing=0.5 / nr
    )
    for i, (name, vals) in enumerate(metrics):
        row, col = i // nc + 1, i % nc + 1
        if _decades(vals):
            # Bins of equal width in log10: a linear axis would squeeze all but the worst runs.
            logs = np.log10(vals)
            fig.add_histogram(x=logs, name=_t(name), showlegend=False, row=row, col=col)
            fig.update_xaxes(
                title_text=_t(f"{name} (log scale)"), **_log_ticks(logs), row=row, col=col
            )
        else:
            fig.add_histogram(x=vals, name=_t(name), showlegend=False, row=row, col=col)
    _layout(fig, "metric distributions (ok and warning rows)", 120 + 260 * nr)
    return fig


# --------------------------------------------------------------------------- page data
# What the templates (templates/sweep_*.html.j2) print; they escape every value.


def _status_data(combos: list[dict[str, Any]], n_rows: int) -> dict[str, Any]:
    counts = Counter(_status(r) for r in combos)
    order = [s for s in STATUSES if counts[s]] + sorted(set(counts) - set(STATUSES))
    steps = list(dict.fromkeys(str(r.get("step") or "") for r in combos))
    by_step = []
    if len(steps) > 1:
        by = Counter((str(r.get("step") or ""), _status(r)) for r in combos)
        by_step = [(st, [by[(st, s)] for s in order]) for st in steps]
    reasons = Counter(
        (_status(r), str(r.get("reason") or "")[:200])
        for r in combos
        if _status(r) != "ok" and r.get("reason")
    )
    return {
        "n_rows": n_rows,
        "status_counts": [(s, counts[s]) for s in order],
        "by_step": by_step,
        "reasons": [(s, reason, n) for (s, reason), n in reasons.most_common(10)],
    }


def _top_data(
    combos: list[dict[str, Any]],
    y_all: np.ndarray,
    good: np.ndarray,
    objective: str | None,
    params: list[str],
    metrics: list[str],
    maximize: bool,
    top_k: int,
) -> dict[str, Any]:
    top: dict[str, Any] = {"k": top_k, "note": None}
    if objective is None:
        return top | {"note": "No metric recorded, so there is no ranking."}
    idx = np.flatnonzero(good)
    if not len(idx):
        return top | {"note": "No ok or warning rows with a finite objective."}
    key = -y_all[idx] if maximize else y_all[idx]
    best = idx[np.argsort(key, kind="stable")[:top_k]]
    others = [m for m in metrics if m != objective]
    columns = (
        ["rank", "combo", "status", objective]
        + params
        + others
        + ["wall_s", "peak_rss_mb", "run_dir"]
    )
    rows = []
    for rank, i in enumerate(best, 1):
        r = combos[i]
        cells = [
            str(rank),
            _fmt(r.get("combo_index", r.get("combo_id", ""))),
            _status(r),
            _fmt(r.get(METRIC + objective)),
        ]
        cells += [_fmt(r.get(PARAM + p, "")) for p in params]
        cells += [_fmt(r.get(METRIC + m, "")) for m in others]
        cells += [_fmt(r.get(k, "")) for k in ("wall_s", "peak_rss_mb", "run_dir")]
        rows.append(cells)
    direction = "highest" if maximize else "lowest"
    return top | {"objective": objective, "direction": direction, "columns": columns, "rows": rows}


class _Figures:
    """Numbers the figures of a page; the page head loads plotly.js from the folder's copy."""

    def __init__(self) -> None:
        self.n = 0

    def part(self, fig: Any) -> dict[str, Any]:
        self.n += 1
        return {"figure": fig, "id": f"fig{self.n}"}


def _note(text: str) -> dict[str, str]:
    return {"note": text}


def _atomic_write(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process tmp name: a reader (browser refresh) sees the old page or the new one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- public API


def write_dashboard(
    rows: Iterable[Mapping[str, Any]],
    path: Path,
    *,
    title: str,
    objective: str | None = None,
    maximize: bool = False,
    top_k: int = 20,
    facet: str | None = None,
    replicate: str | None = DEFAULT_REPLICATE,
) -> Path:
    """Write an offline plotly HTML dashboard of a sweep's rows to ``path`` (and plotly.js beside).

    ``objective`` defaults to the first metric; ``facet`` names a param to split heatmaps by.
    ``replicate`` (the seed) is pooled in every plot, never treated as a parameter; parameters
    with one value among the plotted runs are left out.
    """
    raw_rows = list(rows)
    combos = _combine(raw_rows)
    params = _names(combos, PARAM)
    metrics = _names(combos, METRIC)
    if objective is not None and objective.startswith(METRIC):
        objective = objective[len(METRIC) :]
    if objective is not None and objective not in metrics:
        raise ExpflowError(
            f"objective {objective!r} is not a metric of this sweep; "
            f"metrics: {', '.join(metrics) or 'none'}"
        )
    if facet is not None and facet.startswith(PARAM):
        facet = facet[len(PARAM) :]
    if facet is not None and facet not in params:
        raise ExpflowError(
            f"facet {facet!r} is not a parameter of this sweep; "
            f"parameters: {', '.join(params) or 'none'}"
        )
    if top_k < 0:
        raise ExpflowError(f"top_k must be >= 0, got {top_k}")
    if objective is None and metrics:
        objective = metrics[0]

    good_status = np.array([_status(r) in GOOD for r in combos], dtype=bool)
    y_all = np.array(
        [_num(r.get(METRIC + objective)) if objective else math.nan for r in combos], dtype=float
    )
    good = good_status & np.isfinite(y_all)
    y = y_all[good]

    figs = _Figures()
    sections: list[dict[str, Any]] = []
    plotted = [r for r, g in zip(combos, good, strict=True) if g]
    # Axes of the plotted runs only: a value seen only in failed runs would be an empty row.
    axes = {p: _axis(p, [r.get(PARAM + p) for r in plotted]) for p in params}
    axes = {p: ax for p, ax in axes.items() if ax.n > 1}
    pooled = replicate if replicate in axes else None
    varied = [p for p in axes if p != pooled]
    scale = _Scale.of(objective or "", y)
    imps = {p: _importance(axes[p], scale.values(y)) for p in varied}
    ranked = sorted(varied, key=lambda p: -imps[p])

    no_data = None
    if objective is None:
        no_data = "No metric was recorded, so there is nothing to plot."
    elif not good.any():
        no_data = (
            f"No ok or warning rows with a finite {objective}; "
            "the status counts above say what happened."
        )

    obj = objective or ""  # only used below when there is data, i.e. an objective

    # Heatmaps over pairs of the most important params.
    parts: list[dict[str, Any]]
    if no_data:
        parts = [_note(no_data)]
    elif len(varied) < 2:
        only = f" (only {varied[0]} varies)" if varied else ""
        parts = [_note(f"Heatmaps need at least two varied parameters{only}.")]
    else:
        fparam = facet
        if fparam is None and len(ranked) >= 3 and axes[ranked[2]].n <= _FEW_VALUES:
            fparam = ranked[2]
        if fparam is not None and fparam not in axes:
            fparam = None  # a constant facet would only repeat the plain heatmap
        pair_params = [p for p in ranked if p != fparam][:3]
        fax = axes[fparam] if fparam is not None else None
        parts = []
        if len(pair_params) < 2:
            parts.append(_note(f"Only one parameter varies besides the facet {fparam}."))
        for a, b in itertools.combinations(pair_params, 2):
            parts.append(figs.part(_heatmap(axes[a], axes[b], fax, y, scale, maximize)))
        if fax is not None and fax.n > _MAX_FACETS:
            parts.append(_note(f"Facets show the {_MAX_FACETS} most frequent values of {fparam}."))
    sections.append({"id": "heatmaps", "heading": "Heatmaps", "parts": parts})

    # Parallel coordinates.
    if no_data:
        parts = [_note(no_data)]
    elif not varied:
        parts = [_note("No parameter varies; there is nothing to relate the objective to.")]
    else:
        parts = [figs.part(_parcoords([axes[p] for p in ranked[:12]], y, scale, maximize))]
    sections.append({"id": "parallel", "heading": "Parallel coordinates", "parts": parts})

    # Marginal effects.
    if no_data:
        parts = [_note(no_data)]
    elif not varied:
        parts = [_note("No parameter varies.")]
    else:
        marginals, clipped = _marginals([axes[p] for p in ranked[:_MAX_PANELS]], imps, y, scale)
        parts = [
            figs.part(marginals),
            _note(
                f"η² is the share of the objective's variance{' (of its log)' if scale.log else ''} "
                "explained by the parameter's values (continuous parameters in up to "
                f"{_N_BINS} quantile bins)."
            ),
        ]
        if clipped:
            edge = "0: it cannot be negative" if scale.low == 0 else "the edge of its domain"
            parts.append(_note(f"Error bars of {obj} are clipped at {edge}."))
    sections.append({"id": "marginals", "heading": "Marginal effects", "parts": parts})

    # Metric distributions.
    dists = []
    for m in metrics[:_MAX_PANELS]:
        vals = np.array(
            [_num(r.get(METRIC + m)) for r, g in zip(combos, good_status, strict=True) if g]
        )
        vals = vals[np.isfinite(vals)] if len(vals) else vals
        if len(vals):
            dists.append((m, vals))
    if dists:
        parts = [figs.part(_histograms(dists))]
    elif metrics:
        parts = [_note("No ok or warning rows with finite metric values.")]
    else:
        parts = [_note("No metric was recorded.")]
    sections.append({"id": "metrics", "heading": "Metric distributions", "parts": parts})

    page = render(
        "sweep_dashboard.html.j2",
        title=title,
        plotly_js_src=shared_plotly_js(Path(path).parent),
        colours=COLOURS,
        other_colour=_OTHER_COLOUR,
        n_combos=len(combos),
        n_good=int(good.sum()),
        objective=objective,
        maximize=maximize,
        ranked=ranked,
        replicate=pooled,
        written=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        top=_top_data(combos, y_all, good, objective, params, metrics, maximize, top_k),
        sections=sections,
        **_status_data(combos, len(raw_rows)),
    )
    return _atomic_write(path, page)


# Log excerpts are the bulk of the page: cap each one and the page's total.
_EXCERPT_CAP = {"failed": 2000, "warning": 1000, "pruned": 500}
_EXCERPT_CAP_OTHER = 300
_EXCERPT_BUDGET = 2_500_000


@dataclass(frozen=True, slots=True)
class _Cell:
    """One combination's cell on the status page (attributes: templates read them fastest)."""

    cls: str  # the status's CSS class: its first letter, or x
    index: Any
    status: str
    step: Any
    combo_id: Any
    params: list[tuple[str, str]]
    reason: str
    run_dir: str
    excerpt: str


def _order(row: Mapping[str, Any]) -> tuple[bool, float, str]:
    # NaN keys would make the sort order arbitrary; rows without an index go last.
    idx = _num(row.get("combo_index"))
    return (math.isnan(idx), 0.0 if math.isnan(idx) else idx, str(row.get("combo_id")))


def write_status_page(
    rows: Iterable[Mapping[str, Any]],
    path: Path,
    *,
    title: str,
    total: int | None = None,
    refresh_s: int | None = 5,
) -> Path:
    """Write a light, plotly-free live status page: done/total, counts, one cell per combination.

    The page reloads itself every ``refresh_s`` seconds; pass ``None`` once the sweep is finished.
    """
    combos = _combine(rows)
    combos.sort(key=_order)
    counts = Counter(_status(r) for r in combos)
    done = len(combos)
    pending = max(0, total - done) if total is not None else 0
    order = [s for s in STATUSES if counts[s]] + sorted(set(counts) - set(STATUSES))

    # Spend the excerpt budget (counted escaped, as written) on the most severe rows first.
    budget = _EXCERPT_BUDGET
    excerpts: dict[int, str] = {}
    for i in sorted(range(done), key=lambda j: -_SEVERITY.get(_status(combos[j]), 4)):
        text = str(combos[i].get("log_excerpt") or "")
        if not text:
            continue
        cap = _EXCERPT_CAP.get(_status(combos[i]), _EXCERPT_CAP_OTHER)
        # Keep the tail: the end of a log is where the error is.
        tail = text[-cap:]
        size = len(html.escape(tail))
        if size > budget:
            tail, size = "", 0
        budget -= size
        cut = "" if tail and len(text) <= cap else "\n… (cut; see the run folder)"
        excerpts[i] = tail + cut

    cells = []
    for i, r in enumerate(combos):
        st = _status(r)
        cells.append(
            _Cell(
                cls=st[0] if st in COLOURS else "x",
                index=r.get("combo_index", i),
                status=st,
                step=r.get("step"),
                combo_id=r.get("combo_id"),
                params=[
                    (_clip(k[len(PARAM) :]), _clip(_fmt(v)))
                    for k, v in r.items()
                    if k.startswith(PARAM)
                ],
                reason=_clip(r["reason"], 1000) if r.get("reason") else "",
                run_dir=_clip(r["run_dir"], 500) if r.get("run_dir") else "",
                excerpt=excerpts.get(i, ""),
            )
        )

    page = render(
        "sweep_status.html.j2",
        title=title,
        refresh_s=int(refresh_s) if refresh_s is not None else None,
        colours=COLOURS,
        other_colour=_OTHER_COLOUR,
        shown=f"{done} / {total}" if total is not None else str(done),
        fraction=min(1.0, done / total) if total else 1.0,
        legend=[(s, counts[s]) for s in order],
        written=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        cells=cells,
        pending=pending,
    )
    return _atomic_write(path, page)


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome executable on PATH, or None."""
    for name in _CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_command(chromium: str, user_data_dir: str, *extra: str) -> list[str]:
    """A headless Chromium command line that stays offline and leaves no profile behind."""
    return [
        chromium,
        "--headless",
        "--no-sandbox",  # containers run as root, where the sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",  # small /dev/shm in containers crashes the renderer
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        # Software WebGL, so parallel coordinates (WebGL) render without a GPU.
        "--enable-unsafe-swiftshader",
        f"--user-data-dir={user_data_dir}",
        *extra,
    ]


def export_png(
    html_or_fig: Any,
    path: Path,
    *,
    window_size: tuple[int, int] = (1400, 1000),
    timeout_s: float = 90.0,
) -> Path | None:
    """Screenshot an HTML file, HTML text or plotly figure to a PNG with headless Chromium.

    Returns None, with a logged warning saying why, when no Chromium is on PATH or it fails.
    """
    chromium = find_chromium()
    if chromium is None:
        log.warning(
            "export_png: no PNG written, no chromium on PATH (looked for %s)",
            ", ".join(_CHROMIUM_NAMES),
        )
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="expflow-png-") as tmp:
        if isinstance(html_or_fig, Path) or (
            isinstance(html_or_fig, str) and not html_or_fig.lstrip().startswith("<")
        ):
            src = Path(html_or_fig).resolve()
            if not src.is_file():
                raise ExpflowError(f"export_png: {src} is not an HTML file")
            text = src.read_text(encoding="utf-8", errors="replace")
            if _REFRESH.search(text):
                # A self-reloading page never lets the virtual time budget run out; shoot a
                # copy without the reload, with <base> so relative links still resolve.
                base = render("base_href.html.j2", href=f"{src.parent.as_uri()}/").strip()
                src = Path(tmp) / "page.html"
                src.write_text(_REFRESH.sub(base, text, count=1), encoding="utf-8")
        else:
            src = Path(tmp) / "page.html"
            if isinstance(html_or_fig, str):
                text = html_or_fig
                if _SHARED_PLOTLY.search(text):
                    shared_plotly_js(Path(tmp))  # page text has no folder of its own
            else:
                import plotly.io as pio

                text = pio.to_html(html_or_fig, include_plotlyjs=True, full_html=True)
            src.write_text(text, encoding="utf-8")
        shot = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
        cmd = chromium_command(
            chromium,
            str(Path(tmp) / "profile"),
            f"--screenshot={shot}",
            f"--window-size={window_size[0]},{window_size[1]}",
            "--virtual-time-budget=5000",  # let plotly draw before the shot
            src.as_uri(),
        )
        # Own session, so a timeout can end Chromium's helper processes along with it.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            shot.unlink(missing_ok=True)
            log.warning("export_png: no PNG written, chromium ran past %.0f s", timeout_s)
            return None
        if proc.returncode != 0 or not shot.is_file() or shot.stat().st_size == 0:
            shot.unlink(missing_ok=True)
            tail = (err or "").strip().splitlines()[-1:] or ["no output"]
            log.warning(
                "export_png: no PNG written, chromium exited %s: %s", proc.returncode, tail[0]
            )
            return None
        shot.replace(path)
    return path
