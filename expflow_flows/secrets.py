"""Scrub secret-looking values out of params, info and reports before they are written.

A key is secret-looking when its name contains one of :data:`SECRET_WORDS`
(case-insensitive). Matching is by substring on purpose: ``apiKey``,
``HF_TOKEN`` and ``db_password`` must all be caught, and a harmless key that
gets masked (``pin_memory``) costs far less than a leaked credential. Callers
that know a key is harmless can exempt it by exact name with ``keep``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SECRET_WORDS = ("key", "secret", "token", "password", "pin")
MASK = "***"


def is_secret_key(name: object) -> bool:
    """True when a key's name contains a secret-looking word."""
    text = str(name).lower()
    return any(word in text for word in SECRET_WORDS)


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
