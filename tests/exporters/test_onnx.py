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
from zoo import ONNX_ZOO, ZOO_BY_NAME, zoo_params

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


@pytest.mark.parametrize("case", ONNX_ZOO, ids=lambda c: c.name)
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


def _fold_heads(case) -> int:
    """The fold the pass tests use (tests/passes/test_fold_heads.py): one head per KV group for GQA/MQA,
    else H/2 (1 head when H is odd)."""
    if case.kv_heads < case.heads:
        return case.kv_heads
    return case.heads // 2 if case.heads % 2 == 0 else 1


@pytest.mark.skipif("fold" not in INIT_METHODS, reason="head folding (issue 5) is not in this build")
@pytest.mark.parametrize("case", zoo_params(ONNX_ZOO, "fold"))
def test_folded_zoo_model_exports(case, tmp_path):
    """Fewer heads, experts folded from different dense heads (so a wrong expert choice or gate shows):
    every zoo model exports, checks and matches PyTorch on its example and its other shape."""
    torch.manual_seed(0)
    original = case.build()
    args, kwargs = case.example_inputs()
    heads = _fold_heads(case)
    config = switchhead.SwitchHeadConfig(init="fold", num_heads=heads, top_k=2)
    module = switchhead.convert(original, args, kwargs, config=config)
    result = export_onnx(module, tmp_path / "folded.onnx", args, kwargs, check_inputs=case.other_inputs())

    _assert_verified(result)
    assert result.custom_nodes.get(onnx_ops.EXPERT_O) == case.sites
    assert sum(result.custom_nodes.values()) == 2 * case.sites
    assert any(isinstance(d, str) for shape in result.inputs.values() for d in shape), "no dynamic axis"
    model = onnx.load(result.path)
    o_experts = {tuple(init.dims[:2]) for init in model.graph.initializer if init.name.endswith("o_experts")}
    assert o_experts == {(heads, case.heads // heads)}, o_experts  # [H, E] of every site: heads folded


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
    result = export_onnx(module, tmp_path / "experts.onnx", _routing(19), check_inputs=(_routing(6), {}))

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
                         check_inputs=(_routing(6), {}))

    assert result.external_data and (tmp_path / "model.onnx.data").stat().st_size > 0
    _assert_verified(result)


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("over", [True, False], ids=["over_limit", "under_limit"])
def test_external_data_above_the_size_limit(over, tmp_path, monkeypatch):
    """The >2 GB path without 2 GB of weights: lower the limit below this model's weights, so the default
    (external_data=None) must move them to `<name>.data`; the pair of files still runs after a move
    (the .onnx refers to the data file by a relative name)."""
    from switchhead.exporters import onnx as onnx_exporter

    module = _Experts().eval()
    size = _weight_bytes(module)
    # (The file's initializers hold a few shape constants besides the weights: "under" keeps a margin.)
    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_BYTES", size - 1 if over else 4 * size)
    result = export_onnx(module, tmp_path / "model.onnx", _routing(19), check_inputs=(_routing(6), {}))

    _assert_verified(result)
    data = tmp_path / "model.onnx.data"
    assert result.external_data is over and data.exists() is over
    if not over:
        return
    assert data.stat().st_size >= size and result.path.stat().st_size < size  # the weights left the .onnx
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in (result.path, data):
        f.rename(moved / f.name)
    onnx.checker.check_model(str(moved / "model.onnx"), full_check=True)
    session = ort.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"])
    x, index, gates = _routing(23)
    (got,) = session.run(None, {"x": x.numpy(), "expert_index": index.numpy(), "gates": gates.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), module(x, index, gates).detach(), rtol=1e-4, atol=1e-4)


def test_custom_and_inline_forms_optimise_to_the_same_graph(tmp_path):
    """onnxruntime expands the model-local functions when it loads the model, so after its graph
    optimisations the custom-op form and the inlined form are the same graph (same kernels to run):
    the custom form costs nothing at run time (latency: benchmarks/bench_onnx.py)."""
    module = _Experts().eval()
    graphs = []
    for inline in (False, True):
        result = export_onnx(module, tmp_path / f"{inline}.onnx", _routing(19), inline=inline, verify=False,
                             optimize=True)  # the same exporter passes on both forms
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable (no NCHWc)
        options.optimized_model_filepath = str(tmp_path / f"{inline}.opt.onnx")
        ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
        graphs.append(sorted(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node))
    custom, inlined = graphs
    assert custom == inlined
    assert "MatMul" in custom and not any(op.startswith("Expert") for op in custom)


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


def test_a_forced_expert_impl_exports_the_same_custom_ops(tmp_path):
    """`expert_impl` reaches the graph's expert ops and changes nothing in ONNX."""
    case = ZOO_BY_NAME["hf_llama_gqa"]
    torch.manual_seed(0)
    model = case.build()
    config = switchhead.SwitchHeadConfig(expert_impl="sparse")
    module = switchhead.convert(model, *case.example_inputs(), config=config)
    experts = [n for n in module.graph.nodes if n.target in (torch.ops.switchhead.expert_v.default,
                                                            torch.ops.switchhead.expert_o.default)]
    assert experts and all(n.args[-1] == "sparse" for n in experts)
    result = export_onnx(module, tmp_path / "model.onnx", *case.example_inputs())
    assert result.custom_nodes.get(onnx_ops.EXPERT_O) == case.sites
    _assert_verified(result)


def test_converted_module_exports_without_inputs_and_says_what_it_does(tmp_path):
    """The converted module's own example inputs are used, and each stage is announced."""
    _, module = converted("nanogpt")
    stages: list[str] = []
    result = export_onnx(module, tmp_path / "m.onnx", progress=stages.append)
    _assert_verified(result)
    assert stages[0] == "capturing with torch.export" and stages[-1] == "running it in onnxruntime against PyTorch"
    assert any(getattr(node.target, "__name__", None) == "router_logits" for node in module.graph.nodes)  # unchanged
