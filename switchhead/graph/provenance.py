"""Index provenance: which element of a source tensor ends up where in a target tensor.

We seed a source node (a projection's output, the attention core's output) with an int64 tensor of
element ids, e.g. the feature index along the last dim or the token (row) index, and replay every
node between it and a target node on those ids, with the example values of all other operands.
The result says, for each element of the target, which source feature / token it came from. This is
how the passes learn head layouts (fused QKV splits, interleaved heads, GQA expansion, MHA's in-proj
reshuffles, batch-first or not) without any per-model pattern.

`exact` replay admits only ops that move elements (LAYOUT_OPS, casts). `rows` replay also passes ids
through pointwise ops and through reductions over dims the ids are constant on (RoPE, q/k norms,
scales): right for token ids, which such ops do not mix, and wrong for feature ids. `lenient` replay
passes the ids of the first on-path operand through pointwise ops and keeps the smallest id through
reductions: the id of the element a position *mainly* comes from, used to find which elements of a
tensor reach which positions downstream; pair it with a `rerun` check when mixing matters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Iterable

import torch
import torch.fx

from switchhead.graph.ops import CACHE_WRITE_OPS, CAST_OPS, LAYOUT_OPS, NOOP_OPS, cache_write_dim, is_pointwise

aten = torch.ops.aten
_ROW_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.var.correction, aten.norm.ScalarOpt_dim,
                   aten.linalg_vector_norm.default}
# Reductions whose order comes before the dims: (self, p, dim, keepdim). F.normalize's norm is
# linalg_vector_norm (the q/k norms of vit-pytorch's SimpleViT, x-transformers, torchvision's Swin V2).
_ORDER_FIRST = {aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default}
# Normalisations over the trailing `normalized_shape` dims (q/k norms of timm, OLMo, Qwen3).
_ROW_NORMS = {aten.layer_norm.default, aten.rms_norm.default}


class ProvenanceError(Exception):
    """The path holds an op that provenance cannot be replayed through; the message says which."""


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def region_between(sources: Iterable[torch.fx.Node], targets: torch.fx.Node | Iterable[torch.fx.Node]) -> list[torch.fx.Node]:
    """Nodes that depend on a source and that a target depends on (targets included), in graph order."""
    targets = [targets] if isinstance(targets, torch.fx.Node) else list(targets)
    upstream = set(targets).union(*(ancestors(t) for t in targets))
    region: set[torch.fx.Node] = set()
    stack = [s for s in sources if s in upstream]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in upstream and user not in region:
                region.add(user)
                stack.append(user)
    order = {n: i for i, n in enumerate(targets[0].graph.nodes)} if targets else {}
    return sorted(region, key=order.__getitem__)


def describe(node: torch.fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", None) or str(target)


def replay(
    region: list[torch.fx.Node],
    seeds: dict[torch.fx.Node, torch.Tensor],
    values: dict[torch.fx.Node, Any],
    mode: str = "exact",
) -> dict[torch.fx.Node, Any]:
    """Provenance of every node of `region` given the seeds' provenance ('exact' or 'rows' mode)."""
    prov: dict[torch.fx.Node, Any] = {node: _like(values[node], ids) for node, ids in seeds.items()}
    for node in region:
        if node in prov or node.target in NOOP_OPS:
            continue
        if not any(a in prov for a in node.all_input_nodes):
            continue
        prov[node] = _replay_node(node, prov, values, mode)
    return prov


def replay_or_raise(
    region: list[torch.fx.Node],
    seeds: dict[torch.fx.Node, torch.Tensor],
    values: dict[torch.fx.Node, Any],
    mode: str,
    error: Callable[[str], Exception],
) -> dict[torch.fx.Node, Any]:
    """`replay`, with a ProvenanceError turned into the caller's own error (`error(message)`)."""
    try:
        return replay(region, seeds, values, mode)
    except ProvenanceError as exc:
        raise error(str(exc)) from None


def _like(example: Any, ids: torch.Tensor) -> torch.Tensor:
    """`ids` laid out with the example value's strides: views in the graph may rely on them
    (export drops a `.contiguous()` that was a no-op on the real tensor)."""
    if not isinstance(example, torch.Tensor) or example.shape != ids.shape or torch._debug_has_internal_overlap(example):
        return ids
    strided = torch.empty_strided(example.shape, example.stride(), dtype=ids.dtype)
    strided.copy_(ids)
    return strided


def _replay_node(node: torch.fx.Node, prov: dict, values: dict, mode: str) -> Any:
    target = node.target

    def substitute(a):
        return prov[a] if a in prov else values[a]

    args = torch.fx.node.map_arg(node.args, substitute)
    kwargs = torch.fx.node.map_arg(node.kwargs, substitute)
    if target in CAST_OPS:
        return aten._to_copy.default(args[0])
    if target is aten.dropout.default and (len(node.args) < 3 or node.args[2] is False):
        return args[0]
    if target in LAYOUT_OPS:
        if target in (aten.cat.default, aten.stack.default) and not all(a in prov for a in node.args[0]):
            if mode != "lenient":
                raise ProvenanceError(f"{describe(node)} joins the path with other tensors")
            # Elements from off the path get id -1: they come from nothing being tracked.
            parts = [prov[a] if a in prov else torch.full(values[a].shape, -1, dtype=torch.long) for a in node.args[0]]
            return target(parts, *args[1:], **kwargs)
        return target(*args, **kwargs)
    if target in CACHE_WRITE_OPS and node.args[CACHE_WRITE_OPS[target][1]] in prov and mode != "rows":
        return _cache_ids(node, prov, values, mode)
    if mode in ("lenient", "rows") and target in _ROW_NORMS:
        source = prov[node.args[0]]
        trailing = list(range(source.dim() - len(node.args[1]), source.dim()))
        if mode == "lenient" or torch.equal(source.amax(trailing, keepdim=True).expand_as(source), source):
            return source
        raise ProvenanceError(f"{describe(node)} normalises across rows")
    if mode == "lenient":
        shape = values[node].shape
        if is_pointwise(target) or target is aten.dropout.default:
            first = next(prov[a] for a in node.all_input_nodes if a in prov)
            return first.expand(shape) if first.dim() <= len(shape) else first
        if target in _ROW_REDUCTIONS:
            source = prov[node.args[0]]
            return source.amin(*_reduced(node, source.dim()))
    if mode == "rows":
        shape = values[node].shape
        if is_pointwise(target) or target is aten.dropout.default:
            ids = [prov[a].expand(shape) for a in node.all_input_nodes if a in prov]
            if all(torch.equal(ids[0], other) for other in ids[1:]):
                return ids[0]
            raise ProvenanceError(f"{describe(node)} mixes different rows")
        if target in _ROW_REDUCTIONS:
            source = prov[node.args[0]]
            dims, keepdim = _reduced(node, source.dim())
            high, low = source.amax(dims, keepdim=keepdim), source.amin(dims, keepdim=keepdim)
            if torch.equal(high, low):
                return high
            raise ProvenanceError(f"{describe(node)} reduces across rows")
    raise ProvenanceError(f"{describe(node)} is not a pure data movement")


def _reduced(node: torch.fx.Node, rank: int) -> tuple[list[int], bool]:
    """(dims, keepdim) of a reduction in _ROW_REDUCTIONS; no dims means all of them."""
    rest = list(node.args[2:] if node.target in _ORDER_FIRST else node.args[1:])
    if node.target is aten.var.correction:  # var.correction(self, dim, *, correction, keepdim)
        rest = rest[:1]
    dims = rest[0] if rest else node.kwargs.get("dim")
    keepdim = bool(rest[1]) if len(rest) > 1 else bool(node.kwargs.get("keepdim", False))
    dims = list(range(rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    return dims, keepdim


def _cache_ids(node: torch.fx.Node, prov: dict, values: dict, mode: str) -> torch.Tensor:
    """Ids of a KV cache after a write of tracked values: every position holds the written tensor's
    features (earlier calls wrote the same projection there), so the written ids, constant along
    the sequence dim, spread over the whole cache."""
    cache, written = CACHE_WRITE_OPS[node.target]
    if node.args[cache] in prov:
        raise ProvenanceError(f"{describe(node)} writes tracked values into a tracked cache")
    dim = cache_write_dim(node)
    ids = prov[node.args[written]]
    shape = values[node].shape
    if dim is None or ids.dim() != len(shape):
        raise ProvenanceError(f"{describe(node)} writes along more than one dim")
    first = ids.narrow(dim, 0, 1)
    if torch.equal(first.expand_as(ids), ids):
        return first.expand(shape).contiguous()
    if mode != "lenient":
        raise ProvenanceError(f"{describe(node)} writes elements that vary along the sequence into a cache")
    # Element ids (which element lands where, this call): the written slots get them, the rest of
    # the cache comes from nothing being tracked (-1).
    args = list(node.args)
    args[cache], args[written] = torch.full(shape, -1, dtype=torch.long), ids
    # ids live on the CPU; the example positions may not (a model converted on its GPU)
    args = torch.fx.node.map_arg(args, lambda a: values[a].to(ids.device) if isinstance(values[a], torch.Tensor) else values[a])
    out_of_place = {"index_copy_": aten.index_copy.default, "index_put_": aten.index_put.default}
    return out_of_place.get(node.target._opname, node.target)(*args)


def rerun(
    region: list[torch.fx.Node], seeds: dict[torch.fx.Node, torch.Tensor], values: dict[torch.fx.Node, Any]
) -> dict[torch.fx.Node, Any]:
    """Run the region's real ops again with new values for the seeds, example values elsewhere."""
    out: dict[torch.fx.Node, Any] = dict(seeds)
    for node in region:
        if node in out or node.op != "call_function" or not any(a in out for a in node.all_input_nodes):
            continue
        substitute = lambda a: out[a] if a in out else values[a]  # noqa: E731
        out[node] = node.target(*torch.fx.node.map_arg(node.args, substitute),
                                **torch.fx.node.map_arg(node.kwargs, substitute))
    return out
