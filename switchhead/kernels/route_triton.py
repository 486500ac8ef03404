"""Token routing of the Triton expert ops in three Triton launches: a stable counting sort on the device.

Shape legend:
    N = tokens, H = heads, E = experts per head, k = active experts per head, B = tokens per routing
    block (`RouteConfig.block`), NBLK = ceil(N / B).

`route()` computes, from expert_index / gates [N, H, k], whichever of these one op needs:

- table [N, H, E] fp32: the chosen gates, 0 elsewhere (a duplicated expert gets the sum, like the
  reference's scatter_add); bits [N, H] int32: the chosen set as a bit mask (bit e = expert e);
- head order [H, N] int32: per head, the tokens sorted by their expert set (key = bits, 2^E keys);
- signature order [N] int32: the tokens sorted by a reduced signature of the sets of the first heads
  (see below);
- expert groups: the (token, head, slot) assignments sorted by (head, expert): tokens [H*N*k] int32,
  fp32 gates [H*N*k], offsets [H*E+1] int32 (group h*E+e is tokens[offsets[h*E+e]:offsets[h*E+e+1]]).

Every sort is a stable counting sort over a small key space, segmented by head where it is per head:
    1. `_route_hist_kernel`, grid (NBLK, H): bits and table of its B tokens, per-block key counts
       (`tl.histogram`) of every requested sort: hist[segment, key, block], and (signature order)
       each token's signature key.
    2. `_route_scan_kernel`, grid (H + 1,): one program per segment scans its [keys, blocks] counts in
       key-major order: start[key] (first position of the key in the segment) and, in place of the
       counts, rel[key, block] = (tokens of the key in earlier blocks) - (tokens of smaller keys in
       this block).
    3. `_route_scatter_kernel`, grid (NBLK, H, k + 2): one program per block and sort (head order,
       each slot's expert groups, signature) sorts its (key << log2 B | position) values with `tl.sort`
       (bitonic, in registers); the element at sorted position i of key q goes to
       start[q] + rel[q, block] + i.
The result is exactly a stable sort by key (ties in token order; expert groups in (block, slot,
token) order), so outputs, and the weight gradients reduced in that order, are bitwise reproducible.
No atomics, no host synchronisation, every shape known from the input shapes (torch.compile traces the
three `wrap_triton` launches).

Signature (the fan-in kernel's token order): only tile coherence matters, so the key is bounded:
per head, the rank of its expert set among the k-subsets of E (combinatorial number system, R =
C(E, k) values), mixed-radix over the first m heads with R^m <= SIG_KEYS (head 0 most significant).
For 262M (E=4, k=2, R=6) that is heads 0-2 (216 keys); for E=8, k=4 (R=70) head 0; for E=5, k=3 heads
0-1. Heads beyond m are not sorted: at 16k tokens a group of R^3 = 216 signatures holds ~76 tokens, so a
64-token tile of a fourth head would hold several sets anyway.

E is at most routing.MAX_EXPERTS (2^E head-order keys per head); more is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from switchhead.kernels import routing

SIG_KEYS = 1024  # bound on the signature key space (per-block histograms of this many bins)
MIN_BLOCK = 32


@dataclass(frozen=True)
class RouteConfig:
    """block: tokens per routing block (a power of 2; the in-register sort size); num_warps."""

    block: int = 1024
    num_warps: int = 4


@dataclass
class Routing:
    """What one op needs; fields it did not ask for are None."""

    bits: Tensor
    table: Tensor | None = None
    head_order: Tensor | None = None
    sig_order: Tensor | None = None
    tokens: Tensor | None = None
    sorted_gates: Tensor | None = None
    offsets: Tensor | None = None

    @property
    def groups(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.tokens, self.sorted_gates, self.offsets


def signature_layout(num_experts: int, k: int, heads: int, max_keys: int = SIG_KEYS) -> tuple[int, int]:
    """(radix R = C(E, k), heads m in the signature): the largest m <= H with R^m <= max_keys, >= 1."""
    radix = math.comb(num_experts, k) if k <= num_experts else 1
    m = 1
    while m < heads and radix > 1 and radix ** (m + 1) <= max_keys:
        m += 1
    return radix, m


def signature_key(expert_index: Tensor, num_experts: int, max_keys: int = SIG_KEYS) -> Tensor:
    """[N] int64: the reduced signature in torch (the reference the kernels are tested against)."""
    n, h, k = expert_index.shape
    radix, m = signature_layout(num_experts, k, h, max_keys)
    chosen = torch.zeros(n, h, num_experts, dtype=torch.int64, device=expert_index.device)
    chosen.scatter_(2, expert_index, 1)
    cnt = chosen.cumsum(2)  # rank (1-based) of each chosen expert among the chosen, in expert order
    e = torch.arange(num_experts, device=expert_index.device)
    binom = torch.tensor([[math.comb(i, c) for c in range(k + 1)] for i in range(num_experts)],
                         device=expert_index.device)  # [E, k+1]
    rank = (chosen * binom[e, cnt.clamp(max=k)]).sum(2).clamp(max=radix - 1)  # [N, H]
    key = torch.zeros(n, dtype=torch.int64, device=expert_index.device)
    for hh in range(m):
        key = key * radix + rank[:, hh]
    return key


# Why pointers stay in the kernel bodies: torch.compile finds which tensors a user kernel writes by
# walking back from each tl.store's address through everything that computed it, stopping at tl.load
# but not at a call of a @triton.jit helper, whose pointer arguments it then counts as written. A
# store address computed by a helper that loads would mark expert_index and the scanned counts as
# outputs, and Inductor would copy them before every launch (tests/test_kernels/test_kernel_writes.py).
# So helpers take and return values only; the loads that feed an address are written out in place.


@triton.jit
def _subset_rank(bits, E: tl.constexpr, K: tl.constexpr, RADIX: tl.constexpr, BLOCK: tl.constexpr):
    """[BLOCK] expert-set bit masks -> their rank among the k-subsets of E (combinatorial number
    system), clamped to RADIX - 1 (sets of fewer than k experts, from duplicated choices)."""
    cnt = tl.zeros((BLOCK,), dtype=tl.int32)
    rank = tl.zeros((BLOCK,), dtype=tl.int32)
    for e in tl.static_range(E):
        bit = (bits >> e) & 1
        cnt += bit
        num = tl.full((BLOCK,), 1, tl.int32)
        den = tl.full((BLOCK,), 1, tl.int32)
        for i in tl.static_range(K):  # C(e, cnt) = prod_{i < cnt} (e - i) / (i + 1)
            num *= tl.where(i < cnt, e - i, 1)
            den *= tl.where(i < cnt, i + 1, 1)
        rank += bit * (num // den)
    return tl.minimum(rank, RADIX - 1)


@triton.jit
def _route_hist_kernel(
    idx_ptr, gate_ptr, bits_ptr, table_ptr, hh_ptr, hg_ptr, hs_ptr, sk_ptr,
    N, H, NBLK, s_in, s_ih, s_ik, s_gn, s_gh, s_gk,
    E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr, NB_HEAD: tl.constexpr,
    RADIX: tl.constexpr, SIG_HEADS: tl.constexpr, NB_SIG: tl.constexpr,
    TABLE: tl.constexpr, HEAD: tl.constexpr, GROUPS: tl.constexpr, SIG: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tok = b * BLOCK + tl.arange(0, BLOCK)
    ok = tok < N
    tok = tok.to(tl.int64)
    es = tl.arange(0, EP)
    bits = tl.zeros((BLOCK,), dtype=tl.int32)
    table = tl.zeros((BLOCK, EP), dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.load(idx_ptr + tok * s_in + h * s_ih + j * s_ik, mask=ok, other=0).to(tl.int32)
        bits = bits | (1 << e)
        if TABLE:
            g = tl.load(gate_ptr + tok * s_gn + h * s_gh + j * s_gk, mask=ok, other=0.0).to(tl.float32)
            table += tl.where(e[:, None] == es[None, :], g[:, None], 0.0)
        if GROUPS:  # one counting block per (block, slot): groups come out in (block, slot, token) order
            cnt = tl.histogram(e, EP, mask=ok)
            tl.store(hg_ptr + ((h * E + es) * NBLK + b) * K + j, cnt, mask=es < E)
    tl.store(bits_ptr + tok * H + h, bits, mask=ok)
    if TABLE:
        tl.store(table_ptr + (tok * H + h)[:, None] * E + es[None, :], table, mask=ok[:, None] & (es < E)[None, :])
    if HEAD:
        head_keys = tl.arange(0, NB_HEAD)  # distinct names: Triton 3.6 rejects a name rebound to another shape
        tl.store(hh_ptr + (h * NB_HEAD + head_keys) * NBLK + b, tl.histogram(bits, NB_HEAD, mask=ok))
    if SIG:
        if h == 0:
            key = tl.zeros((BLOCK,), dtype=tl.int32)  # the signature: mixed radix over the first heads
            for hh in tl.static_range(SIG_HEADS):
                hb = tl.zeros((BLOCK,), dtype=tl.int32)
                for j in tl.static_range(K):
                    e = tl.load(idx_ptr + tok * s_in + hh * s_ih + j * s_ik, mask=ok, other=0).to(tl.int32)
                    hb = hb | (1 << e)
                key = key * RADIX + _subset_rank(hb, E, K, RADIX, BLOCK)
            sig_keys = tl.arange(0, NB_SIG)
            tl.store(hs_ptr + sig_keys * NBLK + b, tl.histogram(key, NB_SIG, mask=ok))
            tl.store(sk_ptr + tok, key, mask=ok)  # the scatter sorts by it


@triton.jit
def _scan_segment(hist_ptr, start_ptr, num_keys, cols, base, NB: tl.constexpr, BC: tl.constexpr):
    """Counts [num_keys, cols] -> start[key] = base + tokens of smaller keys; in place of the counts,
    rel[key, col] = tokens of the key in earlier cols - tokens of smaller keys in this col.
    Returns base + all tokens of the segment."""
    keys = tl.arange(0, NB)
    key_ok = keys < num_keys
    carry = tl.zeros((NB,), dtype=tl.int32)
    for c0 in range(0, cols, BC):
        cc = c0 + tl.arange(0, BC)
        m = key_ok[:, None] & (cc < cols)[None, :]
        ptrs = hist_ptr + keys[:, None] * cols + cc[None, :]
        t = tl.load(ptrs, mask=m, other=0)
        rel = carry[:, None] + tl.cumsum(t, 1) - tl.cumsum(t, 0)
        tl.store(ptrs, rel, mask=m)
        carry += tl.sum(t, 1)
    tl.store(start_ptr + keys, base + tl.cumsum(carry, 0) - carry, mask=key_ok)
    return base + tl.sum(carry, 0)


@triton.jit
def _route_scan_kernel(
    hh_ptr, sh_ptr, hg_ptr, off_ptr, hs_ptr, ss_ptr,
    N, H, NBLK,
    E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr, NB_HEAD: tl.constexpr, NB_SIG: tl.constexpr,
    HEAD: tl.constexpr, GROUPS: tl.constexpr, SIG: tl.constexpr,
    BC_HEAD: tl.constexpr, BC_GROUPS: tl.constexpr, BC_SIG: tl.constexpr,
):
    s = tl.program_id(0)
    if s < H:
        h = s.to(tl.int64)
        if HEAD:
            _scan_segment(hh_ptr + h * NB_HEAD * NBLK, sh_ptr + h * NB_HEAD, NB_HEAD, NBLK, h * N, NB_HEAD, BC_HEAD)
        if GROUPS:
            end = _scan_segment(hg_ptr + h * E * NBLK * K, off_ptr + h * E, E, NBLK * K, h * N * K, EP, BC_GROUPS)
            if s == H - 1:
                tl.store(off_ptr + H * E, end.to(tl.int32))
    else:
        if SIG:
            _scan_segment(hs_ptr, ss_ptr, NB_SIG, NBLK, 0, NB_SIG, BC_SIG)


@triton.jit
def _sort_block(key, ok, NB: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """One block's keys, stably sorted: (key, block position, valid) at each sorted position."""
    pos = tl.arange(0, BLOCK)
    packed = (tl.where(ok, key, NB) << LOG_BLOCK) | pos
    packed = tl.sort(packed)
    key_s = packed >> LOG_BLOCK
    ok_s = key_s < NB
    return tl.where(ok_s, key_s, 0), packed & (BLOCK - 1), ok_s


@triton.jit
def _route_scatter_kernel(
    idx_ptr, gate_ptr, bits_ptr, hh_ptr, sh_ptr, ho_ptr, hg_ptr, off_ptr, tok_ptr, sg_ptr, hs_ptr, ss_ptr, sk_ptr, so_ptr,
    N, H, NBLK, s_in, s_ih, s_ik, s_gn, s_gh, s_gk,
    E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr, NB_HEAD: tl.constexpr, NB_SIG: tl.constexpr,
    HEAD: tl.constexpr, GROUPS: tl.constexpr, SIG: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
):
    """Program (block, head, job): job 0 sorts the head order, job 1 + j the expert groups of slot j,
    job K + 1 (head 0 only) the signature order; one in-register sort each, all in parallel."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    job = tl.program_id(2)
    first = b * BLOCK
    tok = first + tl.arange(0, BLOCK)
    ok = tok < N
    tok = tok.to(tl.int64)
    hl = h.to(tl.int64)
    sorted_pos = tl.arange(0, BLOCK)
    # the element at sorted position i of key q goes to start[q] + rel[q, column] + i
    if HEAD:
        if job == 0:
            bits = tl.load(bits_ptr + tok * H + h, mask=ok, other=0)
            q, p, v = _sort_block(bits, ok, NB_HEAD, BLOCK, LOG_BLOCK)
            dest = (tl.load(sh_ptr + hl * NB_HEAD + q, mask=v, other=0)
                    + tl.load(hh_ptr + (hl * NB_HEAD + q) * NBLK + b, mask=v, other=0) + sorted_pos)
            tl.store(ho_ptr + dest.to(tl.int64), first + p, mask=v)
    if GROUPS:
        if (job >= 1) & (job <= K):
            j = job - 1
            e = tl.load(idx_ptr + tok * s_in + h * s_ih + j * s_ik, mask=ok, other=0).to(tl.int32)
            q, p, v = _sort_block(e, ok, EP, BLOCK, LOG_BLOCK)
            dest = (tl.load(off_ptr + hl * E + q, mask=v, other=0)
                    + tl.load(hg_ptr + (hl * E + q) * NBLK * K + b * K + j, mask=v, other=0) + sorted_pos)
            dest = dest.to(tl.int64)
            t = (first + p).to(tl.int64)
            g = tl.load(gate_ptr + t * s_gn + h * s_gh + j * s_gk, mask=v, other=0.0).to(tl.float32)
            tl.store(tok_ptr + dest, t.to(tl.int32), mask=v)
            tl.store(sg_ptr + dest, g, mask=v)
    if SIG:
        if (job == K + 1) & (h == 0):
            key = tl.load(sk_ptr + tok, mask=ok, other=0)
            q, p, v = _sort_block(key, ok, NB_SIG, BLOCK, LOG_BLOCK)
            dest = tl.load(ss_ptr + q, mask=v, other=0) + tl.load(hs_ptr + q * NBLK + b, mask=v, other=0) + sorted_pos
            tl.store(so_ptr + dest.to(tl.int64), first + p, mask=v)


def _scan_chunk(keys: int) -> int:
    """Block columns per scan step: about 4k counts per [keys, columns] tile."""
    return max(2, min(64, 4096 // keys))


def route(
    expert_index: Tensor, gates: Tensor, num_experts: int, *, table: bool = True, head: bool = False,
    sig: bool = False, groups: bool = False, config: RouteConfig | None = None,
) -> Routing:
    """Routing of one op call in three Triton launches (module docstring)."""
    routing.check_experts(num_experts)
    cfg = config or RouteConfig()
    n, h, k = expert_index.shape
    block = cfg.block
    assert block & (block - 1) == 0, "routing block must be a power of 2"
    if isinstance(n, int) and n < block:  # few tokens (decoding, tests): sort no more than needed
        block = min(block, max(MIN_BLOCK, triton.next_power_of_2(n)))
    e = num_experts
    dev = expert_index.device
    nblk = triton.cdiv(n, block)
    ep = max(2, triton.next_power_of_2(e))
    nb_head = 1 << e
    radix, sig_heads = signature_layout(e, k, h)
    nb_sig = max(2, triton.next_power_of_2(radix ** sig_heads))
    i32 = torch.int32

    bits = torch.empty(n, h, dtype=i32, device=dev)
    out = Routing(bits=bits)
    dummy = torch.empty(1, dtype=i32, device=dev)  # stands for the outputs not asked for
    tab = torch.empty(n, h, e, dtype=torch.float32, device=dev) if table else dummy
    hh = torch.empty(h, nb_head, nblk, dtype=i32, device=dev) if head else dummy
    sh = torch.empty(h, nb_head, dtype=i32, device=dev) if head else dummy
    ho = torch.empty(h, n, dtype=i32, device=dev) if head else dummy
    hg = torch.empty(h, e, nblk * k, dtype=i32, device=dev) if groups else dummy
    off = torch.empty(h * e + 1, dtype=i32, device=dev) if groups else dummy
    toks = torch.empty(h * n * k, dtype=i32, device=dev) if groups else dummy
    sg = torch.empty(h * n * k, dtype=torch.float32, device=dev) if groups else dummy
    hs = torch.empty(nb_sig, nblk, dtype=i32, device=dev) if sig else dummy
    ss = torch.empty(nb_sig, dtype=i32, device=dev) if sig else dummy
    sk = torch.empty(n, dtype=i32, device=dev) if sig else dummy
    so = torch.empty(n, dtype=i32, device=dev) if sig else dummy

    strides = (*expert_index.stride(), *gates.stride())
    flags = dict(HEAD=head, GROUPS=groups, SIG=sig)
    sizes = dict(E=e, K=k, EP=ep, NB_HEAD=nb_head)
    wrap_triton(_route_hist_kernel)[(nblk, h)](
        expert_index, gates, bits, tab, hh, hg, hs, sk, n, h, nblk, *strides,
        **sizes, RADIX=radix, SIG_HEADS=sig_heads, NB_SIG=nb_sig, TABLE=table, **flags, BLOCK=block,
        num_warps=cfg.num_warps,
    )
    if head or groups or sig:
        wrap_triton(_route_scan_kernel)[(h + 1,)](
            hh, sh, hg, off, hs, ss, n, h, nblk, **sizes, NB_SIG=nb_sig, **flags,
            BC_HEAD=_scan_chunk(nb_head), BC_GROUPS=_scan_chunk(ep), BC_SIG=_scan_chunk(nb_sig), num_warps=4,
        )
        wrap_triton(_route_scatter_kernel)[(nblk, h, k + 2)](
            expert_index, gates, bits, hh, sh, ho, hg, off, toks, sg, hs, ss, sk, so, n, h, nblk, *strides,
            **sizes, NB_SIG=nb_sig, **flags, BLOCK=block,
            LOG_BLOCK=block.bit_length() - 1, num_warps=cfg.num_warps,
        )
    if table:
        out.table = tab
    if head:
        out.head_order = ho
    if sig:
        out.sig_order = so
    if groups:
        out.tokens, out.sorted_gates, out.offsets = toks, sg, off
    return out
