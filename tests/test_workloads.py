"""Workloads register themselves: the generic core shows the PDE workload's metrics and
dataset audit without importing it until a registry is consulted."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from expflow_flows.governance.audit import FAIL, audit_dataset, dataset_audits
from expflow_flows.metrics.registry import MetricsRegistry
from expflow_flows.workloads import GROUP


def _probe(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_imports_no_workload_until_a_registry_is_consulted() -> None:
    seen = _probe(
        "import json, sys\n"
        "import expflow_flows.metrics.registry as r, expflow_flows.governance.audit\n"
        "before = any(m.startswith('expflow_flows.pde') for m in sys.modules)\n"
        "names = r.MetricsRegistry.builtin().names()\n"
        "after = 'expflow_flows.pde' in sys.modules\n"
        "print(json.dumps({'before': before, 'after': after, 'names': names}))\n"
    )
    assert seen["before"] is False
    assert seen["after"] is True
    assert {"PDE/nrmse", "PDE/rmse", "PDE/fourier_high"} <= set(seen["names"])


def test_pde_workload_is_declared_and_registers_metrics_and_dataset_audit() -> None:
    assert "pde" in {ep.name for ep in entry_points(group=GROUP)}
    spec = MetricsRegistry.builtin().get("nrmse")
    assert (spec.full_name, spec.direction) == ("PDE/nrmse", "minimize")
    assert "PDEBench" in spec.description
    assert [a.name for a in dataset_audits()] == ["PDEBench"]


def test_a_file_no_dataset_audit_covers_fails_naming_the_registered_ones(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    report = audit_dataset(path)
    assert not report.passed
    (check,) = report.checks
    assert check.outcome == FAIL
    assert "'table.csv'" in check.message and "PDEBench (*.hdf5, *.h5)" in check.message
