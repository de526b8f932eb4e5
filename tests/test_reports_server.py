"""Reports over HTTP: the links in the Prefect UI open, and nothing else is served.

A real reports server process (`expflow server start` runs it beside Prefect's) on a
free loopback port, over a real expflow home; the report is opened in headless
Chromium through its http:// link."""

from __future__ import annotations

import base64
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from test_deployment import free_port
from test_sweep_report import browser, needs_chromium  # noqa: F401 (browser: a fixture)

from expflow_flows import reports_server, server
from expflow_flows.hpo.report import write_study_report


@pytest.fixture
def served(home, tmp_path):
    runs = home / "runs" / "exp" / "pipeline-1"
    runs.mkdir(parents=True)
    study = optuna.create_study()
    study.optimize(lambda t: (t.suggest_float("x", 0.001, 10, log=True) - 1) ** 2, n_trials=8)
    report = write_study_report(study, runs / "report-exp.html", title="HPO report: exp")
    (runs / "summary.json").write_text('{"secret": "no"}')
    (home / "pin.json").write_text('{"hash": "x"}')
    (runs / ".hidden.html").write_text("hidden")
    outside = tmp_path / "outside.html"
    outside.write_text("outside the home")
    (runs / "escape.html").symlink_to(outside)
    port = free_port()
    url, started = server.start_reports(port)
    assert started
    yield {"url": url, "report": report, "home": home, "port": port}
    server.stop_reports(port)


def get(url: str, method: str = "GET") -> tuple[int, bytes, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, b"", ""


def test_a_report_and_its_plotly_file_are_served_and_linked(served):
    link = reports_server.report_link(served["report"])
    assert link == f"{served['url']}/runs/exp/pipeline-1/report-exp.html"
    status, body, kind = get(link)
    assert status == 200 and kind.startswith("text/html") and b"HPO report: exp" in body
    script = next(served["report"].parent.glob("plotly-*.min.js")).name
    status, body, kind = get(f"{served['url']}/runs/exp/pipeline-1/{script}")
    assert status == 200 and "javascript" in kind and len(body) > 1_000_000
    status, index, _ = get(served["url"] + "/")
    assert status == 200 and b"/runs/exp/pipeline-1/report-exp.html" in index


@pytest.mark.parametrize(
    "path",
    [
        "/runs/exp/",  # a directory: no listing
        "/runs/exp/pipeline-1",
        "/runs/exp/pipeline-1/summary.json",  # not a report file
        "/runs/../pin.json",
        "/runs/%2e%2e/pin.json",
        "/pin.json",
        "/runs/exp/pipeline-1/.hidden.html",
        "/runs/exp/pipeline-1/escape.html",  # a link out of the home
        "/etc/passwd",
    ],
)
def test_nothing_but_report_files_is_served(served, path):
    status, body, _ = get(served["url"] + path)
    assert status == 404, (path, body[:200])


def test_it_is_read_only(served):
    assert get(served["url"] + "/runs/exp/pipeline-1/report-exp.html", "POST")[0] == 405
    assert get(served["url"] + "/runs/exp/pipeline-1/report-exp.html", "DELETE")[0] == 405


def test_without_the_server_links_are_file_uris(home, tmp_path):
    page = home / "runs" / "x" / "r.html"
    page.parent.mkdir(parents=True)
    page.write_text("r")
    assert reports_server.report_link(page) == page.resolve().as_uri()


@needs_chromium
def test_the_served_report_draws_in_chromium(served, browser):  # noqa: F811
    browser.call(
        "Page.navigate", {"url": reports_server.report_link(served["report"])}, session=True
    )
    browser.wait_event("Page.loadEventFired")
    ready = "document.querySelectorAll('.js-plotly-plot .main-svg').length > 0"
    while not browser.evaluate(ready):
        assert time.monotonic() < browser.deadline, "the report's plots never drew over HTTP"
        time.sleep(0.1)
    assert browser.evaluate("location.protocol") == "http:"
    assert not browser.errors()
    # the screenshot goes to the test output folder, for a person to look at
    shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
    shots = Path(os.environ.get("EXPFLOW_TEST_SHOTS") or served["home"].parent / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    (shots / "served-report.png").write_bytes(base64.b64decode(shot))
    assert (shots / "served-report.png").stat().st_size > 10_000
