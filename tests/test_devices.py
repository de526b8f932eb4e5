"""Per-run GPU assignment: concurrent runs on a several-GPU machine each get their own.

The machine is faked: an ``nvidia-smi`` on PATH that lists GPUs 0..n-1, no GPU
variables inherited from the test's environment, and lock files under ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.runs.devices import DeviceRequest, discover, env_for, hold
from expflow_flows.settings.base import validate
from expflow_flows.settings.common import ClusterSettings

HOST_PATH = os.environ.get("PATH", os.defpath)
GUARD_S = 60  # how long a test waits for something that should happen at once


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine without GPUs (until ``gpus(n)``): nothing on PATH but a fake-tools folder."""
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("EXPFLOW_DEVICE_LOCKS", str(tmp_path / "locks"))
    tools = tmp_path / "tools"
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    return _Machine(tools)


class _Machine:
    def __init__(self, tools: Path):
        self.tools = tools

    def gpus(self, n: int, *, exit_code: int = 0) -> None:
        """An nvidia-smi that lists GPUs 0..n-1 (or fails with ``exit_code``)."""
        smi = self.tools / "nvidia-smi"
        lines = "".join(f"{i}\n" for i in range(n))
        body = f"printf '{lines}'" if not exit_code else "echo 'NVIDIA-SMI has failed' >&2"
        smi.write_text(f"#!/bin/sh\n{body}\nexit {exit_code}\n")
        smi.chmod(0o755)


def _waiter(request: DeviceRequest, got: list, told: list, **kw) -> threading.Thread:
    """A thread that holds ``request`` once it can, recording what it waited for and got."""

    def run() -> None:
        with hold(request, on_wait=told.append, poll_s=0.01, **kw) as devices:
            got.append(devices)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------- the reported problem


def test_four_runs_at_once_on_a_four_gpu_machine_get_four_different_gpus(machine):
    machine.gpus(4)
    request = DeviceRequest.from_value({"gpus": "auto"})
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(hold(request)) for _ in range(4)]
    assert sorted(held) == [("0",), ("1",), ("2",), ("3",)]
    assert [env_for(h) for h in held][2] == {"CUDA_VISIBLE_DEVICES": "2", "EXPFLOW_GPUS": "1"}


def test_a_fifth_run_waits_once_and_gets_the_gpu_that_is_freed(machine):
    machine.gpus(4)
    request = DeviceRequest("auto")
    got: list = []
    told: list = []
    with contextlib.ExitStack() as others:
        held = [others.enter_context(hold(request)) for _ in range(2)]
        third = hold(request)
        held.append(third.__enter__())
        held.append(others.enter_context(hold(request)))
        fifth = _waiter(request, got, told)
        _until(lambda: told, "the fifth run says it waits")
        time.sleep(0.1)  # it polls on; it says so once
        assert not got
        third.__exit__(None, None, None)
        fifth.join(GUARD_S)
    assert told == ["waiting for a free GPU: all 4 slots of gpus 0,1,2,3 are held"]
    assert got == [held[2]]


# ---------------------------------------------------------------- what is discovered


@pytest.mark.parametrize(
    ("env", "found"),
    [
        # CUDA_VISIBLE_DEVICES wins over everything else, even when it names none.
        (
            {
                "CUDA_VISIBLE_DEVICES": "2,3",
                "NVIDIA_VISIBLE_DEVICES": "0",
                "SLURM_JOB_ID": "7",
                "SLURM_JOB_GPUS": "1",
            },
            ["2", "3"],
        ),
        ({"CUDA_VISIBLE_DEVICES": ""}, []),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1"}, []),
        ({"CUDA_VISIBLE_DEVICES": "GPU-5e2a1c3d,1"}, ["GPU-5e2a1c3d", "1"]),
        ({"CUDA_VISIBLE_DEVICES": "0,-1,2"}, ["0"]),  # CUDA stops at the first bad entry
        # NVIDIA_VISIBLE_DEVICES next; 'all', 'void', 'none' say nothing about which.
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-aa,GPU-bb", "SLURM_JOB_ID": "7"}, ["GPU-aa", "GPU-bb"]),
        ({"NVIDIA_VISIBLE_DEVICES": "2,3"}, ["0", "1"]),  # a container numbers them from 0
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, ["0", "1", "2", "3"]),
        ({"NVIDIA_VISIBLE_DEVICES": "void"}, ["0", "1", "2", "3"]),
        ({"NVIDIA_VISIBLE_DEVICES": "none"}, ["0", "1", "2", "3"]),
        # Inside a Slurm job: the step's GPUs, else the job's.
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "1,3", "SLURM_JOB_GPUS": "0,1,2,3"}, ["1", "3"]),
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,2"}, ["0", "2"]),
        ({"SLURM_JOB_GPUS": "0,2"}, ["0", "1", "2", "3"]),  # not in a job: a stale variable
        # Else nvidia-smi.
        ({}, ["0", "1", "2", "3"]),
    ],
)
def test_discovery_takes_the_first_source_that_names_devices(machine, env, found):
    machine.gpus(4)
    assert discover({**env, "PATH": str(machine.tools)}) == found


def test_discovery_reads_this_process_environment_by_default(machine, monkeypatch):
    machine.gpus(4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert discover() == ["1", "2"]
    assert DeviceRequest("auto").devices() == ["1", "2"]


def test_without_nvidia_smi_or_when_it_fails_there_is_no_gpu(machine):
    assert discover() == []
    with pytest.raises(ExpflowError) as caught:
        DeviceRequest("auto").devices()
    line = str(caught.value)
    assert line.startswith("gpus: auto found no GPU") and "no nvidia-smi on PATH" in line
    assert "\n" not in line
    machine.gpus(4, exit_code=9)
    assert discover() == []
    with pytest.raises(ExpflowError, match=r"nvidia-smi failed \(exit 9: NVIDIA-SMI has failed"):
        DeviceRequest("auto").devices()


def test_cuda_visible_devices_set_empty_means_no_gpu_even_with_nvidia_smi(machine, monkeypatch):
    machine.gpus(4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ExpflowError, match="CUDA_VISIBLE_DEVICES='' names none"):
        with hold(DeviceRequest("auto")):
            pass


# ---------------------------------------------------------------- several and shared devices


def test_two_devices_per_run_take_two_each_and_never_the_same(machine):
    machine.gpus(4)
    request = DeviceRequest.from_value({"gpus": "auto", "per_run": 2})
    got: list = []
    told: list = []
    with hold(request) as first, hold(request) as second:
        third = _waiter(request, got, told)
        _until(lambda: told, "a third run waits")
        assert len(first) == len(second) == 2 and not set(first) & set(second)
        assert env_for(first)["EXPFLOW_GPUS"] == "2"
        assert env_for(first)["CUDA_VISIBLE_DEVICES"] == ",".join(first)
    third.join(GUARD_S)
    assert told == ["waiting for 2 free GPUs: fewer of the 4 devices of gpus 0,1,2,3 are free"]
    assert len(got[0]) == 2


def test_more_devices_per_run_than_there_are_is_one_line_naming_both(machine):
    with pytest.raises(ExpflowError) as caught:
        with hold(DeviceRequest(["0"], per_run=2)):
            pass
    assert str(caught.value) == "gpus_per_run 2 needs 2 devices per run but gpus 0 has 1"


def test_half_a_gpu_per_run_spreads_first_then_puts_two_runs_on_each(machine):
    machine.gpus(4)
    request = DeviceRequest.from_value({"gpus": "auto", "per_run": 0.5})
    with contextlib.ExitStack() as stack:
        first_two = [stack.enter_context(hold(request)) for _ in range(2)]
        assert len(set(first_two)) == 2  # two runs on four GPUs: different devices
        rest = [stack.enter_context(hold(request)) for _ in range(6)]
        per_device = Counter(d for held in first_two + rest for d in held)
        assert per_device == {"0": 2, "1": 2, "2": 2, "3": 2}
        assert env_for(rest[0])["EXPFLOW_GPUS"] == "1"
        got: list = []
        told: list = []
        ninth = _waiter(request, got, told)
        _until(lambda: told, "a ninth run waits")
    ninth.join(GUARD_S)
    assert told == ["waiting for a free GPU: all 8 slots of gpus 0,1,2,3 are held"]


def test_a_whole_device_run_and_shared_runs_never_meet_on_one_device(machine):
    whole = DeviceRequest(["0", "1"])
    shared = DeviceRequest(["0", "1"], per_run=0.5)
    with hold(whole) as alone:
        with hold(shared) as a, hold(shared) as b:
            assert a == b and a != alone  # the shared runs fill the other device
            got: list = []
            told: list = []
            waiter = _waiter(whole, got, told)
            _until(lambda: told, "a whole-device run waits for the shared device")
        waiter.join(GUARD_S)  # the shared runs are over: it gets their device
        assert got == [a]


# ---------------------------------------------------------------- threads and processes


def test_four_threads_holding_at_once_get_four_different_gpus(machine):
    machine.gpus(4)
    request = DeviceRequest("auto")
    all_holding = threading.Barrier(4, timeout=GUARD_S)
    got: list = []

    def run() -> None:
        with hold(request) as devices:
            got.append(devices)
            all_holding.wait()  # everyone holds a GPU at the same moment

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD_S)
    assert sorted(got) == [("0",), ("1",), ("2",), ("3",)]


HOLDER = """
import pathlib, sys, time
from expflow_flows.runs.devices import DeviceRequest, hold

out, name, others, per_run = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
with hold(DeviceRequest("auto", float(per_run)), poll_s=0.01) as got:
    (out / f"{name}.tmp").write_text(",".join(got))
    (out / f"{name}.tmp").rename(out / f"{name}.got")
    # Hold on until every other holder holds too (or for ever, with others = -1).
    while others < 0 or len(list(out.glob("*.got"))) < others:
        time.sleep(0.01)
"""


def _holder(out: Path, name: str, others: int, per_run: float = 1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), name, str(others), str(per_run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(("per_run", "runs"), [(1, 4), (0.5, 8)])
def test_processes_holding_at_once_never_share_a_slot(machine, tmp_path, per_run, runs):
    machine.gpus(4)
    out = tmp_path / "out"
    out.mkdir()
    procs = [_holder(out, f"run{i}", runs, per_run) for i in range(runs)]
    for proc in procs:
        said, _ = proc.communicate(timeout=GUARD_S)
        assert proc.returncode == 0, said
    got = Counter((out / f"run{i}.got").read_text() for i in range(runs))
    assert got == {"0": runs // 4, "1": runs // 4, "2": runs // 4, "3": runs // 4}


def test_a_holder_killed_with_sigkill_frees_its_gpu_for_a_waiting_run(machine, tmp_path):
    machine.gpus(1)
    out = tmp_path / "out"
    out.mkdir()
    holder = _holder(out, "killed", -1)
    try:
        _until(lambda: (out / "killed.got").exists(), "the holder holds GPU 0")
        got: list = []
        told: list = []
        waiter = _waiter(DeviceRequest("auto"), got, told)
        _until(lambda: told, "the next run waits for GPU 0")
        assert not got
        holder.send_signal(signal.SIGKILL)
        waiter.join(GUARD_S)
    finally:
        holder.kill()
        holder.communicate()
    assert told == ["waiting for a free GPU: all 1 slots of gpus 0 are held"]
    assert got == [("0",)]


def test_runs_in_different_slurm_jobs_do_not_wait_for_each_other(machine, monkeypatch, tmp_path):
    request = DeviceRequest(["0"])
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    with hold(request) as first:
        monkeypatch.setenv("SLURM_JOB_ID", "102")  # another job on the node: its own GPU 0
        with hold(request) as second:
            assert first == second == ("0",)
    folders = sorted(p.name for p in (tmp_path / "locks").iterdir())
    assert folders == ["slurm-101", "slurm-102"]


# ---------------------------------------------------------------- requests as data


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"gpus": "auto"}, DeviceRequest("auto", 1.0)),
        ({"gpus": [0, 1], "per_run": 0.5}, DeviceRequest(("0", "1"), 0.5)),
        ({"gpus": "0, 1", "per_run": 2}, DeviceRequest(("0", "1"), 2.0)),
        ({"gpus": ["GPU-5e2a1c3d"], "per_run": 0.25}, DeviceRequest(("GPU-5e2a1c3d",), 0.25)),
        ("auto", DeviceRequest("auto")),
        (None, None),
    ],
)
def test_requests_travel_as_plain_data(value, expected):
    request = DeviceRequest.from_value(value)
    assert request == expected
    if request is not None:
        again = DeviceRequest.from_value(json.loads(json.dumps(request.to_dict())))
        assert again == request and DeviceRequest.from_value(request) is request


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"gpus": 2}, "gpus 2: expected 'auto' or device ids such as [0, 1]"),
        ({"gpus": [0, 0]}, "device 0 is named twice"),
        ({"gpus": []}, "gpus []: no device ids"),
        ({"gpus": ["a b"]}, "'a b' is not a device id"),
        ({"gpus": [True]}, "True is not a device id"),
        ({"gpus": "auto", "per_run": 0.3}, "per_run 0.3: expected a whole number"),
        ({"gpus": "auto", "per_run": 1.5}, "per_run 1.5: expected a whole number"),
        ({"gpus": "auto", "per_run": 0}, "per_run 0: expected"),
        ({"gpus": "auto", "per_run": "half"}, "per_run 'half': expected"),
        ({"gpus": "auto", "per_run": float("nan")}, "per_run nan: expected"),
        ({"gpu": "auto"}, "key 'gpu' is not known; accepted: gpus, per_run"),
        ({"per_run": 1}, "gpus is missing"),
        (3.5, "device request 3.5: expected a mapping"),
    ],
)
def test_bad_requests_are_one_line_naming_the_value(value, named):
    with pytest.raises(ExpflowError) as caught:
        DeviceRequest.from_value(value)
    line = str(caught.value)
    assert named in line and "\n" not in line


def test_a_third_of_a_gpu_may_be_written_as_0_33(machine):
    request = DeviceRequest(["0"], per_run=0.33)
    with hold(request), hold(request), hold(request):
        got: list = []
        told: list = []
        waiter = _waiter(request, got, told)
        _until(lambda: told, "a fourth run waits")
    waiter.join(GUARD_S)
    assert told == ["waiting for a free GPU: all 3 slots of gpus 0 are held"]


# ---------------------------------------------------------------- cluster settings


def _cluster(**given) -> ClusterSettings:
    return validate(ClusterSettings, given, "sweep")


def test_cluster_gpus_accept_ids_as_numbers_strings_or_a_comma_list():
    assert _cluster(gpus=[0, "1"]).gpus == ["0", "1"]
    assert _cluster(gpus="0,1").gpus == ["0", "1"]
    assert _cluster(gpus="auto").gpus == "auto"
    with pytest.raises(ExpflowError) as caught:
        _cluster(gpus=1)
    assert str(caught.value).startswith("sweep setting gpus=1: expected 'auto' or device ids")
    with pytest.raises(ExpflowError, match=r"gpus_per_run=0.4: expected a whole number"):
        _cluster(gpus="auto", gpus_per_run=0.4)


def test_cluster_device_request_and_the_older_resources_gpu():
    assert _cluster().device_request() is None
    assert _cluster(gpus_per_run=0.5).device_request() is None  # no GPUs asked for
    assert _cluster(gpus=[0, 1], gpus_per_run=0.5).device_request() == {
        "gpus": ["0", "1"],
        "per_run": 0.5,
    }
    assert _cluster().device_request(0.5) == {"gpus": "auto", "per_run": 0.5}
    assert _cluster(gpus=[2, 3]).device_request(2) == {"gpus": ["2", "3"], "per_run": 2}
    assert _cluster().device_request(0) is None
    with pytest.raises(ExpflowError, match=r"^resources.gpu=0.4: expected a whole number"):
        _cluster().device_request(0.4)
    with pytest.raises(ExpflowError, match="resources.gpu=1 but cluster.gpus_per_run=0.5"):
        _cluster(gpus="auto", gpus_per_run=0.5).device_request(1)


def test_gpus_auto_on_a_machine_without_a_gpu_is_refused_before_anything_runs(machine):
    for kind in ("local", "threads"):
        with pytest.raises(ExpflowError) as caught:
            _cluster(kind=kind, gpus="auto").check()
        line = str(caught.value)
        assert line.startswith("cluster.gpus: auto found no GPU (") and "\n" not in line
    # Runs elsewhere (Slurm jobs, a remote scheduler) find their GPUs there.
    _cluster(kind="slurm", gpus="auto").check()
    _cluster(address="inproc://elsewhere", gpus="auto").check()


def test_more_workers_than_gpu_slots_is_refused_with_what_would_fit(machine):
    machine.gpus(2)
    with pytest.raises(ExpflowError) as caught:
        _cluster(workers=4, gpus=[0, 1]).check()
    assert str(caught.value) == (
        "cluster.workers=4 but gpus 0,1 with gpus_per_run 1 give 2 runs at once; "
        "lower workers or set gpus_per_run: 0.5"
    )
    with pytest.raises(ExpflowError, match="gpus 0,1 with gpus_per_run 2 give 1 runs at once"):
        _cluster(workers=2, gpus="auto", gpus_per_run=2).check()
    with pytest.raises(ExpflowError, match="needs 4 devices per run but gpus 0,1 has 2"):
        _cluster(workers=1, gpus="auto", gpus_per_run=4).check()
    _cluster(workers=4, gpus="auto", gpus_per_run=0.5).check()
    _cluster(kind="threads", workers=2, gpus="auto").check()


# ---------------------------------------------------------------- Dask workers


def test_local_dask_workers_declare_the_gpus_they_share(machine):
    from expflow_flows.flows.clusters import dask_client

    with pytest.raises(ExpflowError, match=r"gpu=1 but this machine has no GPU"):
        with dask_client(_cluster(kind="threads"), {"GPU": 1}):
            pass
    machine.gpus(4)
    with pytest.raises(ExpflowError, match=r"gpu=2 per combination but 4 GPUs over"):
        with dask_client(_cluster(kind="threads", workers=4), {"GPU": 2}):
            pass
    with dask_client(_cluster(kind="threads", workers=2), {"GPU": 1}) as client:
        workers = client.scheduler_info()["workers"].values()
        assert [w["resources"]["GPU"] for w in workers] == [2, 2]
        assert client.submit(len, "ab", resources={"GPU": 1}).result(timeout=GUARD_S) == 2


# ---------------------------------------------------------------- what a run sees


SHOW_GPUS = """
import os, pathlib, sys, time
meet = pathlib.Path(sys.argv[sys.argv.index("--meet") + 1])
gpu = os.environ["CUDA_VISIBLE_DEVICES"]
(meet / f"{os.getpid()}").write_text(gpu)
deadline = time.monotonic() + 60
while len(list(meet.iterdir())) < 4 and time.monotonic() < deadline:
    time.sleep(0.01)  # all four runs are running at once
print("EXPFLOW_METRIC gpu=" + gpu)
print("EXPFLOW_METRIC gpus=" + os.environ["EXPFLOW_GPUS"])
"""


def test_four_script_runs_at_once_each_see_only_their_own_gpu(machine, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from expflow_flows.runs.trainable import run_trainable

    machine.gpus(4)
    script = tmp_path / "show.py"
    script.write_text(SHOW_GPUS)
    meet = tmp_path / "meet"
    meet.mkdir()
    request = {"gpus": "auto", "per_run": 1}

    def run(i: int):
        return run_trainable(
            str(script), {"meet": str(meet)}, tmp_path / f"run{i}", devices=request
        )

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert all(r.status == "ok" for r in results), [r.reason for r in results]
    assert sorted(r.metrics["gpu"] for r in results) == [0, 1, 2, 3]
    assert all(r.metrics["gpus"] == 1 for r in results)
    for r in results:
        meta = json.loads((r.run_dir / "metadata.json").read_text())
        assert meta["gpus"] == [str(int(r.metrics["gpu"]))]


def test_a_sweep_and_an_hpo_stage_on_four_gpus_give_each_run_its_own(
    prefect_harness, home, machine, tmp_path, monkeypatch
):
    """The flows hand their cluster's GPUs out per run: 4 combinations and 4 trials at once
    on a fake 4-GPU machine each see a distinct single device, and record it."""
    from expflow_flows.flows.pipeline import hpo_flow
    from expflow_flows.flows.sweep import sweep
    from expflow_flows.settings.pipeline import load_pipeline_settings

    machine.gpus(4)
    monkeypatch.setenv("PATH", f"{machine.tools}{os.pathsep}{HOST_PATH}")
    script = tmp_path / "show.py"
    script.write_text(SHOW_GPUS)
    cluster = {"kind": "threads", "workers": 4, "gpus": "auto"}
    meet = tmp_path / "meet-sweep"
    meet.mkdir()
    summary = sweep(
        settings={
            "name": "gpus",
            "trainable": str(script),
            "space": {"grid": {"i": [1, 2, 3, 4]}, "fixed": {"meet": str(meet)}},
            "cluster": cluster,
        }
    )
    assert summary["counts"] == {"ok": 4}
    seen = sorted(
        json.loads(p.read_text())["gpus"][0]
        for p in (home / "runs" / "gpus" / "runs").rglob("metadata.json")
    )
    assert seen == ["0", "1", "2", "3"]

    meet = tmp_path / "meet-hpo"
    meet.mkdir()
    settings = load_pipeline_settings(
        overrides={
            "experiment": "gpus",
            "train": {"target": str(script)},
            "space": {"i": {"type": "int", "low": 1, "high": 100}},
            "params": {"meet": str(meet)},
            "objective": "gpu",
            "hpo": {"n_trials": 4, "pruner": "none", "budget": {"epochs": 1}},
            "cluster": cluster,
        }
    )
    outcome = hpo_flow(settings, str(tmp_path / "hpo"))
    assert outcome["complete"] == 4
    assert sorted(row["value"] for row in outcome["trials"]) == [0, 1, 2, 3]
