"""Langfuse: a pipeline run becomes a trace, its steps spans, its LLM calls generations.

Turned on by a run's ``tracking: {langfuse: {}}`` (see :mod:`expflow_flows.integrations.tracking`),
with the keys and server in ``LANGFUSE_PUBLIC_KEY``, ``LANGFUSE_SECRET_KEY`` and
``LANGFUSE_BASE_URL``. What a run sends:

* one trace per run, named ``pipeline <experiment>``, in the session ``<experiment>``
  (so every run of an experiment sits in one Langfuse session), tagged ``expflow``;
  its root span holds the run's settings (secrets masked) as input and metadata, the
  Prefect flow run id and URL as trace metadata, and the final metrics as output;
* one span per step (``trial-0003``, ``train``, ``evaluate``) with its real start time
  and duration, its parameters as input, its metrics as output, and level ERROR
  (failed) or WARNING (warnings in the log) with the reason as status message;
* one generation per LLM call that the step recorded in ``llm_calls.jsonl`` (see
  :mod:`expflow_flows.runs.llm_calls`), with model, token usage and cost in USD.

The SDK (OpenTelemetry underneath) batches spans and sends them in the background;
:meth:`LangfuseTracker.close` waits for them at most ``flush_timeout`` seconds. With
no keys, or with tracing turned off (``enabled: false`` or
``LANGFUSE_TRACING_ENABLED=false``), nothing is created and nothing is sent.

:class:`LangfuseReader` reads traces and costs back through Langfuse's public API
(``expflow langfuse …``). The SDK is imported only inside these classes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.integrations.tracking import RunContext, StepRecord, Tracker, require_sdk
from expflow_flows.runs import llm_calls
from expflow_flows.secrets import scrub

log = logging.getLogger("expflow.langfuse")

DEFAULT_BASE_URL = "https://cloud.langfuse.com"
KEYS_HINT = "set LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY (Langfuse: project settings, API keys)"
# Intermediate values kept on a step's span: the tail of a long training curve is enough
# to see where it went; the whole curve is in the run folder.
INTERMEDIATE_KEPT = 50


def _ns(epoch_s: float) -> int:
    return int(epoch_s * 1e9)


def _settings_base_url(base_url: str | None) -> str:
    url = base_url or os.environ.get("LANGFUSE_BASE_URL") or os.environ.get("LANGFUSE_HOST")
    return (url or DEFAULT_BASE_URL).rstrip("/")


def _env_disabled() -> bool:
    return os.environ.get("LANGFUSE_TRACING_ENABLED", "true").strip().lower() == "false"


def _level(status: str) -> str | None:
    """Langfuse's level for a step or run outcome (None: the default level)."""
    if status in ("failed", "gate-failed"):
        return "ERROR"
    if status == "warning":
        return "WARNING"
    return None


class LangfuseTracker(Tracker):
    """Mirrors a pipeline run to Langfuse (see the module docstring for what is sent)."""

    name = "langfuse"
    sdk = ("Langfuse tracking", "langfuse", "langfuse")

    @classmethod
    def needs_sdk(cls, settings: dict[str, Any]) -> bool:
        # Switched off, it sends nothing and needs no SDK.
        return settings.get("enabled", True) is not False and not _env_disabled()

    def __init__(
        self,
        public_key: str | None = None,
        secret_key: str | None = None,
        base_url: str | None = None,
        enabled: bool = True,
        flush_timeout: float = 10.0,
        timeout: int | None = None,
        environment: str | None = None,
        tags: list[str] | None = None,
    ):
        if not isinstance(enabled, bool):
            raise ExpflowError(f"tracking.langfuse.enabled={enabled!r}: expected true or false")
        if (
            isinstance(flush_timeout, bool)
            or not isinstance(flush_timeout, (int, float))
            or not math.isfinite(flush_timeout)
            or flush_timeout <= 0
        ):
            raise ExpflowError(
                f"tracking.langfuse.flush_timeout={flush_timeout!r}: expected seconds > 0"
            )
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
        ):
            raise ExpflowError(f"tracking.langfuse.timeout={timeout!r}: expected whole seconds > 0")
        if tags is not None and (
            not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags)
        ):
            raise ExpflowError(f"tracking.langfuse.tags={tags!r}: expected a list of text tags")
        self.base_url = _settings_base_url(base_url)
        if not self.base_url.startswith(("http://", "https://")):
            raise ExpflowError(
                f"tracking.langfuse.base_url={self.base_url!r}: expected http(s)://host[:port]"
            )
        self.flush_timeout = float(flush_timeout)
        self.tags = list(tags or [])
        self.trace_id: str | None = None
        self._client: Any = None
        self._tracer: Any = None
        self._sdk: Any = None
        self._root: Any = None
        self._trace_attributes: dict[str, Any] = {}
        self._cost = 0.0
        self._calls = 0
        if not enabled or _env_disabled():
            log.info("Langfuse tracking is turned off; nothing is sent")
            return
        self._sdk = require_sdk("langfuse", "langfuse", "Langfuse tracking")
        # The keys go to the SDK and nowhere else: not kept here, never logged.
        public = public_key or os.environ.get("LANGFUSE_PUBLIC_KEY")
        secret = secret_key or os.environ.get("LANGFUSE_SECRET_KEY")
        if not public or not secret:
            log.warning(
                "Langfuse tracking is asked for but has no keys; nothing is sent: %s", KEYS_HINT
            )
            return
        self._client = self._sdk.Langfuse(
            public_key=public,
            secret_key=secret,
            base_url=self.base_url,
            timeout=timeout,
            environment=environment,
        )
        # Steps are mirrored after they ran, so their spans need their real start times;
        # the SDK's start_observation() always starts "now", OpenTelemetry's tracer does not.
        self._tracer = getattr(self._client, "_otel_tracer", None)
        if self._tracer is None:
            raise ExpflowError(
                "this langfuse SDK has no OpenTelemetry tracer; install a supported one: "
                "pip install 'expflow-flows[langfuse]'"
            )

    @property
    def active(self) -> bool:
        """True when spans are being created and sent."""
        return self._client is not None

    # --- emitting ---------------------------------------------------------------------

    def _start(self, as_type: str, name: str, parent: Any, started: float, **fields: Any) -> Any:
        """An observation that began at ``started`` (epoch s), under ``parent`` (or a new trace)."""
        from opentelemetry import context as otel_context
        from opentelemetry import trace as otel_trace

        # An empty base context: the trace must not hang under whatever span (Prefect's,
        # a user's) happens to be current in this thread.
        base = otel_context.Context()
        ctx = otel_trace.set_span_in_context(parent._otel_span, base) if parent else base
        otel_span = self._tracer.start_span(name, context=ctx, start_time=_ns(started))
        # Trace-level attributes go on every observation: Langfuse filters and adds up
        # costs per session only over observations that carry the session id.
        otel_span.set_attributes(self._trace_attributes)
        cls = self._sdk.LangfuseGeneration if as_type == "generation" else self._sdk.LangfuseSpan
        return cls(
            otel_span=otel_span,
            langfuse_client=self._client,
            **{k: v for k, v in fields.items() if v is not None},
        )

    def run_started(self, context: RunContext) -> None:
        """Open the run's trace (root span) in the experiment's session."""
        if not self.active:
            return
        attrs = self._sdk.LangfuseOtelSpanAttributes
        trace_name = f"{context.kind} {context.name}"
        trace_metadata = {
            "experiment": context.name,
            "kind": context.kind,
            "flow_run_id": context.flow_run_id,
            "flow_run_url": context.flow_run_url,
        }
        self._trace_attributes = {
            attrs.TRACE_NAME: trace_name[:200],
            attrs.TRACE_SESSION_ID: context.name[:200],
            attrs.TRACE_TAGS: ["expflow", context.kind, *self.tags, *context.tags],
            **{
                f"{attrs.TRACE_METADATA}.{key}": json.dumps(value)
                for key, value in trace_metadata.items()
                if value
            },
        }
        params = scrub(context.params)
        self._root = self._start(
            "span",
            trace_name,
            None,
            context.started,
            input=params,
            metadata={
                **trace_metadata,
                "run_dir": str(context.run_dir),
                "params": params,
            },
        )
        self.trace_id = self._root.trace_id
        self._write_pointer(context)
        log.info("Langfuse trace %s (session %s) at %s", self.trace_id, context.name, self.base_url)

    def _write_pointer(self, context: RunContext) -> None:
        """``langfuse.json`` in the run folder says which trace mirrors it."""
        try:
            (Path(context.run_dir) / "langfuse.json").write_text(
                json.dumps(
                    {
                        "trace_id": self.trace_id,
                        "session_id": context.name,
                        "base_url": self.base_url,
                    },
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )
        except OSError as exc:
            log.warning("could not write langfuse.json in %s: %s", context.run_dir, exc)

    def record(self, step: StepRecord) -> None:
        """A span for the finished step, with a generation per LLM call it recorded."""
        if not self.active or self._root is None:
            return
        started = step.started if step.started is not None else time.time() - step.wall_s
        metadata: dict[str, Any] = {
            "kind": step.kind,
            "status": step.status,
            "started": started,
            "wall_s": step.wall_s,
            "run_dir": str(step.run_dir) if step.run_dir else None,
            "script": step.script,
        }
        if step.number is not None:
            metadata["number"] = step.number
        if step.reason:
            metadata["reason"] = step.reason
        if step.intermediate:
            metadata["intermediate"] = step.intermediate[-INTERMEDIATE_KEPT:]
        if step.artifacts:
            metadata["artifacts"] = {k: str(v) for k, v in step.artifacts.items()}
        level = _level(step.status)
        span = self._start(
            "span",
            step.name,
            self._root,
            started,
            input=scrub(step.params),
            output=dict(step.metrics) or None,
            metadata=metadata,
            level=level,
            status_message=(step.reason or step.status) if level else None,
        )
        for call in llm_calls.read(step.run_dir) if step.run_dir else []:
            self._generation(span, call)
        span.end(end_time=_ns(started + max(step.wall_s, 0.0)))

    def _generation(self, parent: Any, call: dict[str, Any]) -> None:
        error = call.get("error")
        generation = self._start(
            "generation",
            str(call.get("name") or "llm"),
            parent,
            float(call["started"]),
            model=call.get("model"),
            input=call.get("input"),
            output=call.get("output"),
            usage_details=call.get("usage") or None,
            cost_details=call.get("cost") or None,
            model_parameters=call.get("model_parameters"),
            metadata=call.get("metadata"),
            level="ERROR" if error else None,
            status_message=error,
        )
        generation.end(end_time=_ns(float(call["ended"])))
        self._calls += 1
        self._cost += llm_calls.call_cost(call)

    def run_finished(
        self,
        status: str,
        metrics: dict[str, float],
        artifacts: dict[str, Path],
        message: str = "",
    ) -> None:
        """Close the trace with the final metrics, the LLM cost and the outcome."""
        if not self.active or self._root is None:
            return
        level = _level(status)
        self._root.update(
            output=dict(metrics) or None,
            metadata={
                "status": status,
                "llm_calls": self._calls,
                "llm_cost_usd": round(self._cost, 10),
                "artifacts": {k: str(v) for k, v in artifacts.items()},
            },
            level=level,
            status_message=(message or status) if level else None,
        )
        self._root.end()
        self._root = None

    def close(self) -> None:
        """Send what is batched, waiting at most ``flush_timeout`` seconds; never raises."""
        if not self.active:
            return
        if self._root is not None:  # the run stopped without reporting how it ended
            try:
                self._root.update(level="ERROR", status_message="the run stopped before finishing")
                self._root.end()
            except Exception as exc:  # noqa: BLE001 - closing must not raise
                log.warning("Langfuse: could not end the run's trace: %s", exc)
            self._root = None
        client, self._client = self._client, None
        done = threading.Event()

        def flush() -> None:
            try:
                client.flush()
            except Exception as exc:  # noqa: BLE001 - a mirror must not break the run
                log.warning("Langfuse: sending the run's spans failed: %s", exc)
            finally:
                done.set()

        # The SDK's flush waits on its exporter, whose retries can outlast our patience
        # with a server that accepts connections and never answers: wait in a thread.
        threading.Thread(target=flush, name="langfuse-flush", daemon=True).start()
        if not done.wait(self.flush_timeout):
            log.warning(
                "Langfuse at %s did not take the run's spans within %g s; going on without "
                "waiting (they may be lost)",
                self.base_url,
                self.flush_timeout,
            )


# --- reading back ------------------------------------------------------------------------

OBSERVATION_FIELDS = "core,basic,time,io,metadata,model,usage,metrics,trace_context"
COST_GROUPS = {"model": "providedModelName", "trace-name": "traceName", "none": None}


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class LangfuseReader:
    """Traces, observations and costs from Langfuse's public API (observations and metrics v2)."""

    def __init__(self, base_url: str | None = None, timeout: float = 10.0):
        if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
            raise ExpflowError(f"timeout {timeout!r} is not accepted; expected seconds > 0")
        public = os.environ.get("LANGFUSE_PUBLIC_KEY")
        secret = os.environ.get("LANGFUSE_SECRET_KEY")
        if not public or not secret:
            raise ExpflowError(f"reading from Langfuse needs its API keys: {KEYS_HINT}")
        require_sdk("langfuse", "langfuse", "Reading from Langfuse")
        from langfuse.api import LangfuseAPI

        self.base_url = _settings_base_url(base_url)
        if not self.base_url.startswith(("http://", "https://")):
            raise ExpflowError(
                f"Langfuse base URL {self.base_url!r} is not accepted; expected http(s)://host[:port]"
            )
        self._api = LangfuseAPI(
            base_url=self.base_url,
            username=public,
            password=secret,
            x_langfuse_public_key=public,
            x_langfuse_sdk_name="expflow",
            timeout=float(timeout),
        )

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        """One API call; any failure becomes one line naming the server and what to check."""
        import httpx
        from langfuse.api.core.api_error import ApiError

        try:
            return fn(**kwargs, request_options={"max_retries": 1})
        except ApiError as exc:
            code = exc.status_code
            if code in (401, 403):
                raise ExpflowError(
                    f"Langfuse at {self.base_url} refused the API keys for {what} (HTTP {code}); "
                    "check LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY"
                ) from None
            body = exc.body if isinstance(exc.body, str) else json.dumps(exc.body, default=str)
            raise ExpflowError(
                f"Langfuse at {self.base_url} answered HTTP {code} to {what}: {body[:200]}"
            ) from None
        except httpx.TimeoutException:
            raise ExpflowError(
                f"Langfuse at {self.base_url} did not answer {what} in time; "
                "check LANGFUSE_BASE_URL or raise --timeout"
            ) from None
        except httpx.HTTPError as exc:
            raise ExpflowError(
                f"Langfuse at {self.base_url} cannot be reached ({type(exc).__name__}: {exc}); "
                "check LANGFUSE_BASE_URL"
            ) from None

    def _observations(self, what: str, pages: int = 10, **query: Any) -> list[Any]:
        """Every observation the query matches, following the cursor for at most ``pages``."""
        found: list[Any] = []
        cursor = None
        for _ in range(pages):
            page = self._call(what, self._api.observations.get_many, cursor=cursor, **query)
            found += list(page.data)
            cursor = page.meta.cursor
            if not cursor:
                break
        return found

    @staticmethod
    def _window(days: float) -> tuple[dt.datetime, dt.datetime]:
        if not isinstance(days, (int, float)) or not math.isfinite(days) or days <= 0:
            raise ExpflowError(f"--days {days!r} is not accepted; expected a number > 0")
        now = dt.datetime.now(dt.UTC)
        # A little past "now": spans stamped by a machine whose clock runs ahead still count.
        return now - dt.timedelta(days=days), now + dt.timedelta(hours=1)

    def traces(
        self,
        session: str | None = None,
        tag: str | None = None,
        name: str | None = None,
        limit: int = 20,
        days: float = 30,
    ) -> list[dict[str, Any]]:
        """Recent traces (their root observations), newest first."""
        start, _ = self._window(days)
        query: dict[str, Any] = {
            "fields": "core,basic,metadata,trace_context",
            "limit": max(1, min(int(limit), 1000)),
        }
        if tag:
            # Tags are only filterable through the structured filter, which then replaces
            # every query-parameter filter: put them all in it.
            conditions: list[dict[str, Any]] = [
                {"type": "boolean", "column": "isRootObservation", "operator": "=", "value": True},
                {
                    "type": "arrayOptions",
                    "column": "traceTags",
                    "operator": "any of",
                    "value": [tag],
                },
                {"type": "datetime", "column": "startTime", "operator": ">=", "value": _iso(start)},
            ]
            if session:
                conditions.append(
                    {"type": "string", "column": "sessionId", "operator": "=", "value": session}
                )
            if name:
                conditions.append(
                    {"type": "string", "column": "name", "operator": "=", "value": name}
                )
            query["filter"] = json.dumps(conditions)
        else:
            query.update(
                is_root_observation=True, session_id=session, name=name, from_start_time=start
            )
        rows = self._observations("the trace list", pages=1, **query)
        traces = [self._trace_row(o) for o in rows]
        traces.sort(key=lambda t: t["started"] or "", reverse=True)
        return traces[: int(limit)]

    @staticmethod
    def _trace_row(o: Any) -> dict[str, Any]:
        metadata = o.metadata or {}
        return {
            "id": o.trace_id,
            "name": getattr(o, "trace_name", None) or o.name,
            "session": o.session_id,
            "started": _iso(o.start_time),
            "ended": _iso(o.end_time),
            "level": str(o.level.value if hasattr(o.level, "value") else o.level or ""),
            "status_message": o.status_message,
            "tags": list(getattr(o, "tags", None) or []),
            "flow_run_id": _unquote(metadata.get("flow_run_id")),
        }

    def trace(self, trace_id: str) -> dict[str, Any]:
        """One trace with all its observations (oldest first) and its total LLM cost."""
        observations = self._observations(
            f"trace {trace_id}", trace_id=trace_id, fields=OBSERVATION_FIELDS, limit=1000
        )
        if not observations:
            raise ExpflowError(
                f"trace {trace_id!r} is not in Langfuse at {self.base_url} (a new trace can take "
                "a minute to appear); list traces with: expflow langfuse traces"
            )
        rows = [self._observation_row(o) for o in observations]
        rows.sort(key=lambda r: r["started"] or "")
        roots = [o for o in observations if o.is_root_observation or not o.parent_observation_id]
        head = self._trace_row(roots[0] if roots else observations[0])
        generations = [r for r in rows if r["type"] == "GENERATION"]
        return {
            **head,
            "cost_usd": round(sum(r["cost_usd"] or 0.0 for r in rows), 10),
            "llm_calls": len(generations),
            "input_tokens": sum(r["usage"].get("input", 0) for r in generations),
            "output_tokens": sum(r["usage"].get("output", 0) for r in generations),
            "observations": rows,
        }

    @staticmethod
    def _observation_row(o: Any) -> dict[str, Any]:
        return {
            "id": o.id,
            "parent_id": o.parent_observation_id,
            "type": str(o.type),
            "name": o.name,
            "started": _iso(o.start_time),
            "ended": _iso(o.end_time),
            "latency_s": o.latency,
            "level": str(o.level.value if hasattr(o.level, "value") else o.level or ""),
            "status_message": o.status_message,
            "model": o.model,
            "usage": dict(o.usage_details or {}),
            "cost_usd": o.total_cost,
            "metadata": dict(o.metadata or {}),
        }

    def cost(
        self,
        session: str | None = None,
        trace_id: str | None = None,
        by: str = "model",
        days: float = 30,
    ) -> dict[str, Any]:
        """LLM cost, tokens and calls (generations) of a session, a trace, or everything."""
        if by not in COST_GROUPS:
            raise ExpflowError(
                f"--by {by!r} is not accepted; expected one of {', '.join(COST_GROUPS)}"
            )
        start, end = self._window(days)
        filters: list[dict[str, Any]] = [
            {"column": "type", "operator": "=", "value": "GENERATION", "type": "string"}
        ]
        if session:
            filters.append(
                {"column": "sessionId", "operator": "=", "value": session, "type": "string"}
            )
        if trace_id:
            filters.append(
                {"column": "traceId", "operator": "=", "value": trace_id, "type": "string"}
            )
        group = COST_GROUPS[by]
        query = {
            "view": "observations",
            "dimensions": [{"field": group}] if group else [],
            "metrics": [
                {"measure": "totalCost", "aggregation": "sum"},
                {"measure": "inputTokens", "aggregation": "sum"},
                {"measure": "outputTokens", "aggregation": "sum"},
                {"measure": "count", "aggregation": "count"},
            ],
            "filters": filters,
            "fromTimestamp": _iso(start),
            "toTimestamp": _iso(end),
            "orderBy": [{"field": "sum_totalCost", "direction": "desc"}],
        }
        answer = self._call("the cost query", self._api.metrics.metrics, query=json.dumps(query))
        rows = []
        for item in answer.data:
            rows.append(
                {
                    "group": str(item.get(group) or "") if group else "all",
                    "cost_usd": round(_number(item.get("sum_totalCost")), 10),
                    "input_tokens": int(_number(item.get("sum_inputTokens"))),
                    "output_tokens": int(_number(item.get("sum_outputTokens"))),
                    "calls": int(_number(item.get("count_count"))),
                }
            )
        rows = [r for r in rows if r["calls"] or r["cost_usd"]]
        return {
            "session": session,
            "trace_id": trace_id,
            "by": by,
            "days": days,
            "rows": rows,
            "cost_usd": round(sum(r["cost_usd"] for r in rows), 10),
            "calls": sum(r["calls"] for r in rows),
            "input_tokens": sum(r["input_tokens"] for r in rows),
            "output_tokens": sum(r["output_tokens"] for r in rows),
        }

    def sessions(
        self, limit: int = 20, days: float = 30, cost: bool = True
    ) -> list[dict[str, Any]]:
        """Sessions (one per experiment) seen in the last ``days``, newest first, with costs."""
        start, _ = self._window(days)
        roots = self._observations(
            "the session list",
            is_root_observation=True,
            from_start_time=start,
            fields="core,basic",
            limit=1000,
        )
        sessions: dict[str, dict[str, Any]] = {}
        for o in roots:
            if not o.session_id:
                continue
            when = _iso(o.start_time)
            row = sessions.setdefault(
                o.session_id, {"session": o.session_id, "traces": 0, "first": when, "last": when}
            )
            row["traces"] += 1
            row["first"] = min(row["first"] or when, when or "")
            row["last"] = max(row["last"] or when, when or "")
        rows = sorted(sessions.values(), key=lambda r: r["last"] or "", reverse=True)[: int(limit)]
        if cost:
            # The metrics API cannot group by session (too many of them): one query each.
            for row in rows:
                spent = self.cost(session=row["session"], by="none", days=days)
                row["cost_usd"], row["llm_calls"] = spent["cost_usd"], spent["calls"]
        return rows


def _unquote(value: Any) -> Any:
    """Metadata values arrive JSON-encoded when they were written as attributes."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
