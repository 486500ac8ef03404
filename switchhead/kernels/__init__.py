"""SwitchHead expert projections: reference kernels and the custom ops the rewritten graphs call.

Importing this package registers `switchhead::expert_v` / `expert_o` (reference kernels, ops.py) and,
where Triton is installed, their Triton implementations for CUDA (triton_ops.py).
"""

import importlib.util

from switchhead.kernels import ops  # noqa: F401  (registers the ops)

if importlib.util.find_spec("triton") is not None:
    from switchhead.kernels import triton_ops  # noqa: F401  (registers the CUDA path)
