"""torch.compile must see our Triton kernels write exactly their outputs.

Inductor copies every argument it believes a user Triton kernel writes, and the copy is real whenever
the tensor is read again later (expert_index is, by the gate gradient). Its TTIR analysis counts as
written every pointer whose loads feed a @triton.jit helper that computes a store address (see
route_triton.py). These tests run torch's own analysis on every launch of the four ops
(benchmarks/compile/launches.py, no GPU needed) and compare it with what each kernel stores to, by its
flags.
"""

from __future__ import annotations

import pytest
import torch

from helpers import load_benchmark

pytest.importorskip("triton")

from ._cases import Shape, make_problem, triton_op_calls  # noqa: E402

def _written_by_flags(kernel: str, args: dict) -> set[str]:
    """What each kernel stores to, given its constexpr flags (the kernels' docstrings)."""
    def when(flag: str, *names: str) -> set[str]:
        return set(names) if args.get(flag) else set()

    if kernel == "_route_hist_kernel":
        return {"bits_ptr"} | when("TABLE", "table_ptr") | when("HEAD", "hh_ptr") | when("GROUPS", "hg_ptr") \
            | when("SIG", "hs_ptr", "sk_ptr")
    if kernel == "_route_scan_kernel":  # rewrites the counts in place
        return when("HEAD", "hh_ptr", "sh_ptr") | when("GROUPS", "hg_ptr", "off_ptr") | when("SIG", "hs_ptr", "ss_ptr")
    if kernel == "_route_scatter_kernel":
        return when("HEAD", "ho_ptr") | when("GROUPS", "tok_ptr", "sg_ptr") | when("SIG", "so_ptr")
    if kernel == "_fan_in_kernel":
        return {"out_ptr"}
    if kernel == "_fan_out_kernel":
        return when("STORE_OUT", "out_ptr") | when("GATE_GRAD", "gg_ptr")
    if kernel == "_wgrad_kernel":
        return {"gw_ptr"} | when("HAS_BIAS", "gb_ptr")
    raise AssertionError(f"no rule for {kernel}")


SHAPE = Shape(n=300, d=48, h=3, e=4, k=2, dh=32, d_out=40)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("op", ["expert_v", "expert_v_backward", "expert_o", "expert_o_backward"])
def test_torch_sees_each_kernel_write_only_its_outputs(op: str, with_bias: bool) -> None:
    helper = load_benchmark("compile.launches")
    p = make_problem(SHAPE, torch.bfloat16, seed=0)
    b = p.b_v if with_bias else None
    body, args = triton_op_calls(p, b)[op]
    inputs = [t for t in vars(p).values() if isinstance(t, torch.Tensor)]
    with helper.recorded_launches() as launches:
        body(*args)
        assert len(launches) >= 4, launches  # routing (3 launches) and at least one projection
        for launch in launches:
            written, _ = helper.analysed_writes(launch)
            assert written == _written_by_flags(launch.name, launch.args), f"{op}: {launch.name}"
            assert not any(launch.args[w] is t for w in written for t in inputs), f"{op}: {launch.name} writes an input"
