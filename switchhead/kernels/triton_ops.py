"""The expert projections on Triton, and how the stable ops reach them on CUDA.

Shape legend: N tokens, d width, H heads, E experts per head, k active, dh head size, d_out width.

Each projection and its backward is a `torch.library.triton_op` (`switchhead::expert_v_triton`, ...)
whose body is device routing (route_triton.route: three Triton launches, no host sync) plus
`wrap_triton` kernel launches:

    expert_v           fan_out(x, W_V)                         sum over k in registers
    expert_v_backward  fan_in(dY, W_V^T) -> dx ; fan_out(x, W_V) -> dG (dY row dots) ; wgrad(x, dY) -> dW_V, db
    expert_o           fan_in(attn, W_O)                       sum over H and k in registers
    expert_o_backward  fan_out(dY, W_O^T) -> dattn, dG (attn row dots) ; wgrad(attn, dY) -> dW_O

Dispatch under the stable names (`switchhead::expert_v` etc., defined in ops.py with the reference
as their kernel for every device). On CUDA each call first picks its implementation (choice.py: the
op's `impl` argument, "auto" by a per-shape rule): the dense all-experts formula (reference.py's aten
ops) or the sparse triton_op below.
- eager on CUDA: a CUDA kernel registration runs the chosen one (the triton_op launches its kernels);
- torch.compile on CUDA: a FunctionalTensorMode rule (the mechanism triton_op itself uses) rewrites
  the stable op into the chosen one while AOTAutograd functionalises: the dense formula's aten ops,
  which Inductor fuses around the GEMM, or the triton_op's kernels, which Inductor schedules;
- torch.export, and everything on CPU: the rule steps aside and the stable op stays one opaque node,
  run by the reference kernel (a triton_op traced on CPU fails: Triton has no CPU backend).
"""

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode

from switchhead.kernels import choice, ops, reference, routing
from switchhead.kernels.route_triton import route
from switchhead.kernels.fan_in import fan_in
from switchhead.kernels.fan_out import fan_out
from switchhead.kernels.wgrad import expert_wgrad


def _gate_grad(dense: Tensor, expert_index: Tensor, gates: Tensor) -> Tensor:
    return dense.gather(2, expert_index).to(gates.dtype)


def _check_experts(weight: Tensor) -> int:
    """E as a plain int: it sets shift widths and loop trips, so a traced graph specialises on it."""
    return routing.check_experts(int(weight.shape[1]))


@torch.library.triton_op("switchhead::expert_v_triton", mutates_args=())
def expert_v_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], expert_index: Tensor, gates: Tensor
) -> Tensor:
    """expert_v on Triton: x [N, d], weight [H, E, d, dh] -> [N, H*dh]."""
    h, _, _, dh = weight.shape
    e = _check_experts(weight)
    r = route(expert_index, gates, e, head=True)
    b = bias.contiguous() if bias is not None else None
    out, _ = fan_out(x, weight, b, r.table, r.bits, r.head_order)
    return out.view(x.shape[0], h * dh)


@torch.library.triton_op("switchhead::expert_v_backward_triton", mutates_args=())
def expert_v_backward_triton(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], expert_index: Tensor, gates: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, weight, bias or empty, gates) of expert_v on Triton."""
    n, d = x.shape
    h, _, _, dh = weight.shape
    e = _check_experts(weight)
    x = x.contiguous()
    gy = grad_out.to(x.dtype).contiguous().view(n, h, dh)
    r = route(expert_index, gates, e, head=True, sig=True, groups=True)
    grad_x = fan_in(gy, weight.transpose(2, 3), r.table, r.bits, r.sig_order)
    # the gate gradient needs each chosen expert's value again: a V forward whose epilogue keeps only row dots
    _, dense = fan_out(x, weight, bias.contiguous() if bias is not None else None, r.table, r.bits, r.head_order,
                       gate_input=gy, store_out=False)
    grad_w, grad_b = expert_wgrad(
        x.unsqueeze(1).expand(n, h, d), gy, *r.groups, e, bias is not None, weight.dtype
    )
    grad_b = grad_b.to(bias.dtype) if grad_b is not None and bias is not None else weight.new_empty(0)
    return grad_x, grad_w, grad_b, _gate_grad(dense, expert_index, gates)


@torch.library.triton_op("switchhead::expert_o_triton", mutates_args=())
def expert_o_triton(attn: Tensor, weight: Tensor, expert_index: Tensor, gates: Tensor) -> Tensor:
    """expert_o on Triton: attn [N, H, dh], weight [H, E, dh, d_out] -> [N, d_out]."""
    e = _check_experts(weight)
    r = route(expert_index, gates, e, sig=True)
    return fan_in(attn, weight, r.table, r.bits, r.sig_order)


@torch.library.triton_op("switchhead::expert_o_backward_triton", mutates_args=())
def expert_o_backward_triton(
    grad_out: Tensor, attn: Tensor, weight: Tensor, expert_index: Tensor, gates: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (attn, weight, gates) of expert_o on Triton."""
    n, h, _ = attn.shape
    e, d_out = _check_experts(weight), weight.shape[3]
    attn = attn.contiguous()
    gy = grad_out.to(attn.dtype).contiguous()
    r = route(expert_index, gates, e, head=True, groups=True)
    grad_attn, dense = fan_out(gy, weight.transpose(2, 3), None, r.table, r.bits, r.head_order, gate_input=attn)
    grad_w, _ = expert_wgrad(attn, gy.unsqueeze(1).expand(n, h, d_out), *r.groups, e, False, weight.dtype)
    return grad_attn, grad_w, _gate_grad(dense, expert_index, gates)


def _on_cuda(args: tuple) -> bool:
    return any(isinstance(a, Tensor) and a.is_cuda for a in args)


def _choose(op: str, impl: str, weight: Tensor, expert_index: Tensor, v_layout: bool, training: bool = True) -> str:
    h, e, a, b = (int(s) for s in weight.shape)  # V: [H, E, d, dh]; O: [H, E, dh, d_out]
    d, dh = (a, b) if v_layout else (b, a)
    return choice.choose_impl(op, impl, device_type=weight.device.type, d=d, heads=h, experts=e,
                              top_k=int(expert_index.shape[2]), head_dim=dh, training=training)


def _differentiated(activation: Tensor, gates: Tensor) -> bool:
    """Will a backward follow? The activations tell (weights require grad under no_grad too); this
    holds in eager and while AOTAutograd traces (a probe of both is in tests/test_kernels/test_choice.py)."""
    return activation.requires_grad or gates.requires_grad


def _v(x, weight, bias, expert_index, gates, impl="auto"):
    if _choose("expert_v", impl, weight, expert_index, True, _differentiated(x, gates)) == "sparse":
        return expert_v_triton(x, weight, bias, expert_index, gates)
    return reference.expert_v_reference(x, weight, bias, expert_index, gates)


def _v_backward(grad_out, x, weight, bias, expert_index, gates, impl="auto"):
    if _choose("expert_v_backward", impl, weight, expert_index, True) == "sparse":
        return expert_v_backward_triton(grad_out, x, weight, bias, expert_index, gates)
    return ops.expert_v_backward_dense(grad_out, x, weight, bias, expert_index, gates)


def _o(attn, weight, expert_index, gates, impl="auto"):
    if _choose("expert_o", impl, weight, expert_index, False, _differentiated(attn, gates)) == "sparse":
        return expert_o_triton(attn, weight, expert_index, gates)
    return reference.expert_o_reference(attn, weight, expert_index, gates)


def _o_backward(grad_out, attn, weight, expert_index, gates, impl="auto"):
    if _choose("expert_o_backward", impl, weight, expert_index, False) == "sparse":
        return expert_o_backward_triton(grad_out, attn, weight, expert_index, gates)
    return reference.expert_o_backward_reference(grad_out, attn, weight, expert_index, gates)


def _when_compiling(cuda_impl):
    """FunctionalTensorMode rule: CUDA inputs outside torch.export decompose into `cuda_impl` (the
    dense formula's aten ops, which Inductor fuses, or the triton_op's kernels)."""

    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if custom_triton_ops_decomposition_disabled() or not _on_cuda(args):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return cuda_impl(*args, **kwargs)

    return rule


def _register() -> None:
    for stable, cuda_impl in (
        (ops.expert_v, _v), (ops.expert_v_backward, _v_backward), (ops.expert_o, _o), (ops.expert_o_backward, _o_backward),
    ):
        stable.register_kernel("cuda")(cuda_impl)
        stable.register_torch_dispatch(FunctionalTensorMode, _when_compiling(cuda_impl))


_register()
