"""Load PDEBench 1D scalar files (ours or real ones) into numpy, with PDEBench's splits.

Two layouts are read:

* single-file ``tensor`` [samples, t, x] with ``x-coordinate`` [nx] and ``t-coordinate``
  (advection, Burgers, 1D diffusion-reaction). PDEBench's ``FNODatasetSingle`` uses the FIRST
  ``int(N * test_ratio)`` samples as the test set and the rest for training.
* one HDF5 group per sample (``0000/data`` [t, x, 1], ``0000/grid/x``, ``0000/grid/t``; 1D
  diffusion-sorption). PDEBench's ``FNODatasetMult`` sorts the group names and uses the LAST
  ``len - int(len * (1 - test_ratio))`` of them as the test set.

Arrays come back in PDEBench's model layout ``[samples, x, t]`` (the single channel dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from expflow_flows.errors import ExpflowError

Split = Literal["all", "train", "test"]
SPLITS = ("all", "train", "test")
EXPECTED = (
    "a PDEBench 1D HDF5 file: dataset 'tensor' [samples, t, x] with 'x-coordinate' [x], "
    "or one group per sample holding 'data' [t, x, 1]"
)


@dataclass(frozen=True)
class PDEData1D:
    """A loaded 1D file: ``u`` [samples, x, t] float32, ``x`` [nx], ``t`` [nt] (frame times)."""

    path: Path
    u: np.ndarray
    x: np.ndarray
    t: np.ndarray
    layout: Literal["tensor", "groups"]
    attrs: dict

    @property
    def n_samples(self) -> int:
        """Number of trajectories."""
        return int(self.u.shape[0])


def test_count(n_samples: int, test_ratio: float, layout: str = "tensor") -> int:
    """How many samples PDEBench puts in the test split for this layout."""
    if layout == "groups":
        return n_samples - int(n_samples * (1 - test_ratio))
    return int(n_samples * test_ratio)


def split_indices(
    n_samples: int, test_ratio: float = 0.1, layout: str = "tensor"
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sample indices exactly as PDEBench splits a file of this layout."""
    if not 0.0 <= test_ratio < 1.0:
        raise ExpflowError(
            f"test_ratio={test_ratio!r} is out of range; expected 0 <= test_ratio < 1"
        )
    idx = np.arange(n_samples)
    n_test = test_count(n_samples, test_ratio, layout)
    if layout == "groups":
        return idx[: n_samples - n_test], idx[n_samples - n_test :]
    return idx[n_test:], idx[:n_test]


def read_1d(
    path: Path | str,
    *,
    reduced_resolution: int = 1,
    reduced_resolution_t: int = 1,
    reduced_batch: int = 1,
    num_samples_max: int = -1,
) -> PDEData1D:
    """Read a whole 1D file (optionally subsampled like PDEBench's ``reduced_*`` options)."""
    path = Path(path).expanduser()
    for name, step in (
        ("reduced_resolution", reduced_resolution),
        ("reduced_resolution_t", reduced_resolution_t),
        ("reduced_batch", reduced_batch),
    ):
        if not isinstance(step, (int, np.integer)) or step < 1:
            raise ExpflowError(f"{name}={step!r} is not valid; expected an integer >= 1")
    if not path.exists():
        raise ExpflowError(f"data file {str(path)!r} does not exist; expected {EXPECTED}")
    if path.is_dir():
        raise ExpflowError(f"data file {str(path)!r} is a directory; expected {EXPECTED}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ExpflowError(
            f"data file {str(path)!r} is not a readable HDF5 file ({exc}); expected {EXPECTED}"
        ) from None
    with f:
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        if "tensor" in f:
            u, x, t = _read_tensor(path, f, reduced_batch, reduced_resolution_t, reduced_resolution)
            layout: Literal["tensor", "groups"] = "tensor"
        else:
            u, x, t = _read_groups(path, f, reduced_batch, reduced_resolution_t, reduced_resolution)
            layout = "groups"
    if num_samples_max > 0:
        u = u[:num_samples_max]
    if u.shape[0] < 1:
        raise ExpflowError(f"data file {str(path)!r} holds no samples; expected {EXPECTED}")
    if not np.all(np.isfinite(u)):
        raise ExpflowError(f"data file {str(path)!r} holds non-finite values (NaN or inf)")
    return PDEData1D(path=path, u=u, x=x, t=t, layout=layout, attrs=attrs)


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _read_tensor(
    path: Path, f: h5py.File, rb: int, rt: int, rx: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ds = f["tensor"]
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 3:
        shape = getattr(ds, "shape", None)
        raise ExpflowError(
            f"data file {str(path)!r}: 'tensor' has shape {shape}, expected [samples, t, x] "
            "(3 axes); 2D/3D PDEBench files are not read by load_1d"
        )
    if "x-coordinate" not in f:
        raise ExpflowError(
            f"data file {str(path)!r} has 'tensor' but no 'x-coordinate'; expected {EXPECTED}"
        )
    raw = np.asarray(ds[::rb, ::rt, ::rx], dtype=np.float32)
    x = np.asarray(f["x-coordinate"], dtype=np.float64)
    n_x_full = ds.shape[2]
    if x.shape != (n_x_full,):
        raise ExpflowError(
            f"data file {str(path)!r}: 'x-coordinate' has shape {x.shape}, expected ({n_x_full},)"
        )
    x = x[::rx]
    n_t_full = ds.shape[1]
    if "t-coordinate" in f:
        # PDEBench stores one more time value than frames; frame i is at t-coordinate[i].
        t_all = np.asarray(f["t-coordinate"], dtype=np.float64)
        if t_all.ndim != 1 or t_all.size < n_t_full:
            raise ExpflowError(
                f"data file {str(path)!r}: 't-coordinate' has shape {t_all.shape}, expected "
                f"at least {n_t_full} entries (PDEBench stores {n_t_full + 1})"
            )
        t = t_all[:n_t_full][::rt]
    else:
        t = np.arange(n_t_full, dtype=np.float64)[::rt]
    # [samples, t, x] -> PDEBench's model layout [samples, x, t]
    return np.ascontiguousarray(raw.transpose(0, 2, 1)), x, t


def _read_groups(
    path: Path, f: h5py.File, rb: int, rt: int, rx: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    names = sorted(k for k in f.keys() if isinstance(f[k], h5py.Group) and "data" in f[k])
    if not names:
        found = ", ".join(sorted(f.keys())[:8]) or "nothing"
        hint = " (this looks like a PDEBench CFD file)" if "density" in f else ""
        raise ExpflowError(
            f"data file {str(path)!r} has no 'tensor' dataset and no sample groups "
            f"(found: {found}){hint}; expected {EXPECTED}"
        )
    names = names[::rb]
    frames = []
    for name in names:
        data = np.asarray(f[name]["data"], dtype=np.float32)
        if data.ndim == 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 2:
            raise ExpflowError(
                f"data file {str(path)!r}: group {name!r} data has shape {data.shape}, "
                "expected [t, x, 1] for a 1D problem"
            )
        frames.append(data[::rt, ::rx])
    shapes = {a.shape for a in frames}
    if len(shapes) != 1:
        raise ExpflowError(
            f"data file {str(path)!r}: sample groups differ in shape {sorted(shapes)}"
        )
    u = np.stack(frames).transpose(0, 2, 1)  # [samples, x, t]
    grid = f[names[0]].get("grid")
    nt_full, nx_full = np.asarray(f[names[0]]["data"]).shape[:2]
    x = (
        np.asarray(grid["x"], dtype=np.float64)[::rx]
        if grid is not None and "x" in grid
        else ((np.arange(nx_full) + 0.5) / nx_full)[::rx]
    )
    t = (
        np.asarray(grid["t"], dtype=np.float64)[:nt_full][::rt]
        if grid is not None and "t" in grid
        else (np.arange(nt_full, dtype=np.float64)[::rt])
    )
    return np.ascontiguousarray(u), x, t


def load_1d(
    path: Path | str,
    split: Split = "all",
    *,
    test_ratio: float = 0.1,
    reduced_resolution: int = 1,
    reduced_resolution_t: int = 1,
    reduced_batch: int = 1,
    num_samples_max: int = -1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(u [samples, x, t] float32, x [nx], t [nt])`` for one split of a PDEBench 1D file.

    ``split`` is "all", "train" or "test"; the split is PDEBench's (see the module docstring).
    """
    if split not in SPLITS:
        raise ExpflowError(f"split {split!r} is not known; expected one of {', '.join(SPLITS)}")
    data = read_1d(
        path,
        reduced_resolution=reduced_resolution,
        reduced_resolution_t=reduced_resolution_t,
        reduced_batch=reduced_batch,
        num_samples_max=num_samples_max,
    )
    if split == "all":
        return data.u, data.x, data.t
    train_idx, test_idx = split_indices(data.n_samples, test_ratio, data.layout)
    idx = train_idx if split == "train" else test_idx
    return data.u[idx], data.x, data.t
