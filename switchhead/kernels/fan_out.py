"""Fan-out expert projection (V forward, O backward's input gradient): Triton kernel and its reference.

Shape legend:
    N = tokens, K = reduction width (d for V, d_out for O's backward), C = output width per head (dh),
    H = heads, E = experts per head. G [N, H, E] is the dense gate table (0 where an expert is unchosen).

    out[n, h, :]      = sum_e G[n, h, e] * (a[n] @ w[h, e] + bias[h, e])       a [N, K], w [H, E, K, C]
    gate_grad[n, h, e] = (a[n] @ w[h, e] + bias[h, e]) . c[n, h]               only where e is chosen

One program owns BLOCK_M tokens of one head (walked in `head_order`: per head, sorted by expert set, so
a tile usually holds one set of k experts) and BLOCK_N output columns, and runs only the experts some
token of the tile chose (its OR-ed bit mask), lowest first.
- Forward: two experts per pass. Each activation tile is loaded once per pass; its rows are scaled by
  each expert's gates (the gate as a GEMM prologue) and both dots accumulate into the one output
  accumulator, so the k-sum never leaves registers, one accumulator keeps the tile free of register
  spills at 128 x 128, and the output is written once, with no atomics. A tile of one k=2 set is one
  pass over K.
- Gate gradient (GATE_GRAD): one expert per pass, its ungated tile dotted row-wise with c and added
  atomically in fp32 (several column blocks contribute when C > BLOCK_N), then gated in fp32 into the
  output when it is stored (STORE_OUT; V's backward wants the row dots only).
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


def fan_out_config(k_width: int, c_width: int, gate_grad: bool = False) -> TileConfig:
    """Tiles for the H200 (bf16), 128 rows, 8 warps: a head of up to 128 columns in one block (the
    power of two above it), wider heads in 64-wide blocks (132 -> 3 x 64). Checked with ptxas for sm_90
    (scripts/check_triton_sm90.py): no register spills, except 32 bytes with the gate gradient and the
    output both kept at 128 columns, which takes 32-deep reduction steps to get there."""
    if c_width <= 64:
        return TileConfig(block_m=128, block_n=max(16, triton.next_power_of_2(c_width)), block_k=64,
                          num_warps=8, num_stages=4)
    if c_width <= 128:
        if gate_grad:
            return TileConfig(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=4)
        return TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    return TileConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=4)


def dot_precision(dtype: torch.dtype) -> str:
    """'ieee' for fp32 unless torch allows tf32 matmuls; bf16/fp16 ignore it."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def bit_or(a, b):
    return a | b


@triton.jit
def lowest_bit(mask):
    """Index of the lowest set bit of an integer scalar > 0 (exact: log2 of a power of two, rounded)."""
    low = mask & (-mask)
    return (tl.log2(low.to(tl.float32)) + 0.5).to(tl.int32)


@triton.jit
def _fan_out_kernel(
    a_ptr, w_ptr, b_ptr, table_ptr, bits_ptr, order_ptr, c_ptr, gg_ptr, out_ptr,
    N, H, E, K, C,
    s_an, s_ak, s_wh, s_we, s_wk, s_wc, s_bh, s_be, s_oh, s_on,
    s_cn, s_ch, s_yn, s_yh,
    HAS_BIAS: tl.constexpr, GATE_GRAD: tl.constexpr, STORE_OUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    pid_n = tl.program_id(2)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = pos < N
    tok = tl.load(order_ptr + h * s_oh + pos * s_on, mask=row_ok, other=0).to(tl.int64)
    bits = tl.load(bits_ptr + tok * H + h, mask=row_ok, other=0)
    todo = tl.reduce(bits, 0, bit_or)  # the experts some token of the tile chose
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    tile_ok = row_ok[:, None] & col_ok[None, :]
    kk = tl.arange(0, BLOCK_K)
    if GATE_GRAD:
        c = tl.load(c_ptr + tok[:, None] * s_cn + h * s_ch + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate_row = table_ptr + (tok * H + h) * E
    if GATE_GRAD:
        # one expert per pass, gated in the epilogue in fp32: its ungated tile is needed for the row dot
        while todo != 0:
            e1 = lowest_bit(todo)
            todo = todo & (todo - 1)
            w1 = w_ptr + h * s_wh + e1 * s_we + cols[None, :] * s_wc
            p1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + kk) < K
                a = tl.load(a_ptr + tok[:, None] * s_an + (k0 + kk)[None, :] * s_ak,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w1 + (k0 + kk)[:, None] * s_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                p1 = tl.dot(a, w, p1, input_precision=PRECISION)
            if HAS_BIAS:
                p1 += tl.load(b_ptr + h * s_bh + e1 * s_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            chosen1 = row_ok & (((bits >> e1) & 1) != 0)
            tl.atomic_add(gg_ptr + (tok * H + h) * E + e1, tl.sum(p1 * c, axis=1), mask=chosen1)
            if STORE_OUT:
                acc += tl.load(gate_row + e1, mask=chosen1, other=0.0)[:, None] * p1
    else:
        # two experts per pass, gated in the prologue: each activation tile is loaded once, its rows
        # scaled by either expert's gates (rounded to the input dtype, as the all-experts formula's
        # gated operand is), and both dots accumulate into the one output accumulator
        while todo != 0:
            e1 = lowest_bit(todo)
            todo = todo & (todo - 1)
            two = todo != 0
            e2 = lowest_bit(tl.maximum(todo, 1))
            todo = tl.where(two, todo & (todo - 1), todo)
            g1 = tl.load(gate_row + e1, mask=row_ok & (((bits >> e1) & 1) != 0), other=0.0)
            g2 = tl.load(gate_row + e2, mask=row_ok & two & (((bits >> e2) & 1) != 0), other=0.0)
            w1 = w_ptr + h * s_wh + e1 * s_we + cols[None, :] * s_wc
            w2 = w_ptr + h * s_wh + e2 * s_we + cols[None, :] * s_wc
            if two:
                for k0 in range(0, K, BLOCK_K):
                    k_ok = (k0 + kk) < K
                    a = tl.load(a_ptr + tok[:, None] * s_an + (k0 + kk)[None, :] * s_ak,
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                    wk = (k0 + kk)[:, None] * s_wk
                    w_ok = k_ok[:, None] & col_ok[None, :]
                    a1 = (a * g1[:, None]).to(a_ptr.dtype.element_ty)
                    acc = tl.dot(a1, tl.load(w1 + wk, mask=w_ok, other=0.0), acc, input_precision=PRECISION)
                    a2 = (a * g2[:, None]).to(a_ptr.dtype.element_ty)
                    acc = tl.dot(a2, tl.load(w2 + wk, mask=w_ok, other=0.0), acc, input_precision=PRECISION)
            else:
                for k0 in range(0, K, BLOCK_K):
                    k_ok = (k0 + kk) < K
                    a = tl.load(a_ptr + tok[:, None] * s_an + (k0 + kk)[None, :] * s_ak,
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                    a1 = (a * g1[:, None]).to(a_ptr.dtype.element_ty)
                    w = tl.load(w1 + (k0 + kk)[:, None] * s_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    acc = tl.dot(a1, w, acc, input_precision=PRECISION)
            if HAS_BIAS:
                b1 = tl.load(b_ptr + h * s_bh + e1 * s_be + cols, mask=col_ok, other=0.0).to(tl.float32)
                b2 = tl.load(b_ptr + h * s_bh + e2 * s_be + cols, mask=col_ok & two, other=0.0).to(tl.float32)
                acc += g1[:, None] * b1[None, :] + g2[:, None] * b2[None, :]
    if STORE_OUT:
        out = out_ptr + tok[:, None] * s_yn + h * s_yh + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


def fan_out(
    a: Tensor, weight: Tensor, bias: Tensor | None, table: Tensor, bits: Tensor, order: Tensor,
    gate_input: Tensor | None = None, config: TileConfig | None = None, store_out: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """out [N, H, C] (a's dtype; None with store_out=False) and, with gate_input [N, H, C], gate_grad
    [N, H, E] fp32.

    a [N, K]; weight [H, E, K, C] with any strides (pass W_O.transpose(2, 3) for O's backward);
    bias [H, E, C] contiguous in C or None; table [N, H, E] fp32 and bits [N, H] contiguous;
    order [H, N] = routing.head_order(bits, E) (any per-head permutation is correct; sorted is fast).
    """
    if not store_out and gate_input is None:
        raise ValueError("fan_out with store_out=False computes only the gate gradient: pass gate_input")
    n, k_width = a.shape
    h, e, _, c_width = weight.shape
    cfg = config or fan_out_config(k_width, c_width, gate_input is not None and store_out)
    out = torch.empty(n, h, c_width, dtype=a.dtype, device=a.device) if store_out else None
    gate_grad = torch.zeros_like(table) if gate_input is not None else None
    # without an output the kernel stores nothing to out_ptr: an existing tensor stands for it (a fresh
    # allocation would be a graph node that Inductor sees mutated by nothing)
    c = gate_input if gate_input is not None else out
    y = out if out is not None else c
    gg = gate_grad if gate_grad is not None else table
    b = bias if bias is not None else table
    grid = (triton.cdiv(n, cfg.block_m), h, triton.cdiv(c_width, cfg.block_n))
    wrap_triton(_fan_out_kernel)[grid](
        a, weight, b, table, bits, order, c, gg, y,
        n, h, e, k_width, c_width,
        a.stride(0), a.stride(1), *weight.stride(), b.stride(0), b.stride(1), order.stride(0), order.stride(1),
        c.stride(0), c.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, GATE_GRAD=gate_input is not None, STORE_OUT=store_out,
        PRECISION=dot_precision(a.dtype),
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
