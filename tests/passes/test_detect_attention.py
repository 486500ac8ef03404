"""Detection on the zoo: every attention found with the right shape, nothing else, model untouched."""

import pytest
import torch
import torch.nn as nn

import switchhead
from zoo import ZOO


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_finds_every_attention_with_its_geometry(case):
    model = case.build()
    args, kwargs = case.example_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    analysis = switchhead.analyze(model, args, kwargs)

    assert len(analysis.sites) == case.sites, [s.reason for s in analysis.skipped]
    assert analysis.counters["detect_attention"] == {"sites": case.sites, "skipped": 0}
    assert not analysis.skipped
    assert analysis.captured.dynamic, analysis.captured.static_reason
    for site in analysis.sites:
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (case.heads, case.kv_heads, case.head_dim)
        assert site.path and site.module_type != "<root>"
        assert site.value_columns.shape == (site.num_kv_heads, site.head_dim)
        assert site.output_columns.shape == (site.num_heads, site.head_dim)
    assert sum(s.cross for s in analysis.sites) == case.cross_sites
    assert len({s.path for s in analysis.sites}) == case.sites
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_find_attention_reports_projection_styles():
    from zoo import ZOO_BY_NAME

    def styles(name):
        case = ZOO_BY_NAME[name]
        return {s.value_projection for s in switchhead.find_attention(case.build(), *case.example_inputs())}

    assert styles("hf_gpt2") == {"fused QKV addmm (Conv1D)"}
    assert styles("hf_llama_gqa") == {"separate linear (Linear)"}
    assert styles("transformer_encoder") == {"fused in-projection linear (MultiheadAttention)"}
    assert styles("nanogpt") == {"fused QKV linear (Linear)"}


class SoftmaxClassifier(nn.Module):
    """Softmax over class logits, and a mixture-of-experts router: neither is attention."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.router = nn.Linear(16, 4)
        self.experts = nn.Parameter(torch.randn(4, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.body(x))
        mixed = self.router(h).softmax(-1) @ self.experts
        return self.head(h + mixed).softmax(-1)


def test_softmax_that_is_not_attention_is_skipped_with_reason():
    analysis = switchhead.analyze(SoftmaxClassifier().eval(), (torch.randn(3, 16),))
    assert analysis.sites == []
    reasons = sorted(s.reason for s in analysis.skipped)
    assert reasons == ["softmax input is not a query-key product",
                       "softmax output does not multiply a value tensor (not attention)"]
    with pytest.raises(switchhead.NoAttentionError, match="no attention to rewrite"):
        switchhead.convert(SoftmaxClassifier().eval(), (torch.randn(3, 16),))


class NonLinearValue(nn.Module):
    """Attention whose value is not a linear map of the tokens (a GELU in between)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k = (p(x).view(b, t, 2, 8).transpose(1, 2) for p in (self.q, self.k))
        v = torch.nn.functional.gelu(self.v(x)).view(b, t, 2, 8).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, 16))


def test_value_that_is_not_a_linear_projection_is_skipped():
    analysis = switchhead.analyze(NonLinearValue().eval(), (torch.randn(2, 5, 16),))
    assert analysis.sites == []
    assert [s.reason for s in analysis.skipped] == ["value does not come from a linear projection"]


def test_filter_excludes_sites_and_reports_them():
    from zoo import ZOO_BY_NAME
    case = ZOO_BY_NAME["hf_t5"]
    analysis = switchhead.analyze(case.build(), *case.example_inputs(), filter_fn=lambda path: path.startswith("encoder."))
    assert len(analysis.sites) == 2 and all(s.path.startswith("encoder.") for s in analysis.sites)
    assert len(analysis.skipped) == 4 and {s.reason for s in analysis.skipped} == {"excluded by the filter"}


@pytest.mark.parametrize("equation,accepted", [
    ("bhqd,bhkd->bhqk", True),
    ("bhqk,bhkd->bhqd", True),
    ("bhqd,bkd->bhqk", True),  # PaLM-style MQA: the key is broadcast over the heads
    ("bhqk,bkd->bhqd", True),
    ("bgrqk,bgkd->bgrqd", True),  # GQA: KV heads g broadcast over the r query heads of each group
    ("bhqk,bkd->bqhd", False),  # output batch dims reordered
    ("bhqd,hbkd->bhqk", False),  # key batch dims in another order
    ("bkd,bhqd->bhqk", False),  # the query is the broadcast one
    ("bhqd,bhkd->bhkq", False),
    ("...qd,...kd->...qk", False),
])
def test_einsum_equations_read_as_batched_products(equation, accepted):
    from switchhead.passes.detect_attention import einsum_subscripts
    assert (einsum_subscripts(equation) is not None) == accepted
