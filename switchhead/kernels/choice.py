"""Which implementation of an expert op runs: the all-experts dense formula or the sparse kernels.

Shape legend: d width, H heads, E experts per head, k active, dh head size.

- "dense": every expert of every head in one GEMM ([N, d] @ [d, H*E*dh] for V), the gates as a dense
  [N, H, E] table, multiply and sum (reference.py). E/k times the useful FLOPs, but at cuBLAS speed,
  and under torch.compile Inductor fuses the gate table, the multiply and the sum into one kernel
  around the GEMM. The only implementation on the CPU.
- "sparse": the routed Triton kernels (triton_ops.py): only the chosen experts, CUDA only.
- "auto": the rule below, per op, shape and whether the call will be differentiated. It uses no token
  count, so a graph compiled with a dynamic token dimension never recompiles on it.

The rule is a table of measurements, not a model of the hardware: "auto" runs the sparse kernels only
for an (op, d, H, E, k, dh) where they were measured faster than the dense formula on an H200 under
torch.compile (BENCHMARKS.md "Kernels", benchmarks/bench_kernels.py, 2026-12-04), and the dense
formula everywhere else. Unmeasured shapes get the dense formula, which is the compiled all-experts
formula itself, so auto is never slower than it. In the second run of 2026-12-04 (the rebuilt
kernels) the sparse kernels won only the V forward at the 262M shape (1.07x / 1.18x of the dense
formula at 16k / 64k tokens) and lost every backward (0.18-0.84x), every O projection and the V
forward at the other four shapes (0.48-0.95x, Llama-1B fold 1.04x at 64k only).

Only where nothing will be differentiated (`training=False`: inference, no_grad): in a training step
the dense forward's all-experts GEMM is the very product the dense backward needs for the gate
gradient, and torch.compile computes it once for both; a sparse forward leaves the backward to
recompute it, and the 262M training step (V then O, forward and backward) measured 0.92-0.93x of the
all-dense one with the sparse V forward inside.
"""

from __future__ import annotations

from switchhead.kernels.routing import MAX_EXPERTS

IMPLS = ("auto", "dense", "sparse")
OPS = ("expert_v", "expert_v_backward", "expert_o", "expert_o_backward")
# (op, d, H, E, k, dh) where the sparse kernels measured faster than the dense formula (bf16, H200,
# nothing differentiated)
SPARSE_FASTER = frozenset({("expert_v", 1024, 4, 4, 2, 112)})


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"expert op impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def choose_impl(op: str, impl: str, *, device_type: str, d: int, heads: int, experts: int, top_k: int,
                head_dim: int, training: bool = False) -> str:
    """"dense" or "sparse" for one call of `op` (one of OPS); `impl` is the caller's wish; `training`:
    the call's activations require grad (a backward will follow)."""
    check_impl(impl)
    if device_type != "cuda" or experts > MAX_EXPERTS:
        return "dense"  # the only implementation there
    if impl != "auto":
        return impl
    if training:
        return "dense"
    return "sparse" if (op, d, heads, experts, top_k, head_dim) in SPARSE_FASTER else "dense"
