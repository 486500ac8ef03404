"""Issue 9, negative cases: softmaxes that are not rewritable attention are reported skipped, with a
reason, and never rewritten; attention whose weights are returned is either skipped or rewritten
with exactly the same returned weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import switchhead

D, H, DH, T = 16, 4, 4, 6


class Attention(nn.Module):
    """A plain eager attention; `value` replaces the value computation when given."""

    def __init__(self, value=None, returns_weights=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.value = value
        self.returns_weights = returns_weights

    def heads(self, z):
        b, t, _ = z.shape
        return z.view(b, t, H, -1).transpose(1, 2)

    def forward(self, x):
        b, t, _ = x.shape
        q, k = self.heads(self.q(x)), self.heads(self.k(x))
        v = self.heads(self.value(self, x) if self.value else self.v(x))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(DH)).softmax(-1)
        y = self.o((weights @ v).transpose(1, 2).reshape(b, t, D))
        return (y, weights) if self.returns_weights else y


def _x(batch=2, seq=T):
    return torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(batch * 100 + seq))


def _skips(model, args=None):
    analysis = switchhead.analyze(model, args or (_x(),))
    return analysis.sites, [(s.op, s.reason) for s in analysis.skipped]


def _assert_not_rewritten(model, reason_fragment: str, args=None, convert: bool = False):
    """No site; each softmax/SDPA skipped with a reason; with `convert`, convert refuses with it."""
    sites, skipped = _skips(model, args)
    assert not sites, [s.path for s in sites]
    assert skipped and all(reason for _, reason in skipped)
    assert any(reason_fragment in reason for _, reason in skipped), skipped
    if convert:
        with pytest.raises(switchhead.NoAttentionError, match=reason_fragment):
            switchhead.convert(model, args or (_x(),))


# ----------------------------------------------------------------------- classification and routers


class ClassifierHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(D, D), nn.Linear(D, 5)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)).mean(1)).softmax(-1)


class SoftmaxRouterMoE(nn.Module):
    """A token-choice MoE layer with a softmax router: the weights mix expert outputs of the token."""

    def __init__(self, experts=4):
        super().__init__()
        self.router = nn.Linear(D, experts)
        self.experts = nn.Linear(D, experts * D)

    def forward(self, x):
        b, t, _ = x.shape
        gates = self.router(x).softmax(-1).unsqueeze(-2)  # [B, T, 1, E]
        outs = self.experts(x).view(b, t, -1, D)  # [B, T, E, D]
        return (gates @ outs).squeeze(-2)


class SoftmaxRouterMoE4D(nn.Module):
    """The same router written so that the softmax input and output are 4-D and the product is a
    matmul of the softmax output: shaped like attention, but the 'keys' are a parameter."""

    def __init__(self, experts=4):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(experts, D))
        self.experts = nn.Linear(D, experts * D)

    def forward(self, x):
        b, t, _ = x.shape
        logits = x.unsqueeze(-2) @ self.keys.t()  # [B, T, 1, E]
        outs = self.experts(x).view(b, t, -1, D)  # [B, T, E, D]
        return (logits.softmax(-1) @ outs).squeeze(-2)


class LearnedMemorySlots(nn.Module):
    """Attention over learned memory slots (keys and values are parameters, not token projections)."""

    def __init__(self, slots=8):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.keys = nn.Parameter(torch.randn(H, slots, DH))
        self.values = nn.Parameter(torch.randn(H, slots, DH))
        self.o = nn.Linear(D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, DH).transpose(1, 2)
        y = (q @ self.keys.transpose(-2, -1)).softmax(-1) @ self.values
        return self.o(y.transpose(1, 2).reshape(b, t, D))


def test_classification_softmax_is_not_attention():
    _assert_not_rewritten(ClassifierHead(), "not attention", convert=True)


@pytest.mark.parametrize("router", [SoftmaxRouterMoE, SoftmaxRouterMoE4D], ids=["unsqueezed", "4d"])
def test_softmax_router_is_not_attention(router):
    _assert_not_rewritten(router(), "")


def test_attention_over_learned_memory_slots_is_not_rewritten():
    _assert_not_rewritten(LearnedMemorySlots(), "does not come from a linear projection")


def test_classifier_next_to_attention_is_skipped_and_attention_rewritten():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.cls = Attention(), ClassifierHead()

        def forward(self, x):
            return self.cls(x + self.attn(x))

    torch.manual_seed(0)
    model = Model().eval()
    converted = switchhead.convert(model, (_x(),))
    report = switchhead.report_of(converted)
    assert [s["path"] for s in report.sites] == ["attn"]
    assert [s["path"] for s in report.skipped] == ["cls"] and report.skipped[0]["reason"]
    other = _x(3, 9)
    assert switchhead.max_relative_error(model(other), converted(other)) <= 1e-5


# --------------------------------------------------------------------------- V not a linear map


def _value_variants():
    conv = nn.Conv1d(D, D, kernel_size=3, padding=1)  # mixes neighbouring tokens
    return {
        "gelu_of_linear": lambda m, x: F.gelu(m.v(x)),
        "raw_input": lambda m, x: x,
        "token_mixing_conv": lambda m, x: conv(x.transpose(1, 2)).transpose(1, 2),
        "cumsum_over_tokens": lambda m, x: m.v(x).cumsum(1),
        "input_dependent_weight": lambda m, x: x @ (x.mean(1, keepdim=True).transpose(1, 2) @ x.mean(1, keepdim=True)),
        "linear_plus_lora": lambda m, x: m.v(x) + 0.1 * m.k(m.q(x)),
        "gated_linear": lambda m, x: m.v(x) * torch.sigmoid(m.k(x)),
    }


@pytest.mark.parametrize("name", sorted(_value_variants()))
def test_value_that_is_not_a_linear_map_is_not_rewritten(name):
    torch.manual_seed(0)
    model = Attention(value=_value_variants()[name]).eval()
    _assert_not_rewritten(model, "value")


# ----------------------------------------------------------------------- weights returned / reused


def test_returned_attention_weights_are_unchanged_by_the_rewrite():
    torch.manual_seed(0)
    model = Attention(returns_weights=True).eval()
    converted = switchhead.convert(model, (_x(),))
    for x in (_x(), _x(3, 9)):
        (y0, w0), (y1, w1) = model(x), converted(x)
        assert torch.equal(w0, w1), "the rewrite changed the attention weights the model returns"
        assert switchhead.max_relative_error(y0, y1) <= 1e-5


class WeightsReused(nn.Module):
    """The attention weights also multiply a second tensor (e.g. to pool positions)."""

    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.pos = nn.Linear(D, D)

    def forward(self, x):
        a = self.attn
        b, t, _ = x.shape
        q, k, v = a.heads(a.q(x)), a.heads(a.k(x)), a.heads(a.v(x))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(DH)).softmax(-1)
        y = a.o((weights @ v).transpose(1, 2).reshape(b, t, D))
        pooled = weights @ a.heads(self.pos(x))
        return y + pooled.transpose(1, 2).reshape(b, t, D)


def test_weights_reused_for_a_second_product_are_skipped_or_exact():
    torch.manual_seed(0)
    model = WeightsReused().eval()
    sites, skipped = _skips(model)
    if sites:  # allowed only if the function stays the same everywhere
        converted = switchhead.convert(model, (_x(),))
        assert switchhead.max_relative_error(model(_x(3, 9)), converted(_x(3, 9))) <= 1e-5
    else:
        assert skipped and all(reason for _, reason in skipped)


class SharedValueTwoCores(nn.Module):
    """One V projection read by two different attention cores (two query sets)."""

    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.q2, self.o2 = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        a = self.attn
        b, t, _ = x.shape
        k, v = a.heads(a.k(x)), a.heads(a.v(x))
        outs = []
        for q_proj, o_proj in ((a.q, a.o), (self.q2, self.o2)):
            q = a.heads(q_proj(x))
            w = (q @ k.transpose(-2, -1) / math.sqrt(DH)).softmax(-1)
            outs.append(o_proj((w @ v).transpose(1, 2).reshape(b, t, D)))
        return outs[0] + outs[1]


def test_value_projection_shared_by_two_cores_is_rewritten_once_and_exact():
    torch.manual_seed(0)
    model = SharedValueTwoCores().eval()
    converted = switchhead.convert(model, (_x(),))
    report = switchhead.report_of(converted)
    assert len(report.sites) == 1 and len(report.skipped) == 1
    assert "another attention" in report.skipped[0]["reason"]
    assert switchhead.max_relative_error(model(_x(3, 9)), converted(_x(3, 9))) <= 1e-5
