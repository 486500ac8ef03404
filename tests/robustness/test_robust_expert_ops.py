"""Issue 9, numerical edge cases of the expert ops (torch.ops.switchhead.expert_v / expert_o on the
CPU) and of converted models: ties, skewed routing, empty experts, tiny and long sequences, half
precision routers, non-finite inputs, non-contiguous inputs."""

from __future__ import annotations

import pytest
import torch

import attention_gen as gen
import switchhead
from attention_gen import Spec

expert_v, expert_o = torch.ops.switchhead.expert_v, torch.ops.switchhead.expert_o


def loop_v(x, w, b, idx, gates):
    """Per-token oracle of expert_v: sum over the chosen (h, k) of gate * (x W + b)."""
    n, (h, _, _, dh) = x.shape[0], w.shape
    out = x.new_zeros(n, h, dh)
    for i in range(n):
        for hh in range(h):
            for j in range(idx.shape[2]):
                e = int(idx[i, hh, j])
                out[i, hh] += gates[i, hh, j].to(x.dtype) * (x[i] @ w[hh, e] + (b[hh, e] if b is not None else 0))
    return out.reshape(n, h * dh)


def loop_o(attn, w, idx, gates):
    n, h = attn.shape[:2]
    out = attn.new_zeros(n, w.shape[3])
    for i in range(n):
        for hh in range(h):
            for j in range(idx.shape[2]):
                out[i] += gates[i, hh, j].to(attn.dtype) * (attn[i, hh] @ w[hh, int(idx[i, hh, j])])
    return out


def problem(n=9, d=6, h=2, e=4, k=2, dh=3, d_out=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w_v = torch.randn(h, e, d, dh, generator=g, dtype=dtype)
    b_v = torch.randn(h, e, dh, generator=g, dtype=dtype)
    attn = torch.randn(n, h, dh, generator=g, dtype=dtype)
    w_o = torch.randn(h, e, dh, d_out, generator=g, dtype=dtype)
    idx = torch.rand(n, h, e, generator=g).argsort(-1)[..., :k].contiguous()
    gates = torch.rand(n, h, k, generator=g, dtype=torch.float32)
    return x, w_v, b_v, attn, w_o, idx, gates


def close(a, b, tol=1e-10):
    return torch.allclose(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("routing", ["all_to_expert_0", "all_to_last_k", "two_of_eight_used"])
def test_skewed_routing_matches_the_per_token_oracle_and_unused_experts_get_zero_grad(routing):
    x, w_v, b_v, attn, w_o, idx, gates = problem(e=8 if routing == "two_of_eight_used" else 4)
    e, k = w_v.shape[1], idx.shape[2]
    if routing == "all_to_expert_0":
        idx, gates = idx[..., :1].clone().zero_(), gates[..., :1].contiguous()
    elif routing == "all_to_last_k":
        idx = torch.arange(e - k, e).expand_as(idx).contiguous()
    else:
        idx = (torch.arange(idx.shape[0]).view(-1, 1, 1) + torch.arange(k)) % 2
        idx = idx.expand(-1, w_v.shape[0], -1).contiguous()
    for t in (x, w_v, b_v, attn, w_o, gates):
        t.requires_grad_(True)
    out_v, out_o = expert_v(x, w_v, b_v, idx, gates), expert_o(attn, w_o, idx, gates)
    assert close(out_v, loop_v(x, w_v, b_v, idx, gates)) and close(out_o, loop_o(attn, w_o, idx, gates))
    (out_v.sum() + out_o.sum()).backward()
    used = torch.zeros(w_v.shape[:2], dtype=torch.bool)
    used[torch.arange(w_v.shape[0]).view(1, -1, 1).expand_as(idx), idx] = True
    for grad in (w_v.grad, b_v.grad, w_o.grad):
        assert torch.isfinite(grad).all()
        assert (grad[~used] == 0).all(), "an expert no token chose received a gradient"
        assert (grad[used].abs().sum() > 0)


def test_ties_in_router_scores_choose_distinct_experts_and_keep_the_function():
    """Zeroed routers: every logit ties, top-k still picks k distinct experts, gates are all 1/2,
    and the upcycled model (identical experts) computes the original function."""
    spec = Spec(heads=2, kv_heads=1, head_dim=4, d_model=8, num_experts=4, top_k=3)
    model = gen.build(spec)
    args, kwargs = gen.inputs(spec, 2, 5)
    converted = switchhead.convert(model, args, kwargs, config=switchhead.SwitchHeadConfig(num_experts=4, top_k=3))
    with torch.no_grad():
        for name, p in converted.named_parameters():
            if name.endswith("_router"):
                p.zero_()
    logits = torch.zeros(10, 2, 4)
    chosen = logits.topk(3).indices
    assert (chosen.sort(-1).values.diff(dim=-1) > 0).all()
    for shape in ((2, 5), (3, 7)):
        a, kw = gen.inputs(spec, *shape, seed=3)
        with torch.no_grad():
            assert switchhead.max_relative_error(model(*a, **kw), converted(*a, **kw)) <= 1e-5


def test_repeated_expert_ids_in_a_row_are_summed_or_rejected():
    x, w_v, b_v, _, _, _, _ = problem()
    idx = torch.zeros(x.shape[0], 2, 2, dtype=torch.long)
    gates = torch.tensor([0.25, 0.5]).expand(x.shape[0], 2, 2).contiguous()
    try:
        out = expert_v(x, w_v, b_v, idx, gates)
    except (ValueError, RuntimeError):
        return  # rejecting repeated ids is fine
    assert close(out, loop_v(x, w_v, b_v, idx, gates))


# ----------------------------------------------------------------------------------- token counts


def test_zero_tokens_give_empty_outputs_and_grads():
    x, w_v, b_v, attn, w_o, idx, gates = problem(n=0)
    w_v.requires_grad_(True)
    w_o.requires_grad_(True)
    out_v, out_o = expert_v(x, w_v, b_v, idx, gates), expert_o(attn, w_o, idx, gates)
    assert out_v.shape == (0, w_v.shape[0] * w_v.shape[3]) and out_o.shape == (0, w_o.shape[3])
    (out_v.sum() + out_o.sum()).backward()
    assert (w_v.grad == 0).all() and (w_o.grad == 0).all()


def test_single_token_matches_the_oracle():
    x, w_v, b_v, attn, w_o, idx, gates = problem(n=1)
    assert close(expert_v(x, w_v, b_v, idx, gates), loop_v(x, w_v, b_v, idx, gates))
    assert close(expert_o(attn, w_o, idx, gates), loop_o(attn, w_o, idx, gates))


@pytest.fixture(scope="module")
def causal_gqa():
    spec = Spec(heads=4, kv_heads=2, head_dim=4, d_model=16, mask="causal_flag", extras=("rope",))
    model = gen.build(spec)
    args, kwargs = gen.inputs(spec, 2, 5)
    return spec, model, switchhead.convert(model, args, kwargs)


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 6), (4, 1), (1, gen.MAX_LEN)])
def test_converted_model_at_batch_1_and_sequence_1(causal_gqa, batch, seq):
    spec, model, converted = causal_gqa
    args, kwargs = gen.inputs(spec, batch, seq, seed=4)
    with torch.no_grad():
        assert switchhead.max_relative_error(model(*args), converted(*args)) <= 1e-5


def test_very_long_sequence_on_cpu():
    """4096 tokens through a converted causal attention (no positional table to outgrow)."""
    spec = Spec(heads=2, kv_heads=2, head_dim=4, d_model=8, proj="fused", mask="causal_flag")
    model = gen.build(spec)
    converted = switchhead.convert(model, *gen.inputs(spec, 2, 5))
    x = torch.randn(1, 4096, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert switchhead.max_relative_error(model(x), converted(x)) <= 1e-5
    n = 20_000  # and the ops on many tokens
    x, w_v, b_v, attn, w_o, idx, gates = problem(n=n, dtype=torch.float32)
    dense = torch.zeros(n, 2, 4).scatter(2, idx, gates)
    values = torch.einsum("nd,hedf->nhef", x, w_v) + b_v
    assert torch.allclose(expert_v(x, w_v, b_v, idx, gates), (values * dense[..., None]).sum(2).reshape(n, -1), atol=1e-4)


# -------------------------------------------------------------------------------- half precision


def _half(spec: Spec, dtype: torch.dtype, rtol: float):
    model = gen.build(spec).to(dtype)
    args, kwargs = gen.inputs(spec, 2, 5)
    args = tuple(a.to(dtype) for a in args)
    config = switchhead.SwitchHeadConfig(verify_rtol=rtol)
    return model, switchhead.convert(model, args, kwargs, config=config), args


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_model_converts_with_the_default_config(dtype):
    """The default verification limit follows the outputs' dtype (twice its rounding error)."""
    _, converted, _ = _half(Spec(heads=2, kv_heads=2, head_dim=4, d_model=8), dtype, None)
    report = switchhead.report_of(converted)
    assert report.verify_rtol == 2 * torch.finfo(dtype).eps and report.verify_max_error <= report.verify_rtol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_router_does_not_overflow(dtype):
    """Router logits are computed in fp32: routers scaled so that the logits are far beyond the fp16
    range still give finite outputs, equal to the same routing computed in fp32."""
    spec = Spec(heads=2, kv_heads=2, head_dim=4, d_model=8)
    model, converted, args = _half(spec, dtype, 2e-2)
    routers = {n: p for n, p in converted.named_parameters() if n.endswith("_router")}
    assert routers and all(p.dtype == torch.float32 for p in routers.values())
    x = args[0] * 50
    with torch.no_grad():
        for p in routers.values():
            p.mul_(1e9)
        logits = x.float().reshape(-1, 8) @ routers["attns.0.v_router"].t()
        assert logits.abs().max() > torch.finfo(torch.float16).max  # would overflow in fp16
        out = converted(x)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_converted_model_can_be_cast_to_half():
    spec = Spec(heads=2, kv_heads=2, head_dim=4, d_model=8)
    model = gen.build(spec)
    args, kwargs = gen.inputs(spec, 2, 5)
    converted = switchhead.convert(model, args, kwargs).half()
    with torch.no_grad():
        out = converted(args[0].half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ------------------------------------------------------------------------------ non-finite values


def test_nan_and_inf_in_tokens_stay_in_their_rows():
    x, w_v, b_v, attn, w_o, idx, gates = problem()
    x[2, 0], x[5, 1], attn[3, 1, 0], attn[6, 0, 2] = float("nan"), float("inf"), float("nan"), -float("inf")
    out_v, out_o = expert_v(x, w_v, b_v, idx, gates), expert_o(attn, w_o, idx, gates)
    assert torch.equal(torch.isfinite(out_v).all(1), torch.isfinite(x).all(1))
    assert torch.equal(torch.isfinite(out_o).all(1), torch.isfinite(attn).flatten(1).all(1))
    finite = torch.isfinite(x).all(1)
    assert close(out_v[finite], loop_v(x[finite], w_v, b_v, idx[finite], gates[finite]))


def test_a_non_finite_expert_that_no_token_chose_does_not_poison_the_output():
    x, w_v, b_v, attn, w_o, idx, gates = problem()
    idx = idx.clamp(max=2)  # expert 3 is never chosen ...
    idx = torch.stack([idx[..., 0], (idx[..., 0] + 1) % 3], -1)
    w_v[:, 3], w_o[:, 3] = float("inf"), float("nan")  # ... and is non-finite
    assert torch.isfinite(expert_v(x, w_v, b_v, idx, gates)).all()
    assert torch.isfinite(expert_o(attn, w_o, idx, gates)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_inputs_propagate_through_a_converted_model_as_in_the_original(causal_gqa, bad):
    spec, model, converted = causal_gqa
    args, _ = gen.inputs(spec, 2, 6, seed=6)
    x = args[0].clone()
    x[1, 3, 2] = bad
    with torch.no_grad():
        want, got = model(x), converted(x)
    assert torch.equal(torch.isnan(want), torch.isnan(got)) and torch.equal(torch.isinf(want), torch.isinf(got))
    assert torch.isfinite(got[0]).all(), "a non-finite token leaked into another sequence of the batch"
    assert switchhead.max_relative_error(want, got) <= 1e-5


# ------------------------------------------------------------------------------- memory layouts


def test_non_contiguous_op_inputs_give_the_contiguous_result():
    x, w_v, b_v, attn, w_o, idx, gates = problem()
    want_v, want_o = expert_v(x, w_v, b_v, idx, gates), expert_o(attn, w_o, idx, gates)
    xt = x.t().contiguous().t()  # column-major
    w_vt = w_v.transpose(2, 3).contiguous().transpose(2, 3)
    b_vs = torch.stack([b_v, b_v], -1)[..., 0]  # strided
    attn_s = torch.stack([attn, attn], 1)[:, 0]
    w_ot = w_o.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    idx_t, gates_t = idx.transpose(0, 1).contiguous().transpose(0, 1), gates.transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(t.is_contiguous() for t in (xt, w_vt, b_vs, attn_s, w_ot, idx_t, gates_t))
    assert close(expert_v(xt, w_vt, b_vs, idx_t, gates_t), want_v)
    assert close(expert_o(attn_s, w_ot, idx_t, gates_t), want_o)


def test_non_contiguous_model_inputs(causal_gqa):
    spec, model, converted = causal_gqa
    base = torch.randn(6, 3, 32, generator=torch.Generator().manual_seed(7))
    x = base.transpose(0, 1)[..., ::2]  # [3, 6, 16], neither contiguous nor dense
    assert not x.is_contiguous()
    with torch.no_grad():
        assert switchhead.max_relative_error(model(x), converted(x)) <= 1e-5
