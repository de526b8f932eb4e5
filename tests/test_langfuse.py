"""Langfuse tracking and the `expflow langfuse` commands, with the real Langfuse SDK.

What a pipeline run emits is read from an in-memory OpenTelemetry exporter handed to
the SDK; the exporter path (OTLP protobuf over HTTP) and the read API behind
`expflow langfuse traces|trace|cost|sessions` go to a loopback server
(tests/langfuse_api.py), since a real Langfuse server cannot run here.

The SDK keeps one client per public key for the life of the process (a second client
with the same key silently reuses the first one's exporter), so every test uses a
public key of its own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("langfuse")

import sample_trainables  # noqa: E402
from langfuse_api import LangfuseApiServer  # noqa: E402
from test_pipeline import run_pipeline  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from expflow_flows.cli.app import app  # noqa: E402
from expflow_flows.errors import ExpflowError  # noqa: E402
from expflow_flows.governance.ledger import Ledger  # noqa: E402

EXPFLOW = str(Path(sys.executable).with_name("expflow"))
COST = sample_trainables.AGENT_CALL_COST
SECRETS = ("sk-param-secret", "sk-agent-secret-123", "tok-should-not-leak")
runner = CliRunner()


def keys() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:12]
    return f"pk-lf-test-{tag}", f"sk-lf-test-{tag}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("LANGFUSE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: wide enough not to fold ids


@pytest.fixture
def captured():
    """The real SDK writing to an in-memory exporter; the tracker's client reuses it."""
    from langfuse import Langfuse
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    public, secret = keys()
    exporter = InMemorySpanExporter()
    Langfuse(
        public_key=public,
        secret_key=secret,
        base_url="http://127.0.0.1:9",
        span_exporter=exporter,
        tracer_provider=TracerProvider(),
    )
    return SimpleNamespace(exporter=exporter, public=public, secret=secret)


def by_name(spans) -> dict:
    return {s.name: s for s in spans}


def attrs(span) -> dict:
    return dict(span.attributes or {})


def decoded(span, key: str):
    return json.loads(attrs(span)[key])


def agent_pipeline(tmp_path, **overrides):
    """The test pipeline with trainables that call an (imaginary) LLM; ``overrides`` are
    nested settings over it."""
    from expflow_flows.settings.base import deep_merge

    settings = {
        "hpo": {"n_trials": 3},
        "train": {"target": "sample_trainables:agent_quadratic"},
        "evaluate": "sample_trainables:agent_evaluate",
        "params": {"api_key": "sk-param-secret"},
    }
    return run_pipeline(tmp_path, **deep_merge(settings, overrides))


# --- what a run emits (in-memory exporter) -------------------------------------------


def test_a_pipeline_run_is_one_trace_with_a_span_per_step_and_its_llm_calls(
    prefect_harness, home, tmp_path, captured
):
    settings = {"public_key": captured.public, "secret_key": captured.secret, "tags": ["nightly"]}
    summary = agent_pipeline(tmp_path, tracking={"langfuse": settings})
    spans = captured.exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1

    root = by_name(spans)["pipeline quad"]
    assert root.parent is None
    a = attrs(root)
    assert a["session.id"] == "quad" and a["langfuse.trace.name"] == "pipeline quad"
    assert {"expflow", "pipeline", "nightly"} <= set(a["langfuse.trace.tags"])
    flow_run_id = Ledger().get(summary["ledger_id"]).flow_run_id
    assert json.loads(a["langfuse.trace.metadata.flow_run_id"]) == flow_run_id
    assert json.loads(a["langfuse.trace.metadata.flow_run_url"]).startswith("http")
    assert decoded(root, "langfuse.observation.input")["experiment"] == "quad"
    assert decoded(root, "langfuse.observation.output") == summary["metrics"]
    assert decoded(root, "langfuse.observation.metadata.llm_cost_usd") == pytest.approx(6 * COST)

    steps = [s for s in spans if s.parent and s.parent.span_id == root.context.span_id]
    assert sorted(s.name for s in steps) == [
        "evaluate",
        "train",
        "trial-0000",
        "trial-0001",
        "trial-0002",
    ]
    for step in steps:
        # Every observation carries the session, so Langfuse can add up its cost.
        assert attrs(step)["session.id"] == "quad"
        meta_wall = decoded(step, "langfuse.observation.metadata.wall_s")
        # The span has the step's real start and duration, not the moment it was mirrored.
        assert (step.end_time - step.start_time) / 1e9 == pytest.approx(meta_wall, abs=1e-3)
        assert step.start_time >= root.start_time and step.end_time <= root.end_time
        assert "loss" in decoded(step, "langfuse.observation.output") or step.name == "evaluate"

    generations = [s for s in spans if attrs(s)["langfuse.observation.type"] == "generation"]
    assert len(generations) == 5  # one per trial, one in train, one in evaluate
    parents = {s.context.span_id: s.name for s in steps}
    advise = [g for g in generations if g.name == "advise"]
    assert sorted(parents[g.parent.span_id] for g in advise) == [
        "train",
        "trial-0000",
        "trial-0001",
        "trial-0002",
    ]
    g = advise[0]
    assert attrs(g)["langfuse.observation.model.name"] == "gpt-test-mini"
    assert decoded(g, "langfuse.observation.usage_details") == {"input": 12, "output": 7}
    assert decoded(g, "langfuse.observation.cost_details") == {"total": COST}
    assert (g.end_time - g.start_time) / 1e9 == pytest.approx(0.25, abs=1e-3)
    assert "x=" in decoded(g, "langfuse.observation.input")[0]["content"]
    (report,) = [g for g in generations if g.name == "write-report"]
    assert parents[report.parent.span_id] == "evaluate"
    assert decoded(report, "langfuse.observation.cost_details") == {"total": 2 * COST}

    # No secret anywhere: not the key in the run's settings, not the ones in params,
    # LLM metadata or prompts.
    for span in spans:
        text = json.dumps(
            [
                attrs(span),
                dict(span.resource.attributes),
                dict(span.instrumentation_scope.attributes or {}),
            ],
            default=str,
        )
        for secret in (captured.secret, *SECRETS):
            assert secret not in text, (span.name, secret)

    # The run folder says which trace mirrors it.
    pointer = json.loads((Path(summary["run_dir"]) / "langfuse.json").read_text())
    assert pointer["trace_id"] == format(root.context.trace_id, "032x")
    assert summary["tracking_warnings"] == []


def test_failed_trials_and_a_failed_run_are_errors_with_the_reason(
    prefect_harness, home, tmp_path, captured
):
    settings = {"public_key": captured.public, "secret_key": captured.secret}
    with pytest.raises(ExpflowError, match="no trial of study 'quad' succeeded"):
        run_pipeline(
            tmp_path,
            train={"target": "sample_trainables:always_fails"},
            hpo={"n_trials": 2},
            tracking={"langfuse": settings},
        )
    spans = by_name(captured.exporter.get_finished_spans())
    for name in ("trial-0000", "trial-0001"):
        a = attrs(spans[name])
        assert a["langfuse.observation.level"] == "ERROR"
        assert "this trainable always fails" in a["langfuse.observation.status_message"]
    root = attrs(spans["pipeline quad"])
    assert root["langfuse.observation.level"] == "ERROR"
    assert "no trial of study 'quad' succeeded" in root["langfuse.observation.status_message"]


# --- no keys, turned off, unreachable --------------------------------------------------


def test_without_keys_the_pipeline_runs_and_nothing_is_sent(
    prefect_harness, home, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="expflow.langfuse")
    summary = agent_pipeline(
        tmp_path, hpo={"n_trials": 2}, submit={"enabled": False}, tracking={"langfuse": {}}
    )
    assert summary["metrics"]["test_loss"] >= 0 and summary["tracking_warnings"] == []
    assert "has no keys; nothing is sent" in caplog.text
    assert not (Path(summary["run_dir"]) / "langfuse.json").exists()


def test_turned_off_tracking_creates_nothing_and_needs_no_sdk(monkeypatch):
    from expflow_flows.integrations.langfuse import LangfuseTracker

    public, secret = keys()
    monkeypatch.setenv("LANGFUSE_TRACING_ENABLED", "false")
    tracker = LangfuseTracker(public_key=public, secret_key=secret)
    assert not tracker.active
    tracker.close()
    monkeypatch.delenv("LANGFUSE_TRACING_ENABLED")
    monkeypatch.setitem(sys.modules, "langfuse", None)  # as if it were not installed
    assert not LangfuseTracker(enabled=False).active
    with pytest.raises(ExpflowError) as err:
        LangfuseTracker(public_key=public, secret_key=secret)
    assert str(err.value) == (
        "Langfuse tracking needs the langfuse package: pip install 'expflow-flows[langfuse]'"
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"flush_timeout": 0}, "tracking.langfuse.flush_timeout=0: expected seconds > 0"),
        ({"enabled": "yes"}, "tracking.langfuse.enabled='yes': expected true or false"),
        ({"tags": "nightly"}, "tracking.langfuse.tags='nightly': expected a list of text tags"),
        (
            {"base_url": "langfuse.internal"},
            "tracking.langfuse.base_url='langfuse.internal': expected http(s)://host[:port]",
        ),
    ],
)
def test_bad_settings_are_one_line_naming_the_value(settings, message):
    from expflow_flows.integrations.tracking import Tracking

    with pytest.raises(ExpflowError) as err:
        Tracking.from_settings({"langfuse": settings})
    assert str(err.value) == message


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"flush_timeout": 0},
            "pipeline setting tracking.langfuse.flush_timeout=0: input should be greater than 0",
        ),
        (
            {"tags": "nightly"},
            "pipeline setting tracking.langfuse.tags='nightly': input should be a valid list",
        ),
        ({"colour": "red"}, "pipeline setting 'tracking.langfuse.colour' is not known; accepted:"),
    ],
)
def test_a_runs_bad_settings_are_one_line_naming_the_value(settings, message):
    """What a config file or --set gets, checked before the run starts."""
    from expflow_flows.settings.pipeline import load_pipeline_settings

    with pytest.raises(ExpflowError) as err:
        load_pipeline_settings(None, {"tracking": {"langfuse": settings}})
    assert str(err.value).startswith(message)


def closes_within(tracker, seconds: float) -> bool:
    thread = threading.Thread(target=tracker.close, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def mirror_one_step(tracker, tmp_path):
    from expflow_flows.integrations.tracking import RunContext, StepRecord

    tracker.run_started(RunContext("pipeline", "quad", tmp_path, {"x": 1.0}, "run-1"))
    tracker.record(StepRecord("trial", "trial-0000", {"x": 1.0}, "ok", {"loss": 1.0}, wall_s=0.1))
    tracker.run_finished("ok", {"loss": 1.0}, {})


def test_an_unreachable_server_does_not_hold_the_run_up(tmp_path):
    from expflow_flows.integrations.langfuse import LangfuseTracker

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    public, secret = keys()
    tracker = LangfuseTracker(
        public_key=public, secret_key=secret, base_url=f"http://127.0.0.1:{port}", timeout=2
    )
    mirror_one_step(tracker, tmp_path)
    assert closes_within(tracker, 15)


def test_a_server_that_never_answers_is_given_up_on_after_the_flush_timeout(tmp_path, caplog):
    from expflow_flows.integrations.langfuse import LangfuseTracker

    caplog.set_level(logging.WARNING, logger="expflow.langfuse")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does) and never answers
    try:
        public, secret = keys()
        tracker = LangfuseTracker(
            public_key=public,
            secret_key=secret,
            base_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            flush_timeout=1,
            timeout=3,
        )
        mirror_one_step(tracker, tmp_path)
        assert closes_within(tracker, 15)
        assert "did not take the run's spans within 1 s" in caplog.text
    finally:
        silent.close()


# --- the exporter path and the read API (loopback server) --------------------------------


@pytest.fixture
def langfuse_server(monkeypatch):
    public, secret = keys()
    with LangfuseApiServer(public, secret) as server:
        monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", public)
        monkeypatch.setenv("LANGFUSE_SECRET_KEY", secret)
        monkeypatch.setenv("LANGFUSE_BASE_URL", server.url)
        yield server


def lf(*args: str):
    result = runner.invoke(app, ["langfuse", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def lf_json(*args: str):
    return json.loads(lf(*args, "--json"))


def test_spans_reach_langfuse_and_the_cli_reads_traces_and_costs_back(
    prefect_harness, home, tmp_path, langfuse_server
):
    summary = agent_pipeline(
        tmp_path, hpo={"n_trials": 2}, submit={"enabled": False}, tracking={"langfuse": {}}
    )
    server = langfuse_server
    # The real exporter sent OTLP protobuf, gzip-compressed, with the SDK's headers.
    assert server.export_headers and all(
        h["content-encoding"] == "gzip" and h["x-langfuse-ingestion-version"] == "4"
        for h in server.export_headers
    )
    names = {s["name"] for s in server.spans}
    assert {"pipeline quad", "trial-0000", "trial-0001", "train", "evaluate"} <= names
    assert {"advise", "write-report"} <= names
    trace_id = json.loads((Path(summary["run_dir"]) / "langfuse.json").read_text())["trace_id"]
    flow_run_id = Ledger().get(summary["ledger_id"]).flow_run_id
    total = 5 * COST  # two trials and train at COST, evaluate at 2 * COST

    (listed,) = lf_json("traces", "--session", "quad")
    assert listed["id"] == trace_id and listed["name"] == "pipeline quad"
    assert listed["flow_run_id"] == flow_run_id and "expflow" in listed["tags"]
    assert lf_json("traces", "--tag", "expflow", "--experiment", "quad")[0]["id"] == trace_id
    assert lf_json("traces", "--tag", "no-such-tag") == []
    assert trace_id in lf("traces")

    shown = lf_json("trace", trace_id)
    assert shown["cost_usd"] == pytest.approx(total) and shown["llm_calls"] == 4
    kinds = {(o["name"], o["type"]) for o in shown["observations"]}
    assert ("train", "SPAN") in kinds and ("advise", "GENERATION") in kinds
    report = next(o for o in shown["observations"] if o["name"] == "write-report")
    assert report["model"] == "gpt-test-large" and report["usage"] == {"input": 30, "output": 10}
    table = lf("trace", trace_id)
    assert "write-report" in table and "gpt-test-large" in table
    assert f"4 LLM calls, 66/31 tokens in/out, cost ${total:.4f}" in table

    spent = lf_json("cost", "--experiment", "quad")
    assert spent["cost_usd"] == pytest.approx(total) and spent["calls"] == 4
    assert {r["group"]: r["calls"] for r in spent["rows"]} == {
        "gpt-test-mini": 3,
        "gpt-test-large": 1,
    }
    assert lf_json("cost", "--trace", trace_id, "--by", "none")["cost_usd"] == pytest.approx(total)
    by_experiment = lf_json("cost", "--by", "trace-name")["rows"]
    assert [(r["group"], r["calls"]) for r in by_experiment] == [("pipeline quad", 4)]
    assert f"total: 4 LLM calls, ${total:.4f}" in lf("cost", "--session", "quad")

    (session,) = lf_json("sessions")
    assert session["session"] == "quad" and session["traces"] == 1
    assert session["cost_usd"] == pytest.approx(total) and session["llm_calls"] == 4
    assert server.unknown_endpoints == []


def error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("error: ")
    return lines[0]


def cli(*args: str, env: dict):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LANGFUSE_")}
    return subprocess.run(
        [EXPFLOW, "langfuse", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
        stdin=subprocess.DEVNULL,
    )


def test_read_errors_are_one_line_that_says_what_to_check(langfuse_server):
    url = langfuse_server.url
    public = langfuse_server.public_key
    env = {"LANGFUSE_PUBLIC_KEY": public, "LANGFUSE_BASE_URL": url}

    line = error_line(cli("traces", env={**env, "LANGFUSE_SECRET_KEY": "sk-wrong-secret"}))
    assert "refused the API keys" in line and "LANGFUSE_SECRET_KEY" in line
    assert "sk-wrong-secret" not in line
    line = error_line(cli("sessions", env={"LANGFUSE_PUBLIC_KEY": public}))
    assert "needs its API keys: set LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY" in line

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    good = {**env, "LANGFUSE_SECRET_KEY": langfuse_server.secret_key}
    line = error_line(cli("cost", "--base-url", closed, env=good))
    assert f"Langfuse at {closed} cannot be reached" in line and "LANGFUSE_BASE_URL" in line
    line = error_line(cli("trace", "0" * 32, env=good))
    assert f"trace '{'0' * 32}' is not in Langfuse at {url}" in line
    line = error_line(cli("cost", "--by", "colour", env=good))
    assert "--by 'colour' is not accepted; expected one of model, trace-name, none" in line


def test_the_core_package_and_cli_work_without_the_sdk():
    code = (
        "import sys; sys.modules['langfuse'] = None\n"
        "import expflow_flows.cli, expflow_flows.runs.trainable, expflow_flows.integrations.langfuse\n"
        "sys.argv = ['expflow', 'langfuse', 'traces']\n"
        "expflow_flows.cli.main()\n"
    )
    env = {**os.environ, "LANGFUSE_PUBLIC_KEY": "pk-x", "LANGFUSE_SECRET_KEY": "sk-x"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert error_line(result) == (
        "error: Reading from Langfuse needs the langfuse package: "
        "pip install 'expflow-flows[langfuse]'"
    )
