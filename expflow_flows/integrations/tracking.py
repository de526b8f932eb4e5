"""Mirroring runs to tracking tools (ClearML, Langfuse) without making any of them required.

A pipeline or sweep run names the tools in its ``tracking`` setting::

    tracking:
      clearml: {project: pde, tags: [nightly], offline: true}
      langfuse: {}

and calls one :class:`Tracking` object at a few points: the run starts
(:meth:`Tracking.run_started`), a step finishes (:meth:`Tracking.record`: a trial,
the final training, the evaluation, a sweep combination), the run ends
(:meth:`Tracking.run_finished`). Each tool is an adapter class loaded by name, only
when a run asks for it, so its SDK is imported only then.

Tracking is a mirror, not the record: the run folder, the ledger and Prefect hold the
truth. A tool that is asked for but cannot be loaded (SDK missing, bad settings) stops
the run before any work with one line naming the fix; a tool that fails later (a
server that went away) logs one warning and is switched off for the rest of the run,
which goes on.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError

log = logging.getLogger("expflow.tracking")

# name -> "module:Class". Each class takes its settings as keyword arguments.
ADAPTERS: dict[str, str] = {
    "clearml": "expflow_flows.integrations.clearml:ClearMLTracker",
    "langfuse": "expflow_flows.integrations.langfuse:LangfuseTracker",
}


@dataclass
class RunContext:
    """The run being mirrored."""

    kind: str  # "pipeline" or "sweep"
    name: str  # the experiment or sweep name
    run_dir: Path
    params: dict[str, Any]  # the run's settings, already scrubbed of secrets
    flow_run_id: str = ""
    flow_run_url: str | None = None
    tags: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)


@dataclass
class StepRecord:
    """One finished step of a run.

    ``kind`` is "trial", "train", "evaluate", "combination" or "aggregate"; ``status``
    is the run status (ok / warning / pruned / failed) or an HPO outcome; ``script``
    says whether the step ran a script, whose parameters ClearML shows as ``Args/…``.
    """

    kind: str
    name: str
    params: dict[str, Any]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    intermediate: list[dict[str, Any]] = field(default_factory=list)
    started: float | None = None  # epoch seconds
    wall_s: float = 0.0
    run_dir: Path | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    script: bool = False
    reason: str = ""
    number: int | None = None  # trial number or combination index


class Tracker:
    """What an adapter implements; every method may be left as this no-op."""

    name = "tracker"
    # The SDK the adapter imports, named for the "needs … pip install" line: (what,
    # module, extra). None: it needs none.
    sdk: tuple[str, str, str] | None = None

    @classmethod
    def needs_sdk(cls, settings: dict[str, Any]) -> bool:
        """Whether these settings need the SDK (a switched-off tool may not)."""
        return cls.sdk is not None

    # Sweeps record each combination only with adapters that ask for them: a sweep of
    # 10,000 combinations must not become 10,000 spans or tasks by default.
    wants_combinations = False

    def run_started(self, context: RunContext) -> None:
        """The run began: create the parent task / trace."""

    def record(self, step: StepRecord) -> None:
        """A step finished."""

    def run_finished(
        self,
        status: str,
        metrics: dict[str, float],
        artifacts: dict[str, Path],
        message: str = "",
    ) -> None:
        """The run ended (status ok / failed / gate-failed) with its final metrics."""

    def close(self) -> None:
        """Flush and release; bounded in time, never raises."""


def adapter_class(name: str, settings: Any) -> type[Tracker]:
    """The adapter class called ``name`` (its module imports no SDK), or one error line."""
    target = ADAPTERS.get(name)
    if target is None:
        raise ExpflowError(
            f"tracking tool {name!r} is not known; accepted: {', '.join(sorted(ADAPTERS))}"
        )
    if settings is not None and not isinstance(settings, dict):
        raise ExpflowError(
            f"tracking.{name} must be a mapping of settings (or {{}}), not {settings!r}"
        )
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_adapter(name: str, settings: dict[str, Any] | None) -> Tracker:
    """The adapter called ``name`` built from its settings, or one clear error line."""
    cls = adapter_class(name, settings)
    try:
        return cls(**(settings or {}))
    except TypeError as exc:
        raise ExpflowError(f"tracking.{name}: {exc}") from None


def check_settings(settings: Any) -> None:
    """Cheap checks of a ``tracking`` setting before anything starts (no SDK imported, no
    client made): the tools are known, their settings are mappings, their SDKs are
    installed. The CLI runs them before it starts a flow."""
    if not settings:
        return
    if not isinstance(settings, dict):
        raise ExpflowError(
            f"tracking={settings!r}: expected a mapping such as "
            "{clearml: {project: pde}, langfuse: {}}"
        )
    for name, opts in settings.items():
        cls = adapter_class(name, opts)
        if cls.sdk and cls.needs_sdk(opts or {}):
            what, module, extra = cls.sdk
            if importlib.util.find_spec(module) is None:
                raise ExpflowError(
                    f"{what} needs the {module} package: pip install 'expflow-flows[{extra}]'"
                )


class Tracking:
    """Fans each event out to the configured adapters; failures switch one adapter off."""

    def __init__(self, adapters: list[Tracker] | None = None):
        self.adapters = list(adapters or [])
        self.warnings: list[str] = []

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> Tracking:
        """Build from a run's ``tracking`` setting; an empty one tracks nothing."""
        if not settings:
            return cls()
        if not isinstance(settings, dict):
            raise ExpflowError(
                f"tracking={settings!r}: expected a mapping such as "
                "{clearml: {project: pde}, langfuse: {}}"
            )
        return cls([load_adapter(name, opts) for name, opts in settings.items()])

    def __bool__(self) -> bool:
        return bool(self.adapters)

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for adapter in list(self.adapters):
            self._each_of(adapter, method, *args, **kwargs)

    def _each_of(self, adapter: Tracker, method: str, *args: Any, **kwargs: Any) -> None:
        try:
            getattr(adapter, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a mirror must not stop the run
            message = (
                f"{adapter.name} tracking failed in {method} ({type(exc).__name__}: "
                f"{exc}); the run goes on without it"
            )
            log.warning("%s", message)
            self.warnings.append(message)
            if adapter in self.adapters:
                self.adapters.remove(adapter)
            try:
                adapter.close()
            except Exception:  # noqa: BLE001
                pass

    def run_started(self, context: RunContext) -> None:
        self._each("run_started", context)

    def record(self, step: StepRecord) -> None:
        if step.kind == "combination":
            for adapter in [a for a in self.adapters if a.wants_combinations]:
                self._each_of(adapter, "record", step)
            return
        self._each("record", step)

    @property
    def wants_combinations(self) -> bool:
        return any(a.wants_combinations for a in self.adapters)

    def run_finished(
        self,
        status: str,
        metrics: dict[str, float],
        artifacts: dict[str, Path] | None = None,
        message: str = "",
    ) -> None:
        self._each("run_finished", status, metrics, artifacts or {}, message)

    def close(self) -> None:
        for adapter in self.adapters:
            try:
                adapter.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("%s tracking did not close cleanly: %s", adapter.name, exc)

    def __enter__(self) -> Tracking:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if _ACTIVE and _ACTIVE[-1] is self:
            _ACTIVE.pop()
        self.close()


# The tracking of the run in progress in this process, for steps that run in nested
# flows (the HPO stage) and cannot take it as a flow parameter.
_ACTIVE: list[Tracking] = []


def active() -> Tracking:
    """The innermost run's tracking, or one that tracks nothing."""
    return _ACTIVE[-1] if _ACTIVE else Tracking()


def require_sdk(module: str, extra: str, what: str) -> Any:
    """Import an optional SDK or raise one line naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExpflowError(
            f"{what} needs the {module} package: pip install 'expflow-flows[{extra}]'"
        ) from None
