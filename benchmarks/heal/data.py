"""The text bench_heal heals on: the running Python's standard library (source files, and the English
sentences of their docstrings and comments)."""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

from switchhead.healing.data import find_text_files


def stdlib_files() -> list[Path]:
    """The running Python's standard-library .py files (not site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in find_text_files([root], suffixes=(".py",)) if "site-packages" not in p.parts]


def python_sentences(files: list[Path], min_chars: int = 24, max_chars: int = 160) -> list[str]:
    """English sentences of the files' docstrings and comments, without repeats."""
    seen: dict[str, None] = {}
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces = [line.strip()[1:].strip() for line in text.splitlines() if line.strip().startswith("#")]
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            tree = None
        if tree is not None:
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        pieces.extend(" ".join(p.split()) for p in doc.split("\n\n"))
        for piece in pieces:
            for sentence in re.split(r"(?<=[.!?])\s+", piece):
                if min_chars <= len(sentence) <= max_chars and sum(c.isalpha() for c in sentence) > 0.6 * len(sentence):
                    seen.setdefault(sentence, None)
    return list(seen)
