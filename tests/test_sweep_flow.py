"""The sweep flow on a real Dask LocalCluster: fan-out, caching and resume, chains, failures,
a dying worker, and a `kill -9` of the whole sweep."""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError

GRID = {"grid": {"x": [1, 2, 3, 4], "y": [0.0, 0.5, 1.0]}}


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """A log of every trainable call (Dask workers inherit the environment)."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("SWEEP_CALLS_LOG", str(log))

    def read(tag: str = "call") -> collections.Counter:
        if not log.exists():
            return collections.Counter()
        rows = [json.loads(x) for x in log.read_text().splitlines()]
        return collections.Counter(
            json.dumps(r["params"], sort_keys=True) for r in rows if r["tag"] == tag
        )

    return read


def run(**changes):
    """The sweep flow on quick test settings; ``changes`` replace top-level settings
    (``None`` removes one, e.g. ``trainable=None`` for a chain of steps)."""
    from expflow_flows.flows.sweep import sweep

    settings = {"name": "grid", "trainable": "sample_trainables:sweep_square", "space": GRID}
    settings.update(changes)
    return sweep(settings={k: v for k, v in settings.items() if v is not None})


def test_sweep_runs_every_combination_and_reports(prefect_harness, home, calls):
    from expflow_flows.sweep.results import SweepResults

    summary = run()
    assert summary["combinations"] == 12 and summary["ran"] == 12
    assert summary["counts"] == {"ok": 12}
    assert sum(calls().values()) == 12
    best = summary["best"][0]
    assert (best["param:x"], best["param:y"]) == (3, 0.0)
    sweep_dir = Path(summary["sweep_dir"])
    results = SweepResults.load(sweep_dir)
    assert len(results.rows) == 12
    assert {r["metric:value"] for r in results.rows} == {
        (x - 3) ** 2 + y for x in (1, 2, 3, 4) for y in (0.0, 0.5, 1.0)
    }
    for name in (
        "results.csv",
        "results.parquet",
        "dashboard.html",
        "status.html",
        "metadata.json",
    ):
        assert (sweep_dir / name).stat().st_size > 0
    assert "refresh" not in (sweep_dir / "status.html").read_text().split("</head>")[0].lower()
    meta = json.loads((sweep_dir / "metadata.json").read_text())
    assert meta["combinations"] == 12 and "python" in meta["environment"]
    # The resolved settings are recorded, the trainable in its full form.
    assert meta["config"]["trainable"]["target"] == "sample_trainables:sweep_square"
    assert meta["config"]["space"] == GRID and meta["config"]["cluster"]["kind"] == "local"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="grid-"))
        )
    links = {a.key: a.data for a in arts}
    assert str(sweep_dir / "dashboard.html") in links["grid-dashboard"]
    assert "grid-summary" in links and "Best by value" in links["grid-summary"]
    # Per-combination resource figures are recorded.
    assert all(r["wall_s"] is not None and r["cpu_s"] is not None for r in results.rows)


def test_rerun_skips_completed_and_force_version_and_new_values_invalidate(
    prefect_harness, home, calls
):
    run()
    again = run()
    assert again["ran"] == 0 and again["cached"] == 12
    assert sum(calls().values()) == 12
    wider = run(space={"grid": {"x": [1, 2, 3, 4, 5], "y": [0.0, 0.5, 1.0]}})
    assert wider["ran"] == 3  # only x=5 is new
    bumped = run(version="2")
    assert bumped["ran"] == 12
    forced = run(version="2", force=True)
    assert forced["ran"] == 12
    assert max(calls().values()) == 3  # ran for the first time, after the version bump, forced


def test_changing_a_script_trainable_invalidates_its_results(prefect_harness, home, tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import sys\nprint('EXPFLOW_METRIC value=' + sys.argv[2])\n")
    first = run(name="script", trainable=str(script), space={"grid": {"x": [1, 2]}})
    assert first["ran"] == 2
    assert run(name="script", trainable=str(script), space={"grid": {"x": [1, 2]}})["ran"] == 0
    script.write_text("import sys\nprint('EXPFLOW_METRIC value=' + str(2 * float(sys.argv[2])))\n")
    from expflow_flows.sweep import identity

    identity.file_checksum.cache_clear()
    changed = run(name="script", trainable=str(script), space={"grid": {"x": [1, 2]}})
    assert changed["ran"] == 2
    assert sorted(r["metric:value"] for r in changed["best"]) == [2.0, 4.0]


def test_a_chain_of_steps_with_per_step_force(prefect_harness, home, calls):
    steps = [
        {"name": "prepare", "target": "sample_trainables:prepare"},
        {"name": "train", "target": "sample_trainables:train_step"},
        {"name": "evaluate", "target": "sample_trainables:evaluate_step"},
    ]
    space = {"grid": {"x": [1, 2, 3]}}
    first = run(
        name="chain",
        trainable=None,
        steps=steps,
        space=space,
        objective="score",
        direction="maximize",
    )
    assert first["counts"] == {"ok": 3}
    assert first["best"][0]["metric:score"] == 7.0  # x=3: model 6, score 7
    run(name="chain", trainable=None, steps=steps, space=space, force=["train"])
    assert sum(calls("prepare").values()) == 3  # upstream step stayed cached
    assert sum(calls("train").values()) == 6
    assert sum(calls("evaluate").values()) == 6  # downstream of a forced step runs again
    steps[2]["version"] = "v2"
    run(name="chain", trainable=None, steps=steps, space=space)
    assert (sum(calls("prepare").values()), sum(calls("train").values())) == (3, 6)
    assert sum(calls("evaluate").values()) == 9


def test_failed_combinations_are_recorded_and_the_sweep_goes_on(prefect_harness, home):
    from expflow_flows.sweep.results import SweepResults

    space = {"grid": {"x": [-2, -1, 1, 2]}}
    summary = run(name="fails", trainable="sample_trainables:fails_when_negative", space=space)
    assert summary["counts"] == {"ok": 2, "failed": 2}
    failed = SweepResults.load(Path(summary["sweep_dir"])).filter(status="failed").rows
    assert all("negative x is not supported" in r["reason"] for r in failed)
    assert all("RuntimeError" in r["log_excerpt"] for r in failed)
    with pytest.raises(
        ExpflowError, match=r"2 of 4 combinations failed \(50.0%\), above max_failure_ratio 10.0%"
    ):
        run(
            name="fails",
            trainable="sample_trainables:fails_when_negative",
            space=space,
            max_failure_ratio=0.1,
        )


def test_a_dying_worker_does_not_fail_the_sweep(prefect_harness, home, tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("SWEEP_MARKERS", str(markers))
    summary = run(
        name="dies", trainable="sample_trainables:dies_once", space={"grid": {"x": [1, 2, 3]}}
    )
    assert summary["counts"] == {"ok": 3}
    assert len(list(markers.iterdir())) == 3  # each combination killed its worker once


def test_bad_sweep_settings_are_one_clear_error(prefect_harness, home):
    from prefect.exceptions import ParameterTypeError

    from expflow_flows.settings.sweep import load_sweep_settings

    with pytest.raises(ExpflowError, match="give exactly one of trainable"):
        run(steps=[{"name": "a", "target": "sample_trainables:prepare"}])
    # An unknown key is refused by Prefect's check of the flow's typed `settings`
    # parameter, before the run starts, naming the key...
    with pytest.raises(ParameterTypeError, match=r"settings\.resources\.gpus"):
        run(resources={"gpus": 1})
    # ...and by the settings resolution every entry point uses, as one line.
    with pytest.raises(ExpflowError) as err:
        load_sweep_settings(None, {"trainable": "m:f", "space": GRID, "resources": {"gpus": 1}})
    msg = str(err.value)
    assert "'resources.gpus' is not known" in msg and "gpu" in msg and "\n" not in msg
    # A setting of the earlier flat interface says where it is now.
    with pytest.raises(
        ParameterTypeError, match="'workers' is not known; it is now cluster.workers"
    ):
        run(workers=2)
    with pytest.raises(ExpflowError, match="force names step"):
        run(force=["train"])


KILL_SCRIPT = """
import sys
from expflow_flows.flows.sweep import sweep
sweep(settings={"name": "killed", "trainable": "sample_trainables:slow_square",
      "space": {"fixed": {"sleep": 0.3}, "grid": {"x": list(range(40))}}, "chunk_size": 10})
"""


def test_kill_9_of_the_whole_sweep_loses_and_duplicates_nothing(prefect_harness, home, calls):
    from prefect.settings import PREFECT_API_URL

    from expflow_flows.sweep.results import SweepResults

    store = home / "runs" / "killed" / "results.sqlite"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    done_before = 0
    while time.monotonic() < deadline and done_before < 8:
        time.sleep(0.5)
        if store.exists():
            try:
                with sqlite3.connect(store, timeout=5) as db:
                    done_before = db.execute(
                        "select count(*) from results where status='ok'"
                    ).fetchone()[0]
            except sqlite3.OperationalError:
                pass
        assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    survived = {r["combo_id"] for r in SweepResults.load(store.parent).filter(status="ok").rows}
    assert len(survived) >= 8
    assert sum(calls().values()) < 40

    summary = run(
        name="killed",
        trainable="sample_trainables:slow_square",
        space={"fixed": {"sleep": 0.3}, "grid": {"x": list(range(40))}},
        chunk_size=10,
    )
    assert summary["cached"] >= len(survived)
    rows = SweepResults.load(store.parent).rows
    assert len(rows) == 40 and len({r["key"] for r in rows}) == 40
    assert all(r["status"] == "ok" for r in rows)
    # What had completed before the kill never ran again.
    counts = calls()
    for row in rows:
        if row["combo_id"] in survived:
            assert counts[json.dumps({"sleep": 0.3, "x": row["param:x"]}, sort_keys=True)] == 1
