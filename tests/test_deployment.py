"""Deployments for real: `prefect server start`, `prefect deploy --all`, a process worker,
and `prefect deployment run` with a parameter override, all as a user would type them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from expflow_flows.settings.sweep import StepSettings

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on a free loopback port with its own SQLite database."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect"),
        "EXPFLOW_HOME": str(root / "expflow"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 150
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(
                f"prefect server did not start: {(root / 'server.log').read_text()[-2000:]}"
            )
        time.sleep(0.5)
    env["PREFECT_API_URL"] = url
    yield {"url": url, "env": env, "root": root}
    stop(proc)
    log.close()


def prefect(server, *args: str, timeout: float = 180) -> str:
    out = subprocess.run(
        [PREFECT, *args],
        cwd=REPO,
        env=server["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def deployed(server):
    """The work pool and every deployment of prefect.yaml, registered as `make deploy` does."""
    prefect(server, "work-pool", "create", "expflow-local", "--type", "process")
    prefect(server, "work-pool", "create", "expflow-slurm", "--type", "slurm")
    prefect(server, "work-pool", "create", "expflow-clearml", "--type", "clearml")
    prefect(server, "deploy", "--all")
    return server


def test_deployment_run_from_prefect_yaml_completes(deployed):
    server = deployed
    names = {d["name"] for d in api(server, "POST", "/deployments/filter", {})}
    assert {"pde-advection", "pde-advection-nightly-hpo"} <= names

    worker_log = open(server["root"] / "worker.log", "wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "expflow-local", "--type", "process"],
        cwd=REPO,
        env=server["env"],
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        overrides = {
            "settings": {
                "hpo": {"n_trials": 3, "budget": {"epochs": 5}},
                "train": {"budget": {"epochs": 10}},
                "gates": ["nrmse:lt:1.0"],
                "submit": {"name": "deployed-1"},
            }
        }
        out = prefect(
            server,
            "deployment",
            "run",
            "pipeline/pde-advection",
            "--params",
            json.dumps(overrides),
        )
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert match, out
        flow_run_id = match.group(1)
        state = wait_for_terminal(server, flow_run_id, timeout=400)
        assert state["type"] == "COMPLETED", (
            f"{state}\nworker log:\n{(server['root'] / 'worker.log').read_text()[-4000:]}"
        )
    finally:
        stop(worker)
        worker_log.close()

    # The parameter override reached the run: exactly 3 trials in its table.
    artifacts = api(server, "POST", "/artifacts/filter", {})
    keys = {a["key"] for a in artifacts if a.get("key")}
    assert {
        "pde-advection-trials",
        "pde-advection-best-params",
        "pde-advection-eval-metrics",
        "pde-advection-gates",
        "pde-advection-outputs",
    } <= keys
    trials = next(a for a in artifacts if a["key"] == "pde-advection-trials")
    rows = json.loads(trials["data"]) if isinstance(trials["data"], str) else trials["data"]
    assert len(rows) == 3
    bundle = server["root"] / "expflow" / "submissions" / "deployed-1"
    assert (bundle / "pred.hdf5").exists() and (bundle / "manifest.json").exists()


def test_nightly_deployment_has_an_off_peak_cron_with_timezone(deployed):
    deployments = api(deployed, "POST", "/deployments/filter", {})
    nightly = [d for d in deployments if d["name"] == "pde-advection-nightly-hpo"]
    assert len(nightly) == 1
    assert nightly[0]["parameters"]["config"] == "deployments/pde-advection-nightly.yaml"
    assert nightly[0]["parameters"]["settings"]["offpeak"]["windows"] == ["22:00-06:00"]
    schedules = nightly[0]["schedules"]
    assert schedules[0]["schedule"]["cron"] == "30 2 * * *"
    assert schedules[0]["schedule"]["timezone"] == "Europe/Berlin"
    assert schedules[0]["active"] is True
    by_name = {d["name"]: d for d in deployments}
    sweep = by_name["advection-sweep-nightly"]
    assert sweep["entrypoint"] == "expflow_flows/flows/sweep.py:sweep"
    assert sweep["schedules"][0]["schedule"]["cron"] == "0 1 * * *"
    audit = by_name["daily-audit"]
    assert audit["schedules"][0]["schedule"]["timezone"] == "Europe/Berlin"


def api(server, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(
        server["url"] + path,
        method=method,
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
    )
    for attempt in range(6):
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
            return json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            # 503 means "retry": the server's SQLite database was busy (Prefect's own
            # client retries these too).
            if exc.code != 503 or attempt == 5:
                raise
            time.sleep(0.5 * 2**attempt)


def wait_for_terminal(server, flow_run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api(server, "GET", f"/flow_runs/{flow_run_id}")
        state = run.get("state") or {}
        if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s")


def expflow_cli(server, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("expflow")), *args],
        cwd=REPO,
        env=server["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_cancel_a_running_deployment_run_through_the_ledger(deployed):
    server = deployed
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "expflow-local", "--type", "process"],
        cwd=REPO,
        env=server["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        long_run = {
            "settings": {
                "experiment": "to-cancel",
                "hpo": {"n_trials": 2, "budget": {"epochs": 1000000}},
                "cluster": {"kind": "threads"},
                "submit": {"enabled": False},
            }
        }
        out = prefect(
            server, "deployment", "run", "pipeline/pde-advection", "--params", json.dumps(long_run)
        )
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        # The on_running hook registers the run in the ledger.
        exp_id = None
        deadline = time.monotonic() + 180
        while exp_id is None and time.monotonic() < deadline:
            listed = expflow_cli(server, "runs", "list", "--json")
            rows = json.loads(listed.stdout or "[]")
            mine = [r for r in rows if r["flow_run_id"] == flow_run_id and r["state"] == "RUNNING"]
            exp_id = mine[0]["id"] if mine else None
            time.sleep(1)
        assert exp_id, f"the run never showed as RUNNING in the ledger: {rows}"
        assert mine[0]["name"] == "to-cancel"
        t_cancel = time.monotonic()
        cancelled = expflow_cli(server, "runs", "cancel", exp_id)  # no PIN set: allowed, audited
        print(f"expflow runs cancel took {time.monotonic() - t_cancel:.1f} s")
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"cancelled {exp_id}" in cancelled.stdout
        state = wait_for_terminal(server, flow_run_id, timeout=60)
        assert state["type"] == "CANCELLED"
        shown = json.loads(expflow_cli(server, "runs", "show", exp_id).stdout)
        assert shown["state"] == "CANCELLED"
        assert [h["to"] for h in shown["history"]][-2:] == ["CANCEL_PENDING", "CANCELLED"]
    finally:
        stop(worker)


# ------------------------------------------------------------------ every setting, three ways
#
# One row per leaf field of the pipeline and sweep settings: its dotted path, a value
# that is not its default, and the settings it needs beside it. Each row is set from a
# YAML config file, from `--set` on the command line, and as a deployment parameter
# that the real server validates and stores; all three must resolve to the value.
# A settings field added without a row here fails `test_the_table_covers_every_setting`.

# Every Slurm job setting, for the pipeline's and the sweep's `cluster.slurm`.
SLURM_ROWS: list[tuple[str, object, dict]] = [
    (f"cluster.slurm.{name}", value, {"cluster": {"kind": "slurm"}})
    for name, value in [
        ("cores", 4),
        ("memory", "16GB"),
        ("processes", 2),
        ("walltime", "12:00:00"),
        ("partition", "gpu"),
        ("account", "pde-lab"),
        ("job_extra_directives", ["--gres=gpu:1"]),
        ("job_script_prologue", ["module load cuda/12.4"]),
        ("worker_extra_args", ["--lifetime", "55m"]),
        ("log_directory", "/scratch/logs"),
        ("local_directory", "/scratch/dask"),
        ("interface", "ib0"),
    ]
]


def _launch_rows(section: str, script: dict) -> list[tuple[str, object, dict]]:
    """Every field of a trainable section that says how it starts and reports."""
    return [
        (
            f"{section}.command",
            ["apptainer", "exec", "pde.sif", "python", "t.py", "{args}"],
            {section: {"target": None}},  # a command instead of the target
        ),
        (f"{section}.interpreter", ["conda", "run", "-n", "pde", "python"], script),
        (f"{section}.args", ["+args=config_Adv.yaml"], script),
        (f"{section}.env", {"OMP_NUM_THREADS": "4"}, script),
        (f"{section}.cwd", "launch", {}),
        (f"{section}.budget_params", {"epochs": "args.epochs"}, {}),
        (f"{section}.metrics.patterns", [r"Epoch (?P<step>\d+) val=(?P<val>\S+)"], {}),
        (f"{section}.metrics.files", ["results/*.csv"], {}),
        (f"{section}.metrics.tensorboard", ["loss/val"], {}),
        (f"{section}.metrics.reader", "team.metrics:read", {}),
        (f"{section}.from_upstream", ["checkpoints/**"], script),
        (f"{section}.upstream_mode", "copy", {}),
    ]


def _option_rows(prefix: str, options: dict[str, dict[str, object]]) -> list:
    return [
        (f"{prefix}.{section}.{field}", value, {})
        for section, fields in options.items()
        for field, value in fields.items()
    ]


HPO_ALGORITHM_ROWS: list[tuple[str, object, dict]] = [
    ("hpo.sampler.name", "nsgaii", {}),
    *_option_rows(
        "hpo.sampler",
        {
            "tpe": {
                "n_startup_trials": 8,
                "multivariate": False,
                "group": True,
                "constant_liar": False,
                "n_ei_candidates": 48,
            },
            "qmc": {"qmc_type": "halton", "scramble": False},
            "cmaes": {
                "n_startup_trials": 3,
                "restart_strategy": "bipop",
                "sigma0": 0.2,
                "with_margin": False,
                "popsize": 12,
            },
            "gp": {"n_startup_trials": 4, "deterministic_objective": True},
            "nsgaii": {
                "population_size": 30,
                "mutation_prob": 0.2,
                "crossover": "sbx",
                "crossover_prob": 0.8,
                "swapping_prob": 0.4,
            },
            "grid": {"points": 7},
            "bruteforce": {"avoid_premature_stop": True},
        },
    ),
    ("hpo.pruner.name", "hyperband", {}),
    *_option_rows(
        "hpo.pruner",
        {
            "median": {"n_startup_trials": 3, "n_warmup_steps": 2, "interval_steps": 2},
            "percentile": {
                "percentile": 10.0,
                "n_startup_trials": 4,
                "n_warmup_steps": 3,
                "interval_steps": 3,
            },
            "hyperband": {
                "min_resource": 2,
                "max_resource": 81,
                "reduction_factor": 4,
                "bootstrap_count": 1,
            },
            "successive_halving": {
                "min_resource": 3,
                "reduction_factor": 3,
                "min_early_stopping_rate": 1,
                "bootstrap_count": 2,
            },
            "threshold": {"lower": 0.0, "upper": 10.0, "n_warmup_steps": 2, "interval_steps": 2},
            "patient": {"patience": 2, "min_delta": 0.01, "wraps": "median"},
            "wilcoxon": {"p_threshold": 0.05, "n_startup_steps": 4},
        },
    ),
    ("hpo.select", "knee", {}),
    ("hpo.constraints", ["train_time_s:lt:600"], {}),
    ("hpo.warm_start.configs", [{"lr": 0.01, "modes": 12}], {}),
    ("hpo.warm_start.study.name", "earlier-study", {}),
    (
        "hpo.warm_start.study.storage",
        "/data/optuna.log",
        {"hpo": {"warm_start": {"study": {"name": "s"}}}},
    ),
    ("hpo.warm_start.study.best", 3, {"hpo": {"warm_start": {"study": {"name": "s"}}}}),
    ("hpo.warm_start.sweep.name", "nightly", {"hpo": {"warm_start": {"sweep": {"metric": "m"}}}}),
    ("hpo.warm_start.sweep.metric", "val_nrmse", {"hpo": {"warm_start": {"sweep": {"name": "s"}}}}),
    (
        "hpo.warm_start.sweep.maximize",
        True,
        {"hpo": {"warm_start": {"sweep": {"name": "s", "metric": "m"}}}},
    ),
    (
        "hpo.warm_start.sweep.best",
        8,
        {"hpo": {"warm_start": {"sweep": {"name": "s", "metric": "m"}}}},
    ),
]

PIPELINE_ROWS: list[tuple[str, object, dict]] = [
    ("experiment", "exp-table", {}),
    ("train.target", "pkg.train:fit", {}),
    ("train.arg_style", "hydra", {}),
    ("train.budget.epochs", 7, {}),
    ("train.budget.steps", 300, {}),
    ("train.budget.seconds", 30.5, {}),
    ("train.timeout", 99.0, {}),
    *_launch_rows("train", {"train": {"target": "train.py"}}),
    ("evaluate.target", "pkg.evaluate:score", {}),
    ("evaluate.arg_style", "equals", {}),
    ("evaluate.budget.epochs", 3, {}),
    ("evaluate.budget.steps", 30, {}),
    ("evaluate.budget.seconds", 12.0, {}),
    ("evaluate.timeout", 45.0, {}),
    *_launch_rows("evaluate", {"evaluate": {"target": "evaluate.py"}}),
    ("space", {"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}, {}),
    ("params", {"problem": "burgers", "nu": 0.01}, {}),
    ("objective", "val_loss", {}),
    ("direction", "maximize", {}),
    ("hpo.n_trials", 40, {}),
    ("hpo.seed", 17, {}),
    ("hpo.storage", "postgresql://expflow@127.0.0.1/optuna", {}),
    ("hpo.study_name", "study-table", {}),
    ("hpo.budget.epochs", 4, {}),
    ("hpo.budget.steps", 50, {}),
    ("hpo.budget.seconds", 20.0, {}),
    ("hpo.trial_timeout", 600.0, {}),
    ("hpo.retries", 4, {}),
    *HPO_ALGORITHM_ROWS,
    (
        "objectives",
        [
            {"metric": "nrmse", "direction": "minimize"},
            {"metric": "train_time_s", "direction": "minimize"},
        ],
        {},
    ),
    ("cluster.kind", "threads", {}),
    ("cluster.gpus", ["0", "1", "2", "3"], {}),
    ("cluster.gpus_per_run", 0.5, {}),
    ("cluster.workers", 6, {}),
    ("cluster.address", "tcp://127.0.0.1:8786", {}),
    *SLURM_ROWS,
    ("gates", ["nrmse:lt:0.1", "val_loss:le:2"], {}),
    ("submit.enabled", False, {}),
    ("submit.to", "/data/submissions", {}),
    ("submit.name", "entry-7", {}),
    ("submit.predictions", "predictions.h5", {}),
    ("submit.convert", "team.convert:to_pred_hdf5", {}),
    ("submit.approval_timeout", 3600.0, {}),
    ("offpeak.windows", ["20:00-06:00"], {}),
    ("offpeak.timezone", "Europe/Berlin", {}),
    ("offpeak.weekends", False, {}),
    ("offpeak.max_wait_hours", 6.0, {}),
    ("offpeak.on_timeout", "fail", {}),
    ("offpeak.max_load", 0.5, {}),
    ("tracking.clearml.project", "pde/table", {}),
    ("tracking.clearml.tags", ["table"], {}),
    ("tracking.clearml.offline", True, {}),
    ("tracking.clearml.steps", "all", {}),
    ("tracking.clearml.combinations", "sample", {}),
    ("tracking.clearml.sample", 5, {}),
    ("tracking.clearml.task_type", "testing", {}),
    ("tracking.langfuse.public_key", "pk-lf-table", {}),
    ("tracking.langfuse.secret_key", "sk-lf-table", {}),
    ("tracking.langfuse.base_url", "http://127.0.0.1:3000", {}),
    ("tracking.langfuse.enabled", False, {}),
    ("tracking.langfuse.flush_timeout", 3.0, {}),
    ("tracking.langfuse.timeout", 5, {}),
    ("tracking.langfuse.environment", "staging", {}),
    ("tracking.langfuse.tags", ["table"], {}),
]

SWEEP_BASE = {"trainable": {"target": "pkg.train:fit"}, "space": {"grid": {"x": [1, 2]}}}
SWEEP_ROWS: list[tuple[str, object, dict]] = [
    ("name", "sweep-table", {}),
    ("trainable.target", "pkg.other:run", {}),
    ("trainable.arg_style", "hydra", {}),
    ("trainable.budget.epochs", 5, {}),
    ("trainable.budget.steps", 70, {}),
    ("trainable.budget.seconds", 8.0, {}),
    ("trainable.timeout", 120.0, {}),
    *_launch_rows("trainable", {"trainable": {"target": "train.py"}}),
    (
        "steps",
        [  # every field of a step, as the resolved settings show it
            StepSettings.model_validate(step).model_dump(mode="json")
            for step in (
                {
                    "name": "prep",
                    "target": "prep.py",
                    "version": "2",
                    "budget": {"epochs": 1},
                    "timeout": 30.0,
                    "interpreter": ["/opt/venvs/pde/bin/python"],
                    "metrics": {"files": ["prep.json"]},
                },
                {
                    "name": "fit",
                    "command": ["torchrun", "--nproc_per_node", "2", "fit.py", "{args}"],
                    "arg_style": "hydra",
                    "from_upstream": ["*.npz"],
                    "budget_params": {"epochs": "trainer.max_epochs"},
                },
            )
        ],
        {"trainable": None},
    ),
    ("space", {"grid": {"lr": [0.1, 0.01]}, "repeat": 2}, {}),
    ("inputs", ["/data/advection.hdf5"], {}),
    ("version", "v2", {}),
    ("force", True, {}),
    ("objective", "val_nrmse", {}),
    ("direction", "maximize", {}),
    ("cluster.kind", "threads", {}),
    ("cluster.gpus", ["1", "GPU-5f3a"], {}),
    ("cluster.gpus_per_run", 2, {}),
    ("cluster.workers", 8, {}),
    ("cluster.address", "tcp://127.0.0.1:8786", {}),
    *SLURM_ROWS,
    ("chunk_size", 500, {}),
    ("retries", 0, {}),
    ("resources.cpu", 2.0, {}),
    ("resources.memory", "4GB", {}),
    ("resources.gpu", 0.5, {}),
    ("max_failure_ratio", 0.25, {}),
    ("status_every_s", 2.5, {}),
    ("offpeak.windows", ["21:00-07:00"], {}),
    ("offpeak.timezone", "America/New_York", {}),
    ("offpeak.weekends", False, {}),
    ("offpeak.max_wait_hours", 10.0, {}),
    ("offpeak.on_timeout", "fail", {}),
    ("offpeak.max_load", 0.7, {}),
    ("tracking.clearml.project", "pde/sweeps", {}),
    ("tracking.clearml.tags", ["sweep"], {}),
    ("tracking.clearml.offline", True, {}),
    ("tracking.clearml.steps", "all", {}),
    ("tracking.clearml.combinations", "all", {}),
    ("tracking.clearml.sample", 3, {}),
    ("tracking.clearml.task_type", "testing", {}),
    ("tracking.langfuse.public_key", "pk-lf-sweep", {}),
    ("tracking.langfuse.secret_key", "sk-lf-sweep", {}),
    ("tracking.langfuse.base_url", "http://127.0.0.1:3000", {}),
    ("tracking.langfuse.enabled", False, {}),
    ("tracking.langfuse.flush_timeout", 4.0, {}),
    ("tracking.langfuse.timeout", 9, {}),
    ("tracking.langfuse.environment", "prod", {}),
    ("tracking.langfuse.tags", ["sweep"], {}),
]

# Values the server must refuse before a run exists, and the field its error names.
BAD_PARAMETERS = [
    ("pipeline/pde-advection", {"hpo": {"n_trials": 0}}, "n_trials"),
    ("pipeline/pde-advection", {"cluster": {"kind": "pbs"}}, "pbs"),
    ("pipeline/pde-advection", {"direction": "up"}, "up"),
    ("pipeline/pde-advection", {"train": {"arg_style": "posix"}}, "posix"),
    ("pipeline/pde-advection", {"n_trials": 3}, "n_trials"),
    ("sweep/advection-sweep-nightly", {"retries": -1}, "retries"),
    ("sweep/advection-sweep-nightly", {"resources": {"gpu": "many"}}, "many"),
]


def _leaves(model, prefix: str = "") -> list[str]:
    """Dotted paths of a settings model's leaf fields (nested settings are walked)."""
    from typing import get_args

    from expflow_flows.settings.base import Settings

    out = []
    for name, info in model.__pydantic_fields__.items():
        nested = [
            a
            for a in (info.annotation, *get_args(info.annotation))
            if isinstance(a, type) and issubclass(a, Settings)
        ]
        if nested and name != "steps":
            out += _leaves(nested[0], f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _pruned(settings: dict) -> dict:
    """``settings`` without the keys whose value is None (a context that removes a field)."""
    return {
        k: _pruned(v) if isinstance(v, dict) else v for k, v in settings.items() if v is not None
    }


def _with(settings: dict, path: str, value) -> dict:
    """A copy of ``settings`` with the field at ``path`` set to ``value``."""
    import copy

    from expflow_flows.settings.base import set_dotted

    out = copy.deepcopy(settings)
    set_dotted(out, path, value)
    return out


def _at(data: dict, path: str):
    for part in path.split("."):
        data = data[part]
    return data


def _expected(path: str, value):
    """What a resolved setting reads as (secret-looking values are masked when shown)."""
    from expflow_flows.secrets import MASK, is_secret_key

    return MASK if is_secret_key(path.rsplit(".", 1)[-1]) else value


def test_the_table_covers_every_setting():
    from expflow_flows.settings.pipeline import PipelineSettings
    from expflow_flows.settings.sweep import SweepSettings

    assert sorted(p for p, _, _ in PIPELINE_ROWS) == sorted(_leaves(PipelineSettings))
    assert sorted(p for p, _, _ in SWEEP_ROWS) == sorted(_leaves(SweepSettings))


@pytest.mark.parametrize("kind", ["pipeline", "sweep"])
def test_every_setting_from_yaml_and_from_set(kind, tmp_path):
    """A YAML config file and `expflow <kind> settings --set` both reach every field."""
    import yaml
    from typer.testing import CliRunner

    from expflow_flows.cli.app import app
    from expflow_flows.settings.base import deep_merge
    from expflow_flows.settings.pipeline import load_pipeline_settings
    from expflow_flows.settings.sweep import load_sweep_settings

    rows, base, load = (
        (PIPELINE_ROWS, {}, load_pipeline_settings)
        if kind == "pipeline"
        else (SWEEP_ROWS, SWEEP_BASE, load_sweep_settings)
    )
    runner = CliRunner()
    for path, value, context in rows:
        around = _pruned(deep_merge(base, context))
        config = tmp_path / f"{path}.yaml"
        config.write_text(yaml.safe_dump(_with(around, path, value)))
        resolved = load(config).to_dict()
        assert _at(resolved, path) == value, f"{path} from YAML"

        config.write_text(yaml.safe_dump(around))
        flow_value = json.dumps(value)  # JSON is YAML: `--set key=<json>` for any value
        shown = runner.invoke(
            app,
            [kind, "settings", "--config", str(config), "--set", f"{path}={flow_value}", "--json"],
        )
        assert shown.exit_code == 0, f"{path} from --set: {shown.output}"
        assert _at(json.loads(shown.stdout), path) == _expected(path, value), f"{path} --set"


@pytest.mark.parametrize("kind", ["pipeline", "sweep"])
def test_every_setting_as_a_deployment_parameter(deployed, kind):
    """The real server takes every field in the `settings` parameter, stores it, and the
    flow resolves it from the stored parameters."""
    from expflow_flows.settings.base import deep_merge
    from expflow_flows.settings.pipeline import load_pipeline_settings
    from expflow_flows.settings.sweep import load_sweep_settings

    deployment_name, rows, base, load = (
        ("pipeline/pde-advection", PIPELINE_ROWS, {}, load_pipeline_settings)
        if kind == "pipeline"
        else ("sweep/advection-sweep-nightly", SWEEP_ROWS, SWEEP_BASE, load_sweep_settings)
    )
    dep = api(deployed, "GET", f"/deployments/name/{deployment_name}")
    for path, value, context in rows:
        around = _pruned(deep_merge(base, context))
        settings = _with(around, path, value)
        run = api(
            deployed,
            "POST",
            f"/deployments/{dep['id']}/create_flow_run",
            {"parameters": {"config": None, "settings": settings}, "state": {"type": "CANCELLED"}},
        )
        try:
            stored = api(deployed, "GET", f"/flow_runs/{run['id']}")["parameters"]
        finally:
            api(deployed, "DELETE", f"/flow_runs/{run['id']}")
        resolved = load(stored["config"], stored["settings"]).to_dict()
        assert _at(resolved, path) == value, f"{path} as a deployment parameter"


@pytest.mark.parametrize(("deployment_name", "settings", "named"), BAD_PARAMETERS)
def test_the_server_refuses_a_bad_setting_before_a_run_exists(
    deployed, deployment_name, settings, named
):
    dep = api(deployed, "GET", f"/deployments/name/{deployment_name}")
    before = len(api(deployed, "POST", "/flow_runs/filter", {}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        api(
            deployed,
            "POST",
            f"/deployments/{dep['id']}/create_flow_run",
            {"parameters": {"settings": settings}},
        )
    assert refused.value.code in (409, 422)
    assert named in refused.value.read().decode()
    assert len(api(deployed, "POST", "/flow_runs/filter", {})) == before


@pytest.mark.parametrize("flow_name", ["pipeline", "sweep"])
def test_the_run_form_is_typed_with_descriptions_and_choices(deployed, flow_name):
    """The deployment's parameter schema, as the UI's Run form reads it from the API."""
    deployments = api(deployed, "POST", "/deployments/filter", {})
    dep = next(d for d in deployments if d["entrypoint"].endswith(f":{flow_name}"))
    schema = dep["parameter_openapi_schema"]
    settings = schema["properties"]["settings"]
    assert "override" in settings["description"].lower() or "config" in settings["description"]
    assert schema["properties"]["config"]["description"]
    definitions = schema["definitions"]
    # Every field of every settings section is typed and described.
    for name, model in definitions.items():
        for field, prop in model["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
            kinds = [
                a.get("type") or a.get("$ref") or a.get("enum") for a in prop.get("anyOf", [prop])
            ]
            assert any(k and k != "null" for k in kinds), f"{name}.{field} has no type"
        assert model["additionalProperties"] is False, f"{name} takes unknown keys"
    cluster = definitions["ClusterSettingsOverrides"]["properties"]
    kind = next(a for a in cluster["kind"]["anyOf"] if "enum" in a)
    assert kind["enum"] == ["local", "threads", "slurm"]
    workers = next(a for a in cluster["workers"]["anyOf"] if a.get("type") == "integer")
    assert workers["minimum"] == 1
    if flow_name == "pipeline":
        hpo = definitions["HpoSettingsOverrides"]["properties"]
        assert "Finished trials" in hpo["n_trials"]["description"]
        # the sampler and the pruner are chosen by name from a list in the form
        for section, names in (
            ("PrunerSettingsOverrides", ["median", "percentile", "hyperband"]),
            ("SamplerSettingsOverrides", ["tpe", "random", "qmc", "cmaes", "gp"]),
        ):
            name = definitions[section]["properties"]["name"]
            choices = next(a for a in name["anyOf"] if "enum" in a)["enum"]
            assert names == choices[: len(names)], section
        hyperband = definitions["HyperbandOptionsOverrides"]["properties"]
        assert "epochs" in hyperband["max_resource"]["description"]
    else:
        top = definitions["SweepSettingsOverrides"]["properties"]
        ratio = next(a for a in top["max_failure_ratio"]["anyOf"] if a.get("type") == "number")
        assert ratio["minimum"] == 0 and ratio["maximum"] == 1
