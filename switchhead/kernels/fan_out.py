"""Fan-out expert projection (V forward, O backward's input gradient): Triton kernel and its reference.

Shape legend:
    N = tokens, K = reduction width (d for V, d_out for O's backward), C = output width per head (dh),
    H = heads, E = experts per head. G [N, H, E] is the dense gate table (0 where an expert is unchosen).

    out[n, h, :]      = sum_e G[n, h, e] * (a[n] @ w[h, e] + bias[h, e])       a [N, K], w [H, E, K, C]
    gate_grad[n, h, e] = (a[n] @ w[h, e] + bias[h, e]) . c[n, h]               only where e is chosen

The kernel walks tokens in `head_order` (per head, sorted by expert set), so a tile of BLOCK_M tokens
usually shares one set of k experts: for each expert some token of the tile chose, it runs one GEMM
tile (BLOCK_M x K) @ (K x BLOCK_N), scales its rows by the gates in fp32 and adds it to the output
accumulator. The k-sum stays in registers; the output is written once, with no atomics.
The gate gradient is a row dot of the same per-expert tile with c, added atomically (fp32) because
several column blocks contribute to it when C > BLOCK_N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch options of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def fan_out_config(k_width: int, c_width: int) -> TileConfig:
    """Tiles for the H200 (bf16), from bench_kernels.py's tile sweep of 2026-11 (in git history):
    128-row tiles; a head of 65..128 columns in one 128-wide block, wider heads in 64-wide blocks (132 -> 3 x 64)."""
    if c_width <= 64:
        return TileConfig(block_m=128, block_n=max(16, triton.next_power_of_2(c_width)), block_k=64)
    if c_width <= 128:
        return TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    return TileConfig(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3)


def dot_precision(dtype: torch.dtype) -> str:
    """'ieee' for fp32 unless torch allows tf32 matmuls; bf16/fp16 ignore it."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _fan_out_kernel(
    a_ptr, w_ptr, b_ptr, table_ptr, bits_ptr, order_ptr, c_ptr, gg_ptr, out_ptr,
    N, H, E, K, C,
    s_an, s_ak, s_wh, s_we, s_wk, s_wc, s_bh, s_be, s_oh, s_on,
    s_cn, s_ch, s_yn, s_yh,
    HAS_BIAS: tl.constexpr, GATE_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    pid_n = tl.program_id(2)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = pos < N
    tok = tl.load(order_ptr + h * s_oh + pos * s_on, mask=row_ok, other=0).to(tl.int64)
    bits = tl.load(bits_ptr + tok * H + h, mask=row_ok, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e in range(E):
        chosen = ((bits >> e) & 1) != 0
        if tl.max(chosen.to(tl.int32), axis=0) > 0:
            w_e = w_ptr + h * s_wh + e * s_we
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + kk) < K
                a = tl.load(a_ptr + tok[:, None] * s_an + (k0 + kk)[None, :] * s_ak,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_e + (k0 + kk)[:, None] * s_wk + cols[None, :] * s_wc,
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                part = tl.dot(a, w, part, input_precision=PRECISION)
            if HAS_BIAS:
                bias = tl.load(b_ptr + h * s_bh + e * s_be + cols, mask=col_ok, other=0.0)
                part += bias.to(tl.float32)[None, :]
            gate = tl.load(table_ptr + (tok * H + h) * E + e, mask=row_ok & chosen, other=0.0)
            acc += gate[:, None] * part
            if GATE_GRAD:
                c = tl.load(c_ptr + tok[:, None] * s_cn + h * s_ch + cols[None, :],
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                dot_c = tl.sum(part * c.to(tl.float32), axis=1)
                tl.atomic_add(gg_ptr + (tok * H + h) * E + e, dot_c, mask=row_ok & chosen)
    out = out_ptr + tok[:, None] * s_yn + h * s_yh + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fan_out(
    a: Tensor, weight: Tensor, bias: Tensor | None, table: Tensor, bits: Tensor, order: Tensor,
    gate_input: Tensor | None = None, config: TileConfig | None = None,
) -> tuple[Tensor, Tensor | None]:
    """out [N, H, C] (a's dtype) and, with gate_input [N, H, C], gate_grad [N, H, E] fp32.

    a [N, K]; weight [H, E, K, C] with any strides (pass W_O.transpose(2, 3) for O's backward);
    bias [H, E, C] contiguous in C or None; table [N, H, E] fp32 and bits [N, H] contiguous;
    order [H, N] = routing.head_order(bits, E).
    """
    n, k_width = a.shape
    h, e, _, c_width = weight.shape
    cfg = config or fan_out_config(k_width, c_width)
    out = torch.empty(n, h, c_width, dtype=a.dtype, device=a.device)
    gate_grad = torch.zeros_like(table) if gate_input is not None else None
    c = gate_input if gate_input is not None else out
    gg = gate_grad if gate_grad is not None else table
    b = bias if bias is not None else table
    grid = (triton.cdiv(n, cfg.block_m), h, triton.cdiv(c_width, cfg.block_n))
    wrap_triton(_fan_out_kernel)[grid](
        a, weight, b, table, bits, order, c, gg, out,
        n, h, e, k_width, c_width,
        a.stride(0), a.stride(1), *weight.stride(), b.stride(0), b.stride(1), order.stride(0), order.stride(1),
        c.stride(0), c.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, GATE_GRAD=gate_input is not None, PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, gate_grad


def fan_out_reference(
    a: Tensor, weight: Tensor, bias: Tensor | None, table: Tensor, gate_input: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """What `fan_out` computes, densely over all experts in fp32 (gate_grad at every (n, h, e))."""
    y = torch.einsum("nk,hekc->nhec", a.float(), weight.float())
    if bias is not None:
        y = y + bias.float()
    out = (table.unsqueeze(-1) * y).sum(2).to(a.dtype)
    gate_grad = (y * gate_input.float().unsqueeze(2)).sum(-1) if gate_input is not None else None
    return out, gate_grad
