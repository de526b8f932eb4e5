"""Sweeps and packages from the command line, as real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

EXPFLOW = str(Path(sys.executable).with_name("expflow"))


def cli(*args: str, timeout: float = 300, **env: str):
    return subprocess.run(
        [EXPFLOW, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )


def test_sweep_run_results_package_and_reproduce(home, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import argparse, json, os\n"
        "p = argparse.ArgumentParser(); p.add_argument('--lr', type=float); p.add_argument('--seed', type=int)\n"
        "a = p.parse_args()\n"
        "json.dump({'loss': a.lr * 10 + a.seed / 100}, open(os.environ['EXPFLOW_METRICS_FILE'], 'w'))\n"
    )
    space = tmp_path / "space.yaml"
    space.write_text("grid: {lr: [0.1, 0.2, 0.3]}\nreplicates: {param: seed, values: [0, 1]}\n")
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"name: cli-sweep\ntrainable: {script.name}\nspace: space.yaml\n"
        "cluster: {workers: 1}\nobjective: loss\n"
    )
    out = cli("sweep", "run", "--config", str(config), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["counts"] == {"ok": 6} and summary["best"][0]["param:lr"] == 0.1

    status = cli("sweep", "status", "cli-sweep")
    assert status.returncode == 0 and "6/6" in status.stdout
    stats = cli("sweep", "results", "cli-sweep", "--best", "loss", "--by", "lr", "--json")
    rows = [json.loads(x) for x in stats.stdout.splitlines()]
    assert [r["n"] for r in rows] == [2, 2, 2]
    assert abs(rows[0]["mean"] - 1.005) < 1e-9
    table = cli("sweep", "results", "cli-sweep", "--best", "loss", "--by", "lr")
    assert table.returncode == 0 and "loss by lr" in table.stdout and "{" not in table.stdout
    # The dashboard pools the space's replicate (seed) instead of plotting it.
    page = (Path(summary["sweep_dir"]) / "dashboard.html").read_text()
    assert "seed is the replicate parameter" in page

    if shutil.which("chromium"):
        shot = cli("sweep", "results", "cli-sweep", "--png", str(tmp_path / "dash.png"))
        assert shot.returncode == 0, shot.stderr
        assert (tmp_path / "dash.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    created = cli("package", "create", "--sweep", "cli-sweep", "--out", str(tmp_path / "pkgs"))
    assert created.returncode == 0, created.stderr
    archive = Path(created.stdout.strip())
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any(n.endswith("manifest.json") for n in names)
    assert any(n.endswith("train.py") for n in names)
    assert cli("package", "verify", str(archive)).returncode == 0
    again = cli("package", "reproduce", str(archive), "--workdir", str(tmp_path / "repro"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "6 matched" in again.stdout or "matched" in again.stdout


def test_sweep_bad_settings_and_unknown_sweep_are_one_line(home, tmp_path):
    bad = cli(
        "sweep",
        "run",
        "--trainable",
        "x.mod:f",
        "--space",
        str(tmp_path / "none.yaml"),
        "--set",
        "workerz=3",
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "'workerz'" in bad.stderr
    old = cli(
        "sweep", "run", "--trainable", "x.mod:f", "--space", str(tmp_path / "none.yaml"),
        "--set", "workers=3",
    )  # fmt: skip
    assert old.returncode == 2
    assert old.stderr.strip() == (
        "error: sweep setting 'workers' is not known; it is now cluster.workers"
    )
    # A missing space file or trainable is found before a server or a run starts.
    nospace = cli(
        "sweep", "run", "--trainable", "json:dumps", "--space", str(tmp_path / "none.yaml")
    )
    assert nospace.returncode == 2
    assert (
        nospace.stderr.strip()
        == f"error: sweep space file '{tmp_path / 'none.yaml'}' does not exist"
    )
    assert not (home / "ledger.sqlite").exists() and not (home / "runs").exists()
    missing = cli("sweep", "status", "no-such-sweep")
    assert missing.returncode == 2 and "no sweep named 'no-such-sweep'" in missing.stderr


def test_sweep_run_arg_style_from_set_reaches_the_script(home, tmp_path):
    # Found as a new user: `sweep run --set arg_style=hydra` ended in a ParameterBindError.
    script = tmp_path / "train.py"
    script.write_text(
        "import json, os, sys\n"
        "args = dict(a.lstrip('+').split('=', 1) for a in sys.argv[1:])\n"
        "json.dump({'loss': float(args['lr'])}, open(os.environ['EXPFLOW_METRICS_FILE'], 'w'))\n"
    )
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"name: cli-hydra\ntrainable: {script.name}\nspace: {{grid: {{lr: [0.5]}}}}\n"
        "cluster: {workers: 1}\n"
    )
    out = cli(
        "sweep", "run", "--config", str(config), "--set", "trainable.arg_style=hydra", "--json"
    )
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["counts"] == {"ok": 1}
