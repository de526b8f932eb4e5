"""HTML pages: the jinja2 templates in ``expflow_flows/templates``, rendered with autoescape.

Every value a template prints is HTML-escaped unless it is marked safe; the only safe values
are our own CSS and figure JSON passed through the ``script_json`` filter. plotly.js is not
inlined: ``shared_plotly_js`` writes it once per folder and pages load it by a relative name.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

# Characters that could end a <script> element or start an entity or comment, as JSON escapes;
# U+2028/U+2029 end a line in older JavaScript parsers.
_SCRIPT_SWAPS = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("/", "\\u002f"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


def _script_json(value: Any) -> Markup:
    # plotly figures hold numpy arrays, which only plotly's encoder writes.
    if hasattr(value, "to_plotly_json"):
        from plotly.io.json import to_json_plotly

        text = to_json_plotly(value)
    else:
        text = json.dumps(value)
    for raw, escaped in _SCRIPT_SWAPS:
        text = text.replace(raw, escaped)
    return Markup(text)


@cache
def environment() -> jinja2.Environment:
    """The one jinja2 environment: package templates, autoescape on, undefined names an error."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("expflow_flows", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["script_json"] = _script_json
    return env


def render(template_name: str, **context: Any) -> str:
    """Render the template ``template_name`` (e.g. ``"sweep_status.html.j2"``) with ``context``."""
    return environment().get_template(template_name).render(**context)


def shared_plotly_js(folder: Path) -> str:
    """Write plotly.js once into ``folder`` as ``plotly-<version>.min.js``; return that name.

    Pages beside it load it with a relative ``<script src>``, so they open offline (file://)
    and a folder of reports holds one copy of the ~5 MB script rather than one per page.
    """
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    name = f"plotly-{get_plotlyjs_version()}.min.js"
    data = get_plotlyjs().encode("utf-8")
    target = Path(folder) / name
    # The version names the content; the size catches a damaged or foreign file of that name.
    if target.is_file() and target.stat().st_size == len(data):
        return name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return name
