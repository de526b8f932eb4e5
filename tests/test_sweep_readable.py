"""`expflow sweep results` as a person reads it: tables, grouping that pools only replicates,
and intervals that stay inside a metric's domain. Each store is real; the CLI is a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from expflow_flows.sweep.results import SweepResults, describe, metric_domain
from expflow_flows.sweep.store import ResultStore

EXPFLOW = str(Path(sys.executable).with_name("expflow"))
LRS = (1e-4, 1e-3, 1e-2)
WIDTHS = (32, 64, 128)
SEEDS = (0, 1, 2)
# lr=1e-2 is unstable across seeds: its t intervals reach below zero unless clipped.
SEED_FACTOR = {1e-4: (0.9, 1.0, 1.1), 1e-3: (0.9, 1.0, 1.1), 1e-2: (0.5, 1.0, 2.85)}
LR_BASE = {1e-4: 0.5, 1e-3: 0.05, 1e-2: 0.2}
WIDTH_FACTOR = {32: 1.0, 64: 0.8, 128: 0.6}


def nrmse(lr: float, width: int, seed: int) -> float:
    return LR_BASE[lr] * WIDTH_FACTOR[width] * SEED_FACTOR[lr][seed]


def grid_rows() -> list[dict]:
    """lr × width × seed (3×3×3) all ok, plus a fourth seed of one combination that failed."""
    rows = []
    i = 0
    for lr in LRS:
        for width in WIDTHS:
            for seed in SEEDS:
                v = nrmse(lr, width, seed)
                rows.append(
                    {
                        "key": f"{i:064x}",
                        "combo_id": f"{i:016x}",
                        "combo_index": i,
                        "step": "run",
                        "params": {"epochs": 20, "lr": lr, "width": width, "seed": seed},
                        "metrics": {"val_nrmse": v, "train_loss": 0.8 * v},
                        "status": "ok",
                        "wall_s": 42.0 + 2 * i,
                        "started_at": 1_796_209_065.167 + i,
                        "ended_at": 1_796_209_107.167 + 2 * i,
                        "run_dir": f"/runs/grid/{i}",
                        "worker": "node1:123",
                    }
                )
                i += 1
    rows.append(
        {
            "key": f"{i:064x}",
            "combo_id": f"{i:016x}",
            "combo_index": i,
            "step": "run",
            "params": {"epochs": 20, "lr": 1e-4, "width": 32, "seed": 3},
            "metrics": {},
            "status": "failed",
            "reason": "CUDA out of memory",
            "run_dir": f"/runs/grid/{i}",
        }
    )
    return rows


def make_sweep(home: Path, name: str, rows: list[dict], replicate: str | None = "seed") -> Path:
    folder = home / "runs" / name
    store = ResultStore.for_sweep_dir(folder)
    store.record_many(rows)
    space: dict = {"fixed": {"epochs": 20}, "grid": {"lr": list(LRS), "width": list(WIDTHS)}}
    if replicate:
        space["replicates"] = {"param": replicate, "values": list(SEEDS)}
    store.set_meta("sweep", {"space": space, "combinations": len(rows)})
    return folder


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXPFLOW, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80"},
        stdin=subprocess.DEVNULL,
    )


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows of the one rich table in ``stdout``."""
    header = [
        [c.strip() for c in line.split("┃")[1:-1]] for line in stdout.splitlines() if "┃" in line
    ]
    rows = [
        [c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if "│" in line
    ]
    assert len(header) == 1, stdout
    return header[0], rows


@pytest.fixture
def grid(home: Path) -> Path:
    return make_sweep(home, "grid", grid_rows())


# --------------------------------------------------------------------------- best rows


def test_best_is_a_table_of_names_and_values_without_internals(grid: Path) -> None:
    out = cli("sweep", "results", "grid", "--best", "val_nrmse", "--n", "3")
    assert out.returncode == 0, out.stderr
    header, rows = table(out.stdout)
    assert header[0] == "rank"
    assert {"lr", "width", "seed", "val_nrmse", "train_loss", "status"} <= set(header)
    assert header.index("val_nrmse") < header.index("train_loss")  # the ranked metric first
    assert len(rows) == 3
    first = dict(zip(header, rows[0], strict=True))
    assert first["rank"] == "1" and first["lr"] == "0.001" and first["width"] == "128"
    assert first["seed"] == "0" and first["status"] == "ok"
    assert float(first["val_nrmse"]) == pytest.approx(nrmse(1e-3, 128, 0), rel=1e-4)
    # Nothing internal: no prefixes, no hashes, no epoch seconds, no JSON.
    text = out.stdout
    assert "param:" not in text and "metric:" not in text and "{" not in text
    assert not re.search(r"[0-9a-f]{16}", text)
    assert "1796209" not in text and "combo" not in text
    # A human-readable wall time, and the constant parameter named once, not as a column.
    assert first["wall"] == "1 min 12 s"  # run 15 took 42 + 2 × 15 s
    assert "epochs" not in header and "epochs=20" in text


def test_best_json_keeps_every_column(grid: Path) -> None:
    out = cli("sweep", "results", "grid", "--best", "val_nrmse", "--n", "2", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2
    assert rows[0]["param:lr"] == 1e-3 and rows[0]["param:width"] == 128
    assert rows[0]["key"] == f"{15:064x}" and rows[0]["run_dir"] == "/runs/grid/15"
    assert rows[0]["started_at"] == pytest.approx(1_796_209_065.167 + 15)


def test_default_output_is_a_short_readable_summary(grid: Path) -> None:
    out = cli("sweep", "results", "grid")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "28 runs: ok 27, failed 1"
    assert "{" not in out.stdout
    assert any(line.startswith("metrics: ") and "val_nrmse" in line for line in lines)
    assert any("seed" in line and "replicate" in line for line in lines)
    machine = cli("sweep", "results", "grid", "--json")
    assert json.loads(machine.stdout) == {"ok": 27, "warning": 0, "pruned": 0, "failed": 1}


# --------------------------------------------------------------------------- statistics


def test_by_pools_only_the_replicates_and_says_what_it_added(grid: Path) -> None:
    out = cli("sweep", "results", "grid", "--best", "val_nrmse", "--by", "lr")
    assert out.returncode == 0, out.stderr
    header, rows = table(out.stdout)
    assert header[:2] == ["lr", "width"] and "n" in header and "mean" in header
    assert len(rows) == 9  # every lr × width, not 3 groups of 9 pooled runs
    cells = [dict(zip(header, r, strict=True)) for r in rows]
    assert {c["n"] for c in cells} == {"3"}
    assert [c["lr"] for c in cells[:3]] == ["0.0001"] * 3
    assert [c["width"] for c in cells[:3]] == ["32", "64", "128"]
    note = [line for line in out.stdout.splitlines() if "width" in line and "added" in line]
    assert note and "seed" in note[0], out.stdout
    mean = sum(nrmse(1e-3, 64, s) for s in SEEDS) / 3
    row = next(c for c in cells if c["lr"] == "0.001" and c["width"] == "64")
    assert float(row["mean"]) == pytest.approx(mean, rel=1e-3)


def test_by_json_is_machine_readable_and_the_note_goes_to_stderr(grid: Path) -> None:
    out = cli("sweep", "results", "grid", "--best", "val_nrmse", "--by", "lr", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 9 and {r["n"] for r in rows} == {3}
    assert all("param:width" in r and "param:seed" not in r for r in rows)
    assert "width" in out.stderr


def test_intervals_stay_inside_the_metric_domain(grid: Path) -> None:
    out = cli("sweep", "results", "grid", "--best", "val_nrmse", "--json", "--by", "lr,width")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 9 and out.stderr == ""  # nothing was added to lr and width
    unstable = [r for r in rows if r["param:lr"] == 1e-2]
    assert len(unstable) == 3
    # Without clipping the t interval of these three seeds reaches far below zero.
    assert all(r["ci_low"] == 0.0 and r["ci_clipped"] for r in unstable)
    assert all(r["ci_low"] > 0 and not r["ci_clipped"] for r in rows if r["param:lr"] != 1e-2)
    shown = cli("sweep", "results", "grid", "--best", "val_nrmse", "--by", "lr", "--by", "width")
    assert shown.returncode == 0, shown.stderr
    header, lines = table(shown.stdout)
    assert len(lines) == 9
    ci = header.index("95% CI")
    assert not any("-" in r[ci] for r in lines)  # no negative bound anywhere
    marked = [r for r in lines if r[0] == "0.01"]
    assert all(r[ci].startswith("[0, ") and r[ci].endswith("*") for r in marked)
    assert "cannot be negative" in shown.stdout


def test_too_few_runs_for_an_interval_say_so(home: Path) -> None:
    rows = [r for r in grid_rows() if r["status"] == "ok"]
    # Two of lr=1e-4, width=32's seeds failed: one run left, no interval.
    for r in rows[1:3]:
        r.update(status="failed", metrics={}, reason="diverged")
    make_sweep(home, "thin", rows)
    out = cli("sweep", "results", "thin", "--best", "val_nrmse", "--by", "lr")
    assert out.returncode == 0, out.stderr
    header, lines = table(out.stdout)
    first = dict(zip(header, lines[0], strict=True))
    assert first["n"] == "1" and "n<2" in first["95% CI"] and first["std"] == "-"
    assert "no interval" in out.stdout


def test_results_bad_input_is_one_line(grid: Path) -> None:
    for args, expected in [
        (("--by", "lr"), "--by needs --best"),
        (("--best", "accuracy"), "metric 'accuracy' is not in these results"),
        (("--best", "val_nrmse", "--n", "0"), "n 0 is not valid"),
        (("--best", "val_nrmse", "--by", "depth"), "group column 'depth'"),
    ]:
        out = cli("sweep", "results", "grid", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.strip().count("\n") == 0 and expected in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- the library


def test_summary_groups_by_every_other_varying_parameter() -> None:
    res = SweepResults(grid_rows())
    cols, added = res.grouping(["lr"])
    assert cols == ["param:lr", "param:width"] and added == ["param:width"]
    # epochs is constant and seed is the replicate: neither is a group column.
    assert res.grouping()[0] == ["param:lr", "param:width"]
    stats = res.summary("val_nrmse", by=["width"])
    assert [(s["param:width"], s["param:lr"]) for s in stats[:3]] == [
        (32, 1e-4),
        (32, 1e-3),
        (32, 1e-2),
    ]
    assert {s["n"] for s in stats} == {3}


def test_the_replicate_parameter_comes_from_the_sweep_space(home: Path) -> None:
    rows = grid_rows()
    for r in rows:
        r["params"]["trial"] = r["params"].pop("seed")
    folder = make_sweep(home, "trials", rows, replicate="trial")
    res = SweepResults.load(folder)
    assert res.replicate == "trial"
    assert {s["n"] for s in res.summary("val_nrmse")} == {3}


def test_metric_domain_and_describe_clip() -> None:
    for name in ("nrmse", "val_nrmse", "rmse", "metric:val_rmse", "PDE/nrmse", "train_loss"):
        assert metric_domain(name) == (0.0, None), name
    assert metric_domain("loss") == (0.0, None)
    assert metric_domain("train_time_s") == (0.0, None)
    assert metric_domain("log_likelihood") == (None, None)
    assert metric_domain("delta_energy") == (None, None)
    values = [0.001, 0.002, 0.57]
    free = describe(values)
    assert free["ci_low"] < 0 and not free["ci_clipped"]
    clipped = describe(values, domain=(0.0, None))
    assert clipped["ci_low"] == 0.0 and clipped["ci_clipped"]
    assert clipped["ci_high"] == free["ci_high"] and clipped["mean"] == free["mean"]
