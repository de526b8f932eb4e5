"""A loopback stand-in for the ClearML API server, for tests of the ClearML integration.

A real ClearML server cannot run on this machine: it needs MongoDB, Elasticsearch and
Redis. This module is an HTTP server on 127.0.0.1 (stdlib ``http.server`` in a thread)
that speaks the part of ClearML's REST API that the real ClearML SDK and a real
``clearml-agent daemon`` call, keeping projects, tasks, queues, workers and events in
memory. It follows the real server where the clients can tell the difference:

* ``auth.login`` takes the access/secret key pair (HTTP basic auth) and returns a JWT
  whose payload carries ``api_version`` and ``server_version``, which is how the SDK
  and the agent learn what the server supports; every other call needs that token;
* every answer is the ``{"meta": {...}, "data": ...}`` envelope, errors included
  (``result_code`` 400/401 with ClearML's subcodes, e.g. 101 for an unknown task);
* task statuses move as on the real server: ``tasks.enqueue`` queues, the agent's
  ``queues.get_next_task`` pops, ``tasks.started``/``completed``/``failed``/``stopped``
  check the current status unless ``force``; ``tasks.stop`` dequeues a queued task
  and stops it, stops a task that no live worker runs, and otherwise only sets
  ``status_message`` to "stopping" so that the task's agent kills the process and
  reports it stopped (what the web UI's Abort does);
* ``events.add_batch`` takes newline-delimited JSON and keeps scalars (``last_metrics``
  updated) and log lines per task.

Tests read the stored state through :meth:`ClearMLApiServer.tasks` and friends, and
act as a ClearML user would with :meth:`ClearMLApiServer.abort` (the UI's Abort).
Endpoints it does not know are answered with an error and listed in
:attr:`ClearMLApiServer.unknown_endpoints`, so a test can tell what a new client
version started to call.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from loopback import LoopbackServer

API_VERSION = "2.23"
SERVER_VERSION = "1.16.0"

# ClearML's error subcodes for the cases clients branch on.
INVALID_TASK_ID = 101
INVALID_TASK_STATUS = 110
INVALID_PROJECT_ID = 401
INVALID_QUEUE_ID = 701
QUEUE_NAME_EXISTS = 702
NOT_AUTHORIZED = 20
BAD_CREDENTIALS = 21
UNKNOWN_ENDPOINT = 0

# Status a task may come from, per status call, when `force` is not given.
_ALLOWED_FROM = {
    "started": {"created", "queued", "in_progress"},
    "stopped": {"in_progress", "stopped"},
    "completed": {"in_progress", "stopped", "completed"},
    "failed": {"created", "queued", "in_progress", "stopped", "failed"},
    "enqueue": {"created", "stopped", "failed", "completed", "closed"},
    "close": {"stopped", "completed", "failed"},
    "publish": {"stopped", "completed"},
}
# A worker that reported within this many seconds counts as running its task.
WORKER_TIMEOUT_S = 600


class ApiError(Exception):
    """An error answer: HTTP status, ClearML result code and subcode, message."""

    def __init__(self, code: int, subcode: int, message: str) -> None:
        super().__init__(message)
        self.code, self.subcode, self.message = code, subcode, message


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _merge(into: dict, update: dict) -> dict:
    """Deep-merge `update` into `into` (dicts merged, everything else replaced)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def _project(obj: dict, only_fields: list[str] | None) -> dict:
    """`obj` restricted to dotted `only_fields` (and its id), as get_all does."""
    if not only_fields:
        return copy.deepcopy(obj)
    out: dict = {"id": obj.get("id")}
    for dotted in only_fields:
        src, dst = obj, out
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(src, dict) or part not in src:
                break
            if i == len(parts) - 1:
                dst[part] = copy.deepcopy(src[part])
            else:
                src = src[part]
                dst = dst.setdefault(part, {})
    return out


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _tags_match(have: list[str], wanted: list[str]) -> bool:
    """ClearML's tag filter: all plain tags present, no `-tag` present."""
    for tag in wanted:
        if tag.startswith("-"):
            if tag[1:] in have:
                return False
        elif tag not in have and not tag.startswith("__$"):
            return False
    return True


class ClearMLApiServer(LoopbackServer):
    """In-memory ClearML API on a free loopback port. Use as a context manager."""

    thread_name = "clearml-api"

    def __init__(
        self,
        access_key: str = "EXPFLOWTESTACCESSKEY",
        secret_key: str | None = None,
        api_version: str = API_VERSION,
        server_version: str = SERVER_VERSION,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.api_version = api_version
        self.server_version = server_version
        self._signing_key = secrets.token_bytes(32)
        self._tokens: set[str] = set()
        self._lock = threading.RLock()
        self.projects: dict[str, dict] = {}
        self._tasks: dict[str, dict] = {}
        self.queues: dict[str, dict] = {}
        self.workers: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = defaultdict(list)
        self.history: dict[str, list[tuple[str, float]]] = defaultdict(list)
        self.calls: list[str] = []
        self.unknown_endpoints: list[str] = []
        self.files: dict[str, bytes] = {}  # the files server: path -> uploaded body

    def config_text(self, extra: str = "") -> str:
        """A clearml.conf for this server: credentials, and no HTTP retries, so a client
        fails in about a second instead of retrying for hours (the SDK's default)."""
        return (
            "api {\n"
            f'  api_server: "{self.url}"\n'
            f'  web_server: "{self.url}"\n'
            f'  files_server: "{self.url}/files"\n'
            "  credentials {\n"
            f'    access_key: "{self.access_key}"\n'
            f'    secret_key: "{self.secret_key}"\n'
            "  }\n"
            "  http {\n"
            "    retries { total: 0, connect: 0, read: 0, redirect: 0, status: 0,"
            " backoff_factor: 0, backoff_max: 0 }\n"
            "    wait_on_maintenance_forever: false\n"
            "  }\n"
            "}\n"
            "sdk { development { report_use_subprocess: false } }\n" + extra
        )

    # ---------------------------------------------------------------- test helpers

    def create_queue(self, name: str, tags: list[str] | None = None) -> str:
        """Create a queue as an admin would; its id."""
        with self._lock:
            return self._queues_create({"name": name, "tags": tags or []}, "")["id"]

    def queue_id(self, name: str) -> str:
        with self._lock:
            return next(q["id"] for q in self.queues.values() if q["name"] == name)

    def tasks(self, **filters: Any) -> list[dict]:
        """Copies of the stored tasks, filtered as tasks.get_all filters them."""
        with self._lock:
            return self._tasks_get_all(dict(filters), "")["tasks"]

    def task(self, task_id: str) -> dict:
        with self._lock:
            return copy.deepcopy(self._task(task_id))

    def statuses(self, task_id: str) -> list[str]:
        """Every status the task went through, in order."""
        with self._lock:
            return [status for status, _ in self.history[task_id]]

    def status_times(self, task_id: str) -> list[tuple[str, float]]:
        """(status, time.monotonic()) for every status change of the task."""
        with self._lock:
            return list(self.history[task_id])

    def logs(self, task_id: str) -> list[str]:
        """The console lines reported for a task (agent output, SDK console capture)."""
        with self._lock:
            return [e.get("msg", "") for e in self.events[task_id] if e.get("type") == "log"]

    def scalars(self, task_id: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """metric -> variant -> [(iteration, value)] of the scalars reported for a task."""
        out: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        with self._lock:
            for e in self.events[task_id]:
                if e.get("type") == "training_stats_scalar":
                    out[e.get("metric", "")][e.get("variant", "")].append(
                        (int(e.get("iter") or 0), float(e.get("value")))
                    )
        return {m: dict(v) for m, v in out.items()}

    def abort(self, task_id: str) -> dict:
        """Abort a task as the web UI's Abort button does (tasks.stop)."""
        with self._lock:
            return self._tasks_stop({"task": task_id, "force": True}, "web-ui")

    def set_status(self, task_id: str, status: str, reason: str = "") -> None:
        """Force a task into a status, as an admin script would."""
        with self._lock:
            self._set_status(self._task(task_id), status, reason, "")

    def dump(self) -> str:
        """Everything stored, as JSON (to look for what must not be there)."""
        with self._lock:
            return json.dumps(
                {
                    "projects": self.projects,
                    "tasks": self._tasks,
                    "queues": self.queues,
                    "workers": self.workers,
                    "events": self.events,
                },
                default=str,
            )

    # ------------------------------------------------------------------- transport

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        parsed = urlsplit(request.path)
        if parsed.path == "/files" or parsed.path.startswith("/files/"):
            self._file(request, parsed.path[len("/files/") :])
            return
        endpoint = parsed.path.rstrip("/").rsplit("/", 1)[-1]
        version = parsed.path.strip("/").split("/")[0] if parsed.path.count("/") > 1 else ""
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        worker = request.headers.get("X-ClearML-Worker") or request.headers.get(
            "X-Trains-Worker", ""
        )
        status, body = 200, None
        try:
            payload = self._payload(endpoint, raw)
            payload.update(dict(parse_qsl(parsed.query)))
            with self._lock:
                self.calls.append(endpoint)
                if endpoint == "auth.login":
                    data = self._login(request.headers.get("Authorization", ""))
                else:
                    self._authorize(request.headers.get("Authorization", ""))
                    handler = self._endpoint(endpoint)
                    data = handler(payload, worker)
            body = self._envelope(endpoint, version, 200, 0, "OK", data)
        except ApiError as err:
            status = err.code
            body = self._envelope(endpoint, version, err.code, err.subcode, err.message, {})
        except Exception as exc:  # a bug here must show, not hang a client
            status = 500
            body = self._envelope(endpoint, version, 500, 0, f"{type(exc).__name__}: {exc}", {})
        out = json.dumps(body, default=str).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(out)))
        request.end_headers()
        request.wfile.write(out)

    def _file(self, request: BaseHTTPRequestHandler, path: str) -> None:
        """The files server: artifacts the SDK uploads (stored whole, multipart and all)
        and hands back on GET."""
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        with self._lock:
            if request.command in ("POST", "PUT"):
                # The SDK POSTs multipart to the files server's root, naming the object's
                # path in the part's form field.
                named = re.search(rb'name="([^"]+)"', raw[:4096])
                key = named.group(1).decode() if (not path and named) else path
                self.files[key] = raw
                status, out = 200, b"{}"
            elif path in self.files:
                status, out = 200, self.files[path]
            else:
                status, out = 404, b"{}"
        request.send_response(status)
        request.send_header("Content-Length", str(len(out)))
        request.end_headers()
        request.wfile.write(out)

    @staticmethod
    def _payload(endpoint: str, raw: bytes) -> dict:
        if not raw.strip():
            return {}
        text = raw.decode()
        if endpoint == "events.add_batch":
            return {"events": [json.loads(line) for line in text.splitlines() if line.strip()]}
        data = json.loads(text)
        if isinstance(data, list):  # some batch calls send a bare list
            return {"requests": data}
        return data

    def _envelope(self, endpoint, version, code, subcode, message, data) -> dict:
        return {
            "meta": {
                "id": uuid.uuid4().hex,
                "trx": uuid.uuid4().hex,
                "endpoint": {
                    "name": endpoint,
                    "requested_version": version.lstrip("v") or self.api_version,
                    "actual_version": "1.0",
                },
                "result_code": code,
                "result_subcode": subcode,
                "result_msg": message,
                "error_stack": None,
                "error_data": {},
            },
            "data": data,
        }

    def _endpoint(self, endpoint: str):
        name = "_" + endpoint.replace(".", "_")
        handler = getattr(self, name, None)
        if handler is None:
            self.unknown_endpoints.append(endpoint)
            raise ApiError(400, UNKNOWN_ENDPOINT, f"Unknown endpoint: {endpoint}")
        return handler

    # ------------------------------------------------------------------------ auth

    def _login(self, authorization: str) -> dict:
        if authorization.startswith("Bearer ") and authorization[7:] in self._tokens:
            return {"token": authorization[7:]}
        if not authorization.startswith("Basic "):
            raise ApiError(401, NOT_AUTHORIZED, "Unauthorized (missing credentials)")
        key, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        if key != self.access_key or not hmac.compare_digest(secret, self.secret_key):
            raise ApiError(401, BAD_CREDENTIALS, "Unauthorized (invalid credentials)")
        now = int(time.time())
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {
            "identity": {
                "user": "expflow-test-user",
                "company": "expflow-test-company",
                "role": "user",
                "user_name": "expflow test",
                "company_name": "expflow",
            },
            "api_version": self.api_version,
            "server_version": self.server_version,
            "feature_set": "basic",
            "env": "test",
            "iat": now,
            "exp": now + 30 * 24 * 3600,
        }
        signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        signature = hmac.new(self._signing_key, signing_input.encode(), hashlib.sha256).digest()
        token = signing_input + "." + _b64(signature)
        self._tokens.add(token)
        return {"token": token}

    def _authorize(self, authorization: str) -> None:
        if not (authorization.startswith("Bearer ") and authorization[7:] in self._tokens):
            raise ApiError(401, NOT_AUTHORIZED, "Unauthorized (invalid token)")

    # -------------------------------------------------------------------- projects

    def _projects_get_all(self, p: dict, worker: str) -> dict:
        found = list(self.projects.values())
        if p.get("id"):
            ids = set(_as_list(p["id"]))
            found = [x for x in found if x["id"] in ids]
        if p.get("name"):
            found = [x for x in found if re.search(p["name"], x["name"])]
        return {"projects": [_project(x, p.get("only_fields")) for x in found]}

    _projects_get_all_ex = _projects_get_all

    def _projects_create(self, p: dict, worker: str) -> dict:
        name = p.get("name") or ""
        if not name:
            raise ApiError(400, 12, "Validation error (name is required)")
        if any(x["name"] == name for x in self.projects.values()):
            raise ApiError(400, 403, f"Project with the same name already exists: name={name}")
        pid = uuid.uuid4().hex
        self.projects[pid] = {
            "id": pid,
            "name": name,
            "basename": name.rsplit("/", 1)[-1],
            "description": p.get("description", ""),
            "tags": p.get("tags", []),
            "system_tags": p.get("system_tags", []),
            "default_output_destination": p.get("default_output_destination"),
            "created": _now(),
            "user": "expflow-test-user",
            "company": "expflow-test-company",
        }
        return {"id": pid}

    def _projects_get_by_id(self, p: dict, worker: str) -> dict:
        project = self.projects.get(p.get("project", ""))
        if project is None:
            raise ApiError(400, INVALID_PROJECT_ID, f"Invalid project id: id={p.get('project')}")
        return {"project": copy.deepcopy(project)}

    # ----------------------------------------------------------------------- tasks

    def _task(self, task_id: str) -> dict:
        task = self._tasks.get(task_id or "")
        if task is None:
            raise ApiError(400, INVALID_TASK_ID, f"Invalid task id: id={task_id}")
        return task

    def _set_status(self, task: dict, status: str, reason: str, message: str) -> None:
        now = _now()
        task.update(
            status=status,
            status_reason=reason or "",
            status_message=message or "",
            status_changed=now,
            last_update=now,
            last_change=now,
        )
        if status == "in_progress" and not task.get("started"):
            task["started"] = now
        if status in ("completed", "failed", "stopped"):
            task["completed"] = now
        self.history[task["id"]].append((status, time.monotonic()))

    def _check_status(self, task: dict, action: str, force: bool) -> None:
        allowed = _ALLOWED_FROM[action]
        if not force and task["status"] not in allowed:
            raise ApiError(
                400,
                INVALID_TASK_STATUS,
                f"Invalid task status (cannot {action} a task in status {task['status']}, "
                f"expected one of {sorted(allowed)}): task={task['id']}",
            )

    def _fields(self, task: dict) -> dict:
        return {
            "status": task["status"],
            "status_reason": task["status_reason"],
            "status_message": task["status_message"],
            "status_changed": task["status_changed"],
            "last_update": task["last_update"],
            "execution.queue": task["execution"].get("queue"),
        }

    def _tasks_create(self, p: dict, worker: str) -> dict:
        if not p.get("name"):
            raise ApiError(400, 12, "Validation error (name is required)")
        if p.get("project") and p["project"] not in self.projects:
            raise ApiError(400, INVALID_PROJECT_ID, f"Invalid project id: id={p['project']}")
        now = _now()
        tid = uuid.uuid4().hex
        task = {
            "id": tid,
            "name": p["name"],
            "type": p.get("type", "training"),
            "status": "created",
            "status_reason": "",
            "status_message": "",
            "status_changed": now,
            "project": p.get("project"),
            "parent": p.get("parent"),
            "comment": "",
            "tags": [],
            "system_tags": [],
            "created": now,
            "started": None,
            "completed": None,
            "last_update": now,
            "last_change": now,
            "last_worker": None,
            "last_iteration": 0,
            "last_metrics": {},
            "active_duration": 0,
            "user": "expflow-test-user",
            "company": "expflow-test-company",
            "script": {
                "binary": "python",
                "repository": "",
                "branch": "",
                "tag": "",
                "version_num": "",
                "entry_point": "",
                "working_dir": "",
                "requirements": {},
                "diff": "",
            },
            "execution": {
                "queue": None,
                "parameters": {},
                "model_desc": {},
                "artifacts": [],
                "docker_cmd": None,
                "framework": None,
            },
            "output": {"destination": None, "result": None, "error": None, "model": None},
            "models": {"input": [], "output": []},
            "hyperparams": {},
            "configuration": {},
            "runtime": {},
            "container": {},
        }
        fields = {k: v for k, v in p.items() if k not in ("id", "status")}
        _merge(task, fields)
        self._tasks[tid] = task
        self.history[tid].append(("created", time.monotonic()))
        return {"id": tid}

    def _tasks_get_by_id(self, p: dict, worker: str) -> dict:
        return {"task": copy.deepcopy(self._task(p.get("task")))}

    def _tasks_get_all(self, p: dict, worker: str) -> dict:
        found = list(self._tasks.values())
        if p.get("id"):
            ids = set(_as_list(p["id"]))
            found = [t for t in found if t["id"] in ids]
        if p.get("name"):
            found = [t for t in found if re.search(p["name"], t["name"])]
        if p.get("project"):
            projects = set(_as_list(p["project"]))
            found = [t for t in found if t.get("project") in projects]
        if p.get("status"):
            statuses = set(_as_list(p["status"]))
            found = [t for t in found if t["status"] in statuses]
        if p.get("type"):
            types = set(_as_list(p["type"]))
            found = [t for t in found if t["type"] in types]
        if p.get("tags"):
            found = [t for t in found if _tags_match(t.get("tags", []), _as_list(p["tags"]))]
        if p.get("system_tags"):
            wanted = _as_list(p["system_tags"])
            found = [t for t in found if _tags_match(t.get("system_tags", []), wanted)]
        if p.get("parent"):
            found = [t for t in found if t.get("parent") == p["parent"]]
        for order in reversed(_as_list(p.get("order_by"))):
            key = order.lstrip("-")
            found.sort(key=lambda t, k=key: str(t.get(k) or ""), reverse=order.startswith("-"))
        if p.get("page_size"):
            size, page = int(p["page_size"]), int(p.get("page") or 0)
            found = found[page * size : (page + 1) * size]
        return {"tasks": [_project(t, p.get("only_fields")) for t in found]}

    _tasks_get_all_ex = _tasks_get_all

    def _tasks_edit(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        fields = {k: v for k, v in p.items() if k not in ("task", "force", "id")}
        _merge(task, fields)
        task["last_update"] = task["last_change"] = _now()
        return {"updated": 1, "fields": fields}

    def _tasks_enqueue(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        queue_id = p.get("queue")
        if not queue_id and p.get("queue_name"):
            queue_id = next(
                (q["id"] for q in self.queues.values() if q["name"] == p["queue_name"]), None
            )
        if not queue_id:
            queue_id = self._queues_get_default({}, worker)["id"]
        queue = self.queues.get(queue_id)
        if queue is None:
            raise ApiError(400, INVALID_QUEUE_ID, f"Invalid queue id: id={queue_id}")
        self._check_status(task, "enqueue", bool(p.get("force")))
        task["execution"]["queue"] = queue_id
        queue["entries"].append({"task": task["id"], "added": _now()})
        self._set_status(task, "queued", p.get("status_reason", ""), p.get("status_message", ""))
        return {"queued": 1, "updated": 1, "fields": self._fields(task)}

    def _dequeue(self, task: dict) -> bool:
        queue = self.queues.get(task["execution"].get("queue") or "")
        before = len(queue["entries"]) if queue else 0
        if queue:
            queue["entries"] = [e for e in queue["entries"] if e["task"] != task["id"]]
        return bool(queue) and len(queue["entries"]) < before

    def _tasks_dequeue(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        if task["status"] != "queued":
            raise ApiError(
                400, INVALID_TASK_STATUS, f"Invalid task status (task is not queued): {task['id']}"
            )
        dequeued = self._dequeue(task)
        self._set_status(task, "created", p.get("status_reason", ""), p.get("status_message", ""))
        return {"dequeued": int(dequeued), "updated": 1, "fields": self._fields(task)}

    def _status_call(self, p: dict, worker: str, action: str, status: str) -> dict:
        task = self._task(p.get("task"))
        self._check_status(task, action, bool(p.get("force")))
        if action == "started" and worker:
            task["last_worker"] = worker
        if status != "queued" and task["status"] == "queued":
            self._dequeue(task)
        self._set_status(task, status, p.get("status_reason", ""), p.get("status_message", ""))
        return {action: 1, "updated": 1, "fields": self._fields(task)}

    def _tasks_started(self, p: dict, worker: str) -> dict:
        return self._status_call(p, worker, "started", "in_progress")

    def _tasks_stopped(self, p: dict, worker: str) -> dict:
        return self._status_call(p, worker, "stopped", "stopped")

    def _tasks_completed(self, p: dict, worker: str) -> dict:
        return self._status_call(p, worker, "completed", "completed")

    def _tasks_failed(self, p: dict, worker: str) -> dict:
        return self._status_call(p, worker, "failed", "failed")

    def _tasks_close(self, p: dict, worker: str) -> dict:
        return self._status_call(p, worker, "close", "closed")

    def _tasks_publish(self, p: dict, worker: str) -> dict:
        return self._status_call(p, worker, "publish", "published")

    def _tasks_stop(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        if not p.get("force") and task["status"] not in ("in_progress", "queued"):
            raise ApiError(
                400,
                INVALID_TASK_STATUS,
                f"Invalid task status (cannot stop a task in status {task['status']}): "
                f"{task['id']}",
            )
        queued = task["status"] == "queued"
        seen = task.get("last_worker") and self._seconds_since_update(task) < WORKER_TIMEOUT_S
        reason = p.get("status_reason", "")
        if queued or not seen or "development" in task.get("system_tags", []):
            if queued:
                self._dequeue(task)
            self._set_status(task, "stopped", reason, "Stopped by expflow test user")
        else:
            # The task's agent sees "stopping", kills the process and calls tasks.stopped.
            task.update(status_reason=reason, status_message="stopping", last_update=_now())
        return {"stopped": 1, "updated": 1, "fields": self._fields(task)}

    def _seconds_since_update(self, task: dict) -> float:
        then = datetime.fromisoformat(task["last_update"])
        return (datetime.now(UTC) - then).total_seconds()

    def _tasks_reset(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        self._dequeue(task)
        task["execution"]["queue"] = None
        self._set_status(task, "created", "reset", "")
        return {"updated": 1, "fields": self._fields(task)}

    def _tasks_delete(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        if task["status"] == "in_progress" and not p.get("force"):
            raise ApiError(400, INVALID_TASK_STATUS, f"Task is in progress: {task['id']}")
        self._dequeue(task)
        del self._tasks[task["id"]]
        return {"deleted": 1}

    def _tasks_ping(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        task["last_update"] = _now()
        if worker:
            task["last_worker"] = worker
        return {}

    def _tasks_set_requirements(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        task["script"]["requirements"] = p.get("requirements") or {}
        return {"updated": 1, "fields": {}}

    def _tasks_add_or_update_artifacts(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        artifacts = task["execution"].setdefault("artifacts", [])
        for new in p.get("artifacts", []):
            key = (new.get("key"), new.get("mode", "output"))
            artifacts[:] = [a for a in artifacts if (a.get("key"), a.get("mode", "output")) != key]
            artifacts.append(new)
        return {"updated": 1}

    def _tasks_get_hyper_params(self, p: dict, worker: str) -> dict:
        out = []
        for tid in _as_list(p.get("tasks")):
            task = self._task(tid)
            flat = [
                dict(param, section=section, name=name)
                for section, params in task.get("hyperparams", {}).items()
                for name, param in params.items()
            ]
            out.append({"task": tid, "hyperparams": flat})
        return {"params": out}

    def _tasks_edit_hyper_params(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        if p.get("replace_hyperparams") == "all":
            task["hyperparams"] = {}
        for param in p.get("hyperparams", []):
            section = task["hyperparams"].setdefault(param.get("section", "General"), {})
            section[param["name"]] = dict(param)
        return {"updated": 1}

    def _tasks_get_configurations(self, p: dict, worker: str) -> dict:
        out = []
        for tid in _as_list(p.get("tasks")):
            task = self._task(tid)
            names = set(_as_list(p.get("names")))
            items = [
                dict(v, name=k)
                for k, v in task.get("configuration", {}).items()
                if not names or k in names
            ]
            out.append({"task": tid, "configuration": items})
        return {"configurations": out}

    def _tasks_edit_configuration(self, p: dict, worker: str) -> dict:
        task = self._task(p.get("task"))
        if p.get("replace_configuration"):
            task["configuration"] = {}
        for item in p.get("configuration", []):
            task["configuration"][item["name"]] = dict(item)
        return {"updated": 1}

    # ---------------------------------------------------------------------- queues

    def _queues_create(self, p: dict, worker: str) -> dict:
        name = p.get("name") or ""
        if any(q["name"] == name for q in self.queues.values()):
            raise ApiError(400, QUEUE_NAME_EXISTS, f"Queue with this name already exists: {name}")
        qid = uuid.uuid4().hex
        self.queues[qid] = {
            "id": qid,
            "name": name,
            "display_name": name,
            "tags": p.get("tags", []),
            "system_tags": p.get("system_tags", []),
            "entries": [],
            "metadata": {},
            "created": _now(),
            "user": "expflow-test-user",
            "company": "expflow-test-company",
        }
        return {"id": qid}

    def _queues_get_all(self, p: dict, worker: str) -> dict:
        found = list(self.queues.values())
        if p.get("id"):
            ids = set(_as_list(p["id"]))
            found = [q for q in found if q["id"] in ids]
        if p.get("name"):
            found = [q for q in found if re.search(p["name"], q["name"])]
        if p.get("tags"):
            found = [q for q in found if _tags_match(q.get("tags", []), _as_list(p["tags"]))]
        return {"queues": [_project(q, p.get("only_fields")) for q in found]}

    _queues_get_all_ex = _queues_get_all

    def _queues_get_by_id(self, p: dict, worker: str) -> dict:
        queue = self.queues.get(p.get("queue") or "")
        if queue is None:
            raise ApiError(400, INVALID_QUEUE_ID, f"Invalid queue id: id={p.get('queue')}")
        return {"queue": copy.deepcopy(queue)}

    def _queues_get_default(self, p: dict, worker: str) -> dict:
        for q in self.queues.values():
            if "default" in q.get("system_tags", []) or q["name"] == "default":
                return {"id": q["id"], "name": q["name"]}
        raise ApiError(400, 703, "No default queue found")

    def _queues_get_next_task(self, p: dict, worker: str) -> dict:
        queue = self.queues.get(p.get("queue") or "")
        if queue is None:
            raise ApiError(400, INVALID_QUEUE_ID, f"Invalid queue id: id={p.get('queue')}")
        while queue["entries"]:
            entry = queue["entries"].pop(0)
            task = self._tasks.get(entry["task"])
            if task is None or task["status"] != "queued":
                continue  # deleted or no longer queued: skipped, as the real server does
            out: dict = {"entry": entry}
            if p.get("get_task_info"):
                out["task_info"] = {"company": task["company"], "user": task["user"]}
            return out
        return {}

    # --------------------------------------------------------------------- workers

    def _workers_register(self, p: dict, worker: str) -> dict:
        wid = p.get("worker") or worker
        self.workers[wid] = {
            "id": wid,
            "queues": _as_list(p.get("queues")),
            "tags": p.get("tags", []),
            "register_time": _now(),
            "last_activity_time": _now(),
            "task": None,
        }
        return {}

    def _workers_unregister(self, p: dict, worker: str) -> dict:
        self.workers.pop(p.get("worker") or worker, None)
        return {}

    def _workers_status_report(self, p: dict, worker: str) -> dict:
        wid = p.get("worker") or worker
        record = self.workers.setdefault(wid, {"id": wid, "queues": [], "tags": []})
        record["last_activity_time"] = _now()
        record["task"] = p.get("task")
        task = self._tasks.get(p.get("task") or "")
        if task is not None:
            task["last_worker"] = wid
            task["last_update"] = _now()
        return {}

    def _workers_get_all(self, p: dict, worker: str) -> dict:
        return {"workers": copy.deepcopy(list(self.workers.values()))}

    def _workers_get_runtime_properties(self, p: dict, worker: str) -> dict:
        return {"runtime_properties": []}

    def _workers_set_runtime_properties(self, p: dict, worker: str) -> dict:
        return {}

    # ---------------------------------------------------------------------- events

    def _events_add_batch(self, p: dict, worker: str) -> dict:
        added = 0
        for event in p.get("events", []):
            task = self._tasks.get(event.get("task") or "")
            if task is None:
                continue
            self.events[task["id"]].append(event)
            added += 1
            if event.get("type") == "training_stats_scalar":
                metric, variant = event.get("metric", ""), event.get("variant", "")
                value = event.get("value")
                entry = (
                    task["last_metrics"]
                    .setdefault(metric, {})
                    .setdefault(variant, {"metric": metric, "variant": variant})
                )
                entry["value"] = value
                entry["min_value"] = min(entry.get("min_value", value), value)
                entry["max_value"] = max(entry.get("max_value", value), value)
                task["last_iteration"] = max(task["last_iteration"], int(event.get("iter") or 0))
            task["last_update"] = _now()
        return {"added": added, "errors": 0, "errors_info": {}}

    def _events_get_task_log(self, p: dict, worker: str) -> dict:
        self._task(p.get("task"))
        logs = [e for e in self.events[p["task"]] if e.get("type") == "log"]
        return {"events": copy.deepcopy(logs), "returned": len(logs), "total": len(logs)}

    def _events_scalar_metrics_iter_histogram(self, p: dict, worker: str) -> dict:
        self._task(p.get("task"))
        out: dict = {}
        for metric, variants in self.scalars(p["task"]).items():
            out[metric] = {
                v: {"name": v, "x": [i for i, _ in pts], "y": [y for _, y in pts]}
                for v, pts in variants.items()
            }
        return out

    def _events_get_scalar_metrics_and_variants(self, p: dict, worker: str) -> dict:
        self._task(p.get("task"))
        return {
            "metrics": {
                m: {v: {"metric": m, "variant": v} for v in variants}
                for m, variants in self.scalars(p["task"]).items()
            }
        }

    # ----------------------------------------------------------------- users/server

    def _users_get_current_user(self, p: dict, worker: str) -> dict:
        return {
            "user": {
                "id": "expflow-test-user",
                "name": "expflow test",
                "company": {"id": "expflow-test-company", "name": "expflow"},
                "role": "user",
            },
            "getting_started": {},
            "settings": {},
        }

    def _server_info(self, p: dict, worker: str) -> dict:
        return {"version": self.server_version, "build": "", "commit": "", "uid": "loopback"}
