"""Audits: competition rules of an experiment and PDEBench compliance of a data file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from expflow_flows.bundles.submission import write_bundle
from expflow_flows.errors import ExpflowError
from expflow_flows.governance.audit import (
    FAIL,
    NA,
    PASS,
    AuditReport,
    Check,
    audit_dataset,
    audit_experiment,
    combined_html,
)
from expflow_flows.metrics.registry import MetricsRegistry
from expflow_flows.pde.generate import generate

REG = MetricsRegistry.builtin()
GOOD_METRICS = {"nrmse": 0.04, "rmse": 0.01, "pde_mean": 17.2, "train_time_min": 12.0}
GOOD_PARAMS = {"Args/--sub_step": "2", "lr": 0.01}


def outcome(report: AuditReport, name: str) -> Check:
    matches = [c for c in report.checks if c.name == name]
    assert len(matches) == 1, [c.name for c in report.checks]
    return matches[0]


def audit(**kw) -> AuditReport:
    kw.setdefault("params", GOOD_PARAMS)
    kw.setdefault("metrics", GOOD_METRICS)
    kw.setdefault("registry", REG)
    kw.setdefault("required_params", {"sub_step": "gt:0"})
    return audit_experiment("exp1", **kw)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    pred = tmp_path / "pred.hdf5"
    pred.write_bytes(b"\x89HDF" + bytes(range(256)) * 4)
    return write_bundle(
        tmp_path / "subs", "exp1", {"pred.hdf5": pred}, metrics=GOOD_METRICS, params=GOOD_PARAMS
    )


# ---------------------------------------------------------------- experiment audit


def test_good_experiment_passes(bundle: Path) -> None:
    report = audit(bundle=bundle)
    assert report.passed, report.to_markdown()
    assert [c.name for c in report.checks] == [
        "primary score",
        "threshold PDE/pde_mean",
        "threshold Time/train_time_min",
        "param sub_step",
        "bundle complete",
        "bundle checksums",
        "bundle metrics",
    ]
    assert all(c.outcome == PASS for c in report.checks)
    assert outcome(report, "primary score").observed == "nrmse = 0.04"
    assert outcome(report, "threshold PDE/pde_mean").rule == "PDE/pde_mean < 18.09"


def test_missing_primary_fails() -> None:
    report = audit(metrics={"rmse": 0.01})
    check = outcome(report, "primary score")
    assert not report.passed and check.outcome == FAIL and check.observed == "missing"
    assert "rmse" in check.message  # names what was reported instead


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.04", None, True])
def test_unusable_primary_fails(bad: object) -> None:
    report = audit(metrics={"nrmse": bad})
    assert outcome(report, "primary score").outcome == FAIL
    assert not report.passed


def test_primary_found_under_its_group_name() -> None:
    report = audit(metrics={"PDE/nrmse": 0.04}, primary="nrmse")
    assert outcome(report, "primary score").observed == "PDE/nrmse = 0.04"
    assert report.passed


def test_threshold_violated_fails_and_absent_is_na() -> None:
    report = audit(metrics={"nrmse": 0.04, "pde_mean": 18.09})
    pde = outcome(report, "threshold PDE/pde_mean")
    assert pde.outcome == FAIL and pde.observed == "pde_mean = 18.09"
    assert "needs < 18.09" in pde.message
    assert outcome(report, "threshold Time/train_time_min").outcome == NA
    assert [c.name for c in report.failures] == ["threshold PDE/pde_mean"]


def test_thresholded_primary_absent_fails() -> None:
    report = audit(metrics={"nrmse": 0.04}, primary="pde_mean")
    assert outcome(report, "threshold PDE/pde_mean").outcome == FAIL
    assert outcome(report, "primary score").outcome == FAIL


def test_required_param_missing_fails() -> None:
    report = audit(params={"lr": 0.01})
    check = outcome(report, "param sub_step")
    assert check.outcome == FAIL and check.observed == "missing"


@pytest.mark.parametrize(
    "key", ["sub_step", "--sub_step", "Args/--sub_step", "Args/sub_step", "ARGS/--SUB_STEP"]
)
def test_required_param_matched_case_insensitively(key: str) -> None:
    report = audit(params={key: 3})
    check = outcome(report, "param sub_step")
    assert check.outcome == PASS and check.observed == f"{key} = 3"


def test_nested_params_are_found() -> None:
    report = audit(params={"Args": {"--sub_step": "1"}})
    assert outcome(report, "param sub_step").observed == "Args/--sub_step = '1'"
    assert report.passed


@pytest.mark.parametrize("value", [0, "0", -1, "abc", "", None, math.nan])
def test_sub_step_must_be_positive(value: object) -> None:
    report = audit(params={"Args/--sub_step": value})
    assert outcome(report, "param sub_step").outcome == FAIL


def test_conflicting_param_spellings_fail() -> None:
    report = audit(params={"sub_step": 1, "Args/--sub_step": 2})
    check = outcome(report, "param sub_step")
    assert check.outcome == FAIL and "more than once" in check.message
    assert audit(params={"sub_step": 1, "Args/sub_step": 1}).passed


def test_present_rule() -> None:
    rules = {"sub_step": "gt:0", "lr": "present"}
    assert audit(required_params=rules).passed
    assert not audit(params={"sub_step": 1}, required_params=rules).passed


@pytest.mark.parametrize("rule", ["gt", "gt:x", "above:0", "gt:nan", 5])
def test_bad_rule_is_an_error(rule: object) -> None:
    with pytest.raises(ExpflowError, match="'op:value'"):
        audit(required_params={"sub_step": rule})


def test_tampered_bundle_fails(bundle: Path) -> None:
    data = bytearray((bundle / "pred.hdf5").read_bytes())
    data[10] ^= 0xFF  # same size, different bytes
    (bundle / "pred.hdf5").write_bytes(bytes(data))
    report = audit(bundle=bundle)
    check = outcome(report, "bundle checksums")
    assert check.outcome == FAIL and "pred.hdf5: checksum mismatch" in check.message
    assert outcome(report, "bundle complete").outcome == PASS
    assert not report.passed


def test_incomplete_bundle_fails(bundle: Path) -> None:
    (bundle / "pred.hdf5").unlink()
    report = audit(bundle=bundle)
    complete = outcome(report, "bundle complete")
    assert complete.outcome == FAIL and "prediction file" in complete.message
    assert outcome(report, "bundle checksums").outcome == FAIL


def test_missing_bundle_fails(tmp_path: Path) -> None:
    report = audit(bundle=tmp_path / "nope")
    assert outcome(report, "bundle complete").outcome == FAIL
    assert not report.passed


def test_bundle_from_another_experiment_fails(bundle: Path) -> None:
    report = audit(bundle=bundle, metrics={**GOOD_METRICS, "nrmse": 0.05})
    check = outcome(report, "bundle metrics")
    assert check.outcome == FAIL and "0.05" in check.message


def test_report_renderings(bundle: Path) -> None:
    report = audit(bundle=bundle, metrics={**GOOD_METRICS, "pde_mean": 20.0})
    md = report.to_markdown()
    assert md.startswith("## Audit: experiment exp1")
    assert "**FAILED**" in md and "| threshold PDE/pde_mean | fail |" in md
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["passed"] is False and data["counts"] == {"pass": 6, "fail": 1, "n/a": 0}
    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "FAILED" in page
    assert "<script" not in page and "http" not in page  # self-contained
    nasty = AuditReport("a|b <x>", (Check("c|d", PASS, "<b>", "r", "m\nn"),))
    assert "a\\|b" in nasty.to_markdown() and "&lt;b&gt;" in nasty.to_html()


def test_html_report_shows_hostile_values_as_text(bundle: Path) -> None:
    script = "<script>alert(1)</script>"
    breakout = "</script><img src=x onerror=alert(2)>"
    report = audit_experiment(
        script,
        {**GOOD_PARAMS, "Args/--sub_step": breakout},
        GOOD_METRICS,
        registry=REG,
        required_params={"sub_step": "gt:0"},
        bundle=bundle,
    )
    assert outcome(report, "param sub_step").outcome == FAIL
    for page in (report.to_html(), combined_html([report, report], title=script)):
        assert "<script" not in page and "<img" not in page  # no markup got in
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in page
        # The table is still whole: one row per check, the bad param's row marked failed.
        assert page.count('<tr class="') == len(report.checks) * page.count("<table>")
        assert '<tr class="fail"><td>param sub_step</td><td>fail</td>' in page
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt;</title>" in combined_html(
        [report], title=script
    )


def test_check_outcome_is_validated() -> None:
    with pytest.raises(ValueError):
        Check("x", "ok", "", "", "")


# ---------------------------------------------------------------- dataset audit


@pytest.fixture
def good_file(home: Path, tmp_path: Path) -> Path:
    return generate(
        "advection", tmp_path / "data" / "1D_Advection_Sols_beta0.4.hdf5", n_samples=4, nx=16, nt=5
    )


def variant(src: Path, name: str | None = None) -> Path:
    folder = src.parent / "variant"
    folder.mkdir(exist_ok=True)
    dst = folder / (name or src.name)
    shutil.copy(src, dst)
    return dst


def test_good_generated_file_passes(good_file: Path) -> None:
    report = audit_dataset(good_file)
    assert report.passed, report.to_markdown()
    assert all(c.outcome == PASS for c in report.checks)
    names = [c.name for c in report.checks]
    for name in ("file name", "required datasets", "tensor rank", "coordinates", "dtype"):
        assert name in names
    assert "t-coordinate: 6" in outcome(report, "coordinates").observed  # nt + 1 like PDEBench


def test_generated_reacdiff_file_passes(home: Path, tmp_path: Path) -> None:
    path = generate(
        "diffusion_reaction_1d",
        tmp_path / "ReacDiff_Nu0.5_Rho1.0.hdf5",
        n_samples=2,
        nx=16,
        nt=3,
    )
    assert audit_dataset(path).passed


def test_nan_injected_fails(good_file: Path) -> None:
    path = variant(good_file)
    with h5py.File(path, "r+") as f:
        f["tensor"][2, 1, 3] = np.nan
        f["tensor"][3, 0, 0] = np.inf
    check = outcome(audit_dataset(path), "finite values")
    assert check.outcome == FAIL
    assert "1 NaN, 1 inf (first at index 2" in check.observed


def test_nan_found_across_scan_slabs(good_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from expflow_flows.governance import audit as audit_mod

    monkeypatch.setattr(audit_mod, "_SCAN_BYTES", 1)  # one sample per read
    path = variant(good_file)
    with h5py.File(path, "r+") as f:
        f["tensor"][3, 4, 15] = np.nan
    check = outcome(audit_dataset(path), "finite values")
    assert check.outcome == FAIL and "first at index 3" in check.observed


def test_x_coordinate_wrong_length_fails(good_file: Path) -> None:
    path = variant(good_file)
    with h5py.File(path, "r+") as f:
        del f["x-coordinate"]
        f.create_dataset("x-coordinate", data=np.linspace(0, 1, 15, dtype=np.float32))
    check = outcome(audit_dataset(path), "coordinates")
    assert check.outcome == FAIL and "x-coordinate has 15 entries, the data has 16" in check.message


def test_t_coordinate_wrong_length_fails(good_file: Path) -> None:
    path = variant(good_file)
    with h5py.File(path, "r+") as f:
        del f["t-coordinate"]
        f.create_dataset("t-coordinate", data=np.arange(9, dtype=np.float32))
    assert outcome(audit_dataset(path), "coordinates").outcome == FAIL


def test_missing_tensor_fails(good_file: Path) -> None:
    path = variant(good_file)
    with h5py.File(path, "r+") as f:
        del f["tensor"]
    report = audit_dataset(path)
    check = outcome(report, "required datasets")
    assert check.outcome == FAIL and "missing: tensor" in check.message
    assert outcome(report, "dtype").outcome == FAIL
    assert not report.passed


def test_integer_dtype_fails(good_file: Path) -> None:
    path = variant(good_file)
    with h5py.File(path, "r+") as f:
        data = f["tensor"][()]
        del f["tensor"]
        f.create_dataset("tensor", data=(data * 100).astype(np.int32))
    report = audit_dataset(path)
    check = outcome(report, "dtype")
    assert check.outcome == FAIL and "tensor: int32" in check.message
    assert outcome(report, "finite values").outcome == NA


def test_wrong_rank_fails(good_file: Path) -> None:
    path = variant(good_file)
    with h5py.File(path, "r+") as f:
        data = f["tensor"][()]
        del f["tensor"]
        f.create_dataset("tensor", data=data[..., None])
    check = outcome(audit_dataset(path), "tensor rank")
    assert check.outcome == FAIL and "4 axes, not 3" in check.message


def test_name_matching_no_problem_fails(good_file: Path) -> None:
    path = variant(good_file, "my_data.hdf5")
    report = audit_dataset(path)
    check = outcome(report, "file name")
    assert check.outcome == FAIL
    assert "1D_Advection_Sols_beta{beta}.hdf5" in check.message  # known patterns listed
    assert "2D_DarcyFlow_beta{beta}_Train.hdf5" in check.message
    assert not report.passed


@pytest.mark.parametrize(
    ("name", "failing"),
    [
        ("1D_Advection_Sols_beta0.40.hdf5", "file name"),  # not PDEBench's number format
        ("1D_Advection_Sols_beta0.4.h5", "file name"),  # wrong extension
        ("1D_Advection_Sols_beta0.5.hdf5", "parameter values"),  # not a published beta
        ("1D_Advection_Sols_beta1.0.hdf5", "name matches attributes"),  # file holds beta 0.4
        ("1D_Burgers_Sols_Nu0.01.hdf5", "name matches attributes"),  # file holds advection
    ],
)
def test_bad_file_names_fail(good_file: Path, name: str, failing: str) -> None:
    report = audit_dataset(variant(good_file, name))
    assert outcome(report, failing).outcome == FAIL, report.to_markdown()
    assert not report.passed


def test_unreadable_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "1D_Advection_Sols_beta0.4.hdf5"
    path.write_bytes(b"not hdf5")
    report = audit_dataset(path)
    assert outcome(report, "file opens").outcome == FAIL
    assert outcome(report, "file name").outcome == PASS
    missing = audit_dataset(tmp_path / "1D_Advection_Sols_beta0.2.hdf5")
    assert outcome(missing, "file opens").observed == "no such file"


def _write_groups(path: Path, nx: int = 8, nt: int = 4, t_len: int | None = None) -> Path:
    with h5py.File(path, "w") as f:
        for i in range(3):
            g = f.create_group(f"{i:04d}")
            g.create_dataset("data", data=np.zeros((nt, nx, 1), dtype=np.float32))
            g.create_dataset("grid/x", data=np.linspace(0, 1, nx, dtype=np.float32))
            g.create_dataset("grid/t", data=np.linspace(0, 1, t_len or nt, dtype=np.float32))
    return path


def test_groups_layout_checked(tmp_path: Path) -> None:
    good = audit_dataset(_write_groups(tmp_path / "1D_diff-sorp_NA_NA.h5"))
    assert good.passed, good.to_markdown()
    assert outcome(good, "parameter values").outcome == NA
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = audit_dataset(_write_groups(bad_dir / "1D_diff-sorp_NA_NA.h5", t_len=9))
    assert outcome(bad, "coordinates").outcome == FAIL


def test_unaudited_layout_is_na(tmp_path: Path) -> None:
    path = tmp_path / "2D_DarcyFlow_beta1.0_Train.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("tensor", data=np.zeros((2, 1, 4, 4), dtype=np.float32))
    report = audit_dataset(path)
    assert outcome(report, "structure").outcome == NA
    assert report.passed
