"""LLM calls made inside a run: one JSON line each in ``<run_dir>/llm_calls.jsonl``.

A research agent that calls a model from inside a trainable or a step records each
call so that its model, token usage and cost stay with the run, the way metrics do:

* a callable trainable calls ``run.log_llm_call(model=..., input=..., output=...,
  usage={"input": 812, "output": 95}, cost_usd=0.0031)``;
* a script prints ``EXPFLOW_LLM {"model": "...", "usage": {...}, "cost_usd": ...}``
  (one line of JSON); the runner appends it to the same file.

The file is the record: the pipeline sums its costs into the experiment's
``llm_cost_usd`` metric (``expflow compare``, ``expflow runs show``), and the Langfuse
adapter turns each line into a generation under the step's span. Inputs stay as
given (they are the user's prompts), except that the values of secret-looking keys
in dict inputs, outputs and metadata are masked before anything is written.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.secrets import scrub

FILE_NAME = "llm_calls.jsonl"
LINE_RE = re.compile(r"^\s*EXPFLOW_LLM(?:\s+(?P<body>.*?))?\s*$")
FIELDS = (
    "model",
    "name",
    "input",
    "output",
    "usage",
    "cost_usd",
    "cost",
    "started",
    "ended",
    "latency_s",
    "model_parameters",
    "metadata",
    "error",
)
# OpenAI- and Anthropic-style token counts map onto Langfuse's input/output/total.
_USAGE_ALIASES = {
    "prompt_tokens": "input",
    "input_tokens": "input",
    "completion_tokens": "output",
    "output_tokens": "output",
    "total_tokens": "total",
}
# Model parameters that name token counts are not secrets, whatever scrub() thinks.
_TOKEN_PARAMS = ("max_tokens", "max_output_tokens", "max_completion_tokens", "max_new_tokens")


def _number(value: Any, what: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExpflowError(f"LLM call {what}={value!r} is not accepted; expected a number")
    if not math.isfinite(value) or value < 0:
        raise ExpflowError(f"LLM call {what}={value!r} is not accepted; expected a number >= 0")
    if integer and value != int(value):
        raise ExpflowError(f"LLM call {what}={value!r} is not accepted; expected a whole number")
    return int(value) if integer else float(value)


def _usage(raw: Any) -> dict[str, int]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ExpflowError(
            f"LLM call usage={raw!r} is not accepted; expected a mapping such as "
            '{"input": 812, "output": 95}'
        )
    out: dict[str, int] = {}
    for key, value in raw.items():
        name = _USAGE_ALIASES.get(str(key), str(key))
        out[name] = out.get(name, 0) + int(_number(value, f"usage[{key!r}]", integer=True))
    return out


def _cost(raw: Any, cost_usd: Any) -> dict[str, float]:
    """Langfuse's cost details (USD): ``total`` always, ``input``/``output`` when given."""
    out: dict[str, float] = {}
    if raw is not None:
        if not isinstance(raw, dict):
            raise ExpflowError(
                f"LLM call cost={raw!r} is not accepted; expected a mapping such as "
                '{"input": 0.002, "output": 0.001} (or give cost_usd)'
            )
        out = {str(k): _number(v, f"cost[{k!r}]") for k, v in raw.items()}
    if cost_usd is not None:
        out["total"] = _number(cost_usd, "cost_usd")
    elif out and "total" not in out:
        out["total"] = sum(out.values())
    return out


def normalise(raw: Any, *, now: float | None = None) -> dict[str, Any]:
    """One call as it is stored: checked, times filled in, secrets in dict values masked.

    Raises an ExpflowError naming the bad field and what is accepted.
    """
    if not isinstance(raw, dict):
        raise ExpflowError(f"an LLM call must be a JSON object, not {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in FIELDS)
    if unknown:
        raise ExpflowError(
            f"LLM call field {unknown[0]!r} is not known; accepted: {', '.join(FIELDS)}"
        )
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ExpflowError(f"LLM call model={model!r} is not accepted; expected the model name")
    name = raw.get("name") or "llm"
    if not isinstance(name, str):
        raise ExpflowError(f"LLM call name={name!r} is not accepted; expected text")
    for key in ("model_parameters", "metadata"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ExpflowError(f"LLM call {key}={raw[key]!r} is not accepted; expected a mapping")
    ended = raw.get("ended")
    if ended is None:  # logged right after the call returned
        ended = now if now is not None else time.time()
    ended = _number(ended, "ended")
    latency = raw.get("latency_s")
    started = raw.get("started")
    if started is not None:
        started = _number(started, "started")
    elif latency is not None:
        started = ended - _number(latency, "latency_s")
    else:
        started = ended
    if started > ended:
        raise ExpflowError(f"LLM call started={started!r} is after ended={ended!r}")
    call: dict[str, Any] = {
        "name": name,
        "model": model.strip(),
        "started": started,
        "ended": ended,
        "input": scrub(raw.get("input")),
        "output": scrub(raw.get("output")),
        "usage": _usage(raw.get("usage")),
        "cost": _cost(raw.get("cost"), raw.get("cost_usd")),
    }
    if raw.get("model_parameters"):
        call["model_parameters"] = scrub(raw["model_parameters"], keep=_TOKEN_PARAMS)
    if raw.get("metadata"):
        call["metadata"] = scrub(raw["metadata"])
    if raw.get("error"):
        call["error"] = str(raw["error"])
    return call


def parse_line(line: str) -> dict[str, Any] | None:
    """The call in an ``EXPFLOW_LLM {json}`` line; None if the line is not one.

    A line that is one but does not hold a valid call raises an ExpflowError.
    """
    if "EXPFLOW_LLM" not in line:
        return None
    match = LINE_RE.match(line)
    if not match:
        return None
    try:
        raw = json.loads(match.group("body") or "")
    except json.JSONDecodeError as exc:
        raise ExpflowError(
            f"EXPFLOW_LLM line is not valid JSON ({exc.msg}); expected one JSON object "
            "on the same line"
        ) from None
    return normalise(raw)


_append_lock = threading.Lock()


def append(run_dir: Path, call: dict[str, Any]) -> None:
    """Add one (already normalised) call to the run's file."""
    line = json.dumps(call, default=str, sort_keys=True) + "\n"
    # An agent may call models from several threads; one line must not tear another.
    with _append_lock, open(Path(run_dir) / FILE_NAME, "a", encoding="utf-8") as fh:
        fh.write(line)


def read(run_dir: Path | str) -> list[dict[str, Any]]:
    """The calls a run recorded, oldest first; a torn last line (a killed run) is skipped."""
    path = Path(run_dir) / FILE_NAME
    if not path.is_file():
        return []
    calls = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            call = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and call.get("model"):
            calls.append(call)
    return calls


def call_cost(call: dict[str, Any]) -> float:
    """A call's total cost in USD (0 when it gave none)."""
    cost = call.get("cost") or {}
    value = cost.get("total", sum(v for v in cost.values() if isinstance(v, (int, float))))
    return float(value) if isinstance(value, (int, float)) else 0.0


@dataclass
class Summary:
    """Calls, tokens and cost over a set of run folders."""

    calls: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    by_model: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Ledger metrics (``llm_cost_usd``, ``llm_calls``); none when no call was made."""
        if not self.calls:
            return {}
        return {"llm_cost_usd": round(self.cost_usd, 10), "llm_calls": float(self.calls)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {
            "calls": self.calls,
            "cost_usd": round(self.cost_usd, 10),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "by_model": {k: round(v, 10) for k, v in sorted(self.by_model.items())},
        }


def summarize(run_dirs: Iterable[Path | str | None]) -> Summary:
    """Add up the calls recorded in each run folder (missing folders count nothing)."""
    total = Summary()
    seen: set[Path] = set()
    for run_dir in run_dirs:
        if not run_dir:
            continue
        path = Path(run_dir).resolve()
        if path in seen:
            continue
        seen.add(path)
        for call in read(path):
            cost = call_cost(call)
            usage = call.get("usage") or {}
            total.calls += 1
            total.cost_usd += cost
            total.input_tokens += int(usage.get("input", 0) or 0)
            total.output_tokens += int(usage.get("output", 0) or 0)
            model = str(call.get("model"))
            total.by_model[model] = total.by_model.get(model, 0.0) + cost
    return total
