"""Capture (issue 19, issue 23): only batch / sequence dims are dynamic, size-1 example dims are
widened so they stay dynamic, the report names the dynamic dims exactly, inert autocast regions are
inlined and the others kept."""

from __future__ import annotations

import torch
import torch.nn as nn

import switchhead
from switchhead.capture import export_dynamic, inline_inert_autocast, varying_dims
from zoo import ZOO_BY_NAME


def test_varying_dims_by_what_a_tensor_holds():
    ids = torch.zeros(2, 7, dtype=torch.long)
    features = torch.zeros(2, 7, 32)
    image = torch.zeros(2, 3, 32, 32)
    additive_mask = torch.zeros(2, 1, 7, 9)
    memory = torch.zeros(2, 9, 32)
    assert varying_dims([ids, features, image, additive_mask, memory]) == [[0, 1], [0, 1], [0], [0, 2, 3], [0, 1]]
    assert varying_dims([torch.zeros(4)]) == [[0]]


def test_batch_1_example_gives_a_model_for_any_batch_and_the_report_says_so():
    case = ZOO_BY_NAME["timm_vit"]
    model = case.build()
    new = switchhead.convert(model, *case.inputs(1, 7))
    report = switchhead.report_of(new)
    assert report.dynamic_shapes and report.dynamic_dims == {"x": [0]}  # the image size is fixed
    assert report.widened == ["x dim 0: 1 -> 2"]
    for batch in (1, 2, 5):
        (x,), _ = case.inputs(batch, 7)
        with torch.no_grad():
            assert switchhead.max_relative_error(model(x), new(x)) <= 1e-5


def test_length_1_example_keeps_the_sequence_dynamic():
    case = ZOO_BY_NAME["hf_gpt2"]
    model = case.build()
    new = switchhead.convert(model, *case.inputs(1, 1))
    report = switchhead.report_of(new)
    assert report.dynamic_dims == {"input_ids": [0, 1]}
    assert report.widened == ["input_ids dim 0: 1 -> 2", "input_ids dim 1: 1 -> 2"]
    _, kwargs = case.inputs(3, 6)
    with torch.no_grad():
        assert switchhead.max_relative_error(model(**kwargs), new(**kwargs)) <= 1e-5


class FixedLength(nn.Module):
    """Attention over a learned positional table added whole: the length is fixed at 5."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, 16))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        x = x + self.pos
        return self.attn(x, x, x, need_weights=False)[0]


def test_report_names_only_the_dims_that_stayed_dynamic(tmp_path):
    model = FixedLength().eval()
    new = switchhead.convert(model, (torch.randn(1, 5, 16),))
    report = switchhead.report_of(new)
    assert report.dynamic_dims == {"x": [0]}  # the length is not claimed dynamic
    saved = switchhead.load(switchhead.save(new, tmp_path / "out", (torch.randn(1, 5, 16),)))
    x = torch.randn(3, 5, 16)  # a batch-1 example saves a model that takes batch 3
    with torch.no_grad():
        assert switchhead.max_relative_error(model(x), saved(x)) <= 1e-5


def test_a_dim_the_model_cannot_widen_stays_static_with_the_reason():
    class Broadcast(nn.Module):  # the mask's dim 1 broadcasts over the heads: it cannot be 2
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x, mask):
            b, t, _ = x.shape
            return self.attn(x, x, x, attn_mask=mask.expand(b, 4, t, t).reshape(b * 4, t, t), need_weights=False)[0]

    model = Broadcast().eval()
    x, mask = torch.randn(1, 6, 16), torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    exported = export_dynamic(model, (x, mask), {})
    assert exported.widened == ("x dim 0: 1 -> 2", "mask dim 0: 1 -> 2")  # the batch only, after a refusal
    assert "mask dim 1" in exported.not_widened
    assert exported.dynamic_dims["x"] == [0, 1]


def test_user_dynamic_shapes_replace_the_automatic_choice():
    case = ZOO_BY_NAME["nanogpt"]
    batch = torch.export.Dim("batch")
    new = switchhead.convert(case.build(), *case.example_inputs(), dynamic_shapes={"idx": {0: batch}})
    assert switchhead.report_of(new).dynamic_dims == {"idx": [0]}


class DisabledAutocast(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            y = x * 2.0 + 1.0  # autocast leaves these alone: inlined
        with torch.autocast("cpu", enabled=False):
            z = self.lin(y)  # a linear autocast would recast: the region stays
        return z


def test_only_inert_autocast_regions_are_inlined():
    model = DisabledAutocast()
    gm = torch.export.export(model, (torch.randn(2, 4),), strict=False).module()
    regions = lambda: [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.wrap_with_autocast]  # noqa: E731
    assert len(regions()) == 2
    inline_inert_autocast(gm)
    assert len(regions()) == 1
    x = torch.randn(2, 4)  # exported static
    assert torch.allclose(gm(x), model(x))
