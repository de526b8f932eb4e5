"""Identities for caching and resume, Merkle-style.

A step's cache key hashes what determines its result: the trainable's code (the
script's bytes, or the source file of a callable's module), the parameters, the
checksums of declared input files, the key of the step it reads from, and a
user-set version. Change any of them and the key changes; nothing else does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from expflow_flows.bundles.manifest import hash_file
from expflow_flows.errors import ExpflowError
from expflow_flows.runs.trainable import Trainable


def _canonical(obj: Any) -> str:
    def default(o: Any) -> Any:
        if hasattr(o, "item"):  # numpy scalars
            return o.item()
        return str(o)

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


@lru_cache(maxsize=4096)
def file_checksum(path: str) -> str:
    """SHA-256 of a file's bytes (cached per path for one process)."""
    try:
        return hash_file(path)[0]
    except OSError as exc:
        raise ExpflowError(f"cannot read {path!r} to checksum it: {exc.strerror or exc}") from None


def trainable_fingerprint(spec: str, launch: dict[str, Any] | None = None) -> str:
    """What version of the code a trainable is: its script's or module's source hash, and
    how it is launched (a command and the files it names, an interpreter, arguments,
    environment) when that is not the default."""
    from expflow_flows.runs.launch import Launch

    how = Launch.from_value(launch)
    if how == Launch():
        return _code_fingerprint(spec)
    words = list(how.command) + list(how.interpreter) + list(how.args)
    files = {w: file_checksum(w) for w in words if Path(w).expanduser().is_file()}
    payload = json.dumps(
        {"launch": how.__dict__, "files": files},
        sort_keys=True,
        default=list,
    )
    code = "" if how.command else _code_fingerprint(spec)
    return f"{code}|launch:" + hashlib.sha256(payload.encode()).hexdigest()


def _code_fingerprint(spec: str) -> str:
    t = Trainable.parse(spec)
    if t.kind == "script":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ExpflowError(f"trainable script {spec!r} does not exist")
        return "script:" + file_checksum(str(path.resolve()))
    module, _, attr = spec.partition(":")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ExpflowError(f"trainable {spec!r}: cannot find module {module!r}")
    return f"callable:{attr}:" + file_checksum(found.origin)


def cache_key(
    fingerprint: str,
    params: dict[str, Any],
    *,
    inputs: dict[str, str] | None = None,
    upstream: str = "",
    version: str = "",
    budget: dict[str, Any] | None = None,
) -> str:
    """The key of one step of one combination (hex SHA-256)."""
    payload = {
        "code": fingerprint,
        "params": params,
        "inputs": inputs or {},
        "upstream": upstream,
        "version": version,
        "budget": budget or {},
    }
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()
