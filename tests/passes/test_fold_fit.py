"""fold_qk="fit": the least-squares Q/K of a folded head against its group's mean scores (fold_fit.py),
and where the fold pass applies it."""

import pytest
import torch

import switchhead
from switchhead.passes.fold_fit import augmented, fit_group, score_error, score_gram, similar_groups
from zoo import ZOO_BY_NAME


def _group(heads: int, dh: int, dq: int, dk: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    queries = [torch.randn(dh, dq, generator=gen, dtype=torch.float64) for _ in range(heads)]
    keys = [torch.randn(dh, dk, generator=gen, dtype=torch.float64) for _ in range(heads)]
    mix = torch.randn(dq, dq, generator=gen, dtype=torch.float64)  # correlated features, as activations are
    xq = torch.randn(300, dq, generator=gen, dtype=torch.float64) @ mix
    xk = torch.randn(300, dk, generator=gen, dtype=torch.float64)
    return queries, keys, xq, xk


@pytest.mark.parametrize("heads, dh, dq, dk", [(3, 4, 12, 12), (2, 3, 9, 7), (4, 2, 16, 16)])
def test_fit_reaches_the_best_rank_dh_error_and_beats_the_mean_rows(heads, dh, dq, dk):
    queries, keys, xq, xk = _group(heads, dh, dq, dk, seed=heads + dh)
    a, b = fit_group(queries, keys, xq, xk)
    fitted = score_error(a, b, queries, keys, xq, xk)
    averaged = score_error(torch.stack(queries).mean(0), torch.stack(keys).mean(0), queries, keys, xq, xk)
    # Eckart-Young on the scores themselves: the best any rank-dh bilinear form can do on these tokens
    target = xq @ torch.stack([q.T @ k for q, k in zip(queries, keys)]).mean(0) @ xk.T
    s = torch.linalg.svdvals(target)
    best = float(s[dh:].square().sum().sqrt() / s.square().sum().sqrt())
    assert best <= fitted <= best * 1.001 + 1e-9
    assert fitted < averaged


def test_one_head_groups_are_reproduced_exactly_with_biases():
    queries, keys, xq, xk = _group(1, 4, 9, 9, seed=0)
    xq, xk = augmented(xq[:, :8], True), augmented(xk[:, :8], True)  # the last column: the bias
    a, b = fit_group(queries, keys, xq, xk)
    torch.testing.assert_close(a.T @ b, queries[0].T @ keys[0])


def _fold(case, num_heads, **config):
    model = case.build()
    cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=num_heads, top_k=1, fold_qk="fit", **config)
    return model, switchhead.convert(model, *case.example_inputs(), config=cfg)


@pytest.mark.parametrize("name", ["nanogpt", "hf_bert"])  # fused c_attn with biases; separate q/k/v
def test_fit_applies_without_rope_and_keeps_same_head_folds_exact(name):
    case = ZOO_BY_NAME[name]
    model, new = _fold(case, case.heads, num_experts=1)
    assert switchhead.api.pass_counters(new)["fold_heads"]["fitted_qk_sites"] == case.sites
    args, kwargs = case.other_inputs()
    with torch.no_grad():
        assert switchhead.max_relative_error(model(*args, **kwargs), new(*args, **kwargs)) <= 1e-5
    _, fewer = _fold(case, case.heads // 2)
    assert switchhead.api.pass_counters(fewer)["fold_heads"]["fitted_qk_sites"] == case.sites


def test_fit_falls_back_to_the_mean_under_rope_and_gqa():
    case = ZOO_BY_NAME["hf_llama_gqa"]  # RoPE on q and k, 6 query heads over 2 KV heads
    _, new = _fold(case, case.kv_heads)
    counters = switchhead.api.pass_counters(new)["fold_heads"]
    assert counters["folded_sites"] == case.sites and "fitted_qk_sites" not in counters


def test_similar_groups_recover_heads_whose_scores_agree():
    # heads 0/3, 1/4 and 2/5 score alike (the same Q/K rows plus small noise): consecutive groups
    # {0,1}, {2,3}, {4,5} mix them up, the local search must pair them
    gen = torch.Generator().manual_seed(3)
    base_q = [torch.randn(3, 10, generator=gen, dtype=torch.float64) for _ in range(3)]
    base_k = [torch.randn(3, 10, generator=gen, dtype=torch.float64) for _ in range(3)]
    queries = [base_q[i % 3] + 0.01 * torch.randn(3, 10, generator=gen, dtype=torch.float64) for i in range(6)]
    keys = [base_k[i % 3] + 0.01 * torch.randn(3, 10, generator=gen, dtype=torch.float64) for i in range(6)]
    x = torch.randn(200, 10, generator=gen, dtype=torch.float64)
    gram = score_gram(queries, keys, x, x)
    scores = [x @ q.T @ k @ x.T for q, k in zip(queries, keys)]
    assert torch.allclose(gram[1, 4], (scores[1] * scores[4]).sum() / 200**2, rtol=1e-3)  # S^2 = X^T X / N
    groups = similar_groups(gram, torch.arange(6).view(3, 2))
    assert groups.tolist() == [[0, 3], [1, 4], [2, 5]]


def test_similar_grouping_folds_heads_with_equal_scores_into_one_exactly():
    case = ZOO_BY_NAME["hf_bert"]  # 4 heads of 8 -> 2; heads 2 and 3 get the Q/K of heads 0 and 1
    model = case.build()
    for layer in model.encoder.layer:
        for proj in (layer.attention.self.query, layer.attention.self.key):
            with torch.no_grad():
                proj.weight[16:32] = proj.weight[0:16]
                proj.bias[16:32] = proj.bias[0:16]
    args, kwargs = case.example_inputs()
    for groups, exact in (("similar", True), ("consecutive", False)):
        cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=2, fold_qk="mean", fold_groups=groups)
        new = switchhead.convert(model, args, kwargs, config=cfg)
        query = dict(new.named_parameters())["encoder.layer.0.attention.folded_weight"]  # Q's rows (K's: _1)
        assert torch.equal(query.detach(), model.encoder.layer[0].attention.self.query.weight.detach()[:16]) == exact, groups
