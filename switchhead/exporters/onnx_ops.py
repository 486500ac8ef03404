"""The `ai.switchhead` ONNX domain: how the two expert ops become ONNX nodes, and their function bodies.

Each `torch.ops.switchhead.*` node becomes one custom-domain node (so a runtime with a fused kernel
can recognise it), and the model carries a model-local FunctionProto per op type whose body is
standard ONNX ops (so a stock runtime expands it and runs the model with no plugin). The spec is
docs/onnx-ops.md; the bodies below follow the PyTorch reference (switchhead/kernels/reference.py):
expand the routing choice into dense gates G [N, H, E] and compute every expert (E/k times the FLOPs
of a gathered kernel, but a handful of stock ops that every runtime has).

Shape legend: N tokens, d width, H heads, E experts per head, k active, dh head size, d_out width.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx import helper
from onnxscript import FLOAT, INT64

DOMAIN = "ai.switchhead"
VERSION = 1
EXPERT_V, EXPERT_V_BIAS, EXPERT_O = "ExpertV", "ExpertVBias", "ExpertO"
OP_TYPES = (EXPERT_V, EXPERT_V_BIAS, EXPERT_O)

_opset = onnxscript.values.Opset(DOMAIN, VERSION)


# ------------------------------------------------------------------ torch op -> custom-domain node
# Script functions need the return annotation (without it onnx-ir's InlinePass crashes on export).


@onnxscript.script(opset=_opset)
def _expert_v(x: FLOAT, weight: FLOAT, expert_index: INT64, gates: FLOAT) -> FLOAT:
    return _opset.ExpertV(x, weight, expert_index, gates)


@onnxscript.script(opset=_opset)
def _expert_v_bias(x: FLOAT, weight: FLOAT, bias: FLOAT, expert_index: INT64, gates: FLOAT) -> FLOAT:
    return _opset.ExpertVBias(x, weight, bias, expert_index, gates)


@onnxscript.script(opset=_opset)
def _expert_o(attn: FLOAT, weight: FLOAT, expert_index: INT64, gates: FLOAT) -> FLOAT:
    return _opset.ExpertO(attn, weight, expert_index, gates)


def _translate_expert_v(x, weight, bias, expert_index, gates, impl="auto"):
    """The exporter takes one callable per op: pick the op type by whether the bias is present. `impl`
    (which PyTorch implementation runs) does not change the function, so ONNX does not carry it."""
    if bias is None:
        return _expert_v(x, weight, expert_index, gates)
    return _expert_v_bias(x, weight, bias, expert_index, gates)


def _translate_expert_o(attn, weight, expert_index, gates, impl="auto"):
    return _expert_o(attn, weight, expert_index, gates)


def translation_table() -> dict:
    """`custom_translation_table` for torch.onnx.export(dynamo=True)."""
    return {
        torch.ops.switchhead.expert_v.default: _translate_expert_v,
        torch.ops.switchhead.expert_o.default: _translate_expert_o,
    }


# ------------------------------------------------------------------ function bodies (standard ops)


class Body:
    """A tiny node-list builder: `b("MatMul", a, c)` appends a node and returns its output name."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix

    def __call__(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or f"{self._prefix}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ints(self, *values: int) -> str:
        return self("Constant", value=helper.make_tensor(f"{self._prefix}_c{len(self.nodes)}", onnx.TensorProto.INT64,
                                                        [len(values)], list(values)))


def dense_gates(b: Body, like: str, weight: str, expert_index: str, gates: str) -> str:
    """G [N, H, E] in the dtype of `like`: gates scattered (summed) at expert_index, zeros elsewhere."""
    zero = b("CastLike", b("Constant", value_float=0.0), like)
    shape = b("Concat", b("Shape", expert_index, end=2), b("Shape", weight, start=1, end=2), axis=0)  # [N, H, E]
    return b("ScatterElements", b("Expand", zero, shape), expert_index, b("CastLike", gates, like),
             axis=2, reduction="add")


def expert_values(b: Body, with_bias: bool) -> str:
    """Every expert's value of every token, [N, H, E, dh]: ONE MatMul x [N, d] @ [d, H*E*dh]."""
    flat_w = b("Flatten", b("Transpose", "weight", perm=[2, 0, 1, 3]), axis=1)  # [d, H*E*dh]
    values = b("MatMul", "x", flat_w)  # [N, H*E*dh]
    heads_experts_dh = b("Gather", b("Shape", "weight"), b.ints(0, 1, 3), axis=0)
    values = b("Reshape", values, b("Concat", b.ints(-1), heads_experts_dh, axis=0))  # [N, H, E, dh]
    return b("Add", values, "bias") if with_bias else values


def _expert_v_body(with_bias: bool) -> Body:
    # out[n, h] = sum_k gates[n,h,k] * (x[n] @ W[h, idx[n,h,k]] + b[h, idx[n,h,k]])
    b = Body("v")
    values = expert_values(b, with_bias)  # [N, H, E, dh]
    g = b("Unsqueeze", dense_gates(b, "x", "weight", "expert_index", "gates"), b.ints(2))  # [N, H, 1, E]
    # The gated sum over experts as a batched [1, E] @ [E, dh] product: one op, and faster in onnxruntime
    # than Mul + ReduceSum over the experts axis (a middle axis, which its reduction kernels handle slowly).
    b("Flatten", b("MatMul", g, values), axis=1, out="out")  # [N, H, 1, dh] -> [N, H*dh]
    return b


def _expert_o_body() -> Body:
    # out[n] = sum_h sum_k gates[n,h,k] * attn[n, h] @ W[h, idx[n,h,k]]
    b = Body("o")
    g = dense_gates(b, "attn", "weight", "expert_index", "gates")  # [N, H, E]
    gated = b("Mul", b("Unsqueeze", "attn", b.ints(2)), b("Unsqueeze", g, b.ints(-1)))  # [N, H, E, dh]
    b("MatMul", b("Flatten", gated, axis=1), b("Flatten", "weight", axis=3), out="out")  # [N, H*E*dh] @ [H*E*dh, d_out]
    return b


_SIGNATURES = {
    EXPERT_V: (["x", "weight", "expert_index", "gates"], lambda: _expert_v_body(False)),
    EXPERT_V_BIAS: (["x", "weight", "bias", "expert_index", "gates"], lambda: _expert_v_body(True)),
    EXPERT_O: (["attn", "weight", "expert_index", "gates"], _expert_o_body),
}


def function_proto(op_type: str, opset_imports: list[onnx.OperatorSetIdProto]) -> onnx.FunctionProto:
    """The model-local function of one op type; `opset_imports` must be the model's own (the checker
    rejects a function whose imports differ from the model's)."""
    inputs, build = _SIGNATURES[op_type]
    body = build()
    return helper.make_function(DOMAIN, op_type, inputs, ["out"], body.nodes, list(opset_imports),
                                doc_string=f"{DOMAIN}::{op_type} v{VERSION} in standard ONNX ops; spec: docs/onnx-ops.md")
