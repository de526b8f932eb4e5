"""PDEBench's evaluation metrics in numpy, as ``metric_func`` in ``pdebench/models/metrics.py`` computes them.

Arrays use PDEBench's layout ``[batch, x..., t, channels]`` (1D: ``[b, x, t, c]``, 2D:
``[b, x, y, t, c]``, 3D: ``[b, x, y, z, t, c]``).

:func:`compute_metrics` first drops the first ``initial_step`` time frames of both the
prediction and the target: those frames are the given history of an autoregressive rollout,
not predictions, and PDEBench scores only the frames after them. Then, per channel and
remaining time step:

* ``rmse``: RMS over space of the error, then the mean over the batch.
* ``nrmse``: per sample, RMS error over space divided by the RMS of the target over space,
  then the mean over the batch.
* ``crmse`` (conserved quantity): ``sqrt(mean_batch((sum_space pred - sum_space target)^2))``
  divided by the number of grid points.
* ``max_err``: largest absolute error over space and batch.
* ``brmse`` (boundary): per sample, RMS of the error over the boundary points (1D: first and
  last point; 2D: the four edges; 3D: the six faces), then the mean over the batch. In 3D,
  PDEBench sums the squared boundary errors of all channels before the square root, so a 3D
  ``brmse`` is one value per time step, not one per channel; this module does the same.
* ``fourier_low/mid/high``: ``sqrt(mean_batch(|FFT(pred - target)|^2)) / N * L`` per spatial
  wave number (1D: ``rfft``; 2D/3D: power summed into integer shells ``floor(|k|)`` over the
  non-negative quadrant/octant, as PDEBench does), then the mean over wave numbers
  ``[0, i_low)``, ``[i_low, i_high)`` and ``[i_high, ...)`` (PDEBench: ``iLow=4, iHigh=12``).

Each returned number is then the mean over channels and time steps, which is what
``metric_func(..., if_mean=True)`` returns. PDEBench's ``metrics()`` loop adds up those
numbers over data-loader batches; here the whole array is one batch.

Scores before version 0.2.0 kept the ``initial_step`` given frames (with zero error) in the time
mean, which made rmse, nrmse and max_err smaller by the factor ``(nt - initial_step) / nt``
(0.76 for a 41-frame rollout with ``initial_step=10``); they are not comparable with PDEBench's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from expflow_flows import atomic
from expflow_flows.errors import ExpflowError

METRIC_KEYS = (
    "rmse",
    "nrmse",
    "crmse",
    "max_err",
    "brmse",
    "fourier_low",
    "fourier_mid",
    "fourier_high",
)
LAYOUTS = {
    4: "[batch, x, t, channel]",
    5: "[batch, x, y, t, channel]",
    6: "[batch, x, y, z, t, channel]",
}


def _check(pred: np.ndarray, target: np.ndarray) -> None:
    if target.ndim not in LAYOUTS:
        raise ExpflowError(
            f"target has {target.ndim} axes (shape {target.shape}); expected PDEBench's layout "
            f"{' or '.join(LAYOUTS.values())}"
        )
    if pred.shape != target.shape:
        raise ExpflowError(f"pred shape {pred.shape} differs from target shape {target.shape}")


def _shell_power(power: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Sum |FFT|^2 over the non-negative wave-number box into shells floor(|k|) (2D/3D)."""
    n_shells = min(n // 2 for n in sizes)
    box = power[(slice(None), slice(None), *(slice(0, n // 2) for n in sizes))]
    grids = np.meshgrid(*(np.arange(n // 2) for n in sizes), indexing="ij")
    shell = np.floor(np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))).astype(int)
    keep = shell < n_shells
    nb, nc, nt = power.shape[0], power.shape[1], power.shape[-1]
    flat = box.reshape(nb, nc, -1, nt)[:, :, keep.ravel(), :]
    out = np.zeros((nb, nc, n_shells, nt))
    np.add.at(out, (slice(None), slice(None), shell.ravel()[keep.ravel()]), flat)
    return out


def metric_arrays(
    pred: np.ndarray,
    target: np.ndarray,
    *,
    Lx: float = 1.0,
    Ly: float = 1.0,
    Lz: float = 1.0,
    i_low: int = 4,
    i_high: int = 12,
) -> dict[str, np.ndarray]:
    """The metrics before averaging, on every frame given: each ``[channels, t]``; Fourier bands
    ``[channels, 3, t]``; a 3D ``brmse`` is ``[1, t]`` (channels summed, as PDEBench does)."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    _check(pred, target)
    ndim_space = target.ndim - 3
    # [b, x..., t, c] -> [b, c, x..., t], the order metric_func works in
    order = (0, target.ndim - 1, *range(1, target.ndim - 1))
    p = pred.transpose(order)
    q = target.transpose(order)
    nb, nc, nt = q.shape[0], q.shape[1], q.shape[-1]
    sizes = q.shape[2:-1]
    n_points = int(np.prod(sizes))
    err = p - q
    err_flat = err.reshape(nb, nc, -1, nt)

    rms_err = np.sqrt(np.mean(err_flat**2, axis=2))  # [b, c, t]
    rms_target = np.sqrt(np.mean(q.reshape(nb, nc, -1, nt) ** 2, axis=2))
    with np.errstate(divide="ignore", invalid="ignore"):
        nrmse = np.mean(rms_err / rms_target, axis=0)
    rmse = np.mean(rms_err, axis=0)
    crmse = np.sqrt(np.mean(np.sum(err_flat, axis=2) ** 2, axis=0)) / n_points
    max_err = np.max(np.abs(err_flat), axis=(0, 2))

    if ndim_space == 1:
        edge = (err[:, :, 0, :] ** 2 + err[:, :, -1, :] ** 2) / 2.0
    elif ndim_space == 2:
        nx, ny = sizes
        edge = (
            np.sum(err[:, :, 0, :, :] ** 2 + err[:, :, -1, :, :] ** 2, axis=2)
            + np.sum(err[:, :, :, 0, :] ** 2 + err[:, :, :, -1, :] ** 2, axis=2)
        ) / (2 * nx + 2 * ny)
    else:
        nx, ny, nz = sizes
        # channels are summed here as well (axis 1), leaving one value per sample and time
        edge = (
            np.sum(err[:, :, 0] ** 2 + err[:, :, -1] ** 2, axis=(1, 2, 3))
            + np.sum(err[:, :, :, 0] ** 2 + err[:, :, :, -1] ** 2, axis=(1, 2, 3))
            + np.sum(err[:, :, :, :, 0] ** 2 + err[:, :, :, :, -1] ** 2, axis=(1, 2, 3))
        ) / (2 * nx * ny + 2 * ny * nz + 2 * nz * nx)
        edge = edge[:, None, :]  # [b, 1, t]
    brmse = np.mean(np.sqrt(edge), axis=0)

    lengths = (Lx, Ly, Lz)[:ndim_space]
    if ndim_space == 1:
        spec = np.abs(np.fft.rfft(err, axis=2)) ** 2  # [b, c, k, t]
    else:
        spec = _shell_power(
            np.abs(np.fft.fftn(err, axes=tuple(range(2, 2 + ndim_space)))) ** 2, sizes
        )
    err_k = np.sqrt(np.mean(spec, axis=0)) / n_points * float(np.prod(lengths))  # [c, k, t]
    with np.errstate(invalid="ignore"):
        bands = np.stack(
            [
                _band_mean(err_k[:, :i_low]),
                _band_mean(err_k[:, i_low:i_high]),
                _band_mean(err_k[:, i_high:]),
            ],
            axis=1,
        )
    return {
        "rmse": rmse,
        "nrmse": nrmse,
        "crmse": crmse,
        "max_err": max_err,
        "brmse": brmse,
        "fourier": bands,
    }


def _band_mean(band: np.ndarray) -> np.ndarray:
    # An empty band (grid too coarse) is NaN, as torch.mean of an empty slice is.
    if band.shape[1] == 0:
        return np.full((band.shape[0], band.shape[2]), np.nan)
    return np.mean(band, axis=1)


def compute_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    *,
    initial_step: int,
    Lx: float = 1.0,
    Ly: float = 1.0,
    Lz: float = 1.0,
    i_low: int = 4,
    i_high: int = 12,
) -> dict[str, float]:
    """PDEBench's 8 metrics as floats, each the mean over channels and scored time steps.

    The first ``initial_step`` frames (the rollout's given history) are not scored, as in
    ``metric_func``. ``pred`` is either the full rollout (the same shape as ``target``, the
    given frames included) or only the predicted frames (``initial_step`` fewer time steps).
    ``initial_step=0`` scores every frame.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if target.ndim not in LAYOUTS:
        _check(pred, target)
    if isinstance(initial_step, bool) or not isinstance(initial_step, (int, np.integer)):
        raise ExpflowError(f"initial_step={initial_step!r} is not valid; expected an integer >= 0")
    t_axis = target.ndim - 2
    nt = target.shape[t_axis]
    if not 0 <= initial_step < nt:
        raise ExpflowError(
            f"initial_step={initial_step!r} is out of range for {nt} time frames; "
            f"expected 0 <= initial_step <= {nt - 1}"
        )
    scored = slice(initial_step, None)
    target_scored = target[(Ellipsis, scored, slice(None))]
    if pred.ndim == target.ndim and pred.shape[t_axis] == nt - initial_step and initial_step:
        pred_scored = pred  # only the predicted frames were given
    else:
        _check(pred, target)
        pred_scored = pred[(Ellipsis, scored, slice(None))]
    arrays = metric_arrays(
        pred_scored, target_scored, Lx=Lx, Ly=Ly, Lz=Lz, i_low=i_low, i_high=i_high
    )
    out = {k: float(np.mean(arrays[k])) for k in ("rmse", "nrmse", "crmse", "max_err", "brmse")}
    bands = np.mean(arrays["fourier"], axis=(0, 2))
    out["fourier_low"], out["fourier_mid"], out["fourier_high"] = (float(b) for b in bands)
    return out


def write_predictions(
    path: Path | str,
    pred: np.ndarray,
    target: np.ndarray | None = None,
    *,
    x: np.ndarray | None = None,
    t: np.ndarray | None = None,
    initial_step: int | None = None,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write ``pred`` (and ``target``) in PDEBench's layout to an HDF5 file, atomically; returns the path."""
    path = Path(path)
    pred = np.asarray(pred, dtype=np.float32)
    if pred.ndim not in LAYOUTS:
        raise ExpflowError(
            f"pred has shape {pred.shape}; expected PDEBench's layout {' or '.join(LAYOUTS.values())}"
        )
    if target is not None:
        target = np.asarray(target, dtype=np.float32)
        if target.shape != pred.shape:
            raise ExpflowError(f"target shape {target.shape} differs from pred shape {pred.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("pred", data=pred)
        if target is not None:
            f.create_dataset("target", data=target)
        if x is not None:
            f.create_dataset("x-coordinate", data=np.asarray(x, dtype=np.float32))
        if t is not None:
            f.create_dataset("t-coordinate", data=np.asarray(t, dtype=np.float32))
        f.attrs["layout"] = LAYOUTS[pred.ndim]
        f.attrs["source"] = "PDEBench metric_func layout (batch, x..., t, channels)"
        if initial_step is not None:
            f.attrs["initial_step"] = int(initial_step)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path
