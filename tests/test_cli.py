"""The `expflow` command line: bad input is one clear line and a non-zero exit, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPFLOW = str(Path(sys.executable).with_name("expflow"))


def expflow(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run(
        [EXPFLOW, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_lists_the_commands():
    out = expflow("--help")
    assert out.returncode == 0
    for word in ("demo", "pipeline", "pde", "server", "pin", "runs", "compare", "audit", "system"):
        assert word in out.stdout


def test_bad_search_space_is_one_line(tmp_path, home):
    bad = tmp_path / "space.yaml"
    bad.write_text("lr: {type: flaot, low: 0.1, high: 1}\n")
    line = one_error_line(expflow("pipeline", "run", "--space", str(bad), "--n-trials", "1"))
    assert "'lr'" in line and "flaot" in line and "float" in line
    assert not (home / "runs").exists()


def test_bad_gate_is_one_line(home):
    line = one_error_line(expflow("pipeline", "run", "--gate", "nrmse:below:0.1"))
    assert "below" in line and "lt" in line


def test_missing_script_is_one_line(tmp_path, home):
    line = one_error_line(expflow("pipeline", "run", "--train", str(tmp_path / "train_fno.py")))
    assert "train_fno.py" in line and "does not exist" in line


def test_unknown_setting_in_config_is_one_line(tmp_path, home):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("hpo: {n_trails: 4}\n")
    line = one_error_line(expflow("pipeline", "run", "--config", str(cfg)))
    assert "'hpo.n_trails'" in line and "n_trials" in line


def test_a_setting_of_the_old_flat_shape_names_where_it_is_now(tmp_path, home):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_trials: 4\n")
    line = one_error_line(expflow("pipeline", "run", "--config", str(cfg)))
    assert line == "error: pipeline setting 'n_trials' is not known; it is now hpo.n_trials"
    line = one_error_line(expflow("pipeline", "run", "--set", "n_trials=3"))
    assert line == "error: pipeline setting 'n_trials' is not known; it is now hpo.n_trials"


@pytest.mark.parametrize(
    ("args", "needle", "accepted"),
    [
        (("--direction", "down"), "direction='down'", "'minimize' or 'maximize'"),
        (("--cluster", "ray"), "cluster.kind='ray'", "'local', 'threads' or 'slurm'"),
        (("--n-trials", "0"), "hpo.n_trials=0", "greater than or equal to 1"),
        (("--workers", "0"), "cluster.workers=0", "greater than or equal to 1"),
    ],
)
def test_bad_values_name_what_is_accepted(home, args, needle, accepted):
    line = one_error_line(expflow("pipeline", "run", *args))
    assert needle in line and accepted in line


def test_unknown_problem_for_data_generation(home):
    line = one_error_line(expflow("pde", "generate", "navier_stokes_9d"))
    assert "navier_stokes_9d" in line and "advection" in line


def test_any_setting_can_be_set_from_the_command_line(home):
    line = one_error_line(expflow("pipeline", "run", "--set", "n_trails=3"))
    assert "'n_trails'" in line
    line = one_error_line(expflow("pipeline", "run", "--set", "hpo.budget={epoch: 5}"))
    assert "'hpo.budget.epoch'" in line and "epochs" in line


def test_pipeline_run_from_the_command_line_end_to_end(home, tmp_path):
    out = expflow(
        "pipeline",
        "run",
        "--config",
        "deployments/pde-advection.yaml",
        "--experiment",
        "cli-e2e",
        "--n-trials",
        "2",
        "--cluster",
        "threads",
        "--set",
        "hpo.budget={epochs: 3}",
        "--set",
        "train.budget={epochs: 5}",
        "--gate",
        "nrmse:lt:1",
        "--submit-to",
        str(tmp_path / "subs"),
        "--json",
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 2
    assert Path(summary["bundle"]).parent == tmp_path / "subs"
    shown = json.loads(expflow("runs", "show", summary["ledger_id"]).stdout)
    assert shown["state"] == "COMPLETED"
    # The finished row holds the best parameters; the run folder the full nested settings
    # (file < options < --set).
    assert shown["params"] == summary["best_params"]
    settings = json.loads((Path(summary["run_dir"]) / "params.json").read_text())
    assert settings["hpo"]["n_trials"] == 2 and settings["hpo"]["budget"] == {
        "epochs": 3,
        "steps": None,
        "seconds": None,
    }
    assert settings["train"]["budget"]["epochs"] == 5 and settings["cluster"]["kind"] == "threads"


def test_arg_style_from_set_reaches_the_pipeline_without_a_traceback(home, tmp_path):
    # Found as a new user: `--set arg_style=hydra` ended in a ParameterBindError traceback.
    # (arg_style is now a setting of each trainable: train.arg_style, evaluate.arg_style.)
    out = expflow(
        "pipeline", "run", "--experiment", "cli-argstyle", "--n-trials", "1",
        "--cluster", "threads", "--set", "train.arg_style=hydra",
        "--set", "hpo.budget={epochs: 2}", "--set", "train.budget={epochs: 2}",
        "--gate", "nrmse:lt:10", "--no-submit", "--json",
        timeout=300,
    )  # fmt: skip
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    params = json.loads((Path(summary["run_dir"]) / "params.json").read_text())
    assert params["train"]["arg_style"] == "hydra"


def test_set_with_an_empty_value_is_refused_not_dropped(home):
    result = expflow("pipeline", "run", "--set", "submit.predictions=")
    assert result.returncode == 2
    assert one_error_line(result) == (
        "error: --set 'submit.predictions=': the value is empty; give one "
        "(null clears a setting that may be empty)"
    )
    assert not (home / "runs").exists()
