"""Atomic file writes: a temporary file in the same folder, then one rename onto the target.

A reader sees the old file or the new one, never a half-written one, and a write that fails
leaves the old file as it was and no temporary file behind. ``durable=True`` also fsyncs the
new file before the rename, for files whose loss after a power cut matters (the PIN state).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _temp_path(path: Path, suffix: str = "") -> Path:
    # Beside the target, so the rename stays on one filesystem; unique per writer.
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp{suffix}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist, even when writers race."""
    try:
        os.link(tmp, path)  # fails atomically when path exists
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this filesystem: claim the name, then replace the empty claim.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def replacing(
    path: Path | str, *, suffix: str = "", durable: bool = False, overwrite: bool = True
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (HDF5, npz,
    tar); when the block ends without an error the file there becomes ``path``.

    ``suffix`` ends the temporary name (``np.savez`` adds ``.npz`` otherwise). With
    ``overwrite=False`` an existing ``path`` is kept and FileExistsError raised.
    """
    path = Path(path)
    tmp = _temp_path(path, suffix)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(
    path: Path | str, data: bytes, *, mode: int | None = None, durable: bool = False
) -> Path:
    """Write ``data`` to ``path`` atomically; ``mode`` (e.g. ``0o600``) is set exactly,
    whatever the umask, before any byte is written."""
    path = Path(path)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            # The umask can only remove bits; fchmod makes the mode exact.
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def write_text(
    path: Path | str,
    text: str,
    *,
    encoding: str = "utf-8",
    mode: int | None = None,
    durable: bool = False,
) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`write_bytes`)."""
    return write_bytes(path, text.encode(encoding), mode=mode, durable=durable)


def write_json(
    path: Path | str,
    data: Any,
    *,
    mode: int | None = None,
    durable: bool = False,
    default: Callable[[Any], Any] | None = str,
) -> Path:
    """Write ``data`` as indented, key-sorted JSON with a final newline, atomically.

    ``default`` turns values JSON lacks into JSON (``str`` by default; None refuses them).
    """
    text = json.dumps(data, indent=2, sort_keys=True, default=default) + "\n"
    return write_text(path, text, mode=mode, durable=durable)
