"""The HPO study report: one shared plotly.js per folder, metric names and log axes, the best
trial's parameters, the Pareto front of a multi-objective study, and a headless-Chromium check
that the pages draw their plots."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import optuna
from plotly.offline import get_plotlyjs, get_plotlyjs_version
from test_sweep_report import _load, browser, needs_chromium  # noqa: F401 (browser: a fixture)

from expflow_flows.hpo.report import write_study_report

optuna.logging.set_verbosity(optuna.logging.WARNING)
PLOTLY_JS = f"plotly-{get_plotlyjs_version()}.min.js"


def name_metrics(study: optuna.Study, names: list[str]) -> None:
    with warnings.catch_warnings():  # set_metric_names is "experimental" since Optuna 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


def single_objective(n_trials: int = 12, *, storage: Any = None) -> optuna.Study:
    """A study whose objective spans decades and grows with lr, sampled on a log scale."""
    study = optuna.create_study(
        study_name="so", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0)
    )
    name_metrics(study, ["val_loss"])

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        layers = trial.suggest_int("layers", 1, 4)
        trial.suggest_categorical("optimizer", ["adam", "sgd"])
        loss = lr * 1e4 * (1 + layers / 10)
        for step in range(3):
            trial.report(loss * (3 - step), step)
        return loss

    study.optimize(objective, n_trials=n_trials)
    return study


def multi_objective(storage: Any = None) -> optuna.Study:
    """Minimize loss, maximize acc; ``y <= 0.8`` is a constraint stored with each trial.

    Trial 0 (y = 0.95) has the highest acc, so no trial dominates it, but it is infeasible.
    Trial 1 (y = 0) has the lowest loss and is feasible by the stored constraint.
    """
    study = optuna.create_study(
        study_name="mo",
        storage=storage,
        directions=["minimize", "maximize"],
        sampler=optuna.samplers.RandomSampler(seed=1),
    )
    name_metrics(study, ["loss", "acc"])
    study.enqueue_trial({"x": 1e-3, "y": 0.95})
    study.enqueue_trial({"x": 1e-3, "y": 0.0})

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 1e-3, 1.0, log=True)
        y = trial.suggest_float("y", 0.0, 1.0)
        trial.set_constraint("y_max", y - 0.8)
        return x + y, 1 - x + y

    study.optimize(objective, n_trials=16)
    return study


def figures(page: str) -> dict[str, dict[str, Any]]:
    """The page's plotly figures by title."""
    found = [json.loads(js) for js in re.findall(r"var f=(.*?);Plotly\.newPlot", page)]
    return {f["layout"]["title"]["text"]: f for f in found}


def axes(fig: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    """A figure's x or y axes by their title."""
    layout = fig["layout"]
    return {
        (v.get("title") or {}).get("text"): v
        for k, v in layout.items()
        if re.fullmatch(prefix + r"axis\d*", k)
    }


def pareto_rows(page: str) -> list[dict[str, Any]]:
    """The Pareto table's rows: trial, whether chosen, CSS classes and the cells by header."""
    table = page.split("<table class='pareto'>")[1].split("</table>")[0]
    header, *rows = re.findall(r"<tr[^>]*>.*?</tr>", table)
    columns = re.findall(r"<th>(.*?)</th>", header)
    out = []
    for row in rows:
        cells = dict(zip(columns, re.findall(r"<td[^>]*>(.*?)</td>", row), strict=True))
        cls = re.match(r"<tr(?: class='([^']*)')?>", row).group(1) or ""
        out.append(
            cells
            | {
                "trial": int(cells["trial"].split()[0]),
                "chosen": cells["trial"].endswith("(chosen)"),
                "classes": set(cls.split()),
            }
        )
    return out


# --------------------------------------------------------------------------- shared plotly.js


def test_reports_in_one_folder_share_one_plotly_file(tmp_path: Path) -> None:
    study = single_objective()
    first = write_study_report(study, tmp_path / "a.html", title="A")
    js = tmp_path / PLOTLY_JS
    before = js.stat()
    second = write_study_report(study, tmp_path / "b.html", title="B")
    assert [p.name for p in tmp_path.glob("plotly*")] == [PLOTLY_JS]
    assert js.stat().st_size == len(get_plotlyjs().encode())
    assert (js.stat().st_ino, js.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    snippet = get_plotlyjs()[1000:1200]
    for page in (first, second):
        text = page.read_text()
        assert f"<script src='{PLOTLY_JS}'></script>" in text
        assert snippet not in text  # not inlined
        assert page.stat().st_size < 1_000_000
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes left nothing behind
    # A damaged copy (here: cut short) is replaced by a whole one.
    js.write_bytes(js.read_bytes()[:1000])
    write_study_report(study, tmp_path / "c.html", title="C")
    assert js.stat().st_size == len(get_plotlyjs().encode())


# --------------------------------------------------------------------------- single objective


def test_best_parameters_table_shows_the_best_trial(tmp_path: Path) -> None:
    study = single_objective()
    best = study.best_trial
    page = write_study_report(study, tmp_path / "r.html", title="t").read_text()
    section = page.split("<section id='best'>")[1].split("</section>")[0]
    assert "<h2>Best trial</h2>" in section
    assert f"Trial <b>{best.number}</b>: val_loss = <b>{best.value:.6g}</b>." in section
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", section)
    assert rows == [(k, str(v)) for k, v in best.params.items()]
    assert "Study <b>so</b>, 12 trials (12 complete); minimize val_loss." in page

    # The pipeline passes the trial it trains: the best one keeps its heading, another one
    # (picked by other means) takes the table over as the chosen trial.
    page = write_study_report(study, tmp_path / "r.html", title="t", chosen=best.number)
    assert "<h2>Best trial</h2>" in page.read_text()
    chosen = next(t for t in study.trials if t.number != best.number)
    page = write_study_report(study, tmp_path / "r.html", title="t", chosen=chosen.number)
    section = page.read_text().split("<section id='best'>")[1].split("</section>")[0]
    assert "<h2>Chosen trial</h2>" in section and f"Trial <b>{chosen.number}</b>" in section


def test_plots_use_metric_names_and_log_axes(tmp_path: Path) -> None:
    study = single_objective()
    values = [t.value for t in study.trials]
    assert max(values) / min(values) > 100  # the objective spans decades
    page = write_study_report(study, tmp_path / "r.html", title="t").read_text()
    figs = figures(page)
    assert list(figs) == [
        "Optimization history",
        "Slice",
        "Parameter importances",
        "Parallel coordinates",
        "Intermediate values",
    ]
    history = axes(figs["Optimization history"], "y")
    assert history["val_loss"]["type"] == "log"
    # One slice panel per parameter: lr (sampled on a log scale) has a log x axis.
    slice_x = axes(figs["Slice"], "x")
    assert set(slice_x) == {"lr", "layers", "optimizer"}
    assert slice_x["lr"]["type"] == "log"
    assert slice_x["layers"].get("type") != "log"
    slice_y = axes(figs["Slice"], "y")
    assert slice_y["val_loss"]["type"] == "log"
    assert axes(figs["Intermediate values"], "y")["val_loss"]["type"] == "log"
    assert '"val_loss"' in json.dumps(figs["Parallel coordinates"])


def test_a_narrow_objective_keeps_linear_axes_and_unnamed_metrics_say_objective(
    tmp_path: Path,
) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 1 + t.suggest_float("x", 0, 1), n_trials=8)
    figs = figures(write_study_report(study, tmp_path / "r.html", title="t").read_text())
    assert axes(figs["Optimization history"], "y")["objective"].get("type") != "log"
    assert axes(figs["Slice"], "x")["x"].get("type") != "log"


# --------------------------------------------------------------------------- multi objective


def test_multi_objective_report_has_the_pareto_front(tmp_path: Path) -> None:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log"))
    )
    study = multi_objective(storage)
    front = {t.number for t in study.best_trials}  # Optuna's, with the stored constraint
    assert 0 not in front and 1 in front
    chosen = sorted(front)[len(front) // 2]
    page = write_study_report(study, tmp_path / "r.html", title="mo", chosen=chosen).read_text()

    assert "minimize loss, maximize acc" in page
    figs = figures(page)
    assert list(figs) == [
        "Pareto front",
        "Optimization history",
        "Slice",
        "Parameter importances",
        "Parallel coordinates",
    ]
    pareto = figs["Pareto front"]
    assert set(axes(pareto, "x")) == {"loss"} and set(axes(pareto, "y")) == {"acc"}
    assert axes(pareto, "x")["loss"]["type"] == "log"  # from 0.001 (trial 1) up
    assert axes(pareto, "y")["acc"].get("type") != "log"
    assert any(t.get("name") == f"chosen: trial {chosen}" for t in pareto["data"])
    # The one-objective plots show the first objective.
    assert set(axes(figs["Optimization history"], "y")) == {"loss"}
    assert axes(figs["Slice"], "x")["x"]["type"] == "log"

    rows = pareto_rows(page)
    on_front = {r["trial"] for r in rows if r["on front"] == "yes"}
    assert on_front == front
    assert all(r["feasible"] == "yes" for r in rows if r["trial"] in front)
    infeasible = [r for r in rows if r["trial"] == 0]
    assert infeasible and infeasible[0]["feasible"] == "no"
    assert "infeasible" in infeasible[0]["classes"]
    marked = [r for r in rows if r["chosen"]]
    assert [r["trial"] for r in marked] == [chosen] and "chosen" in marked[0]["classes"]
    assert {"loss", "acc", "x", "y"} <= set(rows[0])
    # Best loss first.
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses)

    # The chosen trial's parameters fill the parameters table.
    section = page.split("<section id='best'>")[1].split("</section>")[0]
    trial = study.trials[chosen]
    assert f"<h2>Chosen trial</h2>\n<p>Trial <b>{chosen}</b>: loss = " in section
    assert "It is feasible." in section
    params = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", section)
    assert params == [(k, str(v)) for k, v in trial.params.items()]


def test_feasible_callable_marks_trials_infeasible(tmp_path: Path) -> None:
    study = multi_objective()
    # Trial 1 has the lowest loss; the caller rules it out.
    path = write_study_report(
        study, tmp_path / "r.html", title="t", feasible=lambda t: t.params["y"] > 0.01
    )
    page = path.read_text()
    rows = {r["trial"]: r for r in pareto_rows(page)}
    assert rows[1]["feasible"] == "no" and rows[1]["on front"] == "no"
    assert rows[0]["feasible"] == "no"  # the stored constraint still counts
    assert all(r["feasible"] == "yes" for r in rows.values() if r["on front"] == "yes")
    # The plot agrees: it draws trial 1 among the infeasible trials.
    pareto = figures(page)["Pareto front"]
    infeasible = [t for t in pareto["data"] if "Infeasible" in t.get("hovertemplate", "")]
    assert infeasible and 1e-3 in [round(x, 6) for x in infeasible[0]["x"]]
    # No trial chosen: the page says so instead of a parameters table.
    assert "No trial was chosen; the Pareto table lists the candidates." in page


def test_what_cannot_be_drawn_says_why_and_the_report_is_still_written(tmp_path: Path) -> None:
    four = optuna.create_study(directions=["minimize"] * 4)
    four.optimize(lambda t: [t.suggest_float("x", 0, 1) + i for i in range(4)], n_trials=5)
    page = write_study_report(four, tmp_path / "four.html", title="t").read_text()
    assert "<h2>Pareto front</h2><p>Not drawn: " in page and "2 or 3" in page
    assert "<th>objective_3</th>" in page  # the table still lists the front; default names
    assert len(pareto_rows(page)) >= 1

    def broken(trial: optuna.trial.FrozenTrial) -> bool:
        raise RuntimeError("no budget data")

    page = write_study_report(
        multi_objective(), tmp_path / "broken.html", title="t", feasible=broken
    ).read_text()
    assert "<h2>Pareto front</h2><p>Not drawn: no budget data</p>" in page
    assert "Pareto table not shown: no budget data" in page
    assert "<h2>Optimization history</h2>" not in page  # the other plots drew

    empty = optuna.create_study(study_name="empty")
    page = write_study_report(empty, tmp_path / "e.html", title="t").read_text()
    assert "No trial completed, so there is no best trial." in page
    assert "Study <b>empty</b>, 0 trials" in page


# --------------------------------------------------------------------------- headless Chromium


@needs_chromium
def test_study_reports_draw_in_chromium(browser, tmp_path: Path) -> None:  # noqa: F811
    so = write_study_report(single_objective(), tmp_path / "so.html", title="SO")
    study = multi_objective()
    chosen = min(t.number for t in study.best_trials)
    mo = write_study_report(study, tmp_path / "mo.html", title="MO", chosen=chosen)
    assert so.parent == mo.parent and len(list(tmp_path.glob("plotly-*.js"))) == 1
    probe = """(() => {
        const plots = Array.from(document.querySelectorAll('.plotly-graph-div'));
        const byTitle = {};
        for (const p of plots) {
            const l = p._fullLayout;
            if (!l) continue;
            const ax = {};
            for (const k of Object.keys(l)) {
                if (/^[xy]axis\\d*$/.test(k) && l[k].title) ax[k[0] + ':' + l[k].title.text] = l[k].type;
            }
            byTitle[l.title.text] = ax;
        }
        const chosen = document.querySelector('table.pareto tr.chosen');
        const infeasible = document.querySelector('table.pareto tr.infeasible');
        return {
            plots: plots.length,
            drawn: document.querySelectorAll('.js-plotly-plot .main-svg').length,
            axes: byTitle,
            text: Array.from(document.querySelectorAll('.main-svg')).map(s => s.textContent).join(' '),
            best: document.querySelector('#best').innerText,
            chosen: chosen && chosen.cells[0].innerText,
            chosenBg: chosen && getComputedStyle(chosen.cells[0]).backgroundColor,
            infeasible: infeasible && infeasible.querySelector('td.feasible').innerText,
        };
    })()"""
    ready = (
        "document.querySelectorAll('.plotly-graph-div').length > 0 && "
        "document.querySelectorAll('.plotly-graph-div.js-plotly-plot').length == "
        "document.querySelectorAll('.plotly-graph-div').length"
    )
    _load(browser, so, ready)
    assert browser.errors() == []
    dom = browser.evaluate(probe)
    assert dom["plots"] == 5 and dom["drawn"] >= 5
    assert dom["axes"]["Optimization history"]["y:val_loss"] == "log"
    assert dom["axes"]["Slice"]["x:lr"] == "log"
    assert dom["axes"]["Slice"]["x:layers"] == "linear"
    assert "val_loss" in dom["text"]
    assert "Best trial" in dom["best"] and "lr" in dom["best"]

    _load(browser, mo, ready)
    assert browser.errors() == []
    dom = browser.evaluate(probe)
    assert dom["plots"] == 5 and dom["drawn"] >= 5
    # loss spans decades (trial 1 has 0.001), acc does not.
    assert dom["axes"]["Pareto front"] == {"x:loss": "log", "y:acc": "linear"}
    assert "loss" in dom["text"] and "acc" in dom["text"]
    assert dom["chosen"] == f"{chosen} (chosen)"
    assert dom["chosenBg"] == "rgb(255, 243, 196)"
    assert dom["infeasible"] == "no"
