"""Metrics from what code already prints or writes: output patterns, result files, readers."""

from __future__ import annotations

import json
import random

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.runs.capture import (
    FilePoller,
    MetricSources,
    OutputFollower,
    call_reader,
    collect,
    read_files,
)

EPOCH = r"Epoch (?P<step>\d+)/\d+ loss=(?P<loss>\S+) val=(?P<val_loss>\S+)"


def tqdm_output(epochs: int = 3) -> str:
    """What a tqdm bar and a coloured summary line look like on a pipe."""
    out = []
    for epoch in range(1, epochs + 1):
        for i in range(0, 101, 25):
            out.append(f"\repoch {epoch}: {i:3d}%|{'█' * (i // 10):10s}| {i}/100 [00:01<00:00]")
        out.append("\n")
        out.append(
            f"\x1b[32mEpoch {epoch}/{epochs} loss={1 / epoch:.4f} val={2 / epoch:.4f}\x1b[0m\n"
        )
    out.append("loss=nan at the end, and a last line without a newline: Epoch 4/4 loss=0.2 val=0.3")
    return "".join(out)


def test_progress_bars_colours_and_any_chunking_give_the_same_matches():
    text = tqdm_output()
    whole = OutputFollower([EPOCH])
    expected = whole.feed(text) + whole.close()
    assert expected == [
        (1, {"loss": 1.0, "val_loss": 2.0}),
        (2, {"loss": 0.5, "val_loss": 1.0}),
        (3, {"loss": pytest.approx(0.3333), "val_loss": pytest.approx(0.6667)}),
        (4, {"loss": 0.2, "val_loss": 0.3}),
    ]
    rng = random.Random(7)
    for _ in range(20):
        follower = OutputFollower([EPOCH])
        got, i = [], 0
        while i < len(text):
            n = rng.randint(1, 40)
            got += follower.feed(text[i : i + n])
            i += n
        assert got + follower.close() == expected


def test_a_bad_pattern_is_one_line():
    with pytest.raises(ExpflowError, match=r"metric pattern 'val=\(\?P<v' is not a regular"):
        OutputFollower(["val=(?P<v"])


def test_csv_json_and_yaml_results_give_final_values_and_steps(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,train_loss,val_loss\n0,1.0,1.2\n1,0.5,0.6\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "final.json").write_text(json.dumps({"nrmse": 0.04, "note": "ok"}))
    (tmp_path / "out" / "curve.yaml").write_text("- {step: 5, acc: 0.7}\n- {step: 9, acc: 0.8}\n")
    final, steps = read_files(["history.csv", "out/*.json", "**/*.yaml"], [tmp_path])
    assert final == {"train_loss": 0.5, "val_loss": 0.6, "nrmse": 0.04, "acc": 0.8}
    assert {"step": 1, "train_loss": 0.5, "val_loss": 0.6} in steps
    assert {"step": 9, "acc": 0.8} in steps
    (tmp_path / "out" / "final.json").write_text("{half written")
    with pytest.raises(ExpflowError, match=r"final.json cannot be read"):
        read_files(["out/*.json"], [tmp_path])


def test_pickles_are_never_read(tmp_path):
    with pytest.raises(ExpflowError, match="does not unpickle"):
        read_files(["model.pkl"], [tmp_path])


def test_the_poller_returns_only_new_steps_as_a_csv_grows(tmp_path):
    poller = FilePoller(MetricSources(files=("log.csv",)), [tmp_path])
    assert poller.poll() == []  # not written yet: not an error
    (tmp_path / "log.csv").write_text("step,val\n0,1.0\n")
    assert poller.poll() == [{"step": 0, "val": 1.0}]
    (tmp_path / "log.csv").write_text("step,val\n0,1.0\n1,0.7\n2,0.5")
    assert poller.poll() == [{"step": 1, "val": 0.7}, {"step": 2, "val": 0.5}]
    assert poller.poll() == []


def test_a_reader_function_in_a_file_reads_what_nothing_else_can(tmp_path):
    (tmp_path / "team_reader.py").write_text(
        "def read(run_dir):\n    return {'score': float((run_dir / 'score.txt').read_text())}\n"
    )
    (tmp_path / "score.txt").write_text("0.93\n")
    assert call_reader(f"{tmp_path / 'team_reader.py'}:read", tmp_path) == {"score": 0.93}
    final, _ = collect(
        MetricSources(reader=f"{tmp_path / 'team_reader.py'}:read"), [tmp_path], tmp_path
    )
    assert final == {"score": 0.93}
    with pytest.raises(ExpflowError, match="has no function 'missing'"):
        call_reader(f"{tmp_path / 'team_reader.py'}:missing", tmp_path)
