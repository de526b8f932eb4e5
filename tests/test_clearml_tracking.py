"""Pipeline runs mirrored to ClearML, and `expflow compare --source clearml`.

The real ClearML SDK runs in `expflow pipeline run` subprocesses (the SDK keeps its
configuration per process), against a real `prefect server start`:

* offline mode, no server at all: the session folder the SDK writes under the run
  folder is read back;
* online: tests/clearml_api.py, a loopback HTTP server that speaks the part of
  ClearML's REST API the SDK calls (no real ClearML server can run here: it needs
  MongoDB and Elasticsearch), including a files server for artifacts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from clearml_api import ClearMLApiServer
from test_deployment import server  # noqa: F401  (a fixture)

EXPFLOW = str(Path(sys.executable).with_name("expflow"))
SECRET = "s3cr3t-value-1234"
FAIL_FAST = (
    "api { http { retries { total: 0, connect: 0, read: 0, redirect: 0, status: 0 } } }\n"
    "sdk { development { report_use_subprocess: false } }\n"
)


def pipeline(env: dict, tmp_path: Path, tracking: dict, *extra: str) -> dict:
    space = tmp_path / "space.yaml"
    space.write_text("x: {type: float, low: -5.0, high: 5.0}\n")
    out = subprocess.run(
        [
            EXPFLOW, "pipeline", "run",
            "--experiment", "quad-cm",
            "--train", "sample_trainables:quadratic",
            "--evaluate", "sample_trainables:evaluate_with_pred",
            "--space", str(space), "--objective", "loss",
            "--n-trials", "3", "--cluster", "threads", "--workers", "1",
            "--storage", str(tmp_path / "journal.log"),
            "--gate", "test_loss:lt:100",
            "--param", f"api_key={SECRET}",
            "--set", f"tracking={json.dumps(tracking)}",
            "--json", *extra,
        ],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(out.stdout)


def test_offline_mirror_lands_in_the_run_folder(server, tmp_path):  # noqa: F811
    conf = tmp_path / "clearml.conf"
    conf.write_text(FAIL_FAST)
    env = {**server["env"], "CLEARML_CONFIG_FILE": str(conf), "CLEARML_OFFLINE_MODE": "1"}
    env.pop("CLEARML_CACHE_DIR", None)
    summary = pipeline(env, tmp_path, {"clearml": {"tags": ["nightly"]}}, "--no-submit")

    sessions = [p for p in (Path(summary["run_dir"]) / "clearml" / "offline").iterdir()]
    folder = next(p for p in sessions if p.is_dir())
    assert folder.with_suffix(
        ".zip"
    ).is_file()  # what `clearml-task --import-offline-session` takes
    task = json.loads((folder / "task.json").read_text())
    text = json.dumps(task)
    assert "quad-cm" in task["name"] and {"nightly", "pipeline"} <= set(task["tags"])
    assert "flow_run_url" in text and "http" in text
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    events = [e for line in lines for e in json.loads(line)]  # one batch of events per line
    points = [e for e in events if e.get("type") == "training_stats_scalar"]
    trials = {e["iter"] for e in points if e["metric"].startswith("HPO")}
    assert trials == {0, 1, 2}
    final = {(e["metric"], e["variant"]): e["value"] for e in points if e["iter"] == 0}
    assert any(
        variant == "test_loss" and value == pytest.approx(summary["metrics"]["test_loss"])
        for (_, variant), value in final.items()
    )
    uploaded = {p.name for p in (folder / "data").rglob("*") if p.is_file()}
    assert any(n.startswith("pred") for n in uploaded) and any(".html" in n for n in uploaded)
    # The API key given as a parameter is masked everywhere ClearML would keep it.
    for path in [*folder.rglob("*"), folder.with_suffix(".zip")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    with zipfile.ZipFile(folder.with_suffix(".zip")) as z:
        assert all(SECRET.encode() not in z.read(n) for n in z.namelist())


@pytest.fixture(scope="module")
def clearml_online(tmp_path_factory):
    with ClearMLApiServer() as api:
        conf = tmp_path_factory.mktemp("clearml") / "clearml.conf"
        conf.write_text(api.config_text())
        yield api, conf


def test_online_mirror_and_compare_from_clearml(server, clearml_online, tmp_path):  # noqa: F811
    api, conf = clearml_online
    env = {**server["env"], "CLEARML_CONFIG_FILE": str(conf)}
    env.pop("CLEARML_OFFLINE_MODE", None)
    tracking = {"clearml": {"project": "expflow/tests", "tags": ["t1"], "steps": "all"}}
    summary = pipeline(
        env, tmp_path, tracking, "--submit-to", str(tmp_path / "subs"), "--set",
        "submit.name=cm-1",
    )  # fmt: skip
    assert summary["bundle"] and not summary["tracking_warnings"]

    tasks = api.tasks()
    run = [t for t in tasks if t["name"].startswith("pipeline quad-cm")]
    assert len(run) == 1
    run = run[0]
    assert run["status"] == "completed" and {"t1", "pipeline"} <= set(run["tags"])
    assert "flow_run_url" in json.dumps(run["hyperparams"])
    children = [t for t in tasks if t.get("parent") == run["id"]]
    kinds = sorted(t["name"].split()[-1] for t in children)
    assert kinds == ["evaluate", "train", "trial-0000", "trial-0001", "trial-0002"]
    assert all(t["status"] == "completed" for t in children)
    artifacts = {a["key"] for a in run["execution"].get("artifacts", [])}
    assert {"pred.hdf5", "report", "submission"} <= artifacts
    assert api.files, "no artifact reached the files server"
    assert SECRET not in api.dump()
    assert not api.unknown_endpoints

    def compare(*args: str) -> dict:
        out = subprocess.run(
            [EXPFLOW, "compare", "--source", "clearml", "--project", "expflow/tests", *args],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    ranked = compare("--tag", "t1", "--metric", "test_loss", "--json")
    assert ranked["rows"][0]["id"] == run["id"]
    assert ranked["rows"][0]["value"] == pytest.approx(summary["metrics"]["test_loss"])
    gated = compare("--tag", "t1", "--metric", "test_loss", "--gate", "test_loss:lt:-1", "--json")
    assert gated["rows"] == [] and run["id"] in {e["id"] for e in gated["excluded"]}
    assert compare("--tag", "no-such-tag", "--metric", "test_loss", "--json")["rows"] == []


def test_compare_from_clearml_needs_a_project(server):  # noqa: F811
    out = subprocess.run(
        [EXPFLOW, "compare", "--source", "clearml"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "--source clearml needs --project" in out.stderr


def test_offline_mode_refuses_a_task_per_step():
    from expflow_flows.errors import ExpflowError
    from expflow_flows.integrations.clearml import ClearMLTracker

    with pytest.raises(ExpflowError, match="needs a ClearML server"):
        ClearMLTracker(offline=True, steps="all")
    with pytest.raises(ExpflowError, match="steps='some'"):
        ClearMLTracker(steps="some")


def test_offline_sweep_is_one_task_with_a_table_of_combinations(server, tmp_path):  # noqa: F811
    conf = tmp_path / "clearml.conf"
    conf.write_text(FAIL_FAST)
    env = {**server["env"], "CLEARML_CONFIG_FILE": str(conf), "CLEARML_OFFLINE_MODE": "1"}
    env.pop("CLEARML_CACHE_DIR", None)
    space = tmp_path / "grid.yaml"
    space.write_text("grid: {x: [1, 2, 3, 4], y: [0.0, 0.5, 1.0]}\n")
    out = subprocess.run(
        [
            EXPFLOW, "sweep", "run", "--name", "cm-sweep",
            "--trainable", "sample_trainables:sweep_square", "--space", str(space),
            "--workers", "1", "--set", 'tracking={"clearml": {"tags": ["grid"]}}', "--json",
        ],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    summary = json.loads(out.stdout)
    sessions = Path(summary["sweep_dir"]) / "clearml" / "offline"
    folders = [p for p in sessions.iterdir() if p.is_dir()]
    assert len(folders) == 1  # 12 combinations, one task
    task = json.loads((folders[0] / "task.json").read_text())
    assert {"grid", "sweep"} <= set(task["tags"])
    lines = (folders[0] / "metrics.jsonl").read_text().splitlines()
    events = [e for line in lines for e in json.loads(line)]
    tables = [e for e in events if e.get("type") == "plot" and "combinations" in json.dumps(e)]
    assert tables, "no table of combinations"
    table = json.loads(tables[0]["plot_str"])["data"][0]
    values = table["cells"]["values"]
    assert len(values[0]) == 12  # a column of 12 combinations
    final = {e["variant"]: e["value"] for e in events if e.get("type") == "training_stats_scalar"}
    assert final["combinations"] == 12 and final["best_value"] == 0.0
