"""Expert weight (and bias) gradients of both projections: Triton kernel and its reference.

Shape legend:
    N = tokens, H = heads, E = experts per head, P / Q = the two sides of one expert's weight
    (V: P = d, Q = dh; O: P = dh, Q = d_out), S = split of each expert's tokens over programs.

    grad_w[h, e] = sum over tokens n that chose e at head h of  g[n, h, e] * p[n, h]^T q[n, h]   [P, Q]
    grad_b[h, e] = sum over the same tokens of                  g[n, h, e] * q[n, h]             [Q]

p [N, H, P] and q [N, H, Q] come with any strides (stride 0 over heads for a tensor shared by all heads,
such as V's input x or O's output gradient). The assignments come sorted by (head, expert) from
`routing.expert_groups`; program (group, split, P-block, Q-block) reduces its slice of one group's
tokens with GEMM tiles (P-block x tokens) @ (tokens x Q-block), the gate folded into q in fp32. Each split writes its own fp32 partial; the launcher sums the S partials,
so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from switchhead.kernels.fan_out import TileConfig, dot_precision

_TARGET_PROGRAMS = 264  # two waves of the H200's 132 SMs


def wgrad_config(p_width: int, q_width: int) -> TileConfig:
    """Heuristic tiles for the H200 (bf16); block_k is the token chunk of the reduction."""
    if q_width <= 128:
        block_n = max(16, triton.next_power_of_2(q_width))
    else:
        block_n = 64 if q_width < 256 else 128
    return TileConfig(block_m=128, block_n=block_n, block_k=64, num_warps=8, num_stages=3)


def wgrad_splits(groups: int, p_width: int, q_width: int, cfg: TileConfig) -> int:
    """Token splits per expert group so that the grid has about _TARGET_PROGRAMS programs."""
    tiles = groups * triton.cdiv(p_width, cfg.block_m) * triton.cdiv(q_width, cfg.block_n)
    return max(1, min(16, _TARGET_PROGRAMS // tiles))


@triton.jit
def _wgrad_kernel(
    p_ptr, q_ptr, tok_ptr, gate_ptr, off_ptr, gw_ptr, gb_ptr,
    P, Q, S, E,
    s_pn, s_ph, s_pc, s_qn, s_qh, s_qc,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    group = pid // S
    split = pid % S
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    h = group // E
    start = tl.load(off_ptr + group).to(tl.int32)
    end = tl.load(off_ptr + group + 1).to(tl.int32)
    per = tl.cdiv(tl.cdiv(end - start, S), BLOCK_K) * BLOCK_K
    lo = start + split * per
    hi = tl.minimum(lo + per, end)
    pcols = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    qcols = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = pcols < P
    q_ok = qcols < Q
    rr = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        r_ok = (r0 + rr) < hi
        tok = tl.load(tok_ptr + r0 + rr, mask=r_ok, other=0).to(tl.int64)
        gate = tl.load(gate_ptr + r0 + rr, mask=r_ok, other=0.0)
        p = tl.load(p_ptr + tok[None, :] * s_pn + h * s_ph + pcols[:, None] * s_pc,
                    mask=p_ok[:, None] & r_ok[None, :], other=0.0)
        q = tl.load(q_ptr + tok[:, None] * s_qn + h * s_qh + qcols[None, :] * s_qc,
                    mask=r_ok[:, None] & q_ok[None, :], other=0.0)
        q_gated = q.to(tl.float32) * gate[:, None]
        acc = tl.dot(p, q_gated.to(q.dtype), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc_b += tl.sum(q_gated, axis=0)
    base = (split * (tl.num_programs(0) // S) + group).to(tl.int64)
    gw = gw_ptr + base * P * Q + pcols[:, None] * Q + qcols[None, :]
    tl.store(gw, acc, mask=p_ok[:, None] & q_ok[None, :])
    if HAS_BIAS:
        if pid_p == 0:
            tl.store(gb_ptr + base * Q + qcols, acc_b, mask=q_ok)


def expert_wgrad(
    p: Tensor, q: Tensor, tokens: Tensor, sorted_gates: Tensor, offsets: Tensor, num_experts: int,
    with_bias: bool, out_dtype: torch.dtype, config: TileConfig | None = None,
) -> tuple[Tensor, Tensor | None]:
    """grad_w [H, E, P, Q] and (with_bias) grad_b [H, E, Q], both out_dtype.

    p [N, H, P], q [N, H, Q] (any strides, same dtype); tokens, sorted_gates, offsets from
    routing.expert_groups.
    """
    # Heads and widths are weight dimensions, static in every real model. As plain ints the split
    # heuristic stays an int; left symbolic (opcheck's dynamic test makes every size symbolic) it
    # becomes nested FloorDivs that sympy takes minutes to simplify.
    h, p_width, q_width = int(p.shape[1]), int(p.shape[2]), int(q.shape[2])
    groups = h * num_experts
    cfg = config or wgrad_config(p_width, q_width)
    splits = wgrad_splits(groups, p_width, q_width, cfg)
    partial_w = torch.empty(splits, groups, p_width, q_width, dtype=torch.float32, device=p.device)
    partial_b = torch.empty(splits, groups, q_width, dtype=torch.float32, device=p.device) if with_bias else partial_w
    grid = (groups * splits, triton.cdiv(p_width, cfg.block_m), triton.cdiv(q_width, cfg.block_n))
    wrap_triton(_wgrad_kernel)[grid](
        p, q, tokens, sorted_gates, offsets, partial_w, partial_b,
        p_width, q_width, splits, num_experts,
        *p.stride(), *q.stride(),
        HAS_BIAS=with_bias, PRECISION=dot_precision(p.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    grad_w = partial_w.sum(0).view(h, num_experts, p_width, q_width).to(out_dtype)
    grad_b = partial_b.sum(0).view(h, num_experts, q_width).to(out_dtype) if with_bias else None
    return grad_w, grad_b


def expert_wgrad_reference(p: Tensor, q: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """What `expert_wgrad` computes, densely in fp32 from the gate table G [N, H, E]."""
    q_gated = table.unsqueeze(-1) * q.float().unsqueeze(2)  # [N, H, E, Q]
    return torch.einsum("nhp,nheq->hepq", p.float(), q_gated), q_gated.sum(0)
