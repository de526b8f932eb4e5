"""Reading a YAML file that must hold a mapping, with one clear error for each way it can fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError


def read_mapping(
    path: str | Path,
    what: str,
    empty_hint: str = "",
    loader: Any = None,
    mapping: str = "a mapping",
    allow_empty: bool = False,
) -> dict:
    """The mapping in ``path``; ``what`` names the file in errors (e.g. "search space file").

    An empty file is an error saying ``empty_hint``, or ``{}`` with ``allow_empty``
    (a settings file whose defaults are all wanted)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        why = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ExpflowError(f"{what} {str(path)!r} {why}")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=loader) if loader else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ExpflowError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExpflowError(f"{what} {str(path)!r} cannot be read ({exc})") from None
    if data is None and allow_empty:
        return {}
    if data is None:
        raise ExpflowError(f"{what} {str(path)!r} is empty; {empty_hint}")
    if not isinstance(data, dict):
        raise ExpflowError(
            f"{what} {str(path)!r} must hold {mapping} at the top level, not a {type(data).__name__}"
        )
    return data
