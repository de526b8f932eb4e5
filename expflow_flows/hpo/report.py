"""Reports: a self-contained plotly HTML page for an Optuna study.

plotly.js is inlined once so the page opens offline; the page is a file in the
run folder and artifacts link to it (big HTML does not belong in the API).
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    sections: list[str] = []
    include_js: bool | str = True
    for name, build in _figures(study):
        try:
            fig = build()
        except Exception as exc:  # noqa: BLE001 - one failed plot must not lose the report
            sections.append(
                f"<h2>{html.escape(name)}</h2><p>Not drawn: {html.escape(str(exc))}</p>"
            )
            continue
        fig.update_layout(title=name)
        sections.append(fig.to_html(full_html=False, include_plotlyjs=include_js))
        include_js = False
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in (extra or {}).items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
        f"<p>Study <b>{html.escape(study.study_name)}</b>, {len(study.trials)} trials, "
        f"written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>"
        f"<table>{rows}</table>{''.join(sections)}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
