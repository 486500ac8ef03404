"""Router selection by comparisons (kernels/select.py) against torch's sorts, ties and NaN included."""

from __future__ import annotations

import pytest
import torch

from switchhead.kernels.select import select_experts

CASES = [(e, k) for e in (1, 2, 3, 4, 5, 8, 16) for k in sorted({1, 2, (e + 1) // 2, e}) if k <= e]


@pytest.mark.parametrize(("e", "k"), CASES, ids=str)
def test_selection_is_the_stable_descending_sort(e: int, k: int) -> None:
    gen = torch.Generator().manual_seed(e * 31 + k)
    tied = torch.randint(-2, 3, (4001, 3, e), generator=gen).float()  # most rows hold ties
    distinct = torch.randn(2003, 2, e, generator=gen)
    for logits in (tied, distinct):
        index, gates = select_experts(logits, k)
        ref = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: lower index first
        assert index.dtype == torch.int64 and index.shape == (logits.shape[0], logits.shape[1], k)
        assert torch.equal(index, ref.indices[..., :k])
        # sigmoid's vector and scalar CPU paths may differ in the last bit: compare to one ulp
        torch.testing.assert_close(gates, ref.values[..., :k].contiguous().sigmoid(), rtol=2.4e-7, atol=0)
        top = logits.topk(k, dim=-1)
        assert torch.equal(top.values, ref.values[..., :k])  # the same chosen logits as torch.topk ...
    assert torch.equal(select_experts(distinct, k)[0], distinct.topk(k, dim=-1).indices)  # ... and experts


def test_nan_ranks_first_as_in_topk() -> None:
    logits = torch.tensor([[[0.1, float("nan"), 0.3, float("nan"), -1.0]]])
    index, gates = select_experts(logits, 3)
    assert index.tolist() == [[[1, 3, 2]]] == logits.topk(3, dim=-1).indices.tolist()
    assert gates.isnan().tolist() == [[[True, True, False]]]


def test_gradient_reaches_the_chosen_logits_only() -> None:
    logits = torch.randn(257, 4, 6, requires_grad=True)
    _, gates = select_experts(logits, 2)
    weights = torch.randn_like(gates)
    (grad,) = torch.autograd.grad((gates * weights).sum(), logits)
    top = logits.topk(2, dim=-1)
    (ref,) = torch.autograd.grad((top.values.sigmoid() * weights).sum(), logits)
    torch.testing.assert_close(grad, ref, rtol=2.4e-7, atol=1e-9)
