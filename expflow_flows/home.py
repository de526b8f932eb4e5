"""Where expflow keeps its state: the expflow home and the folders under it."""

from __future__ import annotations

import os
from pathlib import Path


def expflow_home() -> Path:
    """The expflow home: ``$EXPFLOW_HOME`` or ``~/.expflow`` (created on first use)."""
    home = Path(os.environ.get("EXPFLOW_HOME") or Path.home() / ".expflow").expanduser()
    if not home.exists():
        # Private by default: the home holds the PIN hash, the audit log and studies.
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def runs_root() -> Path:
    """Root of run directories: ``<home>/runs/<experiment>/<run-id>/``."""
    return Path(os.environ.get("EXPFLOW_RUNS_ROOT") or expflow_home() / "runs").expanduser()


def data_dir() -> Path:
    """Where generated datasets are cached."""
    return Path(os.environ.get("EXPFLOW_DATA_DIR") or expflow_home() / "data").expanduser()


def submissions_dir() -> Path:
    """Default target folder for submission bundles."""
    return expflow_home() / "submissions"


def default_optuna_storage() -> str:
    """The default Optuna storage: a journal file under the expflow home."""
    return str(expflow_home() / "optuna" / "journal.log")
