"""PDEBench metrics (expflow_flows.pde.metrics) against hand-computed cases and a loop-by-loop
reference written from PDEBench's definitions (``metric_func`` in ``pdebench/models/metrics.py``):
the first ``initial_step`` frames are dropped, then every metric is taken per channel and time
step and averaged over both."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.pde.metrics import METRIC_KEYS, compute_metrics, metric_arrays, write_predictions


def _target(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) + 2.0  # away from 0 so nRMSE is well defined


def _shell_sum(power: np.ndarray) -> np.ndarray:
    """Sum |FFT|^2 [x, y(, z)] of the non-negative wave numbers into shells floor(|k|)."""
    sizes = power.shape
    n_shells = min(n // 2 for n in sizes)
    out = np.zeros(n_shells)
    for k in np.ndindex(*(n // 2 for n in sizes)):
        shell = math.floor(math.sqrt(sum(i * i for i in k)))
        if shell < n_shells:
            out[shell] += power[k]
    return out


def _reference(
    pred: np.ndarray, target: np.ndarray, initial_step: int, i_low: int = 4, i_high: int = 12
) -> dict:
    """PDEBench's definitions, one sample, channel and time step at a time, for 1D/2D/3D arrays."""
    pred = pred[..., initial_step:, :]
    target = target[..., initial_step:, :]
    nb, nt, nc = target.shape[0], target.shape[-2], target.shape[-1]
    sizes = target.shape[1:-2]
    n_points = int(np.prod(sizes))
    acc: dict[str, list[float]] = {k: [] for k in METRIC_KEYS}
    three_d_edges: list[list[float]] = [[0.0] * nt for _ in range(nb)]
    for c in range(nc):
        for t in range(nt):
            e = [pred[b, ..., t, c] - target[b, ..., t, c] for b in range(nb)]  # each [x...]
            rms = [math.sqrt(np.mean(e[b] ** 2)) for b in range(nb)]
            norm = [math.sqrt(np.mean(target[b, ..., t, c] ** 2)) for b in range(nb)]
            acc["rmse"].append(np.mean(rms))
            acc["nrmse"].append(np.mean([r / n for r, n in zip(rms, norm, strict=True)]))
            acc["crmse"].append(math.sqrt(np.mean([eb.sum() ** 2 for eb in e])) / n_points)
            acc["max_err"].append(max(np.max(np.abs(eb)) for eb in e))
            if len(sizes) == 1:
                edges = [(eb[0] ** 2 + eb[-1] ** 2) / 2 for eb in e]
                acc["brmse"].append(np.mean([math.sqrt(v) for v in edges]))
                spec = np.array([np.abs(np.fft.rfft(eb)) ** 2 for eb in e])
            elif len(sizes) == 2:
                nx, ny = sizes
                edges = [
                    (
                        np.sum(eb[0, :] ** 2 + eb[-1, :] ** 2)
                        + np.sum(eb[:, 0] ** 2 + eb[:, -1] ** 2)
                    )
                    / (2 * nx + 2 * ny)
                    for eb in e
                ]
                acc["brmse"].append(np.mean([math.sqrt(v) for v in edges]))
                spec = np.array([_shell_sum(np.abs(np.fft.fftn(eb)) ** 2) for eb in e])
            else:
                nx, ny, nz = sizes
                for b, eb in enumerate(e):  # PDEBench adds the channels before the square root
                    three_d_edges[b][t] += (
                        np.sum(eb[0] ** 2 + eb[-1] ** 2)
                        + np.sum(eb[:, 0] ** 2 + eb[:, -1] ** 2)
                        + np.sum(eb[:, :, 0] ** 2 + eb[:, :, -1] ** 2)
                    ) / (2 * nx * ny + 2 * ny * nz + 2 * nz * nx)
                spec = np.array([_shell_sum(np.abs(np.fft.fftn(eb)) ** 2) for eb in e])
            per_k = np.sqrt(spec.mean(axis=0)) / n_points
            for band, part in (
                ("low", per_k[:i_low]),
                ("mid", per_k[i_low:i_high]),
                ("high", per_k[i_high:]),
            ):
                acc[f"fourier_{band}"].append(part.mean() if len(part) else np.nan)
    if len(sizes) == 3:
        acc["brmse"] = [math.sqrt(v) for row in three_d_edges for v in row]
    return {k: float(np.mean(v)) for k, v in acc.items()}


def test_zero_error_gives_zeros() -> None:
    target = _target((3, 32, 5, 1))
    m = compute_metrics(target.copy(), target, initial_step=0)
    assert set(m) == set(METRIC_KEYS)
    assert all(v == 0.0 for v in m.values())


def test_constant_offset_1d() -> None:
    c = 0.3
    target = _target((4, 32, 6, 1))
    m = compute_metrics(target + c, target, initial_step=0)
    assert m["rmse"] == pytest.approx(c)
    assert m["max_err"] == pytest.approx(c)
    assert m["crmse"] == pytest.approx(c)  # sum over x of c, divided by nx
    assert m["brmse"] == pytest.approx(c)
    norms = np.sqrt(np.mean(target[..., 0] ** 2, axis=1))  # [b, t]
    assert m["nrmse"] == pytest.approx(float(np.mean(c / norms)))
    # A constant is wave number 0: |FFT| = nx*c there, so err_F[0] = c; the low band averages 4 bins.
    assert m["fourier_low"] == pytest.approx(c / 4)
    assert m["fourier_mid"] == pytest.approx(0.0, abs=1e-12)
    assert m["fourier_high"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("mode", "band", "n_bins"),
    [(2, "fourier_low", 4), (6, "fourier_mid", 8), (20, "fourier_high", 33 - 12)],
)
def test_single_mode_error_lands_in_its_band(mode: int, band: str, n_bins: int) -> None:
    nx, a = 64, 0.5
    x = np.arange(nx) / nx
    target = _target((2, nx, 3, 1))
    err = a * np.cos(2 * np.pi * mode * x)
    pred = target + err[None, :, None, None]
    m = compute_metrics(pred, target, initial_step=0)
    # |rfft| of a*cos at its wave number is a*nx/2, so err_F there is a/2 (Lx=1).
    assert m[band] == pytest.approx(a / 2 / n_bins)
    for other in {"fourier_low", "fourier_mid", "fourier_high"} - {band}:
        assert m[other] == pytest.approx(0.0, abs=1e-12)
    assert m["rmse"] == pytest.approx(a / math.sqrt(2))
    assert compute_metrics(pred, target, Lx=2.0, initial_step=0)[band] == pytest.approx(a / n_bins)


def test_boundary_error_only() -> None:
    d, nx = 0.8, 16
    target = _target((3, nx, 4, 1))
    pred = target.copy()
    pred[:, 0, :, :] += d
    m = compute_metrics(pred, target, initial_step=0)
    assert m["brmse"] == pytest.approx(d / math.sqrt(2))
    assert m["rmse"] == pytest.approx(d / math.sqrt(nx))
    assert m["max_err"] == pytest.approx(d)
    assert m["crmse"] == pytest.approx(d / nx)


def test_conserved_quantity_for_known_sums() -> None:
    nx = 10
    target = _target((2, nx, 1, 1))
    pred = target.copy()
    pred[0, 3, 0, 0] += 2.0  # sample 0: sum off by 2
    pred[1, 5, 0, 0] -= 4.0  # sample 1: sum off by -4
    m = compute_metrics(pred, target, initial_step=0)
    assert m["crmse"] == pytest.approx(math.sqrt((2.0**2 + 4.0**2) / 2) / nx)


def test_max_error_is_averaged_over_time() -> None:
    target = _target((2, 8, 5, 1))
    pred = target.copy()
    pred[1, 4, 2, 0] += 5.0  # one spike at one time step
    assert compute_metrics(pred, target, initial_step=0)["max_err"] == pytest.approx(5.0 / 5)


def test_channels_are_averaged() -> None:
    target = _target((2, 16, 3, 2))
    pred = target.copy()
    pred[..., 0] += 1.0
    pred[..., 1] += 3.0
    m = compute_metrics(pred, target, initial_step=0)
    assert m["rmse"] == pytest.approx(2.0)
    arrays = metric_arrays(pred, target)
    assert arrays["rmse"].shape == (2, 3)  # [channels, t]
    assert arrays["fourier"].shape == (2, 3, 3)  # [channels, bands, t]


def test_matches_loop_reference_on_random_data() -> None:
    rng = np.random.default_rng(3)
    target = _target((5, 48, 7, 2), seed=4)
    pred = target + 0.1 * rng.normal(size=target.shape)
    got = compute_metrics(pred, target, initial_step=0)
    want = _reference(pred, target, 0)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-10), key


@pytest.mark.parametrize(
    ("shape", "initial_step"),
    [
        ((3, 40, 9, 2), 0),
        ((3, 40, 9, 2), 1),
        ((3, 40, 9, 2), 5),
        ((2, 30, 28, 6, 2), 2),
        ((2, 26, 28, 24, 5, 2), 3),
        ((2, 10, 12, 8, 4, 1), 1),
    ],
)
def test_matches_reference_in_1d_2d_3d(shape: tuple[int, ...], initial_step: int) -> None:
    rng = np.random.default_rng(sum(shape) + initial_step)
    target = _target(shape, seed=initial_step)
    pred = target + 0.1 * rng.normal(size=shape)
    got = compute_metrics(pred, target, initial_step=initial_step)
    want = _reference(pred, target, initial_step)
    for key in METRIC_KEYS:
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-10), key


@pytest.mark.parametrize("shape", [(2, 16, 12, 3, 1), (2, 16, 16, 18, 2, 1)])
def test_constant_offset_2d_3d(shape: tuple[int, ...]) -> None:
    c = 0.25
    target = _target(shape)
    m = compute_metrics(target + c, target, initial_step=0)
    for key in ("rmse", "max_err", "crmse", "brmse"):
        assert m[key] == pytest.approx(c), key
    # All energy sits in shell 0, which the low band averages with 3 empty shells.
    assert m["fourier_low"] == pytest.approx(c / 4)
    assert m["fourier_mid"] == pytest.approx(0.0, abs=1e-12)


def test_2d_boundary_counts_edges() -> None:
    nx, ny, d = 6, 4, 1.0
    target = _target((1, nx, ny, 1, 1))
    pred = target.copy()
    pred[:, 0, :, :, :] += d  # the x=0 edge: ny points
    m = compute_metrics(pred, target, initial_step=0)
    # PDEBench sums the x edges (ny points each) and y edges (nx points each, corners again).
    edge_sq = ny * d**2 + 2 * d**2  # x=0 edge plus its two corners seen from the y edges
    assert m["brmse"] == pytest.approx(math.sqrt(edge_sq / (2 * nx + 2 * ny)))


def test_given_frames_are_not_scored() -> None:
    # A 41-frame rollout whose first 10 frames are the given history: only the 31 predicted
    # frames count, so a uniform error c scores c, not c * 31/41 as a time mean over all frames.
    c, s = 0.2, 10
    target = _target((2, 32, 41, 1))
    pred = target.copy()
    pred[:, :, s:, :] += c
    m = compute_metrics(pred, target, initial_step=s)
    assert m["rmse"] == pytest.approx(c)
    assert m["max_err"] == pytest.approx(c)
    norms = np.sqrt(np.mean(target[:, :, s:, 0] ** 2, axis=1))  # [b, t] over the scored frames
    assert m["nrmse"] == pytest.approx(float(np.mean(c / norms)))
    every_frame = compute_metrics(pred, target, initial_step=0)
    assert every_frame["rmse"] == pytest.approx(c * 31 / 41)


def test_errors_in_given_frames_do_not_count() -> None:
    target = _target((2, 32, 6, 1))
    pred = target.copy()
    pred[:, :, :2, :] += 100.0  # a wrong history is not the model's prediction
    assert all(v == 0.0 for v in compute_metrics(pred, target, initial_step=2).values())


def test_predicted_frames_alone_score_like_the_full_rollout() -> None:
    target = _target((2, 32, 8, 1))
    rng = np.random.default_rng(1)
    predicted = target[:, :, 3:, :] + 0.1 * rng.normal(size=(2, 32, 5, 1))
    full = np.concatenate([target[:, :, :3, :], predicted], axis=2)
    assert compute_metrics(predicted, target, initial_step=3) == compute_metrics(
        full, target, initial_step=3
    )
    assert compute_metrics(full, target, initial_step=3) == compute_metrics(
        predicted, target[:, :, 3:, :], initial_step=0
    )


def test_3d_boundary_adds_channels_like_pdebench() -> None:
    n, d = 6, 1.0
    target = _target((1, n, n, n, 1, 2))
    pred = target.copy()
    pred[:, 0, :, :, :, 0] += d  # the x=0 face of channel 0 only
    m = compute_metrics(pred, target, initial_step=0)
    # the face (n*n points) and its edges seen again from the y and z faces (4 edges of n points,
    # corners included), all in channel 0, over the 6 faces' point count; channel 1 adds zero
    face_sq = n * n + 4 * n
    assert m["brmse"] == pytest.approx(math.sqrt(face_sq * d**2 / (6 * n * n)))


@pytest.mark.parametrize(
    ("initial_step", "message"),
    [
        (-1, "initial_step=-1 is out of range for 5 time frames"),
        (5, "initial_step=5 is out of range"),
        ("2", "initial_step='2' is not valid"),
        (True, "initial_step=True is not valid"),
    ],
)
def test_bad_initial_step_is_one_clear_error(initial_step, message: str) -> None:
    target = _target((2, 16, 5, 1))
    with pytest.raises(ExpflowError, match=message):
        compute_metrics(target, target, initial_step=initial_step)


def test_empty_band_is_nan_like_pdebench() -> None:
    target = _target((1, 16, 2, 1))  # 9 rfft bins: the high band [12:] is empty
    assert math.isnan(compute_metrics(target + 1, target, initial_step=0)["fourier_high"])


def test_bad_shapes_are_errors() -> None:
    with pytest.raises(ExpflowError, match="layout"):
        compute_metrics(np.zeros((2, 16, 4)), np.zeros((2, 16, 4)), initial_step=0)
    with pytest.raises(ExpflowError, match="differs"):
        compute_metrics(np.zeros((2, 16, 4, 1)), np.zeros((2, 16, 5, 1)), initial_step=0)


def test_write_predictions(tmp_path) -> None:
    pred = _target((3, 16, 5, 1))
    path = write_predictions(
        tmp_path / "pred.hdf5", pred, pred + 1, x=np.arange(16), t=np.arange(5), initial_step=2
    )
    with h5py.File(path) as f:
        assert f["pred"].shape == (3, 16, 5, 1) and f["pred"].dtype == np.float32
        assert f["target"].shape == (3, 16, 5, 1)
        assert f.attrs["layout"] == "[batch, x, t, channel]"
        assert f.attrs["initial_step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ExpflowError):
        write_predictions(tmp_path / "bad.hdf5", np.zeros((3, 4)))
