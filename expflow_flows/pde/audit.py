"""The PDEBench dataset audit: an HDF5 file is named as the problem registry expects and has
PDEBench's structure, shapes, dtype and finite values.

The PDE workload registers :data:`DATASET_AUDIT` (see :mod:`expflow_flows.pde.plugin`), so
:func:`expflow_flows.governance.audit.audit_dataset` runs it on ``*.hdf5`` and ``*.h5`` files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from expflow_flows.governance.audit import (
    FAIL,
    NA,
    PASS,
    AuditReport,
    Check,
    DatasetAudit,
    show_value,
    value_checks,
)
from expflow_flows.pde.registry import PROBLEMS, Problem, find_problem_for_file, format_value


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """``1D_Advection_Sols_beta{beta}.hdf5`` -> a regex with one named group per placeholder."""
    out = ""
    for literal, field_name in re.findall(r"([^{]*)(?:\{(\w+)\})?", pattern):
        out += re.escape(literal)
        if field_name:
            out += f"(?P<{field_name}>.+?)"
    return re.compile(out)


def _patterns_summary() -> str:
    return ", ".join(p.file_patterns[0] for p in PROBLEMS)


def _name_checks(path: Path, attrs: Mapping[str, Any] | None) -> tuple[Problem | None, list[Check]]:
    """The problem a file name belongs to, and the checks of the name and its values."""
    name = path.name
    problem = find_problem_for_file(name)
    if problem is None:
        return None, [
            Check(
                "file name",
                FAIL,
                name,
                "a PDEBench file name of a registry problem",
                f"{name!r} matches no registry problem; known patterns: {_patterns_summary()}",
            )
        ]
    pattern = problem.file_patterns[0]
    match = _pattern_regex(pattern).fullmatch(name)
    if match is None:
        return problem, [
            Check(
                "file name",
                FAIL,
                name,
                pattern,
                f"{name!r} looks like {problem.key} but does not match its pattern {pattern!r}",
            )
        ]
    values = match.groupdict()
    checks = []
    # Numbers must be written as PDEBench writes them (0.4, not 0.40), so names round-trip.
    odd = []
    for key, text in values.items():
        spec = problem.param(key)
        if all(isinstance(v, float) for v in spec.values):
            try:
                canonical = format_value(float(text))
            except ValueError:
                canonical = None
            if canonical != text:
                odd.append(f"{key}={text!r}")
    checks.append(
        Check(
            "file name",
            FAIL if odd else PASS,
            name,
            pattern,
            (
                f"{', '.join(odd)} not written as PDEBench writes numbers (e.g. "
                f"{problem.file_name()!r})"
                if odd
                else f"matches {problem.key}'s pattern"
            ),
        )
    )
    if not values:
        checks.append(
            Check("parameter values", NA, "none in the name", "published values", "no parameters")
        )
    else:
        unpublished = []
        for key, text in values.items():
            accepted = [format_value(v) for v in problem.param(key).values]
            if text not in accepted:
                unpublished.append(f"{key}={text} (accepted: {', '.join(accepted)})")
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        checks.append(
            Check(
                "parameter values",
                FAIL if unpublished else PASS,
                shown,
                f"PDEBench's published values of {problem.key}",
                (
                    f"not a published value: {'; '.join(unpublished)}"
                    if unpublished
                    else "all values are published ones"
                ),
            )
        )
    checks.append(_attrs_check(problem, values, attrs))
    return problem, checks


def _attrs_check(
    problem: Problem, values: Mapping[str, str], attrs: Mapping[str, Any] | None
) -> Check:
    """Parameters stored as file attributes (our generator stores them) must agree with the name."""
    rule = "parameters stored in the file agree with its name"
    if attrs is None:
        return Check("name matches attributes", NA, "file not read", rule, "the file did not open")
    stored = {k: attrs[k] for k in values if k in attrs}
    if "problem" in attrs and str(attrs["problem"]) != problem.key:
        return Check(
            "name matches attributes",
            FAIL,
            f"problem = {attrs['problem']!r}",
            rule,
            f"the file says problem {attrs['problem']!r}, its name says {problem.key!r}",
        )
    if not stored:
        return Check(
            "name matches attributes", NA, "no parameter attributes", rule, "nothing stored"
        )
    wrong = []
    for key, raw in stored.items():
        try:
            same = math.isclose(float(raw), float(values[key]), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            same = str(raw) == values[key]
        if not same:
            wrong.append(f"{key}: file {show_value(raw)}, name {values[key]}")
    observed = ", ".join(f"{k} = {show_value(v)}" for k, v in stored.items())
    return Check(
        "name matches attributes",
        FAIL if wrong else PASS,
        observed,
        rule,
        f"disagree: {'; '.join(wrong)}" if wrong else "the stored parameters agree",
    )


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _length(f: h5py.File, key: str) -> int | None:
    ds = f.get(key)
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
        return None
    return int(ds.shape[0])


def _coord_check(observed: list[str], problems: list[str], rule: str) -> Check:
    return Check(
        "coordinates",
        FAIL if problems else PASS,
        ", ".join(observed),
        rule,
        "; ".join(problems) if problems else "coordinate lengths match the data",
    )


def _coords(
    lengths: Mapping[str, int | None], sizes: Mapping[str, int], nt: int
) -> tuple[list[str], list[str]]:
    """Observed text and problems: space axes must equal the data's size, t nt or nt + 1."""
    observed, problems = [], []
    for key, n in lengths.items():
        observed.append(f"{key}: {n if n is not None else 'missing or not 1-D'}")
        if key in sizes:
            if n != sizes[key]:
                problems.append(f"{key} has {n} entries, the data has {sizes[key]}")
        elif n not in (nt, nt + 1):
            problems.append(f"{key} has {n} entries, expected {nt} or {nt + 1} for {nt} frames")
    return observed, problems


def _tensor_checks(f: h5py.File, problem: Problem | None) -> list[Check]:
    """Single-file layout: ``tensor`` [samples, t, x...], ``x-coordinate``, ``t-coordinate``."""
    required = ("tensor", "x-coordinate", "t-coordinate")
    rule = ", ".join(required)
    missing = [k for k in required if not isinstance(f.get(k), h5py.Dataset)]
    found = ", ".join(sorted(f.keys())) or "(nothing)"
    checks = [
        Check(
            "required datasets",
            FAIL if missing else PASS,
            found,
            rule,
            f"missing: {', '.join(missing)}" if missing else "all present",
        )
    ]
    tensor = f.get("tensor")
    if not isinstance(tensor, h5py.Dataset):
        return checks + [
            Check(name, FAIL, "no tensor", r, "'tensor' is missing")
            for name, r in (
                ("tensor rank", "[samples, t, x...]"),
                ("coordinates", "coordinates match the tensor"),
                ("dtype", "float32 or float64"),
                ("finite values", "no NaN or inf"),
            )
        ]
    shape = tuple(int(n) for n in tensor.shape)
    if problem is None:
        checks.append(
            Check("tensor rank", NA, f"shape {shape}", "[samples, t, x...]", "no registry problem")
        )
    else:
        want = problem.dims + 2
        checks.append(
            Check(
                "tensor rank",
                PASS if tensor.ndim == want else FAIL,
                f"shape {shape}",
                f"{want} axes [samples, t, x] for a {problem.dims}D problem"
                if problem.dims == 1
                else f"{want} axes for a {problem.dims}D problem",
                f"'tensor' has {tensor.ndim} axes"
                + ("" if tensor.ndim == want else f", not {want}"),
            )
        )
    if tensor.ndim >= 3:
        space = ("x-coordinate", "y-coordinate", "z-coordinate")[: tensor.ndim - 2]
        sizes = dict(zip(space, shape[2:], strict=False))
        keys = [*space, "t-coordinate"]
        observed, problems = _coords({k: _length(f, k) for k in keys}, sizes, shape[1])
        checks.append(
            _coord_check(
                [f"tensor: {shape}", *observed],
                problems,
                "x-coordinate length = tensor x size; t-coordinate length = frames or frames + 1",
            )
        )
    else:
        checks.append(
            Check("coordinates", FAIL, f"shape {shape}", "[samples, t, x...]", "too few axes")
        )
    return checks + value_checks({"tensor": tensor})


def _groups_checks(f: h5py.File, problem: Problem | None) -> list[Check]:
    """One group per sample: ``data`` [t, x..., channels], ``grid/x`` (``grid/y``), ``grid/t``."""
    groups = sorted(k for k in f.keys() if isinstance(f[k], h5py.Group))
    rule = "sample groups, each with 'data'; 'grid/x' and 'grid/t' in each"
    lacking = [g for g in groups if not isinstance(f[g].get("data"), h5py.Dataset)]
    if not groups or lacking:
        what = "no sample groups" if not groups else f"no 'data' in {', '.join(lacking[:5])}"
        return [
            Check("required datasets", FAIL, f"{len(groups)} group(s)", rule, what),
            Check("tensor rank", NA, "no data", "data [t, x..., channels]", "not checked"),
        ]
    dims = problem.dims if problem is not None else None
    space = ("x", "y", "z")[: dims or 1]
    needed = [f"grid/{a}" for a in (*space, "t")]
    no_grid = [
        f"{g}/{k}" for g in groups for k in needed if not isinstance(f[g].get(k), h5py.Dataset)
    ]
    checks = [
        Check(
            "required datasets",
            FAIL if no_grid else PASS,
            f"{len(groups)} sample group(s)",
            rule,
            f"missing: {', '.join(no_grid[:5])}" if no_grid else "all present",
        )
    ]
    shapes = {tuple(int(n) for n in f[g]["data"].shape) for g in groups}
    first = f[groups[0]]["data"]
    if dims is None:
        checks.append(Check("tensor rank", NA, f"data {sorted(shapes)}", "", "no registry problem"))
    else:
        want = dims + 2
        ranks_ok = all(len(s) == want for s in shapes)
        checks.append(
            Check(
                "tensor rank",
                PASS if ranks_ok and len(shapes) == 1 else FAIL,
                f"data shapes {sorted(shapes)}",
                f"one shape with {want} axes [t, x..., channels] for a {dims}D problem",
                "consistent"
                if ranks_ok and len(shapes) == 1
                else "the samples' data differ in shape or rank",
            )
        )
    if len(shapes) == 1 and first.ndim >= 3:
        shape = next(iter(shapes))
        observed, problems = [], []
        for g in groups:
            sizes = {f"grid/{a}": n for a, n in zip(space, shape[1:-1], strict=False)}
            lengths = {k: _length(f[g], k) for k in needed}
            obs, probs = _coords(lengths, sizes, shape[0])
            if g == groups[0]:
                observed = [f"data: {shape}", *obs]
            problems += [f"{g}: {p}" for p in probs]
        checks.append(
            _coord_check(
                observed,
                problems[:5],
                "grid/x length = data x size; grid/t length = frames or frames + 1",
            )
        )
    else:
        checks.append(Check("coordinates", NA, "", "", "the data shapes are not uniform"))
    return checks + value_checks({f"{g}/data": f[g]["data"] for g in groups})


def audit_pdebench_file(path: Path) -> AuditReport:
    """Audit a PDEBench-layout HDF5 file: name, structure, shapes, dtype and finite values."""
    path = Path(path).expanduser()
    subject = f"dataset {path.name}"
    open_rule = "a readable HDF5 file"
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        reason = "no such file" if not path.exists() else str(exc).splitlines()[0]
        _, name_checks = _name_checks(path, None)
        return AuditReport(
            subject,
            (
                *name_checks,
                Check("file opens", FAIL, reason, open_rule, f"{str(path)!r} did not open"),
            ),
        )
    with f:
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        problem, checks = _name_checks(path, attrs)
        checks.append(Check("file opens", PASS, "opened", open_rule, "HDF5 file read"))
        layout = problem.layout if problem is not None else None
        if layout is None:
            # A file name the registry does not know: judge the structure it appears to have.
            layout = "tensor" if "tensor" in f else "groups"
        if layout == "tensor":
            checks += _tensor_checks(f, problem)
        elif layout == "groups":
            checks += _groups_checks(f, problem)
        else:
            checks.append(
                Check(
                    "structure",
                    NA,
                    f"layout {layout!r}",
                    "tensor or per-sample groups layout",
                    f"{problem.key if problem else 'this'} layout {layout!r} is recognised but "
                    "its structure is not audited",
                )
            )
    return AuditReport(subject, tuple(checks))


DATASET_AUDIT = DatasetAudit(
    name="PDEBench",
    patterns=("*.hdf5", "*.h5"),
    audit=audit_pdebench_file,
)
