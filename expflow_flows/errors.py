"""The one exception type for mistakes a user can make (bad input, refused acts)."""


class ExpflowError(Exception):
    """A user-facing error: one line naming the bad value and what would be accepted."""


class GuardRefused(ExpflowError):
    """A PIN guard refused a destructive or irreversible act."""


class GateFailed(ExpflowError):
    """A metric gate did not pass; the message names metric, value and threshold."""


class DiskFull(ExpflowError):
    """The disk ran out of space; finished work is kept and a re-run goes on from it."""


_FULL = ("no space left on device", "disk quota exceeded", "database or disk is full")


def disk_full(exc: BaseException, where: object = None) -> DiskFull | None:
    """A one-line :class:`DiskFull` when ``exc`` says the disk is full, else None.

    ``where`` names the file or folder written when the exception does not (SQLite's
    "disk I/O error" says nothing: it counts as a full disk only when ``where`` has
    almost no free space left).
    """
    import errno
    import shutil
    from pathlib import Path

    text = str(exc).lower()
    path = getattr(exc, "filename", None) or where
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or any(word in text for word in _FULL)
    free: int | None = None
    if path is not None:
        folder = Path(str(path))
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
    if not full and "disk i/o error" in text and free is not None and free < (1 << 20):
        full = True
    if not full:
        return None
    place = f" writing {path}" if path is not None else ""
    left = f" ({free // 1024} KiB free there)" if free is not None else ""
    return DiskFull(
        f"the disk is full: no space left{place}{left}; free some space and run again "
        "(finished work is kept and the run goes on from it)"
    )


class JobEnding(ExpflowError):
    """The job running this flow is about to end (a time limit, a preemption): its runs
    saved checkpoints and stopped; the flow run resumes from them when requeued or re-run."""
