"""Fixtures for the command-line tests: a tiny two-attention model file and an in-process runner."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner, Result

from switchhead.cli import main

TINY_MODEL = (Path(__file__).parent / "tiny_model.py").read_text()


@pytest.fixture
def write_model(tmp_path: Path) -> Callable[..., Path]:
    """write_model(source, name="model.py") -> path of a model file in a fresh folder."""

    def write(source: str = TINY_MODEL, name: str = "model.py") -> Path:
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """run_cli(*args) -> click Result (exit_code, stdout, stderr), run in this process from tmp_path
    (so the default ./switchhead_out/ lands there)."""
    monkeypatch.chdir(tmp_path)

    def run(*args: object) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args])

    return run

