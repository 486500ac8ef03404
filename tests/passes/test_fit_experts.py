"""fold_vo="fit": each folded site's O experts fitted by least squares to the dense attention's output
(passes/fit_experts.py)."""

import pytest
import torch

import switchhead
from switchhead.errors import ConfigMismatchError
from switchhead.kernels.reference import expert_o_reference
from switchhead.passes.fit_experts import fitted_output_weight
from zoo import ZOO_BY_NAME
from zoo_cached import CACHED_BY_NAME


def test_the_fit_recovers_the_weights_that_made_the_output_and_keeps_unchosen_experts():
    gen = torch.Generator().manual_seed(0)
    n, heads, experts, dh, d_out = 400, 2, 3, 4, 5
    attn = torch.randn(n, heads, dh, generator=gen, dtype=torch.float64)
    true = torch.randn(heads, experts, dh, d_out, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 2, (n, heads, 1), generator=gen)  # expert 2 is never chosen
    index = torch.cat([index, 1 - index], -1)
    gates = torch.rand(n, heads, 2, generator=gen, dtype=torch.float64)
    target = expert_o_reference(attn, true, index, gates)
    start = torch.randn(heads, experts, dh, d_out, generator=gen, dtype=torch.float64)
    fitted = fitted_output_weight(attn, index, gates, target, start)
    torch.testing.assert_close(fitted[:, :2], true[:, :2], rtol=1e-2, atol=1e-2)  # the ridge pulls a little
    torch.testing.assert_close(fitted[:, 2], start[:, 2])
    torch.testing.assert_close(expert_o_reference(attn, fitted, index, gates), target, rtol=1e-2, atol=1e-2)


def _converted(name: str, **config):
    case = ZOO_BY_NAME[name]
    model = case.build()
    args, kwargs = case.inputs(8, 12)  # more example tokens than the fit's unknowns per output
    cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=case.heads // 2, top_k=1, **config)
    return case, model, (args, kwargs), switchhead.convert(model, args, kwargs, config=cfg)


@pytest.mark.parametrize("name", ["hf_bert", "nanogpt"])  # O bias / fused QKV with biases
def test_fitted_o_experts_bring_the_fold_closer_to_the_dense_model(name):
    case, model, (args, kwargs), fitted = _converted(name, fold_vo="fit")
    assert switchhead.api.pass_counters(fitted)["fit_experts"] == {"fitted_o_sites": case.sites}
    *_, copied = _converted(name)
    assert switchhead.api.pass_counters(copied)["fit_experts"] == {}
    with torch.no_grad():
        reference = model(*args, **kwargs)
        error_fit = switchhead.max_relative_error(reference, fitted(*args, **kwargs))
        error_copy = switchhead.max_relative_error(reference, copied(*args, **kwargs))
    assert error_fit < 0.7 * error_copy, (error_fit, error_copy)
    other_args, other_kwargs = case.other_inputs()  # and it still runs on other shapes
    with torch.no_grad():
        fitted(*other_args, **other_kwargs)


def test_fit_needs_a_fold_and_refuses_a_kv_cache():
    with pytest.raises(ValueError, match="fold_vo='fit' fits folded experts: it needs init='fold'"):
        switchhead.SwitchHeadConfig(fold_vo="fit")
    with pytest.raises(ConfigMismatchError, match="cannot fill a resized KV cache"):
        switchhead.convert_decoder(CACHED_BY_NAME["hf_llama"].build(),
                                   switchhead.SwitchHeadConfig(init="fold", num_heads=2, fold_vo="fit"))

