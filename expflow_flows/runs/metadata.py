"""What a run was made with: Python, packages, machine, and the code's git version."""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "expflow-flows",
    "prefect",
    "prefect-dask",
    "dask",
    "distributed",
    "optuna",
    "numpy",
    "h5py",
)


def git_version(path: Path | str = ".") -> dict[str, Any]:
    """The git commit of ``path`` and a hash of its uncommitted diff (empty outside a repo)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    try:
        diff = git("diff", "HEAD")
    except (OSError, subprocess.SubprocessError):
        diff = ""
    return {
        "git_commit": commit,
        "git_dirty": bool(diff),
        "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape a result."""
    out = {}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def gpus() -> list[str]:
    """GPU names and memory from nvidia-smi; empty where there is none."""
    import shutil

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def capture_environment(code_dir: Path | str = ".") -> dict[str, Any]:
    """Machine, Python, packages and code version, for a run's ``metadata.json``."""
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001 - memory size is nice to have
        memory_gb = None
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "memory_gb": memory_gb,
        "cpu_model": _cpu_model(),
        "gpus": gpus(),
        "packages": package_versions(),
        **git_version(code_dir),
    }
