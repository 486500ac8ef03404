"""A new head size (init="random", head_dim): every zoo model runs, trains and stays dynamic with
heads of the new size; the softmax scale and RoPE follow it (checked against a hand-built layer);
head-size terms that cannot follow it are refused; the costs use it."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import switchhead
from switchhead import accounting
from helpers import output_sum
from zoo import ZOO

NEW_PARAMS = ("experts", "router", "q_weight", "k_weight", "qk_weight", "v_rest", "_dh")


def _target(case) -> tuple[int, int]:
    """(H2, dh2): half the heads (one per KV group with GQA, 1 when H is odd), a larger head."""
    heads = case.kv_heads if case.kv_heads < case.heads else (case.heads // 2 if case.heads % 2 == 0 else 1)
    return heads, case.head_dim + 6


def _random(model, args, kwargs=None, **config):
    cfg = switchhead.SwitchHeadConfig(init="random", num_experts=3, top_k=2, **config)
    return switchhead.convert(model, args, kwargs, config=cfg)


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_new_head_size_runs_trains_and_stays_dynamic(case):
    heads, head_dim = _target(case)
    model = case.build()
    if case.head_dim_refusal:  # head-size terms that cannot follow (partial RoPE): refused, with the reason
        with pytest.raises(switchhead.ConfigMismatchError, match=case.head_dim_refusal):
            _random(model, *case.example_inputs(), num_heads=heads, head_dim=head_dim)
        return
    new = _random(model, *case.example_inputs(), num_heads=heads, head_dim=head_dim)
    report = switchhead.report_of(new)
    assert all(s["new_num_heads"] == heads and s["new_head_dim"] == head_dim for s in report.sites)
    counters = switchhead.api.pass_counters(new)["fold_heads"]
    assert counters["folded_sites"] == counters["resized_sites"] == case.sites
    kv_heads = min(case.kv_heads, heads)
    for name, param in new.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "v_experts":
            assert param.shape[0] == kv_heads and param.shape[1] == 3 and param.shape[3] == head_dim, name
        elif leaf == "o_experts":
            assert param.shape[:3] == (heads, 3, head_dim), name
        elif leaf == "q_weight":
            assert param.shape[0] == heads * head_dim, name
        elif leaf == "k_weight":
            assert param.shape[0] == kv_heads * head_dim, name

    old_scales = [case.head_dim ** -0.5, case.head_dim ** 0.5]  # as a factor, or as a divisor
    constants = [c for n in new.graph.nodes if n.op == "call_function" for c in (*n.args, *n.kwargs.values())
                 if isinstance(c, float)]
    assert not [c for c in constants if any(math.isclose(c, old) for old in old_scales)]  # 1/sqrt(dh) is gone

    args, kwargs = case.other_inputs()
    trainable = copy.deepcopy(new)
    out = trainable(*args, **kwargs)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    expected, actual = torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(out)
    assert [tuple(t.shape) for t in expected] == [tuple(t.shape) for t in actual]
    assert all(torch.isfinite(t).all() for t in actual if t.is_floating_point())
    output_sum(out).backward()
    new_params = [(n, p) for n, p in trainable.named_parameters() if any(k in n for k in NEW_PARAMS)]
    assert new_params
    for name, param in new_params:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ a plain pre-LN RoPE decoder


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


class RopeAttention(nn.Module):
    """Q/K/V/O linears, RoPE from an inv_freq buffer, causal attention scaled by 1/sqrt(dh): by
    SDPA's default, SDPA's scale argument, or an explicit division ('div'); optional RMS Q/K norms."""

    def __init__(self, d, heads, dh, scale="default", qk_norm=False, rope=True, base=500.0):
        super().__init__()
        self.heads, self.dh, self.scale, self.rope = heads, dh, scale, rope
        self.q, self.k, self.v = (nn.Linear(d, heads * dh, bias=False) for _ in range(3))
        self.o = nn.Linear(heads * dh, d, bias=False)
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dh, 2).float() / dh), persistent=False)
        self.q_norm = nn.Parameter(1 + 0.1 * torch.randn(dh)) if qk_norm else None
        self.k_norm = nn.Parameter(1 + 0.1 * torch.randn(dh)) if qk_norm else None

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.q_norm is not None:
            q, k = (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * w
                    for z, w in ((q, self.q_norm), (k, self.k_norm)))
        if self.rope:
            emb = torch.outer(torch.arange(t, dtype=torch.float32, device=x.device), self.inv_freq)
            emb = torch.cat((emb, emb), -1)
            q, k = (z * emb.cos() + _rotate_half(z) * emb.sin() for z in (q, k))
        if self.scale == "div":
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = (q @ k.transpose(-2, -1) / math.sqrt(self.dh)).masked_fill(~causal, float("-inf"))
            y = scores.softmax(-1) @ v
        else:
            scale = self.dh ** -0.5 if self.scale == "kwarg" else None
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class RopeDecoder(nn.Module):
    def __init__(self, d=32, heads=4, dh=8, layers=1, vocab=50, **attention):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.attns = nn.ModuleList(RopeAttention(d, heads, dh, **attention) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return self.head(x)


def _decoder(**kwargs):
    torch.manual_seed(0)
    return RopeDecoder(**kwargs).eval()


def _route(x, router, heads, top_k):
    """(expert index, gates) [N, heads, k] as the rewrite computes them."""
    logits = (x.float() @ router.float().t()).view(x.shape[0], heads, -1)
    chosen, index = logits.topk(top_k)
    return index, chosen.sigmoid()


def _reference_attention(params, x, heads, head_dim, top_k, base, qk_norm, scale=None):
    """The SwitchHead layer by hand: Q/K dense, V/O experts, RoPE at head_dim, scores scaled by
    `scale` (default 1/sqrt(head_dim))."""
    b, t, d = x.shape
    rows = x.reshape(-1, d)  # [N, d]
    q = (x @ params["q_weight"].t()).view(b, t, heads, head_dim).transpose(1, 2)
    k = (x @ params["k_weight"].t()).view(b, t, heads, head_dim).transpose(1, 2)
    index, gates = _route(rows, params["v_router"], heads, top_k)
    v = torch.ops.switchhead.expert_v(rows, params["v_experts"], None, index, gates)  # [N, H*dh]
    v = v.view(b, t, heads, head_dim).transpose(1, 2)
    if qk_norm:
        q, k = (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) for z in (q, k))  # weights restart at 1
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    emb = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    emb = torch.cat((emb, emb), -1)
    q, k = (z * emb.cos() + _rotate_half(z) * emb.sin() for z in (q, k))
    scores = q @ k.transpose(-2, -1) * (scale or head_dim ** -0.5)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, heads, head_dim)  # [N, H, dh]
    index, gates = _route(rows, params["o_router"], heads, top_k)
    return torch.ops.switchhead.expert_o(y, params["o_experts"], index, gates).view(b, t, d)


@pytest.mark.parametrize("scale,qk_norm", [("default", False), ("kwarg", True), ("div", False)])
def test_scale_rope_and_qk_norm_follow_the_new_head_size(scale, qk_norm):
    model = _decoder(scale=scale, qk_norm=qk_norm)
    idx = torch.randint(0, 50, (2, 9))
    new = _random(model, (idx,), num_heads=2, head_dim=12)
    params = {name.rsplit(".", 1)[-1]: p for name, p in new.named_parameters() if name.startswith("attns.0.")}
    buffers = dict(new.named_buffers())
    torch.testing.assert_close(buffers["attns.0.inv_freq_dh12"], 1.0 / 500.0 ** (torch.arange(0, 12, 2) / 12))
    if qk_norm:
        assert params["q_norm_dh12"].shape == (12,) and bool((params["q_norm_dh12"] == 1).all())

    other = torch.randint(0, 50, (3, 6))
    x = model.norms[0](model.emb(other))
    attention = _reference_attention(params, x, 2, 12, 2, 500.0, qk_norm)
    with torch.no_grad():
        torch.testing.assert_close(new(other), model.head(model.emb(other) + attention), rtol=1e-4, atol=1e-5)
        # the same layer at the old scale 1/sqrt(8) is clearly different: the check above can fail
        wrong = _reference_attention(params, x, 2, 12, 2, 500.0, qk_norm, scale=8 ** -0.5)
        assert not torch.allclose(new(other), model.head(model.emb(other) + wrong), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("qk_norm", [False, True])
def test_converting_on_the_gpu_matches_converting_on_the_cpu(qk_norm):
    # the rebuilt RoPE frequencies once mixed a CUDA example value with CPU tensors (e2e run, H200)
    model = _decoder(qk_norm=qk_norm)
    idx = torch.randint(0, 50, (2, 9))
    on_cpu = _random(model, (idx,), num_heads=2, head_dim=12, seed=3)
    on_gpu = _random(copy.deepcopy(model).cuda(), (idx.cuda(),), num_heads=2, head_dim=12, seed=3)
    other = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(other.cuda()).cpu(), on_cpu(other), rtol=1e-3, atol=1e-4)


def test_paper_262m_configuration_costs_follow_the_new_head_size():
    """Dense H=16, dh=64 at d=1024 -> SwitchHead H=4, E=4, k=2, dh=112 (C4 262M): the report's costs
    are the accounting formulas at the new geometry and the paper's MACs per layer (2.4G vs 5.4G)."""
    model = _decoder(d=1024, heads=16, dh=64)
    cfg = switchhead.SwitchHeadConfig(init="random", num_heads=4, num_experts=4, top_k=2, head_dim=112)
    new = switchhead.convert(model, (torch.randint(0, 50, (2, 8)),), config=cfg)
    site = switchhead.report_of(new).site_costs(512)[0]
    geometry = accounting.AttentionGeometry(d=1024, num_heads=4, head_dim=112, num_experts=4, top_k=2, kv_bytes=4)
    assert site.switchhead == geometry
    assert site.after == accounting.attention_costs(geometry, 512)
    parameters = dict(new.named_parameters())
    after = site.after
    assert parameters["attns.0.v_experts"].numel() == after.params_v == 4 * 4 * 1024 * 112
    assert parameters["attns.0.o_experts"].numel() == after.params_o
    assert parameters["attns.0.q_weight"].numel() + parameters["attns.0.k_weight"].numel() == \
        after.params_q + after.params_k
    assert parameters["attns.0.v_router"].numel() + parameters["attns.0.o_router"].numel() == after.params_routers
    xl = {"chunks": 2, "positional": True}  # the paper's Transformer-XL runs, as printed: 2.4G / 5.6M, 5.4G / 21M
    switch, dense = (accounting.dataclasses.replace(g, **xl) for g in (site.switchhead, site.dense))
    assert (round(accounting.paper_macs(switch, 512) / 1e9, 1), round(accounting.paper_memory(switch, 512) / 1e6, 1)) \
        == (2.4, 5.6)
    assert (round(accounting.paper_macs(dense, 512) / 1e9, 1), round(accounting.paper_memory(dense, 512) / 1e6)) \
        == (5.4, 21)
    table = {row[0]: row[1:] for row in switchhead.report_of(new).cost_table(512)}
    assert table["heads x head dim"] == ("16 x 64", "4 x 112, E=4, k=2", "")
    assert table["fast SDPA head size"] == ("yes", "yes", "")
    assert not any("fast SDPA" in note for note in switchhead.report_of(new).notes)
    assert table["KV cache per token"][:2] == ("8.19KB", "3.58KB")  # 2 H dh fp32 bytes: 16 x 64 -> 4 x 112


def test_47m_configuration_with_an_odd_head_size():
    """Dense H=10, dh=41 at d=412 (no RoPE: learned positions) -> H=2, E=5, k=3, dh=76."""
    model = _decoder(d=412, heads=10, dh=41, rope=False, scale="div")
    cfg = switchhead.SwitchHeadConfig(init="random", num_heads=2, num_experts=5, top_k=3, head_dim=76)
    new = switchhead.convert(model, (torch.randint(0, 50, (2, 5)),), config=cfg)
    parameters = dict(new.named_parameters())
    assert parameters["attns.0.v_experts"].shape == (2, 5, 412, 76)
    # 76 leaves the fast SDPA kernels (41 never was on them): the report says so and names the sizes near it
    report = switchhead.report_of(new)
    table = {row[0]: row[1:] for row in report.cost_table(512)}
    assert table["fast SDPA head size"] == ("no (41)", "no (76)", "")
    assert any("head size 76 is not on PyTorch's fast SDPA path" in n and "head_dim=72 or 80" in n
               for n in report.notes), report.notes
    assert parameters["attns.0.o_experts"].shape == (2, 5, 76, 412)
    assert parameters["attns.0.q_weight"].shape == (2 * 76, 412)
    divisor = next(n.args[1] for n in new.graph.nodes if n.target is torch.ops.aten.div.Tensor)
    assert divisor == pytest.approx(math.sqrt(76))
    assert new(torch.randint(0, 50, (3, 4))).shape == (3, 4, 50)


@pytest.mark.parametrize("config", [{"init": "random", "head_dim": 20}, {"init": "fold"}], ids=["random-dh20", "fold"])
def test_layer_norm_over_the_head_follows(config):
    """timm's qk_norm: LayerNorm(dh) on q and k. A new head size restarts it at weight 1, bias 0;
    folding keeps it (it normalises inside each head)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              num_heads=4, embed_dim=64, num_classes=10, qk_norm=True).eval()
    new = switchhead.convert(model, (torch.randn(2, 3, 32, 32),), config=switchhead.SwitchHeadConfig(
        num_heads=2, num_experts=2, top_k=1, **config))
    params = dict(new.named_parameters())
    if "head_dim" in config:
        assert bool((params["blocks.0.attn.q_norm.weight_dh20"] == 1).all())
        bias = params["blocks.0.attn.k_norm.bias_dh20"]
        assert bias.shape == (20,) and bool((bias == 0).all())
        assert "blocks.0.attn.q_norm.weight" not in params  # the old size's weight is gone
    else:
        assert params["blocks.0.attn.q_norm.weight"].shape == (16,)
    out = new(torch.randn(3, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (3, 10) and all(p.grad is not None for n, p in new.named_parameters() if "norm" in n)


# ------------------------------------------------------------------ refusals


class CachedRope(nn.Module):
    """RoPE from cos/sin tables cached at the old head size: nothing to rebuild them from."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        angles = torch.arange(16.0)[:, None] * torch.rand(self.dh)
        self.register_buffer("cos_cached", angles.cos())
        self.register_buffer("sin_cached", angles.sin())

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, self.dh).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        cos, sin = self.cos_cached[:t], self.sin_cached[:t]
        q, k = (z * cos + _rotate_half(z) * sin for z in (q, k))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class DoubleScaled(nn.Module):
    """q scaled by 1/sqrt(dh) before SDPA's default scale: scores / dh, not 1/sqrt(dh)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, self.dh).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        y = F.scaled_dot_product_attention(q * self.dh ** -0.5, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("module,message", [
    (CachedRope, "neither built from RoPE frequencies nor a per-dimension weight"),
    (DoubleScaled, r"scaled by head_dim\^-1, not 1/sqrt\(head_dim\)"),
])
def test_head_size_terms_that_cannot_follow_are_refused(module, message):
    torch.manual_seed(0)
    expected = f"cannot resize the heads of <root> to head_dim=12: .*{message}.*exclude this module"
    with pytest.raises(switchhead.SwitchHeadError, match=expected):
        _random(module().eval(), (torch.randn(2, 7, 32),), head_dim=12)


def test_head_dim_needs_random_init():
    with pytest.raises(ValueError, match="use init='random'"):
        switchhead.SwitchHeadConfig(init="fold", num_heads=2, head_dim=12)
    with pytest.raises(ValueError, match="use init='random'"):
        switchhead.SwitchHeadConfig(head_dim=12)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="head_dim must be a positive integer"):
            switchhead.SwitchHeadConfig(init="random", head_dim=bad)
    config = switchhead.SwitchHeadConfig(init="random", num_heads=4, head_dim=112)
    assert switchhead.SwitchHeadConfig.from_dict(config.to_dict()) == config


def test_fast_head_sizes_and_the_note():
    assert [dh for dh in (8, 12, 64, 76, 112, 128, 132, 256, 264) if accounting.fast_attention_head_dim(dh)] == \
        [8, 64, 112, 128, 256]
    assert accounting.nearest_fast_head_dims(132) == (128, 136)
    assert accounting.nearest_fast_head_dims(300) == (256,)
    assert accounting.head_dim_note(64, 112) is None
    assert accounting.head_dim_note(76, 76) is None  # kept, not chosen
    note = accounting.head_dim_note(64, 132)
    assert "head size 132" in note and "(the dense model's 64 is)" in note and "head_dim=128 or 136" in note

