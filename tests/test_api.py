"""The public verbs: example inputs from the model itself, verification, errors that say what to do."""

import dataclasses

import pytest
import torch

import switchhead
from switchhead.api import default_rtol
from zoo import NanoGPT, ZOO_BY_NAME


class SelfDescribing(NanoGPT):
    def example_inputs(self):
        return (torch.randint(0, 64, (2, 9)),)


def test_convert_without_inputs_uses_example_inputs_method():
    torch.manual_seed(0)
    model = SelfDescribing().eval()
    new = switchhead.convert(model)
    ids = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        assert switchhead.max_relative_error(model(ids), new(ids)) <= 1e-5


def test_convert_without_inputs_uses_hugging_face_dummy_inputs_and_a_mask():
    """dummy_inputs holds only input_ids; the result also takes the attention_mask a tokenizer gives."""
    model = ZOO_BY_NAME["hf_bert"].build()
    new = switchhead.convert(model)
    assert switchhead.report_of(new).verify_error <= 1e-5
    ids = torch.randint(0, 99, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        assert switchhead.max_relative_error(model(input_ids=ids), new(input_ids=ids)) <= 1e-5
        want, got = model(input_ids=ids, attention_mask=mask), new(input_ids=ids, attention_mask=mask)
    assert switchhead.max_relative_error(want, got) <= 1e-5
    assert not torch.allclose(got.last_hidden_state, new(input_ids=ids).last_hidden_state)  # the mask is used


def test_convert_without_inputs_on_a_plain_module_says_what_to_pass():
    with pytest.raises(switchhead.MissingInputsError, match=r"pass example inputs, e\.g\. convert\(model, args=\(x,\)\)"):
        switchhead.convert(NanoGPT())


def test_model_failing_on_its_inputs_is_a_capture_error():
    with pytest.raises(switchhead.CaptureError, match="fails on its example inputs"):
        switchhead.convert(NanoGPT(), (torch.randn(2, 3, 4),))


def test_verification_rejects_a_mismatch():
    case = ZOO_BY_NAME["nanogpt"]
    config = switchhead.SwitchHeadConfig(verify_rtol=1e-12)  # rounding alone exceeds this
    with pytest.raises(switchhead.VerificationError, match="differs from the original"):
        switchhead.convert(case.build(), *case.example_inputs(), config=config)


def test_verification_limit_separates_rounding_from_a_misread_head():
    """The limit grows with depth as rounding does (sqrt), while a misread head (here: two heads'
    output experts swapped) is far above it, and the error says what happened."""
    case = ZOO_BY_NAME["hf_llama_gqa"]
    model = case.build()
    args, kwargs = case.example_inputs()
    new = switchhead.convert(model, args, kwargs)
    report = switchhead.report_of(new)
    assert report.verify_rtol == pytest.approx(1e-5 * 2 ** 0.5)  # two attention layers
    assert report.verify_error <= report.verify_rtol
    assert default_rtol(torch.ones(2), 30) == pytest.approx(1e-5 * 30 ** 0.5)
    assert default_rtol(torch.ones(2, dtype=torch.bfloat16), 4) == pytest.approx(4 * torch.finfo(torch.bfloat16).eps)
    experts = new.get_parameter("model.layers.1.self_attn.o_experts")
    with torch.no_grad():
        experts[[0, 1]] = experts[[1, 0]].clone()
        misread = switchhead.relative_error(model(*args, **kwargs), new(*args, **kwargs))
    assert misread > 100 * report.verify_rtol


def test_verification_error_names_rounding_and_depth():
    case = ZOO_BY_NAME["nanogpt"]
    config = switchhead.SwitchHeadConfig(verify_rtol=1e-12)
    with pytest.raises(switchhead.VerificationError, match=r"\(\|\|a-b\|\|/\|\|a\|\|\), above the 1e-12 that rounding "
                                                       r"in float32 over 2 attention layer\(s\) explains"):
        switchhead.convert(case.build(), *case.example_inputs(), config=config)


def test_relative_error_is_a_ratio_of_norms():
    a = torch.tensor([3.0, 4.0, 0.0])
    assert switchhead.relative_error(a, a + torch.tensor([0.0, 0.0, 0.5])) == pytest.approx(0.1)
    assert switchhead.relative_error({"x": a}, {"x": a}) == 0.0
    assert switchhead.relative_error(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 0.0])) == float("inf")


def test_max_relative_error_rejects_different_structures():
    with pytest.raises(switchhead.VerificationError, match="returns"):
        switchhead.max_relative_error((torch.ones(2),), [torch.ones(2), torch.ones(2)])
    assert switchhead.max_relative_error({"a": torch.ones(3)}, {"a": torch.ones(3)}) == 0.0
    assert switchhead.max_relative_error(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 0.0])) == float("inf")


def test_module_filter_in_config_and_no_match_error():
    case = ZOO_BY_NAME["hf_t5"]
    config = switchhead.SwitchHeadConfig(module_filter=r"^decoder\..*EncDecAttention")
    new = switchhead.convert(case.build(), *case.example_inputs(), config=config)
    report = switchhead.report_of(new)
    assert [s["path"] for s in report.sites] == ["decoder.block.0.layer.1.EncDecAttention",
                                                  "decoder.block.1.layer.1.EncDecAttention"]
    assert all(s["cross"] for s in report.sites)
    with pytest.raises(switchhead.NoAttentionError, match="excluded by the filter"):
        switchhead.convert(case.build(), *case.example_inputs(), config=switchhead.SwitchHeadConfig(module_filter="nope"))


def test_report_round_trips_through_json():
    import json
    case = ZOO_BY_NAME["hf_llama_gqa"]
    new = switchhead.convert(case.build(), *case.example_inputs())
    report = json.loads(switchhead.report_of(new).to_json())
    assert report["rewrites"] == 4 and report["dynamic_shapes"] is True
    assert report["parameters_after"] > report["parameters_before"]
    assert switchhead.SwitchHeadConfig.from_dict(report["config"]) == switchhead.SwitchHeadConfig()
    assert report["sites"][0]["num_kv_heads"] == 2 and "torch" in report["versions"]


@pytest.mark.parametrize("bad,message", [
    (dict(num_experts=0), "num_experts must be a positive integer"),
    (dict(top_k=5, num_experts=4), r"top_k must be an integer in \[1, num_experts=4\]"),
    (dict(top_k=0), "top_k"),
    (dict(init="merge"), "init must be one of upcycle, random, fold"),
    (dict(num_heads=2), "num_heads changes the model's function: use init='fold'"),
    (dict(init="fold", num_heads=0), "num_heads must be a positive integer"),
    (dict(fold_qk="max"), "fold_qk must be one of mean, first, fit"),
    (dict(module_filter="("), "module_filter is not a valid regular expression"),
    (dict(init_scale=-1.0), "init_scale must be a positive number"),
    (dict(upcycle_router_scale=0.5), "upcycle_router_scale"),
    (dict(version=99), "config version 99 is not supported"),
])
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        switchhead.SwitchHeadConfig(**bad)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown SwitchHeadConfig fields: heads"):
        switchhead.SwitchHeadConfig.from_dict({"heads": 2})
    config = switchhead.SwitchHeadConfig(num_experts=8, top_k=3, init="random", seed=None)
    assert switchhead.SwitchHeadConfig.from_dict(dataclasses.asdict(config)) == config
