"""Synthetic PDEBench-style data: layout, physics, determinism, loading and the registry."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.pde.data import load_1d, read_1d, split_indices
from expflow_flows.pde.generate import default_path, ensure_dataset, generate
from expflow_flows.pde.registry import PROBLEMS, generatable_keys, get_problem

SMALL = {"n_samples": 12, "nx": 64, "nt": 11}


@pytest.fixture(autouse=True)
def _pde_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EXPFLOW_DATA_DIR", str(tmp_path / "data"))


def _read(path):
    with h5py.File(path) as f:
        return (
            np.asarray(f["tensor"]),
            np.asarray(f["x-coordinate"]),
            np.asarray(f["t-coordinate"]),
            dict(f.attrs),
        )


def _fno_dataset_single(path, initial_step=10, rx=1, rt=1, rb=1, if_test=False, test_ratio=0.1):
    """The reading path of PDEBench's FNODatasetSingle for a 1D 'tensor' file, in numpy."""
    with h5py.File(path, "r") as f:
        raw = np.array(f["tensor"], dtype=np.float32)[::rb, ::rt, ::rx]
        data = np.transpose(raw, (0, 2, 1))[:, :, :, None]  # batch, x, t, ch
        grid = np.array(f["x-coordinate"], dtype=np.float32)[::rx][:, None]
    test_idx = int(data.shape[0] * test_ratio)
    data = data[:test_idx] if if_test else data[test_idx:]
    items = [(d[..., :initial_step, :], d, grid) for d in data]
    return data, items


@pytest.mark.parametrize("problem", ["advection", "burgers", "diffusion_reaction_1d"])
def test_pdebench_layout(problem):
    path = generate(problem, **SMALL)
    assert path.name == get_problem(problem).file_name()
    u, x, t, attrs = _read(path)
    assert u.shape == (12, 11, 64) and u.dtype == np.float32  # [samples, t, x]
    assert x.shape == (64,) and np.allclose(x, (np.arange(64) + 0.5) / 64)
    t_final = get_problem(problem).t_final
    # PDEBench's quirk: one more time value than frames.
    assert t.shape == (12,) and np.allclose(t, np.arange(12) * t_final / 10)
    assert attrs["problem"] == problem and attrs["nt"] == 11 and attrs["seed"] == 0
    assert np.all(np.isfinite(u))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_pde_params_are_attributes_and_names():
    path = generate("advection", beta=0.7, **SMALL)
    assert path.name == "1D_Advection_Sols_beta0.7.hdf5"
    assert _read(path)[3]["beta"] == pytest.approx(0.7)
    path = generate("diffusion_reaction_1d", nu=2.0, rho=5.0, **SMALL)
    assert path.name == "ReacDiff_Nu2.0_Rho5.0.hdf5"
    attrs = _read(path)[3]
    assert (attrs["nu"], attrs["rho"]) == (2.0, 5.0)


def test_advection_is_the_shifted_initial_condition(tmp_path):
    # beta*dt*nx = 0.5 * 0.2 * 50 = 5 cells per frame, so each frame is an exact roll.
    path = generate("advection", tmp_path / "adv.hdf5", beta=0.5, n_samples=6, nx=50, nt=11)
    u = _read(path)[0].astype(np.float64)
    for j in range(11):
        np.testing.assert_allclose(u[:, j], np.roll(u[:, 0], 5 * j, axis=-1), atol=1e-5)


def test_diffusion_decays_and_keeps_the_mean(tmp_path):
    path = generate("diffusion_reaction_1d", tmp_path / "d.hdf5", nu=0.01, rho=0.0, **SMALL)
    u = _read(path)[0].astype(np.float64)
    mean = u.mean(axis=-1)
    np.testing.assert_allclose(mean, mean[:, :1].repeat(11, axis=1), atol=1e-6)
    energy = ((u - mean[..., None]) ** 2).sum(axis=-1)
    assert np.all(np.diff(energy, axis=1) <= 1e-9)
    assert np.all(energy[:, -1] < 0.9 * energy[:, 0])


def test_reaction_keeps_values_in_unit_interval(tmp_path):
    path = generate("diffusion_reaction_1d", tmp_path / "r.hdf5", nu=0.5, rho=10.0, **SMALL)
    u = _read(path)[0]
    assert u.min() >= 0.0 and u.max() <= 1.0
    assert np.all(u.mean(axis=-1)[:, -1] > u.mean(axis=-1)[:, 0])  # logistic growth


def test_burgers_conserves_mass_and_dissipates_energy(tmp_path):
    path = generate("burgers", tmp_path / "b.hdf5", nu=0.01, **SMALL)
    u = _read(path)[0].astype(np.float64)
    mass = u.mean(axis=-1)
    np.testing.assert_allclose(mass, mass[:, :1].repeat(11, axis=1), atol=1e-5)
    energy = (u**2).sum(axis=-1)
    assert np.all(np.diff(energy, axis=1) <= 1e-6)


def test_generation_is_deterministic(tmp_path):
    a = _read(generate("burgers", tmp_path / "a.hdf5", seed=3, **SMALL))[0]
    b = _read(generate("burgers", tmp_path / "b.hdf5", seed=3, **SMALL))[0]
    c = _read(generate("burgers", tmp_path / "c.hdf5", seed=4, **SMALL))[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_ensure_dataset_caches(tmp_path):
    path = ensure_dataset("advection", **SMALL)
    assert path == default_path("advection", **SMALL)
    assert str(path).startswith(str(tmp_path / "data"))
    stamp = path.stat().st_mtime_ns
    assert ensure_dataset("advection", **SMALL) == path
    assert path.stat().st_mtime_ns == stamp
    other = ensure_dataset("advection", n_samples=13, nx=64, nt=11)
    assert other != path and other.name == path.name


def test_loader_matches_pdebench_fnodatasetsingle():
    path = generate("advection", n_samples=20, nx=64, nt=11)
    for rx, rt in [(1, 1), (2, 2)]:
        for split, if_test in (("train", False), ("test", True)):
            ref, items = _fno_dataset_single(path, initial_step=3, rx=rx, rt=rt, if_test=if_test)
            u, x, t = load_1d(path, split, reduced_resolution=rx, reduced_resolution_t=rt)
            np.testing.assert_array_equal(u, ref[..., 0])
            np.testing.assert_allclose(x, items[0][2][:, 0])
            assert len(t) == u.shape[2]
            assert items[0][0].shape == (64 // rx, 3, 1)
    # PDEBench's single-file split: the FIRST int(N * 0.1) samples are the test set.
    all_u, _, t = load_1d(path)
    np.testing.assert_array_equal(load_1d(path, "test")[0], all_u[:2])
    np.testing.assert_array_equal(load_1d(path, "train")[0], all_u[2:])
    np.testing.assert_allclose(t, np.arange(11) * 0.2, atol=1e-6)


def test_group_layout_uses_the_last_samples_for_test(tmp_path):
    path = tmp_path / "1D_diff-sorp_NA_NA.h5"
    with h5py.File(path, "w") as f:
        for i in range(10):
            g = f.create_group(f"{i:04d}")
            g.create_dataset("data", data=np.full((5, 8, 1), float(i), dtype=np.float32))
            g.create_dataset("grid/x", data=np.linspace(0, 1, 8))
            g.create_dataset("grid/t", data=np.linspace(0, 500, 5))
    u, x, t = load_1d(path, "test")
    assert u.shape == (1, 8, 5) and u[0, 0, 0] == 9.0
    assert read_1d(path).layout == "groups"
    train_idx, test_idx = split_indices(10, 0.1, "groups")
    assert list(test_idx) == [9] and len(train_idx) == 9


def test_loader_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.hdf5"
    with pytest.raises(ExpflowError, match="nope.hdf5.*does not exist.*tensor"):
        load_1d(missing)
    text = tmp_path / "text.hdf5"
    text.write_text("not hdf5")
    with pytest.raises(ExpflowError, match="not a readable HDF5"):
        load_1d(text)
    empty = tmp_path / "empty.hdf5"
    with h5py.File(empty, "w") as f:
        f.create_dataset("density", data=np.zeros((2, 3, 4)))
    with pytest.raises(ExpflowError, match="empty.hdf5.*no 'tensor'.*CFD"):
        load_1d(empty)
    flat = tmp_path / "flat.hdf5"
    with h5py.File(flat, "w") as f:
        f.create_dataset("tensor", data=np.zeros((2, 3)))
    with pytest.raises(ExpflowError, match=r"flat.hdf5.*expected \[samples, t, x\]"):
        load_1d(flat)
    nox = tmp_path / "nox.hdf5"
    with h5py.File(nox, "w") as f:
        f.create_dataset("tensor", data=np.zeros((2, 3, 4)))
    with pytest.raises(ExpflowError, match="no 'x-coordinate'"):
        load_1d(nox)
    with pytest.raises(ExpflowError, match="split 'val'"):
        load_1d(nox, "val")  # type: ignore[arg-type]


def test_bad_problem_and_params():
    with pytest.raises(ExpflowError, match="'heat' is not known.*advection, burgers"):
        get_problem("heat")
    with pytest.raises(ExpflowError, match="cannot generate.*'darcy'.*advection, burgers"):
        generate("darcy")
    with pytest.raises(ExpflowError, match="nu=-1.*> 0"):
        generate("burgers", nu=-1)
    with pytest.raises(ExpflowError, match="no parameter 'beta'.*nu"):
        generate("burgers", beta=0.4)
    with pytest.raises(ExpflowError, match="nx=4"):
        generate("advection", nx=4)


def test_registry_lists_pdebench_problems():
    keys = [p.key for p in PROBLEMS]
    assert len(keys) == 11 and len(set(keys)) == 11
    assert set(generatable_keys()) == {"advection", "burgers", "diffusion_reaction_1d"}
    adv = get_problem("advection")
    assert adv.param("beta").values == (0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 4.0, 7.0)
    assert [adv.file_name(beta=b) for b in adv.param("beta").values] == list(adv.published_files)
    burgers = get_problem("burgers")
    assert burgers.file_name(nu=0.001) == "1D_Burgers_Sols_Nu0.001.hdf5"
    assert len(burgers.param("nu").values) == 12
    assert get_problem("darcy").file_name(beta=100.0) == "2D_DarcyFlow_beta100.0_Train.hdf5"
    assert get_problem("cfd_3d").dims == 3 and len(get_problem("cfd_3d").channels) == 5
    assert (
        os.path.basename(get_problem("ns_incom").file_name(index="3"))
        == "ns_incom_inhom_2d_512-3.h5"
    )
