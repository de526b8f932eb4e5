"""Sweep reports: dashboard sections, escaping, the live status page, and a headless-Chromium
check that both pages load without JavaScript errors and render what they should."""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import re
import select
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from expflow_flows.errors import ExpflowError
from expflow_flows.sweep.report import (
    chromium_command,
    export_png,
    find_chromium,
    write_dashboard,
    write_status_page,
)

EVIL_SCRIPT = "<script>window.__xss=1;alert(1)</script>"
EVIL_IMG = "</script><img src=x onerror=window.__xss=2>"
RAW_EVIL = ("<script>window.__xss", "</script><img", "<img src=x")


def make_rows(n: int = 60, *, seed: int = 0, evil: bool = False) -> list[dict[str, Any]]:
    """Synthetic sweep rows: 3 params (log-continuous, int, categorical), 2 metrics, all statuses."""
    rng = random.Random(seed)
    opts = ["adam", "sgd", EVIL_SCRIPT] if evil else ["adam", "sgd"]
    rows = []
    for i in range(n):
        lr = 10 ** rng.uniform(-4, -1)
        bs = rng.choice([16, 32, 64])
        opt = opts[i % len(opts)]
        loss = (math.log10(lr) + 2.5) ** 2 + bs / 100 + (0.3 if opt == "sgd" else 0.0)
        loss += rng.gauss(0, 0.05)
        status = "ok"
        if i % 17 == 5:
            status = "failed"
        elif i % 13 == 3:
            status = "warning"
        elif i % 11 == 7:
            status = "pruned"
        reason = "" if status == "ok" else f"{status}: something happened"
        if evil and status != "ok":
            reason = EVIL_IMG
        rows.append(
            {
                "combo_id": f"c{i:05d}",
                "combo_index": i,
                "step": "train",
                "status": status,
                "reason": reason,
                "log_excerpt": (EVIL_IMG if evil else "")
                + f"epoch 1\nepoch 2 of combo {i}\nTraceback (most recent call last)"
                if status != "ok"
                else "",
                "run_dir": f"/tmp/runs/c{i:05d}",
                "wall_s": rng.uniform(1, 5),
                "cpu_s": 1.0,
                "peak_rss_mb": 100.0,
                "param:lr": lr,
                "param:batch_size": bs,
                "param:optimizer": opt,
                "metric:loss": None if status == "failed" else loss,
                "metric:acc": None if status == "failed" else 1 - loss / 10,
            }
        )
    return rows


def _sections(page: str) -> set[str]:
    return set(re.findall(r"<section id='([a-z]+)'>", page))


# --------------------------------------------------------------------------- dashboard


def test_dashboard_has_every_section(tmp_path: Path) -> None:
    path = write_dashboard(make_rows(), tmp_path / "d.html", title="sweep one", top_k=5)
    page = path.read_text()
    assert _sections(page) == {"status", "top", "heatmaps", "parallel", "marginals", "metrics"}
    assert page.count("Plotly.newPlot(") == 4  # heatmap (faceted), parcoords, marginals, hists
    assert page.count("class='plotly-graph-div'") == 4
    # plotly.js is the folder's one shared file, loaded by its relative name: no CDN, no
    # inline copy of the 4.7 MB script.
    js = f"plotly-{get_plotlyjs_version()}.min.js"
    assert page.count("<script src=") == 1 and f"<script src='{js}'></script>" in page
    assert (tmp_path / js).stat().st_size == len(get_plotlyjs().encode())
    assert path.stat().st_size < 1_000_000
    assert "\\\\u003c" not in page  # no double-escaped JSON
    # First metric is the default objective; the facet is the 3rd param (3 values).
    assert "Objective <b>loss</b> (minimize)" in page
    assert "by batch_size" in page or "by optimizer" in page
    # Top-k table: 5 ranked rows, none of them failed/pruned.
    top = page.split("<section id='top'>")[1].split("</section>")[0]
    assert top.count("<tr>") == 6
    assert "failed" not in top and "pruned" not in top
    # Status counts count every row, including the ones left out of the plots.
    status = page.split("<section id='status'>")[1].split("</section>")[0]
    assert "<td>failed</td><td>4</td>" in status.replace(
        "<span class='chip' style='background:#c62828'></span>", ""
    )
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no tmp behind


def test_dashboard_top_k_respects_direction(tmp_path: Path) -> None:
    rows = make_rows()
    page = write_dashboard(
        rows, tmp_path / "d.html", title="t", objective="metric:acc", maximize=True, top_k=1
    ).read_text()
    best = max((r for r in rows if r["status"] in ("ok", "warning")), key=lambda r: r["metric:acc"])
    top = page.split("<section id='top'>")[1]
    assert f"<td>1</td><td>{best['combo_index']}</td>" in top
    assert "highest <b>acc</b>" in top


def test_dashboard_explicit_facet_and_bad_names(tmp_path: Path) -> None:
    page = write_dashboard(
        make_rows(), tmp_path / "d.html", title="t", facet="optimizer"
    ).read_text()
    assert "by optimizer" in page
    with pytest.raises(ExpflowError, match="objective 'nope'.*loss, acc"):
        write_dashboard(make_rows(), tmp_path / "x.html", title="t", objective="nope")
    with pytest.raises(ExpflowError, match="facet 'nope'.*lr, batch_size, optimizer"):
        write_dashboard(make_rows(), tmp_path / "x.html", title="t", facet="nope")


def test_dashboard_degrades_gracefully(tmp_path: Path) -> None:
    # One categorical param only: no heatmap, but parcoords, marginals and histograms.
    rows = [
        {"combo_id": str(i), "combo_index": i, "status": "ok", "param:opt": o, "metric:m": i}
        for i, o in enumerate(["a", "b", "c", "a", "b", "c"])
    ]
    page = write_dashboard(rows, tmp_path / "one.html", title="t").read_text()
    assert "Heatmaps need at least two varied parameters (only opt varies)" in page
    assert page.count("Plotly.newPlot(") == 3

    # No ok rows at all: the page says so, and still counts them.
    failed = [dict(r, status="failed", **{"metric:m": None}) for r in make_rows(10)]
    page = write_dashboard(failed, tmp_path / "none.html", title="t").read_text()
    assert "No ok or warning rows with a finite loss" in page
    assert "Plotly.newPlot(" not in page
    assert "<td>10</td><td>100.0%</td>" in page

    # No metrics at all; no rows at all.
    bare = [{"combo_id": "a", "combo_index": 0, "status": "ok", "param:x": 1}]
    page = write_dashboard(bare, tmp_path / "bare.html", title="t").read_text()
    assert "No metric was recorded" in page
    page = write_dashboard([], tmp_path / "empty.html", title="t").read_text()
    assert "0 combinations" in page


def test_dashboard_merges_steps_of_one_combination(tmp_path: Path) -> None:
    rows = [
        {"combo_id": "a", "combo_index": 0, "step": "train", "status": "ok", "param:x": 1,
         "metric:train_loss": 0.5},
        {"combo_id": "a", "combo_index": 0, "step": "eval", "status": "failed", "param:x": 1,
         "reason": "eval crashed"},
        {"combo_id": "b", "combo_index": 1, "step": "train", "status": "ok", "param:x": 2,
         "metric:train_loss": 0.4},
    ]  # fmt: skip
    page = write_dashboard(rows, tmp_path / "d.html", title="t").read_text()
    assert "2 combinations (3 rows)" in page
    assert "eval crashed" in page


def test_dashboard_10k_rows(tmp_path: Path) -> None:
    path = write_dashboard(make_rows(10_000), tmp_path / "big.html", title="big", top_k=20)
    page = path.read_text()
    assert page.count("Plotly.newPlot(") == 4
    assert path.stat().st_size < 20_000_000


# --------------------------------------------------------------------------- honest plots


def grid_rows(nrmse_of, *, extra: dict | None = None) -> list[dict[str, Any]]:
    """lr × width × seed (3×3×3), a constant epochs, ``val_nrmse = nrmse_of(lr, width, seed)``."""
    rows = []
    for i, (lr, width, seed) in enumerate(
        (lr, w, s) for lr in (1e-4, 1e-3, 1e-2) for w in (32, 64, 128) for s in (0, 1, 2)
    ):
        rows.append(
            {
                "combo_id": f"c{i}",
                "combo_index": i,
                "status": "ok",
                "param:lr": lr,
                "param:width": width,
                "param:seed": seed,
                "param:epochs": 20,
                "metric:val_nrmse": nrmse_of(lr, width, seed),
                **(extra or {}),
            }
        )
    return rows


def figures(page: str) -> dict[str, dict[str, Any]]:
    """The page's plotly figures by the start of their title."""
    out = {}
    for js in re.findall(r"<script>\(function\(\)\{var f=(.*?);Plotly", page):
        fig = json.loads(js)
        out[fig["layout"]["title"]["text"].split(" ")[0]] = fig
    return out


def values(data: Any) -> list[Any]:
    """A plotly array, plain or typed (``{"dtype": ..., "bdata": base64, "shape"}``), as lists."""
    if isinstance(data, dict) and "bdata" in data:
        import base64

        import numpy as np

        flat = np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"])
        shape = [int(n) for n in str(data.get("shape", len(flat))).split(",")]
        return flat.reshape(shape).tolist()
    return list(data)


def decades(lr: float, width: int, seed: int) -> float:
    """An error spanning three decades over lr, mildly over width and seed."""
    return {1e-4: 0.5, 1e-3: 0.002, 1e-2: 0.05}[lr] * (1 + width / 256) * (1 + seed / 10)


def test_dashboard_pools_the_replicate_and_leaves_out_constant_parameters(
    tmp_path: Path,
) -> None:
    rows = grid_rows(decades)
    # act varies in the table, but its only other value belongs to failed runs.
    for r in rows:
        r["param:act"] = "relu"
    rows.append(dict(rows[0], combo_id="x", status="failed", **{"param:act": "gelu"}))
    rows[-1]["metric:val_nrmse"] = None
    page = write_dashboard(rows, tmp_path / "d.html", title="t", replicate="seed").read_text()
    figs = figures(page)
    # Everything a figure shows (its traces and layout, not plotly's style template).
    text = json.dumps([[f["data"], {**f["layout"], "template": None}] for f in figs.values()])
    for name in ("seed", "epochs", "act"):
        assert name not in text, name  # no heatmap axis, facet, importance or panel for it
    assert "Parameters by importance: lr, width." in page
    assert "seed is the replicate" in page
    dims = [d["label"] for d in figs["parameters"]["data"][0]["dimensions"]]
    assert [d.split(" ")[0] for d in dims] == ["lr", "width", "val_nrmse"]
    assert [t["name"] for t in figs["marginal"]["data"]] == ["lr", "width"]
    # The one heatmap is lr × width, and each cell pools the three seeds.
    heat = figs["mean"]["data"]
    assert len(heat) == 1 and heat[0]["type"] == "heatmap"
    assert {cell[0] for row in values(heat[0]["customdata"]) for cell in row} == {3}


def test_dashboard_uses_log_axes_for_values_spanning_decades(tmp_path: Path) -> None:
    page = write_dashboard(grid_rows(decades), tmp_path / "d.html", title="t").read_text()
    figs = figures(page)
    marg = figs["marginal"]
    lr_trace, width_trace = marg["data"]
    assert marg["layout"]["yaxis"]["type"] == "log"  # val_nrmse spans 0.002 … 0.8
    assert marg["layout"]["xaxis"]["type"] == "log"  # lr spans 1e-4 … 1e-2
    assert marg["layout"]["xaxis2"]["type"] == "linear"  # width spans 32 … 128 only
    assert values(lr_trace["x"]) == [1e-4, 1e-3, 1e-2]
    # Geometric means, and error bars that stay above zero on the log axis.
    y, low = values(lr_trace["y"]), values(lr_trace["error_y"]["arrayminus"])
    assert all(a - b > 0 for a, b in zip(y, low, strict=True))
    dims = figs["parameters"]["data"][0]["dimensions"]
    assert dims[0]["label"] == "lr (log scale)" and dims[-1]["label"] == "val_nrmse (log scale)"
    assert dims[0]["ticktext"] == ["0.0001", "0.001", "0.01"]
    assert dims[-1]["values"] and max(values(dims[-1]["values"])) < 0  # log10 of values < 1
    heat = figs["mean"]
    assert "log" in heat["layout"]["coloraxis"]["colorbar"]["title"]["text"]
    hist = figs["metric"]
    assert hist["layout"]["xaxis"]["title"]["text"] == "val_nrmse (log scale)"
    # A metric within one decade keeps linear axes.
    narrow = grid_rows(lambda lr, w, s: 0.1 + lr * 10 + s / 100)
    figs = figures(write_dashboard(narrow, tmp_path / "n.html", title="t").read_text())
    assert figs["marginal"]["layout"]["yaxis"]["type"] == "linear"
    assert figs["parameters"]["data"][0]["dimensions"][-1]["label"] == "val_nrmse"


def test_dashboard_error_bars_stay_inside_the_metric_domain(tmp_path: Path) -> None:
    # One unstable lr: seeds at 0.01, 0.02 and 0.9 give mean - std below zero.
    def unstable(lr: float, width: int, seed: int) -> float:
        return (0.01, 0.02, 0.9)[seed] if lr == 1e-2 else 0.3 + width / 1000

    page = write_dashboard(grid_rows(unstable), tmp_path / "d.html", title="t").read_text()
    marg = figures(page)["marginal"]
    assert marg["layout"]["yaxis"]["type"] == "linear"  # 0.01 … 0.9 is under two decades
    for trace in marg["data"]:
        y = values(trace["y"])
        low = values(trace["error_y"]["arrayminus"])
        high = values(trace["error_y"]["array"])
        assert all(a - b >= 0 for a, b in zip(y, low, strict=True)), trace["name"]
        assert all(h >= b for h, b in zip(high, low, strict=True))
    lr_trace = marg["data"][0]
    i = values(lr_trace["x"]).index(1e-2)
    assert values(lr_trace["error_y"]["arrayminus"])[i] == pytest.approx(values(lr_trace["y"])[i])
    assert "clipped" in page  # the page says why a bar stops at zero


# --------------------------------------------------------------------------- escaping


def test_nothing_user_supplied_is_unescaped(tmp_path: Path) -> None:
    rows = make_rows(40, evil=True)
    for r in rows[:3]:
        r["param:" + EVIL_IMG] = r["combo_index"] % 2
        r["metric:" + EVIL_SCRIPT] = 1.0
        r["run_dir"] = EVIL_IMG
    title = EVIL_SCRIPT + EVIL_IMG
    dash = write_dashboard(rows, tmp_path / "d.html", title=title).read_text()
    status = write_status_page(rows, tmp_path / "s.html", title=title, total=50).read_text()
    for page in (dash, status):
        for raw in RAW_EVIL:
            assert raw not in page
        assert "&lt;script&gt;window.__xss=1" in page
    # Inside the figure JSON, < > & are \u escapes, so nothing can close the <script>.
    scripts = re.findall(r"<script>\(function\(\)\{var f=(.*?);Plotly", dash)
    assert scripts
    for js in scripts:
        assert "<" not in js and ">" not in js and "&" not in js
        fig = json.loads(js)
        assert fig["data"]


def test_hostile_title_and_param_value_show_as_text(tmp_path: Path) -> None:
    title = "<script>alert(1)</script>"
    breakout = "a</script><script>alert(2)</script>"
    rows = make_rows(30)
    for r in rows:
        if r["param:optimizer"] == "sgd":
            r["param:optimizer"] = breakout
    dash = write_dashboard(rows, tmp_path / "d.html", title=title, top_k=30).read_text()
    status = write_status_page(rows, tmp_path / "s.html", title=title, total=40).read_text()
    shown_title = "&lt;script&gt;alert(1)&lt;/script&gt;"
    shown_value = "a&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;"
    for page in (dash, status):
        assert f"<title>{shown_title}</title>" in page and f"<h1>{shown_title}</h1>" in page
        assert "<script>alert" not in page and "alert(2)</script>" not in page
    # The dashboard still ranks the value in its table and plots it (as plotly text).
    top = dash.split("<section id='top'>")[1].split("</section>")[0]
    assert f"<td>{shown_value}</td>" in top
    assert dash.count("Plotly.newPlot(") == 4
    figures = re.findall(r"<script>\(function\(\)\{var f=(.*?);Plotly", dash)
    assert any(shown_value in json.dumps(json.loads(js)) for js in figures)
    # The status page still refreshes and has a cell per combination showing the value.
    assert "<meta http-equiv='refresh' content='5'>" in status
    assert status.count("<details ") == 30 and status.count("<i></i>") == 10
    assert f"optimizer={shown_value}</p>" in status


# --------------------------------------------------------------------------- status page


def test_status_page_running_and_finished(tmp_path: Path) -> None:
    rows = make_rows(60)
    page = write_status_page(rows, tmp_path / "s.html", title="live", total=100).read_text()
    assert "<meta http-equiv='refresh' content='5'>" in page
    assert "<b id='done'>60 / 100</b>" in page
    assert "running" in page
    assert page.count("<details ") == 60
    assert page.count("<i></i>") == 40  # pending combinations
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "warning", "failed", "pruned")}
    for status, cls in (("ok", "o"), ("warning", "w"), ("failed", "f"), ("pruned", "p")):
        assert page.count(f"<details class={cls}>") == counts[status]
        assert f"{status} {counts[status]}" in page
    assert ".o>summary{background:#2e7d32}" in page
    assert ".w>summary{background:#ef6c00}" in page
    assert ".f>summary{background:#c62828}" in page
    assert ".p>summary{background:#9e9e9e}" in page
    assert "failed: something happened" in page and "Traceback" in page
    assert "lr=" in page and "optimizer=adam" in page

    page = write_status_page(rows, tmp_path / "s.html", title="live", refresh_s=None).read_text()
    assert "http-equiv" not in page
    assert "finished" in page
    assert "<b id='done'>60</b>" in page
    assert not list(tmp_path.glob(".*tmp"))


def test_status_page_10k_rows_is_compact(tmp_path: Path) -> None:
    rows = make_rows(10_000)
    for r in rows:
        if r["status"] != "ok":
            r["log_excerpt"] = "<x>" * 10_000  # huge logs are cut to a tail; < grows when escaped
    path = write_status_page(rows, tmp_path / "s.html", title="big", total=10_000)
    assert path.stat().st_size < 5_000_000
    assert path.read_text().count("<details ") == 10_000


# --------------------------------------------------------------------------- headless Chromium

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (scripts/ensure-chromium.sh installs it; needs root and apt)",
)


class _Cdp:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (stdlib only)."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.events: list[dict[str, Any]] = []
        self.buf = b""
        self.next_id = 0
        self.profile = tempfile.TemporaryDirectory(prefix="expflow-cdp-")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # Chromium reads commands on fd 3 and answers on fd 4; bash puts our pipe ends there
        # (moved above 9 first, so the redirections cannot clobber each other).
        a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        os.close(to_child_r)
        os.close(from_child_w)
        cmd = chromium_command(
            str(CHROMIUM),
            self.profile.name,
            "--remote-debugging-pipe",
            "--window-size=1400,1000",
            "about:blank",
        )
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec 3<&{a} 4>&{b} {a}<&- {b}>&-; exec "$@"', "cdp", *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(a, b),
        )
        os.close(a)
        os.close(b)
        self.w, self.r = to_child_w, from_child_r
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
            self.session = attached["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                self.call(f"{domain}.enable", session=True)
        except BaseException:
            self.close()  # never leave a browser behind
            raise

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = False
    ) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while True:
            ev = self._read()
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def evaluate(self, expression: str) -> Any:
        res = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluate failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert calls and error log entries so far."""
        out = []
        for ev in self.events:
            method, p = ev.get("method"), ev.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"uncaught: {d.get('exception', {}).get('description') or d['text']}")
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p['args']]}")
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']}")
        return out

    def close(self) -> None:
        try:
            os.write(self.w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            os.close(self.w)
            os.close(self.r)
            self.profile.cleanup()


@pytest.fixture
def browser():
    cdp = _Cdp()
    try:
        yield cdp
    finally:
        cdp.close()


def _load(cdp: _Cdp, path: Path, ready_js: str) -> None:
    cdp.call("Page.navigate", {"url": path.resolve().as_uri()}, session=True)
    cdp.wait_event("Page.loadEventFired")
    while not cdp.evaluate(ready_js):
        if time.monotonic() > cdp.deadline:
            raise TimeoutError(f"page never became ready: {ready_js}")
        time.sleep(0.1)
    time.sleep(0.5)  # let late animation-frame work (WebGL parcoords) throw, if it would
    cdp.evaluate("1")  # drain events that arrived meanwhile


@needs_chromium
def test_cdp_client_sees_errors(browser: _Cdp, tmp_path: Path) -> None:
    """The harness itself: a page with a console.error and a throw is reported as broken."""
    bad = tmp_path / "bad.html"
    bad.write_text("<p id=x>hi</p><script>console.error('boom');undefinedFn()</script>")
    _load(browser, bad, "!!document.getElementById('x')")
    errors = browser.errors()
    assert any("boom" in e for e in errors)
    assert any("undefinedFn" in e for e in errors)


@needs_chromium
def test_dashboard_renders_in_chromium_without_js_errors(browser: _Cdp, tmp_path: Path) -> None:
    rows = make_rows(300, evil=True)
    path = write_dashboard(rows, tmp_path / "d.html", title=EVIL_SCRIPT + EVIL_IMG)
    n_figs = path.read_text().count("class='plotly-graph-div'")
    assert n_figs == 4
    ready = (
        "document.querySelectorAll('.plotly-graph-div .main-svg').length >= 8 && "
        "document.querySelectorAll('.plotly-graph-div.js-plotly-plot').length == "
        f"{n_figs}"
    )
    _load(browser, path, ready)
    assert browser.errors() == []
    dom = browser.evaluate(
        """(() => {
        const q = s => document.querySelectorAll(s).length;
        const svgText = Array.from(document.querySelectorAll('.main-svg'))
            .map(s => s.textContent).join('\\n');
        return {
            title: document.title,
            xss: window.__xss === undefined ? null : window.__xss,
            imgs: q('img'),
            sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
            plots: q('.plotly-graph-div.js-plotly-plot'),
            heatmaps: q('.plotly-graph-div .heatmaplayer image'),
            parcoords: q('.plotly-graph-div .parcoords .axis-title'),
            glCanvas: q('.plotly-graph-div .gl-container canvas'),
            bars: q('.plotly-graph-div .bars .point'),
            markers: q('.plotly-graph-div .scatterlayer .point'),
            topRows: q('#top table tr'),
            statusRows: q('#status table tr'),
            svgText: svgText,
            tableText: document.querySelector('#top table').textContent,
        };
    })()"""
    )
    assert dom["xss"] is None and dom["imgs"] == 0  # no injected script or element ran
    assert dom["title"] == EVIL_SCRIPT + EVIL_IMG  # shown literally, not interpreted
    assert dom["sections"] == ["status", "top", "heatmaps", "parallel", "marginals", "metrics"]
    assert dom["plots"] == n_figs
    assert dom["heatmaps"] >= 2  # one heatmap per facet value
    assert dom["parcoords"] == 4  # lr, batch_size, optimizer, loss
    assert dom["glCanvas"] >= 1
    assert dom["bars"] > 0 and dom["markers"] > 0
    assert dom["topRows"] == 21 and dom["statusRows"] >= 5
    # Escaped text round-trips: plotly decodes the entities and shows the literal value.
    assert EVIL_SCRIPT in dom["svgText"] and EVIL_SCRIPT in dom["tableText"]


@needs_chromium
def test_dashboard_of_a_seeded_grid_renders_log_axes_in_chromium(
    browser: _Cdp, tmp_path: Path
) -> None:
    path = write_dashboard(grid_rows(decades), tmp_path / "d.html", title="grid")
    ready = "document.querySelectorAll('.plotly-graph-div.js-plotly-plot').length == 4"
    _load(browser, path, ready)
    assert browser.errors() == []
    dom = browser.evaluate(
        """(() => {
        const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
        const byTitle = t => plots.find(p => p._fullLayout.title.text.startsWith(t));
        const marg = byTitle('marginal');
        return {
            margY: marg._fullLayout.yaxis.type,
            margX: marg._fullLayout.xaxis.type,
            errorBars: marg.querySelectorAll('.errorbars path').length,
            svgText: plots.map(p => p.querySelector('.main-svg').textContent).join(' '),
            parcoords: Array.from(document.querySelectorAll('.parcoords .axis-title'))
                .map(e => e.textContent),
        };
    })()"""
    )
    assert dom["margY"] == "log" and dom["margX"] == "log"
    assert dom["errorBars"] == 6  # three lr and three width means
    assert "seed" not in dom["svgText"] and "epochs" not in dom["svgText"]
    assert dom["parcoords"] == ["lr (log scale)", "width", "val_nrmse (log scale)"]


@needs_chromium
def test_status_page_renders_in_chromium_without_js_errors(browser: _Cdp, tmp_path: Path) -> None:
    rows = make_rows(200, evil=True)
    path = write_status_page(rows, tmp_path / "s.html", title=EVIL_IMG, total=250, refresh_s=60)
    _load(browser, path, "document.readyState === 'complete'")
    assert browser.errors() == []
    dom = browser.evaluate(
        """(() => {
        const cells = Array.from(document.querySelectorAll('#grid details'));
        const colour = c => getComputedStyle(c.querySelector('summary')).backgroundColor;
        const byClass = {};
        for (const c of cells) byClass[c.className] = colour(c);
        return {
            xss: window.__xss === undefined ? null : window.__xss,
            imgs: document.querySelectorAll('img').length,
            title: document.title,
            refresh: document.querySelector('meta[http-equiv=refresh]').content,
            cells: cells.length,
            pending: document.querySelectorAll('#grid i').length,
            colours: byClass,
            done: document.getElementById('done').textContent,
            firstFailed: document.querySelector('#grid details.f').textContent,
        };
    })()"""
    )
    assert dom["xss"] is None and dom["imgs"] == 0
    assert dom["title"] == EVIL_IMG
    assert dom["refresh"] == "60"
    assert dom["cells"] == 200 and dom["pending"] == 50
    assert dom["done"] == "200 / 250"
    assert dom["colours"] == {
        "o": "rgb(46, 125, 50)",
        "w": "rgb(239, 108, 0)",
        "f": "rgb(198, 40, 40)",
        "p": "rgb(158, 158, 158)",
    }
    assert EVIL_IMG in dom["firstFailed"] and "Traceback" in dom["firstFailed"]


@needs_chromium
def test_export_png(tmp_path: Path) -> None:
    dash = write_dashboard(make_rows(), tmp_path / "d.html", title="png")
    out = export_png(dash, tmp_path / "d.png", window_size=_TALL)
    assert out == tmp_path / "d.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert _colours(out) > _PLOTTED  # the plots drew, with plotly.js from the page's folder
    import plotly.graph_objects as go

    fig_png = export_png(go.Figure(go.Bar(y=[1, 3, 2])), tmp_path / "fig.png")
    assert fig_png is not None and fig_png.read_bytes().startswith(b"\x89PNG")
    # A self-refreshing status page must not hang the screenshot.
    live = write_status_page(make_rows(), tmp_path / "s.html", title="live", refresh_s=1)
    assert export_png(live, tmp_path / "s.png", timeout_s=60) is not None


_TALL = (1200, 2600)  # a window down to the heatmaps and parallel coordinates
# Distinct colours in a shot of the dashboard: its tables and status chips alone make ~200,
# its heatmaps and coloured lines thousands.
_PLOTTED = 1000


def _colours(png: Path) -> int:
    """How many distinct clearly coloured (not grey) pixel values a screenshot holds."""
    image = pytest.importorskip("PIL.Image")
    pixels = image.open(png).convert("RGB").get_flattened_data()
    return len({p for p in pixels if max(p) - min(p) > 40})


@needs_chromium
def test_export_png_draws_the_plots_of_a_copied_page(tmp_path: Path) -> None:
    """A page shot from a copy in a temp folder (a self-reloading page, via <base href>) or
    given as text still loads plotly.js and draws its plots; without plotly.js none draw."""
    dash = write_dashboard(make_rows(), tmp_path / "d.html", title="png")
    text = dash.read_text()
    live = tmp_path / "live.html"
    live.write_text(text.replace("<title>", "<meta http-equiv='refresh' content='1'><title>"))
    for source, name in ((live, "live.png"), (text, "text.png")):
        shot = export_png(source, tmp_path / name, window_size=_TALL, timeout_s=60)
        assert shot is not None and _colours(shot) > _PLOTTED, name
    for js in tmp_path.glob("plotly-*.min.js"):
        js.unlink()
    shot = export_png(dash, tmp_path / "bare.png", window_size=_TALL, timeout_s=60)
    assert shot is not None and _colours(shot) < _PLOTTED  # the colour count tells them apart


def test_export_png_without_chromium(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    dash = write_dashboard(make_rows(20), tmp_path / "d.html", title="t")
    assert export_png(dash, tmp_path / "d.png") is None
    assert "no chromium on PATH" in caplog.text
    assert not (tmp_path / "d.png").exists()
