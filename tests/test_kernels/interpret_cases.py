"""Triton kernels under TRITON_INTERPRET=1 on the CPU against their references (run by test_interpret.py).

Not collected on its own (no test_ prefix): the interpreter must be switched on before Triton is
imported, so test_interpret.py runs this file in a fresh process.
"""

from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels/test_interpret.py"

import switchhead.kernels  # noqa: E402,F401
from switchhead.kernels import reference, route_triton, routing  # noqa: E402
from switchhead.kernels.fan_in import fan_in, fan_in_reference  # noqa: E402
from switchhead.kernels.fan_out import TileConfig, fan_out, fan_out_reference  # noqa: E402
from switchhead.kernels.wgrad import expert_wgrad, expert_wgrad_reference  # noqa: E402

from _cases import Shape, check_routing, make_problem, rel_err  # noqa: E402

# bf16 is checked on the GPU only: the interpreter computes tl.dot on bf16 raw bits (triton 3.8).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}

# N never a multiple of the blocks; k = 1, 2, 3; E up to 8; dh 16..128; H up to 8.
SHAPES = [
    Shape(37, 40, 1, 1, 1, 16, 24),
    Shape(53, 72, 3, 5, 2, 24, 56),
    Shape(29, 33, 2, 8, 3, 128, 40),
    Shape(41, 64, 8, 4, 3, 20, 48),
    Shape(23, 48, 4, 8, 1, 76, 36),
]
SMALL = TileConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every torch.empty (kernel outputs and partials) starts as NaN / a huge int: unwritten shows."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(2**30)

    monkeypatch.setattr(torch, "empty", poisoned)


def _chosen(p, e: int) -> torch.Tensor:
    """[N, H, E] bool: which gate-table entries are chosen (gate gradients are defined there only)."""
    return torch.zeros(*p.expert_index.shape[:2], e, dtype=torch.bool).scatter(2, p.expert_index, True)


CASES = [(s, torch.float32) for s in SHAPES] + [(SHAPES[1], torch.float16), (SHAPES[3], torch.float16)]


@pytest.mark.parametrize(("s", "dtype"), CASES, ids=str)
def test_full_ops_forward_and_every_gradient(s: Shape, dtype: torch.dtype) -> None:
    p = make_problem(s, dtype)
    tol = TOL[dtype]
    v = torch.ops.switchhead.expert_v_triton(p.x, p.w_v, p.b_v, p.expert_index, p.gates)
    ref64 = [t.double() if t.is_floating_point() else t for t in (p.x, p.w_v, p.b_v, p.expert_index, p.gates)]
    assert v.dtype == dtype and rel_err(v, reference.expert_v_reference(*ref64)) < tol
    o = torch.ops.switchhead.expert_o_triton(p.attn, p.w_o, p.expert_index, p.gates)
    o_args = [p.attn.double(), p.w_o.double(), p.expert_index, p.gates.double()]
    assert o.dtype == dtype and rel_err(o, reference.expert_o_reference(*o_args)) < tol

    got = torch.ops.switchhead.expert_v_backward_triton(p.grad_v, p.x, p.w_v, p.b_v, p.expert_index, p.gates)
    want = reference.expert_v_backward_reference(p.grad_v.double(), *ref64)
    for name, g, w in zip(("x", "w", "b", "gates"), got, want):
        assert g.shape == w.shape and rel_err(g, w) < tol, name
    assert got[3].dtype == p.gates.dtype
    no_bias = torch.ops.switchhead.expert_v_backward_triton(p.grad_v, p.x, p.w_v, None, p.expert_index, p.gates)
    assert no_bias[2].numel() == 0

    got = torch.ops.switchhead.expert_o_backward_triton(p.grad_o, p.attn, p.w_o, p.expert_index, p.gates)
    want = reference.expert_o_backward_reference(p.grad_o.double(), *o_args)
    for name, g, w in zip(("attn", "w", "gates"), got, want):
        assert g.shape == w.shape and rel_err(g, w) < tol, name


@pytest.mark.parametrize("s", [SHAPES[1], SHAPES[3]], ids=str)
def test_kernels_with_small_blocks(s: Shape) -> None:
    """16-wide blocks: several row, column and reduction blocks, ragged at every edge."""
    p = make_problem(s, torch.float32)
    table = routing.gate_table(p.expert_index, p.gates, s.e)
    bits = routing.expert_bits(p.expert_index)
    chosen = _chosen(p, s.e)

    out, gg = fan_out(p.x, p.w_v, p.b_v, table, bits, routing.head_order(bits, s.e), p.attn, config=SMALL)
    ref_out, ref_gg = fan_out_reference(p.x, p.w_v, p.b_v, table, p.attn)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(gg[chosen], ref_gg[chosen]) < 1e-5

    w_t = p.w_v.transpose(2, 3)
    a = p.grad_v.view(s.n, s.h, s.dh)
    out = fan_in(a, w_t, table, bits, routing.signature_order(bits, s.e), config=SMALL)
    assert rel_err(out, fan_in_reference(a, w_t, table)) < 1e-5
    # unsorted (the identity order: every tile holds many expert sets) is as correct
    identity = torch.arange(s.n, dtype=torch.int32)
    assert rel_err(fan_in(a, w_t, table, bits, identity, config=SMALL), fan_in_reference(a, w_t, table)) < 1e-5
    none, gg = fan_out(p.x, p.w_v, p.b_v, table, bits, identity.expand(s.h, s.n), p.attn, config=SMALL,
                       store_out=False)
    assert none is None and rel_err(gg[chosen], ref_gg[chosen]) < 1e-5

    groups = routing.expert_groups(p.expert_index, p.gates, s.e)
    x_heads = p.x.unsqueeze(1).expand(s.n, s.h, s.d)
    gw, gb = expert_wgrad(x_heads, a, *groups, s.e, True, torch.float32, config=SMALL)
    ref_gw, ref_gb = expert_wgrad_reference(x_heads, a, table)
    assert rel_err(gw, ref_gw) < 1e-5 and rel_err(gb, ref_gb) < 1e-5


def test_routing_orders_are_permutations() -> None:
    s = Shape(57, 8, 3, 6, 2, 8, 8)
    p = make_problem(s, torch.float32)
    bits = routing.expert_bits(p.expert_index)
    assert torch.equal(routing.head_order(bits, s.e).sort(1).values, torch.arange(s.n).expand(s.h, s.n))
    assert torch.equal(routing.signature_order(bits, s.e).sort().values, torch.arange(s.n))
    tokens, _, offsets = routing.expert_groups(p.expert_index, p.gates, s.e)
    assert offsets[-1].item() == s.n * s.h * s.k and torch.equal(offsets.diff(), bits.new_tensor(
        [(p.expert_index[:, h] == e).sum().item() for h in range(s.h) for e in range(s.e)]))


def _routing_case(n: int, h: int, e: int, k: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n * 1000 + h * 100 + e * 10 + k)
    if kind == "one expert":  # every token picks the same k experts: one key holds everything
        idx = torch.arange(k).expand(n, h, k).clone()
    elif kind == "few experts":  # only experts 0..k (k+1 of E): the others get no tokens
        idx = torch.rand(n, h, k + 1, generator=gen).topk(k, dim=-1).indices
    else:
        idx = torch.rand(n, h, e, generator=gen).topk(k, dim=-1).indices
    return idx, torch.rand(n, h, k, generator=gen)


ROUTE_CASES = [  # (N, H, E, k, kind, block): N = 1, N not a multiple of the block, E up to 8, H up to 8
    (37, 3, 5, 2, "random", 16),
    (1, 1, 1, 1, "random", 16),
    (45, 2, 8, 3, "few experts", 16),
    (29, 8, 4, 1, "one expert", 8),
    (40, 4, 6, 3, "random", 8),
]


@pytest.mark.parametrize(("n", "h", "e", "k", "kind", "block"), ROUTE_CASES, ids=str)
def test_route_kernels_against_torch(n: int, h: int, e: int, k: int, kind: str, block: int) -> None:
    """The three routing launches vs stable torch sorts: same permutations, groups, offsets, table."""
    idx, gates = _routing_case(n, h, e, k, kind)
    r = route_triton.route(idx, gates, e, head=True, sig=True, groups=True,
                           config=route_triton.RouteConfig(block=block))
    check_routing(r, idx, gates, e, block)
    # grouping: each group contiguous at its offsets and holding exactly its assignments
    for g in range(h * e):
        lo, hi = r.offsets[g].item(), r.offsets[g + 1].item()
        members = r.tokens[lo:hi].long()
        assert torch.equal(idx[members, g // e].eq(g % e).any(-1), torch.ones(hi - lo, dtype=torch.bool))
    # permutations: every token exactly once per head / once overall
    assert torch.equal(r.head_order.long().sort(1).values, torch.arange(n).expand(h, n))
    assert torch.equal(r.sig_order.long().sort().values, torch.arange(n))
    # deterministic: a second call gives bitwise the same outputs
    again = route_triton.route(idx, gates, e, head=True, sig=True, groups=True,
                               config=route_triton.RouteConfig(block=block))
    for name in ("table", "bits", "head_order", "sig_order", "tokens", "sorted_gates", "offsets"):
        assert torch.equal(getattr(r, name), getattr(again, name)), name


def test_route_subsets() -> None:
    """Only the requested fields come back (E above routing.MAX_EXPERTS is refused: test_reference.py)."""
    idx, gates = _routing_case(21, 2, 4, 2, "random")
    r = route_triton.route(idx, gates, 4, table=False, head=True, config=route_triton.RouteConfig(block=8))
    assert r.table is None and r.sig_order is None and r.tokens is None
    assert torch.equal(r.head_order.long(), torch.sort(r.bits.t(), dim=1, stable=True).indices)


def test_signature_layout() -> None:
    """The paper's shapes: 262M sorts heads 0-2 of 4 (6^3 keys), 262M-Wt103 head 0, 47M both heads."""
    assert route_triton.signature_layout(4, 2, 4) == (6, 3)
    assert route_triton.signature_layout(8, 4, 2) == (70, 1)
    assert route_triton.signature_layout(5, 3, 2) == (10, 2)
    assert route_triton.signature_layout(3, 3, 5) == (1, 1)
