"""The pipeline flow end to end on Prefect's test harness: HPO, train, eval, gates, submit."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError, GateFailed

SPACE = {"x": {"type": "float", "low": -5.0, "high": 5.0}}


def run_pipeline(tmp_path: Path, return_state: bool = False, **changes):
    """The pipeline on quick test settings; ``changes`` are nested settings over them."""
    from expflow_flows.flows.pipeline import pipeline
    from expflow_flows.settings.base import deep_merge

    settings = {
        "experiment": "quad",
        "train": {"target": "sample_trainables:quadratic", "budget": {"epochs": 3}},
        "evaluate": "sample_trainables:evaluate_with_pred",
        "space": SPACE,
        "params": {},
        "objective": "loss",
        "direction": "minimize",
        "hpo": {
            "n_trials": 6,
            "pruner": "none",
            "budget": {"epochs": 3},
            "storage": str(tmp_path / "journal.log"),
        },
        "cluster": {"kind": "threads", "workers": 2},
        "gates": ["test_loss:lt:1.0"],
        "submit": {"to": str(tmp_path / "submissions"), "name": "quad-1"},
    }
    merged = deep_merge(settings, changes)
    if "space" in changes:  # a space is replaced, not merged parameter by parameter
        merged["space"] = changes["space"]
    return pipeline(settings=merged, return_state=return_state)


def load_study(tmp_path: Path, name: str = "quad"):
    import optuna

    from expflow_flows.hpo.study import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(str(tmp_path / "journal.log")))


def test_pipeline_runs_hpo_train_eval_and_submits(prefect_harness, home, tmp_path):
    summary = run_pipeline(tmp_path)
    assert summary["trials"]["complete"] == 6
    assert summary["metrics"]["test_loss"] == pytest.approx((summary["metrics"]["x_used"] - 2) ** 2)
    # The final run trains the best trial's parameters.
    assert summary["best_params"]["x"] == summary["metrics"]["x_used"]
    bundle = Path(summary["bundle"])
    assert bundle == tmp_path / "submissions" / "quad-1"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "pred.hdf5" in json.dumps(manifest)
    assert json.loads((bundle / "params.json").read_text())["x"] == summary["best_params"]["x"]
    assert all(g["passed"] for g in summary["gates"])
    assert Path(summary["report"]).read_text().startswith("<!doctype html>")
    study = load_study(tmp_path)
    assert len(study.trials) == 6
    # Intermediate values reached the study from the trial tasks (pruning data, dashboards).
    assert any(t.intermediate_values for t in study.trials)
    # Every trial left a run folder with its status.
    for t in study.trials:
        assert (Path(t.user_attrs["run_dir"]) / "status").read_text().startswith("ok")


def test_rerun_resumes_the_study_instead_of_starting_over(prefect_harness, home, tmp_path):
    run_pipeline(tmp_path, hpo={"n_trials": 3}, submit={"enabled": False})
    assert len(load_study(tmp_path).trials) == 3
    summary = run_pipeline(tmp_path, hpo={"n_trials": 5}, submit={"enabled": False})
    study = load_study(tmp_path)
    assert len(study.trials) == 5
    assert summary["trials"]["complete"] == 5
    # Nothing more to do: the study already holds 5 finished trials.
    run_pipeline(tmp_path, hpo={"n_trials": 5}, submit={"enabled": False})
    assert len(load_study(tmp_path).trials) == 5


def test_failed_trials_are_recorded_and_the_study_goes_on(prefect_harness, home, tmp_path):
    summary = run_pipeline(
        tmp_path,
        train={"target": "sample_trainables:fails_when_negative"},
        evaluate="sample_trainables:params_only",
        space={"x": {"type": "categorical", "choices": [-1.0, 1.5, 2.5]}},
        hpo={"n_trials": 8, "seed": 3},
        gates=[],
        submit={"enabled": False},
    )
    study = load_study(tmp_path)
    states = {t.state.name for t in study.trials}
    assert "FAIL" in states and "COMPLETE" in states
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert all("negative x is not supported" in t.user_attrs["reason"] for t in failed)
    assert summary["trials"]["failed"] == len(failed)
    assert summary["best_params"]["x"] in (1.5, 2.5)


def test_zero_successful_trials_fails_the_flow_clearly(prefect_harness, home, tmp_path):
    with pytest.raises(
        ExpflowError, match=r"no trial of study 'quad' succeeded \(3 failed, 0 pruned\)"
    ):
        run_pipeline(
            tmp_path, train={"target": "sample_trainables:always_fails"}, hpo={"n_trials": 3}
        )
    assert not (tmp_path / "submissions").exists()


def test_failing_gate_stops_submission(prefect_harness, home, tmp_path):
    with pytest.raises(GateFailed, match=r"test_loss.*needs < -1") as info:
        run_pipeline(tmp_path, gates=["test_loss:lt:-1"])
    assert "nothing was submitted" in str(info.value)
    assert not (tmp_path / "submissions" / "quad-1").exists()
    # The pipeline's own run folder records why it failed.
    (status,) = (home / "runs" / "quad").glob("pipeline-*/status")
    lines = status.read_text().splitlines()
    assert lines[0] == "failed" and "test_loss" in lines[1]


def test_submission_is_never_overwritten(prefect_harness, home, tmp_path):
    first = run_pipeline(tmp_path, hpo={"n_trials": 2})
    before = (Path(first["bundle"]) / "manifest.json").read_text()
    with pytest.raises(ExpflowError, match="exists"):
        run_pipeline(tmp_path, hpo={"n_trials": 3})
    assert (Path(first["bundle"]) / "manifest.json").read_text() == before


def test_pin_guards_the_submission(prefect_harness, home, tmp_path, monkeypatch):
    from expflow_flows.governance import pin

    pin.init_pin("4321")
    with pytest.raises(ExpflowError, match="PIN"):
        run_pipeline(tmp_path, hpo={"n_trials": 2})
    assert not (tmp_path / "submissions").exists()
    monkeypatch.setenv("EXPFLOW_PIN", "4321")
    summary = run_pipeline(tmp_path, hpo={"n_trials": 2})
    assert Path(summary["bundle"]).is_dir()
    audit = (home / "audit.log").read_text()
    assert '"submit"' in audit and "4321" not in audit


def test_artifacts_are_attached_to_the_flow_run(prefect_harness, home, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    state = run_pipeline(
        tmp_path,
        experiment="quad-artifacts",
        hpo={"n_trials": 2},
        submit={"name": None},
        return_state=True,
    )
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="quad-artifacts"))
        )
    keys = {a.key for a in arts}
    assert {
        "quad-artifacts-trials",
        "quad-artifacts-best-params",
        "quad-artifacts-eval-metrics",
        "quad-artifacts-gates",
        "quad-artifacts-outputs",
    } <= keys
    outputs = next(a for a in arts if a.key == "quad-artifacts-outputs")
    assert "report-quad-artifacts.html" in outputs.data


def test_pipeline_on_a_dask_local_cluster(prefect_harness, home, tmp_path):
    summary = run_pipeline(
        tmp_path, cluster={"kind": "local"}, hpo={"n_trials": 4}, submit={"enabled": False}
    )
    assert summary["trials"]["complete"] == 4
    study = load_study(tmp_path)
    pids = {
        json.loads((Path(t.user_attrs["run_dir"]) / "metadata.json").read_text())["pid"]
        for t in study.trials
    }
    # Trials ran in the cluster's worker processes, not in the flow's process.
    assert os.getpid() not in pids
    assert any(t.intermediate_values for t in study.trials)


def test_progress_updates_follow_every_trial(prefect_harness, home, tmp_path):
    from expflow_flows.hpo import progress

    updates = []
    unsubscribe = progress.subscribe(
        lambda p: updates.append((p.finished, p.running, p.complete, p.failed))
    )
    try:
        run_pipeline(
            tmp_path,
            train={"target": "sample_trainables:fails_when_negative"},
            evaluate="sample_trainables:params_only",
            space={"x": {"type": "categorical", "choices": [-1.0, 2.5]}},
            hpo={"n_trials": 5},
            gates=[],
            submit={"enabled": False},
        )
    finally:
        unsubscribe()
    finished = [u[0] for u in updates]
    assert finished == sorted(finished)  # never goes backwards
    assert updates[-1][0] == 5 and updates[-1][1] == 0
    assert updates[-1][2] + updates[-1][3] == 5
    assert max(u[1] for u in updates) == 2  # parallelism 2: two trials in flight


def test_trials_left_running_by_a_dead_run_are_failed_on_resume(prefect_harness, home, tmp_path):
    from prefect import flow

    from expflow_flows.hpo.study import open_study

    @flow
    def killed_pipeline():
        return "gone"

    dead = killed_pipeline(return_state=True)
    study = open_study(str(tmp_path / "journal.log"), "quad")
    orphan = study.ask()
    orphan.suggest_float("x", -5.0, 5.0)
    orphan.set_user_attr("flow_run_id", str(dead.state_details.flow_run_id))
    run_pipeline(tmp_path, hpo={"n_trials": 3}, submit={"enabled": False}, gates=[])
    trials = load_study(tmp_path).trials
    assert trials[0].state.name == "FAIL"
    assert "abandoned" in trials[0].user_attrs["reason"]
    # Its run died, which is not the parameters' fault: it does not use up one of the
    # 3 trials, so three new trials ran.
    assert len(trials) == 4 and sum(t.state.name == "COMPLETE" for t in trials) == 3


def test_the_ledger_follows_the_flow_run(prefect_harness, home, tmp_path):
    from expflow_flows.governance.ledger import Ledger

    state = run_pipeline(tmp_path, hpo={"n_trials": 2}, return_state=True)
    row = Ledger().find_by_flow_run(str(state.state_details.flow_run_id))
    assert row is not None
    assert (row.name, row.kind, row.state) == ("quad", "pipeline", "COMPLETED")
    assert row.metrics["test_loss"] >= 0 and "x" in row.params
    assert Path(row.run_dir, "summary.json").exists()
    assert [h["to"] for h in Ledger().history(row.id)] == ["DRAFT", "RUNNING", "COMPLETED"]

    failed = run_pipeline(
        tmp_path, hpo={"n_trials": 2}, gates=["test_loss:lt:-1"], return_state=True
    )
    row = Ledger().find_by_flow_run(str(failed.state_details.flow_run_id))
    assert row.state == "FAILED"
    assert "test_loss" in row.message


def test_study_report_shows_hostile_names_and_values_as_text(tmp_path, monkeypatch):
    import importlib

    import optuna

    from expflow_flows.hpo.report import write_study_report

    script = "<script>alert(1)</script>"
    breakout = "a</script><img src=x onerror=alert(2)>"
    study = optuna.create_study(study_name=script)

    def objective(trial):
        x = trial.suggest_float("x", -5.0, 5.0)
        opt = trial.suggest_categorical(script, [breakout, "b"])
        trial.report(x * x, 0)
        return x * x + (opt == "b")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=6)

    def unplottable(study):
        raise ValueError(f"cannot plot {script}")

    # optuna.visualization is a lazy proxy; patch the module it loads.
    visualization = importlib.import_module("optuna.visualization")
    monkeypatch.setattr(visualization, "plot_param_importances", unplottable)
    path = write_study_report(
        study, tmp_path / "report.html", title=f"HPO {script}", extra={script: breakout}
    )
    page = path.read_text()
    assert "<script>alert" not in page and "<img" not in page  # no markup got in
    shown = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert f"<title>HPO {shown}</title>" in page and f"<h1>HPO {shown}</h1>" in page
    assert f"Study <b>{shown}</b>, 6 trials" in page
    assert (
        f"<tr><th>{shown}</th><td>a&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;</td>" in page
    )
    assert f"<h2>Parameter importances</h2><p>Not drawn: cannot plot {shown}</p>" in page
    # The other plots are still drawn, and the parameter and its values are in their data.
    figures = [json.loads(js) for js in re.findall(r"var f=(.*?);Plotly\.newPlot", page)]
    assert len(figures) == 4  # history, slice, parallel coordinates, intermediate values
    assert breakout in json.dumps(figures)


def test_a_python_call_with_an_earlier_key_is_refused_naming_where_it_went(prefect_harness, home):
    """Prefect checks the flow's typed ``settings`` parameter before the run starts; an
    earlier release's flat key says where the setting is now."""
    from expflow_flows.flows.pipeline import pipeline

    state = pipeline(settings={"n_trials": 3}, return_state=True)
    assert state.is_failed()
    assert "'n_trials' is not known; it is now hpo.n_trials" in state.message
    state = pipeline(settings={"hpo": {"n_trials": 0}}, return_state=True)
    assert state.is_failed() and "settings.hpo.n_trials" in state.message
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_a_multi_objective_pipeline_reports_its_pareto_front_and_submits_the_chosen_trial(
    prefect_harness, home, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = run_pipeline(
        tmp_path,
        experiment="quad-pareto",
        train={"target": "sample_trainables:tradeoff"},
        objectives=["loss", "cost:minimize"],
        hpo={
            "n_trials": 10,
            "sampler": {"name": "nsgaii", "nsgaii": {"population_size": 4}},
            "select": "knee",
        },
        gates=["test_loss:lt:25"],
    )
    study = load_study(tmp_path, "quad-pareto")
    assert study.metric_names == ["loss", "cost"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="quad-pareto-pareto"))
        )
    assert len(arts) == 1
    front = arts[0].data
    front = json.loads(front) if isinstance(front, str) else front
    chosen = [row for row in front if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["trial"] == summary["best_trial"]
    # the front is the completed trials nobody beats on both loss and cost
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    for row in front:
        loss, cost = study.trials[row["trial"]].values
        assert (row["loss"], row["cost"]) == (
            pytest.approx(loss, rel=1e-5),
            pytest.approx(cost, rel=1e-5),
        )
        assert not any(t.values[0] < loss and t.values[1] < cost for t in done)
    # the chosen trial's parameters were trained, evaluated and submitted
    best = study.trials[summary["best_trial"]]
    assert summary["best_params"] == best.params
    assert summary["metrics"]["x_used"] == pytest.approx(best.params["x"])
    bundle = Path(summary["bundle"])
    assert bundle.exists()
    assert "Pareto front" in Path(summary["report"]).read_text()


def test_artifacts_show_small_values_and_short_floats_and_the_submit_task_is_named(
    prefect_harness, home, tmp_path
):
    """Before: l2 ~ 1e-8 showed as 0 in the trials table, the best-parameters artifact
    printed 17-digit floats, and the submission task run was called submit-<random>."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter

    space = {**SPACE, "l2": {"type": "float", "low": 1.0e-9, "high": 1.0e-7, "log": True}}
    state = run_pipeline(
        tmp_path, experiment="quad-cells", space=space, hpo={"n_trials": 3}, return_state=True
    )
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        arts = {
            a.key: a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="quad-cells"))
            )
        }
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]})
        )
    table = arts["quad-cells-trials"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert all(0 < row["param:l2"] < 1e-6 for row in table)
    best = arts["quad-cells-best-params"].data
    assert not re.search(r"\d\.\d{8,}", best), best
    assert "submit" in {t.name for t in tasks}


def test_the_experiment_reports_its_training_time_so_the_readme_compare_works(
    prefect_harness, home, tmp_path
):
    """Before: no run reported train_time_min, so the README's
    `expflow compare --gate train_time_min:lt:60` returned an empty table and the
    registry's threshold on it was always n/a in audits."""
    from typer.testing import CliRunner

    from expflow_flows.cli.app import app
    from expflow_flows.governance.ledger import Ledger

    summary = run_pipeline(tmp_path, experiment="quad-time", hpo={"n_trials": 2})
    row = Ledger().get(summary["ledger_id"])
    assert 0 < row.metrics["train_time_min"] == pytest.approx(row.metrics["train_time_s"] / 60)
    out = CliRunner().invoke(
        app, ["compare", "--metric", "test_loss", "--gate", "train_time_min:lt:60", "--json"]
    )
    assert out.exit_code == 0, out.output
    assert [r["name"] for r in json.loads(out.stdout)["rows"]] == ["quad-time"]
