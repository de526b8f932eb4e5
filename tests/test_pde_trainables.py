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
from expflow_flows.runs.trainable import (
    Budget,
    RunContext,
    clear_checkpoint_request,
    request_checkpoint,
    run_trainable,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "expflow_flows" / "pde" / "scripts"
TINY = {"n_samples": 30, "nx": 32, "nt": 11, "initial_step": 2, "modes": 8}
TRAIN = "expflow_flows.pde.trainables:train"


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
        ({"checkpoint_every": -1}, "checkpoint_every=-1 is not valid; expected an integer >= 0"),
        ({"checkpoint_every": 1.5}, "checkpoint_every=1.5 is not valid"),
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


# --- checkpoints and resuming ---------------------------------------------------------


@pytest.fixture
def no_stop():
    """Runs go on unless a test asks them to stop; a stop never leaks into other tests."""
    clear_checkpoint_request()
    try:
        yield
    finally:
        clear_checkpoint_request()


def _stop_at(at: int):
    """A report hook that asks for a checkpoint at step ``at``, as a Slurm time limit does."""

    def hook(step: int, values: dict[str, float]) -> bool:
        if step == at:
            request_checkpoint("time limit")
        return False  # not pruned (request_checkpoint returns the scripts it told)

    return hook


def _stopped_run(tmp_path: Path, params: dict, ckpt: Path, epochs: int = 6, at: int = 3):
    try:
        return run_trainable(
            TRAIN,
            params,
            tmp_path / "run",
            budget={"epochs": epochs},
            checkpoint_dir=ckpt,
            hook=_stop_at(at),
        )
    finally:
        clear_checkpoint_request()


def _manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "checkpoint.json").read_text())


def test_stopped_run_resumes_to_the_uninterrupted_result(tmp_path, no_stop):
    params = {**TINY, "width": 4}  # the MLP too: every kind of weight goes through the checkpoint
    whole = run_trainable(TRAIN, params, tmp_path / "whole", budget={"epochs": 6})
    assert whole.status == "ok", whole.reason

    ckpt = tmp_path / "ckpt"
    stopped = _stopped_run(tmp_path, params, ckpt)
    assert stopped.status == "failed" and "stopped to be resumed" in stopped.reason
    # Asked at the report of epoch 3: epoch 4 saves its checkpoint, then its report ends it.
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["progress"]["last_step"] == 4
    assert meta["checkpoint"]["files"] == 2
    assert _manifest(ckpt)["epoch"] == 4
    assert (ckpt / _manifest(ckpt)["arrays"]).exists()

    resumed = run_trainable(
        TRAIN, params, tmp_path / "run", budget={"epochs": 6}, checkpoint_dir=ckpt
    )
    assert resumed.status == "ok", resumed.reason
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["checkpoint"]["resumed"] is True
    # The budget is 6 epochs in all, not 6 more.
    assert [row["step"] for row in resumed.intermediate] == [5, 6]
    assert resumed.metrics["epochs"] == 6
    log = (tmp_path / "run" / "output.log").read_text()
    assert f"pde train: resumed from epoch 4 (checkpoint in {ckpt})" in log
    for key in ("val_nrmse", "val_rmse", "train_loss", "best_epoch"):
        assert resumed.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-9), key
    curve = [row["val_nrmse"] for row in stopped.intermediate + resumed.intermediate]
    assert curve == pytest.approx([row["val_nrmse"] for row in whole.intermediate], rel=1e-9)
    a, _ = SpectralOperator1D.load(tmp_path / "whole")
    b, _ = SpectralOperator1D.load(tmp_path / "run")
    for name in a.params:
        np.testing.assert_allclose(b.params[name], a.params[name], rtol=1e-9, atol=1e-12)


def test_checkpoint_every_n_epochs_keeps_the_latest(tmp_path, no_stop):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # What a save killed mid-write leaves: a temporary file, never a checkpoint.
    (ckpt / ".checkpoint-e000002.npz.123.abcd.tmp.npz").write_bytes(b"PK\x03\x04half")
    result = run_trainable(
        TRAIN,
        {**TINY, "checkpoint_every": 2},
        tmp_path / "run",
        budget={"epochs": 5},
        checkpoint_dir=ckpt,
    )
    assert result.status == "ok", result.reason
    assert _manifest(ckpt)["epoch"] == 4
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-e000004.npz", "checkpoint.json"]
    # Run again, it goes on from epoch 4 and ends where it ended.
    again = run_trainable(
        TRAIN,
        {**TINY, "checkpoint_every": 2},
        tmp_path / "again",
        budget={"epochs": 5},
        checkpoint_dir=ckpt,
    )
    assert [row["step"] for row in again.intermediate] == [5]
    assert again.metrics["val_nrmse"] == pytest.approx(result.metrics["val_nrmse"], rel=1e-9)


def test_checkpoint_every_zero_leaves_no_checkpoint(tmp_path, no_stop):
    ckpt = tmp_path / "ckpt"
    stopped = _stopped_run(tmp_path, {**TINY, "checkpoint_every": 0}, ckpt, at=2)
    assert stopped.status == "failed" and "stopped to be resumed" in stopped.reason
    assert not ckpt.exists()  # nothing saved, and the empty folder is removed
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["checkpoint"]["files"] == 0 and meta["progress"]["last_step"] == 3


def _damage_truncated(ckpt: Path) -> None:
    npz = ckpt / _manifest(ckpt)["arrays"]
    npz.write_bytes(npz.read_bytes()[:100])


def _damage_wrong_keys(ckpt: Path) -> None:
    manifest = _manifest(ckpt)
    npz = ckpt / manifest["arrays"]
    np.savez(npz, something_else=np.zeros(3))
    import hashlib

    manifest["arrays_sha256"] = hashlib.sha256(npz.read_bytes()).hexdigest()
    (ckpt / "checkpoint.json").write_text(json.dumps(manifest))


def _damage_manifest(ckpt: Path) -> None:
    (ckpt / "checkpoint.json").write_text('{"format": 1, "epo')


@pytest.mark.parametrize("damage", [_damage_truncated, _damage_wrong_keys, _damage_manifest])
def test_damaged_checkpoint_is_ignored(tmp_path, no_stop, damage):
    ckpt = tmp_path / "ckpt"
    first = run_trainable(
        TRAIN,
        {**TINY, "checkpoint_every": 1},
        tmp_path / "first",
        budget={"epochs": 2},
        checkpoint_dir=ckpt,
    )
    assert first.status == "ok", first.reason
    damage(ckpt)
    result = run_trainable(
        TRAIN,
        {**TINY, "checkpoint_every": 1},
        tmp_path / "run",
        budget={"epochs": 3},
        checkpoint_dir=ckpt,
    )
    assert result.status == "ok", result.reason
    assert [row["step"] for row in result.intermediate] == [1, 2, 3]  # from scratch
    log = (tmp_path / "run" / "output.log").read_text()
    lines = [line for line in log.splitlines() if "could not be loaded" in line]
    assert len(lines) == 1 and lines[0].startswith(f"pde train: the checkpoint in {ckpt}")
    assert lines[0].endswith("starting from scratch")
    assert _manifest(ckpt)["epoch"] == 3  # the new run's checkpoint replaced it


def test_checkpoint_of_other_settings_is_ignored(tmp_path, no_stop):
    ckpt = tmp_path / "ckpt"
    _stopped_run(tmp_path, dict(TINY), ckpt)
    assert _manifest(ckpt)["epoch"] == 4
    result = run_trainable(
        TRAIN,
        {**TINY, "lr": 0.02},
        tmp_path / "other",
        budget={"epochs": 6},
        checkpoint_dir=ckpt,
    )
    assert result.status == "ok", result.reason
    assert [row["step"] for row in result.intermediate][0] == 1
    log = (tmp_path / "other" / "output.log").read_text()
    assert f"pde train: ignoring the checkpoint in {ckpt}" in log
    assert "model.lr 0.01 -> 0.02" in log and "resumed from" not in log


def test_script_saves_a_checkpoint_when_told_to_stop(tmp_path, no_stop):
    ckpt = tmp_path / "ckpt"
    params = {**TINY, "checkpoint_every": 1000}  # only the stop saves one
    try:
        stopped = run_trainable(
            str(SCRIPTS / "train.py"),
            params,
            tmp_path / "run",
            budget={"epochs": 400},
            checkpoint_dir=ckpt,
            hook=_stop_at(2),
        )
    finally:
        clear_checkpoint_request()
    # SIGUSR1 reaches the script while it trains; it saves and stops instead of dying.
    assert stopped.status == "failed" and "stopped to be resumed" in stopped.reason
    saved = _manifest(ckpt)["epoch"]
    assert 2 <= saved < 400
    resumed = run_trainable(
        str(SCRIPTS / "train.py"),
        params,
        tmp_path / "run",
        budget={"epochs": 400},
        checkpoint_dir=ckpt,
    )
    assert resumed.status == "ok", resumed.reason
    assert resumed.intermediate[0]["step"] == saved + 1
    assert resumed.metrics["epochs"] == 400
