"""Reports: an HTML page of plots and tables for an Optuna study (``study_report.html.j2``).

The page loads plotly.js from one shared file in its folder (``shared_plotly_js``), so it opens
offline; the page is a file in the run folder and artifacts link to it (big HTML does not belong
in the API). Plots are Optuna's, titled with the study's metric names, with log axes where a
parameter was sampled on a log scale or the objective spans decades. A single-objective study
shows its best trial's parameters; a multi-objective one its Pareto front as a plot and a table.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from expflow_flows.html import render, shared_plotly_js

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

# An objective whose values are all positive and span more than this ratio gets a log axis.
_WIDE_RATIO = 100.0


def _plotly_text(text: str) -> str:
    """Escape for plotly text, which reads ``<b>`` and friends as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _metric_names(study: optuna.Study) -> list[str]:
    names = study.metric_names
    if names:
        return [str(n) for n in names]
    n = len(study.directions)
    return ["objective"] if n == 1 else [f"objective_{i}" for i in range(n)]  # as trials_table


def _wide(values: Iterable[float | None]) -> bool:
    """Whether the values are all positive and span more than two decades."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > _WIDE_RATIO


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]


def _feasibility(
    feasible: Callable[[FrozenTrial], bool] | None,
) -> Callable[[FrozenTrial], bool]:
    """A trial is feasible when its stored constraints are all <= 0 and ``feasible`` agrees."""

    def ok(trial: FrozenTrial) -> bool:
        if any(c > 0.0 for c in trial.constraints.values()):
            return False
        return feasible is None or bool(feasible(trial))

    return ok


def _losses(trials: list[FrozenTrial], study: optuna.Study) -> np.ndarray:
    """Objective values with maximized ones negated, so lower is better in every column."""
    sign = np.array([-1.0 if d.name == "MAXIMIZE" else 1.0 for d in study.directions])
    return np.array([t.values for t in trials], dtype=float).reshape(len(trials), len(sign)) * sign


def _front(trials: list[FrozenTrial], study: optuna.Study) -> list[FrozenTrial]:
    """The trials no other of ``trials`` dominates (as good in every objective, better in one).

    ``study.best_trials`` is this over the complete trials meeting their stored constraints;
    here the caller's ``feasible`` can narrow the trials first.
    """
    loss = _losses(trials, study)
    keep = [not np.any(np.all(loss <= row, axis=1) & np.any(loss < row, axis=1)) for row in loss]
    return [t for t, k in zip(trials, keep, strict=True) if k]


# --------------------------------------------------------------------------- plots


def _figures(
    study: optuna.Study, names: list[str], ok: Callable[[FrozenTrial], bool], chosen: int | None
) -> list[tuple[str, Callable[[], Any]]]:
    from optuna import visualization as vis

    complete = _complete(study)
    multi = len(study.directions) > 1
    # Plots of one objective show the first of a multi-objective study's.
    target = (lambda t: t.values[0]) if multi else None
    name = _plotly_text(names[0])
    wide = _wide(t.values[0] for t in complete)

    def logged(fig: Any, log_y: bool) -> Any:
        return fig.update_yaxes(type="log") if log_y else fig

    figs: list[tuple[str, Callable[[], Any]]] = []
    if multi:
        figs.append(("Pareto front", lambda: _pareto_figure(study, names, ok, chosen)))
    figs.append(
        (
            "Optimization history",
            lambda: logged(
                vis.plot_optimization_history(study, target=target, target_name=name), wide
            ),
        )
    )
    # Optuna's slice plot already draws a log x axis for a parameter sampled on a log scale.
    if any(t.params for t in complete):
        figs.append(
            (
                "Slice",
                lambda: logged(vis.plot_slice(study, target=target, target_name=name), wide),
            )
        )
    keys = {k for t in complete for k in t.params}
    varied = {k for k in keys if len({str(t.params.get(k)) for t in complete}) > 1}
    if len(complete) >= 2 and varied:
        figs.append(("Parameter importances", lambda: _importances(study, name)))
        figs.append(
            (
                "Parallel coordinates",
                lambda: vis.plot_parallel_coordinate(study, target=target, target_name=name),
            )
        )
    steps = [t.intermediate_values for t in study.get_trials(deepcopy=False)]
    if not multi and any(steps):
        log_y = _wide(v for s in steps for v in s.values())
        figs.append(
            (
                "Intermediate values",
                lambda: logged(
                    vis.plot_intermediate_values(study).update_yaxes(title_text=name), log_y
                ),
            )
        )
    return figs


def _importances(study: optuna.Study, name: str) -> Any:
    from optuna import visualization as vis

    if len(study.directions) == 1:
        return vis.plot_param_importances(study)  # names the bars by study.metric_names
    # With a target the evaluator rates how params lower it; a maximized one is negated.
    sign = -1.0 if study.directions[0].name == "MAXIMIZE" else 1.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*low `target` values", category=UserWarning)
        return vis.plot_param_importances(
            study, target=lambda t: sign * t.values[0], target_name=name
        )


def _pareto_figure(
    study: optuna.Study, names: list[str], ok: Callable[[FrozenTrial], bool], chosen: int | None
) -> Any:
    import plotly.graph_objects as go
    from optuna import visualization as vis

    complete = _complete(study)
    with warnings.catch_warnings():
        # constraints_func is deprecated, yet the one way to pass feasibility beyond the
        # constraints samplers store, which plot_pareto_front reads by itself.
        warnings.simplefilter("ignore", FutureWarning)
        fig = vis.plot_pareto_front(
            study,
            target_names=[_plotly_text(n) for n in names],
            constraints_func=lambda t: [0.0 if ok(t) else 1.0],
        )
    n = len(names)
    for i, values in enumerate(zip(*(t.values for t in complete), strict=True)):
        if _wide(values):
            if n == 2:
                fig.update_layout({f"{'xy'[i]}axis_type": "log"})
            else:
                fig.update_scenes({f"{'xyz'[i]}axis_type": "log"})
    pick = next((t for t in complete if t.number == chosen), None)
    if pick is not None:
        label = f"chosen: trial {pick.number}"
        marker = {"size": 16, "color": "#d62728", "line": {"width": 1, "color": "black"}}
        if n == 2:
            trace: Any = go.Scatter(
                x=[pick.values[0]],
                y=[pick.values[1]],
                mode="markers",
                name=label,
                marker=marker | {"symbol": "star"},
            )
        else:
            trace = go.Scatter3d(
                x=[pick.values[0]],
                y=[pick.values[1]],
                z=[pick.values[2]],
                mode="markers",
                name=label,
                marker=marker | {"symbol": "diamond", "size": 8},
            )
        fig.add_trace(trace)
        # Above the plot, right: the colour bars of Optuna's traces fill the usual place.
        legend = {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"}
        fig.update_layout(showlegend=True, legend=legend)
    return fig


# --------------------------------------------------------------------------- tables


def _best_table(
    study: optuna.Study,
    names: list[str],
    feasible: Callable[[FrozenTrial], bool] | None,
    chosen: int | None,
) -> dict[str, Any]:
    """The chosen trial, else a single-objective study's best (feasible) trial: its number,
    objective values and parameters."""
    multi = len(study.directions) > 1
    complete = _complete(study)
    ok = _feasibility(feasible)
    best = None
    if not multi:
        candidates = [t for t in complete if ok(t)]
        if candidates and feasible is None:
            best = study.best_trial  # honours the constraints a sampler stored
        elif candidates:
            pick = max if study.direction.name == "MAXIMIZE" else min
            best = pick(candidates, key=lambda t: t.value)
    if chosen is not None:
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == chosen), None)
        if trial is None:
            note = f"The chosen trial {chosen} is not in this study."
            return {"heading": "Chosen trial", "note": note}
    elif multi:
        note = "No trial was chosen; the Pareto table lists the candidates."
        return {"heading": "Chosen trial", "note": note}
    elif best is None:
        why = "completed" if not complete else "completed and is feasible"
        return {"heading": "Best trial", "note": f"No trial {why}, so there is no best trial."}
    else:
        trial = best
    # A tie for the best is still the best trial.
    is_best = best is not None and trial.state.name == "COMPLETE" and ok(trial)
    is_best = is_best and trial.value == best.value
    heading = "Best trial" if is_best else "Chosen trial"
    values = list(zip(names, [_fmt(v) for v in trial.values or []], strict=False))
    note = None
    if trial.state.name != "COMPLETE":
        note = f"Trial {trial.number} is {trial.state.name.lower()}, not complete."
    elif multi or trial.constraints or not ok(trial):
        note = "It is feasible." if ok(trial) else "It is infeasible."
    return {
        "heading": heading,
        "note": note,
        "number": trial.number,
        "objectives": values,
        "params": [(k, str(v)) for k, v in trial.params.items()],
    }


def _pareto_table(
    study: optuna.Study, names: list[str], ok: Callable[[FrozenTrial], bool], chosen: int | None
) -> dict[str, Any]:
    """One row per Pareto-optimal feasible trial, plus the infeasible trials no trial
    dominates and the chosen trial, best first by the first objective."""
    complete = _complete(study)
    if not complete:
        return {"note": "No trial completed, so there is no Pareto front.", "rows": []}
    feasible = {t.number: ok(t) for t in complete}
    front = _front([t for t in complete if feasible[t.number]], study)
    on_front = {t.number for t in front}
    shown = front + [t for t in _front(complete, study) if not feasible[t.number]]
    if chosen is not None and chosen not in {t.number for t in shown}:
        shown += [t for t in complete if t.number == chosen]
    loss = _losses(shown, study)
    order = sorted(range(len(shown)), key=lambda i: (loss[i][0], shown[i].number))
    shown = [shown[i] for i in order]
    params = list(dict.fromkeys(k for t in shown for k in t.params))
    rows = []
    for t in shown:
        good = feasible[t.number]
        rows.append(
            {
                "number": t.number,
                "chosen": t.number == chosen,
                "cls": " ".join(
                    c for c, on in (("chosen", t.number == chosen), ("infeasible", not good)) if on
                ),
                "objectives": [_fmt(v) for v in t.values],
                "feasible": "yes" if good else "no",
                "on_front": "yes" if t.number in on_front else "no",
                "params": [_fmt(t.params[p]) if p in t.params else "" for p in params],
            }
        )
    note = f"{len(front)} Pareto-optimal feasible trials of {len(complete)} complete ones"
    note += f", best {names[0]} first." if front else "; none is feasible."
    if any(r["feasible"] == "no" for r in rows):
        note += " Infeasible trials that no trial dominates are listed too."
    if chosen is not None and chosen not in feasible:
        note += f" The chosen trial {chosen} is not a complete trial."
    return {"note": note, "params": params, "rows": rows}


# --------------------------------------------------------------------------- the page


def _guarded(name: str, build: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return build(), None
    except Exception as exc:  # noqa: BLE001 - one failed part must not lose the report
        return None, str(exc) or f"{name}: {type(exc).__name__}"


def write_study_report(
    study: optuna.Study,
    path: Path,
    *,
    title: str,
    extra: dict[str, Any] | None = None,
    chosen: int | None = None,
    feasible: Callable[[FrozenTrial], bool] | None = None,
) -> Path:
    """Write the study's HTML report to ``path``; a plot or table that cannot be made says why.

    ``chosen`` is the trial picked for final training; ``feasible`` marks trials as infeasible
    besides the constraints a sampler stored (multi-objective: the Pareto table and plot).
    """
    names = _metric_names(study)
    ok = _feasibility(feasible)
    multi = len(study.directions) > 1

    plots: list[dict[str, Any]] = []
    for name, build in _figures(study, names, ok, chosen):
        fig, error = _guarded(name, build)
        if fig is None:
            plots.append({"name": name, "error": error, "figure": None, "id": None})
            continue
        fig.update_layout(title=name)
        plots.append({"name": name, "error": None, "figure": fig, "id": f"fig{len(plots) + 1}"})
    pareto_plot = plots.pop(0) if multi else None

    best, best_error = _guarded("best trial", lambda: _best_table(study, names, feasible, chosen))
    pareto, pareto_error = (None, None)
    if multi:
        pareto, pareto_error = _guarded(
            "Pareto table", lambda: _pareto_table(study, names, ok, chosen)
        )
    drawn = any(p["figure"] is not None for p in [*plots, pareto_plot] if p is not None)
    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    page = render(
        "study_report.html.j2",
        title=title,
        study_name=study.study_name,
        n_trials=sum(states.values()),
        states=", ".join(f"{n} {s}" for s, n in sorted(states.items())),
        goal=", ".join(
            f"{d.name.lower()} {n}" for d, n in zip(study.directions, names, strict=False)
        ),
        written=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        extra=[(str(k), str(v)) for k, v in (extra or {}).items()],
        names=names,
        best=best,
        best_error=best_error,
        pareto_plot=pareto_plot,
        pareto=pareto,
        pareto_error=pareto_error,
        plots=plots,
        plotly_js_src=shared_plotly_js(path.parent) if drawn else None,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
