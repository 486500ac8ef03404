"""Which implementation the expert ops pick (kernels/choice.py), and the `impl` argument of the ops."""

from __future__ import annotations

import pytest
import torch

import switchhead
from switchhead.kernels import choice, reference
from switchhead.kernels.routing import MAX_EXPERTS

from ._cases import Shape, make_problem

# (d, H, E, k, dh) of the paper's and the fold shapes of BENCHMARKS.md "Kernels"
PAPER = {"262M": (1024, 4, 4, 2, 112), "262M-Wt103": (1024, 2, 8, 4, 132), "47M": (412, 2, 5, 3, 76),
         "SmolLM2 fold": (576, 3, 3, 2, 64), "Llama-1B fold": (2048, 8, 4, 2, 64)}


def pick(op: str, shape: tuple[int, ...], impl: str = "auto", device_type: str = "cuda") -> str:
    d, h, e, k, dh = shape
    return choice.choose_impl(op, impl, device_type=device_type, d=d, heads=h, experts=e, top_k=k, head_dim=dh)


def test_auto_follows_the_measured_table() -> None:
    # sparse only where measured faster: the V forward at the 262M shape
    assert pick("expert_v", PAPER["262M"]) == "sparse"
    for name, shape in PAPER.items():
        for op in choice.OPS:
            if (name, op) != ("262M", "expert_v"):
                assert pick(op, shape) == "dense", (name, op)
    assert pick("expert_v", (1024, 4, 8, 2, 112)) == "dense"  # an unmeasured shape: the dense formula


def test_a_differentiated_call_runs_the_dense_formula() -> None:
    d, h, e, k, dh = PAPER["262M"]
    assert choice.choose_impl("expert_v", "auto", device_type="cuda", d=d, heads=h, experts=e, top_k=k,
                              head_dim=dh, training=True) == "dense"
    assert choice.choose_impl("expert_v", "sparse", device_type="cuda", d=d, heads=h, experts=e, top_k=k,
                              head_dim=dh, training=True) == "sparse"


_SEEN: list[bool] = []  # what the probe op saw: its activation's requires_grad, per call


@torch.library.custom_op("switchhead_test_probe::mm", mutates_args=())
def _probe_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    _SEEN.append(x.requires_grad)
    return x @ w


_probe_mm.register_fake(lambda x, w: x.new_empty(x.shape[0], w.shape[1]))
_probe_mm.register_autograd(lambda ctx, g: (g @ ctx.w.t(), ctx.x.t() @ g),
                            setup_context=lambda ctx, inputs, output: ctx.__dict__.update(x=inputs[0], w=inputs[1]))


def _probe_rule(mode, op, types, args, kwargs):
    _SEEN.append(args[0].requires_grad)
    with mode:
        return args[0] @ args[1]


def test_requires_grad_tells_training_from_inference_in_eager_and_under_aot_tracing() -> None:
    """The CUDA dispatch (triton_ops._differentiated) reads the activations' requires_grad inside the op's
    kernel and inside a FunctionalTensorMode rule; a probe op with both shows what they see."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    _probe_mm.register_torch_dispatch(FunctionalTensorMode, _probe_rule)
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)

    def layer(x):
        return _probe_mm(torch.relu(x), w).sum()

    for run in (layer, torch.compile(layer, backend="aot_eager")):
        _SEEN.clear()
        run(x).backward()
        assert _SEEN and all(_SEEN), _SEEN  # training: the activation requires grad
        _SEEN.clear()
        with torch.no_grad():
            run(x)
        assert _SEEN and not any(_SEEN), _SEEN  # inference: it does not, though w does
        torch._dynamo.reset()


def test_cpu_and_many_experts_are_always_dense() -> None:
    for impl in choice.IMPLS:
        assert pick("expert_v", PAPER["262M"], impl, device_type="cpu") == "dense"
    assert pick("expert_o", (1024, 2, MAX_EXPERTS + 1, 2, 64), "sparse") == "dense"


def test_an_explicit_choice_wins_on_cuda() -> None:
    assert pick("expert_o", PAPER["262M"], "sparse") == "sparse"
    assert pick("expert_v", PAPER["262M"], "dense") == "dense"


def test_unknown_impl_is_refused_by_the_op_and_the_config() -> None:
    p = make_problem(Shape(7, 8, 2, 3, 2, 4, 8), torch.float32, seed=0)
    with pytest.raises(ValueError, match="impl must be one of auto, dense, sparse"):
        torch.ops.switchhead.expert_o(p.attn, p.w_o, p.expert_index, p.gates, "fast")
    with pytest.raises(ValueError, match="expert_impl must be one of auto, dense, sparse"):
        switchhead.SwitchHeadConfig(expert_impl="fast")


@pytest.mark.parametrize("impl", choice.IMPLS)
def test_every_impl_computes_the_reference_on_cpu_with_gradients(impl: str) -> None:
    p = make_problem(Shape(29, 16, 3, 4, 2, 8, 12), torch.float64, seed=1)
    leaves = [p.x.requires_grad_(), p.w_v.requires_grad_(), p.gates.requires_grad_()]
    v = torch.ops.switchhead.expert_v(p.x, p.w_v, None, p.expert_index, p.gates, impl)
    torch.testing.assert_close(v, reference.expert_v_reference(p.x, p.w_v, None, p.expert_index, p.gates))
    grads = torch.autograd.grad(v, leaves, p.grad_v)
    ref = reference.expert_v_backward_reference(p.grad_v, p.x, p.w_v, None, p.expert_index, p.gates)
    for got, want in zip(grads, (ref[0], ref[1], ref[3])):
        torch.testing.assert_close(got, want)
    o = torch.ops.switchhead.expert_o(p.attn, p.w_o, p.expert_index, p.gates, impl=impl)
    torch.testing.assert_close(o, reference.expert_o_reference(p.attn, p.w_o, p.expert_index, p.gates))
