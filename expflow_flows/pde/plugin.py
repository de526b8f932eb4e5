"""The PDE workload's registration: PDEBench's metrics and the PDEBench dataset audit.

Named by the ``pde`` entry point of the ``expflow_flows.workloads`` group (pyproject.toml);
the generic registries call :func:`register` the first time they are consulted.
"""

from __future__ import annotations

from expflow_flows.metrics.registry import MetricSpec
from expflow_flows.pde.audit import DATASET_AUDIT
from expflow_flows.pde.metrics import METRIC_KEYS
from expflow_flows.workloads import Workloads

GROUP = "PDE"
DESCRIPTIONS = {
    "rmse": "PDEBench RMSE over space, averaged over batch, channels and time",
    "nrmse": "PDEBench normalised RMSE (error RMS / target RMS per sample)",
    "crmse": "PDEBench conserved-quantity RMSE",
    "max_err": "PDEBench largest absolute error",
    "brmse": "PDEBench boundary RMSE",
    "fourier_low": "PDEBench Fourier-space error, low wave numbers",
    "fourier_mid": "PDEBench Fourier-space error, middle wave numbers",
    "fourier_high": "PDEBench Fourier-space error, high wave numbers",
}


def register(workloads: Workloads) -> None:
    """Add PDEBench's metrics (group ``PDE``, lower is better) and the PDEBench dataset audit."""
    workloads.add_metrics(
        MetricSpec(name=key, group=GROUP, description=DESCRIPTIONS[key]) for key in METRIC_KEYS
    )
    workloads.add_dataset_audit(DATASET_AUDIT)
