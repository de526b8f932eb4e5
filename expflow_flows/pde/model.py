"""A numpy baseline neural operator for 1D PDEBench data, trained autoregressively.

The model maps the last ``initial_step`` frames to the next one (PDEBench's FNO protocol):

    next = last + irfft( sum_j W[j, k] * rfft(frame_j)[k]  for k < modes )  +  MLP(last, S)

``W`` is a complex weight per history frame and kept Fourier mode (a one-channel FNO spectral
convolution); ``S`` is that spectral term. The optional pointwise MLP (``width`` hidden tanh
units) sees the last frame and ``S`` at each grid point, which lets it form local
nonlinear terms such as reactions or ``u * u_x`` (when ``S`` carries a derivative). Training is one-step teacher forcing with mean squared error plus an L2
penalty (``l2``), minimised by Adam with a cosine learning-rate decay; the weights of the epoch
with the best validation rollout nRMSE are kept, as PDEBench keeps its best checkpoint.
Gradients are written out by hand (no autodiff library).

Training can stop and go on exactly where it stopped: :func:`fit` hands a :class:`FitState`
(weights, Adam moments, shuffling RNG, best epoch, history) to ``save_state`` after the epochs
``save_when`` picks, and continues from one given as ``resume``. :func:`save_checkpoint` and
:func:`load_checkpoint` keep it in a folder as an npz and a JSON manifest, without pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expflow_flows import atomic
from expflow_flows.errors import ExpflowError

MODEL_FILE = "model.npz"
CONFIG_FILE = "model.json"
CHECKPOINT_FILE = (
    "checkpoint.json"  # the manifest: scalars, history, and which npz holds the arrays
)
CHECKPOINT_FORMAT = 1
_STATE_GROUPS = ("params", "best", "adam_m", "adam_v")
_PARAM_NAMES = ("w_re", "w_im", "a", "b", "v")
# Rollout values are clipped here so a diverging model yields a huge, finite error.
_CLIP = 1e6


@dataclass
class ModelConfig:
    """Hyperparameters of :class:`SpectralOperator1D` and its training."""

    modes: int = 16
    initial_step: int = 10
    width: int = 0
    lr: float = 0.01
    l2: float = 1e-6
    epochs: int = 25
    batch_size: int = 8
    seed: int = 0

    def check(self) -> None:
        """Raise an ExpflowError naming the first out-of-range hyperparameter."""
        rules: list[tuple[str, bool, str]] = [
            ("modes", self.modes >= 1, "an integer >= 1"),
            ("initial_step", self.initial_step >= 1, "an integer >= 1"),
            ("width", self.width >= 0, "an integer >= 0"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a number > 0"),
            ("l2", math.isfinite(self.l2) and self.l2 >= 0, "a number >= 0"),
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("seed", self.seed >= 0, "an integer >= 0"),
        ]
        for name, ok, accepted in rules:
            if not ok:
                raise ExpflowError(
                    f"{name}={getattr(self, name)!r} is out of range; expected {accepted}"
                )


@dataclass
class FitResult:
    """What :func:`fit` reports: per-epoch history and the best epoch."""

    best_epoch: int
    best_val_nrmse: float
    best_val_rmse: float
    train_loss: float
    epochs_run: int
    steps: int
    seconds: float
    stopped: str = ""
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitState:
    """Everything :func:`fit` needs to go on exactly after ``epoch``: the arrays of
    ``params``/``best``/``adam_m``/``adam_v``, Adam's step count, the shuffling RNG's state
    and the result so far (best epoch and value, history, seconds spent)."""

    epoch: int
    step: int
    params: dict[str, np.ndarray]
    best: dict[str, np.ndarray]
    adam_m: dict[str, np.ndarray]
    adam_v: dict[str, np.ndarray]
    adam_t: int
    rng_state: dict[str, Any]
    result: FitResult

    def check(self, model: SpectralOperator1D) -> None:
        """Raise an ExpflowError when an array does not fit ``model``'s weights."""
        for group in _STATE_GROUPS:
            arrays = getattr(self, group)
            for name, want in model.params.items():
                got = arrays.get(name)
                if got is None or got.shape != want.shape:
                    shape = None if got is None else got.shape
                    raise ExpflowError(
                        f"checkpoint array {group}/{name} has shape {shape}, expected {want.shape}"
                    )


class SpectralOperator1D:
    """The baseline model: learned Fourier-mode operator plus an optional pointwise MLP."""

    def __init__(self, config: ModelConfig, nx: int):
        config.check()
        self.config = config
        self.nx = int(nx)
        self.n_freq = self.nx // 2 + 1
        self.m = min(config.modes, self.n_freq)
        s, w = config.initial_step, config.width
        rng = np.random.default_rng(config.seed)
        # Zero spectral weights start the model at persistence (next frame = last frame).
        self.params: dict[str, np.ndarray] = {
            "w_re": np.zeros((s, self.m)),
            "w_im": np.zeros((s, self.m)),
            "a": rng.normal(0.0, 1.0 / math.sqrt(2.0), size=(2, w)),
            "b": np.zeros(w),
            "v": np.zeros(w),
        }
        # irfft counts every mode twice except the mean and (for even nx) the Nyquist mode.
        weight = np.full(self.m, 2.0)
        weight[0] = 1.0
        if self.nx % 2 == 0 and self.m == self.n_freq:
            weight[-1] = 1.0
        self._grad_scale = weight / self.nx

    @property
    def n_params(self) -> int:
        """Number of trainable real numbers."""
        return int(sum(p.size for p in self.params.values()))

    def _spectral(self, hist_hat: np.ndarray) -> np.ndarray:
        w = self.params["w_re"] + 1j * self.params["w_im"]
        z = np.einsum("bsm,sm->bm", hist_hat, w)
        full = np.zeros((z.shape[0], self.n_freq), dtype=complex)
        full[:, : self.m] = z
        return np.fft.irfft(full, n=self.nx, axis=-1)

    def forward(
        self, hist: np.ndarray, hist_hat: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Next frame [B, nx] from history [B, s, nx] and its truncated rfft [B, s, m]."""
        spectral = self._spectral(hist_hat)
        out = hist[:, -1, :] + spectral
        cache: dict[str, np.ndarray] = {"spectral": spectral}
        if self.config.width:
            feats = np.stack([hist[:, -1, :], spectral], axis=-1)
            hidden = np.tanh(feats @ self.params["a"] + self.params["b"])
            out = out + hidden @ self.params["v"]
            cache.update(feats=feats, hidden=hidden)
        return out, cache

    def loss_and_grads(
        self, hist: np.ndarray, hist_hat: np.ndarray, target: np.ndarray
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean squared one-step error plus the L2 penalty, and its gradients."""
        pred, cache = self.forward(hist, hist_hat)
        resid = pred - target
        mse = float(np.mean(resid**2))
        g = 2.0 * resid / resid.size  # dL/dpred
        grads: dict[str, np.ndarray] = {}
        d_spectral = g
        if self.config.width:
            # Flatten batch and grid so the products run as BLAS matrix multiplies.
            width = self.config.width
            hidden = cache["hidden"].reshape(-1, width)
            feats = cache["feats"].reshape(-1, 2)
            g_flat = g.reshape(-1)
            grads["v"] = g_flat @ hidden
            d_pre = (g_flat[:, None] * self.params["v"]) * (1.0 - hidden**2)
            grads["a"] = feats.T @ d_pre
            grads["b"] = d_pre.sum(axis=0)
            d_spectral = g + (d_pre @ self.params["a"][-1]).reshape(g.shape)
        else:
            for name in ("a", "b", "v"):
                grads[name] = np.zeros_like(self.params[name])
        g_hat = np.fft.rfft(d_spectral, axis=-1)[:, : self.m] * self._grad_scale
        d_w = np.einsum("bm,bsm->sm", g_hat, np.conj(hist_hat))
        grads["w_re"], grads["w_im"] = d_w.real, d_w.imag
        penalty = 0.0
        if self.config.l2:
            for name in ("w_re", "w_im", "a", "v"):
                p = self.params[name]
                penalty += float(np.sum(p**2))
                grads[name] = grads[name] + 2.0 * self.config.l2 * p
        return mse + self.config.l2 * penalty, grads

    def rollout(self, u: np.ndarray, n_frames: int | None = None) -> np.ndarray:
        """Autoregressive prediction [B, nx, n_frames]: the first ``initial_step`` frames of ``u`` [B, nx, t] are given."""
        s = self.config.initial_step
        u = np.asarray(u, dtype=np.float64)
        if u.ndim != 3 or u.shape[1] != self.nx:
            raise ExpflowError(f"rollout input has shape {u.shape}; expected [batch, {self.nx}, t]")
        if u.shape[2] < s:
            raise ExpflowError(
                f"rollout needs initial_step={s} given frames; the input has {u.shape[2]}"
            )
        n_frames = u.shape[2] if n_frames is None else int(n_frames)
        frames = [u[:, :, i] for i in range(s)]
        hats = [np.fft.rfft(f, axis=-1)[:, : self.m] for f in frames]
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            for _ in range(s, n_frames):
                hist = np.stack(frames[-s:], axis=1)
                hist_hat = np.stack(hats[-s:], axis=1)
                nxt, _ = self.forward(hist, hist_hat)
                nxt = np.clip(np.nan_to_num(nxt, nan=_CLIP), -_CLIP, _CLIP)
                frames.append(nxt)
                hats.append(np.fft.rfft(nxt, axis=-1)[:, : self.m])
        return np.stack(frames[:n_frames], axis=-1)

    def save(self, folder: Path | str, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model.npz`` (weights, config embedded) and ``model.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"config": asdict(self.config), "nx": self.nx, "modes_used": self.m, **(extra or {})}
        text = json.dumps(meta, indent=2, sort_keys=True, default=str)
        path = folder / MODEL_FILE
        with atomic.replacing(path, suffix=".npz") as tmp:
            np.savez(tmp, config_json=np.array(text), **self.params)
        atomic.write_text(folder / CONFIG_FILE, text + "\n")
        return path

    @classmethod
    def load(cls, path: Path | str) -> tuple[SpectralOperator1D, dict[str, Any]]:
        """Load a model saved by :meth:`save` (``path`` is the npz or its folder); returns (model, meta)."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.exists():
            raise ExpflowError(
                f"model file {str(path)!r} does not exist; expected a {MODEL_FILE} saved by train"
            )
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["config_json"]))
                arrays = {k: np.asarray(z[k]) for k in ("w_re", "w_im", "a", "b", "v")}
        except (OSError, ValueError, KeyError) as exc:
            raise ExpflowError(
                f"model file {str(path)!r} is not a model saved by train ({exc})"
            ) from None
        known = set(ModelConfig.__dataclass_fields__)
        model = cls(
            ModelConfig(**{k: v for k, v in meta["config"].items() if k in known}), meta["nx"]
        )
        for name, value in arrays.items():
            if value.shape != model.params[name].shape:
                raise ExpflowError(
                    f"model file {str(path)!r}: weight {name!r} has shape {value.shape}, "
                    f"expected {model.params[name].shape}"
                )
            model.params[name] = value.astype(np.float64)
        return model, meta


class _Adam:
    def __init__(self, params: dict[str, np.ndarray], beta1: float = 0.9, beta2: float = 0.999):
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.beta1, self.beta2, self.t = beta1, beta2, 0

    def restore(self, m: dict[str, np.ndarray], v: dict[str, np.ndarray], t: int) -> None:
        self.m = {k: np.array(a, dtype=np.float64) for k, a in m.items()}
        self.v = {k: np.array(a, dtype=np.float64) for k, a in v.items()}
        self.t = int(t)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        c1 = 1.0 - self.beta1**self.t
        c2 = 1.0 - self.beta2**self.t
        for k, g in grads.items():
            self.m[k] = self.beta1 * self.m[k] + (1.0 - self.beta1) * g
            self.v[k] = self.beta2 * self.v[k] + (1.0 - self.beta2) * g * g
            params[k] -= lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + 1e-8)


class _Windows:
    """(history, next frame) training pairs of trajectories [N, nx, nt], gathered per batch.

    Pairs are not materialised up front: a real PDEBench file would need gigabytes for them.
    """

    def __init__(self, u: np.ndarray, s: int, m: int):
        self.s = s
        self.frames = np.ascontiguousarray(np.asarray(u, dtype=np.float32).transpose(0, 2, 1))
        n, nt, _ = self.frames.shape
        # Spectra of every frame once; chunked so the full rfft never sits in memory at once.
        self.frames_hat = np.empty((n, nt, m), dtype=complex)
        for i in range(0, n, 256):
            chunk = self.frames[i : i + 256].astype(np.float64)
            self.frames_hat[i : i + 256] = np.fft.rfft(chunk, axis=-1)[..., :m]
        self.per_traj = nt - s
        self.count = n * self.per_traj

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """History [B, s, nx], its spectra [B, s, m] and the next frame [B, nx] for pair ids ``idx``."""
        traj, start = np.divmod(idx, self.per_traj)
        times = start[:, None] + np.arange(self.s)
        hist = self.frames[traj[:, None], times].astype(np.float64)
        target = self.frames[traj, start + self.s].astype(np.float64)
        return hist, self.frames_hat[traj[:, None], times], target


def rollout_nrmse(model: SpectralOperator1D, u: np.ndarray) -> tuple[float, float]:
    """(nRMSE, RMSE) of a full autoregressive rollout on ``u`` [N, nx, nt], scored as PDEBench
    scores it: the ``initial_step`` given frames are not counted."""
    from expflow_flows.pde.metrics import compute_metrics

    pred = model.rollout(u)
    m = compute_metrics(pred[..., None], u[..., None], initial_step=model.config.initial_step)
    return m["nrmse"], m["rmse"]


def fit(
    u_train: np.ndarray,
    u_val: np.ndarray,
    config: ModelConfig,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    max_seconds: float | None = None,
    max_steps: int | None = None,
    log: Callable[[str], None] | None = None,
    resume: FitState | None = None,
    save_state: Callable[[FitState], None] | None = None,
    save_when: Callable[[int], bool] | None = None,
) -> tuple[SpectralOperator1D, FitResult]:
    """Train on trajectories ``u_train`` [N, nx, nt]; validate by rollout nRMSE on ``u_val``.

    ``on_epoch(epoch, values)`` is called after each epoch (1-based) with ``train_loss``,
    ``val_nrmse`` and ``val_rmse``; an exception it raises (e.g. a pruning signal) propagates.
    Before it, ``save_state`` gets the :class:`FitState` of the epochs ``save_when(epoch)``
    picks; ``resume`` (such a state, made with the same data and config) goes on after its
    epoch, and the result is the same as an uninterrupted run's. ``config.epochs``,
    ``max_steps`` and ``max_seconds`` count the resumed epochs, steps and seconds too.
    """
    config.check()
    u_train = np.asarray(u_train)
    u_val = np.asarray(u_val, dtype=np.float64)
    if u_train.ndim != 3 or u_train.shape[0] < 1:
        raise ExpflowError(f"training data has shape {u_train.shape}; expected [samples, x, t]")
    if u_val.ndim != 3 or u_val.shape[0] < 1 or u_val.shape[1:] != u_train.shape[1:]:
        raise ExpflowError(
            f"validation data has shape {u_val.shape}; expected [samples>=1, {u_train.shape[1]}, {u_train.shape[2]}]"
        )
    nx, nt = u_train.shape[1], u_train.shape[2]
    s = config.initial_step
    if s >= nt:
        raise ExpflowError(
            f"initial_step={s} is out of range for {nt} time frames; expected 1 <= initial_step <= {nt - 1}"
        )
    model = SpectralOperator1D(config, nx)
    windows = _Windows(u_train, s, model.m)
    n_windows = windows.count
    batch = min(n_windows, config.batch_size * windows.per_traj)
    steps_per_epoch = math.ceil(n_windows / batch)
    total_steps = steps_per_epoch * config.epochs
    if max_steps is not None:
        total_steps = min(total_steps, int(max_steps))
    rng = np.random.default_rng(config.seed + 1)
    adam = _Adam(model.params)
    best = {k: v.copy() for k, v in model.params.items()}
    result = FitResult(0, math.inf, math.inf, math.nan, 0, 0, 0.0)
    step, first = 0, 1
    if resume is not None:
        resume.check(model)
        model.params = {k: np.array(v, dtype=np.float64) for k, v in resume.params.items()}
        best = {k: np.array(v, dtype=np.float64) for k, v in resume.best.items()}
        adam.restore(resume.adam_m, resume.adam_v, resume.adam_t)
        try:
            rng.bit_generator.state = resume.rng_state
        except (TypeError, ValueError, KeyError) as exc:
            raise ExpflowError(f"checkpoint RNG state is not usable ({exc})") from None
        result = FitResult(**{**asdict(resume.result), "stopped": ""})
        step, first = resume.step, resume.epoch + 1
    spent = result.seconds  # seconds of earlier attempts count against max_seconds
    start = time.perf_counter()

    def snapshot(epoch: int) -> FitState:
        result.seconds = spent + time.perf_counter() - start
        return FitState(
            epoch=epoch,
            step=step,
            params={k: v.copy() for k, v in model.params.items()},
            best={k: v.copy() for k, v in best.items()},
            adam_m={k: v.copy() for k, v in adam.m.items()},
            adam_v={k: v.copy() for k, v in adam.v.items()},
            adam_t=adam.t,
            rng_state=rng.bit_generator.state,
            result=FitResult(**{**asdict(result), "history": list(result.history)}),
        )

    for epoch in range(first, config.epochs + 1):
        # Checked before an epoch rather than after it, so a resumed run stops where the
        # uninterrupted one did.
        if step >= total_steps:
            result.stopped = f"step budget of {total_steps} optimizer steps reached"
            break
        if max_seconds is not None and spent + time.perf_counter() - start > max_seconds:
            result.stopped = f"time budget of {max_seconds:g} s reached"
            break
        order = rng.permutation(n_windows)
        losses = []
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            for i in range(0, n_windows, batch):
                if step >= total_steps:
                    break
                idx = order[i : i + batch]
                loss, grads = model.loss_and_grads(*windows.batch(idx))
                # Cosine decay to 1% of lr: large early steps, fine convergence at the end.
                lr = config.lr * (
                    0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                )
                adam.step(model.params, grads, lr)
                losses.append(loss)
                step += 1
        train_loss = float(np.mean(losses)) if losses else math.nan
        if not all(np.all(np.isfinite(p)) for p in model.params.values()):
            result.stopped = (
                f"weights became non-finite at epoch {epoch} (lr={config.lr:g} too large?)"
            )
            break
        val_nrmse, val_rmse = rollout_nrmse(model, u_val)
        if not math.isfinite(val_nrmse):
            val_nrmse = val_rmse = _CLIP
        values = {"train_loss": train_loss, "val_nrmse": val_nrmse, "val_rmse": val_rmse}
        result.history.append({"epoch": epoch, **values})
        result.epochs_run, result.steps, result.train_loss = epoch, step, train_loss
        if val_nrmse < result.best_val_nrmse:
            result.best_epoch, result.best_val_nrmse, result.best_val_rmse = (
                epoch,
                val_nrmse,
                val_rmse,
            )
            best = {k: v.copy() for k, v in model.params.items()}
        if log is not None:
            log(
                f"epoch {epoch}/{config.epochs} train_loss={train_loss:.3e} "
                f"val_nrmse={val_nrmse:.4f} val_rmse={val_rmse:.4f}"
            )
        if save_state is not None and save_when is not None and save_when(epoch):
            save_state(snapshot(epoch))
        if on_epoch is not None:
            on_epoch(epoch, values)
    result.seconds = spent + time.perf_counter() - start
    if result.best_epoch == 0:
        raise ExpflowError(
            f"training diverged before the first validation ({result.stopped or 'no epoch finished'}); "
            f"try a smaller lr than {config.lr:g}"
        )
    model.params = best
    return model, result


def _checkpoint_arrays(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-e*.npz"))


def save_checkpoint(folder: Path | str, state: FitState, made_with: dict[str, Any]) -> Path:
    """Write ``state`` into ``folder``: arrays to ``checkpoint-e<epoch>.npz``, the rest and
    ``made_with`` (the settings it belongs to) to ``checkpoint.json``; returns the manifest.

    Each file is written atomically and the manifest last, naming its npz: a kill at any
    moment leaves the previous checkpoint or the new one, whole.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"{group}__{name}": np.asarray(value, dtype=np.float64)
        for group in _STATE_GROUPS
        for name, value in getattr(state, group).items()
    }
    npz = folder / f"checkpoint-e{state.epoch:06d}.npz"
    with atomic.replacing(npz, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "arrays": npz.name,
        "arrays_sha256": hashlib.sha256(npz.read_bytes()).hexdigest(),
        "epoch": state.epoch,
        "step": state.step,
        "adam_t": state.adam_t,
        "rng_state": state.rng_state,
        "result": asdict(state.result),
        "made_with": made_with,
    }
    # Python's json writes floats so they read back bit for bit (and inf/nan as Infinity/NaN).
    path = atomic.write_json(folder / CHECKPOINT_FILE, manifest, default=None)
    # The previous arrays, and temporary files of a save that was killed mid-write.
    stale = [old for old in _checkpoint_arrays(folder) if old != npz]
    stale += folder.glob(".checkpoint*.tmp*")
    for old in stale:
        with contextlib.suppress(OSError):
            old.unlink()
    return path


def load_checkpoint(folder: Path | str) -> tuple[FitState, dict[str, Any]] | None:
    """The (state, made_with) saved by :func:`save_checkpoint` in ``folder``; None when there
    is none; an ExpflowError naming the problem when it is damaged (no pickle is read)."""
    folder = Path(folder)
    path = folder / CHECKPOINT_FILE
    if not path.exists():
        if _checkpoint_arrays(folder):
            raise ExpflowError(f"{CHECKPOINT_FILE} is missing beside the checkpoint arrays")
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != CHECKPOINT_FORMAT:
            raise ExpflowError(
                f"{CHECKPOINT_FILE} has format {manifest.get('format')!r}, "
                f"expected {CHECKPOINT_FORMAT}"
            )
        npz = folder / Path(str(manifest["arrays"])).name
        data = npz.read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["arrays_sha256"]:
            raise ExpflowError(f"{npz.name} does not match the checksum in {CHECKPOINT_FILE}")
        with np.load(npz, allow_pickle=False) as z:
            groups = {
                group: {
                    name: np.asarray(z[f"{group}__{name}"], dtype=np.float64)
                    for name in _PARAM_NAMES
                }
                for group in _STATE_GROUPS
            }
        fields = set(FitResult.__dataclass_fields__)
        result = FitResult(**{k: v for k, v in manifest["result"].items() if k in fields})
        state = FitState(
            epoch=int(manifest["epoch"]),
            step=int(manifest["step"]),
            adam_t=int(manifest["adam_t"]),
            rng_state=dict(manifest["rng_state"]),
            result=result,
            **groups,
        )
        made_with = dict(manifest["made_with"])
    except ExpflowError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise ExpflowError(f"{type(exc).__name__}: {exc}") from None
    if state.epoch < 1 or len(result.history) != state.epoch:
        raise ExpflowError(
            f"{CHECKPOINT_FILE} says epoch {state.epoch} but holds {len(result.history)} epochs"
        )
    return state, made_with
