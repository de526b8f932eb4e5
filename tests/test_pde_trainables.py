"""The PDE trainables: callables through the contract, hyperparameters that matter, scripts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.pde.metrics import METRIC_KEYS
from expflow_flows.pde.model import ModelConfig, SpectralOperator1D
from expflow_flows.pde.trainables import evaluate, train
from expflow_flows.runs.trainable import Budget, RunContext, run_trainable

SCRIPTS = Path(__file__).resolve().parents[1] / "expflow_flows" / "pde" / "scripts"
TINY = {"n_samples": 30, "nx": 32, "nt": 11, "initial_step": 2, "modes": 8}


@pytest.fixture(autouse=True)
def _pde_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EXPFLOW_DATA_DIR", str(tmp_path / "data"))
    for key in ("EXPFLOW_RUN_DIR", "EXPFLOW_METRICS_FILE", "EXPFLOW_UPSTREAM_RUN_DIR"):
        monkeypatch.delenv(key, raising=False)


def _train(tmp_path: Path, name: str, **params) -> dict[str, float]:
    return train(params, RunContext(run_dir=tmp_path / name))


def test_train_through_the_contract(tmp_path):
    result = run_trainable(
        "expflow_flows.pde.trainables:train",
        {"problem": "advection", "beta": 0.4, **TINY, "epochs": 50},
        tmp_path / "train",
        budget={"epochs": 3},  # the budget wins over params["epochs"]
    )
    assert result.status == "ok", result.reason
    for key in ("val_nrmse", "val_rmse", "train_loss", "train_time_s"):
        assert math.isfinite(result.metrics[key]), key
    assert result.metrics["epochs"] == 3
    assert [row["step"] for row in result.intermediate] == [1, 2, 3]
    assert (tmp_path / "train" / "model.npz").exists()
    meta = json.loads((tmp_path / "train" / "model.json").read_text())
    assert meta["config"]["modes"] == 8 and meta["data"]["generated"] is True
    assert "epoch 3/3" in (tmp_path / "train" / "output.log").read_text()


def test_hyperparameters_matter(tmp_path):
    base = {"epochs": 15}  # default data: 100 advection samples, nx=128, nt=41
    good = _train(tmp_path, "good", **base)
    few_modes = _train(tmp_path, "modes1", **base, modes=1)
    tiny_lr = _train(tmp_path, "lr", **base, lr=1e-5)
    heavy_l2 = _train(tmp_path, "l2", **base, l2=1.0)
    assert good["val_nrmse"] < 0.05
    for crippled in (few_modes, tiny_lr, heavy_l2):
        assert crippled["val_nrmse"] > 5 * good["val_nrmse"]


def test_evaluate_writes_predictions_and_all_metrics(tmp_path):
    up = run_trainable(
        "expflow_flows.pde.trainables:train", {**TINY}, tmp_path / "train", budget={"epochs": 4}
    )
    assert up.status == "ok", up.reason
    result = run_trainable(
        "expflow_flows.pde.trainables:evaluate", {}, tmp_path / "eval", upstream=up.run_dir
    )
    assert result.status == "ok", result.reason
    assert set(METRIC_KEYS) <= set(result.metrics) and "eval_time_s" in result.metrics
    with h5py.File(tmp_path / "eval" / "pred.hdf5") as f:
        pred, target = np.asarray(f["pred"]), np.asarray(f["target"])
        assert f.attrs["layout"] == "[batch, x, t, channel]"
    assert pred.shape == target.shape == (3, 32, 11, 1)  # int(30 * 0.1) test samples
    np.testing.assert_array_equal(pred[:, :, :2], target[:, :, :2])  # initial_step frames given
    # An explicit model path gives the same numbers.
    again = evaluate({"model": str(up.run_dir / "model.npz")}, RunContext(run_dir=tmp_path / "e2"))
    assert again["nrmse"] == pytest.approx(result.metrics["nrmse"])


def test_model_save_load_roundtrip(tmp_path):
    model = SpectralOperator1D(ModelConfig(modes=5, initial_step=2, width=3), 16)
    rng = np.random.default_rng(0)
    for name, value in model.params.items():
        model.params[name] = 0.1 * rng.normal(size=value.shape)
    model.save(tmp_path)
    loaded, meta = SpectralOperator1D.load(tmp_path / "model.npz")
    u = rng.normal(size=(2, 16, 6))
    np.testing.assert_array_equal(loaded.rollout(u), model.rollout(u))
    assert meta["config"]["width"] == 3


def test_pruning_stops_training(tmp_path):
    result = run_trainable(
        "expflow_flows.pde.trainables:train",
        {**TINY, "epochs": 20},
        tmp_path / "pruned",
        hook=lambda step, values: step >= 2,
    )
    assert result.status == "pruned"
    assert len(result.intermediate) == 2


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"modes": 0}, "modes=0 is not valid; expected an integer >= 1"),
        ({"lr": 0}, "lr=0 is not valid; expected a number > 0"),
        ({"initial_step": 2.5}, "initial_step=2.5 is not valid"),
        ({"problem": "darcy"}, "problem='darcy' is not valid; expected one of advection"),
        ({"learning_rate": 0.1}, "'learning_rate' is not known; accepted parameters: problem"),
        ({"initial_step": 40, "nt": 11}, "initial_step=40 is out of range for 11 time frames"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(tmp_path, params, message):
    with pytest.raises(ExpflowError, match=message.replace("[", r"\[")):
        train({**TINY, **params}, RunContext(run_dir=tmp_path / "bad", budget=Budget(epochs=1)))


def test_evaluate_without_model_is_an_error(tmp_path):
    result = run_trainable("expflow_flows.pde.trainables:evaluate", {}, tmp_path / "eval")
    assert result.status == "failed" and "needs a model" in result.reason


def test_data_file_param(tmp_path):
    from expflow_flows.pde.generate import generate

    path = generate("burgers", tmp_path / "mine.hdf5", n_samples=30, nx=32, nt=11)
    metrics = train(
        {"data_file": str(path), "initial_step": 2, "modes": 8},
        RunContext(run_dir=tmp_path / "t", budget=Budget(epochs=2)),
    )
    assert math.isfinite(metrics["val_nrmse"])
    meta = json.loads((tmp_path / "t" / "model.json").read_text())
    assert meta["data"]["data_file"] == str(path.resolve()) and meta["data"]["generated"] is False
    assert meta["problem"] == "burgers"  # read from the file, not the "advection" default


def test_scripts_through_the_contract(tmp_path):
    up = run_trainable(
        str(SCRIPTS / "train.py"),
        {"problem": "advection", "beta": 0.4, **TINY, "lr": 0.02},
        tmp_path / "train",
        budget={"epochs": 3},
    )
    assert up.status == "ok", up.reason
    assert [row["step"] for row in up.intermediate] == [1, 2, 3]
    assert "val_nrmse" in up.intermediate[0]
    assert math.isfinite(up.metrics["val_nrmse"]) and up.metrics["epochs"] == 3
    assert (tmp_path / "train" / "model.npz").exists()
    ev = run_trainable(str(SCRIPTS / "evaluate.py"), {}, tmp_path / "eval", upstream=up.run_dir)
    assert ev.status == "ok", ev.reason
    assert set(METRIC_KEYS) <= set(ev.metrics)
    assert (tmp_path / "eval" / "pred.hdf5").exists()
    bad = run_trainable(str(SCRIPTS / "train.py"), {"modez": 3}, tmp_path / "bad")
    assert bad.status == "failed" and "--modez" in bad.reason


def test_script_without_runner_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPFLOW_RUN")}
    args = ["--nx", "32", "--nt", "11", "--n_samples", "30", "--initial_step", "2", "--epochs", "2"]
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("EXPFLOW_METRIC step=2 val_nrmse=") for line in lines)
    assert any(line.startswith("EXPFLOW_METRIC val_nrmse=") for line in lines)
    assert (tmp_path / "model.npz").exists()  # no EXPFLOW_RUN_DIR: the current folder
    bad = subprocess.run(
        [sys.executable, str(SCRIPTS / "train.py"), "--lr", "-1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "lr='-1' is not valid" in bad.stderr
