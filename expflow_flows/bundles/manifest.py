"""File hashes and manifest entries: the sha256 and size of a file, and checking one against them.

A manifest entry is ``{"sha256": <hex>, "size": <bytes>}``. Submission bundles and
reproducibility packages list one per file under ``files`` in their ``manifest.json``;
sweep identities hash their code and input files with the same :func:`hash_file`.
A package's ``manifest.sig`` is the HMAC-SHA256 of its ``manifest.json`` bytes under a
team key (:func:`sign_bytes`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

ALGORITHM = "sha256"


def hash_stream(fh: IO[bytes]) -> tuple[str, int]:
    """SHA-256 and size of a binary file from where it stands to its end (``open()``, a tar member)."""
    if hasattr(fh, "getbuffer"):
        # file_digest hashes an in-memory buffer whole, whatever its position.
        raise TypeError("hash in-memory bytes with bytes_entry, not hash_stream")
    start = fh.tell()
    digest = hashlib.file_digest(fh, ALGORITHM)
    return digest.hexdigest(), fh.tell() - start


def hash_file(path: Path | str) -> tuple[str, int]:
    """SHA-256 and size of a file; an unreadable file raises OSError."""
    with open(path, "rb") as fh:
        return hash_stream(fh)


def hash_bytes(data: bytes) -> tuple[str, int]:
    """SHA-256 and size of ``data``."""
    return hashlib.sha256(data).hexdigest(), len(data)


def bytes_entry(data: bytes) -> dict[str, Any]:
    """The manifest entry of ``data``."""
    sha, size = hash_bytes(data)
    return {"sha256": sha, "size": size}


def file_entry(path: Path | str) -> dict[str, Any]:
    """The manifest entry of the file at ``path``."""
    sha, size = hash_file(path)
    return {"sha256": sha, "size": size}


class HashingReader:
    """Wraps a binary file so that whatever reads it (a copy, ``tarfile``) also hashes it."""

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        """Read and hash up to ``size`` bytes."""
        data = self.fh.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def entry(self) -> dict[str, Any]:
        """The manifest entry of the bytes read so far."""
        return {"sha256": self.digest.hexdigest(), "size": self.size}


def entry_problem(rel: str, expected: object, found: tuple[str, int]) -> str | None:
    """Why the file ``rel`` with ``found`` (sha256, size) does not match its entry; None if it does."""
    sha, size = found
    listed: Mapping[str, Any] = expected if isinstance(expected, Mapping) else {}
    if size != listed.get("size"):
        return f"{rel}: size {size} bytes, manifest says {listed.get('size')}"
    if sha != listed.get("sha256"):
        return (
            f"{rel}: checksum mismatch (sha256 {sha[:12]}..., "
            f"manifest says {str(listed.get('sha256'))[:12]}...)"
        )
    return None


def read_bounded(fh: IO[bytes], limit: int) -> bytes | None:
    """At most ``limit`` bytes of ``fh`` from where it stands; None when there are more.

    Reads ``limit + 1`` bytes at most, whatever a header or ``stat`` said, so a file that
    grew (or lied about its size) costs no more memory than the limit."""
    raw = fh.read(limit + 1)
    return None if len(raw) > limit else raw


def sign_bytes(data: bytes, key: bytes) -> str:
    """The HMAC-SHA256 of ``data`` under ``key``, in hex: what a ``manifest.sig`` holds."""
    return hmac.new(key, data, ALGORITHM).hexdigest()


def signature_matches(data: bytes, signature: bytes, key: bytes) -> bool:
    """True when ``signature`` (hex, surrounding whitespace allowed) signs ``data`` under ``key``."""
    try:
        given = signature.strip().decode("ascii")
    except UnicodeDecodeError:
        return False
    return hmac.compare_digest(given.lower(), sign_bytes(data, key))
