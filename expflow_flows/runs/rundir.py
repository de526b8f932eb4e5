"""Run directories: the filesystem is the schema.

``<root>/<experiment>/<run-id>/`` holds ``params.json``, ``metrics.json``,
``metadata.json``, ``output.log`` (all captured output), ``status`` (first line
ok / warning / pruned / failed, then the reason and any warning lines) and the
run's own artifacts. A run can be re-run from that folder alone.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expflow_flows import atomic
from expflow_flows.secrets import scrub

STATUSES = ("ok", "warning", "pruned", "failed")


def new_run_id(prefix: str = "run") -> str:
    """A time-ordered, collision-resistant run id such as ``train-20261122-220403-9f3a``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class RunDir:
    """One run's folder and the files the contract puts in it."""

    path: Path

    @classmethod
    def create(cls, path: Path) -> RunDir:
        """Create the folder (parents included); an existing folder is reused."""
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def log_path(self) -> Path:
        return self.path / "output.log"

    def write_params(self, params: dict[str, Any]) -> None:
        """The run's params as a record: secret-looking values are masked (the run itself
        gets them from its caller, never from this file)."""
        atomic.write_json(self.path / "params.json", scrub(params))

    def write_metrics(self, metrics: dict[str, float]) -> None:
        atomic.write_json(self.path / "metrics.json", metrics)

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        atomic.write_json(self.path / "metadata.json", metadata)

    def write_intermediate(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            atomic.write_json(self.path / "intermediate.json", rows)

    def write_status(
        self, status: str, reason: str = "", warnings: list[str] | None = None
    ) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        lines = [status]
        if reason:
            lines.append(reason.replace("\n", " "))
        lines += [f"warning: {w}" for w in warnings or []]
        atomic.write_text(self.path / "status", "\n".join(lines) + "\n")

    def read_status(self) -> tuple[str, str]:
        """The status word and the reason line ('' when none)."""
        lines = (self.path / "status").read_text(encoding="utf-8").splitlines()
        return lines[0], (
            lines[1] if len(lines) > 1 and not lines[1].startswith("warning: ") else ""
        )

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def log_tail(self, n: int = 1) -> str:
        """The last ``n`` non-empty lines of the captured output."""
        if not self.log_path.exists():
            return ""
        lines = [ln.strip() for ln in self.log_path.read_text("utf-8", "replace").splitlines()]
        lines = [ln for ln in lines if ln]
        return " | ".join(lines[-n:])

    def scan_warnings(self, pattern: re.Pattern[str], limit: int = 5) -> list[str]:
        """Log lines that look like warnings (at most ``limit``)."""
        if not self.log_path.exists():
            return []
        found: list[str] = []
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if pattern.search(line) and not line.lstrip().startswith("warnings.warn("):
                    found.append(line.strip()[:300])
                    if len(found) >= limit:
                        break
        return found
