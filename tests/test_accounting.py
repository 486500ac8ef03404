"""Cost accounting: the paper's printed MACs / memory, and hand computations for two zoo models."""

from __future__ import annotations

import dataclasses

import pytest

from switchhead.accounting import (
    AttentionGeometry,
    attention_costs,
    format_count,
    format_table,
    paper_macs,
    paper_memory,
    site_costs,
    totals,
)

# (name, d, T, C, Transformer-XL, dense H/dh, SwitchHead H/E/k/dh, printed SwitchHead MACs / memory,
#  printed dense MACs / memory or None), from switchhead.md's configuration and results tables.
PAPER_ROWS = [
    ("C4 47M", 412, 256, 2, True, (10, 41), (2, 5, 3, 76), ("203M", "0.8M"), ("453M", "3.5M")),
    ("C4 262M", 1024, 512, 2, True, (16, 64), (4, 4, 2, 112), ("2.4G", "5.6M"), ("5.4G", "21M")),
    ("Wikitext-103 262M", 1024, 512, 2, True, (16, 64), (2, 8, 4, 132), ("2.0G", "2.9M"), None),
    ("Enwik8 41M", 512, 512, 2, True, (8, 64), (2, 4, 2, 112), ("709M", "2.8M"), ("1.6G", "10M")),
    ("RoPE Wikitext-103 45M", 412, 512, 1, False, (10, 41), (2, 5, 3, 64), ("285.6M", "1.3M"), ("560.9M", "6.1M")),
]


def paper_geometries(d, C, xl, dense_hd, switch_hekd):
    H, dh = dense_hd
    sH, E, k, sdh = switch_hekd
    dense = AttentionGeometry(d=d, num_heads=H, head_dim=dh, positional=xl, chunks=C)
    return dense, dataclasses.replace(dense, num_heads=sH, num_kv_heads=sH, head_dim=sdh, num_experts=E, top_k=k)


def assert_printed(value: int, printed: str) -> None:
    """`value` rounds to `printed` (e.g. '2.4G': within half a unit of its last digit)."""
    scale = {"M": 1e6, "G": 1e9}[printed[-1]]
    digits = printed[:-1]
    half_unit = 0.5 * scale * 10.0 ** -(len(digits.split(".")[1]) if "." in digits else 0)
    assert abs(value - float(digits) * scale) <= half_unit * (1 + 1e-9), f"{value} does not print as {printed}"


@pytest.mark.parametrize("row", PAPER_ROWS, ids=[r[0] for r in PAPER_ROWS])
def test_paper_formulas_reproduce_printed_numbers(row):
    _, d, T, C, xl, dense_hd, switch_hekd, printed_switch, printed_dense = row
    dense, switch = paper_geometries(d, C, xl, dense_hd, switch_hekd)
    assert_printed(paper_macs(switch, T), printed_switch[0])
    assert_printed(paper_memory(switch, T), printed_switch[1])
    if printed_dense is not None:
        assert_printed(paper_macs(dense, T), printed_dense[0])
        assert_printed(paper_memory(dense, T), printed_dense[1])


def test_paper_formula_exact_values():
    # Enwik8 41M: d=512, T=512, C=2, SwitchHead H=2 E=4 k=2 dh=112, written out term by term.
    H, E, k, dh, d, T, C = 2, 4, 2, 112, 512, 512, 2
    switch = AttentionGeometry(d=d, num_heads=H, head_dim=dh, num_experts=E, top_k=k, positional=True, chunks=C)
    macs = H * dh * T * d * (2 * k + 2) + 2 * H * k * T * dh + 2 * H * C * T * T * dh + 2 * E * d * T * C \
        + 2 * H * T * d * dh
    assert paper_macs(switch, T) == macs == 709_296_128
    # switchhead.md's text has 2 H C T d dh here: that would print 827M, not the paper's 709M.
    assert macs + 2 * H * (C - 1) * T * d * dh == 826_736_640
    assert paper_memory(switch, T) == H * (4 * T * dh + 2 * C * T * T) + 2 * E * T * C + 2 * H * T * dh == 2_793_472
    # RoPE 45M SwitchHead: printed as 285.6M / 1.3M.
    rope = AttentionGeometry(d=412, num_heads=2, head_dim=64, num_experts=5, top_k=3)
    assert paper_macs(rope, 512) == 285_618_176
    assert paper_memory(rope, 512) == 1_315_840


@pytest.mark.parametrize("row", PAPER_ROWS, ids=[r[0] for r in PAPER_ROWS])
def test_component_accounting_matches_paper_up_to_documented_terms(row):
    _, d, T, C, xl, dense_hd, switch_hekd, _, _ = row
    dense, switch = paper_geometries(d, C, xl, dense_hd, switch_hekd)
    costs = attention_costs(dense, T)
    assert costs.macs() == paper_macs(dense, T)
    assert costs.memory_floats == paper_memory(dense, T)

    H, E, dh = switch.num_heads, switch.num_experts, switch.head_dim
    costs = attention_costs(switch, T)
    # Ours: routers are d x (H E) for V and for O over T tokens; the paper counts 2 E d T C.
    router_macs = 2 * T * d * H * E - 2 * E * d * T * C
    router_floats = 2 * T * H * E - 2 * E * T * C
    # Ours: XL positional term 2 C T d H dh as for dense; the paper's SwitchHead numbers use 2 T d H dh.
    positional_macs = 2 * (C - 1) * T * d * H * dh if xl else 0
    positional_floats = 2 * (C - 1) * T * H * dh if xl else 0
    assert costs.macs() - paper_macs(switch, T) == router_macs + positional_macs
    assert costs.memory_floats - paper_memory(switch, T) == router_floats + positional_floats


# Site dicts as AttentionSite.to_dict() gives them for two zoo models (see test_live_sites below).
NANOGPT_SITE = {"path": "blocks.0.attn", "num_heads": 4, "num_kv_heads": 4, "head_dim": 12, "embed_dim": 48,
                "query_dim": 48, "out_dim": 48, "cross": False}
LLAMA_SITE = {"path": "model.layers.0.self_attn", "num_heads": 6, "num_kv_heads": 2, "head_dim": 8,
              "embed_dim": 48, "query_dim": 48, "out_dim": 48, "cross": False}
T = 16


def per_token(costs):
    return {
        "proj": costs.macs_projections / T, "core": costs.macs_core / T, "causal": costs.macs_core_causal / T,
        "routers": costs.macs_routers / T, "params": costs.params, "kv": costs.kv_cache_bytes_per_token,
        "memory": costs.memory_floats,
    }


def test_nanogpt_by_hand():
    # d=48, H=Hkv=4, dh=12, T=16, bf16 cache; E=4, k=2 with unchanged heads.
    costs = site_costs(NANOGPT_SITE, num_experts=4, top_k=2, seq_len=T)
    assert per_token(costs.before) == {
        "proj": 48 * 48 + 48 * 48 + 48 * 48 + 48 * 48,  # Q, K, V, O: d x (H dh) each
        "core": 2 * T * 4 * 12,  # Q K^T and A V over all T keys
        "causal": 2 * 4 * 12 * (T * (T + 1) / 2) / T,  # query i sees i+1 keys
        "routers": 0,
        "params": 4 * 48 * 48,
        "kv": 2 * 4 * 12 * 2,  # K and V, Hkv dh elements of 2 bytes each
        "memory": 4 * T * 4 * 12 + 2 * 4 * T * T,  # Q, K, V, A V; scores and probabilities
    }
    assert per_token(costs.after) == {
        # Q, K; per head k=2 V experts (d x dh) and O experts (dh x d), each plus k dh gate scalings
        "proj": 48 * 48 + 48 * 48 + (2 * 48 * 12 + 2 * 12) * 4 + (2 * 12 * 48 + 2 * 12) * 4,
        "core": 2 * T * 4 * 12,
        "causal": 2 * 4 * 12 * (T * (T + 1) / 2) / T,
        "routers": 48 * 4 * 4 + 48 * 4 * 4,  # V: d Hkv E, O: d H E
        "params": 2 * 48 * 48 + 4 * 48 * 48 + 4 * 48 * 48 + 2 * 48 * 16,
        "kv": 2 * 4 * 12 * 2,
        "memory": 4 * T * 4 * 12 + 2 * 4 * T * T + T * 4 * (4 + 4),  # + router scores
    }
    # Folded to 2 heads (MHA: the KV heads fold too), 2 experts, top-1.
    folded = site_costs(NANOGPT_SITE, num_experts=2, top_k=1, seq_len=T, num_heads=2)
    assert folded.switchhead.num_kv_heads == 2
    assert per_token(folded.after) == {
        "proj": 48 * 24 + 48 * 24 + (48 * 12 + 12) * 2 + (12 * 48 + 12) * 2,
        "core": 2 * T * 2 * 12,
        "causal": 2 * 2 * 12 * (T * (T + 1) / 2) / T,
        "routers": 48 * 2 * 2 + 48 * 2 * 2,
        "params": 48 * 24 * 2 + 2 * 48 * 24 * 2 + 48 * 2 * 2 * 2,
        "kv": 2 * 2 * 12 * 2,
        "memory": 4 * T * 2 * 12 + 2 * 2 * T * T + T * 2 * (2 + 2),
    }


def test_llama_gqa_by_hand():
    # d=48, H=6, Hkv=2, dh=8, T=16; fold to one head per KV group (H=2), E=3 (the group), k=2.
    costs = site_costs(LLAMA_SITE, num_experts=3, top_k=2, seq_len=T, num_heads=2)
    assert costs.switchhead.num_kv_heads == 2
    assert per_token(costs.before) == {
        "proj": 48 * 48 + 48 * 16 + 48 * 16 + 48 * 48,  # Q: d H dh, K and V: d Hkv dh, O: H dh d
        "core": 2 * T * 6 * 8,
        "causal": 6 * 8 * (T + 1),
        "routers": 0,
        "params": 48 * 48 + 2 * 48 * 16 + 48 * 48,
        "kv": 2 * 2 * 8 * 2,
        "memory": 2 * T * 48 + 2 * T * 16 + 2 * 6 * T * T,  # Q and A V (H dh), K and V (Hkv dh), scores
    }
    assert per_token(costs.after) == {
        "proj": 48 * 16 + 48 * 16 + (2 * 48 * 8 + 2 * 8) * 2 + (2 * 8 * 48 + 2 * 8) * 2,
        "core": 2 * T * 2 * 8,
        "causal": 2 * 8 * (T + 1),
        "routers": 48 * 2 * 3 + 48 * 2 * 3,
        "params": 48 * 16 * 2 + 3 * 48 * 16 * 2 + 48 * 2 * 3 * 2,
        "kv": 2 * 2 * 8 * 2,
        "memory": 2 * T * 16 + 2 * T * 16 + 2 * 2 * T * T + T * 3 * (2 + 2),
    }
    # One head in all: the KV heads fold as well.
    assert site_costs(LLAMA_SITE, 6, 2, T, num_heads=1).switchhead.num_kv_heads == 1


def test_same_heads_cost_more_fewer_heads_cost_less():
    same = site_costs(LLAMA_SITE, num_experts=4, top_k=2, seq_len=512)
    assert same.after.macs() > same.before.macs()
    fewer = site_costs(LLAMA_SITE, num_experts=3, top_k=1, seq_len=512, num_heads=2)
    assert fewer.after.macs() < fewer.before.macs()
    assert fewer.after.memory_floats < fewer.before.memory_floats


def test_cross_attention_is_not_causal_and_uses_source_length():
    site = {**NANOGPT_SITE, "cross": True, "query_dim": 32}
    costs = site_costs(site, 4, 2, seq_len=T, source_len=20)
    assert costs.before.macs_core_causal == costs.before.macs_core == 2 * 4 * 12 * T * 20
    assert costs.before.macs_q == T * 32 * 48 and costs.before.macs_k == 20 * 48 * 48
    assert costs.after.macs_routers == 4 * (20 * 48 * 4 + T * 32 * 4)


def test_totals_and_table():
    sites = [site_costs({**NANOGPT_SITE, "path": f"blocks.{i}.attn"}, 4, 2, T) for i in range(2)]
    before, after = totals(sites)
    assert before.macs() == 2 * sites[0].before.macs()
    assert after.params == 2 * sites[0].after.params
    rows = format_table(before, after)
    assert all(len(row) == 4 and all(isinstance(cell, str) for cell in row) for row in rows)
    by_label = {row[0]: row for row in rows}
    assert by_label["MACs/token, routers"][1:] == ("0", format_count(2 * 1536), "new")
    assert by_label["KV cache per token"][1:] == ("384B", "384B", "1.00x")
    with pytest.raises(ValueError):
        totals([])


def test_invalid_inputs():
    with pytest.raises(ValueError, match="multiple"):
        AttentionGeometry(d=48, num_heads=6, num_kv_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="top_k"):
        AttentionGeometry(d=48, num_heads=4, head_dim=8, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="seq_len"):
        attention_costs(AttentionGeometry(d=48, num_heads=4, head_dim=8), 0)
    with pytest.raises(ValueError, match="paper"):
        paper_macs(AttentionGeometry(d=48, num_heads=6, num_kv_heads=2, head_dim=8), 16)


def test_live_sites_feed_site_costs():
    import switchhead
    from zoo import ZOO_BY_NAME

    case = ZOO_BY_NAME["nanogpt"]
    args, kwargs = case.example_inputs()
    found = [site.to_dict() for site in switchhead.find_attention(case.build(), args, kwargs)]
    assert len(found) == 2
    for site in found:
        assert site_costs(site, 4, 2, T).after == site_costs(NANOGPT_SITE, 4, 2, T).after
