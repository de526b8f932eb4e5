"""What a run was made with: Python, packages, machine, and the code's git version."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
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


def run_git(cwd: Path | str, *args: str, timeout: float = 30) -> str | None:
    """``git -C cwd args...``'s output, or None when git is missing, fails or times out."""
    try:
        return subprocess.run(
            ["git", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class GitSnapshot:
    """The repository holding some code: its top folder, commit and uncommitted diff."""

    toplevel: Path
    commit: str
    diff: str


def git_snapshot(
    where: Path | str, *, exclude: Sequence[str] = (), timeout: float = 30
) -> GitSnapshot | None:
    """Top folder, HEAD commit and diff against HEAD of the repository holding ``where``.

    None outside a repository or in one without commits; ``exclude`` holds git pathspecs
    (``:(top,exclude,glob)**/.env``) whose changes are left out of the diff.
    """
    # One call for both; it fails outside a repository and in one without commits
    # (nothing to pin).
    out = run_git(where, "rev-parse", "--show-toplevel", "HEAD", timeout=timeout)
    lines = (out or "").splitlines()
    if len(lines) != 2:
        return None
    toplevel, commit = Path(lines[0]), lines[1]
    pathspec = ["--", *exclude] if exclude else []
    diff = run_git(
        toplevel, "diff", "--no-color", "--no-ext-diff", "HEAD", *pathspec, timeout=timeout
    )
    return GitSnapshot(toplevel, commit, diff or "")


def git_version(path: Path | str = ".") -> dict[str, Any]:
    """The git commit of ``path`` and a hash of its uncommitted diff (empty outside a repo)."""
    snap = git_snapshot(path, timeout=10)
    if snap is None:
        return {}
    diff = snap.diff
    return {
        "git_commit": snap.commit,
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


def normalized_distribution_name(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, str]:
    """Every installed distribution's version, by normalized name (first on sys.path wins)."""
    out: dict[str, str] = {}
    for dist in importlib_metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            out.setdefault(normalized_distribution_name(name), dist.version)
    return dict(sorted(out.items()))


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


def capture_environment(code_dir: Path | str = ".", *, git: bool = True) -> dict[str, Any]:
    """Machine, Python, packages and (with ``git``) code version, for a run's ``metadata.json``."""
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
        **(git_version(code_dir) if git else {}),
    }
