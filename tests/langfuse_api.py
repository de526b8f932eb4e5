"""A loopback stand-in for the Langfuse server, for tests of the Langfuse integration.

A real Langfuse server cannot run on this machine: it is a web app and a worker that
need PostgreSQL, ClickHouse, Redis and S3-compatible storage. This module is an HTTP
server on 127.0.0.1 (stdlib ``http.server`` in a thread) that speaks the part of
Langfuse's API that expflow uses, keeping what it receives in memory:

* ``POST /api/public/otel/v1/traces`` takes what the real SDK's OpenTelemetry exporter
  sends (OTLP/HTTP protobuf, gzip-compressed, HTTP basic auth with the public/secret
  key pair) and decodes it with ``opentelemetry-proto``, as Langfuse's ingestion does;
* ``GET /api/public/v2/observations`` answers with observations built from those spans
  the way Langfuse maps OpenTelemetry attributes (``langfuse.observation.*`` for the
  observation, ``session.id`` and ``langfuse.trace.*`` for its trace), with the query
  filters, the structured ``filter`` parameter (which replaces them), field groups and
  cursor pagination;
* ``GET /api/public/v2/metrics`` aggregates observations (sums of cost and tokens,
  counts) with filters and dimensions, and refuses high-cardinality dimensions
  (``sessionId``, ``traceId``) with HTTP 400 as the real API does.

Simplifications: trace-level values (session, name, tags) set on any span of a trace
apply to all of its observations; no ingestion delay; metadata values come back as
text. Calls it does not know are answered 404 and listed in ``unknown_endpoints`` so a
test can tell when a new client version calls something new.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
from collections import defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loopback import LoopbackServer

PROJECT_ID = "expflow-loopback-project"
HIGH_CARDINALITY = {"id", "traceId", "userId", "sessionId", "parentObservationId"}
FIELD_GROUPS = {
    "basic": (
        "name",
        "level",
        "statusMessage",
        "version",
        "environment",
        "userId",
        "sessionId",
        "isRootObservation",
    ),
    "time": ("completionStartTime",),
    "io": ("input", "output"),
    "metadata": ("metadata",),
    "model": ("model", "modelParameters"),
    "usage": ("usageDetails", "costDetails", "totalCost"),
    "metrics": ("latency",),
    "trace_context": ("tags", "traceName"),
}
CORE = ("id", "traceId", "startTime", "endTime", "projectId", "parentObservationId", "type")


class BadRequest(Exception):
    """An error answer: HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _any_value(value: Any) -> Any:
    """An OTLP AnyValue as a Python value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in items}


def _json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class LangfuseApiServer(LoopbackServer):
    """In-memory Langfuse API on a free loopback port. Use as a context manager."""

    thread_name = "langfuse-api"

    def __init__(self, public_key: str, secret_key: str) -> None:
        self.public_key = public_key
        self.secret_key = secret_key
        self._lock = threading.RLock()
        self.spans: list[dict[str, Any]] = []  # decoded OTLP spans, as received
        self.export_headers: list[dict[str, str]] = []
        self.calls: list[str] = []
        self.unknown_endpoints: list[str] = []

    # ------------------------------------------------------------------ HTTP

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(request.path)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        key = f"{request.command} {parts.path}"
        with self._lock:
            self.calls.append(key)
        try:
            self._check_auth(request.headers.get("Authorization", ""))
            if key == "POST /api/public/otel/v1/traces":
                self._ingest(body, request.headers)
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceResponse,
                )

                self._reply(
                    request, 200, ExportTraceServiceResponse().SerializeToString(), "protobuf"
                )
                return
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            if key == "GET /api/public/v2/observations":
                answer = self._observations(query)
            elif key == "GET /api/public/v2/metrics":
                answer = self._metrics(query)
            else:
                with self._lock:
                    self.unknown_endpoints.append(key)
                raise BadRequest(404, f"no such endpoint: {key}")
        except BadRequest as exc:
            self._reply(request, exc.status, json.dumps({"message": str(exc)}).encode())
            return
        self._reply(request, 200, json.dumps(answer).encode())

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body: bytes, kind: str = "json"):
        request.send_response(status)
        ctype = "application/x-protobuf" if kind == "protobuf" else "application/json"
        request.send_header("Content-Type", ctype)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def _check_auth(self, header: str) -> None:
        expected = base64.b64encode(f"{self.public_key}:{self.secret_key}".encode()).decode()
        if header != f"Basic {expected}":
            raise BadRequest(401, "Invalid credentials. Confirm that you've configured the keys.")

    # ------------------------------------------------------------------ ingestion

    def _ingest(self, body: bytes, headers: Any) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        if headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        received = []
        for resource_spans in message.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                scope = {
                    "name": scope_spans.scope.name,
                    "attributes": _attributes(scope_spans.scope.attributes),
                }
                for span in scope_spans.spans:
                    received.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex() or None,
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                            "attributes": _attributes(span.attributes),
                            "resource": resource,
                            "scope": scope,
                        }
                    )
        with self._lock:
            self.export_headers.append({k.lower(): v for k, v in headers.items()})
            self.spans += received

    # ------------------------------------------------------------------ the read model

    def observations(self) -> list[dict[str, Any]]:
        """Every observation, with all fields, as Langfuse's v2 read model shows it."""
        with self._lock:
            spans = list(self.spans)
        traces: dict[str, dict[str, Any]] = defaultdict(dict)
        for span in spans:
            a = span["attributes"]
            trace = traces[span["trace_id"]]
            for attr, field in (
                ("session.id", "sessionId"),
                ("user.id", "userId"),
                ("langfuse.trace.name", "traceName"),
                ("langfuse.trace.tags", "tags"),
            ):
                if attr in a:
                    trace.setdefault(field, a[attr])
        out = []
        for span in spans:
            a = span["attributes"]
            trace = traces[span["trace_id"]]
            metadata = {}
            for name, value in a.items():
                for prefix in ("langfuse.trace.metadata.", "langfuse.observation.metadata."):
                    if name.startswith(prefix):
                        decoded = _json(value)
                        metadata[name[len(prefix) :]] = (
                            decoded if isinstance(decoded, str) else json.dumps(decoded)
                        )
            cost = _json(a.get("langfuse.observation.cost_details")) or None
            total_cost = None
            if isinstance(cost, dict):
                total_cost = cost.get("total", sum(cost.values()))
            out.append(
                {
                    "id": span["span_id"],
                    "traceId": span["trace_id"],
                    "startTime": _iso(span["start_ns"]),
                    "endTime": _iso(span["end_ns"]),
                    "projectId": PROJECT_ID,
                    "parentObservationId": span["parent_span_id"],
                    "type": str(a.get("langfuse.observation.type", "span")).upper(),
                    "name": span["name"],
                    "level": a.get("langfuse.observation.level", "DEFAULT"),
                    "statusMessage": a.get("langfuse.observation.status_message"),
                    "version": a.get("langfuse.version"),
                    "environment": a.get("langfuse.environment", "default"),
                    "userId": trace.get("userId"),
                    "sessionId": trace.get("sessionId"),
                    "isRootObservation": not span["parent_span_id"]
                    or bool(a.get("langfuse.internal.is_app_root")),
                    "completionStartTime": None,
                    "input": a.get("langfuse.observation.input"),
                    "output": a.get("langfuse.observation.output"),
                    "metadata": metadata,
                    "model": a.get("langfuse.observation.model.name"),
                    "modelParameters": _json(a.get("langfuse.observation.model.parameters")),
                    "usageDetails": _json(a.get("langfuse.observation.usage_details")) or None,
                    "costDetails": cost,
                    "totalCost": total_cost,
                    "latency": (span["end_ns"] - span["start_ns"]) / 1e9,
                    "tags": list(trace.get("tags") or []),
                    "traceName": trace.get("traceName"),
                    "_start": span["start_ns"] / 1e9,
                }
            )
        return out

    def _observations(self, query: dict[str, str]) -> dict[str, Any]:
        if query.get("parseIoAsJson") == "true":
            raise BadRequest(400, "parseIoAsJson is no longer supported")
        rows = self.observations()
        if "filter" in query:
            try:
                conditions = json.loads(query["filter"])
            except json.JSONDecodeError as exc:
                raise BadRequest(400, f"filter is not JSON: {exc}") from None
        else:
            conditions = []
            for param, column in (
                ("traceId", "traceId"),
                ("sessionId", "sessionId"),
                ("userId", "userId"),
                ("name", "name"),
                ("type", "type"),
                ("level", "level"),
                ("parentObservationId", "parentObservationId"),
            ):
                if param in query:
                    conditions.append(
                        {"type": "string", "column": column, "operator": "=", "value": query[param]}
                    )
            if "isRootObservation" in query:
                conditions.append(
                    {
                        "type": "boolean",
                        "column": "isRootObservation",
                        "operator": "=",
                        "value": query["isRootObservation"] == "true",
                    }
                )
            for param, op in (("fromStartTime", ">="), ("toStartTime", "<")):
                if param in query:
                    conditions.append(
                        {
                            "type": "datetime",
                            "column": "startTime",
                            "operator": op,
                            "value": query[param],
                        }
                    )
        rows = [r for r in rows if all(_matches(r, c) for c in conditions)]
        rows.sort(key=lambda r: r["_start"], reverse=True)
        limit = min(int(query.get("limit", 50)), 1000)
        offset = 0
        if query.get("cursor"):
            offset = json.loads(base64.b64decode(query["cursor"]))["offset"]
        page = rows[offset : offset + limit]
        groups = (query.get("fields") or "core,basic").split(",")
        keep = set(CORE)
        for group in groups:
            if group != "core" and group not in FIELD_GROUPS:
                raise BadRequest(400, f"unknown field group {group!r}")
            keep.update(FIELD_GROUPS.get(group, ()))
        meta: dict[str, Any] = {}
        if offset + limit < len(rows):
            meta["cursor"] = base64.b64encode(
                json.dumps({"offset": offset + limit}).encode()
            ).decode()
        return {"data": [{k: v for k, v in r.items() if k in keep} for r in page], "meta": meta}

    def _metrics(self, query: dict[str, str]) -> dict[str, Any]:
        try:
            spec = json.loads(query["query"])
        except (KeyError, json.JSONDecodeError):
            raise BadRequest(400, "query must be a JSON object") from None
        if spec.get("view") != "observations":
            raise BadRequest(400, f"view {spec.get('view')!r} is not supported in v2")
        for needed in ("fromTimestamp", "toTimestamp", "metrics"):
            if not spec.get(needed):
                raise BadRequest(400, f"{needed} is required")
        dims = [d["field"] for d in spec.get("dimensions") or []]
        for dim in dims:
            if dim in HIGH_CARDINALITY:
                raise BadRequest(400, f"dimension {dim!r} is high cardinality; filter by it")
        start, end = _parse_time(spec["fromTimestamp"]), _parse_time(spec["toTimestamp"])
        rows = [
            r
            for r in self.observations()
            if start <= r["_start"] <= end
            and all(_matches(r, _metric_filter(c)) for c in spec.get("filters") or [])
        ]
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[tuple(_column(r, d) for d in dims)].append(r)
        data = []
        for key, members in groups.items():
            item: dict[str, Any] = dict(zip(dims, key, strict=True))
            for metric in spec["metrics"]:
                measure, agg = metric["measure"], metric["aggregation"]
                values = [_measure(r, measure) for r in members]
                if agg == "count":
                    result: Any = len(values)
                elif agg == "sum":
                    result = sum(values)
                elif agg in ("max", "min"):
                    result = (max if agg == "max" else min)(values)
                elif agg == "avg":
                    result = sum(values) / len(values)
                else:
                    raise BadRequest(400, f"aggregation {agg!r} is not supported here")
                item[f"{agg}_{measure}"] = result
            data.append(item)
        for order in reversed(spec.get("orderBy") or []):
            data.sort(
                key=lambda i: i.get(order["field"]) or 0, reverse=order["direction"] == "desc"
            )
        return {"data": data}


def _column(row: dict[str, Any], column: str) -> Any:
    aliases = {"providedModelName": "model", "traceTags": "tags"}
    return row.get(aliases.get(column, column))


def _measure(row: dict[str, Any], measure: str) -> float:
    usage = row.get("usageDetails") or {}
    cost = row.get("costDetails") or {}
    return {
        "count": 1,
        "totalCost": row.get("totalCost") or 0.0,
        "inputCost": cost.get("input", 0.0),
        "outputCost": cost.get("output", 0.0),
        "inputTokens": usage.get("input", 0),
        "outputTokens": usage.get("output", 0),
        "totalTokens": usage.get("total", usage.get("input", 0) + usage.get("output", 0)),
        "latency": row["latency"] * 1000,
    }.get(measure, 0)


def _metric_filter(condition: dict[str, Any]) -> dict[str, Any]:
    known = {"sessionId", "traceId", "traceName", "type", "name", "providedModelName", "tags"}
    known |= {"environment", "level", "userId", "isRootObservation"}
    if condition.get("column") not in known:
        raise BadRequest(400, f"filter column {condition.get('column')!r} is not known")
    return condition


def _matches(row: dict[str, Any], condition: dict[str, Any]) -> bool:
    column, op, value = condition.get("column"), condition.get("operator"), condition.get("value")
    if column == "startTime":
        when = _parse_time(value)
        return {
            ">=": row["_start"] >= when,
            ">": row["_start"] > when,
            "<=": row["_start"] <= when,
            "<": row["_start"] < when,
        }[op]
    if column == "metadata":
        have = row["metadata"].get(condition.get("key"))
        return have == value if op == "=" else have is not None
    if column not in {*CORE, *sum(FIELD_GROUPS.values(), ()), "providedModelName", "traceTags"}:
        raise BadRequest(400, f"filter column {column!r} is not known")
    have = _column(row, column)
    if isinstance(have, list):  # tags
        wanted = set(value if isinstance(value, list) else [value])
        return {
            "any of": bool(wanted & set(have)),
            "all of": wanted <= set(have),
            "none of": not wanted & set(have),
        }.get(op, False)
    if op == "=":
        return have == value
    if op == "any of":
        return have in value
    if op == "none of":
        return have not in value
    raise BadRequest(400, f"operator {op!r} is not supported here")
