"""Audits: named pass/fail/n-a checks of an experiment's results or of a data file.

:func:`audit_experiment` checks one experiment against the competition rules (primary score
reported, registry thresholds met, required params present and valid, submission bundle
intact); :func:`audit_dataset` checks a data file with the dataset audit a workload
registered for it (the PDE workload's checks PDEBench HDF5 files, see
:mod:`expflow_flows.workloads`). Both take plain data and fail closed: what cannot be read or
checked where a rule applies is a failure, and ``n/a`` is kept for rules that do not apply.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from expflow_flows import workloads
from expflow_flows.bundles.submission import MANIFEST, METRICS, PARAMS, verify_bundle
from expflow_flows.errors import ExpflowError
from expflow_flows.html import render
from expflow_flows.metrics.gates import Gate
from expflow_flows.metrics.registry import MetricsRegistry
from expflow_flows.metrics.rules import OPS, OPS_TEXT, Condition, RuleSyntaxError, parse_condition

PASS, FAIL, NA = "pass", "fail", "n/a"
OUTCOMES = (PASS, FAIL, NA)
PRED_PATTERNS = ("pred*.hdf5", "pred*.h5")
FLOAT_DTYPES = (np.dtype("float32"), np.dtype("float64"))
_RULE_FORMS = f"'op:value' (e.g. 'gt:0') with op one of {OPS_TEXT}, or 'present'"
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
        return render(
            "audit_report.html.j2", title=f"Audit: {self.subject}", heading=False, reports=[self]
        )

    def html_section(self) -> str:
        """The report's heading, verdict and table, for embedding in a bigger page."""
        return render("audit_section.html.j2", report=self)


def _number(raw: object) -> float | None:
    """``raw`` as a finite float, or None (bools, text, NaN and inf are not scores)."""
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
        return None
    value = float(raw)
    return value if math.isfinite(value) else None


def show_value(raw: object) -> str:
    """A value as checks show it: floats and text by repr, anything else by str."""
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
            f"{key} = {show_value(raw)}",
            rule,
            f"primary metric {key} = {show_value(raw)} is not a finite number",
        )
    return Check("primary score", PASS, f"{key} = {show_value(raw)}", rule, f"{key} is reported")


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
    return Check(name, outcome, f"{key} = {show_value(raw)}", rule, result.message)


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


def _parse_rule(param: str, rule: object) -> Condition | None:
    """``'gt:0'`` -> gt 0.0; ``'present'`` -> None; anything else is an ExpflowError."""
    if isinstance(rule, str) and rule.strip().lower() == "present":
        return None
    try:
        return parse_condition(rule)
    except RuleSyntaxError:
        raise ExpflowError(
            f"required param rule {param}={rule!r} is not valid; expected {_RULE_FORMS}"
        ) from None


def _param_number(raw: object) -> float | None:
    # Tracked params often come back as text ("1"), so numeric text counts as a number.
    if isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            return None
    return _number(raw)


def _check_param(param: str, rule: Condition | None, flat: Mapping[str, Any]) -> Check:
    name = f"param {param}"
    want = _norm_param(param)
    if rule is None:
        rule_text = f"{param} is set"
    else:
        rule_text = f"{param} {rule.symbol} {rule.value!r}"
    matches = {k: v for k, v in flat.items() if _norm_param(k) == want}
    if not matches:
        return Check(
            name, FAIL, "missing", rule_text, f"required param {param!r} is not among the params"
        )
    observed = ", ".join(f"{k} = {show_value(v)}" for k, v in matches.items())
    if len({show_value(v) for v in matches.values()}) > 1:
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
            name, FAIL, observed, rule_text, f"{key} = {show_value(raw)} is not a finite number"
        )
    symbol, threshold = rule.symbol, rule.value
    if rule.holds(value):
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
    observed = f"{found[0]} = {show_value(found[1])}"
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


@dataclass(frozen=True)
class DatasetAudit:
    """A workload's audit of its data files, for the files whose names match ``patterns``."""

    name: str
    patterns: tuple[str, ...]  # fnmatch patterns of file names, compared case-insensitively
    audit: Callable[[Path], AuditReport]

    def covers(self, path: Path) -> bool:
        """True when this audit is the one for ``path`` (by file name)."""
        name = path.name.lower()
        return any(fnmatch(name, p.lower()) for p in self.patterns)


def dataset_audits() -> list[DatasetAudit]:
    """The dataset audits the installed workloads registered (the PDE workload's PDEBench one)."""
    return list(workloads.loaded().dataset_audits)


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


def value_checks(datasets: Mapping[str, h5py.Dataset]) -> list[Check]:
    """The ``dtype`` (float32/float64) and ``finite values`` checks of HDF5 data sets."""
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


def audit_dataset(path: Path | str) -> AuditReport:
    """Audit a data file with the registered dataset audit that covers its name.

    A file no audit covers fails: nothing vouches for it.
    """
    path = Path(path).expanduser()
    audits = dataset_audits()
    for audit in audits:
        if audit.covers(path):
            return audit.audit(path)
    known = "; ".join(f"{a.name} ({', '.join(a.patterns)})" for a in audits) or "none installed"
    return AuditReport(
        f"dataset {path.name}",
        (
            Check(
                "file name",
                FAIL,
                path.name,
                "a file name a registered dataset audit covers",
                f"no dataset audit covers {path.name!r}; registered: {known}",
            ),
        ),
    )


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
    return render("audit_report.html.j2", title=title, heading=True, reports=list(reports))
