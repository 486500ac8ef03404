"""How a site's tensors change size when its heads are folded (H -> H2) or resized (dh -> dh2).

Used by the fold pass (`fold_heads.py`). Two size maps answer the same questions about every tensor
between a site's projections and its O projection (its new shape, how many of the elements in a
range of one dim survive):

- `MaskSizes`: a rectangular block of each tensor survives (folding keeps some heads).
- `ScaledSizes`: the head size changes. Every size and offset along a dim is affine in the number
  of surviving head-size positions. It is learned from masks that keep p1 and p2 positions of each
  kept head, and checked against the masks that keep all dh of them; sizes at dh2 are extrapolated.

A new head size also changes what depends on it numerically (`rescale_scores`: the softmax scale
1/sqrt(dh)) and the operands of the size dh that enter the site from outside
(`resize_head_operand`: RoPE tables built from frequencies, per-dim weights of Q/K norms).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch
import torch.fx

from switchhead.graph.ops import CAST_OPS, LAYOUT_OPS, NOOP_OPS, SOFTMAX_OPS
from switchhead.graph.provenance import ancestors, describe, region_between, rerun
from switchhead.graph.surgery import attribute, module_at, register
from switchhead.passes.plan import FoldError

aten = torch.ops.aten
_RTOL = 1e-4  # how closely a constant must match a power of the head size, frequencies a progression
# What a per-dim weight of a new head size starts at, by the op it enters: neutral elements.
_FILL = {aten.mul.Tensor: 1.0, aten.div.Tensor: 1.0, aten.add.Tensor: 0.0, aten.sub.Tensor: 0.0}


def kept_per_dim(mask: torch.Tensor) -> list[torch.Tensor]:
    """For each dim, which indices keep any element; the mask must be their outer product."""
    where = mask.cpu().nonzero()  # [n, dims]; nonzero + bincount stay fast where reductions thrash threads
    per_dim = [torch.bincount(where[:, d], minlength=mask.shape[d]) > 0 for d in range(mask.dim())]
    # The mask lies inside the block its kept indices span: it is the block iff the counts agree.
    if mask.dim() and where.shape[0] != math.prod(int(k.sum()) for k in per_dim):
        raise FoldError("the surviving heads do not form a block of a tensor")
    return per_dim


class MaskSizes:
    """New sizes when the elements of `masks` survive (a rectangular block of each tensor)."""

    def __init__(self, masks: dict[torch.fx.Node, torch.Tensor]):
        self.keeps = {node: kept_per_dim(mask) for node, mask in masks.items()}

    def __contains__(self, node: torch.fx.Node) -> bool:
        return node in self.keeps

    def shape(self, node: torch.fx.Node) -> list[int]:
        return [int(keep.sum()) for keep in self.keeps[node]]

    def count(self, node: torch.fx.Node, dim: int, start: int, end: int) -> int:
        """How many of the indices [start, end) of `dim` survive."""
        return int(self.keeps[node][dim][start:end].sum())

    def whole(self, node: torch.fx.Node, dim: int) -> bool:
        return bool(self.keeps[node][dim].all())

    def kept(self, node: torch.fx.Node, dim: int, index: int) -> bool:
        return bool(self.keeps[node][dim][index])


class ScaledSizes:
    """New sizes for head size `target`, affine through (p, size at p) for the probes' p."""

    def __init__(self, probes: list[tuple[int, MaskSizes]], target: int):
        (self.p1, self.low), (self.p2, self.high), (self.full, self.heads_only) = probes
        self.target = target

    def __contains__(self, node: torch.fx.Node) -> bool:
        return node in self.low and node in self.high and node in self.heads_only

    def _at(self, node: torch.fx.Node, low: int, high: int, full: int) -> int:
        slope = Fraction(high - low, self.p2 - self.p1)
        if low + slope * (self.full - self.p1) != full:
            raise FoldError(f"a size of {describe(node)} does not scale with the head size "
                            "(e.g. RoPE on part of the head, or an odd head size's unrotated channel)")
        value = low + slope * (self.target - self.p1)
        if value.denominator != 1 or value < 0:
            raise FoldError(f"a size of {describe(node)} would be {float(value):g} at head_dim={self.target}")
        return int(value)

    def shape(self, node: torch.fx.Node) -> list[int]:
        return [self._at(node, *sizes) for sizes in
                zip(self.low.shape(node), self.high.shape(node), self.heads_only.shape(node))]

    def count(self, node: torch.fx.Node, dim: int, start: int, end: int) -> int:
        return self._at(node, *(s.count(node, dim, start, end) for s in (self.low, self.high, self.heads_only)))

    def whole(self, node: torch.fx.Node, dim: int) -> bool:
        return all(s.whole(node, dim) for s in (self.low, self.high, self.heads_only))

    def kept(self, node: torch.fx.Node, dim: int, index: int) -> bool:
        return all(s.kept(node, dim, index) for s in (self.low, self.high, self.heads_only))

    def carries_head_size(self, node: torch.fx.Node, dim: int) -> bool:
        """Whether `dim` of `node` changes with the head size (not only with the heads)."""
        return not torch.equal(self.low.keeps[node][dim], self.heads_only.keeps[node][dim])


def probe_positions(head_dim: int) -> list[tuple[int, torch.Tensor]]:
    """Two (p, [dh] mask of p surviving positions) probes. With an even head size the positions
    pair j with dh/2 + j, so rotate-half RoPE (Llama's slices at dh/2) keeps whole pairs."""
    if head_dim % 2 == 0:
        if head_dim < 6:
            raise FoldError(f"head size {head_dim} is too small to be resized (need at least 6)")
        half = head_dim // 2
        return [(p, (torch.arange(head_dim) % half) < p // 2) for p in (2, 4)]
    if head_dim < 3:
        raise FoldError(f"head size {head_dim} is too small to be resized (need at least 3)")
    return [(p, torch.arange(head_dim) < p) for p in (1, 2)]


# ------------------------------------------------------------------------------ softmax scale


def rescale_scores(site, region: list[torch.fx.Node], head_dim: int, new_head_dim: int) -> int:
    """Rewrite the factors dh^e (e = -1/2, -1/4) that scale the attention scores to new_head_dim^e;
    returns how many. They must add up to 1/sqrt(dh) (with SDPA's default scale, which follows the
    new head size by itself); a model without such factors (T5) keeps its scale."""
    core = site.core_node
    if core.target is aten.scaled_dot_product_attention.default:
        upstream = ancestors(core.args[0]) | ancestors(core.args[1]) | {core.args[0], core.args[1]}
    else:
        before_core = ancestors(core)
        softmaxes = [n for n in region if n.target in SOFTMAX_OPS and n in before_core]
        upstream = set().union(*(ancestors(s) for s in softmaxes))
    factors = [f for node in region for f in _scale_factors(node, upstream, head_dim)]
    implicit = -0.5 if core.target is aten.scaled_dot_product_attention.default and \
        _sdpa_scale(core) is None else 0.0
    if not factors:
        return 0
    total = implicit + sum(e for _, _, e in factors)
    if abs(total + 0.5) > 1e-6:
        raise FoldError(f"the attention scores are scaled by head_dim^{total:g}, not 1/sqrt(head_dim): "
                        "cannot tell how the scale follows a new head size")
    for node, where, exponent in factors:
        _set_factor(node, where, new_head_dim ** exponent if where != "div" else new_head_dim ** -exponent)
    return len(factors)


def _sdpa_scale(node: torch.fx.Node) -> Any:
    return node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)


def _power_of(value: Any, head_dim: int) -> float | None:
    """e in {-1/2, -1/4} when value == head_dim^e."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or head_dim < 2:
        return None
    exponent = math.log(value) / math.log(head_dim)
    for e in (-0.5, -0.25):
        if abs(exponent - e) < _RTOL:
            return e
    return None


def _scale_factors(node: torch.fx.Node, upstream: set, head_dim: int) -> list[tuple[torch.fx.Node, Any, float]]:
    """(node, where the constant sits, its exponent as a factor of the scores) of `node`."""
    target = node.target
    found = []
    if target is aten.scaled_dot_product_attention.default:
        e = _power_of(_sdpa_scale(node), head_dim)
        if e is not None:
            found.append((node, "scale", e))
    elif target is aten.baddbmm.default and node in upstream:
        e = _power_of(node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1), head_dim)
        if e is not None:
            found.append((node, "alpha", e))
    elif node in upstream and target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        constants = [i for i, a in enumerate(node.args[:2]) if not isinstance(a, torch.fx.Node)]
        if len(constants) == 1:
            divide = target in (aten.div.Tensor, aten.div.Scalar)
            value = node.args[constants[0]]
            if divide and constants[0] == 1:
                value = 1 / value if isinstance(value, (int, float)) and value else None
            e = _power_of(value, head_dim)
            if e is not None:
                found.append((node, constants[0] if not divide else "div", e))
    return found


def _set_factor(node: torch.fx.Node, where: Any, value: float) -> None:
    if where in ("scale", "alpha"):
        index = 6 if where == "scale" else 4
        if where in node.kwargs or len(node.args) <= index:
            node.kwargs = {**node.kwargs, where: value}
        else:
            node.args = (*node.args[:index], value, *node.args[index + 1:])
    elif where == "div":
        node.args = (node.args[0], value, *node.args[2:])
    else:
        node.args = tuple(value if i == where else a for i, a in enumerate(node.args))


# ------------------------------------------------------------------------------ operands of size dh


def resize_head_operand(gm: torch.fx.GraphModule, values: dict, ext: torch.fx.Node, consumer: torch.fx.Node,
                        dim: int, head_dim: int, new_head_dim: int, path: str, cache: dict) -> torch.fx.Node:
    """A node computing `ext` (an operand of `consumer` whose `dim` has the head size) for the new
    head size: RoPE cos/sin rebuilt from frequencies for new_head_dim with the same base, or a
    per-dim weight (a Q/K norm's) re-initialised to ones (its bias, or a term added, to zeros). The chain from
    its root to `ext` is copied, so other users of the original keep it; `cache` shares the copies
    between sites."""
    if ext in cache:
        return cache[ext]
    root, new_value = _frequency_root(ext, values, head_dim, new_head_dim) or \
        _weight_root(ext, values, consumer, head_dim, new_head_dim) or (None, None)
    if root is None:
        raise FoldError(f"{describe(ext)} of size {head_dim} per head enters the attention but is neither "
                        "built from RoPE frequencies nor a per-dimension weight: cannot resize it")
    chain = [n for n in region_between([root], ext) if n is not root] if root is not ext else []
    expected = list(values[ext].shape)
    expected[dim] = new_head_dim
    try:
        ran = rerun(chain, {root: new_value}, values)
    except Exception as exc:  # noqa: BLE001  (any failure means the chain has the head size built in)
        raise FoldError(f"the chain from {describe(root)} to {describe(ext)} does not follow a new head size: "
                        f"{exc}") from None
    if list(ran[ext].shape) != expected:
        raise FoldError(f"the chain from {describe(root)} to {describe(ext)} has the head size built in")
    graph = gm.graph
    if root not in cache:
        if root.op == "get_attr":  # next to the tensor it replaces (Llama: the model's rotary_emb)
            path = root.target.rpartition(".")[0]
        owner = module_at(gm, path)
        trainable = root.op == "get_attr" and isinstance(attribute(gm, root.target), torch.nn.Parameter)
        stem = root.target.rpartition(".")[2] if root.op == "get_attr" else "rope_inv_freq"
        name = register(owner, path, f"{stem}_dh{new_head_dim}", new_value, buffer=not trainable)
        with graph.inserting_before(root if root.op != "placeholder" else consumer):
            cache[root] = graph.get_attr(name)
    for node in chain:
        if node in cache:
            continue
        with graph.inserting_after(node):
            cache[node] = graph.node_copy(node, lambda a: cache.get(a, a))
        cache[node].meta.pop("val", None)
    return cache[ext]


def _line(value: Any, size: int) -> torch.Tensor | None:
    """The values of a floating tensor with one dim of `size` and every other dim 1."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() != size or size < 2:
        return None
    if max(value.shape) != size:
        return None
    # on the CPU: the rebuilt values are computed with CPU tensors and moved back to the model's device
    return value.detach().reshape(-1).double().cpu()


def _frequency_root(ext, values, head_dim, new_head_dim):
    """(the first node of `ext`'s ancestors holding RoPE frequencies f_i = f_0 base^(-2i/dh), i < dh/2,
    their values for new_head_dim). None without one."""
    order = {n: i for i, n in enumerate(ext.graph.nodes)}
    for node in sorted(ancestors(ext) | {ext}, key=order.__getitem__):
        freqs = _line(values.get(node), head_dim // 2) if head_dim % 2 == 0 else None
        if freqs is None or not bool((freqs > 0).all()):
            continue
        ratios = freqs[1:] / freqs[:-1]
        if not bool((ratios < 1).all()) or not torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=_RTOL):
            continue
        if new_head_dim % 2:
            raise FoldError(f"RoPE needs an even head_dim, got {new_head_dim}")
        base = float(ratios.log().mean().neg().mul(head_dim / 2).exp())  # ratio = base^(-2/dh)
        index = torch.arange(new_head_dim // 2, dtype=torch.float64)
        new = freqs[0] * base ** (-2 * index / new_head_dim)
        shape = [new_head_dim // 2 if s == head_dim // 2 else s for s in values[node].shape]
        return node, new.to(values[node].dtype).reshape(shape).to(values[node].device)
    return None


def _weight_root(ext, values, consumer, head_dim, new_head_dim):
    """(the parameter / buffer `ext` broadcasts, ones or zeros of new_head_dim): a Q/K norm's weight
    or bias, reached through casts and views only. None otherwise."""
    node = ext
    while node.op == "call_function" and node.target in CAST_OPS | LAYOUT_OPS | NOOP_OPS \
            and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if node.op != "get_attr" or _line(values.get(node), head_dim) is None:
        return None
    if consumer.target in (aten.layer_norm.default, aten.rms_norm.default):
        fill = 1.0 if consumer.args[2] is ext else 0.0  # (input, shape, weight, bias, ...)
    else:
        fill = _FILL.get(consumer.target)
    if fill is None:
        raise FoldError(f"a per-dimension weight of size {head_dim} enters {describe(consumer)}: cannot resize it")
    value = values[node]
    shape = [new_head_dim if s == head_dim else s for s in value.shape]
    return node, torch.full(shape, fill, dtype=value.dtype, device=value.device)
