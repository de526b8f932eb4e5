"""Bad input never reaches a traceback: each mistake is one line, a non-zero exit, and is
refused before any run starts (settings validation or the preflight)."""

from __future__ import annotations

import ast
import inspect
import json
import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from expflow_flows.cli.app import app
from expflow_flows.errors import ExpflowError
from expflow_flows.settings.common import MAX_NAME_LENGTH, PDE_TRAIN, PDE_TRAIN_METRICS
from expflow_flows.settings.pipeline import MAX_TRIALS, load_pipeline_settings
from expflow_flows.settings.sweep import load_sweep_settings
from expflow_flows.sweep.space import MAX_COMBINATIONS, SweepSpace

runner = CliRunner()
SPACE = "space={grid: {lr: [0.1, 0.2]}}"


def invoke(*args: str):
    """``expflow *args`` in this process (CliRunner): stdout and stderr together."""
    return runner.invoke(app, list(args), catch_exceptions=True)


def refused(*args: str) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback, nothing else)."""
    result = invoke(*args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def sweep_refused(*args: str) -> str:
    """A sweep over a tiny inline space of a callable that exists, refused for ``args``."""
    return refused("sweep", "run", "--trainable", "json:dumps", "--set", SPACE, *args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _home(home):
    """Every test gets a fresh expflow home; nothing may be written to it by a refusal."""
    yield home
    assert not (home / "runs").exists(), "a refused command started a run"


# ---------------------------------------------------------------- settings in the wrong place


@pytest.mark.parametrize(
    ("command", "where"),
    [("pipeline", "train.arg_style"), ("sweep", "trainable.arg_style")],
)
def test_arg_style_at_the_top_level_says_where_it_belongs(command, where):
    line = refused(command, "run", "--set", "arg_style=hydra")
    assert "'arg_style' is not known" in line and where in line


def test_a_param_value_that_is_not_yaml_is_one_line():
    line = refused("pipeline", "run", "--param", "width={")
    assert "--param 'width={'" in line and "not valid YAML" in line


# ---------------------------------------------------------------- files and folders


@pytest.fixture
def plain_file(tmp_path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("not a folder\n")
    return f


def uncreatable(plain_file: Path) -> list[str]:
    """Paths whose folder cannot be made: under a plain file, and in /proc (Linux)."""
    out = [str(plain_file / "sub" / "x")]
    if Path("/proc").is_dir() and sys.platform.startswith("linux"):
        out.append("/proc/x")
    return out


def test_a_journal_storage_that_cannot_be_created_is_refused(plain_file):
    for where in uncreatable(plain_file):
        line = refused("pipeline", "run", "--storage", where + ".log")
        assert "hpo.storage" in line and repr(where + ".log") in line
        assert "postgresql://" in line  # what would be accepted


def test_a_submission_folder_that_cannot_be_created_is_refused(plain_file):
    for where in uncreatable(plain_file):
        line = refused("pipeline", "run", "--submit-to", where)
        assert "submit.to" in line and repr(where) in line and "submit.enabled=false" in line
    # Not submitting: the folder is not needed, so it is not checked.
    overrides = {"submit": {"enabled": False, "to": str(plain_file / "sub")}}
    load_pipeline_settings(overrides=overrides).check()


# ---------------------------------------------------------------- the Dask address


def test_a_dask_address_where_nothing_listens_is_one_quick_line():
    address = f"tcp://127.0.0.1:{free_port()}"
    for command in (("pipeline", "run"), ("sweep", "run", "--trainable", "json:dumps")):
        extra = ("--set", SPACE) if command[0] == "sweep" else ()
        line = refused(*command, "--dask-address", address, *extra)
        assert address in line and "no Dask scheduler" in line


@pytest.mark.parametrize(
    "address", ["not a url", "http://127.0.0.1:8786", "tcp://host", "tcp://:8786", "tcp://h:99999"]
)
def test_a_malformed_dask_address_names_the_accepted_forms(address):
    line = refused("pipeline", "settings", "--set", f"cluster.address={address}")
    assert repr(address) in line and "tcp://host:port" in line and "scheduler file" in line
    line = sweep_refused("--dask-address", address)
    assert repr(address) in line and "tcp://host:port" in line


def test_a_scheduler_file_is_a_dask_address(tmp_path):
    sched = tmp_path / "scheduler.json"
    refused_line = refused("pipeline", "run", "--dask-address", str(sched))
    assert str(sched) in refused_line and "does not exist" in refused_line
    port = free_port()
    sched.write_text(f'{{"address": "tcp://127.0.0.1:{port}"}}')
    line = refused("pipeline", "run", "--dask-address", str(sched))
    assert f"tcp://127.0.0.1:{port}" in line and "no Dask scheduler" in line
    shown = invoke("pipeline", "settings", "--set", f"cluster.address={sched}")
    assert shown.exit_code == 0, shown.output


# ---------------------------------------------------------------- names


BAD_NAMES = [
    "éxpériençe",
    "a" * 300,
    ".",
    "..",
    "a..b",
    ".hidden",
    "two words",
    "line\nbreak",
    "a/b",
    "a\\b",
    "-rf",
    "",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_bad_experiment_and_sweep_names_are_refused_with_the_rule(name):
    for line in (
        refused("pipeline", "run", f"--experiment={name}"),
        sweep_refused(f"--name={name}"),
        refused("pipeline", "run", f"--study-name={name}"),
    ):
        assert "letters, digits" in line and str(MAX_NAME_LENGTH) in line


def test_good_names_are_accepted():
    for name in ("pde-advection", "run_2.v3", "A1", "_scratch", "x" * MAX_NAME_LENGTH):
        assert load_pipeline_settings(overrides={"experiment": name}).experiment == name


# ---------------------------------------------------------------- config files


def test_duplicate_keys_in_a_config_file_are_refused_with_the_line(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "name: first\ntrainable: json:dumps\nspace: {grid: {lr: [1]}}\ncluster:\n"
        "  workers: 1\n  workers: 3\n"
    )
    line = refused("sweep", "run", "--config", str(config))
    assert "'workers'" in line and "line 6" in line
    config.write_text("experiment: first\nexperiment: second\n")
    line = refused("pipeline", "run", "--config", str(config))
    assert "'experiment'" in line and "line 2" in line and "twice" in line


@pytest.mark.parametrize("command", ["pipeline", "sweep"])
def test_an_empty_config_file_is_refused_saying_what_a_minimal_one_holds(tmp_path, command):
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing yet\n")
    line = refused(command, "run", "--config", str(config))
    assert "is empty" in line and ("experiment:" in line or "trainable:" in line)
    assert refused(command, "settings", "--config", str(config)) == line


# ---------------------------------------------------------------- sizes


def test_n_trials_has_an_upper_limit():
    line = refused("pipeline", "run", "--n-trials", str(10**11))
    assert "hpo.n_trials" in line and f"{MAX_TRIALS}" in line


def test_a_sample_too_large_to_draw_is_refused_with_the_limit():
    space = "space={sample: {n: 1000000000000, params: {lr: {low: 0, high: 1}}}}"
    line = refused("sweep", "run", "--trainable", "json:dumps", "--set", space)
    assert "1000000000000" in line and f"{MAX_COMBINATIONS:,}" in line


def test_a_grid_too_large_to_enumerate_is_refused_up_front(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"grid": {f"p{i}": list(range(10)) for i in range(9)}}))
    line = refused("sweep", "run", "--trainable", "json:dumps", "--space", str(space))
    assert "1,000,000,000 combinations" in line and f"{MAX_COMBINATIONS:,}" in line
    # Conditional blocks that exclude each other do not multiply.
    blocks = [{"when": {"opt": o}, "grid": {f"{o}_{j}": list(range(10)) for j in range(6)}}
              for o in ("a", "b", "c")]  # fmt: skip
    ok = SweepSpace.from_dict({"grid": {"opt": ["a", "b", "c"]}, "conditional": blocks})
    assert ok.size_upper_bound() <= 3 * 10**6 <= MAX_COMBINATIONS


# ---------------------------------------------------------------- objective and trainables


@pytest.mark.parametrize("objective", ["val loss", "a=b", "tab\there", "x" * 300])
def test_a_malformed_objective_is_refused(objective):
    line = refused("pipeline", "run", "--objective", objective)
    assert "objective" in line and "metric name" in line
    line = sweep_refused("--set", f"objective={json.dumps(objective)}")
    assert "objective" in line


def test_an_empty_objective_is_refused():
    assert "objective" in refused("pipeline", "run", "--set", "objective=''")
    assert "objective" in sweep_refused("--set", "objective=''")


def test_an_objective_the_pde_workload_does_not_report_is_refused_before_any_trial():
    line = refused("pipeline", "run", "--objective", "accuracy")
    assert "'accuracy'" in line and "val_nrmse" in line
    line = refused(
        "sweep", "run", "--trainable", PDE_TRAIN, "--set", SPACE, "--set", "objective=accuracy"
    )
    assert "'accuracy'" in line and "val_nrmse" in line


def test_the_pde_metrics_list_is_what_the_pde_trainable_returns():
    from expflow_flows.pde import trainables

    tree = ast.parse(textwrap.dedent(inspect.getsource(trainables.train)))
    returned = [n for n in ast.walk(tree) if isinstance(n, ast.Return)][-1]
    assert isinstance(returned.value, ast.Dict)
    assert {k.value for k in returned.value.keys} == set(PDE_TRAIN_METRICS)


def test_a_script_without_the_execute_bit_is_refused_before_any_trial(tmp_path):
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/sh\necho EXPFLOW_METRIC loss=1\n")
    os.chmod(script, 0o644)
    for line in (
        refused("pipeline", "run", "--train", str(script)),
        sweep_refused("--trainable", str(script)),
    ):
        assert repr(str(script)) in line and "not executable" in line and "chmod +x" in line
    # Under an interpreter it needs no execute bit.
    ok = load_sweep_settings(
        overrides={"trainable": {"target": str(script), "interpreter": "sh"}, "space": {"a": 1}}
    )
    ok.check()


def test_a_missing_python_script_is_refused_before_any_trial(tmp_path):
    missing = str(tmp_path / "nope.py")
    assert "does not exist" in refused("pipeline", "run", "--evaluate", missing)
    assert "does not exist" in sweep_refused("--trainable", missing)
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "space: {grid: {lr: [1]}}\nsteps:\n  - {name: a, target: json:dumps}\n"
        "  - {name: b, target: nope.py}\n"
    )
    assert "does not exist" in refused("sweep", "run", "--config", str(config))


# ---------------------------------------------------------------- generated bad values

KEYS = [
    "experiment",
    "name",
    "objective",
    "direction",
    "space",
    "gates",
    "params",
    "hpo.n_trials",
    "hpo.seed",
    "hpo.storage",
    "hpo.study_name",
    "hpo.budget.epochs",
    "hpo.trial_timeout",
    "hpo.retries",
    "hpo.sampler",
    "hpo.sampler.name",
    "hpo.sampler.grid.points",
    "hpo.pruner",
    "hpo.pruner.hyperband.max_resource",
    "hpo.pruner.threshold",
    "hpo.select",
    "hpo.constraints",
    "hpo.warm_start.configs",
    "hpo.warm_start.study",
    "hpo.warm_start.sweep.best",
    "objectives",
    "cluster.gpus",
    "cluster.gpus_per_run",
    "cluster.address",
    "cluster.workers",
    "cluster.kind",
    "submit.to",
    "submit.name",
    "train.target",
    "train.arg_style",
    "train.timeout",
    "train.env",
    "trainable.command",
    "trainable.metrics.patterns",
    "resources.memory",
    "chunk_size",
    "max_failure_ratio",
    "offpeak.windows",
    "tracking.clearml.sample",
    "steps",
    "no.such.key",
]
odd_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40
) | st.sampled_from(["", ".", "..", "a/b", "a\nb", "tcp://x", "x" * 300, "é", "{", "!!python"])
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**15), max_value=10**15)
    | st.floats(allow_nan=True, allow_infinity=True)
    | odd_text
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=6,
)
SWEEP_BASE = {"trainable": "json:dumps", "space": {"grid": {"lr": [1]}}}
FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _one_line_or_accepted(call) -> None:
    try:
        call()
    except ExpflowError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(str(exc))


@FAST
@given(key=st.sampled_from(KEYS), value=values)
def test_generated_settings_values_are_accepted_or_one_line(key, value):
    from expflow_flows.settings.base import set_dotted

    overrides: dict = {}
    set_dotted(overrides, key, value)
    _one_line_or_accepted(lambda: load_pipeline_settings(overrides=overrides))
    _one_line_or_accepted(lambda: load_sweep_settings(overrides={**SWEEP_BASE, **overrides}))


@FAST
@given(
    command=st.sampled_from(["pipeline", "sweep"]),
    key=st.sampled_from(KEYS) | odd_text,
    value=values,
    raw=st.booleans(),
)
def test_generated_set_options_are_accepted_or_one_line(command, key, value, raw):
    text = value if raw and isinstance(value, str) else yaml.safe_dump(value).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    args = [command, "settings", "--set", f"{key}={text}"]
    if command == "sweep":
        args += ["--set", "trainable=json:dumps", "--set", "space={grid: {a: [1]}}"]
    result = invoke(*args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}"
    )
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
