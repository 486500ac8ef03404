"""Autocast rules for the expert ops: they compute in the autocast dtype, like `aten.linear`.

Under `torch.autocast`, the layers around a rewritten site produce bf16/fp16 activations while the
expert weights stay fp32 parameters; without a rule the op would get mixed dtypes. The rule casts the
activations, the expert weights and the V bias to the autocast dtype that is active at call time
(`torch.autocast(..., dtype=...)` decides, not a dtype fixed here) and leaves the routing (expert
indices, gate values) as it is. `torch.library.register_autocast` casts every floating input to one
dtype fixed at registration, so it cannot express this; the registration below mirrors what it does
(a C++ dispatcher kernel for eager plus a Python-dispatcher kernel for tracing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# op name -> positions of the arguments that compute in the autocast dtype
_CAST_ARGUMENTS = {"expert_v": (0, 1, 2), "expert_o": (0, 1)}


def _autocast_kernel(op: torch._ops.OpOverload, positions: tuple[int, ...], device_type: str,
                     dispatch_key: torch._C.DispatchKey) -> Callable:
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if i in positions and isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
            return op(*cast)

    return kernel


def register_autocast(library: torch.library.Library, device_type: str) -> None:
    """Register the rules for `device_type` ('cuda', 'cpu') into `library` (an IMPL library of the
    switchhead namespace that the caller keeps alive)."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    dispatch_key = getattr(torch._C.DispatchKey, key_name)
    for name, positions in _CAST_ARGUMENTS.items():
        op = getattr(torch.ops.switchhead, name).default
        kernel = _autocast_kernel(op, positions, device_type, dispatch_key)
        if op.has_kernel_for_dispatch_key(dispatch_key):
            op.py_kernels.pop(dispatch_key)
        op.py_impl(dispatch_key)(kernel)
        library.impl(name, lambda _keyset, *args, _kernel=kernel: _kernel(*args), key_name, with_keyset=True)
