"""Code not written for expflow, run through the pipeline and a sweep with a config file
alone (tests/foreign/*/pipeline.yaml, sweep.yaml): no script there knows about expflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

FOREIGN = Path(__file__).parent / "foreign"
HYDRA = "hydra-core==1.3.2"


@pytest.fixture(scope="session")
def hydra_venv() -> Path:
    """A virtualenv with Hydra, which expflow's own environment lacks (built once, kept)."""
    venv = Path.home() / ".cache" / "expflow-tests" / "venvs" / HYDRA.replace("==", "-")
    python = venv / "bin" / "python"
    done = venv / ".ready"
    if not done.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        uv = Path(sys.executable).with_name("uv")
        installer = (
            [str(uv), "pip", "install", "--quiet", "--python", str(python)]
            if uv.exists()
            else [str(python), "-m", "pip", "install", "--quiet"]
        )
        subprocess.run([*installer, HYDRA], check=True, timeout=600)
        done.write_text(HYDRA)
    with pytest.raises(subprocess.CalledProcessError):  # the point: not in our environment
        subprocess.run([sys.executable, "-c", "import hydra"], check=True, capture_output=True)
    return venv


def run_pipeline(folder: str, **settings):
    from expflow_flows.flows.pipeline import pipeline

    return pipeline(config=str(FOREIGN / folder / "pipeline.yaml"), settings=settings or None)


def run_sweep(folder: str):
    from expflow_flows.flows.sweep import sweep

    return sweep(config=str(FOREIGN / folder / "sweep.yaml"))


def trial_dirs(home: Path, experiment: str) -> list[Path]:
    return sorted((home / "runs" / experiment).glob("hpo-t*"))


def test_an_argparse_script_with_progress_bars(prefect_harness, home):
    summary = run_pipeline("argparse_tqdm")
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 4
    trials = trial_dirs(home, "foreign-argparse")
    # Metrics came from its own epoch lines; the tqdm bars in between did not confuse them.
    first = json.loads((trials[0] / "intermediate.json").read_text())
    assert [row["step"] for row in first][:2] == [1, 2] and "val_loss" in first[0]
    # The budget reached the script as its own --epochs, and each trial kept its checkpoint.
    for trial in trials:
        params = json.loads((trial / "params.json").read_text())
        assert params["epochs"] == 4
        assert (trial / "checkpoint.json").exists()
    assert json.loads((Path(summary["train_run"]) / "params.json").read_text())["epochs"] == 6
    # The evaluation found the checkpoint in its folder, and its file became pred.hdf5.
    assert summary["gates"][0]["passed"] and summary["metrics"]["nrmse"] < 0.5
    bundle = Path(summary["bundle"])
    with h5py.File(bundle / "pred.hdf5") as f:
        assert f["pred"].shape == (4, 32, 10, 1)
    sweep = run_sweep("argparse_tqdm")
    assert sweep["counts"] == {"ok": 4}
    assert sweep["best"][0]["metric:val_loss"] > 0


def test_a_silent_script_that_writes_csv_and_a_pickle_into_its_cwd(prefect_harness, home, tmp_path):
    summary = run_pipeline("silent_csv")
    assert summary["trials"]["complete"] == 3
    for trial in trial_dirs(home, "foreign-silent"):
        assert (trial / "model.pkl").exists() and (trial / "history.csv").exists()
        steps = json.loads((trial / "intermediate.json").read_text())
        assert [row["step"] for row in steps] == [0, 1]  # the CSV's rows, epochs budget 2
    assert not (Path.cwd() / "history.csv").exists()  # nothing landed where expflow runs
    sweep = run_sweep("silent_csv")  # the same script, given as a command line
    best = sweep["best"][0]
    assert sweep["counts"] == {"ok": 3} and best["param:lr"] == 0.03
    # A package of the command sweep holds the script and how it was started, not the token,
    # and re-runs every combination to the same metrics.
    from expflow_flows.bundles.package import package_sweep, reproduce, unpack_package

    archive = package_sweep(home / "runs" / "foreign-silent-sweep", tmp_path / "packages")
    unpacked = unpack_package(archive, tmp_path / "unpacked")
    runs = json.loads((unpacked / "runs.json").read_text())["runs"]
    assert {r["launch"]["command"][0] for r in runs} == {"python3"}
    assert all(r["redacted_params"] == ["env SERVICE_TOKEN"] for r in runs)
    script = FOREIGN / "silent_csv" / "train.py"
    sources = json.loads((unpacked / "manifest.json").read_text())["code"]["sources"]
    archived = unpacked / sources[str(script)]["archived"]
    assert archived.read_text() == script.read_text()
    token = "tok-" + "2b7f0c9e1d"  # as in sweep.yaml, not spelled out (this file may be in a diff)
    for path in unpacked.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    report = reproduce(archive, workdir=tmp_path / "again")
    assert [r.status for r in report.runs] == ["matched"] * 3, report.summary()


def test_a_script_that_only_logs_tensorboard_scalars(prefect_harness, home):
    summary = run_pipeline("tensorboard_logger")
    assert summary["trials"]["complete"] == 3
    assert summary["metrics"]["loss/val"] < 1
    trial = trial_dirs(home, "foreign-tensorboard")[0]
    steps = json.loads((trial / "intermediate.json").read_text())
    assert [row["step"] for row in steps] == [0, 1, 2, 3, 4]
    sweep = run_sweep("tensorboard_logger")
    assert sweep["counts"] == {"ok": 2} and sweep["best"][0]["param:lr"] == 0.05


def test_a_hydra_app_in_its_own_venv_prunes_trains_evaluates_and_submits(
    prefect_harness, home, hydra_venv, monkeypatch
):
    monkeypatch.setenv("HYDRA_VENV", str(hydra_venv))
    summary = run_pipeline("hydra_app")
    trials = summary["trials"]
    assert trials["complete"] + trials["pruned"] == 10 and trials["failed"] == 0
    # The median pruner acted on the values read from the app's log lines: a pruned trial
    # was stopped before its 8 epochs.
    assert trials["pruned"] >= 1
    for trial in trial_dirs(home, "foreign-hydra"):
        meta = json.loads((trial / "metadata.json").read_text())
        command = meta["command"]
        assert command[0] == str(hydra_venv / "bin" / "python")
        assert "+args=config_Adv" in command and "++args.epochs=8" in command
        steps = [row["step"] for row in json.loads((trial / "intermediate.json").read_text())]
        if meta["status"] == "pruned":
            assert max(steps) < 8
        else:
            assert steps == list(range(1, 9))
            assert list(trial.glob("outputs/*/model.ckpt"))  # Hydra's own run folder
    assert summary["gates"][0]["passed"]
    bundle = Path(summary["bundle"])
    assert (bundle / "pred.hdf5").exists() and (bundle / "manifest.json").exists()
    evaluated = Path(summary["eval_run"])
    assert (evaluated / "model.ckpt").is_symlink()
    sweep = run_sweep("hydra_app")
    assert sweep["counts"] == {"ok": 2}
    assert os.environ["HYDRA_VENV"] == str(hydra_venv)
