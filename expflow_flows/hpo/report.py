"""Reports: a self-contained plotly HTML page for an Optuna study (``study_report.html.j2``).

plotly.js is inlined once so the page opens offline; the page is a file in the
run folder and artifacts link to it (big HTML does not belong in the API).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expflow_flows.html import render

if TYPE_CHECKING:
    import optuna


def _figures(study: optuna.Study) -> list[tuple[str, Any]]:
    from optuna import visualization as vis

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    figs: list[tuple[str, Any]] = [
        ("Optimization history", lambda: vis.plot_optimization_history(study))
    ]
    varied = {
        k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1
    }
    if len(complete) >= 2 and varied:
        figs.append(("Parameter importances", lambda: vis.plot_param_importances(study)))
        figs.append(("Parallel coordinates", lambda: vis.plot_parallel_coordinate(study)))
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        figs.append(("Intermediate values", lambda: vis.plot_intermediate_values(study)))
    return figs


def write_study_report(
    study: optuna.Study, path: Path, *, title: str, extra: dict[str, Any] | None = None
) -> Path:
    """Write the study's HTML report to ``path``; a plot that cannot be drawn says why."""
    from plotly.offline import get_plotlyjs

    plots: list[dict[str, Any]] = []
    for name, build in _figures(study):
        try:
            fig = build()
        except Exception as exc:  # noqa: BLE001 - one failed plot must not lose the report
            plots.append({"name": name, "error": str(exc), "figure": None, "id": None})
            continue
        fig.update_layout(title=name)
        plots.append({"name": name, "error": None, "figure": fig, "id": f"fig{len(plots) + 1}"})
    drawn = any(p["figure"] is not None for p in plots)
    page = render(
        "study_report.html.j2",
        title=title,
        study_name=study.study_name,
        n_trials=len(study.trials),
        written=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        extra=[(str(k), str(v)) for k, v in (extra or {}).items()],
        plots=plots,
        plotly_js=get_plotlyjs() if drawn else "",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
