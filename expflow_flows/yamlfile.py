"""Reading a YAML file that must hold a mapping, with one clear error for each way it can fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


def _unique_keys(loader: type) -> type:
    """``loader`` that refuses a mapping key given twice (YAML would keep the last one)."""

    import yaml

    class UniqueKeys(loader):  # type: ignore[valid-type, misc]
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: set[Any] = set()
            pairs = node.value if isinstance(node, yaml.MappingNode) else []
            for key_node, _ in pairs:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base loader says why
                    continue
                if duplicate:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


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
        data = yaml.load(text, Loader=_unique_keys(loader or yaml.SafeLoader))
    except _DuplicateKey as exc:
        raise ExpflowError(
            f"{what} {str(path)!r}: key {exc.key!r} is given twice (again at line {exc.line}); "
            "keep one"
        ) from None
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
