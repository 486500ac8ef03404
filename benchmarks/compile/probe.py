"""How much of a torch.compile first call goes into analysing user Triton kernels.

For every call site of a user-defined Triton kernel (`torch.library.triton_op` + `wrap_triton`),
torch lowers the kernel to TTIR to learn which tensors it writes (functionalization, then again in
Inductor's IR). A SwitchHead training graph has a few such call sites per layer and direction, so
this is one suspect for its long compiles; `triton_analysis_probe` counts those analyses and their
seconds while the block runs. Measurement only: the wrapped function is restored on exit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

# the analysis entry point: torch >= 2.8 names it identify_accessed_tensors, older ones identify_mutated_tensors
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")


@contextlib.contextmanager
def triton_analysis_probe() -> Iterator[dict[str, float]]:
    """Yields {"ttir_analyses": calls, "ttir_analysis_s": seconds}, filled in while the block runs
    (zeros where this torch has neither entry point)."""
    stats = {"ttir_analyses": 0, "ttir_analysis_s": 0.0}
    try:
        from torch._higher_order_ops import triton_kernel_wrap as module
    except ImportError:
        yield stats
        return
    originals = {name: getattr(module, name) for name in _ANALYSES if callable(getattr(module, name, None))}

    def counted(original):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                stats["ttir_analyses"] += 1
                stats["ttir_analysis_s"] += time.perf_counter() - start
        return wrapper

    for name, original in originals.items():
        setattr(module, name, counted(original))
    try:
        yield stats
    finally:
        for name, original in originals.items():
            setattr(module, name, original)
