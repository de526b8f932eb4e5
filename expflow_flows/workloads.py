"""Workloads plug into the generic registries: their metrics and their dataset audits.

A workload (our PDE baseline, or a team's own package) is a function ``register(workloads)``
named by an entry point of the ``expflow_flows.workloads`` group::

    [project.entry-points."expflow_flows.workloads"]
    pde = "expflow_flows.pde.plugin:register"

It calls :meth:`Workloads.add_metrics` and :meth:`Workloads.add_dataset_audit`. The
registries load the workloads on first use, never at import, so the generic core does not
import a workload, and a workload costs nothing until a registry is consulted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from expflow_flows.errors import ExpflowError

if TYPE_CHECKING:
    from expflow_flows.governance.audit import DatasetAudit
    from expflow_flows.metrics.registry import MetricSpec

GROUP = "expflow_flows.workloads"


@dataclass
class Workloads:
    """What the registered workloads contribute, in the order they registered it."""

    names: list[str] = field(default_factory=list)
    metrics: list[MetricSpec] = field(default_factory=list)
    dataset_audits: list[DatasetAudit] = field(default_factory=list)

    def add_metrics(self, specs: Iterable[MetricSpec]) -> None:
        """Add metrics to the built-in metrics registry."""
        self.metrics.extend(specs)

    def add_dataset_audit(self, audit: DatasetAudit) -> None:
        """Add an audit of data files to :func:`expflow_flows.governance.audit.audit_dataset`."""
        self.dataset_audits.append(audit)


# Reentrant, so a register() that consults a registry gets an error rather than a deadlock.
_lock = threading.RLock()
_loaded: Workloads | None = None
_loading = False


def _entry_points() -> list[tuple[str, str, Callable[[], Callable[[Workloads], None]]]]:
    found = sorted(entry_points(group=GROUP), key=lambda ep: ep.name)
    return [(ep.name, ep.value, ep.load) for ep in found]


def loaded() -> Workloads:
    """Every installed workload, registered once per process (the first call loads them).

    A workload that fails to load or register is an ExpflowError: a registry missing its
    metrics would let gates and audits pass that should not.
    """
    global _loaded, _loading
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if _loading:
            raise ExpflowError(
                "a workload's register() consulted a registry while registering; "
                "register() may only call add_metrics and add_dataset_audit"
            )
        _loading = True
        try:
            found = Workloads()
            for name, target, load in _entry_points():
                try:
                    load()(found)
                except ExpflowError:
                    raise
                except Exception as exc:
                    raise ExpflowError(
                        f"workload {name!r} ({target}) failed to register "
                        f"({type(exc).__name__}: {exc}); reinstall or uninstall the package "
                        f"that declares it in the {GROUP!r} entry points"
                    ) from exc
                found.names.append(name)
            _loaded = found
        finally:
            _loading = False
    return _loaded
