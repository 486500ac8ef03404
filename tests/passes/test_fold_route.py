"""fold_router="contribution": routers fitted so each token's top-k experts are the dense heads that
contributed most to it (fold_route.py), and where the fold pass applies them."""

import pytest
import torch

import switchhead
from switchhead.passes.fold_route import (LOGIT_STD, agreement, fitted_router, output_contributions,
                                          value_contributions)
from zoo import ZOO_BY_NAME


def test_contributions_are_the_norms_of_each_heads_share_of_the_output():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20, 12, generator=gen)  # 3 dense heads of size 4
    o_weight = torch.randn(5, 12, generator=gen)  # [d_out, F]
    columns = torch.arange(12).view(1, 3, 4)  # one new head whose experts are the three heads
    heads = o_weight[:, columns].permute(1, 2, 3, 0)  # [1, 3, 4, 5]
    got = output_contributions(z, columns, heads)
    for e in range(3):
        share = z[:, 4 * e:4 * e + 4] @ o_weight[:, 4 * e:4 * e + 4].T
        torch.testing.assert_close(got[:, 0, e], share.norm(dim=-1).double(), rtol=1e-5, atol=1e-6)
    x = torch.randn(20, 6, generator=gen)
    value_heads = torch.randn(1, 3, 6, 4, generator=gen)
    bias = torch.randn(1, 3, 4, generator=gen)
    got = value_contributions(x, value_heads, bias, heads)
    torch.testing.assert_close(got[:, 0, 1], ((x @ value_heads[0, 1] + bias[0, 1]) @ heads[0, 1]).norm(dim=-1).double(),
                               rtol=1e-5, atol=1e-6)


def test_a_router_that_can_express_the_order_learns_it():
    # contributions that are a log-linear function of the router input: the fit must find it
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 16, generator=gen, dtype=torch.float64)
    true = torch.randn(2 * 3, 16, generator=gen, dtype=torch.float64)
    contributions = (x @ true.T).view(500, 2, 3).exp()
    weight = fitted_router(x, contributions)
    assert weight.dtype == torch.float32 and weight.shape == (6, 16)
    assert agreement(x, weight, contributions, top_k=2) > 0.97
    assert abs(float((x @ weight.double().T).std()) - LOGIT_STD) < 1e-3
    noise = torch.rand(500, 2, 3, generator=gen, dtype=torch.float64)  # nothing to learn from x
    assert agreement(x, fitted_router(x, noise), noise, top_k=2) < 0.6


def _fold(name, **config):
    case = ZOO_BY_NAME[name]
    model = case.build()
    cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=case.heads // 2 if name != "hf_llama_gqa" else case.kv_heads,
                                      **config)
    args, kwargs = case.example_inputs()
    return case, model, switchhead.convert(model, args, kwargs, config=cfg)


@pytest.mark.parametrize("name, routers_per_site", [("hf_bert", 2), ("hf_llama_gqa", 1)])  # GQA: V experts are copies
def test_the_fold_pass_fits_the_routers_that_choose_between_heads(name, routers_per_site):
    case, _, fitted = _fold(name, top_k=1, fold_router="contribution")
    counters = switchhead.api.pass_counters(fitted)["fold_heads"]
    assert counters["contribution_routers"] == routers_per_site * case.sites
    _, _, random = _fold(name, top_k=1)
    assert "contribution_routers" not in switchhead.api.pass_counters(random)["fold_heads"]
    fitted_o = dict(fitted.named_parameters())
    random_o = dict(random.named_parameters())
    name_o = next(n for n in fitted_o if n.endswith("o_router"))
    assert float(fitted_o[name_o].detach().norm()) > 1e3 * float(random_o[name_o].detach().norm())  # logits of std 0.1, not 1e-6
    args, kwargs = case.other_inputs()
    with torch.no_grad():
        out = fitted(*args, **kwargs)
    assert all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def test_all_experts_active_keeps_the_tiny_routers():
    case = ZOO_BY_NAME["hf_bert"]
    cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=case.heads // 2, top_k=2, fold_router="contribution")
    new = switchhead.convert(case.build(), *case.example_inputs(), config=cfg)  # E = G = 2 = k: nothing to choose
    assert "contribution_routers" not in switchhead.api.pass_counters(new)["fold_heads"]
