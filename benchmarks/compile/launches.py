"""The Triton launches of one SwitchHead op call, and which tensors torch.compile believes each writes.

Inductor learns which arguments a user Triton kernel writes by lowering it to TTIR and walking back
from every store, once per call site (functionalization, then Inductor's IR). Every argument it
believes written gets a functional copy, a real device copy when the tensor is read again later.
`recorded_launches` runs an op's Python body with `wrap_triton` replaced by a recorder (nothing is
launched, so no GPU is needed), and `analysed_writes` runs torch's own analysis on one launch, with a
Hopper target standing in for the GPU (TTIR generation needs a target, not a device). Measurement
only: both restore what they replace on exit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from switchhead.kernels import fan_in, fan_out, route_triton, wgrad

LAUNCHING_MODULES = (fan_in, fan_out, route_triton, wgrad)


@dataclass
class Launch:
    kernel: Any  # triton JITFunction
    args: dict[str, Any]  # every kernel argument by name, constexprs included

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    """Stands in for `wrap_triton` in the kernel modules: `wrap_triton(kernel)[grid](*args, **kwargs)`."""

    def __init__(self, launches: list[Launch]) -> None:
        self.launches = launches

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, _grid):
                def launch(*args, **kwargs):
                    named = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
                    named.update(zip(kernel.arg_names, args))
                    recorder.launches.append(Launch(kernel, named))
                return launch

        return _Grid()


class _HopperTarget:
    @staticmethod
    def get_current_target():
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, the kernel modules record their launches instead of launching them, and
    torch's kernel analysis targets Hopper (sm_90)."""
    import triton

    launches: list[Launch] = []
    saved = {m: m.wrap_triton for m in LAUNCHING_MODULES}
    drivers = triton.runtime.driver
    saved_active = drivers._active  # reset_active() would start the default driver, which needs a GPU
    try:
        for m in LAUNCHING_MODULES:
            m.wrap_triton = _Recorder(launches)
        drivers._active = _HopperTarget()
        yield launches
    finally:
        for m, original in saved.items():
            m.wrap_triton = original
        drivers._active = saved_active


def analysed_writes(launch: Launch) -> tuple[set[str], float]:
    """(names of the tensor arguments torch believes `launch` writes, seconds the analysis took)."""
    from torch._higher_order_ops import triton_kernel_wrap as analysis

    start = time.perf_counter()
    if hasattr(analysis, "identify_accessed_tensors"):  # newer torch: reads and writes
        accesses = analysis.identify_accessed_tensors(launch.kernel, launch.args, {})
        names = [d.name for d in accesses.read_writes.writes]
    else:  # older: the written names only
        names = analysis.identify_mutated_tensors(launch.kernel, launch.args, {})
    seconds = time.perf_counter() - start
    return {n for n in names if isinstance(launch.args.get(n), torch.Tensor)}, seconds
