"""Rewrite on the zoo: exact upcycling at two shapes, gradients everywhere, experts that diverge."""

import pytest
import torch

import switchhead
from helpers import converted, new_parameter_names, output_sum
from switchhead.inspect import expert_usage
from switchhead.passes.rewrite_experts import router_logits
from zoo import ZOO, ZOO_BY_NAME

RTOL = 1e-5


def _expert_nodes(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_upcycled_model_is_exact_at_example_and_other_shape(case):
    model, new = converted(case.name)
    report = switchhead.report_of(new)
    assert report.rewrites == 2 * case.sites
    counters = switchhead.api.pass_counters(new)
    assert counters["rewrite_experts"] == {"expert_v": case.sites, "expert_o": case.sites, "rewrites": 2 * case.sites}
    assert counters["detect_attention"] == {"sites": case.sites, "skipped": 0}
    assert counters["fold_heads"] == {}  # upcycling keeps the heads: the fold pass must not fire
    assert len(_expert_nodes(new, torch.ops.switchhead.expert_v.default)) == case.sites
    assert len(_expert_nodes(new, torch.ops.switchhead.expert_o.default)) == case.sites
    # self-attention: V and O routers share one GEMM; cross-attention routes on two inputs
    assert len(_expert_nodes(new, router_logits)) == case.sites + case.cross_sites
    assert report.verify_max_error is not None and report.verify_max_error <= RTOL
    args, kwargs = case.other_inputs()
    with torch.no_grad():
        expected, actual = model(*args, **kwargs), new(*args, **kwargs)
    assert switchhead.max_relative_error(expected, actual) <= RTOL


@pytest.mark.parametrize("name,num_experts,top_k", [("hf_llama_gqa", 4, 1), ("nanogpt", 3, 3), ("hf_gpt2", 5, 3),
                                                    ("mha_cross_seq_first", 2, 1)])
def test_upcycling_is_exact_for_any_top_k(name, num_experts, top_k):
    model, new = converted(name, num_experts, top_k)
    args, kwargs = ZOO_BY_NAME[name].other_inputs()
    with torch.no_grad():
        assert switchhead.max_relative_error(model(*args, **kwargs), new(*args, **kwargs)) <= RTOL


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_backward_reaches_every_new_parameter(case):
    _, new = converted(case.name)
    new = _fresh_copy(new)
    args, kwargs = case.other_inputs()
    output_sum(new(*args, **kwargs)).backward()
    names = new_parameter_names(new)
    assert len([n for n in names if n.endswith("v_experts")]) == case.sites
    for name in names:
        grad = new.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def _fresh_copy(gm):
    import copy
    return copy.deepcopy(gm)


def test_parameters_are_named_after_their_modules_and_dense_weights_go():
    _, llama = converted("hf_llama_gqa")
    names = dict(llama.named_parameters())
    assert names["model.layers.0.self_attn.v_experts"].shape == (2, 4, 48, 8)  # [KV heads, E, d, dh]
    assert names["model.layers.0.self_attn.o_experts"].shape == (6, 4, 8, 48)  # [heads, E, dh, d_out]
    assert names["model.layers.0.self_attn.v_router"].shape == (2 * 4, 48)
    assert names["model.layers.0.self_attn.o_router"].shape == (6 * 4, 48)
    assert "model.layers.0.self_attn.v_proj.weight" not in names
    assert "model.layers.0.self_attn.o_proj.weight" not in names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    _, gpt2 = converted("hf_gpt2")
    names = dict(gpt2.named_parameters())
    assert names["transformer.h.0.attn.v_rest_weight"].shape == (64, 32)  # Q and K columns of c_attn
    assert "transformer.h.0.attn.c_attn.weight" not in names


def test_upcycled_experts_diverge_and_use_more_than_k_experts_under_training():
    case = ZOO_BY_NAME["nanogpt"]
    model = case.build()
    (ids,), _ = case.example_inputs()
    top_k, num_experts = 2, 4
    new = switchhead.convert(model, (ids,), config=switchhead.SwitchHeadConfig(num_experts=num_experts, top_k=top_k))
    experts = {n: p for n, p in new.named_parameters() if n.endswith(("v_experts", "o_experts"))}
    assert all(torch.equal(p[:, 0], p[:, e]) for p in experts.values() for e in range(num_experts))  # copies

    batch = torch.randint(0, 64, (8, 16))
    optimizer = torch.optim.AdamW(new.parameters(), lr=1e-3)
    for _ in range(5):
        logits = new(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for name, weight in experts.items():
        spread = (weight - weight[:, :1]).abs().amax(dim=(0, 2, 3))  # per expert, vs expert 0
        assert (spread[1:] > 1e-4).all(), f"{name}: experts still identical: {spread}"
    usage = expert_usage(new, batch[:, :-1])
    assert len(usage) == 2 * case.sites
    for name, counts in usage.items():  # [heads, E]
        assert ((counts > 0).sum(-1) > top_k).all(), f"{name} uses only {counts}"


def test_random_init_follows_the_paper():
    case = ZOO_BY_NAME["hf_llama_gqa"]
    model, new = converted(case.name, init="random")
    params = dict(new.named_parameters())
    d, heads, dh, sites = 48, 6, 8, 2
    scale = 1 / sites ** 0.5
    v = params["model.layers.0.self_attn.v_experts"]
    o = params["model.layers.0.self_attn.o_experts"]
    router = params["model.layers.0.self_attn.v_router"]
    assert v.std().item() == pytest.approx(scale / d ** 0.5, rel=0.15)
    assert o.std().item() == pytest.approx(scale / (heads * dh) ** 0.5, rel=0.15)
    norms = router.norm(dim=1)
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-5)
    assert switchhead.report_of(new).verify_max_error is None  # random init is not verified
    args, kwargs = case.other_inputs()
    with torch.no_grad():
        out, ref = new(*args, **kwargs), model(*args, **kwargs)
    assert out.logits.shape == ref.logits.shape and switchhead.max_relative_error(ref, out) > 1e-3


def test_same_seed_same_weights():
    case = ZOO_BY_NAME["nanogpt"]
    first = switchhead.convert(case.build(), *case.example_inputs(), config=switchhead.SwitchHeadConfig(seed=7))
    second = switchhead.convert(case.build(), *case.example_inputs(), config=switchhead.SwitchHeadConfig(seed=7))
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _router_dtypes(module, args: tuple, kwargs: dict) -> set:
    """dtypes of what the selection ranks (its first op, isnan, sees the logits) and of the gates,
    traced under bf16 CPU autocast."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def run(args, kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(*args, **kwargs)

    graph = make_fx(run)(args, kwargs).graph
    ranked = [n.args[0].meta["val"].dtype for n in graph.nodes if n.target is torch.ops.aten.isnan.default]
    gates = [n.meta["val"].dtype for n in graph.nodes if n.target is torch.ops.aten.sigmoid.default]
    assert ranked and gates
    return set(ranked) | set(gates)


def test_routers_stay_fp32_under_autocast_also_after_save_and_load(tmp_path):
    # autocast puts linear on bf16: a plain fp32 linear in the graph would rank bf16 logits
    case = ZOO_BY_NAME["hf_llama_gqa"]
    _, new = converted(case.name)
    args, kwargs = case.example_inputs()
    switchhead.save(new, tmp_path / "out", args, kwargs)
    loaded = switchhead.load(tmp_path / "out")
    for module in (new, loaded):
        assert _router_dtypes(module, args, kwargs) == {torch.float32}
