"""Trainables used by the tests: each behaves in one way a real training function can."""

from __future__ import annotations

import math
import time
import warnings


def quadratic(params, run):
    """Minimum at x=2; reports a converging value each step so pruners have data."""
    x = float(params["x"])
    steps = run.budget.epochs or 3
    loss = (x - 2.0) ** 2
    for step in range(1, steps + 1):
        run.report(step, loss=loss + 1.0 / step)
    print(f"x={x} loss={loss}")
    (run.run_dir / "model.txt").write_text(str(x))
    return {"loss": loss, "score": -loss}


def tradeoff(params, run):
    """Two objectives that pull apart: loss is lowest at x=2, cost grows with |x|."""
    x = float(params["x"])
    steps = run.budget.epochs or 3
    loss = (x - 2.0) ** 2
    for step in range(1, steps + 1):
        run.report(step, loss=loss + 1.0 / step)
    (run.run_dir / "model.txt").write_text(str(x))
    return {"loss": loss, "cost": abs(x)}


def params_only(params):
    return {"value": float(params.get("a", 1)) * 2}


def raises(params, run):
    print("about to fail")
    raise ValueError("diverged at step 3")


def returns_list(params):
    return [1, 2, 3]


def returns_empty(params):
    return {}


def returns_text_metric(params):
    return {"loss": "low"}


def warns(params):
    warnings.warn("learning rate looks high", RuntimeWarning, stacklevel=1)
    return {"loss": 1.0}


def fails_when_negative(params, run):
    if float(params["x"]) < 0:
        raise RuntimeError("negative x is not supported")
    return {"loss": (float(params["x"]) - 2.0) ** 2}


def always_fails(params):
    raise RuntimeError("this trainable always fails")


def nan_loss(params):
    return {"loss": math.nan}


def evaluate_with_pred(params, run):
    """Reads the upstream model, writes predictions, reports a test loss."""
    x = float((run.upstream / "model.txt").read_text())
    (run.run_dir / "pred.hdf5").write_bytes(f"predictions for x={x}".encode())
    return {"test_loss": (x - 2.0) ** 2, "x_used": x}


# --- sweeps -------------------------------------------------------------------------


def _log_call(params, tag="call"):
    import json
    import os

    path = os.environ.get("SWEEP_CALLS_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"tag": tag, "params": params}, sort_keys=True) + "\n")


def sweep_square(params, run):
    """(x-3)^2 + y, logging each call so tests can count executions."""
    _log_call(params)
    return {
        "value": (float(params["x"]) - 3.0) ** 2 + float(params.get("y", 0)),
        "x_seen": float(params["x"]),
    }


def slow_square(params, run):
    import time

    time.sleep(float(params.get("sleep", 0.2)))
    return sweep_square(params, run)


def dies_once(params, run):
    """Kills its own worker process the first time it sees a combination."""
    import os
    from pathlib import Path

    marker = Path(os.environ["SWEEP_MARKERS"]) / f"x{params['x']}"
    if not marker.exists():
        marker.write_text("died")
        os._exit(1)
    return {"value": float(params["x"])}


def prepare(params, run):
    _log_call(params, "prepare")
    (run.run_dir / "data.txt").write_text(str(params["x"]))
    return {"prepared": 1.0}


def train_step(params, run):
    _log_call(params, "train")
    x = float((run.upstream / "data.txt").read_text())
    (run.run_dir / "model.txt").write_text(str(x * 2))
    return {"train_loss": x}


def evaluate_step(params, run):
    _log_call(params, "evaluate")
    model = float((run.upstream / "model.txt").read_text())
    return {"score": model + 1}


# --- LLM calls (a research agent inside a trainable) ---------------------------------

AGENT_CALL_COST = 0.0015


def agent_quadratic(params, run):
    """quadratic(), after asking a (pretend) model for advice: one LLM call per run."""
    x = float(params["x"])
    run.log_llm_call(
        model="gpt-test-mini",
        name="advise",
        input=[{"role": "user", "content": f"Is x={x:.3f} a good guess?"}],
        output="Try something closer to 2.",
        usage={"prompt_tokens": 12, "completion_tokens": 7},
        cost_usd=AGENT_CALL_COST,
        latency_s=0.25,
        metadata={"api_key": "sk-agent-secret-123", "temperature_hint": "low"},
    )
    return quadratic(params, run)


def agent_evaluate(params, run):
    """evaluate_with_pred(), with one LLM call that writes the report."""
    run.log_llm_call(
        model="gpt-test-large",
        name="write-report",
        input={"prompt": "Summarise the evaluation", "token": "tok-should-not-leak"},
        output="All good.",
        usage={"input": 30, "output": 10},
        cost_usd=2 * AGENT_CALL_COST,
    )
    return evaluate_with_pred(params, run)


def agent_bad_usage(params, run):
    run.log_llm_call(model="gpt-test-mini", usage={"input": -1})
    return {"loss": 1.0}


def endless(params, run):
    """Trains until told to stop (a cancelled flow run), catching every Exception."""
    step = 0
    while True:
        step += 1
        try:
            run.report(step, loss=1.0 / step)
        except Exception:  # noqa: BLE001 - a careless trainable must still be stoppable
            pass
        time.sleep(0.01)


SECRET_KEY = "sk-live-7Q2xVb9"
SECRET_PASSWORD = "pw-Zt4nK8rr"


def needs_secret(params, run):
    """Fails unless the secret params arrived unchanged; never prints or writes them."""
    if params.get("api_key") != SECRET_KEY or params.get("db_password") != SECRET_PASSWORD:
        raise RuntimeError("the secret params did not reach the trainable unchanged")
    x = float(params["x"])
    for step in range(1, 3):
        run.report(step, loss=(x - 2.0) ** 2 + 1.0 / step)
    (run.run_dir / "model.txt").write_text(str(x))
    return {"loss": (x - 2.0) ** 2}


MEET = None  # a threading.Barrier the overlap test sets


def meets_another(params, run):
    """Waits for a second callable to be running at the same time; prints its own tag."""
    print(f"tag={params['tag']}")
    MEET.wait(timeout=20)
    print(f"done={params['tag']}")
    return {"value": 1.0}


def stops_when_told(params, run):
    """Reports a step at a time; its job is told to end after step 3 (as a Slurm time
    limit would), and it saves nothing."""
    from expflow_flows.runs.trainable import request_checkpoint

    for step in range(1, int(params["steps"]) + 1):
        run.report(step, loss=1.0 / step)
        if step == 3:
            request_checkpoint("the job ends")
    return {"loss": 0.0}
