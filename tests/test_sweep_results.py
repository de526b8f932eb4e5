"""Sweep results as a table: best runs, per-group statistics, the t quantile, CSV and Parquet."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.sweep.results import SweepResults, describe, t_quantile
from expflow_flows.sweep.store import RESULTS_FILENAME, ResultStore

T_975_DF2 = 4.302652729749462  # scipy.stats.t.ppf(0.975, 2)


def run(i: int, lr: float, seed: int, loss, status: str = "ok", step: str = "", **params) -> dict:
    return {
        "key": f"k{i}",
        "combo_id": f"lr={lr}",
        "combo_index": i,
        "step": step,
        "params": {"lr": lr, "seed": seed, **params},
        "metrics": {} if loss is None else {"loss": loss, "acc": 1 - (loss or 0) / 10},
        "status": status,
        "reason": "" if status == "ok" else "because",
        "wall_s": 1.5 + i,
        "cpu_s": 1.0,
        "peak_rss_mb": 100.0,
        "attempts": 1,
        "worker": "w1",
        "run_dir": f"/runs/{i}",
        "started_at": 1000.0 + i,
        "ended_at": 1001.5 + 2 * i,
        "recorded_at": 2000.0 + i,
    }


@pytest.fixture
def results() -> SweepResults:
    return SweepResults(
        [
            run(0, 0.1, 0, 1.0),
            run(1, 0.1, 1, 2.0),
            run(2, 0.1, 2, 4.0),
            run(3, 0.01, 0, 0.5),
            run(4, 0.01, 1, float("nan")),
            run(5, 0.01, 2, 0.3, status="failed"),
            run(6, 0.001, 0, 0.5, status="warning"),
            run(7, 0.001, 1, None, status="pruned"),
        ]
    )


def test_columns_and_rows(results: SweepResults) -> None:
    assert results.columns == [
        "key",
        "combo_id",
        "combo_index",
        "step",
        "status",
        "reason",
        "param:lr",
        "param:seed",
        "metric:acc",
        "metric:loss",
        "wall_s",
        "cpu_s",
        "peak_rss_mb",
        "started_at",
        "ended_at",
        "attempts",
        "worker",
        "run_dir",
        "recorded_at",
        "log_excerpt",
    ]
    assert results.params == ["lr", "seed"] and results.metrics == ["acc", "loss"]
    first = results.rows[0]
    assert list(first) == results.columns
    assert first["param:lr"] == 0.1 and first["metric:loss"] == 1.0 and first["key"] == "k0"
    # A pruned run without metrics still has every column, as None.
    assert results.rows[7]["metric:loss"] is None and results.rows[7]["log_excerpt"] is None
    assert len(results) == 8
    records = results.to_records()
    records[0]["key"] = "changed"
    assert results.rows[0]["key"] == "k0"
    # Rows given already flat are taken as they are.
    flat = SweepResults([{"key": "a", "status": "ok", "param:x": 1, "metric:m": 2.0}])
    assert flat.rows[0]["param:x"] == 1 and flat.metrics == ["m"]


def test_filter_and_status_counts(results: SweepResults) -> None:
    assert results.status_counts() == {"ok": 5, "warning": 1, "pruned": 1, "failed": 1}
    ok = results.filter(status="ok")
    assert len(ok) == 5 and ok.columns == results.columns
    assert len(results.filter(status=["warning", "pruned"])) == 2
    assert len(results.filter(step="")) == 8 and len(results.filter(step="train")) == 0
    with pytest.raises(ExpflowError, match="status 'done' is not valid"):
        results.filter(status="done")


def test_best_minimize_maximize_ties_and_nan(results: SweepResults) -> None:
    # NaN (k4), the failed run's 0.3 (k5) and the pruned run are never best.
    assert [r["key"] for r in results.best("loss")] == ["k3"]
    # A tie (0.5 at k3 and the warning run k6) keeps table order.
    assert [r["key"] for r in results.best("loss", n=3)] == ["k3", "k6", "k0"]
    assert [r["key"] for r in results.best("metric:loss", maximize=True, n=2)] == ["k2", "k1"]
    assert len(results.best("loss", n=100)) == 5
    with_inf = SweepResults([run(0, 0.1, 0, float("inf")), run(1, 0.1, 1, -float("inf"))])
    assert with_inf.best("loss") == []
    best = results.best("acc", maximize=True)[0]
    assert best["key"] == "k3" and best["metric:acc"] == pytest.approx(0.95)


def test_unknown_metric_lists_the_metrics_present(results: SweepResults) -> None:
    with pytest.raises(ExpflowError, match=r"metric 'accuracy' .*metrics present: acc, loss"):
        results.best("accuracy")
    with pytest.raises(ExpflowError, match="metrics present"):
        results.summary("f1")
    with pytest.raises(ExpflowError, match="n 0 is not valid"):
        results.best("loss", n=0)


def test_summary_by_hand(results: SweepResults) -> None:
    summary = results.summary("loss")
    assert [s["param:lr"] for s in summary] == [0.1, 0.01, 0.001]
    assert all("param:seed" not in s for s in summary)

    three = summary[0]
    values = [1.0, 2.0, 4.0]
    mean = 7 / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = 4.303 * std / math.sqrt(3)
    assert three["metric"] == "loss" and three["n"] == 3
    assert three["mean"] == pytest.approx(mean)
    assert three["std"] == pytest.approx(1.5275252316519468)
    assert three["std"] == pytest.approx(std)
    # The t interval reaches below zero; a loss cannot, so it is clipped there and marked.
    assert mean - half < 0 and three["ci_low"] == 0.0 and three["ci_clipped"] is True
    assert describe(values)["ci_low"] == pytest.approx(mean - half, abs=1e-3)
    assert three["ci_high"] == pytest.approx(mean + half, abs=1e-3)
    assert three["ci_high"] - mean == pytest.approx(T_975_DF2 * std / math.sqrt(3), rel=1e-12)
    assert three["min"] == 1.0 and three["max"] == 4.0

    # lr=0.01: the NaN run and the failed run do not count, leaving one value.
    one = summary[1]
    assert one["n"] == 1 and one["mean"] == 0.5 and one["min"] == one["max"] == 0.5
    assert one["std"] is None and one["ci_low"] is None and one["ci_high"] is None
    # lr=0.001: a warning counts; the pruned run does not.
    assert summary[2]["n"] == 1 and summary[2]["mean"] == 0.5


def test_summary_grouping_options() -> None:
    rows = [
        run(0, 0.1, 0, 1.0, act="relu"),
        run(1, 0.1, 1, 3.0, act="relu"),
        run(2, 0.1, 0, 5.0, act="tanh"),
        run(3, 0.1, 1, 7.0, act="tanh"),
        run(4, 0.2, 0, float("nan"), status="failed", act="gelu"),
    ]
    res = SweepResults(rows)
    # by=["act"] still groups by lr, which varies too: only the seeds are pooled.
    assert res.grouping(["act"]) == (["param:act", "param:lr"], ["param:lr"])
    by_act = res.summary("loss", by=["act"])
    assert [(s["param:act"], s["param:lr"], s["n"], s["mean"]) for s in by_act] == [
        ("relu", 0.1, 2, 2.0),
        ("tanh", 0.1, 2, 6.0),
        ("gelu", 0.2, 0, None),
    ]
    assert by_act[2]["std"] is None and by_act[2]["min"] is None
    assert res.grouping(["param:lr", "act"])[1] == []
    assert [s["n"] for s in res.summary("loss", by=["param:lr", "act"])] == [2, 2, 0]
    assert [s["n"] for s in res.summary("loss", by=[])] == [2, 2, 0]
    # replicate="act": act is pooled now, and seed is a group column.
    by_seed = res.summary("loss", replicate="act")
    assert [(s["param:lr"], s["param:seed"], s["n"]) for s in by_seed] == [
        (0.1, 0, 2),
        (0.1, 1, 2),
        (0.2, 0, 0),
    ]
    with pytest.raises(ExpflowError, match="group column 'depth'"):
        res.summary("loss", by=["depth"])
    with pytest.raises(ExpflowError, match="confidence"):
        res.summary("loss", confidence=95)
    wider = res.summary("loss", by=["act"], confidence=0.99)[0]
    narrow = by_act[0]
    assert wider["ci_high"] - wider["mean"] > narrow["ci_high"] - narrow["mean"]

    # Chained sweeps: the same metric from two steps is summarised per step.
    chained = SweepResults(
        [run(0, 0.1, 0, 1.0, step="prep"), run(1, 0.1, 0, 9.0, step="train")]
        + [run(2, 0.1, 1, 2.0, step="prep"), run(3, 0.1, 1, 8.0, step="train")]
    )
    got = chained.summary("loss")
    assert [(s["step"], s["mean"]) for s in got] == [("prep", 1.5), ("train", 8.5)]
    assert "param:lr" not in got[0]  # one lr throughout: not a group column


def test_t_quantile_table_values() -> None:
    # Textbook two-sided 95% critical values.
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042, 120: 1.980}
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4), df
    assert t_quantile(0.975, 2) == pytest.approx(T_975_DF2, rel=1e-14)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959966, abs=1e-5)
    assert t_quantile(0.5, 7) == 0.0
    assert t_quantile(0.025, 5) == pytest.approx(-t_quantile(0.975, 5))
    with pytest.raises(ExpflowError):
        t_quantile(1.5, 3)
    with pytest.raises(ExpflowError):
        t_quantile(0.9, 0)
    assert describe([]) == {
        "n": 0,
        "mean": None,
        "std": None,
        "ci_low": None,
        "ci_high": None,
        "ci_clipped": False,
        "min": None,
        "max": None,
    }


def test_t_quantile_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 7, 9, 15, 29, 50, 100, 1000, 2.5):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.01):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12), (
                p,
                df,
            )


def test_to_csv(results: SweepResults, tmp_path: Path) -> None:
    nested = SweepResults(
        [run(0, 0.1, 0, 1.25, layers=[64, 32])] + [run(1, 0.2, 1, None, status="failed")]
    )
    out = nested.to_csv(tmp_path / "out" / "results.csv")
    with open(out, newline="", encoding="utf-8") as fh:
        lines = list(csv.reader(fh))
    assert lines[0] == nested.columns
    first = dict(zip(lines[0], lines[1], strict=True))
    assert first["key"] == "k0" and first["param:lr"] == "0.1" and first["metric:loss"] == "1.25"
    assert first["param:layers"] == "[64, 32]" and first["log_excerpt"] == ""
    assert first["combo_index"] == "0" and first["wall_s"] == "1.5"
    second = dict(zip(lines[0], lines[2], strict=True))
    assert (
        second["status"] == "failed"
        and second["metric:loss"] == ""
        and second["param:layers"] == ""
    )
    assert len(lines) == 3
    # NaN is written as nan, and the file is stable across runs.
    results.to_csv(tmp_path / "a.csv")
    results.to_csv(tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert ",nan," in (tmp_path / "a.csv").read_text()


def test_to_parquet_types_and_values(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        run(0, 0.1, 0, 1.0, act="relu", flag=True, layers=[64, 64], width=1),
        run(1, 1, 1, float("nan"), act="tanh", flag=False, layers=[32], width=2.5),
        run(2, 0.3, 2, None, status="failed", act=None, flag=None, layers=None, width=None),
    ]
    rows[2]["log_excerpt"] = "Traceback ...\nValueError: bad"
    rows[2]["worker"] = None
    res = SweepResults(rows)
    out = res.to_parquet(tmp_path / "results.parquet")
    table = pq.read_table(out)
    assert table.column_names == res.columns
    types = {f.name: f.type for f in table.schema}
    assert types["param:lr"] == pa.float64()  # 0.1 and 1 together: float
    assert types["param:seed"] == pa.int64()
    assert types["param:width"] == pa.float64()
    assert types["param:act"] == pa.string() and types["param:layers"] == pa.string()
    assert types["param:flag"] == pa.bool_()
    assert types["metric:loss"] == pa.float64() and types["metric:acc"] == pa.float64()
    assert types["combo_index"] == pa.int64() and types["attempts"] == pa.int64()
    for name in ("wall_s", "cpu_s", "peak_rss_mb", "started_at", "ended_at", "recorded_at"):
        assert types[name] == pa.float64(), name
    for name in ("key", "combo_id", "step", "status", "reason", "worker", "run_dir", "log_excerpt"):
        assert types[name] == pa.string(), name

    data = table.to_pydict()
    assert data["param:lr"] == [0.1, 1.0, 0.3]
    assert data["param:seed"] == [0, 1, 2]
    assert data["param:act"] == ["relu", "tanh", None]
    assert data["param:layers"] == ["[64, 64]", "[32]", None]
    assert data["param:flag"] == [True, False, None]
    loss = data["metric:loss"]
    assert loss[0] == 1.0 and math.isnan(loss[1]) and loss[2] is None  # NaN stays NaN, None is null
    assert data["worker"] == ["w1", "w1", None]
    assert data["log_excerpt"] == [None, None, "Traceback ...\nValueError: bad"]
    assert data["status"] == ["ok", "ok", "failed"]
    assert table.column("metric:loss").null_count == 1

    # An empty table and an all-null metric still write.
    SweepResults([]).to_parquet(tmp_path / "empty.parquet")
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0


def test_load_from_store_folder_and_file(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    store = ResultStore.for_sweep_dir(sweep)
    store.record_many([run(0, 0.1, 0, 1.0), run(1, 0.1, 1, 3.0, status="failed")])
    for source in (store, sweep, sweep / RESULTS_FILENAME, str(sweep)):
        res = SweepResults.load(source)
        assert [r["key"] for r in res.rows] == ["k0", "k1"]
        assert res.rows[0]["metric:loss"] == 1.0 and res.rows[1]["status"] == "failed"
        assert res.rows[0]["recorded_at"] == 2000.0
    assert "2 rows" in repr(SweepResults.load(sweep))
    with pytest.raises(ExpflowError, match="not found"):
        SweepResults.load(tmp_path / "nowhere")
    empty = tmp_path / "empty-sweep"
    empty.mkdir()
    with pytest.raises(ExpflowError, match="no results store"):
        SweepResults.load(empty)
    # Round trip through the store and JSON-ready records.
    assert json.loads(json.dumps(SweepResults.load(store).to_records()))[0]["param:lr"] == 0.1
