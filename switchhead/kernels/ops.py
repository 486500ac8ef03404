"""The `switchhead::expert_v` and `switchhead::expert_o` custom ops used by rewritten graphs.

Registering them gives every backend (eager, torch.export, torch.compile, ONNX) one opaque node per
expert projection with a fake (shape) implementation and an autograd formula. The default kernel is
the reference in `reference.py` (the all-experts dense formula); device-specific kernels register
against the same op names. Every op takes `impl` ("auto", "dense" or "sparse", choice.py): which
implementation runs where there is more than one (CUDA); the backward ops get the forward's.

Shape legend: N tokens, d width, H heads, E experts per head, k active, dh head size, d_out width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from switchhead.kernels import autocast, choice, reference


def _check_routing(name: str, rows: int, heads: int, expert_index: Tensor, gates: Tensor) -> None:
    if expert_index.dim() != 3 or expert_index.shape[:2] != (rows, heads):
        raise ValueError(f"{name}: expert_index must be [N={rows}, H={heads}, k], got {tuple(expert_index.shape)}")
    if gates.shape != expert_index.shape:
        raise ValueError(f"{name}: gates {tuple(gates.shape)} must match expert_index {tuple(expert_index.shape)}")


@torch.library.custom_op("switchhead::expert_v", mutates_args=())
def expert_v(
    x: Tensor, weight: Tensor, bias: Tensor | None, expert_index: Tensor, gates: Tensor, impl: str = "auto"
) -> Tensor:
    """x [N, d], weight [H, E, d, dh], bias [H, E, dh]?, expert_index/gates [N, H, k] -> [N, H*dh]."""
    choice.check_impl(impl)
    return reference.expert_v_reference(x, weight, bias, expert_index, gates)


@expert_v.register_fake
def _expert_v_fake(x, weight, bias, expert_index, gates, impl="auto"):
    h, _, d, dh = weight.shape
    torch._check(x.shape[-1] == d, lambda: f"expert_v: x width {x.shape[-1]} != expert input width {d}")
    return x.new_empty(x.shape[0], h * dh)


@torch.library.custom_op("switchhead::expert_v_backward", mutates_args=())
def expert_v_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, expert_index: Tensor, gates: Tensor,
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, weight, bias, gates); the bias gradient is empty when there is no bias."""
    choice.check_impl(impl)
    return expert_v_backward_dense(grad_out, x, weight, bias, expert_index, gates)


def expert_v_backward_dense(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, expert_index: Tensor, gates: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reference backward in the op's output convention (an empty bias gradient without bias)."""
    gx, gw, gb, gg = reference.expert_v_backward_reference(grad_out, x, weight, bias, expert_index, gates)
    return gx, gw, (gb if gb is not None else weight.new_empty(0)), gg


@expert_v_backward.register_fake
def _expert_v_backward_fake(grad_out, x, weight, bias, expert_index, gates, impl="auto"):
    bias_grad = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), bias_grad, torch.empty_like(gates)


def _expert_v_setup(ctx, inputs, output):
    x, weight, bias, expert_index, gates, *impl = inputs
    ctx.has_bias = bias is not None
    ctx.impl = impl[0] if impl else "auto"
    ctx.save_for_backward(x, weight, bias, expert_index, gates)


def _expert_v_grad(ctx, grad_out):
    x, weight, bias, expert_index, gates = ctx.saved_tensors
    gx, gw, gb, gg = torch.ops.switchhead.expert_v_backward(grad_out, x, weight, bias, expert_index, gates, ctx.impl)
    return gx, gw, (gb if ctx.has_bias else None), None, gg, None


expert_v.register_autograd(_expert_v_grad, setup_context=_expert_v_setup)


@torch.library.custom_op("switchhead::expert_o", mutates_args=())
def expert_o(attn: Tensor, weight: Tensor, expert_index: Tensor, gates: Tensor, impl: str = "auto") -> Tensor:
    """attn [N, H, dh], weight [H, E, dh, d_out], expert_index/gates [N, H, k] -> [N, d_out]."""
    choice.check_impl(impl)
    return reference.expert_o_reference(attn, weight, expert_index, gates)


@expert_o.register_fake
def _expert_o_fake(attn, weight, expert_index, gates, impl="auto"):
    h, _, dh, d_out = weight.shape
    torch._check(attn.shape[1] == h and attn.shape[2] == dh, lambda: "expert_o: attn must be [N, H, dh]")
    return attn.new_empty(attn.shape[0], d_out)


@torch.library.custom_op("switchhead::expert_o_backward", mutates_args=())
def expert_o_backward(
    grad_out: Tensor, attn: Tensor, weight: Tensor, expert_index: Tensor, gates: Tensor, impl: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (attn, weight, gates)."""
    choice.check_impl(impl)
    return reference.expert_o_backward_reference(grad_out, attn, weight, expert_index, gates)


@expert_o_backward.register_fake
def _expert_o_backward_fake(grad_out, attn, weight, expert_index, gates, impl="auto"):
    return torch.empty_like(attn), torch.empty_like(weight), torch.empty_like(gates)


def _expert_o_setup(ctx, inputs, output):
    attn, weight, expert_index, gates, *impl = inputs
    ctx.impl = impl[0] if impl else "auto"
    ctx.save_for_backward(attn, weight, expert_index, gates)


def _expert_o_grad(ctx, grad_out):
    attn, weight, expert_index, gates = ctx.saved_tensors
    ga, gw, gg = torch.ops.switchhead.expert_o_backward(grad_out, attn, weight, expert_index, gates, ctx.impl)
    return ga, gw, None, gg, None


expert_o.register_autograd(_expert_o_grad, setup_context=_expert_o_setup)

# Lives as long as the ops: the autocast kernels registered into it are dropped with it.
_AUTOCAST_LIBRARY = torch.library.Library("switchhead", "IMPL")
for _device_type in ("cpu", "cuda"):
    autocast.register_autocast(_AUTOCAST_LIBRARY, _device_type)

