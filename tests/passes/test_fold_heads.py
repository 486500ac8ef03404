"""Head folding on the zoo: fewer heads run, keep shapes, train, stay dynamic; H2 = H, E = 1 is exact."""

import copy

import pytest
import torch

import switchhead
from helpers import output_sum
from zoo import ZOO, ZOO_BY_NAME, zoo_params


def _fold_targets(case):
    """H/2 (1 head when H is odd) and one head per KV group (GQA models: the only valid fold of
    6 heads over 2 KV heads, since H/2 = 3 is not a multiple of the KV heads)."""
    if case.kv_heads < case.heads:
        return [case.kv_heads]
    return [case.heads // 2 if case.heads % 2 == 0 else 1]


FOLDS = [(case, heads) for case in ZOO for heads in _fold_targets(case)]


def _fold(case, num_heads, **config):
    model = case.build()
    args, kwargs = case.example_inputs()
    cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=num_heads, top_k=1, **config)
    return model, switchhead.convert(model, args, kwargs, config=cfg)


@pytest.mark.parametrize("case,num_heads", zoo_params(FOLDS, "fold"))
def test_fold_runs_with_fewer_heads_trains_and_stays_dynamic(case, num_heads):
    model, new = _fold(case, num_heads)
    report = switchhead.report_of(new)
    group = case.heads // num_heads
    for site in report.sites:
        assert site["new_num_heads"] == num_heads
        assert site["num_experts"] == group  # defaults to the group size
        assert site["new_num_kv_heads"] == (case.kv_heads if case.kv_heads < case.heads else num_heads)
    assert report.notes and "lossy" in report.notes[0]
    counters = switchhead.api.pass_counters(new)["fold_heads"]
    assert counters["folded_sites"] == case.sites and counters["resized_sites"] == 0
    # folding merges heads and never resizes them: a head size on the fast SDPA path stays on it
    report = switchhead.report_of(new)
    assert all(site["new_head_dim"] == site["head_dim"] for site in report.sites)
    assert not any("fast SDPA" in note for note in report.notes)
    assert counters["edited_ops"] >= case.sites  # at least the head view of each site
    assert sum(1 for n in new.graph.nodes if n.target is torch.ops.switchhead.expert_o.default) == case.sites
    for name, param in new.named_parameters():
        if name.endswith("o_experts"):
            assert param.shape[:2] == (num_heads, group)

    args, kwargs = case.other_inputs()
    trainable = copy.deepcopy(new)
    out = trainable(*args, **kwargs)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    expected = torch.utils._pytree.tree_leaves(ref)
    actual = torch.utils._pytree.tree_leaves(out)
    assert [tuple(t.shape) for t in expected] == [tuple(t.shape) for t in actual]
    assert all(torch.isfinite(t).all() for t in actual if t.is_floating_point())
    output_sum(out).backward()
    for name, param in trainable.named_parameters():
        if param.requires_grad and param.grad is None:
            # only weights that the output does not depend on may lack a gradient (e.g. T5's unused ones)
            assert not any(k in name for k in ("experts", "router", "folded")), name


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_fold_to_the_same_heads_with_one_expert_is_exact(case):
    model, new = _fold(case, case.heads, num_experts=1)
    report = switchhead.report_of(new)
    assert report.verify_max_error is not None and report.verify_max_error <= 1e-5
    args, kwargs = case.other_inputs()
    with torch.no_grad():
        assert switchhead.max_relative_error(model(*args, **kwargs), new(*args, **kwargs)) <= 1e-5


def test_fold_shrinks_the_attention_core_and_q_k():
    case = ZOO_BY_NAME["hf_llama_gqa"]  # 6 query heads, 2 KV heads -> one head per KV group
    _, new = _fold(case, 2)
    sdpa = [n for n in new.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 2
    params = dict(new.named_parameters())
    assert params["model.layers.0.self_attn.folded_weight"].shape == (2 * 8, 48)  # Q: 2 heads of 8
    assert params["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 48)  # K: KV heads stay
    assert params["model.layers.0.self_attn.v_experts"].shape == (2, 3, 48, 8)  # per KV head, E = 3
    assert params["model.layers.0.self_attn.o_experts"].shape == (2, 3, 8, 48)


def test_fold_with_more_experts_than_the_group_perturbs_the_copies():
    case = ZOO_BY_NAME["nanogpt"]
    _, new = _fold(case, 2, num_experts=4)
    o = dict(new.named_parameters())["blocks.0.attn.o_experts"]  # [2 heads, 4 experts, dh, d]
    assert o.shape[:2] == (2, 4)
    ratio = o[:, 2:] / o[:, :2]  # experts 2, 3 copy group members 0, 1 times (1 + noise)
    assert not torch.allclose(ratio, torch.ones_like(ratio)) and torch.allclose(ratio, torch.ones_like(ratio), atol=0.1)


def test_fold_qk_first_uses_the_first_head_of_each_group():
    case = ZOO_BY_NAME["nanogpt"]
    model, new = _fold(case, 2, fold_qk="first")
    dense = model.blocks[0]["attn"].c_attn.weight  # [3*48, 48]: Q rows 0..47 in 4 heads of 12
    folded = dict(new.named_parameters())["blocks.0.attn.v_rest_weight"]  # kept Q and K rows
    assert torch.equal(folded[:12], dense[:12]) and torch.equal(folded[12:24], dense[24:36])


def test_fold_qk_mean_averages_q_and_k_of_a_fused_projection():
    """nanoGPT's c_attn holds Q, K and V: both Q and K get their group's mean (K's columns once
    replaced Q's in the plan, so Q silently kept the first head)."""
    case = ZOO_BY_NAME["nanogpt"]
    model, new = _fold(case, 2)
    dense = model.blocks[0]["attn"].c_attn.weight.detach()  # [3*48, 48]: Q, K, V rows in 4 heads of 12
    folded = dict(new.named_parameters())["blocks.0.attn.v_rest_weight"]  # kept Q and K rows: 2 heads each
    heads = dense[:96].view(2, 2, 2, 12, 48)  # [Q/K, group, member, dh, d]
    torch.testing.assert_close(folded.detach().view(2, 2, 12, 48), heads.mean(2))


@pytest.mark.parametrize("heads", [4, 3, 1])  # not a divisor of 6; not a multiple of the 2 KV heads
@pytest.mark.parametrize("filtered, where", [
    (False, "LlamaForCausalLM's config"),  # what the config declares, checked before the capture
    (True, r"model.layers.0.self_attn \(and 1 more like it\)"),  # with a filter: the attention found
])
def test_impossible_folds_name_the_site_and_the_counts_that_fit(heads, filtered, where):
    case = ZOO_BY_NAME["hf_llama_gqa"]
    model = case.build()
    cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=heads, top_k=1)
    with pytest.raises(switchhead.ConfigMismatchError, match=rf"num_heads={heads} does not fit {where}: "
                                                            r"its 6 heads \(2 KV heads\) fold into 2, 6 heads"):
        switchhead.convert(model, *case.example_inputs(), config=cfg, filter_fn=(lambda path: True) if filtered else None)


def test_random_init_with_fewer_heads():
    case = ZOO_BY_NAME["hf_bert"]
    model = case.build()
    cfg = switchhead.SwitchHeadConfig(init="random", num_heads=2, num_experts=4, top_k=2)
    new = switchhead.convert(model, *case.example_inputs(), config=cfg)
    assert all(s["new_num_heads"] == 2 and s["num_experts"] == 4 for s in switchhead.report_of(new).sites)
    args, kwargs = case.other_inputs()
    out = new(*args, **kwargs)
    assert out.last_hidden_state.shape == (3, 5, 32)


def test_a_bf16_model_folds_into_bf16_experts():
    """The experts' noise factors are drawn in fp32: applied as such they made a bf16 model's
    experts fp32, and the folded model failed on its own inputs (found by benchmarks/bench_generate)."""
    case = ZOO_BY_NAME["nanogpt"]
    model = case.build().to(torch.bfloat16)
    args, kwargs = case.example_inputs()
    new = switchhead.convert(model, args, kwargs, switchhead.SwitchHeadConfig(init="fold", num_heads=2, num_experts=3))
    experts = {name: p.dtype for name, p in new.named_parameters() if name.endswith("_experts")}
    assert experts and set(experts.values()) == {torch.bfloat16}
    assert new(*args, **kwargs).dtype == torch.bfloat16
