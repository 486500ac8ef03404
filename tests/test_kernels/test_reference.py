"""The reference expert ops against a per-token loop, and the stable ops under opcheck and compile (CPU)."""

from __future__ import annotations

import pytest
import torch

import switchhead.kernels  # noqa: F401  (registers the ops)
from switchhead.kernels import reference

from ._cases import Shape, make_problem, rel_err


def dumb_expert_v(x, w, b, expert_index, gates):
    n, (h, _, _, dh) = x.shape[0], w.shape
    rows = []
    for i in range(n):
        heads = []
        for hh in range(h):
            acc = x.new_zeros(dh)
            for j in range(expert_index.shape[2]):
                e = int(expert_index[i, hh, j])
                acc = acc + gates[i, hh, j].to(x.dtype) * (x[i] @ w[hh, e] + b[hh, e])
            heads.append(acc)
        rows.append(torch.cat(heads))
    return torch.stack(rows)


def dumb_expert_o(attn, w, expert_index, gates):
    n, h = attn.shape[:2]
    rows = []
    for i in range(n):
        acc = attn.new_zeros(w.shape[3])
        for hh in range(h):
            for j in range(expert_index.shape[2]):
                e = int(expert_index[i, hh, j])
                acc = acc + gates[i, hh, j].to(attn.dtype) * (attn[i, hh] @ w[hh, e])
        rows.append(acc)
    return torch.stack(rows)


SHAPES = [Shape(7, 12, 1, 1, 1, 4, 6), Shape(11, 10, 3, 5, 2, 6, 9), Shape(9, 8, 2, 8, 3, 5, 7)]


@pytest.mark.parametrize("s", SHAPES, ids=str)
def test_reference_matches_per_token_loop(s: Shape) -> None:
    p = make_problem(s, torch.float64)
    leaves = [p.x, p.w_v, p.b_v, p.gates, p.attn, p.w_o]
    for t in leaves:
        t.requires_grad_(True)
    v = dumb_expert_v(p.x, p.w_v, p.b_v, p.expert_index, p.gates)
    o = dumb_expert_o(p.attn, p.w_o, p.expert_index, p.gates)
    assert rel_err(reference.expert_v_reference(p.x, p.w_v, p.b_v, p.expert_index, p.gates), v) < 1e-12
    assert rel_err(reference.expert_o_reference(p.attn, p.w_o, p.expert_index, p.gates), o) < 1e-12
    gv = torch.autograd.grad(v, [p.x, p.w_v, p.b_v, p.gates], p.grad_v)
    go = torch.autograd.grad(o, [p.attn, p.w_o, p.gates], p.grad_o)
    rv = reference.expert_v_backward_reference(p.grad_v, p.x, p.w_v, p.b_v, p.expert_index, p.gates)
    ro = reference.expert_o_backward_reference(p.grad_o, p.attn, p.w_o, p.expert_index, p.gates)
    for got, want in zip(rv, gv):
        assert rel_err(got, want) < 1e-12
    for got, want in zip(ro, go):
        assert rel_err(got, want) < 1e-12


def test_opcheck_both_ops() -> None:
    s = Shape(13, 16, 2, 4, 2, 8, 12)
    p = make_problem(s, torch.float32)
    for t in (p.x, p.w_v, p.b_v, p.gates, p.attn, p.w_o):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.switchhead.expert_v.default, (p.x, p.w_v, p.b_v, p.expert_index, p.gates))
    torch.library.opcheck(torch.ops.switchhead.expert_v.default, (p.x, p.w_v, None, p.expert_index, p.gates))
    torch.library.opcheck(torch.ops.switchhead.expert_o.default, (p.attn, p.w_o, p.expert_index, p.gates))


def _layer(x, w_v, b_v, w_o, expert_index, gates):
    n, h, dh = x.shape[0], w_v.shape[0], w_v.shape[3]
    v = torch.ops.switchhead.expert_v(x, w_v, b_v, expert_index, gates)
    return torch.ops.switchhead.expert_o(torch.tanh(v).view(n, h, dh), w_o, expert_index, gates)


def test_compile_cpu_no_graph_breaks_matches_eager() -> None:
    s = Shape(21, 24, 2, 4, 2, 8, 24)
    p = make_problem(s, torch.float32)
    args = [p.x, p.w_v, p.b_v, p.w_o, p.expert_index, p.gates]
    leaves = [p.x, p.w_v, p.b_v, p.w_o, p.gates]
    for t in leaves:
        t.requires_grad_(True)
    assert torch._dynamo.explain(_layer)(*args).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(_layer, fullgraph=True)
    out_c = compiled(*args)
    grads_c = torch.autograd.grad(out_c, leaves, p.grad_o)
    out_e = _layer(*args)
    grads_e = torch.autograd.grad(out_e, leaves, p.grad_o)
    assert rel_err(out_c, out_e) < 1e-6
    for got, want in zip(grads_c, grads_e):
        assert rel_err(got, want) < 1e-6


def test_routing_refuses_more_experts_than_the_sparse_path_takes() -> None:
    """E > routing.MAX_EXPERTS: route() refuses before any Triton launch (so it runs here); choice.py
    sends such ops to the dense formula."""
    from switchhead.kernels import route_triton, routing

    e = routing.MAX_EXPERTS + 1
    torch.manual_seed(0)
    index = torch.rand(37, 3, e).argsort(-1)[..., :2]
    gates = torch.rand(37, 3, 2)
    with pytest.raises(ValueError, match=f"at most {routing.MAX_EXPERTS} experts per head, got {e}"):
        route_triton.route(index, gates, e, head=True, sig=True, groups=True)
    assert routing.check_experts(routing.MAX_EXPERTS) == routing.MAX_EXPERTS