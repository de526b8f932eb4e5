"""Command trainables: how research code is started as it is, in its own folder and
environment, with the budget as its own parameters and the upstream run's files at hand."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.runs.launch import Launch
from expflow_flows.runs.trainable import run_trainable
from expflow_flows.settings.pipeline import load_pipeline_settings

# A script as research code writes it: argparse, its checkpoint into the working
# directory, its result as JSON there too, nothing printed for us.
TRAIN = """
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float)
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--config", default="none")
a = p.parse_args()
open("model.ckpt", "w").write(f"lr={a.lr} epochs={a.epochs}")
json.dump({"loss": a.lr * a.epochs, "config": 1.0 if a.config != "none" else 0.0},
          open("results.json", "w"))
print("cwd", os.getcwd())
print("env", os.environ.get("PDE_FLAVOUR", "-"))
"""

EVALUATE = """
import json
text = open("model.ckpt").read()
json.dump({"score": float(text.split()[0].split("=")[1])}, open("scores.json", "w"))
"""


@pytest.fixture
def scripts(tmp_path):
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "evaluate.py").write_text(EVALUATE)
    return tmp_path


def test_a_command_runs_in_its_run_folder_with_budget_env_and_fixed_args(scripts, tmp_path):
    launch = Launch.from_value(
        {
            "command": f"{sys.executable} {scripts / 'train.py'} {{args}}",
            "args": ["--config", "adv.yaml"],
            "env": {"PDE_FLAVOUR": "advection"},
            "budget_params": {"epochs": "epochs"},
            "metrics": {"files": ["results.json"]},
        }
    )
    runs = [tmp_path / "runs" / f"t{i}" for i in range(2)]
    results = [
        run_trainable("train", {"lr": lr}, rd, budget={"epochs": 3}, launch=launch)
        for lr, rd in zip((0.1, 0.2), runs, strict=True)
    ]
    for result, rd, lr in zip(results, runs, (0.1, 0.2), strict=True):
        assert result.status == "ok", result.reason
        assert result.metrics == {"loss": pytest.approx(lr * 3), "config": 1.0}
        # Each run wrote its checkpoint into its own folder: nothing collided.
        assert (rd / "model.ckpt").read_text() == f"lr={lr} epochs=3"
        log = (rd / "output.log").read_text()
        assert f"cwd {rd}" in log and "env advection" in log
        assert json.loads((rd / "params.json").read_text())["epochs"] == 3
    assert not (Path.cwd() / "model.ckpt").exists()


def test_an_interpreter_runs_the_script_and_a_missing_one_is_one_line(scripts, tmp_path):
    launch = {"interpreter": [sys.executable, "-X", "utf8"], "metrics": {"files": ["*.json"]}}
    result = run_trainable(str(scripts / "train.py"), {"lr": 0.5}, tmp_path / "run", launch=launch)
    assert result.status == "ok", result.reason
    command = json.loads((tmp_path / "run" / "metadata.json").read_text())["command"]
    assert command[:3] == [sys.executable, "-X", "utf8"]
    settings = load_pipeline_settings(
        None, {"train": {"target": str(scripts / "train.py"), "interpreter": "/no/venv/bin/python"}}
    )
    with pytest.raises(ExpflowError, match="program '/no/venv/bin/python' does not exist"):
        settings.train.check()


def test_evaluate_finds_the_trained_checkpoint_in_its_folder(scripts, tmp_path):
    train = {"metrics": {"files": ["results.json"]}}
    trained = run_trainable(
        str(scripts / "train.py"), {"lr": 0.25}, tmp_path / "train", launch=train
    )
    assert trained.ok, trained.reason
    for mode in ("link", "copy"):
        evaluate = {
            "from_upstream": ["*.ckpt", "metrics.json"],
            "upstream_mode": mode,
            "metrics": {"files": ["scores.json"]},
        }
        evaluated = run_trainable(
            str(scripts / "evaluate.py"),
            {},
            tmp_path / f"eval-{mode}",
            upstream=trained.run_dir,
            launch=evaluate,
        )
        assert evaluated.status == "ok", evaluated.reason
        assert evaluated.metrics == {"score": 0.25}
        placed = tmp_path / f"eval-{mode}" / "model.ckpt"
        assert placed.is_symlink() == (mode == "link")
        # expflow's own files are never taken from upstream: this run's metrics are its own.
        assert not (tmp_path / f"eval-{mode}" / "metrics.json").is_symlink()
    assert json.loads((trained.run_dir / "metrics.json").read_text())["loss"] == 0.25


def test_from_upstream_that_matches_nothing_fails_the_run_naming_the_pattern(scripts, tmp_path):
    upstream = tmp_path / "up"
    upstream.mkdir()
    result = run_trainable(
        str(scripts / "evaluate.py"),
        {},
        tmp_path / "eval",
        upstream=upstream,
        launch={"from_upstream": ["*.pt"]},
    )
    assert result.status == "failed"
    assert result.reason == f"from_upstream '*.pt' matches nothing in the upstream run {upstream}"


def test_nothing_reported_names_what_was_looked_for(scripts, tmp_path):
    result = run_trainable(
        str(scripts / "evaluate.py"),
        {},
        tmp_path / "eval",
        upstream=None,
        launch={"metrics": {"files": ["nothing-*.csv"]}, "cwd": "run"},
    )
    assert result.status == "failed"
    assert "model.ckpt" in (tmp_path / "eval" / "output.log").read_text()  # its own error
    quiet = tmp_path / "quiet.py"
    quiet.write_text("print('done')\n")
    result = run_trainable(
        str(quiet), {}, tmp_path / "quiet", launch={"metrics": {"files": ["out/*.csv"]}}
    )
    assert result.status == "failed"
    assert "reported no metrics; looked for" in result.reason and "out/*.csv" in result.reason


def test_settings_refuse_what_cannot_apply():
    def line(changes):
        with pytest.raises(ExpflowError) as err:
            load_pipeline_settings(None, changes)
        return str(err.value)

    assert "interpreter applies to scripts and commands, not to the callable" in line(
        {"train": {"interpreter": "python3"}}
    )
    assert "does not unpickle" in line({"train": {"metrics": {"files": ["ckpt/*.pt"]}}})
    assert "is not a regular expression" in line(
        {"train": {"metrics": {"patterns": ["Epoch (?P<step>"]}}}
    )
    # A command over a config's target replaces it (and the other way round).
    settings = load_pipeline_settings(None, {"train": {"command": "python3 train.py {args}"}})
    assert settings.train.target is None and settings.train.command[0] == "python3"
    assert settings.train.budget.epochs == 40  # the rest of the section is kept


def test_the_working_directory_can_be_the_launch_folder(scripts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_trainable(
        str(scripts / "train.py"),
        {"lr": 1.0},
        tmp_path / "run",
        launch={"cwd": "launch", "metrics": {"files": ["results.json"]}},
    )
    assert result.status == "ok", result.reason
    assert (tmp_path / "model.ckpt").exists()
    assert f"cwd {os.getcwd()}" in (tmp_path / "run" / "output.log").read_text()


def test_steps_a_running_script_wrote_are_recorded_once(tmp_path):
    # The rows are read while the script runs (for the pruner) and again when it ends;
    # each epoch is one row of the run's history either way.
    script = tmp_path / "slow.py"
    script.write_text(
        "import time\n"
        "with open('history.csv', 'w') as f:\n"
        "    f.write('epoch,val_loss\\n0,0.5\\n1,0.25\\n')\n"
        "time.sleep(2.5)\n"
    )
    launch = {"metrics": {"files": ["history.csv"]}}
    result = run_trainable(str(script), {}, tmp_path / "run", launch=launch)
    assert result.ok, result.reason
    assert [row["step"] for row in result.intermediate] == [0, 1]
    history = json.loads((tmp_path / "run" / "intermediate.json").read_text())
    assert [row["val_loss"] for row in history] == [0.5, 0.25]
