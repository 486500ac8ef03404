"""bench_heal's pruning baselines (benchmarks/heal/pruning.py) on tiny Hugging Face models: which
heads they keep, the equal-MAC head count, and that pruned models run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import load_benchmark
from switchhead.accounting import attention_costs, site_costs, site_geometry
from zoo import ZOO_BY_NAME

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("heal.pruning")


def _model(name: str):
    case = ZOO_BY_NAME[name]
    torch.manual_seed(0)
    return case.build(), case.example_inputs()[1]


@pytest.mark.parametrize("name", ["hf_bert", "hf_llama_gqa"])
def test_scores_pick_the_head_that_writes_most(bench, name):
    model, batch = _model(name)
    _, proj, heads, kv, dh = next(bench.attention_layers(model))
    silent = 1  # head 1 writes nothing through the output projection: its score must be 0
    with torch.no_grad():
        proj.weight[:, silent * dh:(silent + 1) * dh] = 0
    scores = next(iter(bench.head_scores(model, batch).values()))
    assert scores.shape == (heads,) and scores[silent] == 0 and (scores[torch.arange(heads) != silent] > 0).all()
    target = heads // 2 if heads // 2 in bench.valid_head_counts(heads, kv) else kv
    first = bench.prune_heads(model, target)
    best = bench.prune_heads(model, target, bench.head_scores(model, batch))
    group = heads // target
    for pruned, chosen in ((first, torch.arange(0, heads, group)),
                           (best, torch.arange(0, heads, group) + scores.view(target, group).argmax(1))):
        attn, out, count, _, _ = next(bench.attention_layers(pruned))
        name = "query" if hasattr(attn, "query") else "q_proj"
        rows = (chosen[:, None] * dh + torch.arange(dh)).flatten()
        original = getattr(next(bench.attention_layers(model))[0], name)
        assert count == target and torch.equal(getattr(attn, name).weight, original.weight[rows])
        assert torch.equal(out.weight, proj.weight[:, rows])
        output = pruned(**batch)
        assert all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor))
    assert silent not in (torch.arange(0, heads, group) + scores.view(target, group).argmax(1)).tolist()


def test_equal_mac_heads_is_the_nearest_valid_count(bench):
    # SmolLM2-135M: d=576, 9 query heads in 3 KV groups, dh=64; the fold: 3 heads, E=3, k=2
    site = {"path": "l0", "embed_dim": 576, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "out_dim": 576,
            "query_dim": 576, "cross": False}
    assert bench.valid_head_counts(9, 3) == [3, 9]
    bert = dict(site, num_heads=12, num_kv_heads=12)  # MiniLM-like: pruning drops K/V heads too, any divisor
    assert bench.equal_mac_heads(bert, 4, 3, 2, 128) in bench.valid_head_counts(12, 1)
    assert bench.valid_head_counts(12, 12) == [12] and bench.valid_head_counts(12, 1) == [1, 2, 3, 4, 6, 12]
    for seq_len in (64, 2048):
        h = bench.equal_mac_heads(site, 3, 3, 2, seq_len)
        fold = site_costs(site, 3, 2, seq_len, num_heads=3).after.macs_per_token(causal=True)
        dense = site_geometry(site)
        gap = {c: abs(attention_costs(dataclasses.replace(dense, num_heads=c), seq_len).macs_per_token(causal=True) - fold)
               for c in bench.valid_head_counts(9, 3)}
        assert gap[h] == min(gap.values())
    with pytest.raises(ValueError, match="cannot prune 6 heads"):
        bench.prune_heads(_model("hf_llama_gqa")[0], 4)
