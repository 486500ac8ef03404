"""Initial values of SwitchHead experts and routers, from a dense attention's weights or at random.

Shape legend: H query heads, G KV heads (H for plain MHA), E experts per head, k active experts,
d width of the routed tokens, dh head size, d_out width of the output projection.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor


@dataclasses.dataclass
class ExpertWeights:
    """The new parameters of one site."""

    v_experts: Tensor  # [G, E, d, dh]
    v_experts_bias: Tensor | None  # [G, E, dh]
    v_router: Tensor  # [G*E, d], fp32
    o_experts: Tensor  # [H, E, dh, d_out]
    o_router: Tensor  # [H*E, d_q], fp32


def init_setup(seed: int | None, init_scale: float | None, num_sites: int,
               offset: int = 0) -> tuple[torch.Generator, float]:
    """(generator, init scale) of a pass that draws initial weights for `num_sites` attention
    layers: seeded with seed + offset (None: from torch's global RNG), and the paper's init scale
    1/sqrt(n_layers) unless `init_scale` is given."""
    generator = torch.Generator().manual_seed((seed if seed is not None else torch.seed()) + offset)
    scale = init_scale if init_scale is not None else 1.0 / math.sqrt(max(num_sites, 1))
    return generator, scale


def upcycle(
    value_weight: Tensor,
    value_bias: Tensor | None,
    output_weight: Tensor,
    query_width: int,
    num_experts: int,
    top_k: int,
    value_input_rms: float,
    query_input_rms: float,
    router_scale: float,
    generator: torch.Generator,
) -> ExpertWeights:
    """Every expert is a copy of its dense head; the routers make the function unchanged.

    value_weight [G, d, dh], value_bias [G, dh] or None, output_weight [H, dh, d_out]; query_width is
    the width of the O router's input (d_q).

    The routers get tiny random weights, so each logit is ~`router_scale` on the example inputs and
    every gate is sigmoid(~0) = 1/2 to float rounding: k chosen experts, each a copy scaled by 2/k,
    sum to the dense head. The logits still differ per token and expert, so tokens pick different
    experts, the experts receive different gradients and diverge, and the routers learn. (An
    all-zero router would tie: every token would pick the same k experts forever.)
    """
    scale, _ = upcycle_scales(top_k)
    groups, d, _ = value_weight.shape
    heads = output_weight.shape[0]
    return ExpertWeights(
        v_experts=_replicate(value_weight, num_experts) * scale,
        v_experts_bias=None if value_bias is None else _replicate(value_bias, num_experts) * scale,
        v_router=tiny_router(groups * num_experts, d, value_input_rms, router_scale, generator, value_weight.device),
        o_experts=_replicate(output_weight, num_experts) * scale,
        o_router=tiny_router(heads * num_experts, query_width, query_input_rms, router_scale, generator,
                              value_weight.device),
    )


def upcycle_scales(top_k: int, group: int = 1) -> tuple[float, float]:
    """(V, O) scales of experts copied from dense heads: with every gate at sigmoid(~0) = 1/2, the
    k active V experts (2/k each) average to their head and the O experts (2G/k each) add up like
    the G dense heads folded into one did (G = 1: upcycling)."""
    return 2.0 / top_k, 2.0 * group / top_k


def fold(
    value_heads: Tensor,
    value_bias: Tensor | None,
    output_heads: Tensor,
    group: int,
    shared_value: bool,
    query_width: int,
    top_k: int,
    noise_std: float,
    value_input_rms: float,
    query_input_rms: float,
    router_scale: float,
    generator: torch.Generator,
) -> ExpertWeights:
    """Experts of heads folded from groups of G dense heads: expert e of a new head is a copy of
    the dense head it was given, scaled as `upcycle_scales(top_k, G)`.

    value_heads [G2, E, d, dh] (the dense head each V expert copies), value_bias [G2, E, dh] or None,
    output_heads [H2, E, dh, d_out]. The first G experts of a head are its group's heads; further
    ones repeat them times (1 + noise_std * N(0, 1)), so they differ. With `shared_value` (GQA: V
    stays per KV head) the V experts are plain copies of their KV head. Routers as in `upcycle`.
    """
    heads, num_experts = output_heads.shape[:2]
    scale_v, scale_o = upcycle_scales(top_k, group)
    noise = torch.randn(heads, num_experts, generator=generator) * noise_std
    noise[:, :group] = 0.0
    # [H2, E]; drawn on the CPU in fp32 (the same draws everywhere), applied in the weights' dtype
    # and device (fp32 factors would promote a bf16 model's experts to fp32)
    factor = (1 + noise).to(value_heads.device, value_heads.dtype)
    if shared_value:
        v_experts = value_heads * scale_v
        v_bias = value_bias * scale_v if value_bias is not None else None
    else:
        v_experts = value_heads * factor[..., None, None] * scale_v
        v_bias = value_bias * factor[..., None] * scale_v if value_bias is not None else None
    o_experts = output_heads * factor[..., None, None] * scale_o
    groups, _, d, _ = value_heads.shape
    return ExpertWeights(
        v_experts=v_experts.contiguous(),
        v_experts_bias=None if v_bias is None else v_bias.contiguous(),
        v_router=tiny_router(groups * num_experts, d, value_input_rms, router_scale, generator, value_heads.device),
        o_experts=o_experts.contiguous(),
        o_router=tiny_router(heads * num_experts, query_width, query_input_rms, router_scale, generator,
                              value_heads.device),
    )


def _replicate(per_head: Tensor, num_experts: int) -> Tensor:
    """[G, ...] -> [G, E, ...], contiguous copies."""
    return per_head.unsqueeze(1).expand(per_head.shape[0], num_experts, *per_head.shape[1:]).clone()


def tiny_router(rows: int, width: int, input_rms: float, logit_std: float, generator: torch.Generator,
                 device: torch.device) -> Tensor:
    std = logit_std / (max(input_rms, 1e-12) * math.sqrt(width))
    return (torch.randn(rows, width, generator=generator, dtype=torch.float32) * std).to(device)


def random_init(
    groups: int,
    heads: int,
    num_experts: int,
    d_value: int,
    d_query: int,
    head_dim: int,
    d_out: int,
    value_bias: bool,
    init_scale: float,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> ExpertWeights:
    """The paper's initialisation: V experts and routers std init_scale/sqrt(d), router rows
    renormalised to equal norm, O experts std init_scale/sqrt(H*dh)."""

    def normal(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32) * std

    def router(rows: int, width: int) -> Tensor:
        weight = normal(rows, width, std=init_scale / math.sqrt(width))
        target = weight.norm(dim=1).mean()
        return (weight * (target / weight.norm(dim=1, keepdim=True))).to(device)

    v_std = init_scale / math.sqrt(d_value)
    o_std = init_scale / math.sqrt(heads * head_dim)
    return ExpertWeights(
        v_experts=normal(groups, num_experts, d_value, head_dim, std=v_std).to(device, dtype),
        v_experts_bias=torch.zeros(groups, num_experts, head_dim, dtype=dtype, device=device) if value_bias else None,
        v_router=router(groups * num_experts, d_value),
        o_experts=normal(heads, num_experts, head_dim, d_out, std=o_std).to(device, dtype),
        o_router=router(heads * num_experts, d_query),
    )
