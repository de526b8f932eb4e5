"""``train`` and ``evaluate`` trainables for the PDE workload (see :mod:`expflow_flows.runs.trainable`).

``expflow_flows.pde.trainables:train`` trains :class:`~expflow_flows.pde.model.SpectralOperator1D`
on the training split of a PDEBench 1D file, holding out the last ``val_ratio`` of that split for
validation, reports ``val_nrmse`` after every epoch (``run.report``; pruning stops it there) and
saves ``model.npz`` + ``model.json`` into the run directory.

``expflow_flows.pde.trainables:evaluate`` loads that model (``params["model"]`` or the upstream
run's ``model.npz``), rolls it out on the test split, writes ``pred.hdf5`` and returns PDEBench's
8 metrics.

Epoch rule: ``run.budget.epochs`` wins when it is set; otherwise ``params["epochs"]``; otherwise
25. ``run.budget.seconds`` and ``run.budget.steps`` (optimizer steps) stop training early.

Checkpoints: ``train`` saves its whole training state into ``run.checkpoint_dir`` every
``checkpoint_every`` epochs (default 5; 0: never) and when ``run.stop_requested`` (a time
limit is near), then reports, which ends such a run. Started again with a checkpoint made
with the same settings there, it goes on from the epoch after it and ends with the metrics
an uninterrupted run gives; the budget counts the epochs of every attempt together. A
checkpoint made with other settings, or one that does not load, is set aside with a log line.

The data is ``data_file`` when given (a real PDEBench file or one of ours); otherwise a cached
synthetic file for ``problem`` with ``beta`` / ``nu`` / ``rho``, ``n_samples``, ``nx``, ``nt`` and
``data_seed`` (:func:`expflow_flows.pde.generate.ensure_dataset`).

The script versions (``expflow_flows/pde/scripts/*.py``) call :func:`script_main`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from expflow_flows.errors import ExpflowError
from expflow_flows.pde.data import PDEData1D, read_1d, split_indices
from expflow_flows.pde.generate import ensure_dataset
from expflow_flows.pde.metrics import compute_metrics, write_predictions
from expflow_flows.pde.model import (
    MODEL_FILE,
    FitState,
    ModelConfig,
    SpectralOperator1D,
    fit,
    load_checkpoint,
    save_checkpoint,
)
from expflow_flows.pde.registry import find_problem_for_file
from expflow_flows.runs.trainable import (
    Budget,
    RunContext,
    checkpoint_requested,
    request_checkpoint,
)

DEFAULT_EPOCHS = 25
DEFAULT_CHECKPOINT_EVERY = 5
PRED_FILE = "pred.hdf5"
PROBLEM_CHOICES = ("advection", "burgers", "diffusion_reaction_1d", "diffusion_sorption")


@dataclass(frozen=True)
class Param:
    """One accepted parameter: type, default, accepted range and help text."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value must be > low instead of >= low
    choices: tuple[str, ...] | None = None
    default_text: str | None = None  # how --help describes a None default

    def accepted(self) -> str:
        """The accepted values, in words."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        what = (
            "an integer" if self.kind is int else "a number" if self.kind is float else "a string"
        )
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return what + (" " + " and ".join(parts) if parts else "")

    def coerce(self, value: Any) -> Any:
        """The value converted to this parameter's type and checked; ExpflowError when it is not valid."""
        if value is None or (
            isinstance(value, str) and value.strip().lower() in ("", "none", "null")
        ):
            if self.default is None:
                return None
            raise ExpflowError(
                f"parameter {self.name}={value!r} is not valid; expected {self.accepted()}"
            )
        bad = ExpflowError(
            f"parameter {self.name}={value!r} is not valid; expected {self.accepted()}"
        )
        if self.kind is str:
            if not isinstance(value, (str, os.PathLike)):
                raise bad
            text = str(value)
            if self.choices and text not in self.choices:
                raise bad
            return text
        if isinstance(value, bool):
            raise bad
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(num):
            raise bad
        if self.kind is int:
            if not num.is_integer():
                raise bad
            num = int(num)
        if self.low is not None and (num <= self.low if self.low_open else num < self.low):
            raise bad
        if self.high is not None and num > self.high:
            raise bad
        return num


DATA_PARAMS: tuple[Param, ...] = (
    Param("problem", str, "advection", "PDE problem key", choices=PROBLEM_CHOICES),
    Param(
        "data_file", str, None, "a PDEBench 1D HDF5 file", default_text="generate synthetic data"
    ),
    Param("beta", float, None, "advection speed for generated advection data", default_text="0.4"),
    Param(
        "nu",
        float,
        None,
        "viscosity/diffusivity for generated burgers or diffusion-reaction data",
        low=0.0,
        low_open=True,
        default_text="0.01 for burgers, 0.5 for diffusion_reaction_1d",
    ),
    Param(
        "rho",
        float,
        None,
        "reaction rate for generated diffusion-reaction data",
        low=0.0,
        default_text="1.0",
    ),
    Param("n_samples", int, 100, "samples to generate", low=2, high=100_000),
    Param("nx", int, 128, "grid points to generate", low=16, high=8192),
    Param("nt", int, 41, "time frames to generate", low=3, high=10_000),
    Param("data_seed", int, 0, "seed of the generated data", low=0),
    Param(
        "reduced_resolution",
        int,
        1,
        "keep every n-th grid point (PDEBench option)",
        low=1,
        high=256,
    ),
    Param(
        "reduced_resolution_t",
        int,
        1,
        "keep every n-th time frame (PDEBench option)",
        low=1,
        high=256,
    ),
    Param("num_samples_max", int, -1, "use at most this many samples (-1: all)", low=-1),
    Param(
        "test_ratio",
        float,
        0.1,
        "fraction of samples PDEBench holds out for test",
        low=0.0,
        high=0.5,
        low_open=True,
    ),
)
MODEL_PARAMS: tuple[Param, ...] = (
    Param("modes", int, 16, "Fourier modes kept (at most nx//2+1 are used)", low=1),
    Param("initial_step", int, 10, "history length: frames the model sees", low=1, high=1000),
    Param("width", int, 0, "hidden units of the pointwise MLP (0: none)", low=0, high=256),
    Param("lr", float, 0.01, "Adam learning rate", low=0.0, high=10.0, low_open=True),
    Param("l2", float, 1e-6, "L2 penalty on the weights", low=0.0, high=100.0),
    Param(
        "epochs",
        int,
        DEFAULT_EPOCHS,
        "epochs (run.budget.epochs wins when set)",
        low=1,
        high=100_000,
    ),
    Param("batch_size", int, 8, "trajectories per optimizer step", low=1, high=100_000),
    Param(
        "val_ratio",
        float,
        0.1,
        "fraction of the training split held out for validation",
        low=0.0,
        high=0.5,
        low_open=True,
    ),
    Param("seed", int, 0, "seed of weight init and shuffling", low=0),
)
CHECKPOINT_PARAM = Param(
    "checkpoint_every",
    int,
    DEFAULT_CHECKPOINT_EVERY,
    "save a checkpoint to resume from every n epochs, and when a stop is requested (0: never)",
    low=0,
    high=100_000,
)
TRAIN_PARAMS: tuple[Param, ...] = DATA_PARAMS + MODEL_PARAMS + (CHECKPOINT_PARAM,)
EVAL_PARAMS: tuple[Param, ...] = TRAIN_PARAMS + (
    Param("model", str, None, "model.npz to evaluate", default_text="the upstream run's model.npz"),
)
_GEN_KEYS = ("beta", "nu", "rho", "n_samples", "nx", "nt", "data_seed")
_DATA_KEYS = tuple(p.name for p in DATA_PARAMS)


def check_params(params: dict[str, Any], specs: Sequence[Param]) -> dict[str, Any]:
    """Validated params with defaults filled; an unknown name or bad value is an ExpflowError."""
    by_name = {p.name: p for p in specs}
    unknown = sorted(set(params) - set(by_name))
    if unknown:
        raise ExpflowError(
            f"parameter {unknown[0]!r} is not known; accepted parameters: {', '.join(by_name)}"
        )
    return {
        name: spec.coerce(params[name]) if name in params else spec.default
        for name, spec in by_name.items()
    }


def _log(msg: str) -> None:
    print(msg, flush=True)


def load_data(p: dict[str, Any]) -> tuple[PDEData1D, dict[str, Any]]:
    """Read the data the params name (generating it when needed); returns (data, source description)."""
    if p["data_file"]:
        ignored = [k for k in ("beta", "nu", "rho") if p[k] is not None]
        if ignored:
            _log(
                f"note: data_file is set, so {', '.join(ignored)} (data generation settings) are not used"
            )
        path = Path(p["data_file"]).expanduser().resolve()
        generated = False
    else:
        pde = {k: p[k] for k in ("beta", "nu", "rho") if p[k] is not None}
        path = ensure_dataset(
            p["problem"],
            n_samples=p["n_samples"],
            nx=p["nx"],
            nt=p["nt"],
            seed=p["data_seed"],
            **pde,
        )
        generated = True
    data = read_1d(
        path,
        reduced_resolution=p["reduced_resolution"],
        reduced_resolution_t=p["reduced_resolution_t"],
        num_samples_max=p["num_samples_max"],
    )
    source = {k: p[k] for k in _DATA_KEYS}
    source.update(data_file=str(path), generated=generated)
    if not generated and not p.get("_problem_given", True):
        # A real file's name (or our attrs) says which problem it is; the key is only a label here.
        found = find_problem_for_file(path.name)
        label = data.attrs.get("problem") or (found.key if found else None)
        if label in PROBLEM_CHOICES:
            source["problem"] = label
    return data, source


def _splits(
    data: PDEData1D, test_ratio: float, val_ratio: float | None = None
) -> dict[str, np.ndarray]:
    train_idx, test_idx = split_indices(data.n_samples, test_ratio, data.layout)
    out = {"train": data.u[train_idx], "test": data.u[test_idx]}
    if val_ratio is not None:
        n_train = len(train_idx)
        n_val = max(1, int(n_train * val_ratio))
        if n_train - n_val < 1:
            raise ExpflowError(
                f"{data.path.name} has {data.n_samples} samples: too few for a test split "
                f"(test_ratio={test_ratio:g}) plus validation (val_ratio={val_ratio:g})"
            )
        # The last val_ratio of the training split is held out for validation.
        out["fit"], out["val"] = out["train"][: n_train - n_val], out["train"][n_train - n_val :]
    return out


def _made_with(
    config: ModelConfig,
    source: dict[str, Any],
    p: dict[str, Any],
    split: dict[str, np.ndarray],
    budget: Budget,
) -> dict[str, Any]:
    """The settings a checkpoint belongs to: a run resumes only from one made with these."""
    digest = hashlib.sha256()
    for part in ("fit", "val"):
        digest.update(np.ascontiguousarray(split[part]))  # hashed in place, no copy
    made_with = {
        "model": asdict(config),
        "max_steps": budget.steps,
        "data": {**source, "val_ratio": p["val_ratio"]},
        "split": {"fit": list(split["fit"].shape), "val": list(split["val"].shape)},
        "data_sha256": digest.hexdigest(),
    }
    return json.loads(json.dumps(made_with, default=str))  # as it reads back from JSON


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            shown = (old, new) if key != "data_sha256" else ("…", "…")
            out.append(f"{prefix}{key} {shown[0]!r} -> {shown[1]!r}")
    return out


def _resume_state(
    folder: Path, made_with: dict[str, Any], config: ModelConfig, nx: int
) -> FitState | None:
    """The checkpoint in ``folder`` to go on from, or None (with a log line saying why)."""
    try:
        found = load_checkpoint(folder)
        if found is None:
            return None
        state, saved = found
        diff = _differences(saved, made_with)
        if diff:
            _log(
                f"pde train: ignoring the checkpoint in {folder}: it was made with other "
                f"settings ({'; '.join(diff[:3])}{'; …' if len(diff) > 3 else ''}); "
                "starting from scratch"
            )
            return None
        state.check(SpectralOperator1D(config, nx))
    except ExpflowError as exc:
        _log(
            f"pde train: the checkpoint in {folder} could not be loaded ({exc}); "
            "starting from scratch"
        )
        return None
    return state


@dataclass
class _Checkpoints:
    """Where and when ``train`` saves: every ``every`` epochs, and when a stop is requested."""

    folder: Path
    every: int
    made_with: dict[str, Any]
    run: RunContext

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0 or self.run.stop_requested

    def save(self, state: FitState) -> None:
        save_checkpoint(self.folder, state, self.made_with)
        _log(f"pde train: checkpoint of epoch {state.epoch} saved in {self.folder}")


def train(params: dict[str, Any], run: RunContext) -> dict[str, float]:
    """Train the baseline on the training split; report ``val_nrmse`` per epoch; save ``model.npz``.

    Checkpoints go to ``run.checkpoint_dir`` (see the module docstring); a run started
    with a matching one there goes on from it."""
    p = check_params(params, TRAIN_PARAMS)
    p["_problem_given"] = "problem" in params
    budget = run.budget or Budget()
    epochs = budget.epochs if budget.epochs else p["epochs"]
    config = ModelConfig(
        modes=p["modes"],
        initial_step=p["initial_step"],
        width=p["width"],
        lr=p["lr"],
        l2=p["l2"],
        epochs=epochs,
        batch_size=p["batch_size"],
        seed=p["seed"],
    )
    config.check()
    data, source = load_data(p)
    split = _splits(data, p["test_ratio"], p["val_ratio"])
    nx, nt = data.u.shape[1], data.u.shape[2]
    _log(
        f"pde train: problem={source['problem']} file={source['data_file']} "
        f"samples fit/val/test={len(split['fit'])}/{len(split['val'])}/{len(split['test'])} nx={nx} nt={nt}"
    )
    _log(
        f"pde train: modes={config.modes} initial_step={config.initial_step} width={config.width} "
        f"lr={config.lr:g} l2={config.l2:g} epochs={epochs} batch_size={config.batch_size}"
    )
    every = p["checkpoint_every"]
    folder = Path(run.checkpoint_dir) if run.checkpoint_dir and every else None
    made_with = _made_with(config, source, p, split, budget)
    resume = _resume_state(folder, made_with, config, nx) if folder else None
    if resume is not None:
        _log(f"pde train: resumed from epoch {resume.epoch} (checkpoint in {folder})")

    saver = _Checkpoints(folder, every, made_with, run) if folder else None

    def on_epoch(epoch: int, values: dict[str, float]) -> None:
        run.report(epoch, val_nrmse=values["val_nrmse"])

    model, result = fit(
        split["fit"],
        split["val"],
        config,
        on_epoch=on_epoch,
        max_seconds=budget.seconds,
        max_steps=budget.steps,
        log=_log,
        resume=resume,
        save_state=saver.save if saver else None,
        save_when=saver.due if saver else None,
    )
    if result.stopped:
        _log(f"pde train: stopped early: {result.stopped}")
    if model.m < config.modes:
        _log(
            f"pde train: modes={config.modes} capped at {model.m} (nx={nx} has {model.m} rfft modes)"
        )
    path = model.save(
        Path(run.run_dir),
        extra={
            "problem": source["problem"],
            "data": source,
            "fit": {
                "best_epoch": result.best_epoch,
                "best_val_nrmse": result.best_val_nrmse,
                "epochs_run": result.epochs_run,
                "steps": result.steps,
                "seconds": round(result.seconds, 3),
                "stopped": result.stopped,
                "resumed_from_epoch": resume.epoch if resume else None,
            },
        },
    )
    _log(
        f"pde train: best val_nrmse={result.best_val_nrmse:.4f} at epoch {result.best_epoch}; "
        f"{result.seconds:.2f} s; saved {path}"
    )
    return {
        "val_nrmse": result.best_val_nrmse,
        "val_rmse": result.best_val_rmse,
        "train_loss": result.train_loss,
        "train_time_s": round(result.seconds, 3),
        "best_epoch": float(result.best_epoch),
        "epochs": float(result.epochs_run),
        "n_params": float(model.n_params),
    }


def _model_path(p: dict[str, Any], run: RunContext) -> Path:
    if p["model"]:
        return Path(p["model"]).expanduser()
    if run.upstream is None:
        raise ExpflowError(
            "evaluate needs a model: pass the parameter 'model' (a model.npz) or run it with an "
            "upstream train run directory"
        )
    return Path(run.upstream) / MODEL_FILE


def evaluate(params: dict[str, Any], run: RunContext) -> dict[str, float]:
    """Roll the trained model out on the test split, write ``pred.hdf5``, return PDEBench's metrics."""
    p = check_params(params, EVAL_PARAMS)
    model_path = _model_path(p, run)
    model, meta = SpectralOperator1D.load(model_path)
    # The model's own data settings, overridden by any data parameter given explicitly.
    recorded = meta.get("data", {})
    data_p = {k: v for k, v in recorded.items() if k in _DATA_KEYS}
    if recorded.get("generated"):
        data_p["data_file"] = None  # regenerate (deterministically) if the cache was cleared
    explicit = {k: p[k] for k in _DATA_KEYS if k in params}
    if "data_file" not in explicit and any(k in explicit for k in ("problem", *_GEN_KEYS)):
        data_p["data_file"] = None  # new generation settings mean a different generated file
    data_p.update(explicit)
    data_p = check_params({k: v for k, v in data_p.items() if v is not None}, DATA_PARAMS)
    train_only = {s.name for s in MODEL_PARAMS} | {CHECKPOINT_PARAM.name}
    ignored = sorted(k for k in params if k in train_only)
    if ignored:
        _log(f"note: evaluate uses the trained model's settings, not: {', '.join(ignored)}")
    t0 = time.perf_counter()
    data, source = load_data(data_p)
    if data.u.shape[1] != model.nx:
        raise ExpflowError(
            f"model {model_path} was trained on nx={model.nx} grid points but "
            f"{Path(source['data_file']).name} has nx={data.u.shape[1]}; use matching data"
        )
    test = _splits(data, data_p["test_ratio"])["test"]
    if len(test) < 1:
        raise ExpflowError(
            f"{Path(source['data_file']).name} has no test samples with test_ratio={data_p['test_ratio']:g}"
        )
    s = model.config.initial_step
    _log(
        f"pde evaluate: model={model_path} file={source['data_file']} test samples={len(test)} "
        f"initial_step={s} frames={test.shape[2]}"
    )
    pred = model.rollout(test)
    metrics = compute_metrics(pred[..., None], test[..., None], initial_step=s)
    out_path = write_predictions(
        Path(run.run_dir) / PRED_FILE,
        pred[..., None],
        test[..., None],
        x=data.x,
        t=data.t,
        initial_step=s,
        attrs={
            "problem": source["problem"],
            "data_file": source["data_file"],
            "model": str(model_path),
        },
    )
    elapsed = time.perf_counter() - t0
    _log(
        "pde evaluate: "
        + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        + f"; {elapsed:.2f} s; wrote {out_path}"
    )
    return {**metrics, "eval_time_s": round(elapsed, 3), "n_test": float(len(test))}


STAGES: dict[
    str, tuple[Callable[[dict[str, Any], RunContext], dict[str, float]], tuple[Param, ...]]
] = {
    "train": (train, TRAIN_PARAMS),
    "evaluate": (evaluate, EVAL_PARAMS),
}


def _env_budget() -> Budget:
    raw = {
        key: os.environ.get(f"EXPFLOW_BUDGET_{key.upper()}")
        for key in ("epochs", "steps", "seconds")
    }
    return Budget.from_value({k: v for k, v in raw.items() if v})


def build_parser(stage: str) -> argparse.ArgumentParser:
    """The ``--name value`` argument parser of a stage's script (every parameter the callable accepts)."""
    _, specs = STAGES[stage]
    parser = argparse.ArgumentParser(
        prog=f"expflow_flows/pde/scripts/{stage}.py",
        description=f"PDE workload {stage} (script form of expflow_flows.pde.trainables:{stage}).",
        epilog=(
            "Data parameters default to those the model was trained on."
            if stage == "evaluate"
            else "EXPFLOW_BUDGET_EPOCHS, when set, wins over --epochs."
        ),
    )
    for spec in specs:
        default = spec.default_text or spec.default
        parser.add_argument(
            f"--{spec.name}",
            dest=spec.name,
            default=argparse.SUPPRESS,
            help=f"{spec.help} ({spec.accepted()}; default: {default})",
        )
    return parser


def _stop_on_sigusr1() -> None:
    """The runner sends SIGUSR1 (and writes $EXPFLOW_STOP_FILE) when the job is about to
    end: the stage then sees ``run.stop_requested``, saves its checkpoint and stops,
    instead of being killed by the signal's default action."""

    def stop(signum: int, frame: Any) -> None:
        why = ""
        stop_file = os.environ.get("EXPFLOW_STOP_FILE")
        if stop_file:
            with contextlib.suppress(OSError, ValueError):
                why = Path(stop_file).read_text(encoding="utf-8").strip()
        why = why or "its job is about to end"
        request_checkpoint(why)

    if hasattr(signal, "SIGUSR1"):
        with contextlib.suppress(ValueError):  # not the main thread: no handler there
            signal.signal(signal.SIGUSR1, stop)


def script_main(stage: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of the script trainables: parse ``--name value`` args, run the stage, write metrics."""
    fn, _ = STAGES[stage]
    args = vars(build_parser(stage).parse_args(argv))

    def hook(step: int, values: dict[str, float]) -> bool:
        # The runner reads these lines; it stops the process itself when the pruner says so.
        print(
            f"EXPFLOW_METRIC step={step} " + " ".join(f"{k}={v:.6g}" for k, v in values.items()),
            flush=True,
        )
        return False

    _stop_on_sigusr1()
    try:
        upstream = os.environ.get("EXPFLOW_UPSTREAM_RUN_DIR")
        checkpoint = os.environ.get("EXPFLOW_CHECKPOINT_DIR")
        run = RunContext(
            run_dir=Path(os.environ.get("EXPFLOW_RUN_DIR") or Path.cwd()),
            budget=_env_budget(),
            upstream=Path(upstream) if upstream else None,
            hook=hook,
            checkpoint_dir=Path(checkpoint) if checkpoint else None,
        )
        metrics = fn(args, run)
    except ExpflowError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException:
        why = checkpoint_requested()
        if why is None:
            raise
        # run.report ended the run after its checkpoint was saved: not a crash.
        print(f"stopped to be resumed ({why})", file=sys.stderr, flush=True)
        return 3
    metrics_file = os.environ.get("EXPFLOW_METRICS_FILE")
    if metrics_file:
        Path(metrics_file).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    else:
        for name, value in metrics.items():
            print(f"EXPFLOW_METRIC {name}={value:.6g}", flush=True)
    return 0
