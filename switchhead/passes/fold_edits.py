"""Graph edits of the fold pass (`fold_heads.py`): the size arguments of every op between a site's
projections and its O projection (a table of planners by op; each checks before anything is
edited), and the per-head or per-head-size operands that enter there from outside.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from switchhead.graph.ops import CACHE_WRITE_OPS, CAST_OPS, NOOP_OPS, is_pointwise
from switchhead.graph.provenance import describe
from switchhead.graph.surgery import module_at, register
from switchhead.passes.fold_plan import FoldPlan, projections
from switchhead.passes.plan import FoldError
from switchhead.passes.resize import MaskSizes, ScaledSizes

aten = torch.ops.aten


# KV-cache writes have no size arguments: the cache tensor written into is resized (fold_heads)
_SIZE_FREE = CAST_OPS | NOOP_OPS | set(CACHE_WRITE_OPS) | {
    aten.transpose.int, aten.permute.default, aten.t.default, aten.contiguous.default, aten.clone.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default,
    aten.movedim.int, aten.swapaxes.default, aten.flatten.using_ints, aten.cat.default, aten.stack.default,
    aten.unbind.int, operator.getitem, aten.matmul.default, aten.bmm.default, aten.baddbmm.default,
    aten.einsum.default, aten.softmax.int, aten._softmax.default, aten._safe_softmax.default,
    aten.scaled_dot_product_attention.default, aten.dropout.default, aten.mean.dim, aten.sum.dim_IntList,
    aten.amax.default, aten.linalg_vector_norm.default, aten.expand_as.default,
}


# Normalisations over trailing dims: (input, normalized_shape, weight, [bias], ...).

_NORMS = {aten.layer_norm.default, aten.rms_norm.default}


# ------------------------------------------------------------------------------ size arguments

Edit = Callable[[torch.fx.Graph, torch.fx.Node], None]  # rewrites one node's size arguments in place
Sizes = MaskSizes | ScaledSizes


def size_edit(node: torch.fx.Node, values: dict, sizes: Sizes) -> Edit | None:
    """The edit of `node`'s size arguments for the new sizes, None if it needs none; FoldError if
    the op's sizes cannot be rewritten (checked for every node before any is edited)."""
    if node.op != "call_function":
        return None
    value = values.get(node)
    # computed for every node: a size that does not follow the head size fails here (ScaledSizes)
    changed = isinstance(value, torch.Tensor) and node in sizes and sizes.shape(node) != list(value.shape)
    planner = _SIZE_EDITS.get(node.target)
    if planner is not None:
        return planner(node, values, sizes, changed)
    if node.target in _SIZE_FREE or is_pointwise(node.target) or not changed:
        return None
    raise FoldError(f"cannot change the {'head size' if isinstance(sizes, ScaledSizes) else 'number of heads'} "
                    f"through {getattr(node.target, '__name__', node.target)}")


def _scaled(graph: torch.fx.Graph, arg: Any, old: int, new: int) -> Any:
    """A size argument scaled from old to new (ints directly, symbolic sizes by inserted ops)."""
    if old == new or (isinstance(arg, int) and arg == -1):
        return arg
    if isinstance(arg, int):
        return new
    gcd = math.gcd(old, new)
    return graph.call_function(operator.floordiv, (graph.call_function(operator.mul, (arg, new // gcd)), old // gcd))


def _shape_edit(node: torch.fx.Node, values: dict, sizes: Sizes, changed: bool) -> Edit | None:
    """view / reshape / expand: every size of the new shape, symbolic ones scaled."""
    if not changed:
        return None
    old, new = list(values[node].shape), sizes.shape(node)

    def edit(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        with graph.inserting_before(node):
            shape = [_scaled(graph, a, o, n) for a, o, n in zip(node.args[1], old, new)]
        node.args = (node.args[0], shape, *node.args[2:])
    return edit


def _split_edit(node: torch.fx.Node, values: dict, sizes: Sizes, changed: bool) -> Edit | None:
    """split / chunk (of a fused projection): explicit sizes of the surviving pieces."""
    source = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim %= values[source].dim()
    pieces = [v.shape[dim] for v in values[node]]
    bounds = torch.tensor([0, *pieces]).cumsum(0).tolist()
    new_sizes = [sizes.count(source, dim, bounds[i], bounds[i + 1]) for i in range(len(pieces))]
    if new_sizes == pieces:
        return None

    def edit(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        node.target = aten.split_with_sizes.default
        node.args, node.kwargs = (node.args[0], new_sizes, dim), {}
    return edit


def _index_edit(node: torch.fx.Node, values: dict, sizes: Sizes, changed: bool) -> Edit | None:
    """slice / narrow / select along a dim that loses elements: the surviving positions."""
    source, target = node.args[0], node.target
    dim_arg = node.args[1] if len(node.args) > 1 else 0
    dim = dim_arg % values[source].dim()
    if sizes.whole(source, dim):
        return None
    size = values[source].shape[dim]
    if target is aten.select.int:
        index = node.args[2] % size
        if not sizes.kept(source, dim, index):
            raise FoldError("a selected head is folded away")
        new_args = (node.args[0], dim_arg, sizes.count(source, dim, 0, index))
    elif target is aten.narrow.default:
        start = node.args[2] % size
        new_args = (node.args[0], dim_arg, sizes.count(source, dim, 0, start),
                    sizes.count(source, dim, start, start + node.args[3]))
    else:
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
        if (len(node.args) > 4 and node.args[4] != 1) or not isinstance(start, int) or not isinstance(end, int):
            raise FoldError("a strided or symbolic slice crosses the heads")
        start, end = max(0, min(start % size if start < 0 else start, size)), max(0, min(end, size))
        # A slice to the end stays one: its end is the example's size, and a dim that also carries the
        # batch (vit-pytorch's RvT slices [B*H, T, d] as t[:, 1:]) would run at that batch only.
        new_end = (node.args[3] if len(node.args) > 3 else None) if end == size else sizes.count(source, dim, 0, end)
        new_args = (node.args[0], dim_arg, sizes.count(source, dim, 0, start), new_end)

    def edit(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        node.args = new_args
    return edit


def _unflatten_edit(node: torch.fx.Node, values: dict, sizes: Sizes, changed: bool) -> Edit | None:
    if not changed:
        return None
    dim = node.args[1] % values[node.args[0]].dim()
    new_sizes = sizes.shape(node)[dim:dim + len(node.args[2])]

    def edit(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        node.args = (node.args[0], node.args[1], new_sizes)
    return edit


def _norm_edit(node: torch.fx.Node, values: dict, sizes: Sizes, changed: bool) -> Edit | None:
    """A Q/K norm over the head (timm's qk_norm): over the new head size, never across heads."""
    if not changed:
        return None
    value = values[node]
    trailing = range(value.dim() - len(node.args[1]), value.dim())
    heads = sizes.heads_only if isinstance(sizes, ScaledSizes) else sizes
    if not all(heads.whole(node, d) for d in trailing):
        raise FoldError(f"{describe(node)} normalises across heads: cannot change the number of heads through it")
    new_shape = sizes.shape(node)[-len(node.args[1]):]
    if new_shape == list(node.args[1]):
        return None

    def edit(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        node.args = (node.args[0], new_shape, *node.args[2:])
    return edit


def _repeat_edit(node: torch.fx.Node, values: dict, sizes: Sizes, changed: bool) -> Edit | None:
    """repeat_interleave (GQA's KV repeat): the new number of query heads per KV head."""
    if not changed:
        return None
    dim = node.args[2] % values[node].dim()
    repeats = sizes.shape(node)[dim] // sizes.shape(node.args[0])[dim]

    def edit(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        node.args = (node.args[0], repeats, *node.args[2:])
    return edit


# The ops whose arguments name sizes, each with the planner of its edit.
_SIZE_EDITS: dict[Any, Callable[[torch.fx.Node, dict, Sizes, bool], Edit | None]] = {
    **dict.fromkeys((aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default),
                    _shape_edit),
    **dict.fromkeys((aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default), _split_edit),
    **dict.fromkeys((aten.slice.Tensor, aten.narrow.default, aten.select.int), _index_edit),
    aten.unflatten.int: _unflatten_edit,
    **dict.fromkeys(_NORMS, _norm_edit),
    aten.repeat_interleave.self_int: _repeat_edit,
}


# ------------------------------------------------------------------------------ operands from outside


def head_size_operands(plan: FoldPlan, values: dict) -> list[tuple[torch.fx.Node, torch.fx.Node, int]]:
    """(consumer, operand, dim) of every tensor from outside the region that enters a pointwise op
    (or baddbmm's additive input) along a dim that carries the head size, e.g. RoPE's cos and sin
    or a Q/K norm's weight. Such an operand must not carry the heads as well."""
    sizes = plan.sizes
    region = set(plan.region) | projections(plan.site)  # a projection's output is resized with its weights
    heads_only = sizes.heads_only.keeps
    found = []
    for node in plan.region:
        if node not in sizes or not (is_pointwise(node.target) or node.target in _NORMS | {aten.baddbmm.default}):
            continue
        externals = [node.args[0]] if node.target is aten.baddbmm.default else \
            node.args[2:4] if node.target in _NORMS else node.all_input_nodes
        out_rank = values[node].dim()
        for ext in externals:
            if not isinstance(ext, torch.fx.Node) or ext in region or not isinstance(values.get(ext), torch.Tensor):
                continue
            ext_shape = values[ext].shape
            lead = out_rank - len(ext_shape)
            spanned = [d for d in range(max(lead, 0), out_rank) if ext_shape[d - lead] != 1]
            size_dims = [d for d in spanned if sizes.carries_head_size(node, d)]
            if not size_dims:
                continue
            if len(size_dims) > 1 or any(not bool(heads_only[node][d].all()) for d in spanned):
                raise FoldError(f"{describe(ext)} spans the heads or the head size twice: cannot resize it")
            found.append((node, ext, size_dims[0] - lead))
    return found

def fold_external_operands(gm: torch.fx.GraphModule, plan: FoldPlan, values: dict,
                           keeps: dict[torch.fx.Node, list[torch.Tensor]], fold_qk: str) -> None:
    """Per-head tensors from outside the region (T5's relative position bias, ALiBi, per-head masks)
    keep the kept heads' slices (fold_qk='first') or the mean over each group ('mean'). They enter
    pointwise ops, SDPA's attn_mask and baddbmm's additive input."""
    graph = gm.graph
    # A projection's output is resized with its weights: OPT scales q_proj's output before the head
    # view, so the projection itself enters a pointwise op of the region.
    region = set(plan.region) | projections(plan.site)
    operands = set(plan.site.core_operands or ())
    for node in plan.region:
        if node not in keeps:
            continue
        target = node.target
        if target is aten.scaled_dot_product_attention.default:
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            externals = [mask] if isinstance(mask, torch.fx.Node) else []
            q, k = values[node.args[0]], values[node.args[1]]
            out_shape = q.shape[:-1] + (k.shape[-2],)  # the scores the mask is added to
            out_keep = keeps[node][:-1] + [torch.ones(out_shape[-1], dtype=torch.bool)]
        elif target is aten.baddbmm.default or is_pointwise(target):
            externals = [node.args[0]] if target is aten.baddbmm.default else node.all_input_nodes
            out_shape, out_keep = values[node].shape, keeps[node]
        else:
            continue
        for ext in externals:
            if not isinstance(ext, torch.fx.Node) or ext in region or ext in operands \
                    or not isinstance(values.get(ext), torch.Tensor):
                continue
            ext_shape = values[ext].shape
            for dim, keep in enumerate(out_keep):
                ext_dim = dim - (len(out_shape) - len(ext_shape))
                if ext_dim < 0 or bool(keep.all()) or ext_shape[ext_dim] == 1:
                    continue
                if ext_shape[ext_dim] != keep.numel():
                    raise FoldError("a per-head operand does not line up with the heads")
                with graph.inserting_before(node):
                    folded = _fold_along(graph, gm, plan, ext, ext_dim, keep, fold_qk)
                node.replace_input_with(ext, folded)
                ext = folded

def _fold_along(graph, gm, plan: FoldPlan, ext, dim: int, keep: torch.Tensor, fold_qk: str):
    """Fold dim `dim` of `ext`, which holds the heads (size H) or batch*heads (merged, batch-major)."""
    heads = plan.site.num_heads
    merged = keep.numel() != heads
    if not torch.equal(keep, torch.isin(torch.arange(keep.numel()) % heads, plan.members[:, 0])):
        raise FoldError("a per-head operand does not line up with the heads")
    owner = module_at(gm, plan.site.path)
    x = graph.call_function(aten.unflatten.int, (ext, dim, [-1, heads])) if merged else ext
    head_dim = dim + 1 if merged else dim
    columns = range(1) if fold_qk == "first" else range(plan.members.shape[1])  # "fit" fits Q/K rows only
    picks = []
    for column in columns:
        name = register(owner, plan.site.path, "head_index", plan.members[:, column].clone(), buffer=True)
        picks.append(graph.call_function(aten.index_select.default, (x, head_dim, graph.get_attr(name))))
    x = picks[0] if len(picks) == 1 else graph.call_function(
        aten.mean.dim, (graph.call_function(aten.stack.default, (picks,)), [0]))
    return graph.call_function(aten.flatten.using_ints, (x, dim, dim + 1)) if merged else x
