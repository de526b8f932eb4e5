"""LLM calls made inside a run (expflow_flows.runs.llm_calls): recorded by callables and
scripts in the run folder, and added up into the experiment's `llm_cost_usd`, which
`expflow compare` and `expflow runs show` show."""

from __future__ import annotations

import json

import pytest
from sample_trainables import AGENT_CALL_COST as COST
from test_pipeline import run_pipeline
from typer.testing import CliRunner

from expflow_flows.cli.app import app
from expflow_flows.errors import ExpflowError
from expflow_flows.governance.ledger import Ledger
from expflow_flows.runs import llm_calls
from expflow_flows.runs.trainable import run_trainable

runner = CliRunner()


def test_a_callable_records_its_llm_calls_in_the_run_folder(tmp_path):
    result = run_trainable("sample_trainables:agent_quadratic", {"x": 1.0}, tmp_path / "run")
    assert result.status == "ok"
    assert (result.llm_calls, result.llm_cost_usd) == (1, COST)
    (call,) = llm_calls.read(result.run_dir)
    assert call["model"] == "gpt-test-mini" and call["name"] == "advise"
    # OpenAI-style token counts arrive as Langfuse's input/output.
    assert call["usage"] == {"input": 12, "output": 7}
    assert call["cost"] == {"total": COST}
    assert call["ended"] - call["started"] == pytest.approx(0.25)
    assert call["metadata"] == {"api_key": "***", "temperature_hint": "low"}
    meta = json.loads((result.run_dir / "metadata.json").read_text())
    assert meta["llm"]["calls"] == 1 and meta["llm"]["by_model"] == {"gpt-test-mini": COST}


SCRIPT = """
import json
print("EXPFLOW_LLM " + json.dumps({"model": "m-small", "usage": {"input": 3, "output": 4},
                                   "cost": {"input": 0.001, "output": 0.002}}))
print('EXPFLOW_LLM {"model": "m-large", "cost_usd": 0.01, "input": {"password": "hunter2"}}')
print("EXPFLOW_LLM {not json")
print("EXPFLOW_METRIC loss=0.5")
"""


def test_a_script_records_llm_calls_by_printing_expflow_llm_lines(tmp_path):
    script = tmp_path / "agent.py"
    script.write_text(SCRIPT)
    result = run_trainable(str(script), {}, tmp_path / "run")
    assert result.metrics == {"loss": 0.5}
    small, large = llm_calls.read(result.run_dir)
    assert small["cost"] == {"input": 0.001, "output": 0.002, "total": pytest.approx(0.003)}
    assert large["input"] == {"password": "***"}
    assert result.llm_calls == 2 and result.llm_cost_usd == pytest.approx(0.013)
    # A malformed line costs the run nothing but a warning that says what was wrong.
    assert result.status == "warning"
    log = (result.run_dir / "output.log").read_text()
    assert "warning: expflow ignored an EXPFLOW_LLM line: EXPFLOW_LLM line is not valid JSON" in log
    assert "hunter2" not in (result.run_dir / llm_calls.FILE_NAME).read_text()


def test_a_bad_call_from_a_callable_fails_the_run_with_one_line(tmp_path):
    result = run_trainable("sample_trainables:agent_bad_usage", {}, tmp_path / "run")
    assert result.status == "failed"
    assert result.reason == "LLM call usage['input']=-1 is not accepted; expected a number >= 0"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"usage": {"input": 1}}, "LLM call model=None is not accepted; expected the model name"),
        ({"model": "m", "prompt": "hi"}, "LLM call field 'prompt' is not known; accepted: model,"),
        ({"model": "m", "cost_usd": "free"}, "LLM call cost_usd='free' is not accepted"),
        ({"model": "m", "usage": [1, 2]}, "LLM call usage=[1, 2] is not accepted; expected a"),
        ({"model": "m", "started": 10.0, "ended": 5.0}, "LLM call started=10.0 is after ended="),
    ],
)
def test_bad_calls_name_the_field_and_what_is_accepted(raw, message):
    with pytest.raises(ExpflowError) as err:
        llm_calls.normalise(raw)
    assert str(err.value).startswith(message)


def test_summaries_skip_a_torn_last_line_and_count_a_folder_once(tmp_path):
    llm_calls.append(tmp_path, llm_calls.normalise({"model": "a", "cost_usd": 0.5}))
    with open(tmp_path / llm_calls.FILE_NAME, "a") as fh:
        fh.write('{"model": "b", "cost')  # the run was killed mid-write
    total = llm_calls.summarize([tmp_path, tmp_path, tmp_path / "missing", None])
    assert (total.calls, total.cost_usd) == (1, 0.5)
    assert total.metrics() == {"llm_cost_usd": 0.5, "llm_calls": 1.0}
    assert llm_calls.summarize([]).metrics() == {}


def test_the_experiments_llm_cost_shows_in_compare_and_runs_show(prefect_harness, home, tmp_path):
    agent = dict(
        train={"target": "sample_trainables:agent_quadratic"},
        evaluate="sample_trainables:agent_evaluate",
        submit={"enabled": False},
    )
    first = run_pipeline(tmp_path, hpo={"n_trials": 2}, **agent)
    # Two trials and the training at COST, the evaluation at 2 * COST.
    assert first["llm"]["calls"] == 4 and first["llm"]["cost_usd"] == pytest.approx(5 * COST)
    # A rerun resumes the study: it pays for its one new trial, not the earlier ones.
    second = run_pipeline(tmp_path, hpo={"n_trials": 3}, **agent)
    assert second["llm"]["calls"] == 3 and second["llm"]["cost_usd"] == pytest.approx(4 * COST)
    ledger = Ledger()
    plain = ledger.register("no-agent", trainable="pkg.mod:train", params={})
    ledger.move_to(plain.id, "RUNNING")
    ledger.update(plain.id, metrics={"test_loss": 0.0})
    ledger.move_to(plain.id, "COMPLETED")

    ranked = json.loads(
        runner.invoke(app, ["compare", "--metric", "llm_cost_usd", "--json"]).stdout
    )
    assert ranked["direction"] == "minimize"
    assert [r["id"] for r in ranked["rows"]] == [second["ledger_id"], first["ledger_id"]]
    assert [r["value"] for r in ranked["rows"]] == pytest.approx([4 * COST, 5 * COST])
    assert [e["name"] for e in ranked["excluded"]] == ["no-agent"]

    table = runner.invoke(app, ["compare", "--metric", "test_loss"], env={"COLUMNS": "200"})
    lines = {ln.split("│")[2].strip(): ln for ln in table.stdout.splitlines() if "│" in ln}
    assert "LLM $" in table.stdout
    assert f"{5 * COST:.4f}" in lines[first["ledger_id"]]
    assert lines[plain.id].rstrip("│ ").endswith("-")

    shown = json.loads(runner.invoke(app, ["runs", "show", first["ledger_id"]]).stdout)
    assert shown["metrics"]["llm_cost_usd"] == pytest.approx(5 * COST)
    assert shown["metrics"]["llm_calls"] == 4
