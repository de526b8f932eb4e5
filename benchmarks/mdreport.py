"""Benchmarks write their figures into one section each of BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path

FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nWritten by `make bench`; each section by its own script.\n"


def write_section(title: str, lines: list[str]) -> Path:
    """Replace (or append) the section ``## title`` of BENCHMARKS.md with ``lines``."""
    text = FILE.read_text() if FILE.exists() else HEADER
    if not text.startswith("# Benchmarks"):
        text = HEADER
    body = f"## {title}\n\n" + "\n".join(lines).strip() + "\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + body
    FILE.write_text(text)
    return FILE
