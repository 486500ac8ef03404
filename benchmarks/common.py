"""Replace one '## Title' section of a markdown file (BENCHMARKS.md), leaving the others as they are."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, title: str, body: str) -> None:
    """Put '## {title}' + `body` in place of that section (up to the next '## ' heading), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
