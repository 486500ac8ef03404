"""Both CUDA implementations of the expert ops (the dense formula and the sparse Triton kernels) and
the router selection on a GPU at the paper's sizes, against fp64 references (marked gpu)."""

from __future__ import annotations

import pytest
import torch

import switchhead.kernels  # noqa: F401  (registers the ops)
from switchhead.kernels import reference, route_triton
from switchhead.kernels.select import select_experts

from ._cases import Shape, check_routing, make_problem, rel_err

pytestmark = pytest.mark.gpu

# The paper's 262M C4, 262M Wikitext-103 and 47M shapes; N not a multiple of any block.
SHAPES = [
    Shape(4093, 1024, 4, 4, 2, 112, 1024),
    Shape(3001, 1024, 2, 8, 4, 132, 1024),
    Shape(5003, 412, 2, 5, 3, 76, 412),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def strict_fp32(monkeypatch):
    """tf32 off; every torch.empty poisoned (NaN / huge int) so unwritten outputs show."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if kwargs.get("requires_grad"):  # Inductor's pattern tracers' example inputs: leaves, left alone
            return t
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(2**30)

    monkeypatch.setattr(torch, "empty", poisoned)


def _v_o_grads(p, leaves_v, leaves_o, impl):
    v = torch.ops.switchhead.expert_v(p.x, p.w_v, p.b_v, p.expert_index, p.gates, impl)
    o = torch.ops.switchhead.expert_o(p.attn, p.w_o, p.expert_index, p.gates, impl)
    gv = torch.autograd.grad(v, leaves_v, p.grad_v)
    go = torch.autograd.grad(o, leaves_o, p.grad_o)
    return v, o, gv, go


CASES = [(s, dt) for s in SHAPES for dt in (torch.float32, torch.bfloat16)] + [(SHAPES[0], torch.float16)]
IMPLS = ("dense", "sparse")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("s", "dtype"), CASES, ids=str)
def test_forward_and_every_gradient_vs_fp64(s: Shape, dtype: torch.dtype, impl: str) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key("switchhead::expert_v", "CUDA")
    p = make_problem(s, dtype, "cuda")
    leaves_v = [p.x.requires_grad_(), p.w_v.requires_grad_(), p.b_v.requires_grad_(), p.gates.requires_grad_()]
    leaves_o = [p.attn.requires_grad_(), p.w_o.requires_grad_(), p.gates]
    v, o, gv, go = _v_o_grads(p, leaves_v, leaves_o, impl)
    d64 = lambda t: t.detach().double()  # noqa: E731
    v_args = (d64(p.x), d64(p.w_v), d64(p.b_v), p.expert_index, d64(p.gates))
    o_args = (d64(p.attn), d64(p.w_o), p.expert_index, d64(p.gates))
    errors = {
        "v": rel_err(v, reference.expert_v_reference(*v_args)),
        "o": rel_err(o, reference.expert_o_reference(*o_args)),
    }
    ref_v = reference.expert_v_backward_reference(d64(p.grad_v), *v_args)
    ref_o = reference.expert_o_backward_reference(d64(p.grad_o), *o_args)
    errors |= {f"dv/{n}": rel_err(g, r) for n, g, r in zip(("x", "w", "b", "gates"), gv, ref_v)}
    errors |= {f"do/{n}": rel_err(g, r) for n, g, r in zip(("attn", "w", "gates"), go, ref_o)}
    print(f"{s} {dtype} {impl}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    assert v.dtype == dtype and o.dtype == dtype and gv[3].dtype == torch.float32
    assert all(err < TOL[dtype] for err in errors.values()), errors


def _layer(x, w_v, b_v, w_o, expert_index, gates, impl="auto"):
    n, h, dh = x.shape[0], w_v.shape[0], w_v.shape[3]
    v = torch.ops.switchhead.expert_v(x, w_v, b_v, expert_index, gates, impl)
    return torch.ops.switchhead.expert_o(torch.tanh(v).view(n, h, dh), w_o, expert_index, gates, impl)


TRITON_KERNELS = ("_fan_out_kernel", "_fan_in_kernel", "_wgrad_kernel")


@pytest.mark.parametrize("impl", ["sparse", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_cuda_runs_the_chosen_implementation(dtype: torch.dtype, impl: str) -> None:
    """sparse: Inductor sees and schedules our Triton kernels; auto at this shape: the dense formula,
    no sparse kernel in the code. Both with no graph break, equal to eager."""
    from torch._inductor.utils import run_and_get_code

    p = make_problem(Shape(1021, 256, 4, 4, 2, 64, 256), dtype, "cuda")
    args = [p.x, p.w_v, p.b_v, p.w_o, p.expert_index, p.gates, impl]
    leaves = [p.x, p.w_v, p.b_v, p.w_o, p.gates]
    for t in leaves:
        t.requires_grad_(True)
    assert torch._dynamo.explain(_layer)(*args).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(_layer, fullgraph=True)

    def step():
        out = compiled(*args)
        return out, torch.autograd.grad(out, leaves, p.grad_o)

    (out_c, grads_c), codes = run_and_get_code(step)
    code = "\n".join(codes)
    for kernel in TRITON_KERNELS:
        assert (kernel in code) == (impl == "sparse"), f"{kernel} in Inductor's code: {kernel in code}"
    out_e = _layer(*args)
    grads_e = torch.autograd.grad(out_e, leaves, p.grad_o)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out_c, out_e) < tol
    for got, want in zip(grads_c, grads_e):
        assert rel_err(got, want) < tol


def test_export_on_cuda_keeps_the_stable_ops() -> None:
    p = make_problem(Shape(64, 32, 2, 4, 2, 16, 32), torch.float32, "cuda")

    class Layer(torch.nn.Module):
        def forward(self, x, w_v, b_v, w_o, expert_index, gates):
            return _layer(x, w_v, b_v, w_o, expert_index, gates)

    ep = torch.export.export(Layer(), (p.x, p.w_v, p.b_v, p.w_o, p.expert_index, p.gates))
    targets = {str(n.target) for n in ep.graph.nodes}
    assert "switchhead.expert_v.default" in targets and "switchhead.expert_o.default" in targets, targets


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_cuda(impl: str) -> None:
    p = make_problem(Shape(301, 96, 2, 4, 2, 32, 80), torch.float32, "cuda")
    for t in (p.x, p.w_v, p.b_v, p.gates, p.attn, p.w_o):
        t.requires_grad_(True)
    for op, args in (
        (torch.ops.switchhead.expert_v.default, (p.x, p.w_v, p.b_v, p.expert_index, p.gates, impl)),
        (torch.ops.switchhead.expert_v.default, (p.x, p.w_v, None, p.expert_index, p.gates, impl)),
        (torch.ops.switchhead.expert_o.default, (p.attn, p.w_o, p.expert_index, p.gates, impl)),
    ):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(("n", "h", "e", "k"), [(4093, 4, 4, 2), (3001, 2, 8, 4), (65543, 8, 8, 3), (70001, 4, 5, 1)],
                         ids=str)
def test_triton_routing_vs_stable_torch_sorts(n: int, h: int, e: int, k: int) -> None:
    """The three routing launches at real sizes (default 1024-token blocks, many of them) against
    stable torch sorts; a second call is bitwise identical."""
    gen = torch.Generator().manual_seed(n)
    idx = torch.rand(n, h, e, generator=gen).topk(k, dim=-1).indices.cuda()
    gates = torch.rand(n, h, k, generator=gen).cuda()
    r = route_triton.route(idx, gates, e, head=True, sig=True, groups=True)
    check_routing(r, idx, gates, e, route_triton.RouteConfig().block)
    again = route_triton.route(idx, gates, e, head=True, sig=True, groups=True)
    for name in ("table", "bits", "head_order", "sig_order", "tokens", "sorted_gates", "offsets"):
        assert torch.equal(getattr(r, name), getattr(again, name)), name


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward_bitwise_reproducible(impl: str) -> None:
    """Outputs, input and weight gradients are bitwise the same on a second run (gate gradients of
    several column blocks are fp32 atomics: equal to 1e-6 only)."""
    p = make_problem(SHAPES[0], torch.bfloat16, "cuda", seed=1)
    leaves = [p.x.requires_grad_(), p.w_v.requires_grad_(), p.b_v.requires_grad_(), p.attn.requires_grad_(),
              p.w_o.requires_grad_(), p.gates.requires_grad_()]

    def run():
        v = torch.ops.switchhead.expert_v(p.x, p.w_v, p.b_v, p.expert_index, p.gates, impl)
        o = torch.ops.switchhead.expert_o(p.attn, p.w_o, p.expert_index, p.gates, impl)
        return (v, o, *torch.autograd.grad((v * p.grad_v).sum() + (o * p.grad_o).sum(), leaves))

    first, second = run(), run()
    for name, a, b in zip(("v", "o", "x", "w_v", "b_v", "attn", "w_o"), first, second):
        assert torch.equal(a, b), name
    assert rel_err(second[-1], first[-1]) < 1e-6


@pytest.mark.parametrize(("n", "h", "e", "k"), [(65543, 4, 4, 2), (16411, 2, 8, 4), (4093, 3, 16, 5)], ids=str)
def test_selection_on_cuda_eager_and_compiled(n: int, h: int, e: int, k: int) -> None:
    """select_experts on the GPU: torch.topk's chosen logits, experts in stable descending order (ties
    to the lower index), eager and compiled into one kernel alike."""
    gen = torch.Generator().manual_seed(n)
    for logits in (torch.randint(-2, 3, (n, h, e), generator=gen).float().cuda(),
                   torch.randn(n, h, e, generator=gen).cuda()):
        ref = torch.sort(logits, dim=-1, descending=True, stable=True)
        for fn in (select_experts, torch.compile(select_experts, fullgraph=True)):
            index, gates = fn(logits, k)
            assert torch.equal(index, ref.indices[..., :k])
            torch.testing.assert_close(gates, ref.values[..., :k].sigmoid(), rtol=2.4e-7, atol=0)
        assert torch.equal(logits.topk(k, dim=-1).values, ref.values[..., :k])
