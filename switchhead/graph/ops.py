"""Which aten ops play which role in attention. Categories, not per-model patterns."""

from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten

SDPA_OPS = {aten.scaled_dot_product_attention.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
# Score / attention-times-value products: (left operand index, right operand index).
MATMUL_OPS = {
    aten.matmul.default: (0, 1),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
    aten.einsum.default: None,  # operands in args[1]
}

# Ops that only move, copy, cast or select elements: index provenance replays them exactly.
LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.t.default, aten.contiguous.default, aten.clone.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.expand.default, aten.expand_as.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.unflatten.int,
    aten.flatten.using_ints, aten.alias.default, aten.movedim.int, aten.swapaxes.default,
    aten.narrow.default, aten.repeat_interleave.self_int, aten.index_select.default,
    aten.repeat.default, aten.cat.default, aten.stack.default, operator.getitem,
}
# Casts: identity for provenance (they change dtype, not positions).
CAST_OPS = {
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
    aten.detach.default, aten.lift_fresh_copy.default,
}
# Writes of new tokens into a preallocated KV cache (HF StaticCache's index_copy_, a hand-written
# `cache[:, :, positions] = k`): op -> (cache operand, written-values operand). What the cache holds
# afterwards is the written tensor's features at other sequence positions.
CACHE_WRITE_OPS = {
    aten.index_copy_.default: (0, 3), aten.index_copy.default: (0, 3),
    aten.index_put_.default: (0, 2), aten.index_put.default: (0, 2),
    aten.slice_scatter.default: (0, 1),
}


def cache_write_dim(node: torch.fx.Node) -> int | None:
    """The sequence dim a cache write (CACHE_WRITE_OPS) writes along; None if it is not one dim."""
    if node.target in (aten.index_copy_.default, aten.index_copy.default):
        return node.args[1]
    if node.target is aten.slice_scatter.default:
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    indexed = [i for i, index in enumerate(node.args[1]) if index is not None]
    return indexed[0] if len(indexed) == 1 else None


# Ops that drop out of the graph's meaning: asserts the exporter leaves behind.
NOOP_OPS = {aten._assert_tensor_metadata.default}


# Elementwise ops that carry no `pointwise` tag: the selects used for masking scores.
_UNTAGGED_ELEMENTWISE = {
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,
}


def is_pointwise(target) -> bool:
    return target in _UNTAGGED_ELEMENTWISE or (
        isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)


def linear_parts(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node | None, bool] | None:
    """(input, weight, bias, weight_is_transposed) when `node` is a linear map, else None.

    weight_is_transposed is True when the weight is stored [in, out] (Conv1D's addmm, x @ W).
    """
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[0], node.args[1], bias, False
    if node.target is aten.addmm.default and len(node.args) >= 3 and not node.kwargs:
        return node.args[1], node.args[2], node.args[0], True
    if node.target in (aten.mm.default, aten.matmul.default):
        return node.args[0], node.args[1], None, True
    return None
