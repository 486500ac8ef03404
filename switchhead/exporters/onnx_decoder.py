"""ONNX decoder-with-past for a converted decoder (switchhead.convert_decoder), and an onnxruntime
greedy / sampling loop over it.

The file (`export_decoder_onnx`) takes `input_ids [B, T]`, `attention_mask [B, S]`, `position_ids [B, T]`,
`cache_position [T]` and `past_key_values_<i> [B, heads, S, head_dim]` (K and V of each layer, in
order) and returns `logits [B, T, vocab]` and `present_<i>`: the past with the new tokens' K/V
written at cache_position. Batch, new length T (1 for a decode step) and cache length S are dynamic;
the expert ops stay `ai.switchhead` nodes with their function bodies (export_onnx).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from switchhead.cache import CacheLayout
from switchhead.decoder import CachedLM
from switchhead.exporters.onnx import OnnxExport, export_onnx
from switchhead.generate import generate_with
from switchhead.inputs import example_inputs

aten = torch.ops.aten

try:
    import onnx_ir as ir
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"ONNX export needs onnxruntime ({exc}); pip install onnxruntime") from exc


def with_present(graph: torch.fx.GraphModule, count: int) -> torch.fx.GraphModule:
    """A copy of a cached-form graph (sharing its tensors) that writes a copy of the past instead of
    the past itself and returns it: (logits, present list). Nothing it is given is mutated, which
    ONNX (no in-place inputs) needs."""
    new = torch.fx.Graph()
    new.output(new.graph_copy(graph.graph, {}))
    new._codegen = copy.deepcopy(graph.graph._codegen)
    placeholders = [n for n in new.nodes if n.op == "placeholder"]
    past = placeholders[-count:]
    present = []
    with new.inserting_after(placeholders[-1]):
        for node in past:
            present.append(new.call_function(aten.clone.default, (node,)))
    for node, copied in zip(past, present):
        node.replace_all_uses_with(copied, delete_user_cb=lambda user, c=copied: user is not c)
    output = next(n for n in new.nodes if n.op == "output")
    outputs = output.args[0]
    if isinstance(outputs, torch.fx.Node) or len(outputs) != 1:
        raise ValueError("a cached-form graph returns the logits alone")
    output.args = ((outputs[0], *present),)
    info = new._codegen.pytree_info
    new._codegen.pytree_info = info._replace(out_spec=pytree.tree_structure((0, [0] * count)))
    module = torch.fx.GraphModule(graph, new, class_name="DecoderWithPast")
    module.meta.update(graph.meta)
    return module


def export_decoder_onnx(cached: CachedLM, path: str | os.PathLike, *, inline: bool = False,
                        verify: bool = True) -> OnnxExport:
    """Write `cached` (its prefill graph, which serves any number of new tokens) as a decoder-with-
    past ONNX file at `path` and, with `verify`, check a prompt and a one-token step in onnxruntime
    against PyTorch."""
    args, _ = example_inputs(cached.prefill)
    ids, mask, positions, cache_position, past = args
    count = len(past)
    batch, tokens, length = Dim("batch"), Dim("new_tokens"), Dim("cache_length")
    shapes = {"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: length},
              "position_ids": {0: batch, 1: tokens}, "cache_position": {0: tokens},
              "past_key_values": [{0: batch, 2: length} for _ in range(count)]}
    # the second check: one new token after the example prompt, batch and cache of other sizes
    step_batch, step_length = ids.shape[0] + 1, past[0].shape[2] + 3
    step = (ids[:1, :1].repeat(step_batch, 1), torch.ones(step_batch, step_length, dtype=mask.dtype),
            torch.full((step_batch, 1), ids.shape[1]), torch.tensor([ids.shape[1]]),
            [torch.randn(step_batch, p.shape[1], step_length, p.shape[3]) for p in past])
    result = export_onnx(with_present(cached.prefill, count), path, (ids, mask, positions, cache_position, past), {},
                         inline=inline, verify=verify, dynamic_shapes=shapes, check_inputs=(step, {}))
    model = ir.load(result.path)
    for index, value in enumerate(model.graph.outputs):  # the exporter names them after the ops
        value.name = "logits" if index == 0 else f"present_{index - 1}"
    ir.save(model, result.path, external_data=f"{result.path.name}.data" if result.external_data else None)
    return result


def onnx_generate(path: str | os.PathLike, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  **options: Any) -> torch.Tensor:
    """generate() with the decoder-with-past ONNX file at `path` run by onnxruntime (CPU): the same
    arguments and token ids as CachedLM.generate (switchhead.generate.generate_with)."""
    session = ort.InferenceSession(str(Path(path)), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    shapes = tuple((i.shape[1], i.shape[3]) for i in past)
    if not past or not all(isinstance(d, int) for shape in shapes for d in shape):
        raise ValueError(f"{path} is not a decoder-with-past file of export_decoder_onnx")
    layout = CacheLayout(shapes)  # fp32 on the CPU, as onnxruntime's CPU session takes it

    def allocate(batch: int, length: int, device: Any) -> list[torch.Tensor]:
        return layout.allocate(batch, length)

    def step(ids, mask, positions, cache_position, cache: Sequence[torch.Tensor]) -> torch.Tensor:
        values = [ids, mask, positions, cache_position, *cache]
        logits, *present = session.run(None, {n: v.numpy() for n, v in zip(names, values)})
        for slot, new in zip(cache, present):
            slot.copy_(torch.from_numpy(new))
        return torch.from_numpy(logits)

    return generate_with(step, allocate, input_ids, attention_mask, **options)
