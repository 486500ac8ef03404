"""Shared test helpers for the expert kernels: random routing problems, relative errors."""

from __future__ import annotations

from dataclasses import dataclass

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
