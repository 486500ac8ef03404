"""Under torch.autocast the expert ops compute in the autocast dtype and keep the routing as given."""

from __future__ import annotations

import pytest
import torch
from helpers import converted, output_sum
from zoo import ZOO_BY_NAME

import switchhead


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ops_follow_the_autocast_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    n, d, h, e, k, dh = 7, 12, 3, 4, 2, 5
    x = torch.randn(n, d, requires_grad=True)
    w_v = torch.randn(h, e, d, dh, requires_grad=True)
    b_v = torch.randn(h, e, dh)
    w_o = torch.randn(h, e, dh, d, requires_grad=True)
    index = torch.rand(n, h, e).argsort(-1)[..., :k]
    gates = torch.rand(n, h, k, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        v = torch.ops.switchhead.expert_v(x, w_v, b_v, index, gates)
        o = torch.ops.switchhead.expert_o(v.view(n, h, dh), w_o, index, gates)
    assert v.dtype == dtype and o.dtype == dtype
    want = torch.ops.switchhead.expert_o(
        torch.ops.switchhead.expert_v(x.to(dtype), w_v.to(dtype), b_v.to(dtype), index, gates).view(n, h, dh),
        w_o.to(dtype), index, gates)
    assert torch.equal(o, want)
    o.float().sum().backward()
    # gradients reach the fp32 leaves in their own dtype, the gates included
    assert x.grad.dtype == w_v.grad.dtype == w_o.grad.dtype == gates.grad.dtype == torch.float32


def test_converted_model_runs_and_trains_under_autocast() -> None:
    model, new = converted("nanogpt")
    args, kwargs = ZOO_BY_NAME["nanogpt"].other_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = new(*args, **kwargs), model(*args, **kwargs)
    assert switchhead.max_relative_error(want, got) < 2e-2
    output_sum(got).backward()
    assert all(p.grad is not None for n, p in new.named_parameters() if "experts" in n or "router" in n)
    new.zero_grad(set_to_none=True)
