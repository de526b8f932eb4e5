"""The ``audit`` flow: audit the ledger's experiments and post the result as a table artifact.

It runs the same checks as ``expflow audit report``; a failing check ends the
run Failed, so a daily deployment of it alerts through Prefect's notifications.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from expflow_flows.errors import ExpflowError
from expflow_flows.flows import events
from expflow_flows.governance import audit
from expflow_flows.governance.ledger import Ledger
from expflow_flows.home import expflow_home
from expflow_flows.metrics.registry import load_registry


def audit_reports(
    experiments: list[str] | None = None,
    *,
    state: str | None = "COMPLETED",
    rules: str | None = None,
    limit: int = 200,
) -> list[audit.AuditReport]:
    """Audit the named experiments, or the newest ``limit`` in ``state``."""
    ledger = Ledger()
    registry = load_registry()
    audit_rules = audit.AuditRules.load(rules)
    rows = (
        [ledger.get(e) for e in experiments]
        if experiments
        else ledger.list(state=state, limit=limit)
    )
    return [audit.audit_ledger_experiment(r, registry, audit_rules) for r in rows]


def write_reports(
    reports: list[audit.AuditReport], folder: Path | None = None
) -> tuple[Path, Path]:
    """Write the combined Markdown and HTML reports; returns their paths."""
    folder = folder or expflow_home() / "audits"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    md = folder / f"audit-{stamp}.md"
    page = folder / f"audit-{stamp}.html"
    md.write_text(audit.combined_markdown(reports), encoding="utf-8")
    page.write_text(audit.combined_html(reports), encoding="utf-8")
    return md, page


@flow(name="audit")
def audit_flow(
    experiments: list[str] | None = None,
    state: str | None = "COMPLETED",
    rules: str | None = None,
    limit: int = 200,
) -> dict[str, Any]:
    """Audit experiments from the ledger against the competition rules and the metric registry."""
    logger = get_run_logger()
    try:
        reports = audit_reports(experiments, state=state, rules=rules, limit=limit)
    except ExpflowError as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc), data=exc)
    md, page = write_reports(reports)
    create_table_artifact(
        key="audit-checks",
        table=[
            {
                "experiment": r.subject,
                "check": c.name,
                "outcome": c.outcome,
                "observed": c.observed,
                "rule": c.rule,
            }
            for r in reports
            for c in r.checks
        ],
        description=f"{len(reports)} experiments audited; report {page}",
    )
    failed = [r.subject for r in reports if not r.passed]
    for report in reports:
        if not report.passed:
            events.emit(
                events.AUDIT_FAILED,
                report.subject,
                [
                    events.metric_resource(c.name, c.observed, "rule", c.rule)
                    for c in report.checks
                    if c.outcome == audit.FAIL
                ],
                {"message": f"{report.subject} failed the audit"},
            )
    create_markdown_artifact(
        key="audit-summary",
        markdown=f"# Audit\n\n{len(reports)} audited, {len(failed)} failed.\n\n"
        + "".join(f"- FAILED: {s}\n" for s in failed)
        + f"\nReports: `{md}`, `{page}`\n",
    )
    summary = {"audited": len(reports), "failed": failed, "markdown": str(md), "html": str(page)}
    if failed:
        message = (
            f"{len(failed)} of {len(reports)} experiments failed the audit: {', '.join(failed)}"
        )
        logger.error("%s", message)
        return Failed(message=message, data=ExpflowError(message))
    logger.info("%d experiments audited, all passed; report %s", len(reports), page)
    return summary
