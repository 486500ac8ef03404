"""Which implementation of an expert op runs: the all-experts dense formula or the sparse kernels.

Shape legend: d width, H heads, E experts per head, k active, dh head size.

- "dense": every expert of every head in one GEMM ([N, d] @ [d, H*E*dh] for V), the gates as a dense
  [N, H, E] table, multiply and sum (reference.py). E/k times the useful FLOPs, but at cuBLAS speed,
  and under torch.compile Inductor fuses the gate table, the multiply and the sum into one kernel
  around the GEMM. The only implementation on the CPU.
- "sparse": the routed Triton kernels (triton_ops.py): only the chosen experts, CUDA only.
- "auto": the rule below, per op and shape. It uses no token count, so a graph compiled with a
  dynamic token dimension never recompiles on it.

The rule comes from the H200 measurements in BENCHMARKS.md ("Kernels"): there the dense formula ran
faster than the sparse kernels at every paper and fold shape, forward and backward, except V forward
at the Llama-1B fold shape (d=2048, dh=64). So auto takes the sparse kernels only for the V forward
with a wide input (d >= SPARSE_V_MIN_WIDTH) and a head size they tile without padding (a multiple of
64), and the dense formula everywhere else.
"""

from __future__ import annotations

from switchhead.kernels.routing import MAX_EXPERTS

IMPLS = ("auto", "dense", "sparse")
OPS = ("expert_v", "expert_v_backward", "expert_o", "expert_o_backward")
SPARSE_V_MIN_WIDTH = 2048


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"expert op impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def choose_impl(op: str, impl: str, *, device_type: str, d: int, heads: int, experts: int, top_k: int,
                head_dim: int) -> str:
    """"dense" or "sparse" for one call of `op` (one of OPS); `impl` is the caller's wish."""
    check_impl(impl)
    if device_type != "cuda" or experts > MAX_EXPERTS:
        return "dense"  # the only implementation there
    if impl != "auto":
        return impl
    if op == "expert_v" and d >= SPARSE_V_MIN_WIDTH and head_dim % 64 == 0 and top_k < experts:
        return "sparse"
    return "dense"
