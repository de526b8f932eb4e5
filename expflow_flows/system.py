"""What is installed and reachable: one row per part expflow drives.

Each check is quick and bounded (short timeouts); a part that is missing or
unreachable is a row saying so, never an exception.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from importlib import metadata as importlib_metadata
from typing import Any

from expflow_flows.home import default_optuna_storage, expflow_home


def _row(part: str, state: str, detail: str) -> dict[str, str]:
    return {"part": part, "state": state, "detail": detail}


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def prefect_api() -> dict[str, str]:
    """The Prefect API in PREFECT_API_URL: healthy or not; none means ephemeral mode."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return _row(
            "Prefect API", "ephemeral", "PREFECT_API_URL unset: each process starts its own"
        )
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=3) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return _row("Prefect API", "unreachable", f"{url}: {exc}")
    return _row("Prefect API", "ok" if ok else "unhealthy", url)


def dask() -> dict[str, str]:
    """Dask's version, and the scheduler in DASK_SCHEDULER_ADDRESS when one is named."""
    ver = _version("distributed")
    if ver is None:
        return _row("Dask", "missing", "pip install distributed")
    address = os.environ.get("DASK_SCHEDULER_ADDRESS")
    if not address:
        return _row("Dask", "ok", f"distributed {ver}; LocalCluster per run")
    try:
        from distributed import Client

        with Client(address, timeout=3) as client:
            n = len(client.scheduler_info()["workers"])
        return _row("Dask", "ok", f"{address}: {n} workers")
    except Exception as exc:  # noqa: BLE001 - any failure is "unreachable"
        return _row("Dask", "unreachable", f"{address}: {exc}")


def optuna_storage() -> dict[str, str]:
    """The default Optuna storage (journal file) and how many studies it holds."""
    path = default_optuna_storage()
    if not os.path.exists(path):
        return _row("Optuna storage", "empty", f"{path} (created on first study)")
    try:
        from expflow_flows.hpo.study import open_storage

        n = len(open_storage(path).get_all_studies())
    except Exception as exc:  # noqa: BLE001
        return _row("Optuna storage", "unreadable", f"{path}: {exc}")
    return _row("Optuna storage", "ok", f"{path}: {n} studies")


def ledger() -> dict[str, str]:
    """The experiment ledger and its row count."""
    try:
        from expflow_flows.governance.ledger import Ledger

        led = Ledger()
        n = led.count()
        return _row("Ledger", "ok", f"{led.path}: {n} experiments")
    except Exception as exc:  # noqa: BLE001
        return _row("Ledger", "unreadable", str(exc))


def pin() -> dict[str, str]:
    """Whether a PIN guards destructive acts (never the hash)."""
    from expflow_flows.governance import pin as pin_mod

    st = pin_mod.pin_status()
    if st.get("problem"):
        return _row("PIN guard", "problem", str(st["problem"]))
    if not st.get("set"):
        return _row("PIN guard", "off", "no PIN set: guarded acts are allowed and audited")
    locked = f", locked until {st['locked_until']}" if st.get("locked") else ""
    return _row("PIN guard", "on", f"from {st.get('source')}{locked}")


def optional_sdk(
    part: str, module: str, dist: str, extra: str, env: tuple[str, ...]
) -> dict[str, str]:
    """An optional SDK: installed (without importing it) and configured through its settings."""
    if importlib.util.find_spec(module) is None:
        return _row(part, "not installed", f"pip install 'expflow-flows[{extra}]'")
    configured = [k for k in env if os.environ.get(k)]
    detail = f"{dist} {_version(dist)}; " + (
        f"configured by {', '.join(configured)}" if configured else "not configured"
    )
    return _row(part, "ok" if configured else "installed", detail)


def slurm() -> dict[str, str]:
    """Slurm's client tools and whether the controller answers."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return _row("Slurm", "not installed", "no sinfo on PATH")
    try:
        out = subprocess.run(
            [sinfo, "-h", "-o", "%P %a %D %t"], capture_output=True, text=True, timeout=5
        )
    except subprocess.TimeoutExpired:
        return _row(
            "Slurm",
            "unreachable",
            "sinfo got no answer in 5 s (is slurmctld running, and SLURM_CONF set?)",
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return _row("Slurm", "unreachable", _slurm_error(str(exc)))
    if out.returncode != 0:
        return _row("Slurm", "unreachable", _slurm_error(out.stderr or out.stdout))
    return _row("Slurm", "ok", out.stdout.strip().replace("\n", "; ")[:200])


def _slurm_error(text: str) -> str:
    """sinfo's complaint in one line: its last error, without the 'sinfo: error:' prefixes."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "sinfo failed without saying why"
    last = lines[-1]
    for prefix in ("sinfo: fatal:", "sinfo: error:", "slurm_load_partitions:"):
        last = last.removeprefix(prefix).strip()
    hint = " (is slurmctld running, and SLURM_CONF set?)"
    return f"the controller did not answer: {last[:160]}{hint}"


def status_rows() -> list[dict[str, Any]]:
    """Every part, in the order a user reads them."""
    from expflow_flows import __version__

    return [
        _row("expflow", "ok", f"{__version__}; home {expflow_home()}"),
        prefect_api(),
        dask(),
        optuna_storage(),
        ledger(),
        pin(),
        optional_sdk(
            "ClearML",
            "clearml",
            "clearml",
            "clearml",
            ("CLEARML_API_HOST", "CLEARML_CONFIG_FILE", "CLEARML_OFFLINE_MODE"),
        ),
        optional_sdk(
            "Langfuse",
            "langfuse",
            "langfuse",
            "langfuse",
            ("LANGFUSE_PUBLIC_KEY", "LANGFUSE_BASE_URL"),
        ),
        mcp(),
        worker_types(),
        slurm(),
    ]


def mcp() -> dict[str, str]:
    """Whether `expflow mcp` can serve research agents (it needs no settings)."""
    if importlib.util.find_spec("mcp") is None:
        return _row("MCP server", "not installed", "pip install 'expflow-flows[mcp]'")
    return _row("MCP server", "ok", f"mcp {_version('mcp')}; start with: expflow mcp")


def worker_types() -> dict[str, str]:
    """The Prefect worker types this install offers (`prefect worker start --type …`)."""
    from importlib.metadata import entry_points

    ours = [ep for ep in entry_points(group="prefect.collections") if ep.name == "expflow_flows"]
    if not ours:
        return _row(
            "Worker types", "missing", "slurm/clearml not registered: reinstall expflow-flows"
        )
    return _row("Worker types", "ok", "process, slurm (sbatch), clearml (clearml-agent)")
