"""Reference (pure PyTorch) SwitchHead expert projections: the CPU kernels and the test oracle.

Shape legend:
    N = tokens (rows), d = model width, H = heads, E = experts per head, k = active experts per head,
    dh = head size, d_out = output width of the O projection.

Both ops take the router's choice as `expert_index` [N, H, k] (int64, expert ids in [0, E)) and
`gates` [N, H, k] (the chosen sigmoid scores, used as weights as they are: sigma-MoE).
They expand the choice into a dense gate matrix G [N, H, E] (zeros for unchosen experts), which keeps
the reference a handful of matmuls: simple to trust, fast enough on a CPU, wasteful by E/k in FLOPs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_gates(expert_index: Tensor, gates: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    """Scatter the chosen gates [N, H, k] into G [N, H, E]; unchosen experts get 0 (an expert
    chosen twice in a row gets the sum of its gates)."""
    n, h, _ = expert_index.shape
    dense = torch.zeros(n, h, num_experts, dtype=dtype, device=gates.device)
    return dense.scatter_add(2, expert_index, gates.to(dtype))


def chosen_mask(expert_index: Tensor, num_experts: int) -> Tensor:
    """[N, H, E] True where the expert was chosen: unchosen experts must contribute exactly
    nothing, even non-finite values (0 * inf would be NaN)."""
    n, h, _ = expert_index.shape
    mask = torch.zeros(n, h, num_experts, dtype=torch.bool, device=expert_index.device)
    return mask.scatter(2, expert_index, True)


def _all_expert_values(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x [N, d] @ every expert weight [H, E, d, dh] -> [N, H, E, dh]."""
    h, e, d, dh = weight.shape
    flat = weight.permute(2, 0, 1, 3).reshape(d, h * e * dh)  # [d, H*E*dh]
    values = (x @ flat).view(-1, h, e, dh)
    if bias is not None:
        values = values + bias
    return values


def expert_v_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, expert_index: Tensor, gates: Tensor
) -> Tensor:
    """V projection (fan-out): out[n, h] = sum_k gates[n,h,k] * (x[n] @ W[h, idx[n,h,k]] + b[h, idx]).

    x [N, d], weight [H, E, d, dh], bias [H, E, dh] or None -> [N, H*dh].
    """
    h, e, _, dh = weight.shape
    g = dense_gates(expert_index, gates, e, x.dtype)  # [N, H, E]
    values = _all_expert_values(x, weight, bias)  # [N, H, E, dh]
    gated = torch.where(chosen_mask(expert_index, e).unsqueeze(-1), values * g.unsqueeze(-1), 0)
    return gated.sum(2).reshape(-1, h * dh)


def expert_v_backward_reference(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, expert_index: Tensor, gates: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Gradients of expert_v for (x, weight, bias, gates); grad_out [N, H*dh]."""
    h, e, d, dh = weight.shape
    gy = grad_out.reshape(-1, h, 1, dh)  # [N, H, 1, dh]
    g = dense_gates(expert_index, gates, e, x.dtype).unsqueeze(-1)  # [N, H, E, 1]
    values = _all_expert_values(x, weight, bias)  # [N, H, E, dh]
    grad_dense_gates = (values * gy).sum(-1)  # [N, H, E]
    grad_gates = grad_dense_gates.gather(2, expert_index).to(gates.dtype)
    gated = (gy * g).reshape(-1, h * e * dh)  # [N, H*E*dh]
    flat = weight.permute(2, 0, 1, 3).reshape(d, h * e * dh)
    grad_x = gated @ flat.t()
    grad_weight = (x.t() @ gated).view(d, h, e, dh).permute(1, 2, 0, 3).contiguous()
    grad_bias = gated.sum(0).view(h, e, dh) if bias is not None else None
    return grad_x, grad_weight, grad_bias, grad_gates


def expert_o_reference(attn: Tensor, weight: Tensor, expert_index: Tensor, gates: Tensor) -> Tensor:
    """O projection (fan-in): out[n] = sum_h sum_k gates[n,h,k] * attn[n, h] @ W[h, idx[n,h,k]].

    attn [N, H, dh], weight [H, E, dh, d_out] -> [N, d_out].
    """
    h, e, dh, d_out = weight.shape
    g = dense_gates(expert_index, gates, e, attn.dtype)  # [N, H, E]
    gated = attn.unsqueeze(2) * g.unsqueeze(-1)  # [N, H, E, dh]
    # Only the chosen experts' weights enter: an unchosen non-finite expert stays out of the sum.
    chosen = chosen_mask(expert_index, e).any(0)  # [H, E]: experts some token chose
    flat_weight = torch.where(chosen[..., None, None], weight, 0).reshape(h * e * dh, d_out)
    return gated.reshape(-1, h * e * dh) @ flat_weight


def expert_o_backward_reference(
    grad_out: Tensor, attn: Tensor, weight: Tensor, expert_index: Tensor, gates: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of expert_o for (attn, weight, gates); grad_out [N, d_out]."""
    h, e, dh, d_out = weight.shape
    g = dense_gates(expert_index, gates, e, attn.dtype).unsqueeze(-1)  # [N, H, E, 1]
    grad_gated = (grad_out @ weight.reshape(h * e * dh, d_out).t()).view(-1, h, e, dh)
    grad_attn = (grad_gated * g).sum(2)
    grad_dense_gates = (grad_gated * attn.unsqueeze(2)).sum(-1)  # [N, H, E]
    grad_gates = grad_dense_gates.gather(2, expert_index).to(gates.dtype)
    gated = (attn.unsqueeze(2) * g).reshape(-1, h * e * dh)
    grad_weight = (gated.t() @ grad_out).view(h, e, dh, d_out)
    return grad_attn, grad_weight, grad_gates
