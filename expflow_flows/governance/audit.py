"""Audits: named pass/fail/n-a checks of an experiment's results or a PDEBench data file.

:func:`audit_experiment` checks one experiment against the competition rules (primary score
reported, registry thresholds met, required params present and valid, submission bundle
intact); :func:`audit_dataset` checks that an HDF5 file is a well-formed PDEBench file named
as the registry expects. Both take plain data and fail closed: what cannot be read or checked
where a rule applies is a failure, and ``n/a`` is kept for rules that do not apply.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from expflow_flows.bundles.submission import MANIFEST, METRICS, PARAMS, verify_bundle
from expflow_flows.errors import ExpflowError
from expflow_flows.metrics.gates import OPS, Gate
from expflow_flows.metrics.registry import MetricsRegistry
from expflow_flows.pde.registry import PROBLEMS, Problem, find_problem_for_file, format_value

PASS, FAIL, NA = "pass", "fail", "n/a"
_HTML_STYLE = (
    "<style>body{font-family:sans-serif;margin:1.5em}"
    "table{border-collapse:collapse}th,td{border:1px solid #bbb;padding:4px 8px;"
    "text-align:left;vertical-align:top}th{background:#eee}"
    "tr.pass td:nth-child(2){color:#070}tr.fail td:nth-child(2){color:#b00;"
    "font-weight:bold}tr.na td:nth-child(2){color:#777}</style>"
)
OUTCOMES = (PASS, FAIL, NA)
PRED_PATTERNS = ("pred*.hdf5", "pred*.h5")
FLOAT_DTYPES = (np.dtype("float32"), np.dtype("float64"))
_RULE_FORMS = f"'op:value' (e.g. 'gt:0') with op one of {', '.join(OPS)}, or 'present'"
# Bytes read at a time when scanning a dataset for NaN/inf, so big files never load whole.
_SCAN_BYTES = 64 << 20


@dataclass(frozen=True)
class Check:
    """One audit check: its outcome, what was observed and the rule it was held to."""

    name: str
    outcome: str
    observed: str
    rule: str
    message: str

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} is not one of {', '.join(OUTCOMES)}")


@dataclass(frozen=True)
class AuditReport:
    """The checks of one audited subject; it passes when no check failed."""

    subject: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        """True when no check failed (``n/a`` checks do not fail)."""
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        """The failed checks, in order."""
        return [c for c in self.checks if c.outcome == FAIL]

    def counts(self) -> dict[str, int]:
        """How many checks had each outcome."""
        return {o: sum(c.outcome == o for c in self.checks) for o in OUTCOMES}

    def summary(self) -> str:
        """One line: subject, verdict and counts."""
        n = self.counts()
        verdict = "PASSED" if self.passed else "FAILED"
        return f"audit of {self.subject}: {verdict} ({n[PASS]} pass, {n[FAIL]} fail, {n[NA]} n/a)"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {
            "subject": self.subject,
            "passed": self.passed,
            "counts": self.counts(),
            "checks": [asdict(c) for c in self.checks],
        }

    def to_markdown(self) -> str:
        """A Markdown heading, summary line and table of checks."""

        def cell(text: str) -> str:
            # A '|' would end the cell and a newline the row.
            return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

        lines = [
            f"## Audit: {cell(self.subject)}",
            "",
            f"**{'PASSED' if self.passed else 'FAILED'}** — {self.summary()}",
            "",
            "| check | outcome | observed | rule | message |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {cell(c.name)} | {c.outcome} | {cell(c.observed)} | {cell(c.rule)} | "
            f"{cell(c.message)} |"
            for c in self.checks
        ]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """A self-contained HTML page with the table of checks."""
        e = html.escape
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Audit: {e(self.subject)}</title>{_HTML_STYLE}</head><body>\n"
            f"{self.html_section()}</body></html>\n"
        )

    def html_section(self) -> str:
        """The report's heading, verdict and table, for embedding in a bigger page."""
        e = html.escape
        rows = "\n".join(
            f'<tr class="{"na" if c.outcome == NA else c.outcome}"><td>{e(c.name)}</td>'
            f"<td>{e(c.outcome)}</td><td>{e(c.observed)}</td><td>{e(c.rule)}</td>"
            f"<td>{e(c.message)}</td></tr>"
            for c in self.checks
        )
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"<h2>Audit: {e(self.subject)}</h2>\n<p><strong>{verdict}</strong> — "
            f"{e(self.summary())}</p>\n<table>\n"
            "<tr><th>check</th><th>outcome</th><th>observed</th><th>rule</th>"
            f"<th>message</th></tr>\n{rows}\n</table>\n"
        )


def _number(raw: object) -> float | None:
    """``raw`` as a finite float, or None (bools, text, NaN and inf are not scores)."""
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
        return None
    value = float(raw)
    return value if math.isfinite(value) else None


def _show(raw: object) -> str:
    if isinstance(raw, float):
        return repr(raw)
    return repr(raw) if isinstance(raw, str) else str(raw)


def _find_metric(
    metrics: Mapping[str, Any], name: str, registry: MetricsRegistry
) -> tuple[str, Any] | None:
    """(key, value) of ``name`` in ``metrics``: exact, short name, then the registry's full name."""
    candidates = [name, name.rsplit("/", 1)[-1]]
    if name in registry:
        try:
            candidates.append(registry.get(name).full_name)
        except ExpflowError:
            pass  # an ambiguous short name: only exact keys count
    for key in candidates:
        if key in metrics:
            return key, metrics[key]
    return None


def _check_primary(metrics: Mapping[str, Any], primary: str, registry: MetricsRegistry) -> Check:
    rule = f"{primary} is reported as a finite number"
    found = _find_metric(metrics, primary, registry)
    if found is None:
        available = ", ".join(sorted(map(str, metrics))) or "(none)"
        return Check(
            "primary score",
            FAIL,
            "missing",
            rule,
            f"primary metric {primary!r} is not reported; metrics reported: {available}",
        )
    key, raw = found
    if _number(raw) is None:
        return Check(
            "primary score",
            FAIL,
            f"{key} = {_show(raw)}",
            rule,
            f"primary metric {key} = {_show(raw)} is not a finite number",
        )
    return Check("primary score", PASS, f"{key} = {_show(raw)}", rule, f"{key} is reported")


def _check_threshold(
    gate: Gate, metrics: Mapping[str, Any], registry: MetricsRegistry, is_primary: bool
) -> Check:
    symbol = OPS[gate.op][1]
    rule = f"{gate.metric} {symbol} {gate.threshold!r}"
    name = f"threshold {gate.metric}"
    found = _find_metric(metrics, gate.metric, registry)
    if found is None:
        if is_primary:
            return Check(
                name, FAIL, "missing", rule, f"{gate.metric} is the primary metric and missing"
            )
        return Check(name, NA, "not reported", rule, f"{gate.metric} is not reported")
    key, raw = found
    result = gate.evaluate({gate.metric: raw})
    outcome = PASS if result.passed else FAIL
    return Check(name, outcome, f"{key} = {_show(raw)}", rule, result.message)


def _norm_param(key: str) -> str:
    """``Args/--Sub-Step`` -> ``sub_step``: group dropped, dashes of flags and argparse undone."""
    return key.rsplit("/", 1)[-1].lstrip("-").replace("-", "_").lower()


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections (``{"Args": {"lr": 1}}``) as ``Args/lr`` keys, as ClearML shows them."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{full}/"))
        else:
            out[full] = value
    return out


def _parse_rule(param: str, rule: object) -> tuple[str, float] | None:
    """``'gt:0'`` -> ('gt', 0.0); ``'present'`` -> None; anything else is an ExpflowError."""
    bad = ExpflowError(f"required param rule {param}={rule!r} is not valid; expected {_RULE_FORMS}")
    if not isinstance(rule, str):
        raise bad
    text = rule.strip().lower()
    if text == "present":
        return None
    parts = [p.strip() for p in text.split(":")]
    if len(parts) != 2 or parts[0] not in OPS:
        raise bad
    try:
        value = float(parts[1])
    except ValueError:
        raise bad from None
    if math.isnan(value):
        raise bad
    return parts[0], value


def _param_number(raw: object) -> float | None:
    # Tracked params often come back as text ("1"), so numeric text counts as a number.
    if isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            return None
    return _number(raw)


def _check_param(param: str, rule: tuple[str, float] | None, flat: Mapping[str, Any]) -> Check:
    name = f"param {param}"
    want = _norm_param(param)
    if rule is None:
        rule_text = f"{param} is set"
    else:
        rule_text = f"{param} {OPS[rule[0]][1]} {rule[1]!r}"
    matches = {k: v for k, v in flat.items() if _norm_param(k) == want}
    if not matches:
        return Check(
            name, FAIL, "missing", rule_text, f"required param {param!r} is not among the params"
        )
    observed = ", ".join(f"{k} = {_show(v)}" for k, v in matches.items())
    if len({_show(v) for v in matches.values()}) > 1:
        return Check(
            name,
            FAIL,
            observed,
            rule_text,
            f"required param {param!r} is set more than once with different values",
        )
    key, raw = next(iter(matches.items()))
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return Check(name, FAIL, observed, rule_text, f"{key} is empty")
    if rule is None:
        return Check(name, PASS, observed, rule_text, f"{key} is set")
    value = _param_number(raw)
    if value is None:
        return Check(
            name, FAIL, observed, rule_text, f"{key} = {_show(raw)} is not a finite number"
        )
    op, threshold = rule
    compare, symbol = OPS[op]
    if compare(value, threshold):
        return Check(name, PASS, observed, rule_text, f"{key} = {value!r} {symbol} {threshold!r}")
    return Check(
        name, FAIL, observed, rule_text, f"{key} = {value!r}, needs {symbol} {threshold!r}"
    )


def _check_bundle(
    bundle: Path,
    pred_patterns: Iterable[str],
    metrics: Mapping[str, Any],
    primary: str,
    registry: MetricsRegistry,
) -> list[Check]:
    patterns = tuple(pred_patterns)
    required = f"{MANIFEST}, {METRICS}, {PARAMS} and a prediction file ({' or '.join(patterns)})"
    if not bundle.is_dir():
        missing = f"bundle {str(bundle)!r} does not exist or is not a folder"
        return [
            Check("bundle complete", FAIL, "no bundle folder", required, missing),
            Check(
                "bundle checksums", FAIL, "no bundle folder", "manifest checksums match", missing
            ),
            Check("bundle metrics", FAIL, "no bundle folder", f"{METRICS} matches", missing),
        ]
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    preds = [f for f in files if any(fnmatch(f.rsplit("/", 1)[-1].lower(), p) for p in patterns)]
    missing = [f for f in (MANIFEST, METRICS, PARAMS) if f not in files]
    if not preds:
        missing.append(f"prediction file ({' or '.join(patterns)})")
    observed = ", ".join(files) or "(empty)"
    checks = [
        Check(
            "bundle complete",
            FAIL if missing else PASS,
            observed,
            required,
            f"missing: {', '.join(missing)}" if missing else "all required files are present",
        )
    ]
    problems = verify_bundle(bundle)
    checks.append(
        Check(
            "bundle checksums",
            FAIL if problems else PASS,
            f"{len(problems)} problem(s)",
            "every file listed in the manifest with matching size and sha256, none unlisted",
            "; ".join(problems) if problems else "manifest checksums match",
        )
    )
    checks.append(_check_bundle_metrics(bundle, metrics, primary, registry))
    return checks


def _check_bundle_metrics(
    bundle: Path, metrics: Mapping[str, Any], primary: str, registry: MetricsRegistry
) -> Check:
    """The bundle's own metrics.json must report the same primary score as the experiment."""
    rule = f"{METRICS} reports the same {primary} as the experiment"
    reported = _find_metric(metrics, primary, registry)
    if reported is None or _number(reported[1]) is None:
        return Check("bundle metrics", NA, "no usable primary score", rule, "nothing to compare")
    try:
        data = json.loads((bundle / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Check(
            "bundle metrics",
            FAIL,
            "unreadable",
            rule,
            f"{METRICS} is unreadable ({type(exc).__name__})",
        )
    found = _find_metric(data, primary, registry) if isinstance(data, dict) else None
    if found is None:
        return Check("bundle metrics", FAIL, "missing", rule, f"{METRICS} lacks {primary!r}")
    ours, theirs = float(reported[1]), _number(found[1])
    observed = f"{found[0]} = {_show(found[1])}"
    if theirs is None or theirs != ours:
        return Check(
            "bundle metrics",
            FAIL,
            observed,
            rule,
            f"{METRICS} has {observed}, the experiment reports {ours!r}",
        )
    return Check("bundle metrics", PASS, observed, rule, f"{METRICS} agrees")


def audit_experiment(
    name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    *,
    registry: MetricsRegistry,
    primary: str = "nrmse",
    required_params: Mapping[str, str] | None = None,
    bundle: Path | str | None = None,
    pred_patterns: Iterable[str] = PRED_PATTERNS,
) -> AuditReport:
    """Audit one experiment's params, metrics and (optionally) submission bundle.

    ``required_params`` maps a param to ``'op:value'`` or ``'present'``; a bad rule is an ExpflowError.
    """
    rules = {p: _parse_rule(p, r) for p, r in (required_params or {}).items()}
    params = params or {}
    metrics = metrics or {}
    checks = [_check_primary(metrics, primary, registry)]
    primary_full = registry.get(primary).full_name if primary in registry else primary
    for gate in registry.thresholds():
        is_primary = gate.metric in (primary, primary_full)
        checks.append(_check_threshold(gate, metrics, registry, is_primary))
    flat = _flatten(params)
    checks += [_check_param(p, rule, flat) for p, rule in rules.items()]
    if bundle is not None:
        checks += _check_bundle(
            Path(bundle).expanduser(), pred_patterns, metrics, primary, registry
        )
    return AuditReport(subject=f"experiment {name}", checks=tuple(checks))


# ---------------------------------------------------------------- dataset audit


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
            wrong.append(f"{key}: file {_show(raw)}, name {values[key]}")
    observed = ", ".join(f"{k} = {_show(v)}" for k, v in stored.items())
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


def _scan(ds: h5py.Dataset) -> tuple[int, int, int | None]:
    """(NaN count, inf count, first bad index on axis 0), reading slabs along axis 0."""
    if ds.ndim == 0:
        data = np.asarray(ds[()])
        nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        return nan, inf, (0 if nan or inf else None)
    row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = max(1, _SCAN_BYTES // row)
    nan = inf = 0
    first = None
    for start in range(0, ds.shape[0], step):
        block = ds[start : start + step]
        bad_nan, bad_inf = np.isnan(block), np.isinf(block)
        n_nan, n_inf = int(bad_nan.sum()), int(bad_inf.sum())
        if (n_nan or n_inf) and first is None:
            rows = np.any((bad_nan | bad_inf).reshape(block.shape[0], -1), axis=1)
            first = start + int(np.argmax(rows))
        nan, inf = nan + n_nan, inf + n_inf
    return nan, inf, first


def _value_checks(datasets: Mapping[str, h5py.Dataset]) -> list[Check]:
    """dtype float32/float64 and no NaN/inf in each data set."""
    dtypes = {k: ds.dtype for k, ds in datasets.items()}
    bad_types = [f"{k}: {d}" for k, d in dtypes.items() if d not in FLOAT_DTYPES]
    observed = ", ".join(f"{k}: {d}" for k, d in dtypes.items())
    checks = [
        Check(
            "dtype",
            FAIL if bad_types else PASS,
            observed,
            "float32 or float64",
            f"not float32/float64: {', '.join(bad_types)}" if bad_types else "all floating point",
        )
    ]
    found = []
    for key, ds in datasets.items():
        if ds.dtype.kind not in "fc":
            continue  # integers cannot hold NaN/inf; the dtype check already failed them
        nan, inf, first = _scan(ds)
        if nan or inf:
            found.append(f"{key}: {nan} NaN, {inf} inf (first at index {first} of axis 0)")
    scanned = [k for k, ds in datasets.items() if ds.dtype.kind in "fc"]
    if not scanned:
        checks.append(
            Check("finite values", NA, "no float data", "no NaN or inf", "nothing to scan")
        )
    else:
        checks.append(
            Check(
                "finite values",
                FAIL if found else PASS,
                "; ".join(found) if found else f"scanned {', '.join(scanned)}",
                "no NaN or inf",
                "non-finite values found" if found else "all values are finite",
            )
        )
    return checks


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
    return checks + _value_checks({"tensor": tensor})


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
    return checks + _value_checks({f"{g}/data": f[g]["data"] for g in groups})


def audit_dataset(path: Path | str) -> AuditReport:
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


# ---------------------------------------------------------------- rules and the ledger

RULES_ENV = "EXPFLOW_AUDIT_RULES"
RULES_FILE = "audit.yaml"


@dataclass(frozen=True)
class AuditRules:
    """A team's competition rules: the primary score and required params (``'gt:0'``, ``'present'``)."""

    primary: str = "nrmse"
    required_params: Mapping[str, str] | None = None

    @classmethod
    def load(cls, path: Path | str | None = None) -> AuditRules:
        """Rules from ``path``, else ``$EXPFLOW_AUDIT_RULES``, else ``<home>/audit.yaml``, else defaults."""
        import os

        import yaml

        from expflow_flows.home import expflow_home

        named = path or os.environ.get(RULES_ENV)
        p = Path(named).expanduser() if named else expflow_home() / RULES_FILE
        if not p.exists():
            if named:
                raise ExpflowError(f"audit rules file {str(p)!r} does not exist")
            return cls()
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ExpflowError(f"audit rules {str(p)!r} are not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ExpflowError(
                f"audit rules {str(p)!r} must be a mapping with primary, required_params"
            )
        unknown = sorted(set(data) - {"primary", "required_params"})
        if unknown:
            raise ExpflowError(
                f"audit rules key {unknown[0]!r} is not known; expected primary, required_params"
            )
        required = data.get("required_params") or {}
        if not isinstance(required, dict):
            raise ExpflowError(
                "audit rules: required_params must map a param to 'op:value' or 'present'"
            )
        rules = cls(primary=str(data.get("primary") or "nrmse"), required_params=required)
        for param, rule in required.items():
            _parse_rule(str(param), rule)  # a bad rule is refused when the file is read
        return rules


def bundle_of(run_dir: str | Path | None) -> Path | None:
    """The submission bundle a pipeline run wrote, from its ``summary.json`` (None if none)."""
    if not run_dir:
        return None
    summary = Path(run_dir) / "summary.json"
    try:
        bundle = json.loads(summary.read_text(encoding="utf-8")).get("bundle")
    except (OSError, ValueError):
        return None
    return Path(bundle) if bundle else None


def audit_ledger_experiment(
    experiment: Any, registry: MetricsRegistry, rules: AuditRules
) -> AuditReport:
    """Audit a ledger experiment (its params, metrics and the bundle its run wrote)."""
    return audit_experiment(
        f"{experiment.name} ({experiment.id})",
        experiment.params,
        experiment.metrics,
        registry=registry,
        primary=rules.primary,
        required_params=rules.required_params,
        bundle=bundle_of(experiment.run_dir),
    )


def combined_markdown(reports: Iterable[AuditReport], title: str = "Audit report") -> str:
    """Several audits in one Markdown document, failures counted first."""
    reports = list(reports)
    failed = sum(not r.passed for r in reports)
    head = f"# {title}\n\n{len(reports)} audited, {failed} failed.\n\n"
    return head + "\n".join(r.to_markdown() for r in reports)


def combined_html(reports: Iterable[AuditReport], title: str = "Audit report") -> str:
    """Several audits in one self-contained HTML page."""
    reports = list(reports)
    failed = sum(not r.passed for r in reports)
    e = html.escape
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"{_HTML_STYLE}</head><body>\n<h1>{e(title)}</h1>\n"
        f"<p>{len(reports)} audited, {failed} failed.</p>\n"
        + "".join(r.html_section() for r in reports)
        + "</body></html>\n"
    )
