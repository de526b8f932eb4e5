"""Synthetic PDEBench-style data, written in PDEBench's own 1D HDF5 layout.

A file holds ``tensor`` [samples, t, x] (float32), ``x-coordinate`` [nx] (cell centres on
[0, 1)) and ``t-coordinate`` [nt + 1]: PDEBench's generators store one more time value than
frames (``arange(nt + 1) * dt``), so frame ``i`` is at ``t-coordinate[i]`` and the last entry
has no frame. The PDE parameters and the generator settings are stored as root attributes.

Initial conditions follow PDEBench's recipe: per sample, a sum of two sine waves with wave
numbers drawn from 1..4 (random amplitude and phase), with probability 0.1 taken in absolute
value, a random sign, and with probability 0.1 multiplied by a smooth tanh window; for
diffusion-reaction each sample is rescaled to [0, 1].

Solvers:

* advection: exact, ``u(x, t) = u0((x - beta t) mod 1)``.
* diffusion-reaction: exact in Fourier space for ``rho = 0`` (heat equation); for ``rho > 0``
  Strang splitting of the exact logistic reaction and exact Fourier diffusion.
* Burgers: Strang splitting of a conservative finite-volume step (MUSCL/minmod, Rusanov flux,
  SSP-RK2, CFL 0.4) and exact Fourier diffusion with viscosity ``nu / pi`` as in PDEBench.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from expflow_flows import atomic
from expflow_flows.errors import ExpflowError
from expflow_flows.home import data_dir
from expflow_flows.pde.registry import Problem, generatable_keys, get_problem

GENERATOR_NAME = "expflow_flows.pde.generate"
CACHE_SUBDIR = "pdebench-synthetic"


@dataclass(frozen=True)
class _SineIC:
    """Random initial conditions that can be evaluated at any positions (for exact shifts)."""

    k: np.ndarray  # [n, waves] integer wave numbers
    amp: np.ndarray  # [n, waves]
    phase: np.ndarray  # [n, waves]
    use_abs: np.ndarray  # [n] bool
    sign: np.ndarray  # [n] +-1
    use_window: np.ndarray  # [n] bool
    x_left: np.ndarray  # [n]
    x_right: np.ndarray  # [n]

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int, k_max: int = 4, waves: int = 2) -> _SineIC:
        return cls(
            k=rng.integers(1, k_max + 1, size=(n, waves)),
            amp=rng.uniform(0.0, 1.0, size=(n, waves)),
            phase=rng.uniform(0.0, 2.0 * np.pi, size=(n, waves)),
            use_abs=rng.random(n) < 0.1,
            sign=rng.choice(np.array([1.0, -1.0]), size=n),
            use_window=rng.random(n) < 0.1,
            x_left=rng.uniform(0.1, 0.45, size=n),
            x_right=rng.uniform(0.55, 0.9, size=n),
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Evaluate at positions ``x`` [n, nx] (taken modulo 1, the domain is periodic)."""
        x = np.mod(x, 1.0)
        arg = 2.0 * np.pi * self.k[:, :, None] * x[:, None, :] + self.phase[:, :, None]
        u = np.sum(self.amp[:, :, None] * np.sin(arg), axis=1)
        u = np.where(self.use_abs[:, None], np.abs(u), u) * self.sign[:, None]
        # The window is ~0 near x=0 and x=1, so it stays continuous on the periodic domain.
        trans = 0.01
        window = 0.5 * (
            np.tanh((x - self.x_left[:, None]) / trans)
            - np.tanh((x - self.x_right[:, None]) / trans)
        )
        return np.where(self.use_window[:, None], u * window, u)


def _cell_centres(nx: int) -> np.ndarray:
    return (np.arange(nx) + 0.5) / nx


def _advection(ic: _SineIC, x: np.ndarray, times: np.ndarray, beta: float) -> np.ndarray:
    n = ic.k.shape[0]
    frames = [ic(np.broadcast_to(x - beta * t, (n, x.size))) for t in times]
    return np.stack(frames, axis=1)


def _fourier_decay(nx: int, dx: float, diffusivity: float, dt: float) -> np.ndarray:
    k = 2.0 * np.pi * np.fft.rfftfreq(nx, d=dx)
    return np.exp(-diffusivity * k**2 * dt)


def _diffusion_reaction(
    u0: np.ndarray, dx: float, times: np.ndarray, nu: float, rho: float
) -> np.ndarray:
    nx = u0.shape[-1]
    u_hat0 = np.fft.rfft(u0, axis=-1)
    if rho == 0.0:
        # Heat equation: every Fourier mode decays exactly, no time stepping needed.
        return np.stack(
            [np.fft.irfft(u_hat0 * _fourier_decay(nx, dx, nu, t), n=nx, axis=-1) for t in times],
            axis=1,
        )
    frames = [u0]
    u = u0.copy()
    for t0, t1 in zip(times[:-1], times[1:], strict=True):
        # Small reaction steps keep the splitting error well below the data's own scale.
        n_sub = max(1, math.ceil(rho * (t1 - t0) / 0.05))
        h = (t1 - t0) / n_sub
        decay = _fourier_decay(nx, dx, nu, h)
        growth = math.exp(-rho * h / 2.0)
        for _ in range(n_sub):
            u = u / (u + (1.0 - u) * growth)
            u = np.fft.irfft(np.fft.rfft(u, axis=-1) * decay, n=nx, axis=-1)
            # Fourier diffusion can undershoot 0 by round-off; the logistic step needs u in [0, 1].
            np.clip(u, 0.0, 1.0, out=u)
            u = u / (u + (1.0 - u) * growth)
        frames.append(u.copy())
    return np.stack(frames, axis=1)


def _minmod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(a * b > 0.0, np.sign(a) * np.minimum(np.abs(a), np.abs(b)), 0.0)


def _burgers_rhs(u: np.ndarray, dx: float) -> np.ndarray:
    """-(u^2/2)_x by a conservative MUSCL/Rusanov finite-volume scheme (periodic)."""
    slope = _minmod(u - np.roll(u, 1, axis=-1), np.roll(u, -1, axis=-1) - u)
    u_left = u + 0.5 * slope  # state left of interface i+1/2
    u_right = np.roll(u - 0.5 * slope, -1, axis=-1)  # state right of interface i+1/2
    speed = np.maximum(np.abs(u_left), np.abs(u_right))
    flux = 0.25 * (u_left**2 + u_right**2) - 0.5 * speed * (u_right - u_left)
    return -(flux - np.roll(flux, 1, axis=-1)) / dx


def _burgers(u0: np.ndarray, dx: float, times: np.ndarray, nu: float) -> np.ndarray:
    nx = u0.shape[-1]
    viscosity = nu / np.pi  # PDEBench's Burgers equation uses nu/pi as the viscosity
    cfl = 0.4
    frames = [u0]
    u = u0.copy()
    t = float(times[0])
    for t_save in times[1:]:
        while t < t_save - 1e-12:
            u_max = max(float(np.max(np.abs(u))), 1e-6)
            dt = min(cfl * dx / u_max, float(t_save) - t)
            half = _fourier_decay(nx, dx, viscosity, dt / 2.0)
            u = np.fft.irfft(np.fft.rfft(u, axis=-1) * half, n=nx, axis=-1)
            u1 = u + dt * _burgers_rhs(u, dx)
            u = 0.5 * (u + u1 + dt * _burgers_rhs(u1, dx))
            u = np.fft.irfft(np.fft.rfft(u, axis=-1) * half, n=nx, axis=-1)
            t += dt
        frames.append(u.copy())
    return np.stack(frames, axis=1)


def _solve_advection(ic: _SineIC, x: np.ndarray, times: np.ndarray, p: dict) -> np.ndarray:
    return _advection(ic, x, times, p["beta"])


def _solve_burgers(ic: _SineIC, x: np.ndarray, times: np.ndarray, p: dict) -> np.ndarray:
    n = ic.k.shape[0]
    return _burgers(ic(np.broadcast_to(x, (n, x.size))), 1.0 / x.size, times, p["nu"])


def _solve_diffusion_reaction(ic: _SineIC, x: np.ndarray, times: np.ndarray, p: dict) -> np.ndarray:
    n = ic.k.shape[0]
    u0 = ic(np.broadcast_to(x, (n, x.size)))
    # PDEBench rescales diffusion-reaction initial conditions to [0, 1].
    lo = u0.min(axis=1, keepdims=True)
    span = np.maximum(u0.max(axis=1, keepdims=True) - lo, 1e-12)
    u0 = (u0 - lo) / span
    return _diffusion_reaction(u0, 1.0 / x.size, times, p["nu"], p["rho"])


_Solver = Callable[[_SineIC, np.ndarray, np.ndarray, dict], np.ndarray]
_SOLVERS: dict[str, _Solver] = {
    "advection": _solve_advection,
    "burgers": _solve_burgers,
    "diffusion_reaction_1d": _solve_diffusion_reaction,
}

# What each parameter may be: (lowest, lowest allowed inclusively?, description).
_PARAM_RULES: dict[tuple[str, str], tuple[float, bool, str]] = {
    ("advection", "beta"): (-math.inf, False, "a finite number"),
    ("burgers", "nu"): (0.0, False, "a number > 0"),
    ("diffusion_reaction_1d", "nu"): (0.0, False, "a number > 0"),
    ("diffusion_reaction_1d", "rho"): (0.0, True, "a number >= 0"),
}


def _generatable(problem: str) -> Problem:
    spec = get_problem(problem)
    if problem not in _SOLVERS:
        raise ExpflowError(
            f"cannot generate data for PDE problem {problem!r}; "
            f"generatable problems: {', '.join(generatable_keys())}"
        )
    return spec


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ExpflowError(f"{name}={value!r} is not an integer; expected an integer >= {low}")
    if value < low:
        raise ExpflowError(f"{name}={value!r} is too small; expected an integer >= {low}")
    return int(value)


def resolve_params(problem: str, **pde_params: Any) -> dict[str, float]:
    """Validated PDE parameters for ``problem`` with defaults filled in (all floats)."""
    spec = _generatable(problem)
    out: dict[str, float] = {k: float(v) for k, v in spec.defaults().items()}
    for name, value in pde_params.items():
        if value is None:
            continue
        spec.param(name)  # unknown names raise with the list of known ones
        low, inclusive, accepted = _PARAM_RULES[(problem, name)]
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise ExpflowError(
                f"{problem} parameter {name}={value!r} is not a number; expected {accepted}"
            ) from None
        ok = math.isfinite(num) and (num >= low if inclusive else num > low)
        if not ok:
            raise ExpflowError(
                f"{problem} parameter {name}={value!r} is out of range; expected {accepted}"
            )
        out[name] = num
    return out


def default_path(
    problem: str,
    *,
    n_samples: int = 100,
    nx: int = 128,
    nt: int = 41,
    seed: int = 0,
    **pde_params: Any,
) -> Path:
    """Where :func:`ensure_dataset` caches a file: the PDEBench file name under a folder per size/seed.

    The size and seed are in the folder name so that differently sized requests never share
    (and overwrite) one file name.
    """
    spec = _generatable(problem)
    params = resolve_params(problem, **pde_params)
    folder = f"n{n_samples}_nx{nx}_nt{nt}_seed{seed}"
    return data_dir() / CACHE_SUBDIR / folder / spec.file_name(**params)


def generate(
    problem: str,
    path: Path | str | None = None,
    *,
    n_samples: int = 100,
    nx: int = 128,
    nt: int = 41,
    seed: int = 0,
    **pde_params: Any,
) -> Path:
    """Write ``n_samples`` synthetic trajectories of ``problem`` to ``path`` (atomically) and return it.

    ``nt`` is the number of stored frames over PDEBench's time span (advection/Burgers t in
    [0, 2], diffusion-reaction [0, 1]); ``pde_params`` are e.g. ``beta``, ``nu``, ``rho``.
    """
    spec = _generatable(problem)
    n_samples = _check_int("n_samples", n_samples, 1)
    nx = _check_int("nx", nx, 8)
    nt = _check_int("nt", nt, 2)
    seed = _check_int("seed", seed, 0)
    params = resolve_params(problem, **pde_params)
    if path is None:
        path = default_path(problem, n_samples=n_samples, nx=nx, nt=nt, seed=seed, **params)
    path = Path(path).expanduser()

    assert spec.t_final is not None
    dt = spec.t_final / (nt - 1)
    times = np.arange(nt) * dt
    x = _cell_centres(nx)
    rng = np.random.default_rng(seed)
    ic = _SineIC.draw(rng, n_samples)
    with np.errstate(over="raise", divide="raise", invalid="raise", under="ignore"):
        tensor = _SOLVERS[problem](ic, x, times, params).astype(np.float32)
    if not np.all(np.isfinite(tensor)):
        raise ExpflowError(f"generating {problem} with {params} gave non-finite values")

    attrs: dict[str, Any] = {
        "problem": problem,
        "equation": spec.equation,
        "generator": GENERATOR_NAME,
        "synthetic": True,
        "seed": seed,
        "n_samples": n_samples,
        "nx": nx,
        "nt": nt,
        "t_final": spec.t_final,
        "dt": dt,
        "layout": "tensor [samples, t, x]; t-coordinate has nt+1 entries like PDEBench",
        **params,
    }
    _write_atomic(
        path,
        {
            "tensor": tensor,
            "x-coordinate": x.astype(np.float32),
            "t-coordinate": (np.arange(nt + 1) * dt).astype(np.float32),
        },
        attrs,
    )
    return path


def _write_atomic(path: Path, datasets: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write an HDF5 file under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp, h5py.File(tmp, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
        for key, value in attrs.items():
            f.attrs[key] = value


def _matches(path: Path, expected: dict[str, Any]) -> bool:
    """True when ``path`` is readable and was generated with ``expected`` (or is foreign data)."""
    try:
        with h5py.File(path, "r") as f:
            if "tensor" not in f:
                return False
            attrs = dict(f.attrs)
    except OSError:
        return False
    if attrs.get("generator") != GENERATOR_NAME:
        return True  # a real PDEBench file placed here on purpose: use it as it is
    for key, value in expected.items():
        have = attrs.get(key)
        if have is None:
            return False
        if isinstance(value, float):
            if not math.isclose(float(have), value, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif have != value:
            return False
    return True


def ensure_dataset(
    problem: str,
    path: Path | str | None = None,
    *,
    n_samples: int = 100,
    nx: int = 128,
    nt: int = 41,
    seed: int = 0,
    **pde_params: Any,
) -> Path:
    """The cached file for these settings, generating it first when it is missing or different."""
    params = resolve_params(problem, **pde_params)
    if path is None:
        path = default_path(problem, n_samples=n_samples, nx=nx, nt=nt, seed=seed, **params)
    path = Path(path).expanduser()
    expected = {
        "problem": problem,
        "n_samples": n_samples,
        "nx": nx,
        "nt": nt,
        "seed": seed,
        **params,
    }
    if path.exists() and _matches(path, expected):
        return path
    return generate(problem, path, n_samples=n_samples, nx=nx, nt=nt, seed=seed, **params)
