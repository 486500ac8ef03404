"""Compile every switchhead Triton kernel for an H100/H200 (sm_90) with a chosen Triton, without a GPU.

The H200 machine runs an older Triton (3.6) than pip gives here; its frontend rejects code that newer
versions and TRITON_INTERPRET=1 accept (a name rebound to a tensor of another shape, say). Device time
is scarce, so compile here first, with that version, against a stand-in driver that reports an sm_90
target: `JITFunction.run(warmup=True)` runs the whole compiler (TTIR -> PTX -> cubin with the wheel's
ptxas) and launches nothing.

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 numpy
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages:. python scripts/check_triton_sm90.py

Exit status 1 and the compiler's message when a kernel fails to compile.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit


class _Sm90Driver:
    """Just enough of a driver for compiling: an sm_90 target, device 0, stream 0."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def _compile_only(compiled: set[str], failed: list[str]):
    run = jit.JITFunction.run

    def compile_without_launch(self, *args, grid, warmup, **kwargs):
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # report every kernel, not only the first failure
            failed.append(f"{self.fn.__name__}: {type(exc).__name__}: {exc}")
            raise
        compiled.add(self.fn.__name__)
        return kernel

    return compile_without_launch


def _exercise_kernels() -> None:
    """Call every kernel entry point on small CPU tensors, in fp32 and bf16, for three expert layouts."""
    import torch

    from switchhead.kernels import fan_in, fan_out, route_triton, routing, wgrad

    torch.manual_seed(0)
    for n, h, e, k, d, dh in [(300, 4, 4, 2, 64, 48), (200, 2, 8, 4, 48, 40), (100, 2, 5, 3, 40, 24)]:
        index = torch.rand(n, h, e).argsort(-1)[..., :k]
        gates = torch.rand(n, h, k)
        route_triton.route(index, gates, e, sig=True, head=True, groups=True)
        table, bits = routing.gate_table(index, gates, e), routing.expert_bits(index)
        tokens, sorted_gates, offsets = routing.expert_groups(index, gates, e)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, d, dtype=dtype)
            fan_out.fan_out(x, torch.randn(h, e, d, dh, dtype=dtype), None, table, bits, routing.head_order(bits, e))
            fan_out.fan_out(torch.randn(n, d, dtype=dtype), torch.randn(h, e, dh, d, dtype=dtype).transpose(2, 3),
                            None, table, bits, routing.head_order(bits, e), gate_input=torch.randn(n, h, dh, dtype=dtype))
            attn = torch.randn(n, h, dh, dtype=dtype)
            order = routing.signature_order(bits, e)
            fan_in.fan_in(attn, torch.randn(h, e, dh, d, dtype=dtype), table, bits, order)
            fan_out.fan_out(x, torch.randn(h, e, d, dh, dtype=dtype), None, table, bits, routing.head_order(bits, e),
                            gate_input=torch.randn(n, h, dh, dtype=dtype), store_out=False)
            wgrad.expert_wgrad(x.unsqueeze(1).expand(n, h, d), torch.randn(n, h, dh, dtype=dtype),
                               tokens, sorted_gates, offsets, e, True, dtype)


def main() -> int:
    compiled: set[str] = set()
    failed: list[str] = []
    driver.set_active(_Sm90Driver())
    jit.JITFunction.run = _compile_only(compiled, failed)
    try:
        _exercise_kernels()
    except Exception:
        if not failed:  # not a compile error: a bug of this script or of the launch code
            raise
    print(f"triton {triton.__version__}, sm_90: compiled {sorted(compiled)}")
    for message in failed:
        print("FAILED", message[:2000])
    return 1 if failed or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
