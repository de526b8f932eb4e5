"""The expflow home's reports over HTTP, read-only, so links in the Prefect UI work.

A browser refuses ``file://`` links from an ``http://`` page, and on a team server a
file path means nothing to the person reading the UI. ``expflow server start`` runs
this server beside Prefect's (on loopback, the next port by default) and records its
address; flows then link reports as ``http://…`` URLs (:func:`report_link`).

What it serves, and nothing else: report files (HTML pages, their shared plotly.js,
images, CSV exports) under the runs folder (``/runs/…``) and the audits folder
(``/audits/…``). No directory listing (``/`` is an index of the report pages), no
hidden files, nothing outside those folders (symbolic links included), no JSON or
SQLite files (summaries, ledgers, the PIN), GET and HEAD only.

    python -m expflow_flows.reports_server --port 4201 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import html
import json
import mimetypes
import os
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from expflow_flows.home import expflow_home, runs_root

# File kinds a report is made of; anything else is not served.
SERVED_SUFFIXES = frozenset({".html", ".js", ".png", ".svg", ".css", ".csv", ".md"})
INDEX_LIMIT = 500
STATE_FILE = "reports-server.json"  # in <home>/server/: where the server listens


def roots() -> dict[str, Path]:
    """URL prefix → folder served under it."""
    return {"runs": runs_root(), "audits": expflow_home() / "audits"}


def resolve(url_path: str, served: dict[str, Path] | None = None) -> Path | None:
    """The file a URL path names, or None when it is not a served report file."""
    served = served or roots()
    parts = [p for p in urllib.parse.unquote(url_path).split("/") if p]
    if len(parts) < 2 or parts[0] not in served:
        return None
    if any(p.startswith(".") or "\\" in p or "\x00" in p for p in parts[1:]):
        return None
    root = served[parts[0]].resolve()
    try:
        path = root.joinpath(*parts[1:]).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    if path.suffix.lower() not in SERVED_SUFFIXES:
        return None
    return path


def url_for(path: Path, base: str, served: dict[str, Path] | None = None) -> str | None:
    """The URL of a report file under ``base``, or None when it is not served."""
    path = Path(path).resolve()
    for prefix, root in (served or roots()).items():
        root = root.resolve()
        if path.is_relative_to(root):
            rel = path.relative_to(root).as_posix()
            url = f"{base.rstrip('/')}/{prefix}/{urllib.parse.quote(rel)}"
            return url if resolve(urllib.parse.urlparse(url).path, served) else None
    return None


def report_link(path: str | Path) -> str:
    """How an artifact links a report: over HTTP when the reports server runs, else a
    ``file://`` URI (which opens from a local file manager, not from the UI)."""
    base = os.environ.get("EXPFLOW_REPORTS_URL") or _recorded_base()
    if base:
        url = url_for(Path(path), base)
        if url:
            return url
    return Path(path).resolve().as_uri()


def _recorded_base() -> str | None:
    try:
        data = json.loads((expflow_home() / "server" / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("url") if isinstance(data, dict) else None


def record(url: str) -> None:
    """Remember where the reports server listens (``expflow server start``)."""
    folder = expflow_home() / "server"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_FILE).write_text(json.dumps({"url": url}) + "\n")


def forget() -> None:
    """The reports server stopped: links go back to ``file://``."""
    (expflow_home() / "server" / STATE_FILE).unlink(missing_ok=True)


def index_page(served: dict[str, Path] | None = None) -> str:
    """The report pages, newest first, as links."""
    pages: list[tuple[float, str, str]] = []
    for prefix, root in (served or roots()).items():
        if not root.is_dir():
            continue
        for page in root.rglob("*.html"):
            rel = page.relative_to(root)
            if any(p.startswith(".") for p in rel.parts):
                continue
            try:
                pages.append((page.stat().st_mtime, prefix, rel.as_posix()))
            except OSError:
                continue
    pages.sort(reverse=True)
    items = "".join(
        f'<li><a href="/{prefix}/{urllib.parse.quote(rel)}">{html.escape(prefix + "/" + rel)}</a></li>'
        for _, prefix, rel in pages[:INDEX_LIMIT]
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>expflow reports</title>"
        "</head><body><h1>expflow reports</h1>"
        + (f"<ul>{items}</ul>" if items else "<p>No reports yet.</p>")
        + "</body></html>"
    )


class Handler(BaseHTTPRequestHandler):
    """GET and HEAD of report files; everything else is refused."""

    server_version = "expflow-reports"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._serve(body=False)

    def _refuse(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED, "read-only")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815 - http.server's names

    def _serve(self, *, body: bool) -> None:
        path_only = urllib.parse.urlparse(self.path).path
        if path_only in ("", "/"):
            data = index_page().encode("utf-8")
            kind = "text/html; charset=utf-8"
        else:
            path = resolve(path_only)
            if path is None:
                self.send_error(HTTPStatus.NOT_FOUND, "not a report")
                return
            data = path.read_bytes()
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")  # status pages change while a sweep runs
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        return  # quiet: the server's log would fill with page loads


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve until killed."""
    ThreadingHTTPServer((host, port), Handler).serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="expflow reports over HTTP, read-only")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    serve(args.port, args.host)


if __name__ == "__main__":
    main()
