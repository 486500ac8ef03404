"""The Triton op bodies trace with every size symbolic, as torch.library.opcheck's dynamic test traces them.

On the H200, opcheck of expert_o hung for minutes inside sympy: the weight-gradient split heuristic,
fed symbolic widths, built nested FloorDivs that sympy simplifies in exponential time. The launches
are recorded instead of run (benchmarks/compile/launches.py), so no GPU is needed.
"""

from __future__ import annotations

import contextlib
import signal

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from helpers import load_benchmark

pytest.importorskip("triton")

from ._cases import Shape, make_problem, triton_op_calls  # noqa: E402


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise in the traced Python code (sympy is pure Python) instead of hanging the test run."""
    def expire(_signum, _frame):
        raise TimeoutError(f"symbolic trace took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("op", ["expert_v", "expert_v_backward", "expert_o", "expert_o_backward"])
def test_op_bodies_trace_with_every_size_symbolic(op: str) -> None:
    helper = load_benchmark("compile.launches")
    p = make_problem(Shape(n=301, d=96, h=2, e=4, k=2, dh=32, d_out=80), torch.float32, seed=0)
    body, args = triton_op_calls(p, p.b_v)[op]
    with helper.recorded_launches() as launches, time_limit(60):
        make_fx(lambda *a: body(*a), tracing_mode="symbolic")(*args)
    names = [launch.name for launch in launches]
    assert names[:3] == ["_route_hist_kernel", "_route_scan_kernel", "_route_scatter_kernel"], names
    for launch in launches:
        if launch.name == "_wgrad_kernel":  # its split count is a heuristic of weight sizes: a plain int
            assert type(launch.args["S"]) is int, launch.args["S"]
