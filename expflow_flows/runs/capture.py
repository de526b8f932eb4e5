"""Metrics from code that was not written for expflow: its output, its files, its TensorBoard
scalars, or a reader function, as a trainable's settings declare (``metrics:``).

* :class:`OutputFollower` is fed the output as it arrives and matches regular expressions
  whose named groups are metrics (a group ``step`` marks a per-step value). Progress bars
  (``\\r`` updates) and ANSI colours are taken apart first.
* :func:`read_files` reads JSON, YAML and CSV result files found by glob; a list of
  mappings, or the rows of a CSV, are steps, the last one also the final values.
* :func:`read_tensorboard` reads scalars by tag from event files (``tensorboard`` extra).
* :func:`call_reader` calls the user's ``module:function(run_dir)`` for anything else.
* :class:`FilePoller` re-reads files while the run goes, so per-step values reach the
  pruner before the run ends.

expflow never unpickles a file a run wrote: unpickling runs code. A reader may.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
STEP_COLUMNS = ("step", "epoch", "iteration", "iter")
Match = tuple[int | None, dict[str, float]]


def _number(text: Any) -> float | None:
    if isinstance(text, bool):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class MetricSources:
    """The sources a trainable declares; empty means none besides the built-in ones."""

    patterns: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    tensorboard: tuple[str, ...] = ()
    reader: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MetricSources:
        """From plain data (a settings dump)."""
        data = data or {}
        return cls(
            patterns=tuple(data.get("patterns") or ()),
            files=tuple(data.get("files") or ()),
            tensorboard=tuple(data.get("tensorboard") or ()),
            reader=data.get("reader") or None,
        )

    def empty(self) -> bool:
        """True when nothing is declared."""
        return not (self.patterns or self.files or self.tensorboard or self.reader)

    def describe(self) -> str:
        """What was looked for, for a failure reason."""
        parts = []
        if self.patterns:
            parts.append("output patterns " + ", ".join(repr(p) for p in self.patterns))
        if self.files:
            parts.append("files " + ", ".join(repr(f) for f in self.files))
        if self.tensorboard:
            parts.append("TensorBoard tags " + ", ".join(repr(t) for t in self.tensorboard))
        if self.reader:
            parts.append(f"reader {self.reader!r}")
        return "; ".join(parts)


class OutputFollower:
    """Matches output as it arrives, in any chunks; returns ``(step, values)`` per match."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = []
        for pattern in patterns:
            try:
                self.patterns.append(re.compile(pattern))
            except re.error as exc:
                raise ExpflowError(
                    f"metric pattern {pattern!r} is not a regular expression ({exc})"
                ) from None
        self._partial = ""

    def feed(self, text: str) -> list[Match]:
        """Take more output; returns the matches of the lines it completed."""
        if not self.patterns:
            return []
        text = self._partial + text
        pieces = re.split(r"[\r\n]", text)
        self._partial = pieces.pop()
        return [m for piece in pieces for m in self._match(piece)]

    def close(self) -> list[Match]:
        """The output ended: match what is left of the last line."""
        rest, self._partial = self._partial, ""
        return self._match(rest) if rest and self.patterns else []

    def _match(self, line: str) -> list[Match]:
        if "\x1b" in line:
            line = ANSI_RE.sub("", line)
        out: list[Match] = []
        for pattern in self.patterns:
            for found in pattern.finditer(line):
                groups = found.groupdict()
                step_text = groups.pop("step", None)
                step = None
                if step_text is not None:
                    number = _number(step_text)
                    if number is None:
                        continue
                    step = int(number)
                values = {
                    k: v for k, v in ((k, _number(t)) for k, t in groups.items()) if v is not None
                }
                if values:
                    out.append((step, values))
        return out


def _check_globs(globs: Iterable[str]) -> None:
    for pattern in globs:
        if pattern.lower().endswith((".pt", ".pth", ".pkl", ".pickle", ".npy", ".npz", ".ckpt")):
            raise ExpflowError(
                f"metric files {pattern!r}: expflow does not unpickle files a run wrote; "
                "read it in a reader function instead"
            )


def _found(pattern: str, roots: Sequence[Path]) -> list[Path]:
    for root in roots:
        hits = sorted(glob.glob(pattern, root_dir=root, recursive=True))
        files = [root / h for h in hits if (root / h).is_file()]
        if files:
            return files
    return []


def _parse(path: Path, text: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        return _from_rows(rows)
    if suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, list):
        return _from_rows([r for r in data if isinstance(r, dict)])
    if isinstance(data, dict):
        return _values(data), []
    raise ValueError("expected a mapping of metrics or a list of per-step mappings")


def _values(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        number = _number(value)
        if number is not None and str(key) not in STEP_COLUMNS:
            out[str(key)] = number
    return out


def _from_rows(rows: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    steps: list[dict[str, Any]] = []
    final: dict[str, float] = {}
    for index, row in enumerate(rows):
        values = _values(row)
        if not values:
            continue
        column = next((c for c in STEP_COLUMNS if c in row), None)
        step = _number(row[column]) if column else None
        steps.append({"step": int(step) if step is not None else index, **values})
        final.update(values)
    return final, steps


def read_files(
    globs: Sequence[str], roots: Sequence[Path], *, strict: bool = True
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Final values and steps from the result files matching ``globs`` under the first root
    that has them. ``strict``: a file that cannot be parsed is an error naming it."""
    _check_globs(globs)
    final: dict[str, float] = {}
    steps: list[dict[str, Any]] = []
    for pattern in globs:
        for path in _found(pattern, roots):
            try:
                got_final, got_steps = _parse(path, path.read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                if strict:
                    raise ExpflowError(f"metrics file {path} cannot be read: {exc}") from None
                continue
            except Exception as exc:  # noqa: BLE001 - yaml's errors are not ValueErrors
                if strict:
                    raise ExpflowError(f"metrics file {path} cannot be read: {exc}") from None
                continue
            final.update(got_final)
            steps.extend(got_steps)
    return final, steps


def read_tensorboard(
    tags: Sequence[str], roots: Sequence[Path]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The last value of each tag, and every (step, value), from TensorBoard event files."""
    if not tags:
        return {}, []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise ExpflowError(
            "metrics from TensorBoard need the tensorboard package: "
            "pip install 'expflow-flows[tensorboard]'"
        ) from None
    by_step: dict[int, dict[str, float]] = {}
    final: dict[str, float] = {}
    for events in _found("**/events.out.tfevents.*", roots):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        available = acc.Tags()
        for tag in tags:
            points: list[tuple[int, float]] = []
            if tag in available.get("scalars", []):
                points = [(e.step, e.value) for e in acc.Scalars(tag)]
            elif tag in available.get("tensors", []):
                import numpy as np
                from tensorboard.util import tensor_util

                for e in acc.Tensors(tag):
                    array = np.asarray(tensor_util.make_ndarray(e.tensor_proto))
                    if array.size == 1:
                        points.append((e.step, float(array.reshape(()))))
            for step, value in points:
                number = _number(value)
                if number is None:
                    continue
                by_step.setdefault(int(step), {})[tag] = number
                final[tag] = number
    steps = [{"step": s, **v} for s, v in sorted(by_step.items())]
    return final, steps


def call_reader(spec: str, run_dir: Path) -> dict[str, float]:
    """The user's reader ``module:function`` (or ``file.py:function``) on the run folder."""
    from expflow_flows.runs.trainable import load_function

    fn = load_function(spec, "metrics reader")
    try:
        raw = fn(run_dir)
    except Exception as exc:  # noqa: BLE001 - the user's reader failing is the run's reason
        raise ExpflowError(f"metrics reader {spec!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise ExpflowError(f"metrics reader {spec!r} returned {type(raw).__name__}, not a mapping")
    return {str(k): v for k, v in ((k, _number(v)) for k, v in raw.items()) if v is not None}


class FilePoller:
    """Re-reads result files and event files while a run goes; returns only new steps."""

    def __init__(self, sources: MetricSources, roots: Sequence[Path]) -> None:
        self.sources, self.roots = sources, list(roots)
        self.seen: set[tuple[int, tuple[tuple[str, float], ...]]] = set()

    def poll(self) -> list[dict[str, Any]]:
        _, steps = read_files(self.sources.files, self.roots, strict=False)
        if self.sources.tensorboard:
            try:
                steps += read_tensorboard(self.sources.tensorboard, self.roots)[1]
            except Exception:  # noqa: BLE001 - a file being written is read next time
                pass
        new = []
        for row in steps:
            key = row_key(row)
            if key not in self.seen:
                self.seen.add(key)
                new.append(row)
        return new


def row_key(row: dict[str, Any]) -> tuple[int, tuple[tuple[str, Any], ...]]:
    """What makes two intermediate rows the same row: the step and every value."""
    return (int(row["step"]), tuple(sorted((k, v) for k, v in row.items() if k != "step")))


def collect(
    sources: MetricSources, roots: Sequence[Path], run_dir: Path
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The final reading after the run ended: files, TensorBoard, then the reader."""
    final, steps = read_files(sources.files, roots)
    tb_final, tb_steps = read_tensorboard(sources.tensorboard, roots)
    final.update(tb_final)
    steps.extend(tb_steps)
    if sources.reader:
        final.update(call_reader(sources.reader, run_dir))
    return final, steps
