"""SwitchHead expert projections: reference kernels and the custom ops the rewritten graphs call."""

from switchhead.kernels.ops import checked_expert_o, checked_expert_v

__all__ = ["checked_expert_v", "checked_expert_o"]
