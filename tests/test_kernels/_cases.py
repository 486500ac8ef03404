"""Shared test helpers for the expert kernels: random routing problems, relative errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Shape:
    """N tokens, d width, H heads, E experts, k active, dh head size, d_out output width."""

    n: int
    d: int
    h: int
    e: int
    k: int
    dh: int
    d_out: int


@dataclass
class Problem:
    x: Tensor
    w_v: Tensor
    b_v: Tensor
    attn: Tensor
    w_o: Tensor
    expert_index: Tensor
    gates: Tensor
    grad_v: Tensor
    grad_o: Tensor


def routing(s: Shape, device: str | torch.device = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """Random top-k choice [N, H, k] (distinct experts per row, like torch.topk)."""
    scores = torch.rand(s.n, s.h, s.e, generator=generator, device="cpu")
    return scores.topk(s.k, dim=-1).indices.to(device)


def make_problem(s: Shape, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int | None = None) -> Problem:
    """Fresh random inputs (seeded only when a seed is given); gates fp32 as the router gives them."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return Problem(
        x=rand(s.n, s.d),
        w_v=rand(s.h, s.e, s.d, s.dh, scale=s.d ** -0.5),
        b_v=rand(s.h, s.e, s.dh, scale=0.1),
        attn=rand(s.n, s.h, s.dh),
        w_o=rand(s.h, s.e, s.dh, s.d_out, scale=(s.h * s.dh) ** -0.5),
        expert_index=routing(s, device, gen),
        gates=torch.rand(s.n, s.h, s.k, generator=gen).to(device),
        grad_v=rand(s.n, s.h * s.dh),
        grad_o=rand(s.n, s.d_out),
    )


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere in out gives inf."""
    if not torch.isfinite(out).all():
        return float("inf")
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_routing(r, idx: Tensor, gates: Tensor, e: int, block: int) -> None:
    """route_triton.route's outputs (all asked for) against stable torch sorts: the same permutations,
    expert groups in (block, slot, token) order, offsets, gate table and bit masks."""
    from switchhead.kernels import route_triton, routing

    n, h, k = idx.shape
    bits = routing.expert_bits(idx)
    assert torch.equal(r.bits, bits) and torch.equal(r.table, routing.gate_table(idx, gates, e))
    # head order: per head a stable sort of the expert sets; signature order: of the reduced signature
    assert torch.equal(r.head_order.long(), torch.sort(bits.t(), dim=1, stable=True).indices)
    assert torch.equal(r.sig_order.long(), torch.sort(route_triton.signature_key(idx, e), stable=True).indices)
    tok = torch.arange(n, device=idx.device).view(n, 1, 1).expand(n, h, k)
    slot = torch.arange(k, device=idx.device).view(1, 1, k).expand(n, h, k)
    group = (torch.arange(h, device=idx.device).view(1, h, 1) * e + idx).flatten()
    enum = ((tok // block * k + slot) * block + tok % block).flatten()
    perm = torch.sort(group * (n + block) * k + enum, stable=True).indices
    assert torch.equal(r.tokens.long(), tok.flatten()[perm]) and torch.equal(r.sorted_gates, gates.flatten()[perm])
    counts = torch.bincount(group, minlength=h * e)
    assert torch.equal(r.offsets.long(), torch.cat([counts.new_zeros(1), counts.cumsum(0)]))


def triton_op_calls(p: Problem, bias: Tensor | None) -> dict[str, tuple[Callable[..., Any], tuple]]:
    """The four Triton op bodies, each with its arguments from p (V's bias: `bias`, or None)."""
    from switchhead.kernels import triton_ops

    return {
        "expert_v": (triton_ops.expert_v_triton, (p.x, p.w_v, bias, p.expert_index, p.gates)),
        "expert_v_backward": (triton_ops.expert_v_backward_triton,
                              (p.grad_v, p.x, p.w_v, bias, p.expert_index, p.gates)),
        "expert_o": (triton_ops.expert_o_triton, (p.attn, p.w_o, p.expert_index, p.gates)),
        "expert_o_backward": (triton_ops.expert_o_backward_triton,
                              (p.grad_o, p.attn, p.w_o, p.expert_index, p.gates)),
    }
