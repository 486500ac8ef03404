"""Fan-in expert projection (O forward, V backward's input gradient): Triton kernel and its reference.

Shape legend:
    N = tokens, H = heads, Kh = reduction width per head (dh), C = output width (d_out for O, d for V),
    E = experts per head. G [N, H, E] is the dense gate table (0 where an expert is unchosen).

    out[n, :] = sum_h sum_e G[n, h, e] * (a[n, h] @ w[h, e])          a [N, H, Kh], w [H, E, Kh, C]

This is one GEMM whose reduction runs over the (head, expert, Kh) triples some token of the tile chose:
one program owns BLOCK_M tokens x BLOCK_N output columns, and its single K loop walks the set bits of
the tile's packed expert mask (bit h*E + e: some token chose expert e of head h), Kh in BLOCK_K steps
each. The gate enters as a prologue: the activation tile's rows are scaled by their gates before the
dot (in fp32, rounded to the input dtype: exactly the all-experts formula's gated operand), so one
accumulator holds the sums over heads and experts, the output is written once, and the loop body is
one load pair and one dot that the pipeliner overlaps across (head, expert) boundaries. Tokens are
walked in `signature_order` (sorted by the expert sets of the first heads) so tiles skip most
unchosen experts. Heads are taken in chunks whose packed masks fit 62 bits (all heads for E <= 7 and
H*E <= 62).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from switchhead.kernels.fan_out import TileConfig, bit_or, dot_precision, lowest_bit

MASK_BITS = 62  # bits of the packed (head, expert) mask one K loop walks


def fan_in_config(k_width: int, c_width: int) -> TileConfig:
    """Tiles for the H200 (bf16): 128 x 128 output tiles, 8 warps; the reduction step is 64 unless
    32 pads the head size less (76 -> 96 instead of 128, 132 -> 160 instead of 192)."""
    block_n = 128 if c_width >= 128 else max(16, triton.next_power_of_2(c_width))
    block_k = 64 if triton.cdiv(k_width, 64) * 64 <= triton.cdiv(k_width, 32) * 32 else 32
    return TileConfig(block_m=128, block_n=block_n, block_k=block_k, num_warps=8, num_stages=3)


@triton.jit
def _fan_in_kernel(
    a_ptr, w_ptr, table_ptr, bits_ptr, order_ptr, out_ptr,
    N, H, E, KH, C,
    s_an, s_ah, s_ak, s_wh, s_we, s_wk, s_wc, s_yn,
    HEADS_PER_MASK: tl.constexpr, HP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = pos < N
    tok = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    kk = tl.arange(0, BLOCK_K)
    hp = tl.arange(0, HP)
    steps = tl.cdiv(KH, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, H, HEADS_PER_MASK):
        heads = h0 + hp
        head_ok = (hp < HEADS_PER_MASK) & (heads < H)
        bits = tl.load(bits_ptr + tok[:, None] * H + heads[None, :], mask=row_ok[:, None] & head_ok[None, :], other=0)
        packed = tl.sum(bits.to(tl.int64) << (hp * E).to(tl.int64)[None, :], axis=1)  # disjoint bits: sum = or
        todo = tl.reduce(packed, 0, bit_or)
        count = tl.sum(((todo >> tl.arange(0, 64).to(tl.int64)) & 1).to(tl.int32), axis=0)
        bit = 0
        for t in range(0, count * steps):
            j = t % steps
            bit = tl.where(j == 0, lowest_bit(tl.maximum(todo, 1)), bit)
            todo = tl.where(j == 0, todo & (todo - 1), todo)
            h = h0 + bit // E
            e = bit % E
            k_ok = (j * BLOCK_K + kk) < KH
            a = tl.load(a_ptr + tok[:, None] * s_an + h * s_ah + (j * BLOCK_K + kk)[None, :] * s_ak,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            gate = tl.load(table_ptr + (tok * H + h) * E + e, mask=row_ok, other=0.0)
            a = (a.to(tl.float32) * gate[:, None]).to(a_ptr.dtype.element_ty)
            w = tl.load(w_ptr + h * s_wh + e * s_we + (j * BLOCK_K + kk)[:, None] * s_wk + cols[None, :] * s_wc,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    out = out_ptr + tok[:, None] * s_yn + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fan_in(
    a: Tensor, weight: Tensor, table: Tensor, bits: Tensor, order: Tensor, config: TileConfig | None = None,
) -> Tensor:
    """out [N, C] in a's dtype.

    a [N, H, Kh] with any strides; weight [H, E, Kh, C] with any strides (pass W_V.transpose(2, 3)
    for V's backward); table [N, H, E] fp32 and bits [N, H] contiguous; order [N] =
    routing.signature_order(bits, E) (any permutation is correct; sorted is fast).
    """
    n, h, k_width = a.shape
    _, e, _, c_width = weight.shape
    cfg = config or fan_in_config(k_width, c_width)
    heads_per_mask = max(1, min(h, MASK_BITS // e))
    out = torch.empty(n, c_width, dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(n, cfg.block_m), triton.cdiv(c_width, cfg.block_n))
    wrap_triton(_fan_in_kernel)[grid](
        a, weight, table, bits, order, out,
        n, h, e, k_width, c_width,
        *a.stride(), *weight.stride(), out.stride(0),
        HEADS_PER_MASK=heads_per_mask, HP=max(2, triton.next_power_of_2(heads_per_mask)),
        PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def fan_in_reference(a: Tensor, weight: Tensor, table: Tensor) -> Tensor:
    """What `fan_in` computes, densely over all experts in fp32."""
    y = torch.einsum("nht,hetc->nhec", a.float(), weight.float())
    return (table.unsqueeze(-1) * y).sum((1, 2)).to(a.dtype)
