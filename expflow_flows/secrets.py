"""One secrets policy: secret-looking values reach the trainable and nothing else.

A key is secret-looking when its name contains one of :data:`SECRET_WORDS`
(case-insensitive), or is listed in ``$EXPFLOW_SECRET_KEYS`` (comma-separated names,
for a secret whose name gives it away to nobody, e.g. ``hf_repo_write``). Matching is
by substring on purpose: ``apiKey``, ``HF_TOKEN`` and ``db_password`` must all be
caught, and a harmless key that gets masked (``pin_memory``) costs far less than a
leaked credential. Callers that know a key is harmless can exempt it by exact name
with ``keep``.

Everything expflow writes (params.json, metadata and the command lines in it, sweep
stores and their exports, reports, artifacts, Prefect parameters, the console,
tracking tools, packages) goes through :func:`scrub` or :func:`mask_command` first.
Where the real values must cross a boundary Prefect records (a nested flow's
parameters), :func:`seal` keeps them in this process and passes ``***`` plus an
opaque reference; :func:`unseal` puts them back on the other side.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

SECRET_WORDS = ("key", "secret", "token", "password", "pin")
MASK = "***"
USER_KEYS_ENV = "EXPFLOW_SECRET_KEYS"


def _user_keys() -> frozenset[str]:
    raw = os.environ.get(USER_KEYS_ENV, "")
    return frozenset(k.strip().lower() for k in raw.split(",") if k.strip())


def is_secret_key(name: object) -> bool:
    """True when a key's name contains a secret-looking word or is listed by the user."""
    text = str(name).lower()
    return any(word in text for word in SECRET_WORDS) or text in _user_keys()


_FLAG = re.compile(r"^(?:--?|\+\+?)(?P<name>[A-Za-z_][\w.\-]*)$")
_ASSIGN = re.compile(r"^(?P<pre>(?:--?|\+\+?)?)(?P<name>[A-Za-z_][\w.\-]*)=(?P<val>.*)$", re.S)


def mask_command(words: Sequence[str]) -> list[str]:
    """A command line with the values of secret-looking options masked: ``--api_key V``,
    ``--api_key=V``, Hydra's ``++db.password=V`` and ``token=V`` all become ``***``."""
    out: list[str] = []
    mask_next = False
    for word in map(str, words):
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        flag = _FLAG.match(word)
        if flag and is_secret_key(flag.group("name").rsplit(".", 1)[-1]):
            mask_next = True
            out.append(word)
            continue
        assign = _ASSIGN.match(word)
        if assign and is_secret_key(assign.group("name").rsplit(".", 1)[-1]):
            out.append(f"{assign.group('pre')}{assign.group('name')}={MASK}")
            continue
        out.append(word)
    return out


_SEALED: dict[str, dict[tuple[str, ...], Any]] = {}
_SEALED_LOCK = threading.Lock()
_HANDED: list[str] = []  # references the CLI handed to the flow it runs in this process


def _hidden(obj: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret_key(k) and v != MASK and v is not None:
                out[(*path, str(k))] = v
            else:
                out.update(_hidden(v, (*path, str(k))))
    return out


def seal(params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``params`` (nested mappings too) with secret-looking values masked, and a reference
    to the real values, kept in this process only; None when there was nothing to hide."""
    hidden = _hidden(params)
    if not hidden:
        return dict(params), None
    ref = uuid.uuid4().hex
    with _SEALED_LOCK:
        _SEALED[ref] = hidden
    return scrub(params), ref


def unseal(params: dict[str, Any] | None, ref: str | None) -> dict[str, Any] | None:
    """The real values back in place of the masks :func:`seal` put in ``params``.

    A reference this process does not hold fails: the run would otherwise get ``***``
    for its key and fail in a way that is hard to trace.
    """
    if not ref or params is None:
        return params
    with _SEALED_LOCK:
        hidden = _SEALED.get(ref)
    if hidden is None:
        raise LookupError(
            "the secret params were sealed in another process; run the nested flow "
            "from the pipeline that started it"
        )
    out = _copy(params)
    for path, value in hidden.items():
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(path[-1]) == MASK:
            node[path[-1]] = value
    return out


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    return obj


def release(ref: str | None) -> None:
    """Forget sealed values once the flow that needed them has ended."""
    if ref:
        with _SEALED_LOCK:
            _SEALED.pop(ref, None)


def hand_over(overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """Settings overrides for a flow this process is about to run, secrets masked (so
    Prefect's record of the flow's parameters holds none); the flow takes the real
    values back with :func:`take_over`."""
    if not overrides:
        return overrides
    masked, ref = seal(overrides)
    if ref:
        with _SEALED_LOCK:
            _HANDED.append(ref)
    return masked


def take_over(overrides: Any) -> Any:
    """The overrides :func:`hand_over` masked, with the real values back (when this
    process handed them over; a flow run started elsewhere gets what it was given).
    A validated overrides model is turned back into the mapping that was given."""
    with _SEALED_LOCK:
        ref = _HANDED.pop() if _HANDED else None
    if ref is None or overrides is None:
        return overrides
    if hasattr(overrides, "model_dump"):
        overrides = overrides.model_dump(exclude_unset=True)
    try:
        return unseal(overrides, ref)
    finally:
        release(ref)


def scrub(obj: Any, *, keep: Iterable[str] = ()) -> Any:
    """A copy of ``obj`` with the value of every secret-looking key replaced by ``***``.

    Recurses through dicts, lists and tuples; ``keep`` names keys never masked.
    """
    return _scrub(obj, frozenset(keep))


def _scrub(obj: Any, keep: frozenset[str]) -> Any:
    if isinstance(obj, dict):
        return {
            k: (MASK if is_secret_key(k) and str(k) not in keep else _scrub(v, keep))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_scrub(v, keep) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_scrub(v, keep) for v in obj)
    return obj
