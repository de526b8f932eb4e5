"""Submission bundles: a folder of result files with metrics, params and a checksummed manifest.

``<dest_root>/<name>/`` holds copies of the chosen files, ``metrics.json``,
``params.json`` (secrets scrubbed) and ``manifest.json`` (name, creation time,
sha256 and size of every other file, and provenance ``info``). A bundle is
written in a hidden sibling folder and moved into place at the end, so it
either appears whole or not at all, and an existing bundle is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from expflow_flows.bundles.manifest import HashingReader, bytes_entry, entry_problem, hash_file
from expflow_flows.errors import ExpflowError
from expflow_flows.secrets import scrub

MANIFEST = "manifest.json"
METRICS = "metrics.json"
PARAMS = "params.json"
RESERVED = frozenset({MANIFEST, METRICS, PARAMS})
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
NAME_RULE = (
    "letters, digits, '.', '_' and '-', starting with a letter or digit, "
    "at most 200 characters, no '..'"
)
_CHUNK = 1 << 20


def _safe_name(name: object) -> bool:
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and ".." not in name


def _check_name(name: object) -> str:
    if not _safe_name(name):
        raise ExpflowError(f"bundle name {name!r} is not allowed; use {NAME_RULE}")
    return str(name)


def _safe_rel(rel: object) -> bool:
    """A path inside a bundle: '/'-separated safe names, nothing absolute or climbing out."""
    return isinstance(rel, str) and all(_safe_name(part) for part in rel.split("/"))


def _check_files(files: Mapping[str, Path | str]) -> list[tuple[str, Path]]:
    if not isinstance(files, Mapping):
        raise ExpflowError(
            f"bundle files must be a mapping of name -> path, got {type(files).__name__}"
        )
    out: list[tuple[str, Path]] = []
    for rel, src in files.items():
        if not _safe_rel(rel):
            raise ExpflowError(
                f"bundle file name {rel!r} is not allowed; use {NAME_RULE} ('/' between folders)"
            )
        if rel in RESERVED:
            raise ExpflowError(
                f"bundle file name {rel!r} is reserved; the bundle writes "
                f"{', '.join(sorted(RESERVED))} itself"
            )
        path = Path(src).expanduser()
        if not path.exists():
            raise ExpflowError(f"bundle file {rel!r}: source {str(path)!r} does not exist")
        if not path.is_file():
            raise ExpflowError(f"bundle file {rel!r}: source {str(path)!r} is not a regular file")
        out.append((rel, path))
    # 'a' as a file and 'a/b' under it cannot both exist in one folder.
    names = {rel for rel, _ in out}
    for rel in names:
        parents = PurePosixPath(rel).parents
        clash = next((str(p) for p in parents if str(p) in names), None)
        if clash:
            raise ExpflowError(
                f"bundle file names {clash!r} and {rel!r} clash: one would be a file and a folder"
            )
    return out


def _fsync(path: Path) -> None:
    # Best effort: some filesystems cannot fsync a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy(src: Path, dst: Path) -> dict[str, Any]:
    """Copy ``src`` to a new file ``dst``, hashing the bytes as they are written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            reader = HashingReader(fin)
            shutil.copyfileobj(reader, fout, _CHUNK)  # type: ignore[misc]
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as exc:
        raise ExpflowError(
            f"cannot copy {str(src)!r} into the bundle ({exc.strerror or exc})"
        ) from None
    return reader.entry()


def _write_json(path: Path, data: Any) -> dict[str, Any]:
    raw = (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
    with open(path, "xb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    return bytes_entry(raw)


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` folder to ``final``, refusing if ``final`` exists.

    ``os.mkdir(final)`` claims the name atomically: of several writers exactly one
    succeeds, and a folder already there (even empty) is refused. POSIX
    ``rename`` then replaces that empty claimed folder with the full bundle in
    one step, so readers never see a partial bundle under the final name.
    """
    try:
        os.mkdir(final)
    except FileExistsError:
        raise ExpflowError(
            f"submission bundle {str(final)!r} already exists; choose another name or remove it"
        ) from None
    try:
        os.rename(tmp, final)
    except BaseException as exc:
        # Give back our empty claim; rmdir removes only an empty folder, never a bundle.
        with contextlib.suppress(OSError):
            os.rmdir(final)
        if isinstance(exc, OSError):
            raise ExpflowError(
                f"could not move the bundle into {str(final)!r} ({exc.strerror or exc})"
            ) from None
        raise


def write_bundle(
    dest_root: Path | str,
    name: str,
    files: Mapping[str, Path | str],
    *,
    metrics: Mapping[str, Any],
    params: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write the bundle ``<dest_root>/<name>/`` whole, or raise and leave nothing behind.

    Refuses an existing ``<name>``; secret-looking params and info keys are written as ``***``.
    """
    name = _check_name(name)
    sources = _check_files(files)
    dest_root = Path(dest_root).expanduser()
    final = dest_root / name
    # Early, cheap refusal before copying possibly large files; _publish re-checks atomically.
    if final.exists() or final.is_symlink():
        raise ExpflowError(
            f"submission bundle {str(final)!r} already exists; choose another name or remove it"
        )
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = dest_root / f".{name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        entries: dict[str, dict[str, Any]] = {}
        for rel, src in sources:
            entries[rel] = _copy(src, tmp / rel)
        entries[METRICS] = _write_json(tmp / METRICS, dict(metrics))
        entries[PARAMS] = _write_json(tmp / PARAMS, scrub(dict(params)))
        manifest = {
            "format": 1,
            "bundle": name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": dict(sorted(entries.items())),
            "info": scrub(dict(info or {})),
        }
        _write_json(tmp / MANIFEST, manifest)
        for folder in {(tmp / rel).parent for rel in entries}:
            _fsync(folder)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(dest_root)
    return final


def read_manifest(path: Path | str) -> dict[str, Any]:
    """The bundle's manifest; a missing or unreadable one is an ExpflowError."""
    mf = Path(path) / MANIFEST
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExpflowError(f"{str(mf)!r} does not exist; is {str(path)!r} a bundle?") from None
    except (OSError, ValueError) as exc:
        raise ExpflowError(f"{str(mf)!r} is unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ExpflowError(f"{str(mf)!r} has no 'files' table; it is not a bundle manifest")
    return data


def verify_bundle(path: Path | str) -> list[str]:
    """Problems found in a bundle (missing, changed or unlisted files); empty when intact."""
    root = Path(path)
    if not root.is_dir():
        return [f"bundle {str(root)!r} does not exist or is not a folder"]
    try:
        listed = read_manifest(root)["files"]
    except ExpflowError as exc:
        return [str(exc)]
    problems: list[str] = []
    for rel, entry in sorted(listed.items()):
        if not _safe_rel(rel) or rel == MANIFEST:
            problems.append(f"manifest lists a path that is not allowed: {rel!r}")
            continue
        file = root / rel
        if file.is_symlink() or (file.exists() and not file.is_file()):
            problems.append(f"{rel}: not a regular file")
            continue
        if not file.exists():
            problems.append(f"{rel}: missing")
            continue
        problem = entry_problem(rel, entry, hash_file(file))
        if problem:
            problems.append(problem)
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root).as_posix()
        if file.is_dir() and not file.is_symlink():
            continue
        if rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


def find_predictions(run_dir: Path, pattern: str, convert: str | None = None) -> Path | None:
    """The evaluation's predictions file: the one file matching ``pattern`` in ``run_dir``.

    With ``convert`` (``package.module:function``, called as ``function(src, dest)``), the
    found file is converted to ``pred.hdf5`` in ``run_dir`` first and that file is returned.
    None when nothing matches; several matches are an error naming them.
    """
    import glob as globbing

    found = sorted(globbing.glob(pattern, root_dir=run_dir, recursive=True))
    found = [f for f in found if (run_dir / f).is_file()]
    if not found:
        return None
    if len(found) > 1:
        raise ExpflowError(
            f"predictions {pattern!r} matches {len(found)} files in {run_dir} "
            f"({', '.join(found[:3])}{', …' if len(found) > 3 else ''}); make it match one"
        )
    source = run_dir / found[0]
    if not convert:
        return source
    from expflow_flows.runs.trainable import load_function

    dest = run_dir / "pred.hdf5"
    if dest == source:
        return source
    fn = load_function(convert, "predictions converter")
    try:
        fn(source, dest)
    except Exception as exc:  # noqa: BLE001 - the user's converter failing is one line
        raise ExpflowError(
            f"predictions converter {convert!r} failed on {source.name}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not dest.is_file():
        raise ExpflowError(f"predictions converter {convert!r} wrote no {dest}")
    return dest
