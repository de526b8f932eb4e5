"""The `clearml` work pool: each flow run becomes a ClearML task that `clearml-agent` runs.

    prefect work-pool create expflow-clearml --type clearml
    prefect worker start --pool expflow-clearml --type clearml
    clearml-agent daemon --queue default          # on the machines that do the work

For every flow run the worker creates a ClearML task whose script is a small Python
launcher (``prefect_flow_run.py``, stored as the task's literal script, so the agent
needs no git repository), enqueues it on the pool's ``queue`` and follows it:

* the launcher sets Prefect's environment (``PREFECT_API_URL``,
  ``PREFECT__FLOW_RUN_ID``, the deployment's ``env``) and runs
  ``python -m prefect flow-run execute``, which reports the flow run's own states;
  it then exits 0 when the flow run completed, 1 when it failed and 254 when it was
  cancelled, which clearml-agent records as completed, failed and stopped;
* cancelling the flow run in Prefect (UI, ``prefect flow-run cancel``,
  ``expflow runs cancel``) aborts the ClearML task (``tasks.stop``; a queued task is
  dequeued first), and the flow run ends Cancelled once the agent has stopped it;
* a task aborted in ClearML (web UI, ``Task.mark_stopped``) ends the flow run
  Cancelled; a task that fails before the flow run reported a final state ends it
  Crashed with the task id and ClearML's reason.

Secrets stay out of ClearML: environment variables whose names look secret
(``PREFECT_API_KEY``, ``*_TOKEN``, ``*PASSWORD*``, ``*AUTH*``; see
:mod:`expflow_flows.secrets`) or whose values carry URL credentials are never written
into the task. The flow run's log names the ones left out; the agent's own
environment must supply them.

The worker reads ClearML's usual configuration (``~/clearml.conf``,
``CLEARML_CONFIG_FILE``, ``CLEARML_API_HOST`` and the ``CLEARML_API_*_KEY`` variables)
unless the pool's ``clearml_config_file`` names a file. The ClearML SDK is imported
only when a flow run is submitted: Prefect imports this module in every worker and in
the server, whatever the pool type.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Literal, get_args

import anyio
import anyio.abc
from prefect.exceptions import InfrastructureNotFound, ObjectNotFound
from prefect.states import Cancelled, Crashed
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)
from pydantic import Field, field_validator

from expflow_flows.errors import ExpflowError
from expflow_flows.secrets import is_secret_key

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

MISSING_SDK = "the clearml worker needs the ClearML SDK: pip install 'expflow-flows[clearml]'"

TaskType = Literal[
    "training",
    "testing",
    "inference",
    "data_processing",
    "application",
    "monitor",
    "controller",
    "optimizer",
    "service",
    "qc",
    "custom",
]
TASK_TYPES = get_args(TaskType)
# ClearML task statuses after which the agent will not run the task (again).
DONE_STATUSES = frozenset({"completed", "published", "failed", "stopped", "closed"})
SUCCESS_STATUSES = frozenset({"completed", "published"})
STOPPED_STATUSES = frozenset({"stopped", "closed"})
# What the launcher exits with when the flow run was cancelled: clearml-agent reports
# exit status 254 (256 + its "interrupted" code -2) as a stopped task.
EXIT_CANCELLED = 254
ENTRY_POINT = "prefect_flow_run.py"

# Words that mark a secret beyond expflow_flows.secrets (PREFECT_API_AUTH_STRING holds a
# password; cloud SDKs name theirs *_CREDENTIALS).
_EXTRA_SECRET_WORDS = ("auth", "credential", "cookie", "private")
_URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
# The SDK's default is 240 retries with backoff up to 120 s: hours against a dead server.
_MAX_RETRIES = 3
_MAX_BACKOFF_S = 10.0


class ClearMLError(ExpflowError):
    """A ClearML call failed; the message is one line a user can act on."""


class ClearMLTaskGone(ClearMLError):
    """The ClearML server no longer knows the task."""


class _ClearMLFields:
    """Documentation of the variables, shared by configuration and variables classes."""

    queue = "ClearML queue (name or id) the tasks go to; a clearml-agent must serve it."
    project = "ClearML project of the tasks (created when missing)."
    task_type = "ClearML task type (training, data_processing, application, custom, ...)."
    tags = "Tags of the ClearML task, added to 'prefect'."
    poll_interval = "Seconds between checks of the task's status and the flow run's state."
    cancel_grace_seconds = (
        "Seconds an agent has to stop an aborted task before the worker marks it stopped."
    )
    working_dir = "Folder the flow run starts in on the agent's machine. Empty: the agent's."
    requirements = (
        "pip requirements the agent installs for the task. Empty: the agent's Python "
        "(CLEARML_AGENT_SKIP_PIP_VENV_INSTALL) must already have prefect and the flow's code."
    )
    clearml_config_file = (
        "clearml.conf the worker uses. Empty: ClearML's usual lookup (CLEARML_CONFIG_FILE, "
        "~/clearml.conf, CLEARML_API_HOST and CLEARML_API_ACCESS_KEY/SECRET_KEY)."
    )


def _none_is_empty(value: Any) -> Any:
    return [] if value is None else value


class ClearMLJobConfiguration(BaseJobConfiguration):
    queue: str = Field(default="default", min_length=1)
    project: str = Field(default="expflow", min_length=1)
    task_type: TaskType = Field(default="custom")
    tags: list[str] = Field(default_factory=list)
    poll_interval: float = Field(default=5.0, gt=0)
    cancel_grace_seconds: float = Field(default=60.0, ge=0)
    working_dir: str | None = Field(default=None)
    requirements: list[str] = Field(default_factory=list)
    clearml_config_file: str | None = Field(default=None)

    @field_validator("tags", "requirements", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _none_is_empty(value)


class ClearMLVariables(BaseVariables):
    queue: str = Field(default="default", min_length=1, description=_ClearMLFields.queue)
    project: str = Field(
        default="expflow", min_length=1, title="Project", description=_ClearMLFields.project
    )
    task_type: TaskType = Field(
        default="custom", title="Task type", description=_ClearMLFields.task_type
    )
    tags: list[str] = Field(default_factory=list, description=_ClearMLFields.tags)
    poll_interval: float = Field(
        default=5.0, gt=0, title="Poll interval (s)", description=_ClearMLFields.poll_interval
    )
    cancel_grace_seconds: float = Field(
        default=60.0,
        ge=0,
        title="Abort grace period (s)",
        description=_ClearMLFields.cancel_grace_seconds,
    )
    working_dir: str | None = Field(
        default=None, title="Working directory", description=_ClearMLFields.working_dir
    )
    requirements: list[str] = Field(
        default_factory=list, title="pip requirements", description=_ClearMLFields.requirements
    )
    clearml_config_file: str | None = Field(
        default=None, title="ClearML config file", description=_ClearMLFields.clearml_config_file
    )


class ClearMLWorkerResult(BaseWorkerResult):
    """The ClearML task id (`identifier`), its last status, and a status code: 1 when the
    task failed, else 0 (completed, or stopped with the flow run's state settled)."""

    clearml_status: str = ""


# --------------------------------------------------------------------------- the task


def is_secret_variable(name: str, value: str | None) -> bool:
    """True when an environment variable must not be written into a ClearML task."""
    lowered = name.lower()
    if is_secret_key(name) or any(word in lowered for word in _EXTRA_SECRET_WORDS):
        return True
    return bool(value and _URL_CREDENTIALS.search(value))


def split_environment(env: dict[str, str | None]) -> tuple[dict[str, str], list[str]]:
    """The variables that may go into the task, and the names of those left out."""
    kept: dict[str, str] = {}
    left_out: list[str] = []
    for name, value in sorted(env.items()):
        if value is None:
            continue
        if is_secret_variable(name, value):
            left_out.append(name)
        else:
            kept[name] = value
    return kept, left_out


_LAUNCHER = '''\
# Prefect flow run {flow_run_id}, run by clearml-agent for expflow-flows' clearml worker.
# Secret-looking variables are not written here: the agent's environment supplies them.
import json
import os
import shlex
import subprocess
import sys

FLOW_RUN_ID = {flow_run_id_literal}
COMMAND = {command_literal}
WORKING_DIR = {working_dir_literal}
ENV = json.loads({env_literal})


def final_state():
    """The flow run's state type after the command, or None when Prefect cannot say."""
    if not os.environ.get("PREFECT_API_URL"):
        return None  # asking would start a temporary local server instead
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(FLOW_RUN_ID).state
        return state.type.value if state is not None else None
    except Exception as exc:
        print(f"expflow: cannot read the flow run's state: {{exc}}", file=sys.stderr)
        return None


def main():
    os.environ.update(ENV)
    if WORKING_DIR:
        os.chdir(os.path.expanduser(WORKING_DIR))
    argv = shlex.split(COMMAND)
    if argv and argv[0] == "prefect":
        argv = [sys.executable, "-m", "prefect", *argv[1:]]
    print(f"expflow: flow run {{FLOW_RUN_ID}}: {{shlex.join(argv)}}", flush=True)
    code = subprocess.call(argv)
    state = final_state()
    print(f"expflow: command exited {{code}}; flow run state {{state}}", flush=True)
    if state in ("CANCELLED", "CANCELLING"):
        sys.exit({exit_cancelled})
    if state == "COMPLETED":
        sys.exit(0)
    if state in ("FAILED", "CRASHED"):
        sys.exit(code or 1)
    sys.exit(code)


if __name__ == "__main__":
    main()
'''


def launcher_script(flow_run_id: str, command: str, env: dict[str, str], working_dir: str | None):
    """The Python script the agent runs for one flow run. Pure: same inputs, same text."""
    return _LAUNCHER.format(
        flow_run_id=flow_run_id,
        flow_run_id_literal=repr(flow_run_id),
        command_literal=repr(command),
        working_dir_literal=repr(working_dir or ""),
        env_literal=repr(json.dumps(env, sort_keys=True)),
        exit_cancelled=EXIT_CANCELLED,
    )


def task_fields(flow_run: FlowRun, configuration: ClearMLJobConfiguration) -> tuple[dict, list]:
    """The `tasks.create` fields of a flow run's task (without project), and the names of
    the environment variables left out because they look secret."""
    flow_run_id = str(flow_run.id)
    env, left_out = split_environment(configuration.env)
    env.setdefault("PREFECT__FLOW_RUN_ID", flow_run_id)
    command = configuration.command or "prefect flow-run execute"
    labels = configuration.labels or {}

    def param(name: str, value: str, description: str) -> dict:
        return {
            "section": "Prefect",
            "name": name,
            "value": value,
            "type": "str",
            "description": description,
        }

    hyperparams = {
        "Prefect": {
            "flow_run_id": param("flow_run_id", flow_run_id, "Prefect flow run id"),
            "flow_run_name": param("flow_run_name", flow_run.name or "", "Prefect flow run"),
            "flow_name": param("flow_name", labels.get("prefect.io/flow-name", ""), "flow"),
            "deployment": param(
                "deployment", labels.get("prefect.io/deployment-name", ""), "deployment"
            ),
            "work_pool": param("work_pool", labels.get("prefect.io/work-pool-name", ""), "pool"),
        }
    }
    fields = {
        "name": configuration.name or flow_run.name or f"flow-run-{flow_run_id}",
        "type": configuration.task_type,
        "comment": f"Prefect flow run {flow_run_id}, submitted by expflow-flows' clearml worker",
        "tags": list(dict.fromkeys(["prefect", *configuration.tags])),
        "script": {
            "binary": "python3",
            "entry_point": ENTRY_POINT,
            "working_dir": ".",
            "repository": "",
            "diff": launcher_script(flow_run_id, command, env, configuration.working_dir),
            "requirements": (
                {"pip": "\n".join(configuration.requirements)} if configuration.requirements else {}
            ),
        },
        "hyperparams": hyperparams,
    }
    return fields, left_out


# --------------------------------------------------------------------- the ClearML API


def _one_line(text: object, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


_CONFIG_LOCK = threading.Lock()


def _load_config(config_file: str | None):
    """ClearML's configuration: the SDK's own lookup, or one named file."""
    try:
        import clearml.config as sdk_config
        from clearml.backend_api import load_config
        from clearml.backend_config.defs import LOCAL_CONFIG_FILE_OVERRIDE_VAR
    except ImportError as exc:
        raise ClearMLError(MISSING_SDK) from exc

    if not config_file:
        return sdk_config.ConfigWrapper._init()
    path = os.path.expanduser(config_file)
    if not os.path.isfile(path):
        raise ClearMLError(
            f"ClearML config file {config_file!r} (the pool's clearml_config_file) does not exist"
        )
    # The SDK reads the file named by CLEARML_CONFIG_FILE; set it only while loading.
    with _CONFIG_LOCK:
        previous = LOCAL_CONFIG_FILE_OVERRIDE_VAR.get()
        LOCAL_CONFIG_FILE_OVERRIDE_VAR.set(path)
        try:
            return load_config(sdk_config.__file__.rsplit(os.sep, 1)[0])
        finally:
            if previous is None:
                LOCAL_CONFIG_FILE_OVERRIDE_VAR.pop()
            else:
                LOCAL_CONFIG_FILE_OVERRIDE_VAR.set(previous)


def _retries(config) -> dict:
    """The config's HTTP retry settings, capped so a dead server fails in seconds."""
    try:
        retries = dict(config.get("api.http.retries").as_plain_ordered_dict())
    except Exception:
        retries = {}
    for key in ("total", "connect", "read", "redirect", "status"):
        value = retries.get(key)
        retries[key] = _MAX_RETRIES if value is None else min(int(value), _MAX_RETRIES)
    retries["backoff_factor"] = min(float(retries.get("backoff_factor") or 0.5), 1.0)
    retries["backoff_max"] = min(float(retries.get("backoff_max") or _MAX_BACKOFF_S), 10.0)
    return retries


def _login_error(host: str, exc: Exception) -> str:
    """One line for a failed login: refused credentials, or why the server is unreachable."""
    text = _one_line(exc, 1000)
    refused = re.search(r"error (40[13]) from [^)]*\):\s*(.*)", text)
    if refused:
        return (
            f"the ClearML API server at {host} refused the credentials "
            f"(HTTP {refused.group(1)}: {refused.group(2)[:120]})"
        )
    errno = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    reason = errno.group(0) if errno else text[:200]
    return f"cannot reach the ClearML API server at {host}: {reason}"


class ClearMLApi:
    """The few ClearML REST calls the worker makes, through the SDK's authenticated session.

    Synchronous (the SDK is); the worker calls it from a thread.
    """

    def __init__(self, config_file: str | None = None) -> None:
        config = _load_config(config_file)
        try:
            from clearml.backend_api import Session
            from clearml.backend_api.session.defs import (
                ENV_ACCESS_KEY,
                ENV_AUTH_TOKEN,
                ENV_HOST,
                ENV_OFFLINE_MODE,
                ENV_SECRET_KEY,
            )
        except ImportError as exc:
            raise ClearMLError(MISSING_SDK) from exc

        where = f"clearml_config_file {config_file}" if config_file else "clearml.conf"
        if ENV_OFFLINE_MODE.get():
            raise ClearMLError("CLEARML_OFFLINE_MODE is set: the clearml worker needs a server")
        host = ENV_HOST.get() or config.get("api.api_server", None) or config.get("api.host", None)
        if not host:
            raise ClearMLError(
                "ClearML is not configured: no API server; set CLEARML_API_HOST or "
                f"api.api_server in {where} (or point CLEARML_CONFIG_FILE at a clearml.conf)"
            )
        has_keys = (ENV_ACCESS_KEY.get() or config.get("api.credentials.access_key", None)) and (
            ENV_SECRET_KEY.get() or config.get("api.credentials.secret_key", None)
        )
        if not has_keys and not ENV_AUTH_TOKEN.get():
            raise ClearMLError(
                "ClearML is not configured: no API credentials; set CLEARML_API_ACCESS_KEY "
                f"and CLEARML_API_SECRET_KEY or api.credentials in {where}"
            )
        self.host = str(host).rstrip("/")
        try:
            self.session = Session(config=config, http_retries_config=_retries(config))
        except Exception as exc:
            raise ClearMLError(_login_error(self.host, exc)) from exc
        try:
            self.web = Session.get_app_server_host(config=config).rstrip("/")
        except Exception:
            self.web = ""

    def call(self, service: str, action: str, **payload: Any) -> dict:
        """One REST call; the response's `data`, or ClearMLError with the server's message."""
        endpoint = f"{service}.{action}"
        try:
            response = self.session.send_request(service, action, method="post", json=payload)
        except Exception as exc:
            raise ClearMLError(
                f"ClearML {endpoint} at {self.host} failed: {_one_line(exc)}"
            ) from exc
        try:
            body = response.json()
            meta = body["meta"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ClearMLError(
                f"ClearML {endpoint} at {self.host} answered HTTP {response.status_code} "
                "without a ClearML envelope: is api_server the API server (port 8008)?"
            ) from exc
        if meta.get("result_code") != 200:
            message = f"ClearML {endpoint} failed: {_one_line(meta.get('result_msg'))}"
            if meta.get("result_subcode") == 101:  # invalid task id
                raise ClearMLTaskGone(message)
            raise ClearMLError(message)
        return body.get("data") or {}

    def queue_id(self, queue: str) -> str:
        """The id of a queue given by name (or id); one-line error naming the known ones."""
        queues = self.call("queues", "get_all", only_fields=["id", "name"]).get("queues", [])
        for q in queues:
            if queue in (q.get("name"), q.get("id")):
                return q["id"]
        known = ", ".join(sorted(str(q.get("name")) for q in queues)) or "none"
        raise ClearMLError(
            f"ClearML queue {queue!r} does not exist on {self.host}; known queues: {known}"
        )

    def project_id(self, name: str) -> str:
        """The id of a project, created when missing."""
        found = self.call("projects", "get_all", name=f"^{re.escape(name)}$", only_fields=["id"])
        for project in found.get("projects", []):
            return project["id"]
        created = self.call("projects", "create", name=name, description="Prefect flow runs")
        return created["id"]

    def create_task(self, fields: dict, project: str) -> tuple[str, str]:
        """Create a task in a project (made when missing); its id and the project's."""
        project_id = self.project_id(project)
        created = self.call("tasks", "create", project=project_id, **fields)
        return created["id"], project_id

    def enqueue(self, task_id: str, queue_id: str) -> None:
        self.call("tasks", "enqueue", task=task_id, queue=queue_id, status_reason="Prefect")

    def delete(self, task_id: str) -> None:
        self.call("tasks", "delete", task=task_id, force=True)

    def status(self, task_id: str) -> tuple[str, str]:
        """The task's status and status reason/message."""
        found = self.call(
            "tasks",
            "get_all",
            id=[task_id],
            only_fields=["id", "status", "status_reason", "status_message", "project"],
        ).get("tasks", [])
        if not found:
            raise ClearMLTaskGone(f"ClearML has no task {task_id} (deleted?)")
        task = found[0]
        reason = task.get("status_reason") or task.get("status_message") or ""
        return str(task.get("status", "unknown")), str(reason)

    def abort(self, task_id: str, *, force: bool = False) -> str:
        """Abort a task as ClearML's web UI does; returns the status it had.

        A queued task is dequeued first so no agent picks it up afterwards. A running
        one is asked to stop (`tasks.stop`: its agent kills the process and reports it
        stopped); with `force` it is marked stopped at once (`tasks.stopped`), for an
        agent that no longer answers.
        """
        status, _ = self.status(task_id)
        if status in DONE_STATUSES:
            return status
        reason = "flow run cancelled in Prefect"
        if status == "queued":
            try:
                self.call("tasks", "dequeue", task=task_id, status_reason=reason)
            except ClearMLTaskGone:
                raise
            except ClearMLError:
                pass  # an agent pulled it meanwhile: stop it as a running task
        if force:
            self.call("tasks", "stopped", task=task_id, force=True, status_reason=reason)
        else:
            # force: a dequeued (draft) task may be stopped too, not only a running one.
            self.call("tasks", "stop", task=task_id, force=True, status_reason=reason)
        return status

    def web_url(self, task_id: str, project_id: str = "*") -> str:
        """The task's page in ClearML's web app ("" when the web server is unknown)."""
        if not self.web:
            return ""
        from clearml.backend_api import Session

        # Web apps of API 2.31 and later call experiments "tasks" in their addresses.
        kind = "tasks" if Session.check_min_api_server_version("2.31") else "experiments"
        return f"{self.web}/projects/{project_id}/{kind}/{task_id}/output/log"


# ------------------------------------------------------------------------- the worker


class ClearMLWorker(BaseWorker[ClearMLJobConfiguration, ClearMLVariables, ClearMLWorkerResult]):
    """Runs each flow run as a ClearML task served by clearml-agent (see the module docstring)."""

    type = "clearml"
    job_configuration = ClearMLJobConfiguration
    job_configuration_variables = ClearMLVariables
    _description = (
        "Run each flow run as a ClearML task on a ClearML queue served by clearml-agent; "
        "cancelling the flow run aborts the task."
    )
    _display_name = "ClearML (expflow-flows)"
    _documentation_url = "https://clear.ml/docs/latest/docs/clearml_agent"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._apis: dict[str, ClearMLApi] = {}
        self._apis_lock = threading.Lock()

    def _api(self, config_file: str | None) -> ClearMLApi:
        """One authenticated session per config file, made on first use (in a thread)."""
        key = config_file or ""
        with self._apis_lock:
            if key not in self._apis:
                self._apis[key] = ClearMLApi(config_file)
            return self._apis[key]

    async def _call(self, fn, *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ClearMLJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> ClearMLWorkerResult:
        """Create, enqueue and follow the flow run's ClearML task.

        Environment variables that look secret are not written into the task: the
        agent's own environment must supply them (PREFECT_API_KEY and the like).
        """
        logger = self.get_flow_run_logger(flow_run)
        api: ClearMLApi = await self._call(self._api, configuration.clearml_config_file)
        queue_id = await self._call(api.queue_id, configuration.queue)
        fields, left_out = task_fields(flow_run, configuration)
        task_id, project_id = await self._call(api.create_task, fields, configuration.project)
        try:
            await self._call(api.enqueue, task_id, queue_id)
        except Exception:
            try:
                await self._call(api.delete, task_id)
            except Exception:
                pass
            raise
        submitted = time.monotonic()
        url = api.web_url(task_id, project_id)
        logger.info(
            f"ClearML task {task_id} queued on {configuration.queue!r} "
            f"(project {configuration.project!r})" + (f": {url}" if url else "")
        )
        if left_out:
            logger.info(
                "Not written into the ClearML task (secret-looking): "
                f"{', '.join(left_out)}; the agent's environment must supply them"
            )
        if task_status is not None:
            task_status.started(task_id)

        status, reason, aborted = await self._follow(
            flow_run, configuration, api, task_id, submitted, logger
        )
        return await self._finish(flow_run, task_id, status, reason, aborted, logger)

    async def _follow(self, flow_run, configuration, api: ClearMLApi, task_id, submitted, logger):
        """Poll the task until it is done; abort it when the flow run is being cancelled.

        Returns the task's last status and reason and when the abort was sent (or None).
        """
        aborted: float | None = None
        forced = False
        seen_running = False
        unreachable = False
        while True:
            try:
                status, reason = await self._call(api.status, task_id)
                unreachable = False
            except ClearMLTaskGone as exc:
                return "deleted", str(exc), aborted
            except ClearMLError as exc:
                if not unreachable:
                    unreachable = True
                    logger.warning(f"Cannot ask ClearML about task {task_id}: {exc}; retrying")
                status, reason = "unknown", ""
            if status == "in_progress" and not seen_running:
                seen_running = True
                waited = time.monotonic() - submitted
                logger.info(f"ClearML task {task_id} in progress after {waited:.1f} s")
            if status in DONE_STATUSES:
                return status, reason, aborted
            if status == "created" and aborted is None:
                # Back to draft: dequeued or reset in ClearML; no agent will run it.
                return status, reason, aborted
            cancel = None
            try:
                state = (await self.client.read_flow_run(flow_run.id)).state
                if state is not None and (state.is_cancelling() or state.is_cancelled()):
                    cancel = "Flow run is cancelling"
            except ObjectNotFound:
                cancel = "Flow run was deleted"
            except Exception as exc:  # the Prefect API may be briefly away: ask again
                logger.warning(f"Cannot read the flow run's state: {exc}; retrying")
            if aborted is None and cancel:
                logger.info(f"{cancel}: aborting ClearML task {task_id}")
                if await self._abort(api, task_id, False, logger):
                    aborted = time.monotonic()
            elif (
                aborted is not None
                and not forced
                and time.monotonic() - aborted > configuration.cancel_grace_seconds
            ):
                logger.warning(
                    f"ClearML task {task_id} still {status} {configuration.cancel_grace_seconds:g}"
                    " s after the abort: marking it stopped"
                )
                forced = await self._abort(api, task_id, True, logger)
            await anyio.sleep(configuration.poll_interval)

    async def _abort(self, api: ClearMLApi, task_id: str, force: bool, logger) -> bool:
        """Abort the task; False (and a warning) when ClearML could not be told."""
        try:
            await self._call(api.abort, task_id, force=force)
        except ClearMLTaskGone:
            pass
        except ClearMLError as exc:
            logger.warning(f"Could not abort ClearML task {task_id}: {exc}; will retry")
            return False
        return True

    async def _finish(self, flow_run, task_id, status, reason, aborted, logger):
        """Make the flow run's final state match what happened to the task."""
        try:
            state = (await self.client.read_flow_run(flow_run.id)).state
        except ObjectNotFound:  # deleted in Prefect: nothing left to settle
            return ClearMLWorkerResult(identifier=task_id, status_code=0, clearml_status=status)
        final = state is not None and state.is_final()
        cancelling = state is not None and state.is_cancelling()
        why = f" ({reason})" if reason else ""

        if aborted is not None or cancelling:
            message = f"ClearML task {task_id} was aborted on request from Prefect"
            took = f" in {time.monotonic() - aborted:.1f} s" if aborted is not None else ""
            logger.info(f"{message}: task {status}{took}")
            if not final:
                await self.client.set_flow_run_state(
                    flow_run.id, Cancelled(message=message), force=True
                )
            # The flow run's state is settled: a non-zero code would make the base worker
            # propose Crashed on top of it.
            return ClearMLWorkerResult(identifier=task_id, status_code=0, clearml_status=status)

        if status in SUCCESS_STATUSES:
            # A paused or rescheduled flow run exits on purpose; Prefect runs it again later.
            waiting = state is not None and (state.is_paused() or state.is_scheduled())
            if not final and not waiting:
                await self.client.set_flow_run_state(
                    flow_run.id,
                    Crashed(
                        message=f"ClearML task {task_id} {status} but the flow run never "
                        "reported a final state"
                    ),
                    force=True,
                )
            return ClearMLWorkerResult(identifier=task_id, status_code=0, clearml_status=status)

        if status in STOPPED_STATUSES or status in ("created", "deleted"):
            if status == "created":
                message = f"ClearML task {task_id} was dequeued or reset in ClearML{why}"
            elif status == "deleted":
                message = f"ClearML task {task_id} was deleted in ClearML"
            else:
                message = f"ClearML task {task_id} was aborted in ClearML{why}"
            logger.info(message)
            if not final or state.is_crashed():
                await self.client.set_flow_run_state(
                    flow_run.id, Cancelled(message=message), force=True
                )
            return ClearMLWorkerResult(identifier=task_id, status_code=0, clearml_status=status)

        # failed (or a status this worker does not know)
        message = f"ClearML task {task_id} {status}{why}"
        logger.error(message)
        if not final:
            await self.client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
        return ClearMLWorkerResult(identifier=task_id, status_code=1, clearml_status=status)

    async def kill_infrastructure(
        self,
        infrastructure_pid: str,
        configuration: ClearMLJobConfiguration,
        grace_seconds: int = 30,
    ) -> None:
        """Abort (dequeue) a pending flow run's task; Prefect calls this for pending runs."""
        api: ClearMLApi = await self._call(self._api, configuration.clearml_config_file)
        try:
            await self._call(api.abort, str(infrastructure_pid))
        except ClearMLTaskGone as exc:
            raise InfrastructureNotFound(str(exc)) from exc
