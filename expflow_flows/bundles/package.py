"""Reproducibility packages: one ``.tar.gz`` a colleague can verify and re-run.

Everything in the archive lies under one top folder ``<name>/``:

* ``code/``: the trainables' own source files, and when their code is in a git
  repository ``commit.txt`` (the commit) and ``diff.patch`` (``git diff HEAD``).
* ``config/``: the space / params / config files as given.
* ``results/``: the result and metadata files the caller names.
* ``data/``: input data files up to a size limit; ``data.json`` holds the
  sha256 and size of every named data file, included or not.
* ``runs.json``: each run's id, trainable, params, budget and metrics, which
  :func:`reproduce` re-runs and compares.
* ``environment.json``: every installed distribution's version, Python, OS and
  machine, and an allowlist of environment variables (nothing else from the
  environment).
* ``reproduce.py``: ``python reproduce.py [--combos ID,ID] [--tolerance 1e-6]``;
  it calls :func:`reproduce` and so needs expflow-flows installed.
* ``README.md`` and ``manifest.json`` (name, creation time, expflow version,
  kind, trainables, and sha256 + size of every other file).
* ``manifest.sig`` when a team key is given (or set in ``EXPFLOW_PACKAGE_KEY``): the
  HMAC-SHA256 of the ``manifest.json`` bytes; with a key configured, :func:`verify_package`
  requires it.

Secrets are never packaged: ``.env``-like and key files are left out of every
copied folder, secret-looking keys are masked in every JSON/YAML written,
secret-looking ``NAME=value`` lines and ``--name value`` arguments are masked
in text files, and credentials in URLs are masked. Data files and binary files
(SQLite, HDF5) are copied byte for byte: their checksums are the point, and
they cannot be edited safely.

Reproducing runs the packaged code: reproduce only packages you trust. The safe
unpacking protects the filesystem while extracting (no escapes, no links, no file that
the manifest does not list, no byte beyond the sizes it records, a total limit), and
:func:`reproduce` runs nothing from a package that fails verification unless told to
trust it; neither protects against code whose manifest was written to match it, which
only a signature under a team key can tell apart.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from expflow_flows import __version__, atomic
from expflow_flows.bundles.manifest import (
    HashingReader,
    bytes_entry,
    entry_problem,
    file_entry,
    hash_bytes,
    hash_stream,
    read_bounded,
    sign_bytes,
    signature_matches,
)
from expflow_flows.errors import ExpflowError
from expflow_flows.runs.launch import Launch
from expflow_flows.runs.metadata import (
    capture_environment,
    git_snapshot,
    installed_distributions,
    normalized_distribution_name,
)
from expflow_flows.runs.trainable import ARG_STYLES, Budget, Trainable, run_trainable
from expflow_flows.secrets import MASK, SECRET_WORDS, is_secret_key

FORMAT = 1
MANIFEST = "manifest.json"
RUNS = "runs.json"
DATA = "data.json"
ENVIRONMENT = "environment.json"
REPRODUCE = "reproduce.py"
README = "README.md"
SIGNATURE = "manifest.sig"
KINDS = ("sweep", "experiment")
# The package files expflow itself reads whole; each is refused past MAX_MANIFEST_BYTES.
METADATA_FILES = (MANIFEST, RUNS, DATA, ENVIRONMENT)
# Limits on what an archive may cost, checked before anything is read or written. Each
# function that applies one takes a keyword to override it (None: the value here).
MAX_UNPACK_BYTES = 64 << 30
MAX_MANIFEST_BYTES = 64 << 20
_MAX_SIGNATURE_BYTES = 4096
# The environment variable holding a team's package key: packages are signed with it when
# created and must carry a matching manifest.sig when verified.
KEY_ENV = "EXPFLOW_PACKAGE_KEY"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
NAME_RULE = (
    "letters, digits, '.', '_' and '-', starting with a letter or digit, "
    "at most 200 characters, no '..'"
)

# Files that hold credentials by convention; left out of every copied folder.
SECRET_FILES = (
    ".env",
    "*.env",
    ".env.*",
    ".envrc",
    ".netrc",
    ".pypirc",
    ".git-credentials",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
)
# Folders that are never configuration or results.
SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__"})

# The only environment variables recorded: they change numbers, and hold no secrets.
ENV_ALLOWLIST = (
    "PYTHONHASHSEED",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "CUBLAS_WORKSPACE_CONFIG",
    "NVIDIA_TF32_OVERRIDE",
    "TF_DETERMINISTIC_OPS",
    "TF_CUDNN_DETERMINISTIC",
    "PYTORCH_CUDA_ALLOC_CONF",
    "TZ",
    "LANG",
    "LC_ALL",
)

_STREAM_OVER = 8 << 20  # files bigger than this are streamed into the archive, not read whole
_TEXT_SUFFIXES_JSON = frozenset({".json"})
_TEXT_SUFFIXES_YAML = frozenset({".yaml", ".yml"})
_MB = 1_000_000
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class RunSpec:
    """One run a package can re-run: its id, params, packaged metrics and trainable."""

    run_id: str
    params: dict[str, Any]
    metrics: dict[str, float]
    trainable: str
    budget: dict[str, Any] | None = None
    arg_style: str = "argparse"
    # How a script or command starts (runs.launch): a command, an interpreter, fixed
    # arguments, metric sources; None for the default launch. With a command in it,
    # ``trainable`` is only the command's label.
    launch: dict[str, Any] | None = None


@dataclass
class VerifyReport:
    """Integrity problems (failures) and environment differences (information only)."""

    path: Path
    ok: bool
    problems: list[str] = field(default_factory=list)
    environment_differences: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few readable lines."""
        head = f"package {str(self.path)!r}: " + (
            "intact" if self.ok else f"{len(self.problems)} problem(s)"
        )
        lines = [head, *(f"  problem: {p}" for p in self.problems)]
        if self.environment_differences:
            lines.append(f"  {len(self.environment_differences)} environment difference(s):")
            lines += [f"    {d}" for d in self.environment_differences]
        return "\n".join(lines)


@dataclass(frozen=True)
class MetricDiff:
    """A metric whose re-run value is outside the tolerance (``got`` None when missing)."""

    name: str
    expected: float | None
    got: float | None
    rel_diff: float | None


@dataclass
class RunOutcome:
    """What re-running one packaged run gave."""

    run_id: str
    status: Literal["matched", "differed", "failed"]
    differences: list[MetricDiff] = field(default_factory=list)
    reason: str = ""
    run_dir: Path | None = None
    trainable: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ReproduceReport:
    """Per-run outcomes, plus the package's integrity problems and environment differences.

    A package with integrity problems runs only with ``trust_modified=True``; its problems
    are then in ``trusted_modified`` (it was changed since it was made, and ran anyway),
    and ``ok`` says whether the runs matched."""

    package: Path
    workdir: Path
    tolerance: float
    runs: list[RunOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    environment_differences: list[str] = field(default_factory=list)
    trusted_modified: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        """How many runs ended in ``status``."""
        return sum(1 for r in self.runs if r.status == status)

    @property
    def ok(self) -> bool:
        """True when the package is intact and every chosen run matched."""
        return not self.problems and all(r.status == "matched" for r in self.runs)

    def summary(self) -> str:
        """A few readable lines: counts, then one line per run."""
        lines = [
            f"{self.count('matched')}/{len(self.runs)} runs matched, "
            f"{self.count('differed')} differed, {self.count('failed')} failed "
            f"(relative tolerance {self.tolerance:g}); re-runs in {str(self.workdir)!r}"
        ]
        if self.trusted_modified:
            lines.insert(
                0,
                f"WARNING: this is a modified package, run anyway (trust_modified): "
                f"{len(self.trusted_modified)} verification problem(s) overridden",
            )
            lines += [f"  overridden: {p}" for p in self.trusted_modified]
        lines += [f"  package problem: {p}" for p in self.problems]
        for run in self.runs:
            if run.status == "matched":
                lines.append(f"  {run.run_id}: matched")
            elif run.status == "differed":
                parts = [
                    f"{d.name} expected {d.expected!r}, got {d.got!r}"
                    + (f" (rel diff {d.rel_diff:.3g})" if d.rel_diff is not None else "")
                    for d in run.differences
                ]
                lines.append(f"  {run.run_id}: differed: " + "; ".join(parts))
            else:
                lines.append(f"  {run.run_id}: failed: {run.reason}")
        if self.environment_differences and not self.ok:
            lines.append(
                f"  {len(self.environment_differences)} environment difference(s), e.g. "
                + "; ".join(self.environment_differences[:3])
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- secrets


def _secret_word_in(text: str) -> bool:
    low = text.lower()
    return any(word in low for word in SECRET_WORDS)


def is_secret_file(name: str) -> bool:
    """True for ``.env``-like and key files, which are never packaged."""
    return any(fnmatch.fnmatchcase(name.lower(), pat) for pat in SECRET_FILES)


_Q = r"\"[^\"\n]*\"|'[^'\n]*'"
# NAME=value / NAME: value / export NAME=value at the start of a line (also after a diff marker
# or a YAML list dash); the value runs to the end of the line.
_LINE_RE = re.compile(
    r"^(?P<lead>[ \t]*(?:[+\- ][ \t]*)?(?:-[ \t]+)?(?:export[ \t]+)?)"
    r"(?P<q>[\"']?)(?P<name>[A-Za-z_][\w.\-]*)(?P=q)"
    r"(?P<mid>[ \t]*[=:][ \t]*)(?P<val>[^\r\n]*?)(?P<tail>[ \t]*)$",
    re.MULTILINE,
)
# name=value or name: value anywhere in a line (log lines, command echoes).
_INLINE_RE = re.compile(
    r"(?<![\w.])(?P<name>[A-Za-z_][\w.\-]*)(?P<q>[\"']?)(?P<mid>[ \t]*[=:][ \t]*)"
    # a value never starts with { or [: in 'env: {TOKEN: x}' the pair inside is what counts
    rf"(?P<val>{_Q}|(?![{{\[])[^\s,;&\"'<>)\]}}]+)"
)
# --name value (command lines).
_FLAG_RE = re.compile(
    r"(?<![\w.])(?P<pre>--?|\+\+)(?P<name>[A-Za-z_][\w.\-]*)(?P<mid>[ \t]+)"
    rf"(?!-)(?P<val>{_Q}|[^\s\"']+)"
)
_FLAG_ONLY_RE = re.compile(r"(?:--?|\+\+)(?P<name>[A-Za-z_][\w.\-]*)")
# scheme://user:password@host
_URL_CRED_RE = re.compile(r"(?P<pre>\b[A-Za-z][\w+.\-]*://[^\s/:@]+:)(?P<val>[^\s/@]+)(?=@)")
# Python: NAME = "literal", NAME: str = "literal", name="literal" (keyword argument).
_PY_ASSIGN_RE = re.compile(
    r"(?<!\w)(?P<name>[A-Za-z_]\w*)(?P<mid>[ \t]*(?::[ \t]*[\w\[\], .|]+?)?[ \t]*=[ \t]*)"
    r"(?P<pre>[rRbBuU]{0,2})(?P<q>\"\"\"|'''|\"|')(?P<val>.*?)(?P=q)"
)
# Python: "name": "literal" (dict entries).
_PY_DICT_RE = re.compile(
    r"(?P<q1>[\"'])(?P<name>[A-Za-z_][\w.\-]*)(?P=q1)(?P<mid>[ \t]*:[ \t]*)"
    r"(?P<pre>[rRbBuU]{0,2})(?P<q>[\"'])(?P<val>[^\"'\n]*)(?P=q)"
)


def _masked(val: str, bare_mask: str = MASK) -> str:
    """``val`` replaced by the mask, keeping surrounding quotes so the syntax stays valid."""
    if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'":
        return f"{val[0]}{MASK}{val[0]}"
    return bare_mask


def _is_masked(val: str) -> bool:
    return val.strip("\"' ,") == MASK


def _sub_line(m: re.Match[str], bare_mask: str) -> str:
    val = m.group("val")
    if not is_secret_key(m.group("name")) or not val.strip() or _is_masked(val):
        return m.group(0)
    # A trailing comma (a JSON-ish line) stays, so the line keeps its shape.
    comma = "," if val.endswith(",") else ""
    core = val[:-1].rstrip() if comma else val
    q = m.group("q")
    return (
        f"{m.group('lead')}{q}{m.group('name')}{q}{m.group('mid')}{_masked(core, bare_mask)}{comma}"
    )


def _sub_inline(m: re.Match[str]) -> str:
    val = m.group("val")
    if not is_secret_key(m.group("name")) or _is_masked(val):
        return m.group(0)
    return f"{m.group('name')}{m.group('q')}{m.group('mid')}{_masked(val)}"


def _sub_flag(m: re.Match[str]) -> str:
    if not is_secret_key(m.group("name")) or _is_masked(m.group("val")):
        return m.group(0)
    return f"{m.group('pre')}{m.group('name')}{m.group('mid')}{_masked(m.group('val'))}"


def _sub_literal(m: re.Match[str]) -> str:
    if not is_secret_key(m.group("name")) or m.group("val") == MASK:
        return m.group(0)
    start, end = m.span("val")
    whole = m.group(0)
    off = m.start()
    return whole[: start - off] + MASK + whole[end - off :]


def redact_text(text: str, *, bare_mask: str = MASK) -> str:
    """``text`` with secret-looking ``NAME=value`` lines, ``name=value`` pairs, ``--name value``
    arguments and URL passwords masked."""
    if _secret_word_in(text):
        text = _LINE_RE.sub(lambda m: _sub_line(m, bare_mask), text)
        text = _INLINE_RE.sub(_sub_inline, text)
        text = _FLAG_RE.sub(_sub_flag, text)
    if "@" in text:
        text = _URL_CRED_RE.sub(lambda m: m.group("pre") + MASK, text)
    return text


def redact_python(text: str) -> str:
    """Python source with secret-looking string literals (``API_KEY = "..."``) masked.

    Only string literals assigned to or keyed by a secret-looking name are touched,
    so the code still runs (``key = params["x"]`` stays as it is).
    """
    if _secret_word_in(text):
        text = _PY_ASSIGN_RE.sub(_sub_literal, text)
        text = _PY_DICT_RE.sub(_sub_literal, text)
    if "@" in text:
        text = _URL_CRED_RE.sub(lambda m: m.group("pre") + MASK, text)
    return text


def _redact_diff(text: str) -> str:
    """A ``git diff`` with each file's hunks redacted by that file's rule (Python or text)."""
    out: list[str] = []
    chunk: list[str] = []
    is_py = False

    def flush() -> None:
        body = "".join(chunk)
        out.append(redact_python(body) if is_py else redact_text(body))
        chunk.clear()

    for line in text.splitlines(keepends=True):
        if line.startswith("diff --git "):
            flush()
            is_py = line.rstrip().endswith(".py")
            out.append(line)
            continue
        chunk.append(line)
    flush()
    return "".join(out)


def scrub_strict(obj: Any) -> Any:
    """:func:`secrets.scrub`, and also secret-looking ``--name value`` list items and
    ``name=value`` / URL-password text inside strings."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) else scrub_strict(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out: list[Any] = []
        mask_next = False
        for item in obj:
            if mask_next and not isinstance(item, (dict, list, tuple)):
                out.append(MASK)
                mask_next = False
                continue
            mask_next = False
            if isinstance(item, str):
                flag = _FLAG_ONLY_RE.fullmatch(item)
                if flag and is_secret_key(flag.group("name")):
                    mask_next = True
                    out.append(item)
                    continue
            out.append(scrub_strict(item))
        return out if isinstance(obj, list) else tuple(out)
    if isinstance(obj, str) and (_secret_word_in(obj) or "@" in obj):
        return redact_text(obj)
    return obj


def _is_text(raw: bytes) -> str | None:
    if b"\0" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def sanitize_file(name: str, raw: bytes) -> bytes:
    """The bytes to package for a copied file: secrets redacted by the file's kind.

    JSON and YAML are parsed and scrubbed; Python sources get their secret literals
    masked; other text gets :func:`redact_text`; binary files are returned as they are.
    Unchanged content is returned byte for byte.
    """
    text = _is_text(raw)
    if text is None:
        return raw
    suffix = Path(name).suffix.lower()
    if suffix in _TEXT_SUFFIXES_JSON:
        try:
            data = json.loads(text)
        except ValueError:
            return redact_text(text).encode("utf-8")
        clean = scrub_strict(data)
        if clean == data:
            return raw
        return (json.dumps(clean, indent=2, default=str) + "\n").encode("utf-8")
    if suffix in _TEXT_SUFFIXES_YAML:
        return _sanitize_yaml(text, raw)
    if suffix == ".py":
        red = redact_python(text)
    else:
        red = redact_text(text)
    return raw if red == text else red.encode("utf-8")


def _sanitize_yaml(text: str, raw: bytes) -> bytes:
    # Line-wise masking keeps comments and layout; if the parsed result still holds a
    # secret-looking value (block scalars, flow mappings, nested secret keys), the
    # file is rewritten from its scrubbed parse instead.
    red = redact_text(text, bare_mask=f'"{MASK}"')
    try:
        original = yaml.safe_load(text)
    except yaml.YAMLError:
        return raw if red == text else red.encode("utf-8")
    try:
        after = yaml.safe_load(red)
        if scrub_strict(after) == after:
            return raw if red == text else red.encode("utf-8")
    except yaml.YAMLError:
        pass
    dumped = yaml.safe_dump(scrub_strict(original), sort_keys=False, allow_unicode=True)
    return dumped.encode("utf-8")


# --------------------------------------------------------------------------- environment


def capture_package_environment(code_dir: Path | str = ".") -> dict[str, Any]:
    """Python, OS, machine, allowlisted environment variables and all package versions."""
    machine = capture_environment(code_dir, git=False)
    info = {
        "python": sys.version.split()[0],
        "python_full": sys.version,
        "implementation": platform.python_implementation(),
        "os": platform.platform(),
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "hostname": machine.get("hostname"),
        "cpu_count": machine.get("cpu_count"),
        "memory_gb": machine.get("memory_gb"),
        "env": {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ},
    }
    info = scrub_strict(info)
    # Distribution names are not secrets ("keyring", "tokenizers"): added after the scrub.
    info["packages"] = installed_distributions()
    return info


def environment_differences(recorded: dict[str, Any]) -> list[str]:
    """How the current Python, OS and package versions differ from ``recorded``."""
    out: list[str] = []
    here_python = sys.version.split()[0]
    if recorded.get("python") and recorded.get("python") != here_python:
        out.append(f"python: {recorded.get('python')} in the package, {here_python} here")
    for key, here in (("system", platform.system()), ("machine", platform.machine())):
        if recorded.get(key) and recorded.get(key) != here:
            out.append(f"{key}: {recorded.get(key)} in the package, {here} here")
    if recorded.get("os") and recorded.get("os") != platform.platform():
        out.append(f"os: {recorded.get('os')} in the package, {platform.platform()} here")
    packages = recorded.get("packages")
    if isinstance(packages, dict):
        here_pkgs = installed_distributions()
        for name, version in sorted(packages.items()):
            now = here_pkgs.get(normalized_distribution_name(str(name)))
            if now is None:
                out.append(f"package {name}: {version} in the package, not installed here")
            elif str(version) != now:
                out.append(f"package {name}: {version} in the package, {now} here")
    return out


# --------------------------------------------------------------------------- git / code


def _git_snapshot(where: Path) -> dict[str, Any] | None:
    """Top folder, commit and redacted uncommitted diff of the repository holding ``where``."""
    excludes = [f":(top,exclude,glob)**/{pat}" for pat in SECRET_FILES]
    snap = git_snapshot(where, exclude=excludes)
    if snap is None:
        return None
    return {"toplevel": snap.toplevel, "commit": snap.commit, "diff": _redact_diff(snap.diff)}


def _module_source(module: str) -> tuple[Path | None, str]:
    """The source file of ``module`` without importing it (parents are imported)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ExpflowError(
            f"trainable module {module!r} cannot be found to snapshot its source ({exc})"
        ) from None
    if spec is None:
        raise ExpflowError(
            f"trainable module {module!r} cannot be found to snapshot its source; "
            "expected an importable 'package.module:function'"
        )
    origin = spec.origin
    if not origin or not origin.endswith(".py") or not Path(origin).is_file():
        return None, f"module {module!r} has no Python source file ({origin})"
    return Path(origin), ""


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- archive writing


class _Writer:
    """Adds files under ``<top>/`` to an open tar and records each one's sha256 and size."""

    def __init__(self, tar: tarfile.TarFile, top: str, mtime: int):
        self.tar = tar
        self.top = top
        self.mtime = mtime
        self.files: dict[str, dict[str, Any]] = {}

    def _info(self, rel: str, size: int, mode: int) -> tarfile.TarInfo:
        if rel in self.files:
            raise ExpflowError(f"two files would be packaged as {rel!r}; rename one of them")
        info = tarfile.TarInfo(f"{self.top}/{rel}")
        info.size = size
        info.mode = mode
        info.mtime = self.mtime
        # No user or group names: they say nothing about the result.
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def add_bytes(self, rel: str, data: bytes, mode: int = 0o644) -> dict[str, Any]:
        self.tar.addfile(self._info(rel, len(data), mode), io.BytesIO(data))
        entry = bytes_entry(data)
        self.files[rel] = entry
        return entry

    def add_path(self, rel: str, src: Path) -> dict[str, Any]:
        """Stream ``src`` in byte for byte, hashing exactly the bytes archived."""
        try:
            with open(src, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                reader = HashingReader(fh)
                self.tar.addfile(self._info(rel, size, 0o644), reader)  # type: ignore[arg-type]
        except OSError as exc:
            raise ExpflowError(
                f"cannot package {str(src)!r} ({exc.strerror or exc}); was it changed or removed?"
            ) from None
        entry = reader.entry()
        self.files[rel] = entry
        return entry

    def add_json(self, rel: str, data: Any) -> bytes:
        """Add ``data`` as indented JSON; returns the bytes written."""
        raw = (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
        self.add_bytes(rel, raw)
        return raw


def _collect(
    items: Iterable[Path | str], what: str
) -> tuple[list[tuple[str, Path]], list[dict[str, str]]]:
    """(name inside the section, source) for every file named or under a named folder.

    Names keep the layout below the items' common parent folder, so ``run-1/params.json``
    and ``run-2/params.json`` stay apart. Secret files, links inside folders and
    VCS/cache folders are left out and listed as excluded.
    """
    paths = [Path(p).expanduser() for p in items]
    for p in paths:
        if not p.exists():
            raise ExpflowError(f"{what} file {str(p)!r} does not exist")
        if not (p.is_file() or p.is_dir()):
            raise ExpflowError(f"{what} file {str(p)!r} is not a regular file or folder")
    if not paths:
        return [], []
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(a) for a in absolute])
    found: dict[str, Path] = {}
    excluded: list[dict[str, str]] = []

    def add(rel: str, src: Path) -> None:
        name = Path(rel).name
        if is_secret_file(name):
            excluded.append({"path": f"{what}/{rel}", "reason": "secret file"})
        else:
            found.setdefault(rel, src)

    for p, a in zip(paths, absolute, strict=True):
        rel = Path(os.path.relpath(a, common)).as_posix()
        if p.is_file():
            add(rel, p)
            continue
        for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
            here = Path(dirpath)
            base = Path(os.path.relpath(os.path.abspath(here), common)).as_posix()
            keep = []
            for d in sorted(dirnames):
                if d in SKIP_DIRS:
                    continue
                if (here / d).is_symlink():
                    excluded.append({"path": f"{what}/{base}/{d}", "reason": "symbolic link"})
                    continue
                keep.append(d)
            dirnames[:] = keep
            for f in sorted(filenames):
                src = here / f
                if src.is_symlink():
                    excluded.append({"path": f"{what}/{base}/{f}", "reason": "symbolic link"})
                elif src.is_file():
                    add(f"{base}/{f}", src)
    return sorted(found.items()), excluded


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ExpflowError(f"package name {name!r} is not allowed; use {NAME_RULE}")
    return name


def _check_runs(runs: list[RunSpec]) -> None:
    seen: set[str] = set()
    for run in runs:
        if not isinstance(run, RunSpec):
            raise ExpflowError(f"run {run!r} is not a RunSpec; expected RunSpec(run_id, ...)")
        if (
            not isinstance(run.run_id, str)
            or not NAME_RE.fullmatch(run.run_id)
            or (".." in run.run_id)
        ):
            raise ExpflowError(f"run id {run.run_id!r} is not allowed; use {NAME_RULE}")
        if run.run_id in seen:
            raise ExpflowError(f"run id {run.run_id!r} appears twice; run ids must be unique")
        seen.add(run.run_id)
        if not isinstance(run.params, dict):
            raise ExpflowError(f"run {run.run_id!r}: params must be a dict, got {run.params!r}")
        if not isinstance(run.metrics, dict):
            raise ExpflowError(f"run {run.run_id!r}: metrics must be a dict, got {run.metrics!r}")
        for key, value in run.metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ExpflowError(
                    f"run {run.run_id!r}: metric {key!r} is {value!r}; metrics must be numbers"
                )
        Trainable.parse(run.trainable)
        Budget.from_value(run.budget)
        if run.arg_style not in ARG_STYLES:
            raise ExpflowError(
                f"run {run.run_id!r}: arg style {run.arg_style!r} is not known; "
                f"expected one of {ARG_STYLES}"
            )


def package_key(key: bytes | str | None = None) -> bytes | None:
    """The team key to sign or check packages with: ``key``, else ``$EXPFLOW_PACKAGE_KEY``
    when set and not empty, else None."""
    if key is None:
        key = os.environ.get(KEY_ENV) or None
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes):
        raise ExpflowError(
            f"a package key of type {type(key).__name__} is not allowed; expected bytes or text"
        )
    if not key:
        raise ExpflowError("an empty package key is not allowed; expected bytes or text")
    return key


def _archive_path(out: Path, name: str) -> Path:
    if out.name.endswith((".tar.gz", ".tgz")):
        return out
    return out / f"{name}.tar.gz"


def create_package(
    out: Path | str,
    *,
    name: str,
    trainable: str | list[str],
    runs: list[RunSpec],
    config_files: list[Path] | None = None,
    result_files: list[Path] | None = None,
    data_files: list[Path] | None = None,
    include_data_up_to_mb: float = 10,
    code_dir: Path | str | None = None,
    extra: dict[str, Any] | None = None,
    kind: Literal["sweep", "experiment"] = "sweep",
    launches: dict[str, dict[str, Any]] | None = None,
    sign_key: bytes | str | None = None,
) -> Path:
    """Write the reproducibility package ``<out>/<name>.tar.gz`` (or ``out`` itself when it
    ends in ``.tar.gz``/``.tgz``); refuses an existing archive and returns its path.

    ``launches`` maps a listed trainable to how it starts (a command's label to its command);
    each run carries its own. The files a command or interpreter names (``train.py``, a
    Hydra config) and a metric reader's file are snapshotted into ``code/`` with the rest.
    With ``sign_key`` (default: ``$EXPFLOW_PACKAGE_KEY`` when set) ``manifest.sig`` signs the
    manifest."""
    name = _check_name(name)
    key = package_key(sign_key)
    if kind not in KINDS:
        raise ExpflowError(f"package kind {kind!r} is not known; expected one of {KINDS}")
    try:
        limit_mb = float(include_data_up_to_mb)
    except (TypeError, ValueError):
        limit_mb = float("nan")
    if not math.isfinite(limit_mb) or limit_mb < 0:
        raise ExpflowError(
            f"include_data_up_to_mb={include_data_up_to_mb!r} is not allowed; "
            "expected a number >= 0 (0 includes no data)"
        )
    specs = [trainable] if isinstance(trainable, str) else list(trainable)
    if not specs:
        raise ExpflowError("trainable is empty; expected a trainable spec or a list of them")
    runs = list(runs)
    _check_runs(runs)
    how: dict[str, dict[str, Any]] = dict(launches or {})
    for r in runs:
        if r.launch:
            how.setdefault(r.trainable, r.launch)
    # Every run's trainable is snapshotted, listed or not.
    ordered: list[Trainable] = []
    for spec in [*specs, *(r.trainable for r in runs)]:
        t = _trainable(spec, how.get(spec))
        if t.spec not in {o.spec for o in ordered}:
            ordered.append(t)

    out = Path(out).expanduser()
    archive = _archive_path(out, name)
    if archive is not out and out.exists() and not out.is_dir():
        raise ExpflowError(
            f"package output {str(out)!r} is a file; expected a folder or a path ending in .tar.gz"
        )
    # Early, cheap refusal; _publish re-checks atomically.
    if archive.exists() or archive.is_symlink():
        raise ExpflowError(
            f"package {str(archive)!r} already exists; choose another name or remove it"
        )
    config, config_excl = _collect(config_files or [], "config")
    results, results_excl = _collect(result_files or [], "results")
    data, data_excl = _collect(data_files or [], "data")
    sources = _code_sources(ordered)
    named = {str(x.path) for x in sources if x.path is not None}
    for t in ordered:
        for path in _launch_files(how.get(t.spec)):
            if str(path) not in named:
                named.add(str(path))
                sources.append(_Source(str(path), "file", path))
    where = Path(code_dir).expanduser() if code_dir is not None else _first_source_dir(sources)
    git = _git_snapshot(where) if where is not None else None

    archive.parent.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC)
    try:
        # overwrite=False: of two writers racing for one name, the second is refused.
        with (
            atomic.replacing(archive, overwrite=False) as tmp,
            tarfile.open(tmp, "x:gz", compresslevel=6) as tar,
        ):
            w = _Writer(tar, name, int(created.timestamp()))
            code_info = _write_code(w, sources, git)
            for rel, src in config:
                w.add_bytes(f"config/{rel}", sanitize_file(rel, src.read_bytes()))
            for rel, src in results:
                _add_copied(w, f"results/{rel}", src)
            data_entries = _write_data(w, data, int(limit_mb * _MB))
            w.add_json(
                DATA,
                {"limit_bytes": int(limit_mb * _MB), "files": data_entries},
            )
            w.add_json(RUNS, {"format": FORMAT, "runs": [_run_record(r) for r in runs]})
            w.add_json(ENVIRONMENT, capture_package_environment(where or "."))
            script = REPRODUCE_SCRIPT.replace("@VERSION@", __version__)
            w.add_bytes(REPRODUCE, script.encode("utf-8"), mode=0o755)
            w.add_bytes(README, _readme(name, kind, created, runs).encode("utf-8"))
            manifest = {
                "format": FORMAT,
                "name": name,
                "created": created.isoformat(timespec="seconds"),
                "expflow_version": __version__,
                "kind": kind,
                "trainables": [t.spec for t in ordered],
                "runs": len(runs),
                "code": code_info,
                "excluded": config_excl + results_excl + data_excl,
                "extra": scrub_strict(dict(extra or {})),
                # File names and hashes are not secrets; this table is not scrubbed.
                "files": dict(sorted(w.files.items())),
            }
            raw = w.add_json(MANIFEST, manifest)
            if key is not None:
                w.add_bytes(SIGNATURE, (sign_bytes(raw, key) + "\n").encode("ascii"))
    except FileExistsError:
        if not archive.exists():
            raise
        raise ExpflowError(
            f"package {str(archive)!r} already exists; choose another name or remove it"
        ) from None
    return archive


def _add_copied(w: _Writer, rel: str, src: Path) -> None:
    """A result file: text redacted; big files (binary by nature) streamed byte for byte."""
    try:
        size = src.stat().st_size
    except OSError as exc:
        raise ExpflowError(f"cannot read {str(src)!r} ({exc.strerror or exc})") from None
    if size > _STREAM_OVER:
        w.add_path(rel, src)
    else:
        w.add_bytes(rel, sanitize_file(rel, src.read_bytes()))


def _write_data(w: _Writer, data: list[tuple[str, Path]], limit: int) -> list[dict[str, Any]]:
    entries = []
    for rel, src in data:
        size = src.stat().st_size
        if limit > 0 and size <= limit:
            # Data is copied byte for byte, so its checksum matches the original.
            entry = w.add_path(f"data/{rel}", src)
            entries.append({"name": rel, "source": str(src), **entry, "included": f"data/{rel}"})
        else:
            entries.append({"name": rel, "source": str(src), **file_entry(src), "included": None})
    return entries


def _trainable(spec: str, launch: dict[str, Any] | None) -> Trainable:
    """A listed trainable: a command's label when its launch has a command, else parsed."""
    if launch and launch.get("command"):
        if not isinstance(spec, str) or not spec.strip():
            raise ExpflowError(f"trainable {spec!r} is empty; expected the command's label")
        return Trainable(spec.strip(), "command")
    return Trainable.parse(spec)


def launch_of(section: dict[str, Any]) -> dict[str, Any] | None:
    """How a recorded trainable section (a settings dump) starts; None for the default."""
    data = {k: section[k] for k in Launch.__dataclass_fields__ if section.get(k) is not None}
    try:
        if Launch.from_value(data) == Launch():
            return None
    except (ExpflowError, TypeError):
        pass
    return data


def label_of(section: dict[str, Any]) -> str:
    """A recorded trainable section's target, or its command in one line."""
    if section.get("target"):
        return str(section["target"])
    command = section.get("command")
    if isinstance(command, str) and command.strip():
        return command.strip()
    if isinstance(command, list) and command:
        return shlex.join(str(w) for w in command)
    raise ExpflowError("the recorded settings name no trainable (neither target nor command)")


def _launch_files(launch: dict[str, Any] | None) -> list[Path]:
    """Files a launch names that are code or config: words of its command, interpreter and
    fixed arguments that are existing files (not programs such as a venv's python), and a
    metric reader's ``file.py``."""
    if not launch:
        return []
    try:
        how = Launch.from_value(launch)
    except (ExpflowError, TypeError):
        return []
    out: list[Path] = []
    for word in (*how.command, *how.interpreter, *how.args):
        path = Path(word).expanduser()
        if not path.is_absolute() or not path.is_file():
            continue
        if os.access(path, os.X_OK) and path.suffix not in (".py", ".sh"):
            continue  # a program (python, torchrun): part of the environment, not the code
        out.append(path)
    reader = how.metrics.get("reader")
    if isinstance(reader, str) and ".py:" in reader:
        path = Path(reader.rpartition(":")[0]).expanduser()
        if path.is_absolute() and path.is_file():
            out.append(path)
    return out


def _run_record(run: RunSpec) -> dict[str, Any]:
    params = scrub_strict(dict(run.params))
    redacted = sorted(k for k in run.params if params.get(k) != run.params.get(k))
    launch = scrub_strict(dict(run.launch)) if run.launch else None
    # a secret in the launch's environment was masked here or already where it was recorded
    env = (launch or {}).get("env") or {}
    redacted += sorted(f"env {k}" for k, v in env.items() if isinstance(v, str) and _is_masked(v))
    return {
        "run_id": run.run_id,
        "trainable": _trainable(run.trainable, run.launch).spec,
        "launch": launch,
        "params": params,
        "redacted_params": redacted,
        # Metrics are validated numbers, and names like "token_acc" must survive for the
        # comparison: they are not scrubbed.
        "metrics": {str(k): float(v) for k, v in run.metrics.items()},
        "budget": Budget.from_value(run.budget).as_dict(),
        "arg_style": run.arg_style,
    }


@dataclass
class _Source:
    spec: str
    kind: str
    path: Path | None
    note: str = ""


def _code_sources(trainables: list[Trainable]) -> list[_Source]:
    out = []
    for t in trainables:
        if t.kind == "command":
            continue  # its files come from its launch (_launch_files)
        if t.kind == "script":
            path = Path(t.spec).expanduser()
            if not path.is_file():
                raise ExpflowError(
                    f"trainable script {t.spec!r} does not exist (looked in {Path.cwd()}); "
                    "a package needs the script to snapshot it"
                )
            out.append(_Source(t.spec, "script", path.absolute()))
        else:
            path, note = _module_source(t.spec.partition(":")[0])
            out.append(_Source(t.spec, "callable", path, note))
    return out


def _first_source_dir(sources: list[_Source]) -> Path | None:
    return next((s.path.parent for s in sources if s.path is not None), None)


def _write_code(w: _Writer, sources: list[_Source], git: dict[str, Any] | None) -> dict[str, Any]:
    info: dict[str, Any] = {"git": None, "sources": {}}
    if git is not None:
        w.add_bytes("code/commit.txt", (git["commit"] + "\n").encode())
        diff: str = git["diff"]
        w.add_bytes("code/diff.patch", diff.encode("utf-8"))
        info["git"] = {
            "commit": git["commit"],
            "dirty": bool(diff.strip()),
            "toplevel": str(git["toplevel"]),
        }
    used: dict[str, Path] = {}
    for s in sources:
        entry: dict[str, Any] = {"kind": s.kind, "original": None, "archived": None}
        if s.note:
            entry["note"] = s.note
        if s.path is None:
            info["sources"][s.spec] = entry
            continue
        entry["original"] = str(s.path)
        rel = _source_rel(s, git)
        if used.get(rel) not in (None, s.path):
            stem, suffix = os.path.splitext(rel)
            n = 2
            while f"{stem}-{n}{suffix}" in used:
                n += 1
            rel = f"{stem}-{n}{suffix}"
        if rel not in used:
            used[rel] = s.path
            w.add_bytes(f"code/{rel}", sanitize_file(rel, s.path.read_bytes()))
        entry["archived"] = f"code/{rel}"
        info["sources"][s.spec] = entry
    return info


def _source_rel(s: _Source, git: dict[str, Any] | None) -> str:
    assert s.path is not None
    if git is not None:
        resolved = s.path.resolve()
        if _inside(resolved, git["toplevel"].resolve()):
            return resolved.relative_to(git["toplevel"].resolve()).as_posix()
    if s.kind == "callable":
        # Keep the module's dotted path, so code/ can go on sys.path to import it.
        parts = s.spec.partition(":")[0].split(".")
        if s.path.name == "__init__.py":
            return "/".join([*parts, "__init__.py"])
        return "/".join(parts[:-1] + [s.path.name])
    return s.path.name


def _readme(name: str, kind: str, created: datetime, runs: list[RunSpec]) -> str:
    return f"""# {name}: expflow reproducibility package

A {kind} packaged on {created.isoformat(timespec="seconds")} with expflow-flows {__version__};
{len(runs)} run(s) in `runs.json`.

- `code/`: the trainables' source (and `commit.txt` + `diff.patch` when in git)
- `config/`: the space / params / config as given (secrets masked)
- `results/`: result and metadata files (secrets masked in text files)
- `data.json`: sha256 and size of the input data; `data/`: the small data files
- `environment.json`: Python, OS and every package version the runs were made with
- `manifest.json`: sha256 and size of every other file

Check it: `python -c "from expflow_flows.bundles.package import verify_package as v; print(v('.').summary())"`

Re-run it: `python reproduce.py [--combos ID,ID] [--first N] [--tolerance 1e-6]`; a
package that fails the check runs nothing unless `--trust-modified` is given.
This needs expflow-flows installed (`pip install expflow-flows=={__version__}`), and the
versions in `environment.json` for the same numbers. Reproducing runs the packaged
code: only reproduce packages you trust.
"""


REPRODUCE_SCRIPT = '''#!/usr/bin/env python3
"""Re-run the runs of this reproducibility package and compare their metrics.

Needs expflow-flows installed: this package was made with expflow-flows @VERSION@
(pip install expflow-flows==@VERSION@). environment.json lists the package versions
the runs were made with. Reproducing runs the packaged code: only reproduce
packages you trust.

    python reproduce.py                         # every run
    python reproduce.py --combos ID,ID          # chosen runs (ids from runs.json)
    python reproduce.py --first 3 --tolerance 1e-4
    python reproduce.py --trust-modified        # run it even though it was changed

Exit status: 0 when every chosen run matched, 1 when one differed or failed, 2 on errors.
"""

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description="Re-run this package's runs; compare metrics.")
    parser.add_argument("--combos", default=None, help="comma-separated run ids (default: all)")
    parser.add_argument("--first", type=int, default=None, help="only the first N chosen runs")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="relative tolerance")
    parser.add_argument("--workdir", default=None, help="where re-runs go (default: temporary)")
    parser.add_argument(
        "--trust-modified",
        action="store_true",
        help="run the package even though it fails verification (it was changed)",
    )
    args = parser.parse_args()
    try:
        from expflow_flows.errors import ExpflowError
        from expflow_flows.bundles.package import reproduce
    except ImportError:
        print(
            "reproduce.py needs expflow-flows installed: pip install expflow-flows==@VERSION@",
            file=sys.stderr,
        )
        return 2
    combos = [c.strip() for c in args.combos.split(",") if c.strip()] if args.combos else None
    try:
        report = reproduce(
            Path(__file__).resolve().parent,
            combos=combos,
            first=args.first,
            tolerance=args.tolerance,
            workdir=args.workdir,
            trust_modified=args.trust_modified,
            on_trusted=lambda problems: print(
                f"warning: running a MODIFIED package: {len(problems)} verification "
                f"problem(s) overridden, the first: {problems[0]}",
                file=sys.stderr,
            ),
        )
    except ExpflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
'''


# --------------------------------------------------------------------------- reading archives


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a member may not be extracted, or None when it is a plain file or folder."""
    name = member.name
    if not name or "\0" in name:
        return "its name is empty or holds a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "its path is absolute"
    if "\\" in name:
        return "its path holds a backslash"
    parts = _member_parts(name)
    if ".." in parts:
        return "its path climbs out with '..'"
    if any(p in ("", ".") for p in parts):
        return "its path has an empty or '.' component"
    if member.issym():
        return f"it is a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"it is a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "it is a device file"
    if member.isfifo():
        return "it is a FIFO"
    if not (member.isreg() or member.isdir()):
        return f"it is a special member (type {member.type!r})"
    return None


def _member_parts(name: str) -> list[str]:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/").split("/")


_LAYOUT_HINT = "a package holds only regular files and folders under one top folder"
_SIZE_HINT = "the manifest records every file's size; was the package changed after it was made?"


def _refused(archive: Path, member: str, why: str, hint: str = _LAYOUT_HINT) -> ExpflowError:
    return ExpflowError(f"package {str(archive)!r}: member {member!r} is refused: {why}; {hint}")


def _byte_limit(value: object, default: int, what: str) -> int:
    """``value`` as a byte limit (None: ``default``), or one clear error."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ExpflowError(
            f"{what}={value!r} is not allowed; expected a whole number of bytes >= 0"
        )
    return value


def _too_big(rel: str, size: int | None, limit: int) -> str:
    """Why the metadata file ``rel`` of ``size`` bytes (None: more than the limit) is not read."""
    held = f"{size:,} bytes" if size is not None else f"more than {limit:,} bytes"
    return (
        f"{rel}: {held}, over the {limit:,}-byte limit for package metadata files; "
        "not read (a real one is far smaller)"
    )


def _listed_size(entry: object) -> int | None:
    size = entry.get("size") if isinstance(entry, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def _read_manifest_member(
    archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int
) -> dict[str, Any]:
    """The ``files`` table of the archive's manifest, read within ``limit`` bytes."""
    if member.size > limit:
        raise _refused(archive, member.name, _too_big(MANIFEST, member.size, limit), _SIZE_HINT)
    fh = tar.extractfile(member)
    raw = read_bounded(fh, limit) if fh is not None else None
    if raw is None:
        raise _refused(archive, member.name, _too_big(MANIFEST, None, limit), _SIZE_HINT)
    try:
        listed = json.loads(raw)["files"]
        if not isinstance(listed, dict):
            raise TypeError("files is not a table")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ExpflowError(
            f"package {str(archive)!r}: {MANIFEST} is unreadable ({type(exc).__name__}); "
            "expected JSON with a 'files' table"
        ) from None
    return listed


def unpack_package(
    archive: Path | str,
    dest: Path | str,
    *,
    max_bytes: int | None = None,
    max_manifest_bytes: int | None = None,
) -> Path:
    """Safely extract ``archive`` into ``dest``; returns the package folder.

    Every member is checked before anything is written: absolute paths, ``..``, links,
    devices, members outside one top folder, members that ``manifest.json`` does not list
    or whose size differs from the size it records, and a total over ``max_bytes``
    (default :data:`MAX_UNPACK_BYTES`) are refused (ExpflowError naming the member). Each
    file is then streamed with its recorded size as a limit; on any refusal nothing is
    left in ``dest``. Metadata files are limited to ``max_manifest_bytes``
    (default :data:`MAX_MANIFEST_BYTES`).
    """
    total_limit = _byte_limit(max_bytes, MAX_UNPACK_BYTES, "max_bytes")
    meta_limit = _byte_limit(max_manifest_bytes, MAX_MANIFEST_BYTES, "max_manifest_bytes")
    archive = Path(archive).expanduser()
    dest = Path(dest).expanduser()
    if not archive.is_file():
        raise ExpflowError(f"package {str(archive)!r} does not exist or is not a file")
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ExpflowError(
            f"package {str(archive)!r} is not a readable tar archive ({exc})"
        ) from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ExpflowError(f"package {str(archive)!r} is corrupt ({exc})") from None
        top: str | None = None
        for m in members:
            why = _member_problem(m)
            if why:
                raise _refused(archive, m.name, why)
            first = _member_parts(m.name)[0]
            if top is None:
                top = first
            elif first != top:
                raise _refused(archive, m.name, f"it lies outside the top folder {top!r}")
            if m.isreg() and len(_member_parts(m.name)) == 1:
                raise _refused(archive, m.name, "it is a file beside the top folder")
        manifests = [m for m in members if m.isreg() and _member_parts(m.name) == [top, MANIFEST]]
        if top is None or not manifests:
            raise ExpflowError(
                f"package {str(archive)!r} has no {MANIFEST} in a top folder; "
                "is it an expflow package?"
            )
        try:
            listed = _read_manifest_member(archive, tar, manifests[0], meta_limit)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ExpflowError(f"package {str(archive)!r} is corrupt ({exc})") from None
        plan = _unpack_plan(archive, members, listed, total_limit, meta_limit)
        dest_existed = dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise ExpflowError(
                f"unpack folder {str(dest)!r} is not empty; expected a new or empty folder"
            )
        try:
            _write_members(archive, tar, plan, dest)
            root = dest / top
            real = dest.resolve()
            for p in root.rglob("*"):
                if p.is_symlink() or not _inside(p.resolve(), real):
                    raise _refused(
                        archive, p.relative_to(dest).as_posix(), "it is a link after unpacking"
                    )
        except BaseException:
            # Leave nothing behind: a refused or broken archive is not half there.
            for child in list(dest.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            if not dest_existed:
                with contextlib.suppress(OSError):
                    dest.rmdir()
            raise
    return root


def _unpack_plan(
    archive: Path,
    members: list[tarfile.TarInfo],
    listed: dict[str, Any],
    total_limit: int,
    meta_limit: int,
) -> list[tuple[tarfile.TarInfo, list[str], int]]:
    """(member, path parts, bytes it may hold) for each member, once every check passed."""
    plan: list[tuple[tarfile.TarInfo, list[str], int]] = []
    seen: set[str] = set()
    total = 0
    for m in members:
        parts = _member_parts(m.name)
        if m.isdir():
            plan.append((m, parts, 0))
            continue
        rel = "/".join(parts[1:])
        if rel in seen:
            raise _refused(archive, m.name, "it appears twice in the archive", _SIZE_HINT)
        seen.add(rel)
        if rel == MANIFEST:
            expected = m.size
        elif rel == SIGNATURE:
            if m.size > _MAX_SIGNATURE_BYTES:
                why = f"a signature of {m.size:,} bytes (at most {_MAX_SIGNATURE_BYTES:,})"
                raise _refused(archive, m.name, why, _SIZE_HINT)
            expected = m.size
        else:
            if rel not in listed:
                raise _refused(archive, m.name, f"it is not listed in {MANIFEST}", _SIZE_HINT)
            size = _listed_size(listed[rel])
            if size is None:
                why = f"{MANIFEST} records no valid size for it ({listed[rel]!r})"
                raise _refused(archive, m.name, why, _SIZE_HINT)
            if m.size != size:
                why = f"it holds {m.size:,} bytes, manifest says {size:,} bytes"
                raise _refused(archive, m.name, why, _SIZE_HINT)
            if rel in METADATA_FILES and size > meta_limit:
                raise _refused(archive, m.name, _too_big(rel, size, meta_limit), _SIZE_HINT)
            expected = size
        total += expected
        plan.append((m, parts, expected))
    if total > total_limit:
        raise ExpflowError(
            f"package {str(archive)!r} would unpack to {total:,} bytes, over the "
            f"{total_limit:,}-byte limit (max_bytes; default MAX_UNPACK_BYTES); nothing was written"
        )
    return plan


def _write_members(
    archive: Path,
    tar: tarfile.TarFile,
    plan: list[tuple[tarfile.TarInfo, list[str], int]],
    dest: Path,
) -> None:
    """Write the planned members below ``dest``, each stopped at the bytes it may hold."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        for m, parts, expected in plan:
            target = dest.joinpath(*parts)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is None:
                raise _refused(archive, m.name, "it has no data")
            mode = 0o755 if m.mode & 0o100 else 0o644
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, mode)
            written = 0
            with os.fdopen(fd, "wb") as out:
                # Never trust the header alone: at most one byte past the record is read.
                while chunk := src.read(min(_CHUNK, expected - written + 1)):
                    written += len(chunk)
                    if written > expected:
                        why = f"more than the {expected:,} bytes recorded for it arrived"
                        raise _refused(archive, m.name, why, _SIZE_HINT)
                    out.write(chunk)
            if written != expected:
                why = f"it ended after {written:,} of its {expected:,} bytes"
                raise _refused(archive, m.name, why, _SIZE_HINT)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ExpflowError(f"package {str(archive)!r} could not be unpacked ({exc})") from None


def _package_root(folder: Path) -> Path:
    if (folder / MANIFEST).is_file():
        return folder
    # The folder an archive was extracted into: accept its single package folder.
    subs = [p for p in folder.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    if len(subs) == 1:
        return subs[0]
    raise ExpflowError(
        f"folder {str(folder)!r} holds no {MANIFEST}; expected a package folder or a .tar.gz"
    )


def _safe_rel(rel: object) -> bool:
    return (
        isinstance(rel, str)
        and bool(rel)
        and not rel.startswith("/")
        and "\\" not in rel
        and all(p not in ("", ".", "..") for p in rel.split("/"))
    )


_Scan = tuple[dict[str, tuple[str, int]], dict[str, bytes], list[str]]


def _take(
    rel: str,
    size: int,
    fh: Any,
    limit: int,
    found: dict[str, tuple[str, int]],
    keep: dict[str, bytes],
    problems: list[str],
) -> None:
    """Hash one file of ``size`` bytes (as a header or stat says); keep the manifest, its
    signature and the environment, each read within its limit."""
    if rel == SIGNATURE:
        raw = read_bounded(fh, _MAX_SIGNATURE_BYTES)
        if raw is None:
            problems.append(f"{SIGNATURE}: more than {_MAX_SIGNATURE_BYTES:,} bytes; not read")
        else:
            keep[rel] = raw
        return
    if rel in METADATA_FILES and size > limit:
        problems.append(_too_big(rel, size, limit))
        found[rel] = ("", -1)  # not even hashed: it is refused whatever it holds
        return
    if rel in (MANIFEST, ENVIRONMENT):
        raw = read_bounded(fh, limit)
        if raw is None:
            problems.append(_too_big(rel, None, limit))
            found[rel] = ("", -1)
            return
        keep[rel] = raw
        found[rel] = hash_bytes(raw)
        return
    found[rel] = hash_stream(fh)


def _scan_archive(archive: Path, limit: int) -> _Scan:
    """Hashes of every file in the archive (by name below the top folder), the manifest,
    signature and environment bytes, and structural problems, without extracting anything."""
    found: dict[str, tuple[str, int]] = {}
    keep: dict[str, bytes] = {}
    problems: list[str] = []
    top: str | None = None
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                why = _member_problem(m)
                if why:
                    problems.append(f"{m.name}: refused member: {why}")
                    continue
                parts = _member_parts(m.name)
                if top is None:
                    top = parts[0]
                if parts[0] != top:
                    problems.append(f"{m.name}: outside the top folder {top!r}")
                    continue
                if m.isdir():
                    continue
                rel = "/".join(parts[1:])
                if not rel:
                    problems.append(f"{m.name}: a file beside the top folder")
                    continue
                if rel in found or rel in keep:
                    problems.append(f"{rel}: appears twice in the archive")
                fh = tar.extractfile(m)
                assert fh is not None
                _take(rel, m.size, fh, limit, found, keep, problems)
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"archive is corrupt or unreadable ({type(exc).__name__}: {exc})")
    return found, keep, problems


def _scan_folder(root: Path, limit: int) -> _Scan:
    found: dict[str, tuple[str, int]] = {}
    keep: dict[str, bytes] = {}
    problems: list[str] = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            problems.append(f"{rel}: a symbolic link, not a regular file")
            continue
        if p.is_dir():
            continue
        if not p.is_file():
            problems.append(f"{rel}: not a regular file")
            continue
        with open(p, "rb") as fh:
            _take(rel, os.fstat(fh.fileno()).st_size, fh, limit, found, keep, problems)
    return found, keep, problems


def verify_package(
    path: Path | str,
    *,
    max_manifest_bytes: int | None = None,
    key: bytes | str | None = None,
) -> VerifyReport:
    """Check a package (archive or unpacked folder) against its manifest.

    Missing files, checksum or size mismatches, unexpected files, metadata files over
    ``max_manifest_bytes`` (default :data:`MAX_MANIFEST_BYTES`) and, with a team ``key``
    (default ``$EXPFLOW_PACKAGE_KEY``), a missing or wrong ``manifest.sig`` are problems;
    Python, OS and package version differences from here are information only.
    """
    limit = _byte_limit(max_manifest_bytes, MAX_MANIFEST_BYTES, "max_manifest_bytes")
    team_key = package_key(key)
    path = Path(path).expanduser()
    if not path.exists():
        raise ExpflowError(f"package {str(path)!r} does not exist; expected a .tar.gz or folder")
    if path.is_dir():
        root = _package_root(path)
        found, keep, problems = _scan_folder(root, limit)
        shown = root
    else:
        found, keep, problems = _scan_archive(path, limit)
        shown = path
    if MANIFEST not in keep:
        if MANIFEST not in found:  # else it was too big to read, which is said already
            problems.append(f"{MANIFEST}: missing; this is not an expflow package")
        return VerifyReport(shown, False, problems)
    try:
        manifest = json.loads(keep[MANIFEST])
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("files is not a table")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        problems.append(f"{MANIFEST}: unreadable ({type(exc).__name__}: {exc})")
        return VerifyReport(shown, False, problems)
    if team_key is not None:
        if SIGNATURE not in keep:
            problems.append(
                f"{SIGNATURE}: missing; a team key is configured ({KEY_ENV}), "
                "so packages must be signed with it"
            )
        elif not signature_matches(keep[MANIFEST], keep[SIGNATURE], team_key):
            problems.append(
                f"{SIGNATURE}: the signature does not match {MANIFEST} under the configured "
                "key; the manifest was changed, or signed with another key"
            )
    for rel, entry in sorted(listed.items()):
        if not _safe_rel(rel) or rel in (MANIFEST, SIGNATURE):
            problems.append(f"{MANIFEST} lists a path that is not allowed: {rel!r}")
            continue
        if rel not in found:
            problems.append(f"{rel}: missing")
            continue
        if found[rel][1] < 0:  # too big to read; said already
            continue
        problem = entry_problem(rel, entry, found[rel])
        if problem:
            problems.append(problem)
    for rel in sorted(found):
        if rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: unexpected file, not listed in the manifest")
    differences: list[str] = []
    if ENVIRONMENT in keep:
        try:
            recorded = json.loads(keep[ENVIRONMENT])
            differences = environment_differences(recorded if isinstance(recorded, dict) else {})
        except (ValueError, RecursionError):
            problems.append(f"{ENVIRONMENT}: not valid JSON")
    return VerifyReport(shown, not problems, problems, differences)


# --------------------------------------------------------------------------- reproducing


def _read_json(root: Path, rel: str, limit: int, default: Any = None) -> Any:
    """The JSON file ``rel`` of a package folder, read within ``limit`` bytes; ``default``
    when it is missing or unreadable (None: an ExpflowError instead)."""
    where = root / rel
    try:
        with open(where, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = read_bounded(fh, limit) if size <= limit else None
            if raw is None:
                raise ExpflowError(
                    f"package {str(root)!r}: {_too_big(rel, size if size > limit else None, limit)}"
                )
        return json.loads(raw)
    except FileNotFoundError:
        if default is not None:
            return default
        raise ExpflowError(f"{str(where)!r} does not exist; is this an expflow package?") from None
    except (OSError, ValueError, RecursionError) as exc:
        if default is not None:
            return default
        raise ExpflowError(f"{str(where)!r} is unreadable ({type(exc).__name__})") from None


def _read_runs(root: Path, limit: int | None = None) -> list[dict[str, Any]]:
    where = root / RUNS
    data = _read_json(root, RUNS, _byte_limit(limit, MAX_MANIFEST_BYTES, "max_manifest_bytes"))
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list):
        raise ExpflowError(f"{str(where)!r} is unreadable (it holds no 'runs' list)")
    for run in runs:
        run_id = run.get("run_id") if isinstance(run, dict) else None
        if not isinstance(run_id, str) or not NAME_RE.fullmatch(run_id) or ".." in run_id:
            raise ExpflowError(f"{RUNS}: run id {run_id!r} is not allowed; use {NAME_RULE}")
        if not isinstance(run.get("params"), dict) or not isinstance(run.get("metrics"), dict):
            raise ExpflowError(f"{RUNS}: run {run_id!r} has no params or metrics table")
        if not isinstance(run.get("trainable"), str):
            raise ExpflowError(f"{RUNS}: run {run_id!r} names no trainable")
    return runs


def _choose(
    runs: list[dict[str, Any]], combos: list[str] | str | None, first: int | None
) -> list[dict[str, Any]]:
    chosen = runs
    if combos is not None:
        if isinstance(combos, str):
            combos = [c.strip() for c in combos.split(",") if c.strip()]
        by_id = {r["run_id"]: r for r in runs}
        for c in combos:
            if c not in by_id:
                known = ", ".join(list(by_id)[:5]) + (
                    f" (and {len(by_id) - 5} more)" if len(by_id) > 5 else ""
                )
                raise ExpflowError(f"run id {c!r} is not in the package; known ids: {known}")
        chosen = [by_id[c] for c in dict.fromkeys(combos)]
    if first is not None:
        if isinstance(first, bool) or not isinstance(first, int) or first < 1:
            raise ExpflowError(f"first={first!r} is not allowed; expected a whole number >= 1")
        chosen = chosen[:first]
    return chosen


def _compare(expected: dict[str, Any], got: dict[str, float], tolerance: float) -> list[MetricDiff]:
    diffs = []
    for name, exp in expected.items():
        value = got.get(name)
        exp_f = float(exp) if exp is not None else None
        if value is None or exp_f is None:
            diffs.append(MetricDiff(name, exp_f, value, None))
            continue
        if math.isnan(exp_f) and math.isnan(value):
            continue
        if exp_f == value:
            continue
        scale = max(abs(exp_f), abs(value))
        rel = abs(value - exp_f) / scale if scale else 0.0
        if not (rel <= tolerance):
            diffs.append(MetricDiff(name, exp_f, value, rel if math.isfinite(rel) else None))
    return diffs


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _on_sys_path(folder: Path | None) -> Iterator[None]:
    if folder is None:
        yield
        return
    sys.path.insert(0, str(folder))
    # No __pycache__ in the package folder: it would be an unexpected file next time.
    was, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        yield
    finally:
        sys.dont_write_bytecode = was
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def _source_entry(spec: str, code: dict[str, Any]) -> dict[str, Any]:
    entry = code.get("sources", {}).get(spec) if isinstance(code, dict) else None
    return entry if isinstance(entry, dict) else {}


def _original(spec: str, code: dict[str, Any]) -> str | None:
    original = _source_entry(spec, code).get("original")
    return original if isinstance(original, str) else None


def _archived_copy(spec: str, root: Path, code: dict[str, Any]) -> Path | None:
    archived = _source_entry(spec, code).get("archived")
    return root / archived if isinstance(archived, str) and _safe_rel(archived) else None


def _resolve_launch(launch: dict[str, Any], root: Path, code: dict[str, Any]) -> dict[str, Any]:
    """``launch`` with each file it names that no longer exists replaced by its packaged copy."""

    def word(w: Any) -> Any:
        if not isinstance(w, str) or Path(w).expanduser().exists():
            return w
        copy = _archived_copy(w, root, code)
        return str(copy) if copy is not None and copy.is_file() else w

    out = dict(launch)
    for key in ("command", "interpreter", "args"):
        words = out.get(key)
        if isinstance(words, str):
            words = shlex.split(words)
        if isinstance(words, list):
            out[key] = [word(w) for w in words]
    metrics = out.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("reader"), str):
        file, colon, attr = metrics["reader"].rpartition(":")
        if colon and file.endswith(".py"):
            out["metrics"] = {**metrics, "reader": f"{word(file)}:{attr}"}
    return out


def _resolve_trainable(spec: str, root: Path, code: dict[str, Any]) -> tuple[str, Path | None]:
    """The trainable to run, and a folder to put on sys.path for it (or None).

    The original script is used when it still exists, else the packaged copy; a
    callable whose module cannot be imported here is imported from ``code/``.
    """
    copy = _archived_copy(spec, root, code)
    if Trainable.parse(spec).kind == "script":
        original = _original(spec, code)
        if original is not None and Path(original).is_file():
            return original, None
        if copy is not None and copy.is_file():
            return str(copy), None
        return spec, None
    module = spec.partition(":")[0]
    if _importable(module) or copy is None or not copy.is_file():
        return spec, None
    return spec, root / "code"


def reproduce(
    path_or_dir: Path | str,
    *,
    combos: list[str] | None = None,
    tolerance: float = 1e-6,
    workdir: Path | str | None = None,
    first: int | None = None,
    timeout: float | None = None,
    trust_modified: bool = False,
    max_unpack_bytes: int | None = None,
    max_manifest_bytes: int | None = None,
    key: bytes | str | None = None,
    on_trusted: Callable[[list[str]], None] | None = None,
) -> ReproduceReport:
    """Re-run a package's runs (all, ``combos`` by id, and/or the ``first`` N) and compare
    their metrics with the packaged ones within relative ``tolerance``.

    An archive is unpacked safely into ``workdir`` (default: a new temporary folder);
    re-runs go to a new ``reruns-*`` folder there. A package that fails
    :func:`verify_package` runs nothing (ExpflowError naming the first problem) unless
    ``trust_modified``; then the overridden problems are in the report's
    ``trusted_modified`` and passed to ``on_trusted`` before anything runs. Runs the
    packaged code: trust it first.
    """
    try:
        tol = float(tolerance)
    except (TypeError, ValueError):
        tol = float("nan")
    if not math.isfinite(tol) or tol < 0:
        raise ExpflowError(f"tolerance {tolerance!r} is not allowed; expected a number >= 0")
    meta_limit = _byte_limit(max_manifest_bytes, MAX_MANIFEST_BYTES, "max_manifest_bytes")
    src = Path(path_or_dir).expanduser()
    if not src.exists():
        raise ExpflowError(f"package {str(src)!r} does not exist; expected a .tar.gz or folder")
    if workdir is None:
        work = Path(tempfile.mkdtemp(prefix="expflow-reproduce-"))
    else:
        work = Path(workdir).expanduser()
        work.mkdir(parents=True, exist_ok=True)
    unpack_to: Path | None = None
    try:
        if src.is_dir():
            root = _package_root(src)
        else:
            unpack_to = Path(tempfile.mkdtemp(dir=work, prefix="package-"))
            root = unpack_package(
                src, unpack_to, max_bytes=max_unpack_bytes, max_manifest_bytes=meta_limit
            )
        check = verify_package(root, max_manifest_bytes=meta_limit, key=key)
        if check.problems and not trust_modified:
            raise ExpflowError(
                f"package {str(src)!r} failed verification with {len(check.problems)} "
                f"problem(s), the first: {_one_line(check.problems[0])}; nothing was run "
                "(`expflow package verify` lists them all; --trust-modified, or "
                "trust_modified=True, runs it anyway)"
            )
        manifest = _read_json(root, MANIFEST, meta_limit, {})
        code = manifest.get("code", {}) if isinstance(manifest, dict) else {}
        chosen = _choose(_read_runs(root, meta_limit), combos, first)
    except BaseException:
        # Nothing ran: leave nothing behind either.
        if unpack_to is not None:
            shutil.rmtree(unpack_to, ignore_errors=True)
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    report = ReproduceReport(
        package=root,
        workdir=work,
        tolerance=tol,
        environment_differences=list(check.environment_differences),
        trusted_modified=list(check.problems),
    )
    if report.trusted_modified and on_trusted is not None:
        on_trusted(report.trusted_modified)
    reruns = Path(tempfile.mkdtemp(dir=work, prefix="reruns-"))
    for run in chosen:
        report.runs.append(_rerun(run, root, code, reruns, tol, timeout))
    return report


def _one_line(text: str) -> str:
    """``text`` with control characters (a newline in a member's name) escaped."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def _rerun(
    run: dict[str, Any],
    root: Path,
    code: dict[str, Any],
    reruns: Path,
    tolerance: float,
    timeout: float | None,
) -> RunOutcome:
    run_id = run["run_id"]
    redacted = run.get("redacted_params") or []
    note = (
        f" ({', '.join(map(str, redacted))} were masked as secrets when packaged)"
        if redacted
        else ""
    )
    try:
        launch = run.get("launch")
        if launch is not None and not isinstance(launch, dict):
            raise ExpflowError(f"its launch {launch!r} is not a mapping")
        if launch and launch.get("command"):
            spec, extra_path = run["trainable"], None
        else:
            spec, extra_path = _resolve_trainable(run["trainable"], root, code)
        if launch:
            launch = _resolve_launch(launch, root, code)
        arg_style = run.get("arg_style") or "argparse"
        if arg_style not in ARG_STYLES:
            raise ExpflowError(f"arg style {arg_style!r} is not known")
        with _on_sys_path(extra_path):
            result = run_trainable(
                spec,
                dict(run["params"]),
                reruns / run_id,
                budget=run.get("budget") or None,
                timeout=timeout,
                arg_style=arg_style,
                launch=launch or None,
            )
    except ExpflowError as exc:
        return RunOutcome(run_id, "failed", reason=f"{exc}{note}", trainable=run["trainable"])
    if not result.ok:
        return RunOutcome(
            run_id,
            "failed",
            reason=f"{result.status}: {result.reason}{note}",
            run_dir=result.run_dir,
            trainable=spec,
        )
    diffs = _compare(run["metrics"], result.metrics, tolerance)
    return RunOutcome(
        run_id,
        "differed" if diffs else "matched",
        differences=diffs,
        reason=note.strip(" ()") if diffs and note else "",
        run_dir=result.run_dir,
        trainable=spec,
        metrics=result.metrics,
    )


__all__ = [
    "ENV_ALLOWLIST",
    "MetricDiff",
    "ReproduceReport",
    "RunOutcome",
    "RunSpec",
    "VerifyReport",
    "capture_package_environment",
    "create_package",
    "environment_differences",
    "installed_distributions",
    "is_secret_file",
    "redact_python",
    "redact_text",
    "reproduce",
    "sanitize_file",
    "scrub_strict",
    "unpack_package",
    "verify_package",
]


# --------------------------------------------------------------------------- sources


def package_sweep(
    sweep_dir: Path,
    out: Path | str,
    *,
    include_data_up_to_mb: float = 10,
    sign_key: bytes | str | None = None,
) -> Path:
    """Package a finished sweep: its config and space, results, metadata and every ok run."""
    from expflow_flows.sweep.results import SweepResults

    meta_path = sweep_dir / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ExpflowError(
            f"{meta_path} is missing or unreadable: is {sweep_dir} a sweep?"
        ) from None
    cfg = meta.get("config", {})
    steps = _sweep_steps(cfg)
    # A chain's later steps read their upstream's folder, so the runs a package can re-run
    # on their own are the first step's.
    first = steps[0]
    results = SweepResults.load(sweep_dir).filter(step=first["name"])
    runs = [
        RunSpec(
            run_id=row["combo_id"],
            params={k.removeprefix("param:"): v for k, v in row.items() if k.startswith("param:")},
            metrics={
                k.removeprefix("metric:"): v
                for k, v in row.items()
                if k.startswith("metric:") and v is not None
            },
            trainable=label_of(first),
            budget=first.get("budget"),
            arg_style=first.get("arg_style") or "argparse",
            launch=launch_of(first),
        )
        for row in results.rows
        if row["status"] in ("ok", "warning")
    ]
    space = cfg.get("space")
    config_files = [meta_path] + (
        [Path(space)] if isinstance(space, str) and Path(space).exists() else []
    )
    results_csv = sweep_dir / "results.csv"
    return create_package(
        out,
        name=f"{sweep_dir.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}",
        trainable=[label_of(s) for s in steps],
        launches={label_of(s): la for s in steps if (la := launch_of(s))},
        runs=runs,
        config_files=config_files,
        result_files=[p for p in (results_csv, sweep_dir / "results.parquet") if p.exists()],
        data_files=[Path(p) for p in cfg.get("inputs") or []],
        include_data_up_to_mb=include_data_up_to_mb,
        extra={"sweep": sweep_dir.name, "combinations": meta.get("combinations")},
        kind="sweep",
        sign_key=sign_key,
    )


def _sweep_steps(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """A sweep's steps from its recorded settings: each a trainable section with a name."""
    if cfg.get("steps"):
        return [dict(s) for s in cfg["steps"]]
    trainable = cfg.get("trainable")
    if not isinstance(trainable, dict) or not (trainable.get("target") or trainable.get("command")):
        raise ExpflowError("the sweep's metadata.json names no trainable; is it a sweep folder?")
    return [{"name": "run", **trainable}]


def package_experiment(
    exp_id: str,
    out: Path | str,
    *,
    include_data_up_to_mb: float = 10,
    sign_key: bytes | str | None = None,
) -> Path:
    """Package a ledger experiment: its settings, best params, metrics and run folder files."""
    from expflow_flows.governance.ledger import Ledger

    row = Ledger().get(exp_id)
    if not row.run_dir or not Path(row.run_dir).is_dir():
        raise ExpflowError(f"experiment {row.id} has no run folder to package")
    run_dir = Path(row.run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    settings = (
        json.loads((run_dir / "params.json").read_text(encoding="utf-8"))
        if (run_dir / "params.json").exists()
        else {}
    )
    train_run = Path(summary.get("train_run", "")) if summary.get("train_run") else None
    train = settings.get("train") if isinstance(settings.get("train"), dict) else {}
    evaluate = settings.get("evaluate")
    launches = {}
    if train and (train.get("target") or train.get("command")) and (la := launch_of(train)):
        launches[label_of(train)] = la
    if isinstance(evaluate, dict):
        if (evaluate.get("target") or evaluate.get("command")) and (la := launch_of(evaluate)):
            launches[label_of(evaluate)] = la
        evaluate = (
            label_of(evaluate) if (evaluate.get("target") or evaluate.get("command")) else None
        )
    runs = []
    if train_run and (train_run / "params.json").exists():
        runs.append(
            RunSpec(
                run_id="train",
                params=json.loads((train_run / "params.json").read_text(encoding="utf-8")),
                metrics=json.loads((train_run / "metrics.json").read_text(encoding="utf-8")),
                trainable=row.trainable,
                budget=train.get("budget"),
                arg_style=train.get("arg_style") or "argparse",
                launch=launches.get(row.trainable),
            )
        )
    files = [
        p
        for p in (
            summary_path,
            run_dir / "params.json",
            run_dir / "metadata.json",
            run_dir / "metrics.json",
        )
        if p.exists()
    ]
    return create_package(
        out,
        name=f"{row.name}-{row.id}",
        trainable=[t for t in (row.trainable, evaluate) if t],
        runs=runs,
        config_files=[p for p in (run_dir / "params.json",) if p.exists()],
        result_files=files,
        include_data_up_to_mb=include_data_up_to_mb,
        extra={"experiment": row.id, "state": row.state},
        kind="experiment",
        launches=launches,
        sign_key=sign_key,
    )
