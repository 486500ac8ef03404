"""Fan-in expert projection (O forward, V backward's input gradient): Triton kernel and its reference.

Shape legend:
    N = tokens, H = heads, Kh = reduction width per head (dh), C = output width (d_out for O, d for V),
    E = experts per head. G [N, H, E] is the dense gate table (0 where an expert is unchosen).

    out[n, :]          = sum_h sum_e G[n, h, e] * (a[n, h] @ w[h, e])          a [N, H, Kh], w [H, E, Kh, C]
    gate_grad[n, h, e] = (a[n, h] @ w[h, e]) . c[n]                            only where e is chosen

One program owns a tile of BLOCK_M tokens x BLOCK_N output columns and loops over every (head,
expert) that some token of the tile chose: a (BLOCK_M x Kh) @ (Kh x BLOCK_N) GEMM tile, rows scaled by
the gates in fp32, added to one accumulator. The sum over heads and experts never leaves registers
and the output is written once: no [N*H*k, C] intermediate, no atomics on the output. Tokens are
walked in `signature_order` (sorted by the expert sets of all heads) so that tiles skip most unchosen
experts. The gate gradient is a row dot with c per column block, added atomically in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from switchhead.kernels.fan_out import TileConfig, dot_precision


def fan_in_config(k_width: int, c_width: int) -> TileConfig:
    """Tiles for the H200 (bf16), from bench_kernels.py's tile sweep of 2026-11 (in git history):
    64-row tiles keep tiles coherent over all heads; 32-wide reduction chunks pad dh = 76 / 112 / 132 the least."""
    block_n = 128 if c_width >= 128 else max(16, triton.next_power_of_2(c_width))
    return TileConfig(block_m=64, block_n=block_n, block_k=32, num_warps=4, num_stages=4)


@triton.jit
def _fan_in_kernel(
    a_ptr, w_ptr, table_ptr, bits_ptr, order_ptr, c_ptr, gg_ptr, out_ptr,
    N, H, E, KH, C,
    s_an, s_ah, s_ak, s_wh, s_we, s_wk, s_wc, s_cn, s_yn,
    GATE_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = pos < N
    tok = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    tile_ok = row_ok[:, None] & col_ok[None, :]
    kk = tl.arange(0, BLOCK_K)
    if GATE_GRAD:
        c = tl.load(c_ptr + tok[:, None] * s_cn + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h in range(H):
        bits = tl.load(bits_ptr + tok * H + h, mask=row_ok, other=0)
        a_h = a_ptr + tok[:, None] * s_an + h * s_ah
        for e in range(E):
            chosen = ((bits >> e) & 1) != 0
            if tl.max(chosen.to(tl.int32), axis=0) > 0:
                w_e = w_ptr + h * s_wh + e * s_we
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, KH, BLOCK_K):
                    k_ok = (k0 + kk) < KH
                    a = tl.load(a_h + (k0 + kk)[None, :] * s_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    w = tl.load(w_e + (k0 + kk)[:, None] * s_wk + cols[None, :] * s_wc,
                                mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    part = tl.dot(a, w, part, input_precision=PRECISION)
                gate = tl.load(table_ptr + (tok * H + h) * E + e, mask=row_ok & chosen, other=0.0)
                acc += gate[:, None] * part
                if GATE_GRAD:
                    dot_c = tl.sum(part * c, axis=1)
                    tl.atomic_add(gg_ptr + (tok * H + h) * E + e, dot_c, mask=row_ok & chosen)
    out = out_ptr + tok[:, None] * s_yn + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


def fan_in(
    a: Tensor, weight: Tensor, table: Tensor, bits: Tensor, order: Tensor,
    gate_input: Tensor | None = None, config: TileConfig | None = None,
) -> tuple[Tensor, Tensor | None]:
    """out [N, C] (a's dtype) and, with gate_input [N, C], gate_grad [N, H, E] fp32.

    a [N, H, Kh] with any strides; weight [H, E, Kh, C] with any strides (pass W_V.transpose(2, 3)
    for V's backward); table [N, H, E] fp32 and bits [N, H] contiguous; order [N] =
    routing.signature_order(bits, E); gate_input contiguous in C.
    """
    n, h, k_width = a.shape
    _, e, _, c_width = weight.shape
    cfg = config or fan_in_config(k_width, c_width)
    out = torch.empty(n, c_width, dtype=a.dtype, device=a.device)
    gate_grad = torch.zeros_like(table) if gate_input is not None else None
    c = gate_input if gate_input is not None else out
    gg = gate_grad if gate_grad is not None else table
    grid = (triton.cdiv(n, cfg.block_m), triton.cdiv(c_width, cfg.block_n))
    wrap_triton(_fan_in_kernel)[grid](
        a, weight, table, bits, order, c, gg, out,
        n, h, e, k_width, c_width,
        *a.stride(), *weight.stride(), c.stride(0), out.stride(0),
        GATE_GRAD=gate_input is not None, PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, gate_grad


def fan_in_reference(
    a: Tensor, weight: Tensor, table: Tensor, gate_input: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """What `fan_in` computes, densely over all experts in fp32 (gate_grad at every (n, h, e))."""
    y = torch.einsum("nht,hetc->nhec", a.float(), weight.float())
    out = (table.unsqueeze(-1) * y).sum((1, 2)).to(a.dtype)
    gate_grad = (y * gate_input.float()[:, None, None, :]).sum(-1) if gate_input is not None else None
    return out, gate_grad
