"""The HPO → train → eval → submit pipeline as Prefect flows.

``pipeline`` is the flow users run (UI, ``prefect deployment run``, ``expflow
pipeline run``, Python). Its HPO stage is the nested flow ``hpo``, whose task
runner (a Dask ``LocalCluster`` by default) is chosen from the run's parameters.
Domain work lives in the core modules; these flows only compose it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Failed

from expflow_flows.bundles import submission
from expflow_flows.config import PipelineConfig, build_config
from expflow_flows.errors import ExpflowError, GateFailed
from expflow_flows.flows.clusters import make_task_runner
from expflow_flows.flows.ledger_hooks import describe_pipeline, hooks_for, record_outputs
from expflow_flows.flows.offpeak import hold_for_offpeak
from expflow_flows.governance import pin
from expflow_flows.home import runs_root, submissions_dir
from expflow_flows.hpo import progress
from expflow_flows.hpo import study as hpo
from expflow_flows.hpo.report import write_study_report
from expflow_flows.hpo.space import SearchSpace
from expflow_flows.integrations.tracking import RunContext, StepRecord, Tracking
from expflow_flows.integrations.tracking import active as active_tracking
from expflow_flows.integrations.tracking import check_settings as check_tracking
from expflow_flows.metrics import gates as gates_mod
from expflow_flows.runs import llm_calls
from expflow_flows.runs import trainable as trainable_mod
from expflow_flows.runs.metadata import capture_environment
from expflow_flows.runs.rundir import RunDir, new_run_id
from expflow_flows.runs.trainable import RunResult, Trainable, run_trainable
from expflow_flows.secrets import scrub


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
    )
    get_run_logger().info("%s %s in %.1f s: %s", stage, result.status, result.wall_s, run_dir)
    return result.to_dict()


@flow(name="hpo", flow_run_name="hpo-{study_name}")
def hpo_flow(
    config: dict[str, Any], study_name: str, experiment_dir: str, report_dir: str | None = None
) -> dict[str, Any]:
    """Run trials until the study holds ``n_trials`` finished ones; returns the best.

    Trial folders go under ``experiment_dir``; the HTML report into ``report_dir``
    (default: ``experiment_dir``).
    """
    try:
        return _hpo(PipelineConfig(**config), study_name, experiment_dir, report_dir)
    except ExpflowError as exc:
        get_run_logger().error("%s", exc)
        return Failed(message=str(exc), data=exc)


def _hpo(
    cfg: PipelineConfig, study_name: str, experiment_dir: str, report_dir: str | None
) -> dict[str, Any]:
    logger = get_run_logger()
    space = SearchSpace.load(cfg.space)
    storage = hpo.resolve_storage(cfg.storage)
    study = hpo.open_study(
        storage, study_name, direction=cfg.direction, pruner=cfg.pruner, seed=cfg.seed
    )
    _fail_abandoned_trials(study, str(flow_run.get_id() or ""))
    already = hpo.finished_count(study)
    remaining = max(cfg.n_trials - already, 0)
    if already:
        logger.info(
            "study %r resumed with %d finished trials; %d to run", study_name, already, remaining
        )
    counts = progress.TrialProgress(study=study_name, target=cfg.n_trials)
    for t in study.get_trials(deepcopy=False):
        state = t.state.name
        counts.complete += state == "COMPLETE"
        counts.pruned += state == "PRUNED"
        counts.failed += state == "FAIL"

    def refresh() -> None:
        best = hpo.best_trial(study)
        if best is not None:
            counts.best_value, counts.best_params = best.value, dict(best.params)
        progress.publish(counts)

    refresh()
    in_flight: dict[Any, Any] = {}
    launched = 0
    trial_dirs: list[str] = []  # this run's trials, whose LLM costs the experiment pays
    fixed = dict(cfg.params)
    flow_run_id = str(flow_run.get_id() or "")
    trainable_mod.clear_stop()
    try:
        while launched < remaining or in_flight:
            while launched < remaining and len(in_flight) < cfg.parallelism:
                trial = study.ask()
                params = {**fixed, **space.suggest(trial)}
                trial.set_user_attr("flow_run_id", flow_run_id)
                run_dir = Path(experiment_dir) / f"hpo-t{trial.number:04d}-{new_run_id('')[1:]}"
                trial_dirs.append(str(run_dir))
                future = run_trial.submit(
                    number=trial.number,
                    trial_id=trial._trial_id,
                    trainable=cfg.train,
                    params=params,
                    run_dir=str(run_dir),
                    budget=cfg.hpo_budget,
                    objective=cfg.objective,
                    storage=storage,
                    study_name=study_name,
                    pruner=cfg.pruner,
                    timeout=cfg.trial_timeout,
                    arg_style=cfg.arg_style,
                )
                in_flight[future] = trial
                launched += 1
                counts.running = len(in_flight)
                refresh()
            future = next(as_completed(list(in_flight)))
            trial = in_flight.pop(future)
            result: RunResult | None = None
            try:
                result = _result(future.result())
                outcome = hpo.tell_result(study, trial, result, cfg.objective)
            except Exception as exc:  # noqa: BLE001 - a lost worker fails one trial, not the study
                outcome = hpo.tell_result(study, trial, None, cfg.objective, error=str(exc))
            active_tracking().record(_trial_record(cfg, trial, result, outcome))
            counts.complete += outcome == "complete"
            counts.pruned += outcome == "pruned"
            counts.failed += outcome == "fail"
            counts.running = len(in_flight)
            refresh()
            logger.info(counts.line())
    except BaseException:
        # The flow run is ending (cancelled, crashed, interrupted): trials running in
        # threads stop at their next report instead of holding the process open.
        trainable_mod.request_stop()
        raise

    rows = hpo.trials_table(study)
    create_table_artifact(
        key=_artifact_key(study_name, "trials"),
        table=[{k: _cell(v) for k, v in r.items()} for r in rows],
        description=f"Trials of study {study_name}: {counts.line()}",
    )
    report = write_study_report(
        study,
        Path(report_dir or experiment_dir) / f"report-{study_name}.html",
        title=f"HPO report: {study_name}",
        extra={"objective": f"{cfg.objective} ({cfg.direction})", "storage": storage},
    )
    best = hpo.best_trial(study)
    if best is None:
        raise ExpflowError(
            f"no trial of study {study_name!r} succeeded ({counts.failed} failed, "
            f"{counts.pruned} pruned); see the trials table and each trial's output.log"
        )
    return {
        "study": study_name,
        "storage": storage,
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": dict(best.params),
        "complete": counts.complete,
        "pruned": counts.pruned,
        "failed": counts.failed,
        "trials": rows,
        "report": str(report),
        "trial_dirs": trial_dirs,
    }


def _is_script(trainable: str) -> bool:
    return str(trainable).endswith(".py")


def _step_record(
    kind: str, name: str, params: dict[str, Any], result: RunResult, cfg
) -> StepRecord:
    return StepRecord(
        kind=kind,
        name=name,
        params=dict(params),
        status=result.status,
        metrics=dict(result.metrics),
        intermediate=list(result.intermediate),
        started=time.time() - result.wall_s,
        wall_s=result.wall_s,
        run_dir=result.run_dir,
        script=_is_script(cfg.train if kind != "evaluate" else cfg.evaluate),
        reason=result.reason,
    )


def _trial_record(cfg: PipelineConfig, trial: Any, result: RunResult | None, outcome: str):
    params = {**cfg.params, **trial.params}
    name = f"trial-{trial.number:04d}"
    if result is None:
        record = StepRecord("trial", name, params, "failed", reason="the trial's worker was lost")
        record.script = _is_script(cfg.train)
    else:
        record = _step_record("trial", name, params, result, cfg)
        record.status = {"complete": result.status, "fail": "failed"}.get(outcome, outcome)
    record.number = trial.number
    return record


def _fail_abandoned_trials(study: Any, current_run: str) -> None:
    """Trials left running by a flow run that has ended (killed, crashed) are failed."""
    from prefect.client.orchestration import get_client

    stale = {k: v for k, v in hpo.running_trials_by_run(study).items() if k != current_run}
    if not stale:
        return
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        for run_id, numbers in stale.items():
            try:
                state = client.read_flow_run(run_id).state
            except Exception:  # noqa: BLE001 - a run this server does not know: leave it be
                continue
            if state is not None and state.is_final():
                hpo.fail_abandoned(
                    study, numbers, f"abandoned: flow run {run_id} ended {state.type.value}"
                )
                logger.warning("trials %s of an ended flow run %s marked failed", numbers, run_id)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    return value


def _artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:100]


def _preflight(cfg: PipelineConfig, force: bool) -> tuple[SearchSpace, list[Any]]:
    """Check everything a user can get wrong before any trial runs."""
    Trainable.parse(cfg.train).check()
    Trainable.parse(cfg.evaluate).check()
    check_tracking(cfg.tracking)
    space = SearchSpace.load(cfg.space)
    gates = gates_mod.parse_gates(cfg.gates)
    if (
        cfg.submit
        and not force
        and pin.pin_status().get("set")
        and not os.environ.get("EXPFLOW_PIN")
    ):
        raise ExpflowError(
            "submitting is PIN-guarded and no PIN was given: set EXPFLOW_PIN, pass --pin, "
            "or run with force (logged), or submit=false"
        )
    return space, gates


@flow(name="pipeline", **hooks_for(describe_pipeline))
def pipeline(
    config: str | None = None,
    experiment: str | None = None,
    train: str | None = None,
    evaluate: str | None = None,
    space: str | dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    n_trials: int | None = None,
    parallelism: int | None = None,
    runner: str | None = None,
    dask_address: str | None = None,
    slurm: dict[str, Any] | None = None,
    hpo_budget: dict[str, Any] | None = None,
    final_budget: dict[str, Any] | None = None,
    objective: str | None = None,
    direction: str | None = None,
    pruner: str | None = None,
    seed: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    trial_timeout: float | None = None,
    arg_style: str | None = None,
    gates: list[str] | None = None,
    submit: bool | None = None,
    submit_to: str | None = None,
    submission_name: str | None = None,
    force: bool = False,
    offpeak: dict[str, Any] | None = None,
    tracking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """HPO → train → eval → submit. Settings come from ``config`` (YAML) and the arguments that override it.

    ``tracking`` (e.g. ``{clearml: {project: pde}, langfuse: {}}``) mirrors the run to
    tracking tools (see ``expflow_flows.integrations.tracking``).

    ``offpeak`` (e.g. ``{windows: ['22:00-08:00'], timezone: Europe/Berlin}``) moves a run
    triggered in peak hours to the next off-peak window.
    """
    try:
        deferred = hold_for_offpeak(offpeak)
        if deferred:
            return deferred
        cfg = build_config(
            config,
            experiment=experiment,
            train=train,
            evaluate=evaluate,
            space=space,
            params=params,
            n_trials=n_trials,
            parallelism=parallelism,
            runner=runner,
            dask_address=dask_address,
            tracking=tracking,
            slurm=slurm,
            hpo_budget=hpo_budget,
            final_budget=final_budget,
            objective=objective,
            direction=direction,
            pruner=pruner,
            seed=seed,
            storage=storage,
            study_name=study_name,
            trial_timeout=trial_timeout,
            arg_style=arg_style,
            gates=gates,
            submit=submit,
            submit_to=submit_to,
            submission_name=submission_name,
        )
        return _pipeline(cfg, force)
    except ExpflowError as exc:
        # A user-facing outcome (bad input, failed gate, no successful trial): one
        # line in the log and the run's state message, no traceback.
        get_run_logger().error("%s", exc)
        return Failed(message=str(exc), data=exc)


def _pipeline(cfg: PipelineConfig, force: bool) -> dict[str, Any]:
    _, gate_list = _preflight(cfg, force)
    # Before any work: a tracking tool asked for but not installed is one clear line.
    tracking = Tracking.from_settings(cfg.tracking)
    run_dir = RunDir.create(runs_root() / cfg.experiment / new_run_id("pipeline"))
    with tracking:
        try:
            return _stages(cfg, force, gate_list, run_dir, tracking)
        except Exception as exc:
            if isinstance(exc, ExpflowError):
                run_dir.write_status("failed", str(exc))
            if not isinstance(exc, GateFailed):  # a failed gate was reported with its metrics
                tracking.run_finished("failed", {}, {}, str(exc))
            raise


def _stages(
    cfg: PipelineConfig, force: bool, gate_list: list[Any], run_dir: RunDir, tracking: Tracking
) -> dict[str, Any]:
    logger = get_run_logger()
    experiment_dir = run_dir.path.parent
    run_dir.write_params(scrub(cfg.to_dict()))
    environment = capture_environment()
    run_dir.write_metadata({"flow_run_id": str(flow_run.get_id() or ""), **environment})
    logger.info("pipeline %s: run folder %s", cfg.experiment, run_dir.path)
    tracking.run_started(
        RunContext(
            kind="pipeline",
            name=cfg.experiment,
            run_dir=run_dir.path,
            params=scrub(cfg.to_dict()),
            flow_run_id=str(flow_run.get_id() or ""),
            flow_run_url=flow_run.get_flow_run_ui_url(),
        )
    )

    # --- HPO: a nested flow so its task runner can follow this run's parameters.
    task_runner = make_task_runner(
        cfg.runner, workers=cfg.parallelism, dask_address=cfg.dask_address, slurm=cfg.slurm
    )
    try:
        study = hpo_flow.with_options(task_runner=task_runner)(
            cfg.to_dict(), cfg.resolved_study_name, str(experiment_dir), str(run_dir.path)
        )
    finally:
        # The HPO stage's threads are gone once its flow returned or raised: a stop it
        # asked for must not reach later callables of this process.
        trainable_mod.clear_stop()
    best_params = {**cfg.params, **study["best_params"]}
    create_markdown_artifact(
        key=_artifact_key(cfg.experiment, "best-params"),
        markdown=_best_markdown(study, best_params, cfg),
        description="Best parameters found by HPO",
    )

    # --- Train with the best parameters at the final budget, then evaluate.
    trained = _result(
        run_stage(
            "train",
            cfg.train,
            best_params,
            str(experiment_dir / new_run_id("train")),
            cfg.final_budget,
            arg_style=cfg.arg_style,
        )
    )
    tracking.record(_step_record("train", "train", best_params, trained, cfg))
    if not trained.ok:
        raise ExpflowError(
            f"final training failed: {trained.reason} (log: {trained.run_dir / 'output.log'})"
        )
    evaluated = _result(
        run_stage(
            "evaluate",
            cfg.evaluate,
            best_params,
            str(experiment_dir / new_run_id("eval")),
            cfg.final_budget,
            upstream=str(trained.run_dir),
            arg_style=cfg.arg_style,
        )
    )
    evaluation = _step_record("evaluate", "evaluate", best_params, evaluated, cfg)
    predictions = evaluated.run_dir / cfg.predictions
    if predictions.is_file():
        evaluation.artifacts[cfg.predictions] = predictions
    tracking.record(evaluation)
    if not evaluated.ok:
        raise ExpflowError(
            f"evaluation failed: {evaluated.reason} (log: {evaluated.run_dir / 'output.log'})"
        )
    create_table_artifact(
        key=_artifact_key(cfg.experiment, "eval-metrics"),
        table=[{"metric": k, "value": _cell(v)} for k, v in sorted(evaluated.metrics.items())],
        description=f"Evaluation metrics ({evaluated.run_dir})",
    )

    # --- Gates decide whether the submission happens; they fail closed.
    results = gates_mod.evaluate_gates(gate_list, evaluated.metrics)
    create_table_artifact(
        key=_artifact_key(cfg.experiment, "gates"),
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
        "experiment": cfg.experiment,
        "run_dir": str(run_dir.path),
        "study": study["study"],
        "storage": study["storage"],
        "trials": {k: study[k] for k in ("complete", "pruned", "failed")},
        "best_trial": study["best_trial"],
        "best_value": study["best_value"],
        "best_params": best_params,
        "train_run": str(trained.run_dir),
        "eval_run": str(evaluated.run_dir),
        "metrics": evaluated.metrics,
        "gates": [
            {"gate": r.gate, "passed": r.passed, "value": r.value, "message": r.message}
            for r in results
        ],
        "report": study["report"],
        "bundle": None,
    }
    failed = [r for r in results if not r.passed]
    bundle: Path | None = None
    if not failed and cfg.submit:
        bundle = submit_bundle(cfg, evaluated, best_params, study, force)
        summary["bundle"] = str(bundle)
    run_dir.write_metrics(evaluated.metrics)
    llm = llm_calls.summarize([*study.get("trial_dirs", []), trained.run_dir, evaluated.run_dir])
    summary["llm"] = llm.to_dict()
    summary["ledger_id"] = record_outputs(
        str(flow_run.get_id() or ""),
        params=best_params,
        metrics={**evaluated.metrics, **llm.metrics()},
        run_dir=str(run_dir.path),
    )
    (run_dir.path / "summary.json").write_text(
        json.dumps(scrub(summary), indent=2, default=str) + "\n", encoding="utf-8"
    )
    create_markdown_artifact(
        key=_artifact_key(cfg.experiment, "outputs"),
        markdown=_outputs_markdown(summary),
        description="Where this pipeline run's outputs are",
    )
    artifacts = {"summary.json": run_dir.path / "summary.json"}
    if study.get("report"):
        artifacts["report"] = Path(study["report"])
    if bundle is not None:
        artifacts["submission"] = bundle
    message = "; ".join(r.message for r in failed)
    tracking.run_finished("gate-failed" if failed else "ok", evaluated.metrics, artifacts, message)
    summary["tracking_warnings"] = list(tracking.warnings)
    if failed:
        raise GateFailed(message + " (nothing was submitted)")
    run_dir.write_status("ok")
    return summary


@task(name="submit", cache_policy=NO_CACHE)
def submit_task(
    dest: str,
    name: str,
    files: dict[str, str],
    metrics: dict,
    params: dict,
    info: dict,
    force: bool,
) -> str:
    """Write the submission bundle; irreversible, so PIN-guarded once a PIN is set."""
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
    cfg: PipelineConfig,
    evaluated: RunResult,
    best_params: dict[str, Any],
    study: dict[str, Any],
    force: bool,
) -> Path:
    """Bundle the predictions, metrics, params and a manifest into the submissions folder."""
    predictions = evaluated.run_dir / cfg.predictions
    if not predictions.exists():
        raise ExpflowError(
            f"evaluation wrote no {cfg.predictions} in {evaluated.run_dir}; nothing to submit"
        )
    name = cfg.submission_name or f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    info = {
        "experiment": cfg.experiment,
        "study": study["study"],
        "best_trial": study["best_trial"],
        "flow_run_id": str(flow_run.get_id() or ""),
        "eval_run": str(evaluated.run_dir),
    }
    dest = cfg.submit_to or str(submissions_dir())
    return Path(
        submit_task(
            dest,
            name,
            {cfg.predictions: str(predictions)},
            evaluated.metrics,
            best_params,
            info,
            force,
        )
    )


def _best_markdown(study: dict[str, Any], params: dict[str, Any], cfg: PipelineConfig) -> str:
    lines = [
        f"# Best trial {study['best_trial']} of study `{study['study']}`",
        "",
        f"{cfg.objective} = **{study['best_value']:.6g}** ({cfg.direction}); "
        f"{study['complete']} complete, {study['pruned']} pruned, {study['failed']} failed.",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in params.items()]
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
            f"- HPO report (plotly HTML): [{summary['report']}](file://{summary['report']})",
            f"- Pipeline run folder: `{summary['run_dir']}`",
            f"- Final training run: `{summary['train_run']}`",
            f"- Evaluation run: `{summary['eval_run']}`",
        ]
    )
