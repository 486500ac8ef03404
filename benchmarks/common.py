"""What the benchmark scripts share: timestamped progress lines, one-line errors, and replacing one
'## Title' section of a markdown file (BENCHMARKS.md) while leaving the others as they are."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path

START = time.perf_counter()  # when the benchmark process started (imported first thing by every script)


def log(msg: str) -> None:
    """Print `msg` with the UTC time and the seconds since START, flushed (long runs are watched live)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
    print(f"[{now} +{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def short_error(err: BaseException) -> str:
    """'Type: first line of the message' (at most 240 characters): what a results row records."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:240]}"


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
