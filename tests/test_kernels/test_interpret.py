"""Runs interpret_cases.py in a fresh process with TRITON_INTERPRET=1 (the interpreter must be on before
Triton is imported, and must not leak into the other tests of this pytest run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(HERE.parents[1]),
           str(HERE / "interpret_cases.py")]
    run = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
