"""Progress a user follows while work runs: the sweep's and the pipeline's progress artifacts,
the live status page, and what `expflow sweep run` prints, on and off a terminal."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

EXPFLOW = str(Path(sys.executable).with_name("expflow"))

# A script trainable that takes a while; some combinations warn, some fail.
TICKING = (
    "import argparse, json, os, sys, time\n"
    "p = argparse.ArgumentParser()\n"
    "p.add_argument('--x', type=int); p.add_argument('--sleep', type=float)\n"
    "a = p.parse_args(); time.sleep(a.sleep)\n"
    "if a.x % 4 == 3: sys.exit(f'x={a.x} diverged')\n"
    "if a.x % 4 == 2: print('WARNING: x looks high')\n"
    "json.dump({'loss': float(a.x)}, open(os.environ['EXPFLOW_METRICS_FILE'], 'w'))\n"
)
# Of x in 0..11: 3, 7, 11 fail; 2, 6, 10 warn; the other six are ok.
TICKING_COUNTS = {"ok": 6, "warning": 3, "failed": 3}


def ticking_settings(tmp_path: Path, name: str, n: int = 12, sleep: float = 0.25) -> dict:
    script = tmp_path / "ticking.py"
    script.write_text(TICKING)
    return {
        "name": name,
        "trainable": str(script),
        "space": {"fixed": {"sleep": sleep}, "grid": {"x": list(range(n))}},
        "cluster": {"kind": "threads", "workers": 2},
    }


@contextlib.contextmanager
def watching(read: Callable[[], Any], every: float = 0.05) -> Iterator[list[Any]]:
    """Calls ``read()`` every ``every`` seconds while the block runs (in this context, so
    it talks to the same Prefect API); yields the list of distinct values seen, in order."""
    seen: list[Any] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                value = read()
            except Exception:  # noqa: BLE001 - a file being replaced, an API hiccup
                continue
            if value is not None and (not seen or seen[-1] != value):
                seen.append(value)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)


def artifacts(key: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def progress_of(key: str) -> tuple[float, str] | None:
    """The progress artifact's value and description, or None before it exists."""
    found = artifacts(key)
    return (float(found[-1].data), found[-1].description or "") if found else None


# --- the sweep flow ----------------------------------------------------------------------


def test_the_sweep_progress_artifact_moves_per_combination_with_counts_and_eta(
    prefect_harness, home, tmp_path, monkeypatch
):
    from expflow_flows.flows.sweep import sweep

    monkeypatch.setenv("EXPFLOW_PROGRESS_EVERY_S", "0.1")
    with watching(lambda: progress_of("ticking-progress")) as seen:
        summary = sweep(settings=ticking_settings(tmp_path, "ticking"))
    assert summary["counts"] == TICKING_COUNTS
    values = [v for v, _ in seen]
    assert values == sorted(values), seen  # never goes backwards
    # One Prefect task ran all twelve: the artifact still moved combination by combination.
    middle = [(v, text) for v, text in seen if 0 < v < 100]
    assert middle, seen
    assert any(
        re.search(r"\d+/12 .*\d+ ok, \d+ warning, \d+ failed", text) and "ETA" in text
        for _, text in middle
    ), middle
    [final] = artifacts("ticking-progress")  # updated in place, not one per update
    assert final.data == 100
    assert "12/12" in final.description and "6 ok, 3 warning, 3 failed" in final.description


def test_a_burst_of_progress_updates_makes_few_api_calls_and_ends_on_the_last(
    prefect_harness, monkeypatch
):
    from prefect import flow

    from expflow_flows.flows import progress as live

    monkeypatch.setenv("EXPFLOW_PROGRESS_EVERY_S", "60")
    sent: list[float] = []
    real = live.update_progress_artifact

    def counting(artifact_id, progress, description=None):
        sent.append(progress)
        return real(artifact_id, progress, description)

    monkeypatch.setattr(live, "update_progress_artifact", counting)

    @flow
    def burst() -> None:
        report = live.LiveProgress("burst-progress", "a burst of 1,000 combinations")
        for done in range(1, 1001):
            report.show(done / 10, f"{done}/1000 done")
        report.close()

    burst()
    assert sent == [100.0]  # only the last value, once, however fast the updates came
    assert progress_of("burst-progress") == (100.0, "1000/1000 done")


def _reloads(page: str) -> bool:
    return "http-equiv='refresh'" in page.split("</head>")[0]


def _done(page: str) -> str:
    found = re.search(r"<b id='done'>([^<]*)</b>", page)
    return found.group(1) if found else ""


def test_the_status_page_reloads_while_the_sweep_runs_and_not_after(
    prefect_harness, home, tmp_path, monkeypatch
):
    import expflow_flows.flows.sweep as sweep_flow

    settings = ticking_settings(tmp_path, "paged", n=8, sleep=0.0)
    sweep_flow.sweep(settings=settings)
    page = home / "runs" / "paged" / "status.html"
    assert not _reloads(page.read_text()) and _done(page.read_text()) == "8 / 8"

    # Run it again: from the moment the sweep has work (before its workers start), the
    # page reloads itself and counts this run's combinations, not the last run's.
    at_cluster_start: list[str] = []
    real = sweep_flow.dask_client

    @contextlib.contextmanager
    def noting_the_page(*args, **kwargs):
        at_cluster_start.append(page.read_text())
        with real(*args, **kwargs) as client:
            yield client

    monkeypatch.setattr(sweep_flow, "dask_client", noting_the_page)
    settings = ticking_settings(tmp_path, "paged", n=8, sleep=0.4)
    with watching(lambda: page.read_text()) as seen:
        sweep_flow.sweep(settings={**settings, "force": True, "status_every_s": 0.25})
    assert _reloads(at_cluster_start[0]) and _done(at_cluster_start[0]) == "0 / 8"
    live = [p for p in seen if _reloads(p)]
    assert any(_done(p) not in ("0 / 8", "8 / 8") for p in live), [_done(p) for p in live]
    final = page.read_text()
    assert not _reloads(final) and _done(final) == "8 / 8" and "finished" in final


# --- the pipeline flow -------------------------------------------------------------------


def _pipeline_logs(run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200
        )
    return [log.message for log in logs]


def test_the_pipeline_run_carries_trial_progress_and_the_best_value(
    prefect_harness, home, tmp_path, monkeypatch
):
    from expflow_flows.flows.pipeline import pipeline

    monkeypatch.setenv("EXPFLOW_PROGRESS_EVERY_S", "0.05")
    settings = {
        "experiment": "quad-live",
        "train": "sample_trainables:slow_square",
        "evaluate": "sample_trainables:params_only",
        "space": {"x": {"type": "float", "low": 0.0, "high": 6.0}},
        "params": {"sleep": 0.3},
        "objective": "value",
        "direction": "minimize",
        "hpo": {"n_trials": 6, "pruner": "none", "storage": str(tmp_path / "journal.log")},
        "cluster": {"kind": "threads", "workers": 1},
        "gates": [],
        "submit": {"enabled": False},
    }
    with watching(lambda: progress_of("quad-live-hpo-progress")) as seen:
        state = pipeline(settings=settings, return_state=True)
    summary = state.result()
    run_id = state.state_details.flow_run_id
    [art] = artifacts("quad-live-hpo-progress")
    # On the pipeline's own run, not only on its nested `hpo` run.
    assert art.flow_run_id == run_id
    assert art.data == 100
    assert "trials 6/6: 6 complete" in art.description
    assert f"best value = {summary['best_value']:.4g}" in art.description
    middle = [(v, text) for v, text in seen if 0 < v < 100]
    assert middle and any("best value = " in text for _, text in middle), seen
    values = [v for v, _ in seen]
    assert values == sorted(values), seen

    deadline = time.monotonic() + 20
    while True:  # logs reach the API in batches
        lines = _pipeline_logs(run_id)
        if any("trials 6/6" in line for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    progress_lines = [line for line in lines if line.startswith("HPO quad-live: trials")]
    assert any("trials 1/6" in line for line in progress_lines), lines
    assert any("trials 6/6" in line and "best" in line for line in progress_lines), lines


# --- the command line --------------------------------------------------------------------


def _write_config(tmp_path: Path, name: str) -> Path:
    ticking_settings(tmp_path, name)  # writes the script
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"name: {name}\ntrainable: ticking.py\n"
        "space: {fixed: {sleep: 0.25}, grid: {x: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}}\n"
        "cluster: {kind: threads, workers: 2}\n"
    )
    return config


def _api_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def test_sweep_run_prints_progress_lines_off_a_terminal(prefect_harness, home, tmp_path):
    config = _write_config(tmp_path, "cli-ticking")
    out = subprocess.run(
        [EXPFLOW, "sweep", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_api_env(), "EXPFLOW_PROGRESS_EVERY_S": "0"},
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "12 combinations (12 ran, 0 cached): ok 6, warning 3, failed 3" in out.stdout
    lines = re.findall(r"^sweep cli-ticking: (\d+)/12 .*$", out.stderr, re.MULTILINE)
    done = [int(n) for n in lines]
    assert done == sorted(done) and done[-1] == 12, out.stderr[-3000:]
    middle = [
        line
        for line in out.stderr.splitlines()
        if re.match(r"sweep cli-ticking: ([1-9]|1[01])/12 ", line)
    ]
    assert middle, out.stderr[-3000:]
    assert all(re.search(r"\d+ ok, \d+ warning, \d+ failed", line) for line in middle)
    assert any("ETA" in line for line in middle)
    last = [x for x in out.stderr.splitlines() if x.startswith("sweep cli-ticking: 12/12")][-1]
    assert "6 ok, 3 warning, 3 failed" in last


def test_progress_lines_off_a_terminal_come_at_most_every_few_seconds():
    from expflow_flows.cli.progress import SweepLines
    from expflow_flows.sweep.status import SweepProgress

    now = [0.0]
    printed: list[str] = []
    lines = SweepLines(printed.append, every=5.0, clock=lambda: now[0])
    for done in range(1, 81):  # a combination every 1/8 s for 10 s
        now[0] += 0.125
        lines.show(SweepProgress("many", to_run=80, ok=done, elapsed_s=now[0]))
    # One line after 5 s, and the last one; none of the 78 others.
    assert [line.split(":")[1].split()[0] for line in printed] == ["40/80", "80/80"]


def _read_all(fd: int, proc: subprocess.Popen, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def test_sweep_run_draws_a_progress_bar_on_a_terminal(prefect_harness, home, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    config = _write_config(tmp_path, "tty-ticking")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**_api_env(), "TERM": "xterm-256color", "COLUMNS": "200"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [EXPFLOW, "sweep", "run", "--config", str(config)],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    try:
        raw = _read_all(leader, proc, timeout=300)
    finally:
        os.close(leader)
    assert proc.wait(timeout=60) == 0, raw.decode(errors="replace")[-3000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode(errors="replace"))
    assert "━" in text  # a bar was drawn
    frames = re.findall(r"sweep tty-ticking\s.*?(\d+)/12\s+(\d+) ok · (\d+) warning · (\d+)", text)
    done = {int(n) for n, *_ in frames}
    assert 12 in done and done & set(range(1, 12)), text[-3000:]
    assert "ETA" in text
    assert ("12", "6", "3", "3") in frames
    # Prefect's log lines print above the bar, never glued onto the end of one.
    assert "chunk 0: ok 6, warning 3, failed 3" in text
    assert not re.search(r"ETA \S+ ?\d\d:\d\d:\d\d\.\d+ \|", text), text[-3000:]
