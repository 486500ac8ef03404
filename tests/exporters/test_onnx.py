"""ONNX export: every zoo model (converted) exports, passes the checker and runs in stock onnxruntime
on two shapes; custom-domain nodes and their functions are there; the inline variant has none; the
expert functions compute the reference ops when the experts differ (upcycled experts are identical,
so a wrong expert choice would go unnoticed on the zoo alone)."""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from helpers import converted  # noqa: E402 (after the importorskips)
from zoo import ZOO, ZOO_BY_NAME

import switchhead
from switchhead.config import INIT_METHODS
from switchhead.exporters import onnx_ops
from switchhead.exporters.onnx import MIN_OPSET, export_onnx

RTOL = 1e-4
# A few cases cover what the extra variants add (bias / no bias, GQA, cross-attention, MHA, vision).
VARIANT_CASES = ["hf_llama_gqa", "transformer_decoder", "timm_vit"]


def _example(case_name: str):
    return ZOO_BY_NAME[case_name].example_inputs()


def _assert_verified(result, *, shapes: int = 2) -> None:
    assert len(result.verify_errors) == shapes, result.verify_errors
    assert all(error < RTOL for error in result.verify_errors.values()), result.verify_errors


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_converted_zoo_model_exports_with_custom_ops(case, tmp_path):
    _, module = converted(case.name)
    result = export_onnx(module, tmp_path / "model.onnx", *_example(case.name))

    assert sum(result.custom_nodes.values()) == switchhead.report_of(module).rewrites
    assert result.custom_nodes.get(onnx_ops.EXPERT_O) == case.sites
    _assert_verified(result)  # example inputs and a second (grown) shape
    assert any(isinstance(d, str) for shape in result.inputs.values() for d in shape), "no dynamic axis"

    model = onnx.load(result.path)
    imports = {o.domain: o.version for o in model.opset_import}
    assert imports[onnx_ops.DOMAIN] == onnx_ops.VERSION
    functions = {(f.domain, f.name): f for f in model.functions}
    assert set(functions) == {(onnx_ops.DOMAIN, op) for op in result.custom_nodes}
    for function in functions.values():
        assert {o.domain: o.version for o in function.opset_import} == imports
        assert all(node.domain == "" for node in function.node), "function bodies use standard ops only"


@pytest.mark.parametrize("name", VARIANT_CASES)
def test_inline_variant_has_only_standard_ops(name, tmp_path):
    _, module = converted(name)
    result = export_onnx(module, tmp_path / "inline.onnx", *_example(name), inline=True)

    _assert_verified(result)
    model = onnx.load(result.path)
    assert not result.custom_nodes and not model.functions
    assert {node.domain for node in model.graph.node} <= {""}
    assert onnx_ops.DOMAIN not in {o.domain for o in model.opset_import}


@pytest.mark.parametrize("name", VARIANT_CASES)
def test_dense_original_exports_side_by_side(name, tmp_path):
    original, _ = converted(name)
    result = export_onnx(original, tmp_path / "dense.onnx", *_example(name))

    _assert_verified(result)
    assert not result.custom_nodes and not result.functions


def test_random_init_experts_export(tmp_path):
    """Experts and routers differ: the functions must pick and weight the same experts as PyTorch."""
    _, module = converted("transformer_encoder", init="random")
    _assert_verified(export_onnx(module, tmp_path / "model.onnx", *_example("transformer_encoder"), inline=True))


@pytest.mark.skipif("fold" not in INIT_METHODS, reason="head folding (issue 5) is not in this build")
def test_folded_rewrite_exports(tmp_path):
    """Fewer heads, experts folded from different dense heads (GQA: 6 query / 2 KV heads -> 2 heads)."""
    original, _ = converted("hf_llama_gqa")
    args, kwargs = _example("hf_llama_gqa")
    config = switchhead.SwitchHeadConfig(init="fold", num_heads=2, top_k=2)
    module = switchhead.convert(original, args, kwargs, config=config)
    result = export_onnx(module, tmp_path / "folded.onnx", args, kwargs)

    _assert_verified(result)
    assert result.custom_nodes == {onnx_ops.EXPERT_V: 2, onnx_ops.EXPERT_O: 2}


class _Experts(torch.nn.Module):
    """Both ops on their own, at odd sizes, with routing as graph inputs."""

    def __init__(self, d=13, heads=3, experts=5, dh=7, d_out=11, bias=True):
        super().__init__()
        self.wv = torch.nn.Parameter(torch.randn(heads, experts, d, dh))
        self.bv = torch.nn.Parameter(torch.randn(heads, experts, dh)) if bias else None
        self.wo = torch.nn.Parameter(torch.randn(heads, experts, dh, d_out))

    def forward(self, x, expert_index, gates):
        v = torch.ops.switchhead.expert_v(x, self.wv, self.bv, expert_index, gates)
        return torch.ops.switchhead.expert_o(v.view(x.shape[0], self.wv.shape[0], -1), self.wo, expert_index, gates)


def _routing(n, heads=3, experts=5, k=3):
    torch.manual_seed(n)
    logits = torch.randn(n, heads, experts)
    gates, index = logits.topk(k, dim=-1)
    return torch.randn(n, 13), index, gates.sigmoid()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_expert_functions_match_reference_at_odd_sizes(bias, tmp_path):
    torch.manual_seed(0)
    module = _Experts(bias=bias).eval()
    result = export_onnx(module, tmp_path / "experts.onnx", _routing(19), verify_inputs=(_routing(6), {}))

    _assert_verified(result)
    assert result.custom_nodes == {onnx_ops.EXPERT_V_BIAS if bias else onnx_ops.EXPERT_V: 1, onnx_ops.EXPERT_O: 1}
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"],
                                   sess_options=_no_optimisations())
    x, index, gates = _routing(23)
    (got,) = session.run(None, {"x": x.numpy(), "expert_index": index.numpy(), "gates": gates.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), module(x, index, gates).detach(), rtol=1e-4, atol=1e-4)


def _no_optimisations() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def test_external_data_is_written_beside_the_model(tmp_path):
    result = export_onnx(_Experts().eval(), tmp_path / "model.onnx", _routing(19), external_data=True,
                         verify_inputs=(_routing(6), {}))

    assert result.external_data and (tmp_path / "model.onnx.data").stat().st_size > 0
    _assert_verified(result)


def test_static_export_bakes_the_example_shapes(tmp_path):
    result = export_onnx(_Experts().eval(), tmp_path / "static.onnx", _routing(19), dynamic=False)

    assert result.inputs == {"x": [19, 13], "expert_index": [19, 3, 3], "gates": [19, 3, 3]}
    _assert_verified(result, shapes=1)


def test_mismatch_is_a_one_line_verification_error(tmp_path):
    with pytest.raises(switchhead.VerificationError, match=r"differs from PyTorch by .* on the example inputs") as info:
        export_onnx(_Experts().eval(), tmp_path / "model.onnx", _routing(19), verify_rtol=1e-12)
    assert "\n" not in str(info.value)


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(ValueError, match=f">= {MIN_OPSET}"):
        export_onnx(_Experts(), tmp_path / "model.onnx", _routing(19), opset_version=MIN_OPSET - 1)


def test_inline_batch_one_export(tmp_path):
    """Batch 1 specialises the batch dim: reshape shapes become constants (a case the ONNX optimizer
    once broke by leaving a folded shape without producer)."""
    _, module = converted("nanogpt")
    args, kwargs = ZOO_BY_NAME["nanogpt"].inputs(1, 9)
    result = export_onnx(module, tmp_path / "b1.onnx", args, kwargs, inline=True)

    _assert_verified(result)
    assert not any(n.op_type == "CastLike" for n in onnx.load(result.path).graph.node), "no-op casts left"
