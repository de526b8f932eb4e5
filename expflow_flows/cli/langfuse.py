"""``expflow langfuse …``: read the traces and LLM costs that runs sent to Langfuse.

Keys come from ``LANGFUSE_PUBLIC_KEY`` and ``LANGFUSE_SECRET_KEY`` only (a key on a
command line would show in ``ps`` and shell history); the server from
``LANGFUSE_BASE_URL`` or ``--base-url``. Langfuse's SDK is imported inside the
commands, so ``expflow --help`` does not pay for it.
"""

from __future__ import annotations

import json
from typing import Any

import typer

langfuse_app = typer.Typer(
    help="Langfuse: traces of pipeline runs and their LLM costs (keys from LANGFUSE_* variables).",
    no_args_is_help=True,
)

BASE_URL = typer.Option(
    None, "--base-url", help="Langfuse server (default: LANGFUSE_BASE_URL, else Langfuse Cloud)."
)
TIMEOUT = typer.Option(10.0, help="Seconds to wait for each answer.")
JSON_OUT = typer.Option(False, "--json", help="Print JSON.")
DAYS = typer.Option(30.0, help="Look this many days back.")


def _reader(base_url: str | None, timeout: float) -> Any:
    from expflow_flows.integrations.langfuse import LangfuseReader

    return LangfuseReader(base_url=base_url, timeout=timeout)


def _usd(value: Any) -> str:
    return "-" if value is None else f"${value:.4f}"


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    Console().print(table)


@langfuse_app.command("traces")
def traces(
    session: str | None = typer.Option(
        None, "--session", "--experiment", help="Only this session (= experiment name)."
    ),
    tag: str | None = typer.Option(None, help="Only traces with this tag."),
    name: str | None = typer.Option(None, help="Only traces with this name, e.g. 'pipeline quad'."),
    limit: int = typer.Option(20, min=1, max=1000, help="At most this many traces."),
    days: float = DAYS,
    base_url: str | None = BASE_URL,
    timeout: float = TIMEOUT,
    json_out: bool = JSON_OUT,
) -> None:
    """Recent traces, newest first."""
    rows = _reader(base_url, timeout).traces(
        session=session, tag=tag, name=name, limit=limit, days=days
    )
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    _table(
        "Langfuse traces",
        ["trace", "name", "session", "started", "level", "tags", "flow run"],
        [
            [
                r["id"],
                r["name"],
                r["session"],
                r["started"],
                r["level"],
                ",".join(r["tags"]),
                r["flow_run_id"],
            ]
            for r in rows
        ],
    )


@langfuse_app.command("trace")
def trace(
    trace_id: str = typer.Argument(..., help="Trace id (from `expflow langfuse traces`)."),
    base_url: str | None = BASE_URL,
    timeout: float = TIMEOUT,
    json_out: bool = JSON_OUT,
) -> None:
    """One trace: its spans (steps) and generations (LLM calls) with models, tokens and cost."""
    found = _reader(base_url, timeout).trace(trace_id)
    if json_out:
        typer.echo(json.dumps(found, indent=2, default=str))
        return
    _table(
        f"Trace {found['id']}: {found['name']} (session {found['session']})",
        ["observation", "type", "level", "started", "seconds", "model", "tokens in/out", "cost"]
        + ["message"],
        [
            [
                "  " * depth + str(o["name"]),
                o["type"],
                o["level"],
                o["started"],
                "" if o["latency_s"] is None else f"{o['latency_s']:.2f}",
                o["model"],
                f"{o['usage'].get('input', 0)}/{o['usage'].get('output', 0)}" if o["usage"] else "",
                _usd(o["cost_usd"]) if o["type"] == "GENERATION" else "",
                (o["status_message"] or "")[:120],
            ]
            for depth, o in _tree(found["observations"])
        ],
    )
    calls = found["llm_calls"]
    typer.echo(
        f"{calls} LLM call{'' if calls == 1 else 's'}, {found['input_tokens']}/"
        f"{found['output_tokens']} tokens in/out, cost {_usd(found['cost_usd'])}"
        + (f"; flow run {found['flow_run_id']}" if found.get("flow_run_id") else "")
    )


def _tree(observations: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Observations depth-first from the trace's root(s), children in start order."""
    ids = {o["id"] for o in observations}
    children: dict[Any, list[dict[str, Any]]] = {}
    for o in sorted(observations, key=lambda o: o["started"] or ""):
        parent = o["parent_id"] if o["parent_id"] in ids else None
        children.setdefault(parent, []).append(o)
    out: list[tuple[int, dict[str, Any]]] = []
    stack = [(0, o) for o in reversed(children.get(None, []))]
    while stack:
        depth, o = stack.pop()
        out.append((depth, o))
        stack += [(depth + 1, c) for c in reversed(children.get(o["id"], []))]
    return out


@langfuse_app.command("cost")
def cost(
    session: str | None = typer.Option(
        None, "--session", "--experiment", help="Cost of this session (= experiment name)."
    ),
    trace_id: str | None = typer.Option(None, "--trace", help="Cost of this trace."),
    by: str = typer.Option("model", help="Break down by: model, trace-name (~experiment), none."),
    days: float = DAYS,
    base_url: str | None = BASE_URL,
    timeout: float = TIMEOUT,
    json_out: bool = JSON_OUT,
) -> None:
    """LLM cost, tokens and calls of an experiment, a trace, or the whole project."""
    spent = _reader(base_url, timeout).cost(session=session, trace_id=trace_id, by=by, days=days)
    if json_out:
        typer.echo(json.dumps(spent, indent=2, default=str))
        return
    scope = f"session {session}" if session else f"trace {trace_id}" if trace_id else "all traces"
    _table(
        f"LLM cost of {scope}, last {days:g} days",
        [by if by != "none" else "", "calls", "tokens in", "tokens out", "cost"],
        [
            [r["group"], r["calls"], r["input_tokens"], r["output_tokens"], _usd(r["cost_usd"])]
            for r in spent["rows"]
        ],
    )
    calls = spent["calls"]
    typer.echo(f"total: {calls} LLM call{'' if calls == 1 else 's'}, {_usd(spent['cost_usd'])}")


@langfuse_app.command("sessions")
def sessions(
    limit: int = typer.Option(20, min=1, max=1000, help="At most this many sessions."),
    days: float = DAYS,
    with_cost: bool = typer.Option(True, "--cost/--no-cost", help="Ask for each session's cost."),
    base_url: str | None = BASE_URL,
    timeout: float = TIMEOUT,
    json_out: bool = JSON_OUT,
) -> None:
    """Sessions (one per experiment), most recently active first."""
    rows = _reader(base_url, timeout).sessions(limit=limit, days=days, cost=with_cost)
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    _table(
        "Langfuse sessions",
        ["session", "traces", "first", "last", "LLM calls", "cost"],
        [
            [
                r["session"],
                r["traces"],
                r["first"],
                r["last"],
                r.get("llm_calls", ""),
                _usd(r["cost_usd"]) if "cost_usd" in r else "",
            ]
            for r in rows
        ],
    )
