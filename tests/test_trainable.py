"""The trainable contract: both kinds, every failure mode, and the run directory it leaves."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.runs.rundir import RunDir
from expflow_flows.runs.trainable import (
    Budget,
    Trainable,
    format_args,
    parse_metric_line,
    run_trainable,
)


def status_of(run_dir: Path) -> tuple[str, str]:
    return RunDir(run_dir).read_status()


def write_script(path: Path, body: str, executable: bool = False) -> Path:
    path.write_text(textwrap.dedent(body))
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --- callables -----------------------------------------------------------------------


def test_callable_run_writes_the_whole_run_directory(tmp_path):
    rd = tmp_path / "run"
    res = run_trainable("sample_trainables:quadratic", {"x": 3}, rd, budget={"epochs": 4})
    assert res.status == "ok"
    assert res.metrics == {"loss": 1.0, "score": -1.0}
    assert json.loads((rd / "params.json").read_text()) == {"x": 3}
    assert json.loads((rd / "metrics.json").read_text()) == {"loss": 1.0, "score": -1.0}
    meta = json.loads((rd / "metadata.json").read_text())
    assert meta["trainable"] == "sample_trainables:quadratic"
    assert meta["kind"] == "callable"
    assert meta["budget"] == {"epochs": 4}
    assert meta["wall_s"] >= 0
    assert "x=3.0 loss=1.0" in (rd / "output.log").read_text()
    assert status_of(rd) == ("ok", "")
    steps = json.loads((rd / "intermediate.json").read_text())
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert (rd / "model.txt").read_text() == "3.0"


def test_callable_with_params_only_signature(tmp_path):
    res = run_trainable("sample_trainables:params_only", {"a": 4}, tmp_path / "r")
    assert res.ok and res.metrics == {"value": 8.0}


@pytest.mark.parametrize(
    ("spec", "reason_part"),
    [
        ("sample_trainables:raises", "raised ValueError: diverged at step 3"),
        ("sample_trainables:returns_list", "gave list, expected a dict of metrics"),
        ("sample_trainables:returns_empty", "reported no metrics"),
        ("sample_trainables:returns_text_metric", "metric 'loss' is not a number"),
        ("sample_trainables:no_such_function", "has no function 'no_such_function'"),
        ("no_such_module_xyz:train", "cannot import module 'no_such_module_xyz'"),
    ],
)
def test_callable_failures_are_failed_runs_with_reason(tmp_path, spec, reason_part):
    rd = tmp_path / "run"
    res = run_trainable(spec, {}, rd)
    assert res.status == "failed"
    assert reason_part in res.reason
    status, reason = status_of(rd)
    assert status == "failed" and reason_part in reason


def test_callable_traceback_lands_in_output_log(tmp_path):
    run_trainable("sample_trainables:raises", {}, tmp_path / "r")
    log = (tmp_path / "r" / "output.log").read_text()
    assert "about to fail" in log
    assert "Traceback" in log and "ValueError: diverged at step 3" in log


def test_warnings_in_the_log_make_status_warning(tmp_path):
    res = run_trainable("sample_trainables:warns", {}, tmp_path / "r")
    assert res.status == "warning"
    assert res.ok
    assert any("learning rate looks high" in w for w in res.warnings)
    lines = (tmp_path / "r" / "status").read_text().splitlines()
    assert lines[0] == "warning"
    assert any("learning rate looks high" in ln for ln in lines[1:])


def test_warnings_are_caught_every_time_in_a_long_lived_process(tmp_path):
    # Python shows a warning once per location by default; every run must still see it.
    first = run_trainable("sample_trainables:warns", {}, tmp_path / "a")
    second = run_trainable("sample_trainables:warns", {}, tmp_path / "b")
    assert first.status == second.status == "warning"


def test_report_hook_prunes_a_callable(tmp_path):
    seen = []

    def hook(step, values):
        seen.append((step, values["loss"]))
        return step >= 2

    res = run_trainable(
        "sample_trainables:quadratic", {"x": 0}, tmp_path / "r", budget={"epochs": 10}, hook=hook
    )
    assert res.status == "pruned"
    assert res.reason == "pruned at step 2"
    assert [s for s, _ in seen] == [1, 2]
    assert status_of(tmp_path / "r")[0] == "pruned"


def test_callable_sees_its_run_dir_in_the_environment_only_while_running(tmp_path):
    assert "EXPFLOW_RUN_DIR" not in os.environ
    run_trainable("sample_trainables:params_only", {}, tmp_path / "r")
    assert "EXPFLOW_RUN_DIR" not in os.environ


# --- scripts -----------------------------------------------------------------------

METRICS_FILE_SCRIPT = """
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float)
p.add_argument("--layers", type=int)
a = p.parse_args()
for step in (1, 2, 3):
    print(f"EXPFLOW_METRIC step={step} loss={a.lr * 10 / step}", flush=True)
epochs = os.environ.get("EXPFLOW_BUDGET_EPOCHS")
open(os.path.join(os.environ["EXPFLOW_RUN_DIR"], "weights.bin"), "w").write("w")
json.dump({"loss": a.lr * a.layers, "epochs_seen": float(epochs)}, open(os.environ["EXPFLOW_METRICS_FILE"], "w"))
"""


def test_script_with_metrics_file_and_step_lines(tmp_path):
    script = write_script(tmp_path / "train.py", METRICS_FILE_SCRIPT)
    rd = tmp_path / "run"
    res = run_trainable(str(script), {"lr": 0.5, "layers": 3}, rd, budget={"epochs": 7})
    assert res.status == "ok", res.reason
    assert res.metrics == {"loss": 1.5, "epochs_seen": 7.0}
    assert [r["step"] for r in res.intermediate] == [1, 2, 3]
    assert (rd / "weights.bin").exists()
    meta = json.loads((rd / "metadata.json").read_text())
    assert meta["kind"] == "script" and meta["returncode"] == 0
    assert meta["command"][-4:] == ["--lr", "0.5", "--layers", "3"]
    assert "EXPFLOW_METRIC step=3" in (rd / "output.log").read_text()


def test_script_printing_metric_lines_only(tmp_path):
    script = write_script(
        tmp_path / "s.py",
        """
        import sys
        print("training...")
        print("EXPFLOW_METRIC acc=0.75 loss=0.3")
        print("EXPFLOW_METRIC loss=0.25")
        print("a note on stderr", file=sys.stderr)
        """,
    )
    res = run_trainable(str(script), {}, tmp_path / "r")
    assert res.status == "ok"
    assert res.metrics == {"acc": 0.75, "loss": 0.25}
    log = (tmp_path / "r" / "output.log").read_text()
    assert "training..." in log and "a note on stderr" in log


def test_executable_non_python_script_runs(tmp_path):
    script = write_script(
        tmp_path / "train.sh",
        """#!/bin/sh
        echo "EXPFLOW_METRIC loss=$2"
        """.replace("        ", ""),
        executable=True,
    )
    res = run_trainable(str(script), {"loss": 0.125}, tmp_path / "r")
    assert res.status == "ok", res.reason
    assert res.metrics == {"loss": 0.125}


@pytest.mark.parametrize(
    ("make", "reason_part"),
    [
        (lambda d: d / "missing.py", "does not exist"),
        (
            lambda d: write_script(d / "data.txt", "not a program"),
            "not runnable: not a .py file and not executable",
        ),
        (
            lambda d: write_script(
                d / "crash.py", "import sys\nprint('boom: out of memory')\nsys.exit(3)\n"
            ),
            "exited with code 3: boom: out of memory",
        ),
        (
            lambda d: write_script(d / "quiet.py", "print('done, no metrics')\n"),
            "reported no metrics",
        ),
        (
            lambda d: write_script(
                d / "badjson.py",
                "import os\nopen(os.environ['EXPFLOW_METRICS_FILE'],'w').write('{oops')\n",
            ),
            "metrics file metrics.json is not valid JSON",
        ),
        (
            lambda d: write_script(
                d / "badval.py",
                "import os,json\njson.dump({'loss':'nan-ish'},open(os.environ['EXPFLOW_METRICS_FILE'],'w'))\n",
            ),
            "metric 'loss' is not a number",
        ),
    ],
)
def test_script_failures_are_failed_runs_with_reason(tmp_path, make, reason_part):
    script = make(tmp_path)
    rd = tmp_path / "run"
    res = run_trainable(str(script), {}, rd)
    assert res.status == "failed"
    assert reason_part in res.reason
    status, reason = status_of(rd)
    assert status == "failed" and reason_part in reason
    assert json.loads((rd / "metrics.json").read_text()) == {}


def test_script_killed_by_timeout_is_failed(tmp_path):
    script = write_script(tmp_path / "slow.py", "import time\ntime.sleep(60)\n")
    t0 = time.monotonic()
    res = run_trainable(str(script), {}, tmp_path / "r", timeout=1)
    assert res.status == "failed"
    assert "timed out after 1 s" in res.reason
    assert time.monotonic() - t0 < 20


def test_script_pruned_when_hook_says_so(tmp_path):
    script = write_script(
        tmp_path / "long.py",
        """
        import time
        for step in range(1, 1000):
            print(f"EXPFLOW_METRIC step={step} loss={1.0/step}", flush=True)
            time.sleep(0.01)
        print("EXPFLOW_METRIC loss=0.001")
        """,
    )
    res = run_trainable(str(script), {}, tmp_path / "r", hook=lambda step, v: step >= 5)
    assert res.status == "pruned"
    assert res.reason == "pruned at step 5"
    assert len(res.intermediate) < 1000


def test_script_warning_lines_give_warning_status(tmp_path):
    script = write_script(
        tmp_path / "w.py",
        "import warnings\nwarnings.warn('loss is nan at step 4')\nprint('EXPFLOW_METRIC loss=1')\n",
    )
    res = run_trainable(str(script), {}, tmp_path / "r")
    assert res.status == "warning"
    assert any("loss is nan at step 4" in w for w in res.warnings)


def test_script_does_not_inherit_a_parents_clearml_task(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARML_PROC_MASTER_ID", "123:abc")
    script = write_script(
        tmp_path / "env.py",
        "import os\nprint('EXPFLOW_METRIC has_master=' + str(int('CLEARML_PROC_MASTER_ID' in os.environ)))\n",
    )
    res = run_trainable(str(script), {}, tmp_path / "r")
    assert res.metrics == {"has_master": 0.0}


# --- parsing -----------------------------------------------------------------------


def test_trainable_kinds():
    assert Trainable.parse("pkg.mod:train").kind == "callable"
    assert Trainable.parse("train.py").kind == "script"
    assert Trainable.parse("scripts/train_models_forward.py").kind == "script"
    assert Trainable.parse("./run.sh").kind == "script"


def test_missing_script_check_is_one_clear_error(tmp_path):
    with pytest.raises(ExpflowError, match=r"trainable script '.*nope.py' does not exist"):
        Trainable.parse(str(tmp_path / "nope.py")).check()
    with pytest.raises(ExpflowError, match="trainable .* is empty"):
        Trainable.parse("  ")


def test_budget_validation():
    assert Budget.from_value({"epochs": 5}).as_env() == {"EXPFLOW_BUDGET_EPOCHS": "5"}
    with pytest.raises(ExpflowError, match="budget key 'epoch' is not known"):
        Budget.from_value({"epoch": 5})
    with pytest.raises(ExpflowError, match="must be a positive number"):
        Budget.from_value({"seconds": -1})


def test_argument_styles():
    params = {"lr": 0.1, "flag": True, "dims": [1, 2]}
    assert format_args(params) == ["--lr", "0.1", "--flag", "true", "--dims", "[1, 2]"]
    assert format_args(params, "equals")[0] == "--lr=0.1"
    assert format_args(params, "hydra")[0] == "++lr=0.1"


def test_metric_line_parsing():
    assert parse_metric_line("EXPFLOW_METRIC step=3 loss=0.5 acc=0.9") == (
        3,
        {"loss": 0.5, "acc": 0.9},
    )
    assert parse_metric_line("EXPFLOW_METRIC loss=1e-3") == (None, {"loss": 0.001})
    assert parse_metric_line("loss=0.5") is None


def test_python_script_uses_the_same_interpreter(tmp_path):
    script = write_script(
        tmp_path / "py.py", "import sys\nprint('EXPFLOW_METRIC ok=1')\nprint(sys.executable)\n"
    )
    run_trainable(str(script), {}, tmp_path / "r")
    assert sys.executable in (tmp_path / "r" / "output.log").read_text()


def test_prose_mentioning_warnings_is_not_a_warning(tmp_path):
    script = write_script(
        tmp_path / "p.py",
        "print('no warnings so far, all good')\nprint('EXPFLOW_METRIC loss=1')\n",
    )
    assert run_trainable(str(script), {}, tmp_path / "r").status == "ok"
    script2 = write_script(
        tmp_path / "l.py",
        "import logging\nlogging.warning('grad norm exploded')\nprint('EXPFLOW_METRIC loss=1')\n",
    )
    res = run_trainable(str(script2), {}, tmp_path / "r2")
    assert res.status == "warning" and "grad norm exploded" in res.warnings[0]


def test_none_parameters_are_left_out_of_script_arguments():
    assert format_args({"a": None, "b": 1}) == ["--b", "1"]


def test_a_callable_in_a_thread_stops_at_its_next_report_when_its_run_ends(tmp_path):
    """A cancelled flow run must not wait for trials running in threads to finish."""
    import threading

    from expflow_flows.runs import trainable

    results = []
    worker = threading.Thread(
        target=lambda: results.append(
            run_trainable("sample_trainables:endless", {}, tmp_path / "r")
        )
    )
    worker.start()
    try:
        time.sleep(0.5)
        assert worker.is_alive() and not results
        trainable.request_stop()
        worker.join(timeout=10)
        assert not worker.is_alive(), "the trainable did not stop"
    finally:
        trainable.request_stop()
        worker.join(timeout=10)
        trainable.clear_stop()
    (res,) = results
    assert res.status == "failed"
    assert "its flow run is being cancelled or shut down" in res.reason
    # Stopping is for one run only: the next run trains normally.
    again = run_trainable("sample_trainables:quadratic", {"x": 3}, tmp_path / "r2")
    assert again.ok


def test_callables_on_threads_overlap_and_each_captures_its_own_output(tmp_path):
    # Two callables in one process (the threads runner) run at the same time: each waits
    # for the other at a barrier, which fails unless both are running at once.
    import threading

    import sample_trainables

    sample_trainables.MEET = threading.Barrier(2)
    results = {}

    def one(tag: str) -> None:
        results[tag] = run_trainable(
            "sample_trainables:meets_another", {"tag": tag}, tmp_path / tag
        )

    threads = [threading.Thread(target=one, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tag, other in (("a", "b"), ("b", "a")):
        assert results[tag].ok, results[tag].reason
        log = (tmp_path / tag / "output.log").read_text()
        assert f"tag={tag}" in log and f"done={tag}" in log
        assert f"tag={other}" not in log
    assert "EXPFLOW_RUN_DIR" not in os.environ  # back to what it was before either ran
