"""The HPO → train → eval → submit pipeline as Prefect flows.

``pipeline`` is the flow users run (UI, ``prefect deployment run``, ``expflow
pipeline run``, Python). Its parameters are a YAML ``config`` file and typed
``settings`` over it (:class:`~expflow_flows.settings.pipeline.PipelineSettings`,
all fields optional), so the Prefect UI shows a form with descriptions and choices.
Its HPO stage is the nested flow ``hpo``, whose task runner follows the run's
``cluster`` settings. The HPO loop (:mod:`expflow_flows.hpo.loop`), gates, bundles
and run folders are domain modules; these flows compose them and report.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run

from expflow_flows.bundles import submission
from expflow_flows.errors import ExpflowError, GateFailed, JobEnding
from expflow_flows.flows import approval, events
from expflow_flows.flows.clusters import task_runner
from expflow_flows.flows.ledger_hooks import describe_pipeline, hooks_for, record_outputs
from expflow_flows.flows.offpeak import deferred_state, hold_for_offpeak
from expflow_flows.flows.outcomes import failed_outcome, stop_file
from expflow_flows.flows.progress import trial_progress
from expflow_flows.governance import pin
from expflow_flows.home import runs_root, submissions_dir
from expflow_flows.hpo import loop
from expflow_flows.hpo import study as hpo
from expflow_flows.hpo.space import SearchSpace
from expflow_flows.integrations.tracking import RunContext, StepRecord, Tracking
from expflow_flows.integrations.tracking import active as active_tracking
from expflow_flows.integrations.tracking import check_settings as check_tracking
from expflow_flows.metrics import gates as gates_mod
from expflow_flows.reports_server import report_link
from expflow_flows.runs import llm_calls, slurmjob
from expflow_flows.runs import trainable as trainable_mod
from expflow_flows.runs.metadata import capture_environment
from expflow_flows.runs.rundir import RunDir, new_run_id
from expflow_flows.runs.trainable import RunResult, run_trainable
from expflow_flows.secrets import release, scrub, seal, take_over, unseal
from expflow_flows.settings.base import overrides_model
from expflow_flows.settings.common import TrackingSettings
from expflow_flows.settings.pipeline import PipelineSettings, load_pipeline_settings

# The flow's ``settings`` parameter: every pipeline setting, each optional.
PipelineOverrides = overrides_model(PipelineSettings)


def _result(d: dict[str, Any]) -> RunResult:
    return RunResult(**{**d, "run_dir": Path(d["run_dir"])})


@task(name="trial", task_run_name="trial-{number}", cache_policy=NO_CACHE, log_prints=False)
def run_trial(
    number: int,
    trial_id: int,
    trainable: str,
    params: dict[str, Any],
    run_dir: str,
    budget: dict[str, Any],
    objective: str,
    storage: str,
    study_name: str,
    pruner: str,
    timeout: float | None = None,
    arg_style: str = "argparse",
    launch: dict[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    stop_file: str | None = None,
    devices: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One HPO trial: run the trainable, reporting intermediate values to the pruner."""
    hook = hpo.report_hook(storage, study_name, trial_id, objective, pruner)
    result = run_trainable(
        trainable,
        params,
        Path(run_dir),
        budget=budget,
        hook=hook,
        timeout=timeout,
        arg_style=arg_style,  # type: ignore[arg-type]
        launch=launch,
        checkpoint_dir=checkpoint_dir,
        stop_file=stop_file,
        devices=devices,
    )
    value = result.metrics.get(objective)
    get_run_logger().info(
        "trial %d %s%s%s",
        number,
        result.status,
        f": {objective}={value:.5g}" if value is not None else "",
        f" ({result.reason})" if result.reason else "",
    )
    return result.to_dict()


@task(name="run-stage", task_run_name="{stage}", cache_policy=NO_CACHE, log_prints=False)
def run_stage(
    stage: str,
    trainable: str,
    params: dict[str, Any],
    run_dir: str,
    budget: dict[str, Any],
    upstream: str | None = None,
    timeout: float | None = None,
    arg_style: str = "argparse",
    launch: dict[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    stop_file: str | None = None,
    devices: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one pipeline stage (final training or evaluation) through the trainable contract."""
    result = run_trainable(
        trainable,
        params,
        Path(run_dir),
        budget=budget,
        upstream=upstream,
        timeout=timeout,
        arg_style=arg_style,  # type: ignore[arg-type]
        launch=launch,
        checkpoint_dir=checkpoint_dir,
        stop_file=stop_file,
        devices=devices,
    )
    get_run_logger().info("%s %s in %.1f s: %s", stage, result.status, result.wall_s, run_dir)
    return result.to_dict()


class _TaskTrials:
    """The HPO loop's trial launcher: each trial is a ``run_trial`` task on the flow's runner."""

    def __init__(self, settings: PipelineSettings, storage: str) -> None:
        self.settings, self.storage = settings, storage

    def start(self, spec: loop.TrialSpec) -> Any:
        s = self.settings
        return run_trial.submit(
            number=spec.number,
            trial_id=spec.trial_id if spec.report_trial_id is None else spec.report_trial_id,
            trainable=s.train.label,
            params=spec.params,
            run_dir=spec.run_dir,
            budget=s.hpo.budget.as_dict(),
            objective=s.primary,
            storage=self.storage,
            study_name=spec.report_study or s.study_name,
            pruner=s.hpo.pruner.name,
            timeout=s.hpo.trial_timeout,
            arg_style=s.train.arg_style,
            launch=s.train.launch(),
            checkpoint_dir=spec.checkpoint_dir or None,
            stop_file=spec.stop_file or None,
            devices=s.cluster.device_request(),
        )

    def next_finished(self, handles: list[Any]) -> Any:
        return next(as_completed(handles))

    def result(self, handle: Any) -> RunResult:
        return _result(handle.result())


def _hpo_run_name() -> str:
    settings = flow_run.parameters.get("settings")
    if isinstance(settings, dict):
        settings = PipelineSettings.model_validate(settings)
    return f"hpo-{settings.study_name}" if settings is not None else "hpo"


@flow(name="hpo", flow_run_name=_hpo_run_name)
def hpo_flow(
    settings: PipelineSettings,
    experiment_dir: str,
    report_dir: str | None = None,
    secrets_ref: str | None = None,
) -> dict[str, Any]:
    """Run trials until the study holds ``hpo.n_trials`` finished ones; returns the best.

    Args:
        settings: The pipeline's settings (the HPO stage, the train trainable, the cluster).
        experiment_dir: Folder the trial folders go under.
        report_dir: Folder of the HTML study report (default: ``experiment_dir``).
        secrets_ref: Where the pipeline that started this flow keeps the real values of
            the secret params shown as ``***`` here (Prefect stores these parameters).
    """
    try:
        try:
            params = unseal(settings.params, secrets_ref)
        except LookupError as exc:
            raise ExpflowError(str(exc)) from None
        settings = settings.model_copy(update={"params": params})
        return _hpo(settings, Path(experiment_dir), Path(report_dir or experiment_dir))
    except Exception as exc:
        return failed_outcome(exc, experiment_dir)


def _hpo(settings: PipelineSettings, experiment_dir: Path, report_dir: Path) -> dict[str, Any]:
    logger = get_run_logger()
    storage = hpo.resolve_storage(settings.hpo.storage)
    study = loop.open_settings_study(settings, storage, logger.warning)
    run_id = str(flow_run.get_id() or "")
    for other, numbers in loop.fail_abandoned_trials(study, run_id, _ended_state).items():
        logger.warning("trials %s of an ended flow run %s marked failed", numbers, other)

    def told(spec: loop.TrialSpec, result: RunResult | None, outcome: str) -> None:
        active_tracking().record(_trial_record(settings, spec, result, outcome))

    counts, trial_dirs = loop.run_study(
        settings,
        study,
        _TaskTrials(settings, storage),
        experiment_dir,
        flow_run_id=run_id,
        on_told=told,
        log=logger.info,
        stop_file=str(stop_file()),
    )
    outcome = loop.conclude(settings, study, storage, counts, trial_dirs, report_dir)
    create_table_artifact(
        key=_artifact_key(settings.study_name, "trials"),
        table=[{k: _cell(v) for k, v in r.items()} for r in outcome.trials],
        description=f"Trials of study {settings.study_name}: {counts.line()}",
    )
    if outcome.pareto:
        objectives = ", ".join(f"{m} ({d})" for m, d in settings.objective_list)
        create_table_artifact(
            key=_artifact_key(settings.study_name, "pareto"),
            table=[{k: _cell(v) for k, v in r.items()} for r in outcome.pareto],
            description=f"Pareto front of study {settings.study_name} on {objectives}: "
            f"trial {outcome.best_trial} is trained ({settings.hpo.select})",
        )
    return outcome.to_dict()


def _ended_state(run_id: str) -> str | None:
    """The final state of a flow run on this server (None: still running, or unknown)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(run_id).state
        except Exception:  # noqa: BLE001 - a run this server does not know: leave it be
            return None
    return state.type.value if state is not None and state.is_final() else None


def _is_script(trainable: str) -> bool:
    return str(trainable).endswith(".py")


def _step_record(
    kind: str, name: str, params: dict[str, Any], result: RunResult, target: str
) -> StepRecord:
    return StepRecord(
        kind=kind,
        name=name,
        params=scrub(dict(params)),
        status=result.status,
        metrics=dict(result.metrics),
        intermediate=list(result.intermediate),
        started=time.time() - result.wall_s,
        wall_s=result.wall_s,
        run_dir=result.run_dir,
        script=_is_script(target),
        reason=result.reason,
    )


def _trial_record(
    settings: PipelineSettings, spec: loop.TrialSpec, result: RunResult | None, outcome: str
) -> StepRecord:
    name = f"trial-{spec.number:04d}"
    if result is None:
        record = StepRecord(
            "trial", name, scrub(dict(spec.params)), "failed", reason="the trial's worker was lost"
        )
        record.script = _is_script(settings.train.label)
    else:
        record = _step_record("trial", name, spec.params, result, settings.train.label)
        record.status = {"complete": result.status, "fail": "failed"}.get(outcome, outcome)
    record.number = spec.number
    return record


def _cell(value: Any) -> Any:
    """A table cell: floats to 6 significant digits (an l2 of 1e-8 is not 0)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


def _shown(value: Any) -> str:
    """A value in a markdown artifact: floats to 6 significant digits, not 17."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:100]


def preflight(settings: PipelineSettings, force: bool) -> list[Any]:
    """Check everything a user can get wrong before any trial runs; returns the gates."""
    settings.check()
    check_tracking(settings.tracking.enabled())
    SearchSpace.load(settings.space)
    gates = gates_mod.parse_gates(settings.gates)
    guarded = settings.submit.enabled and pin.pin_status().get("set")
    if guarded and approval.in_deployment():
        # A deployment run asks for approval in the UI when it gets to the submission;
        # its `force` box would let any UI user skip the PIN, so it counts for nothing.
        if force:
            get_run_logger().warning(
                "force is ignored in a deployment run: the submission waits for approval "
                f"(administrators can set the Prefect Variable {approval.SKIP_VARIABLE})"
            )
        return gates
    if guarded and not force and not os.environ.get("EXPFLOW_PIN"):
        raise pin.refuse(
            "submit",
            settings.submit.to or str(submissions_dir()),
            "submitting is PIN-guarded and no PIN was given: set EXPFLOW_PIN, pass --pin, "
            "or run with force (logged), or submit.enabled=false",
        )
    return gates


@flow(name="pipeline", **hooks_for(describe_pipeline))
def pipeline(
    config: str | None = None,
    settings: PipelineOverrides | None = None,  # type: ignore[valid-type]
    force: bool = False,
) -> dict[str, Any]:
    """HPO → train → eval → submit: an Optuna study, the best parameters trained at the
    final budget and evaluated, metric gates, and a PIN-guarded submission bundle.

    Args:
        config: A pipeline YAML config file (see deployments/); relative file names in it
            are relative to it. Empty: the built-in PDE advection workload.
        settings: Settings over the config file; give only what changes, e.g.
            {"hpo": {"n_trials": 20}, "cluster": {"workers": 4}}.
        force: Submit without a PIN even when one is set (written to the audit log).
    """
    try:
        # secrets the CLI kept out of this flow run's recorded parameters come back here
        resolved = load_pipeline_settings(config, take_over(settings))
        deferred = hold_for_offpeak(resolved.offpeak.model_dump() if resolved.offpeak else None)
        if deferred:
            return deferred_state(deferred)
        # In a Slurm job that may be requeued: checkpoint before the job ends, then resume.
        with slurmjob.guard(stop_file(), get_run_logger().warning):
            return _pipeline(resolved, force)
    except Exception as exc:
        # A user-facing outcome (bad input, failed gate, no successful trial, a full
        # disk): one line in the log and the run's state message, no traceback.
        return failed_outcome(exc, runs_root())


def _pipeline(settings: PipelineSettings, force: bool) -> dict[str, Any]:
    gate_list = preflight(settings, force)
    if approval.in_deployment():
        force = False  # see preflight: approval, not a box any UI user can tick
    # Before any work: a tracking tool asked for but not installed is one clear line.
    tracking = Tracking.from_settings(settings.tracking.enabled())
    run_dir = RunDir.create(runs_root() / settings.experiment / new_run_id("pipeline"))
    with tracking:
        try:
            return _stages(settings, force, gate_list, run_dir, tracking)
        except Exception as exc:
            if isinstance(exc, ExpflowError):
                run_dir.write_status("failed", str(exc))
            if not isinstance(exc, GateFailed):  # a failed gate was reported with its metrics
                tracking.run_finished("failed", {}, {}, str(exc))
            raise


def _stages(
    settings: PipelineSettings,
    force: bool,
    gate_list: list[Any],
    run_dir: RunDir,
    tracking: Tracking,
) -> dict[str, Any]:
    logger = get_run_logger()
    experiment = settings.experiment
    experiment_dir = run_dir.path.parent
    run_dir.write_params(scrub(settings.to_dict()))
    environment = capture_environment()
    run_dir.write_metadata({"flow_run_id": str(flow_run.get_id() or ""), **environment})
    logger.info("pipeline %s: run folder %s", experiment, run_dir.path)
    tracking.run_started(
        RunContext(
            kind="pipeline",
            name=experiment,
            run_dir=run_dir.path,
            params=scrub(settings.to_dict()),
            flow_run_id=str(flow_run.get_id() or ""),
            flow_run_url=flow_run.get_flow_run_ui_url(),
        )
    )

    # --- HPO: a nested flow so its task runner can follow this run's cluster settings.
    # Its parameters are stored by Prefect: tracking settings (keys) stay out of them.
    # Secret params are not: they are sealed in this process and reach the trials only.
    masked_params, secrets_ref = seal(settings.params)
    hpo_settings = settings.model_copy(
        update={"tracking": TrackingSettings(), "params": masked_params}
    )
    try:
        # Its trials and best value so far show on this run too, not only on the nested one.
        with trial_progress(experiment, settings.study_name, settings.primary):
            study = hpo_flow.with_options(task_runner=task_runner(settings.cluster))(
                hpo_settings, str(experiment_dir), str(run_dir.path), secrets_ref
            )
    finally:
        # The HPO stage's threads are gone once its flow returned or raised: a stop it
        # asked for must not reach later callables of this process.
        trainable_mod.clear_stop()
        release(secrets_ref)
    best_params = {**settings.params, **study["best_params"]}  # what train and evaluate get
    shown_params = scrub(best_params)  # what every record and report shows
    create_markdown_artifact(
        key=_artifact_key(experiment, "best-params"),
        markdown=_best_markdown(study, shown_params, settings),
        description="Best parameters found by HPO",
    )

    # --- Train with the best parameters at the final budget, then evaluate.
    # The final training's checkpoints outlive a requeue of this flow run: it resumes.
    this_run = str(flow_run.get_id() or "") or run_dir.path.name
    trained = _result(
        run_stage(
            "train",
            settings.train.label,
            best_params,
            str(experiment_dir / new_run_id("train")),
            settings.final_budget,
            timeout=settings.train.timeout,
            arg_style=settings.train.arg_style,
            launch=settings.train.launch(),
            checkpoint_dir=str(experiment_dir / "checkpoints" / f"train-{this_run}"),
            stop_file=str(stop_file()),
            devices=settings.cluster.device_request(),
        )
    )
    tracking.record(_step_record("train", "train", shown_params, trained, settings.train.label))
    if not trained.ok and trainable_mod.STOPPED_TO_RESUME in trained.reason:
        raise JobEnding(f"final training {trained.reason}")
    if not trained.ok:
        raise ExpflowError(
            f"final training failed: {trained.reason} (log: {trained.run_dir / 'output.log'})"
        )
    evaluated = _result(
        run_stage(
            "evaluate",
            settings.evaluate.label,
            best_params,
            str(experiment_dir / new_run_id("eval")),
            settings.eval_budget,
            upstream=str(trained.run_dir),
            timeout=settings.evaluate.timeout,
            arg_style=settings.evaluate.arg_style,
            launch=settings.evaluate.launch(),
            devices=settings.cluster.device_request(),
        )
    )
    evaluation = _step_record(
        "evaluate", "evaluate", shown_params, evaluated, settings.evaluate.label
    )
    predictions = (
        submission.find_predictions(
            evaluated.run_dir, settings.submit.predictions, settings.submit.convert
        )
        if evaluated.ok
        else None
    )
    if predictions is not None:
        evaluation.artifacts[predictions.name] = predictions
    tracking.record(evaluation)
    if not evaluated.ok:
        raise ExpflowError(
            f"evaluation failed: {evaluated.reason} (log: {evaluated.run_dir / 'output.log'})"
        )
    create_table_artifact(
        key=_artifact_key(experiment, "eval-metrics"),
        table=[{"metric": k, "value": _cell(v)} for k, v in sorted(evaluated.metrics.items())],
        description=f"Evaluation metrics ({evaluated.run_dir})",
    )

    # --- Gates decide whether the submission happens; they fail closed.
    # What the experiment reports: the evaluation's metrics, and the final training's wall
    # time (the competitions' limit, train_time_min) unless the evaluation reports it.
    metrics = {
        "train_time_s": trained.wall_s,
        "train_time_min": trained.wall_s / 60.0,
        **evaluated.metrics,
    }
    results = gates_mod.evaluate_gates(gate_list, metrics)
    create_table_artifact(
        key=_artifact_key(settings.experiment, "gates"),
        table=[
            {
                "gate": r.gate,
                "value": _cell(r.value),
                "passed": r.passed,
                "message": r.message,
            }
            for r in results
        ],
        description="Metric gates between evaluation and submission",
    )
    summary: dict[str, Any] = {
        "experiment": settings.experiment,
        "run_dir": str(run_dir.path),
        "study": study["study"],
        "storage": study["storage"],
        "trials": {k: study[k] for k in ("complete", "pruned", "failed")},
        "best_trial": study["best_trial"],
        "best_value": study["best_value"],
        "best_params": shown_params,
        "train_run": str(trained.run_dir),
        "eval_run": str(evaluated.run_dir),
        "metrics": metrics,
        "gates": [
            {"gate": r.gate, "passed": r.passed, "value": r.value, "message": r.message}
            for r in results
        ],
        "report": study["report"],
        "bundle": None,
    }
    failed = [r for r in results if not r.passed]
    bundle: Path | None = None
    if not failed and settings.submit.enabled:
        bundle = submit_bundle(settings, evaluated, shown_params, study, force, predictions)
        summary["bundle"] = str(bundle)
    run_dir.write_metrics(metrics)
    llm = llm_calls.summarize([*study.get("trial_dirs", []), trained.run_dir, evaluated.run_dir])
    summary["llm"] = llm.to_dict()
    summary["ledger_id"] = record_outputs(
        str(flow_run.get_id() or ""),
        params=shown_params,
        metrics={**metrics, **llm.metrics()},
        run_dir=str(run_dir.path),
    )
    (run_dir.path / "summary.json").write_text(
        json.dumps(scrub(summary), indent=2, default=str) + "\n", encoding="utf-8"
    )
    create_markdown_artifact(
        key=_artifact_key(settings.experiment, "outputs"),
        markdown=_outputs_markdown(summary),
        description="Where this pipeline run's outputs are",
    )
    artifacts = {"summary.json": run_dir.path / "summary.json"}
    if study.get("report"):
        artifacts["report"] = Path(study["report"])
        for script in Path(study["report"]).parent.glob("plotly-*.min.js"):
            artifacts[script.name] = script  # the report loads it from beside itself
    if bundle is not None:
        artifacts["submission"] = bundle
    message = "; ".join(r.message for r in failed)
    tracking.run_finished("gate-failed" if failed else "ok", metrics, artifacts, message)
    summary["tracking_warnings"] = list(tracking.warnings)
    if failed:
        events.emit(
            events.GATE_FAILED,
            settings.experiment,
            [events.metric_resource(r.metric, r.value, r.op, r.threshold) for r in failed],
            {"message": message, "run_dir": str(run_dir.path)},
        )
        raise GateFailed(message + " (nothing was submitted)")
    run_dir.write_status("ok")
    return summary


@task(name="submit", task_run_name="submit", cache_policy=NO_CACHE)
def submit_task(
    dest: str,
    name: str,
    files: dict[str, str],
    metrics: dict,
    params: dict,
    info: dict,
    force: bool,
    approved: bool = False,
) -> str:
    """Write the submission bundle; irreversible, so PIN-guarded once a PIN is set
    (``approved``: the flow run was approved in the UI, which the audit log holds)."""
    if not approved:
        pin.guard("submit", target=f"{dest}/{name}", force=force)
    path = submission.write_bundle(
        Path(dest),
        name,
        {k: Path(v) for k, v in files.items()},
        metrics=metrics,
        params=params,
        info=info,
    )
    get_run_logger().info("submission bundle written: %s", path)
    return str(path)


def submit_bundle(
    settings: PipelineSettings,
    evaluated: RunResult,
    best_params: dict[str, Any],
    study: dict[str, Any],
    force: bool,
    predictions: Path | None,
) -> Path:
    """Bundle the predictions, metrics, params and a manifest into the submissions folder."""
    if predictions is None:
        raise ExpflowError(
            f"evaluation wrote no {settings.submit.predictions} in {evaluated.run_dir}; "
            "nothing to submit (submit.predictions names the file, submit.convert a converter)"
        )
    name = settings.submit.name or f"{settings.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    info = {
        "experiment": settings.experiment,
        "study": study["study"],
        "best_trial": study["best_trial"],
        "flow_run_id": str(flow_run.get_id() or ""),
        "eval_run": str(evaluated.run_dir),
    }
    dest = settings.submit.to or str(submissions_dir())
    approved = False
    if approval.in_deployment():
        # No PIN can be typed into a deployment run: it pauses for approval in the UI.
        approval.approve(
            "submit",
            f"{dest}/{name}",
            timeout_s=settings.submit.approval_timeout,
            log=get_run_logger().warning,
        )
        approved = True
    return Path(
        submit_task(
            dest,
            name,
            {predictions.name: str(predictions)},
            evaluated.metrics,
            best_params,
            info,
            force and not approved,
            approved,
        )
    )


def _best_markdown(
    study: dict[str, Any], params: dict[str, Any], settings: PipelineSettings
) -> str:
    values = study.get("best_values") or {settings.objective: study["best_value"]}
    directions = dict(settings.objective_list)
    shown = ", ".join(
        f"{m} = **{v:.6g}** ({directions.get(m, settings.direction)})" for m, v in values.items()
    )
    how = (
        f" (the {study.get('select', 'primary')} choice of {len(study['pareto'])} on the "
        "Pareto front)"
        if study.get("pareto")
        else ""
    )
    lines = [
        f"# Best trial {study['best_trial']} of study `{study['study']}`{how}",
        "",
        f"{shown}; "
        f"{study['complete']} complete, {study['pruned']} pruned, {study['failed']} failed.",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_shown(v)} |" for k, v in params.items()]
    return "\n".join(lines)


def _outputs_markdown(summary: dict[str, Any]) -> str:
    gates = ", ".join(
        f"{g['gate']} {'passed' if g['passed'] else 'FAILED'}" for g in summary["gates"]
    )
    bundle = summary["bundle"] or "not submitted"
    return "\n".join(
        [
            f"# Pipeline outputs: {summary['experiment']}",
            "",
            f"- Gates: {gates or 'none'}",
            f"- Submission bundle: `{bundle}`",
            f"- HPO report (plotly HTML): [{summary['report']}]({report_link(summary['report'])})",
            f"- Pipeline run folder: `{summary['run_dir']}`",
            f"- Final training run: `{summary['train_run']}`",
            f"- Evaluation run: `{summary['eval_run']}`",
        ]
    )
