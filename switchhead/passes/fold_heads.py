"""Pass: give each attention fewer heads (H -> H2), folding groups of dense heads into experts.

Contract
    Input: the GraphModule, example values and AttentionSites that detection produced, a config
    with `num_heads` (and init "fold" or "random").
    Output: the graph computes attention with H2 heads; per site a SitePlan for the expert rewrite,
    whose V/O experts are the folded heads. Everything between the Q/K/V projections and the O
    projection that carries a head dimension is resized: views, reshapes, expands (GQA repeats),
    splits and slices of fused projections, the SDPA / matmul operands, and masks or positional terms
    that broadcast over heads. Batch and sequence sizes stay symbolic.

Method
    Query heads are grouped, G = H / H2 per group, inside their KV group (GQA keeps its KV heads).
    Each group keeps its first head's place in the graph. Which elements of every tensor survive is
    learned by replaying element ids from that tensor to the attention core (`lenient` provenance)
    and keeping those that land on a kept head; a NaN rerun checks that dropped heads never leak
    into kept ones. A tensor's new shape is its surviving sub-block, which must be rectangular; the
    ops' size arguments are rewritten from the old and new shapes.

Folding rules (documented for users)
    Q (and K, without GQA): each new head gets the mean (fold_qk="mean") or the first
    (fold_qk="first") of its group's heads, column by column. V/O: expert e of a new head is the
    group's head e; with E > G, expert e copies head e mod G times (1 + fold_noise * N(0, 1)).
    V experts are scaled by 2/k and O experts by 2G/k, so with routers at sigmoid(0) = 1/2 the k
    active V experts average and the O experts add up like the dense group's heads did. Routers
    start tiny and random as with upcycling. With GQA the V experts are copies of their KV head.
    H2 = H and E = 1 reproduces the dense model exactly; any real fold is lossy and needs healing.

New head size (init="random" with head_dim, `resize.py`)
    Sizes are learned as for folding, from masks that also keep p of each head's dh positions, for
    two p; they are affine in p and extrapolated to dh2. Q/K projections get new random weights
    with the original's std (biases zero), V/O experts the paper's random init at dh2; the softmax
    scale, RoPE tables and Q/K norm weights follow dh2, or the site is refused.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx

from switchhead import experts as expert_init
from switchhead.config import SwitchHeadConfig
from switchhead.errors import ConfigMismatchError
from switchhead.graph.ops import CAST_OPS, MATMUL_OPS, NOOP_OPS, is_pointwise, linear_parts
from switchhead.graph.provenance import (ProvenanceError, ancestors, describe, region_between, replay,
                                         replay_or_raise, rerun)
from switchhead.graph.surgery import erase_unused, linear_weight, module_at, register, rms
from switchhead.passes.plan import FoldError, PassResult, PassState, SitePlan
from switchhead.passes.resize import MaskSizes, ScaledSizes, probe_positions, rescale_scores, resize_head_operand
from switchhead.site import AttentionSite

aten = torch.ops.aten


# Ops whose arguments never mention sizes: a new input shape is all they need.
_SIZE_FREE = CAST_OPS | NOOP_OPS | {
    aten.transpose.int, aten.permute.default, aten.t.default, aten.contiguous.default, aten.clone.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default,
    aten.movedim.int, aten.swapaxes.default, aten.flatten.using_ints, aten.cat.default, aten.stack.default,
    aten.unbind.int, operator.getitem, aten.matmul.default, aten.bmm.default, aten.baddbmm.default,
    aten.einsum.default, aten.softmax.int, aten._softmax.default, aten._safe_softmax.default,
    aten.scaled_dot_product_attention.default, aten.dropout.default, aten.mean.dim, aten.sum.dim_IntList,
    aten.amax.default,
}


# Normalisations over trailing dims: (input, normalized_shape, weight, [bias], ...).
_NORMS = {aten.layer_norm.default, aten.rms_norm.default}


@dataclasses.dataclass
class FoldPlan:
    site: AttentionSite
    members: torch.Tensor  # [H2, G] dense query heads of each new head; column 0 keeps its place
    masks: dict[torch.fx.Node, torch.Tensor]  # surviving elements of every tensor in the region (all of dh)
    region: list[torch.fx.Node]  # nodes between the projections and the O projection, in order
    head_columns: dict[torch.fx.Node, torch.Tensor]  # Q (and K without GQA) projection: [H, dh] columns
    sizes: MaskSizes | ScaledSizes  # new sizes of the region's tensors
    head_dim: int  # the new head size

    @property
    def resized(self) -> bool:
        return self.head_dim != self.site.head_dim


def fold_heads(gm: torch.fx.GraphModule, state: PassState) -> PassResult:
    """Fold every site to `config.num_heads` heads (init "fold", or "random" with num_heads or
    head_dim); `state.plans` gets the expert plan of each folded site by index. Raises
    ConfigMismatchError naming the site that cannot be folded, before the graph is changed.
    Counters: `folded_sites`, `resized_sites` (new head size), `edited_ops` (size arguments
    rewritten), `head_size_operands` (RoPE tables, norm weights rebuilt)."""
    config, values, sites = state.config, state.values, state.sites
    if config.init != "fold" and config.num_heads is None and config.head_dim is None:
        return PassResult(gm, False)
    generator, init_scale = expert_init.init_setup(config.seed, config.init_scale, len(sites), offset=1)
    folds = []
    for site in sites:
        try:
            folds.append(plan_fold(values, site, config.num_heads or site.num_heads, config.head_dim))
        except FoldError as exc:
            raise _mismatch(site, exc, config) from None
    counters = {"folded_sites": 0, "resized_sites": 0, "edited_ops": 0, "head_size_operands": 0}
    copies: dict = {}  # positional chains copied for the new head size, shared by the sites
    for index, fold in enumerate(folds):
        try:
            state.plans[index] = apply_fold(gm, values, fold, config, generator, init_scale, copies, counters)
        except FoldError as exc:
            raise _mismatch(fold.site, exc, config) from None
        counters["folded_sites"] += 1
        counters["resized_sites"] += int(fold.resized)
    erase_unused(gm, list(copies))
    return PassResult(gm, bool(folds), counters)


def _mismatch(site: AttentionSite, exc: FoldError, config: SwitchHeadConfig) -> ConfigMismatchError:
    if config.head_dim is None:
        return ConfigMismatchError(f"cannot fold the heads of {site.path or '<root>'}: {exc}")
    return ConfigMismatchError(f"cannot resize the heads of {site.path or '<root>'} to head_dim={config.head_dim}: "
                               f"{exc}; change num_heads / head_dim or exclude this module with module_filter")


def group_heads(site: AttentionSite, num_heads: int) -> torch.Tensor:
    """[H2, G] query heads per new head: consecutive heads of one KV group."""
    heads, kv_heads = site.num_heads, site.num_kv_heads
    if num_heads > heads or heads % num_heads:
        raise FoldError(f"{heads} heads cannot be folded into {num_heads} (need a divisor of {heads})")
    gqa = kv_heads < heads
    if gqa and num_heads % kv_heads:
        raise FoldError(f"with {kv_heads} KV heads the new head count must be a multiple of {kv_heads}")
    size = heads // num_heads
    groups = []
    for kv in range(kv_heads if gqa else 1):
        members = (site.kv_head_of_query == kv).nonzero().flatten() if gqa else torch.arange(heads)
        groups.extend(members.view(-1, size))
    members = torch.stack(groups)
    return members[members[:, 0].argsort()]


def _head_index(shape: torch.Size, heads: int) -> torch.Tensor:
    """Head of every element of a core-layout tensor: [*b, H, T, x] (dim -3) or [b*H, T, x]."""
    if len(shape) >= 4:
        index = torch.arange(shape[-3]).view(-1, 1, 1)
    else:
        index = (torch.arange(shape[0]) % heads).view(-1, 1, 1)
    return index.expand(shape)


def _ids(value: torch.Tensor) -> torch.Tensor:
    return torch.arange(value.numel()).view(value.shape)


def plan_fold(values: dict, site: AttentionSite, num_heads: int, head_dim: int | None = None) -> FoldPlan:
    """Which elements of every tensor between the projections and the O projection survive, and
    the new sizes of those tensors with `num_heads` heads of `head_dim` (None: unchanged)."""
    members = group_heads(site, num_heads)
    head_dim = head_dim or site.head_dim
    masks, region = _surviving(values, site, members[:, 0])
    sizes: MaskSizes | ScaledSizes = MaskSizes(masks)
    if head_dim != site.head_dim:
        probes = [(p, MaskSizes(_surviving(values, site, members[:, 0], positions)[0]))
                  for p, positions in probe_positions(site.head_dim)]
        sizes = ScaledSizes([*probes, (site.head_dim, sizes)], head_dim)
    query, key = site.core_operands[:2]
    roles = [(site.query_node, query)] + ([(site.key_node, key)] if site.num_kv_heads == site.num_heads else [])
    head_columns = {proj: _head_columns(values, proj, anchor, site.num_heads) for proj, anchor in roles}
    return FoldPlan(site, members, masks, region, head_columns, sizes, head_dim)


def _size_dims(site: AttentionSite) -> tuple[int, int, int, int]:
    """The head-size dim of the query, key and value operands of the core and of its output."""
    core = site.core_node
    if core.target is aten.scaled_dot_product_attention.default:
        return -1, -1, -1, -1
    query, key = site.core_operands[:2]
    scores = next((n for n in query.users if n.target in MATMUL_OPS and key in n.all_input_nodes), None)
    if scores is None:
        raise FoldError("cannot find the score product of the attention")
    q_dim, k_dim = (-1, -2) if scores.target is not aten.einsum.default else _contracted(scores.args[0], 0, 1)
    if core.target is not aten.einsum.default:
        return q_dim, k_dim, -1, -1
    inputs, output = core.args[0].replace(" ", "").split("->")
    probs, v = inputs.split(",")
    letter = [c for c in v if c in output and c not in probs and c != "."]
    if len(letter) != 1:
        raise FoldError(f"cannot tell the head-size dim of the value product {core.args[0]!r}")
    return q_dim, k_dim, _subscript_dim(v, letter[0]), _subscript_dim(output, letter[0])


def _contracted(equation: str, left: int, right: int) -> tuple[int, int]:
    inputs, output = equation.replace(" ", "").split("->")
    operands = inputs.split(",")
    letters = [c for c in operands[left] if c in operands[right] and c not in output and c != "."]
    if len(letters) != 1:
        raise FoldError(f"cannot tell the head-size dim of the score product {equation!r}")
    return _subscript_dim(operands[left], letters[0]), _subscript_dim(operands[right], letters[0])


def _subscript_dim(subscript: str, letter: str) -> int:
    """Negative dim of `letter` in an einsum subscript (counted from the end: ellipses are safe)."""
    plain = subscript.replace("...", "")
    return plain.index(letter) - len(plain)


def _along(positions: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """[dh] positions broadcast along `dim` of `shape`."""
    if shape[dim] != positions.numel():
        raise FoldError("the attention operands do not share one head size")
    view = [1] * len(shape)
    view[dim] = -1
    return positions.view(view).expand(shape)


def _surviving(values: dict, site: AttentionSite, kept: torch.Tensor, positions: torch.Tensor | None = None):
    """(mask of surviving elements per node, region): heads `kept`, and of each head the head-size
    positions `positions` ([dh] bool; None: all)."""
    query, key, value = site.core_operands
    projections = {site.query_node, site.key_node, site.value_node}
    core_out, o_input = site.core_node, linear_parts(site.output_node)[0]
    region = region_between(projections, o_input)
    region = [n for n in region if n not in projections]

    # Anchors: the core operands, where an element survives iff its head does.
    kept_kv = site.kv_head_of_query[kept].unique()
    anchors: dict[torch.fx.Node, torch.Tensor] = {}
    for operand in (query, key, value):
        shape = values[operand].shape
        if len(shape) < values[query].dim():  # no head dim: the core broadcasts it (einsum MQA, PaLM)
            anchors[operand] = torch.ones(shape, dtype=torch.bool)
            continue
        heads = shape[-3] if len(shape) >= 4 else site.num_heads
        keep = kept if heads == site.num_heads else kept_kv
        anchors[operand] = torch.isin(_head_index(shape, site.num_heads), keep)
    if positions is not None:
        dims = _size_dims(site)
        for operand, dim in zip((query, key, value), dims):
            anchors[operand] = anchors[operand] & _along(positions, values[operand].shape, dim)

    masks: dict[torch.fx.Node, torch.Tensor] = dict(anchors)
    upstream = set()
    for operand in anchors:
        upstream |= ancestors(operand)
    downstream_of_core = set(region_between([core_out], o_input)) | {core_out}
    for node in [*projections, *region]:
        if node in masks or not isinstance(values.get(node), torch.Tensor):
            continue
        if node in upstream:
            masks[node] = _mask_from_anchors(node, anchors, values)
        elif node not in downstream_of_core or node is core_out:
            # Inside the core (scores, softmax, dropout, AV product): core layout.
            masks[node] = torch.isin(_head_index(values[node].shape, site.num_heads), kept)
            if node is core_out and positions is not None:
                masks[node] = masks[node] & _along(positions, values[node].shape, _size_dims(site)[3])
    out_prov = _replay(region_between([core_out], o_input), {core_out: masks[core_out].long()}, values, "exact")
    for node, ids in out_prov.items():
        if isinstance(ids, torch.Tensor) and node not in masks:
            masks[node] = ids.bool()
    region += _side_branches(region, masks, values, o_input)
    if positions is None:  # a head's positions may mix (norms over the head): only heads must not
        _check_no_leak(values, site, projections, anchors, masks)
    return masks, region


def _side_branches(region, masks, values, o_input) -> list[torch.fx.Node]:
    """Consumers of the region's head-carrying tensors that do not lead to the O projection, e.g.
    nn.MultiheadAttention's returned attention weights (view, then mean over heads). They are
    resized as far as data movement carries the heads; the first op that is not data movement
    (the mean) must absorb the head dim, which the post-fold run checks."""
    inside = set(region) | {o_input}
    side: list[torch.fx.Node] = []
    frontier = [n for n in region if n in masks]
    seen = set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in inside or user in seen or user.op != "call_function":
                continue
            seen.add(user)
            prov = {a: masks[a].long() for a in user.all_input_nodes if a in masks}
            try:
                out = replay([user], prov, values, "exact").get(user)
            except ProvenanceError:
                continue
            if isinstance(out, torch.Tensor):
                masks[user] = out.bool()
                side.append(user)
                frontier.append(user)
    order = {n: i for i, n in enumerate(o_input.graph.nodes)}
    return sorted(side, key=order.__getitem__)


def _replay(region, seeds, values, mode):
    return replay_or_raise(region, seeds, values, mode, lambda message: FoldError(f"cannot follow the heads: {message}"))


def _mask_from_anchors(node, anchors, values) -> torch.Tensor:
    """Elements of `node` that reach a kept element of an anchor, and those that reach no anchor
    element at all: what the region never reads is not dropped by folding (vit-pytorch's RvT takes
    the CLS token of q from one slice and the rest from another; no op shrinks either slice's
    source by what it leaves out)."""
    ids = _ids(values[node])
    keep = torch.zeros(values[node].numel(), dtype=torch.bool)
    reached = torch.zeros(values[node].numel(), dtype=torch.bool)
    for anchor, anchor_mask in anchors.items():
        if anchor is node:
            return anchor_mask
        path = region_between([node], anchor)
        if not path:
            continue
        landed = _replay(path, {node: ids}, values, "lenient").get(anchor)
        if isinstance(landed, torch.Tensor):
            hits = landed[anchor_mask].flatten()
            hits = hits[hits >= 0]  # -1: positions fed from off the path
            keep |= torch.bincount(hits, minlength=keep.numel()) > 0  # (index_put thrashes busy CPUs)
            every = landed.flatten()
            reached |= torch.bincount(every[every >= 0], minlength=keep.numel()) > 0
    keep, reached = keep.view(values[node].shape), reached.view(values[node].shape)
    if bool(reached.all()):
        return keep
    # An element no anchor reads follows the verdict of its row / column: the index of each dim is
    # kept when a read element there is kept, or when no element there is read.
    block = torch.ones_like(keep)
    for dim in range(keep.dim()):
        others = tuple(d for d in range(keep.dim()) if d != dim)
        kept = keep.any(dim=others) if others else keep
        read = reached.any(dim=others) if others else reached
        view = [1] * keep.dim()
        view[dim] = -1
        block = block & (kept | ~read).view(view)
    return torch.where(reached, keep, block)


def _check_no_leak(values, site, projections, anchors, masks) -> None:
    """NaN in every dropped element of each projection must not reach a kept core element."""
    for proj in projections:
        seed = values[proj].detach().clone()
        seed[~masks[proj]] = float("nan")
        targets = [a for a in anchors if proj in ancestors(a)]
        ran = rerun(region_between([proj], targets), {proj: seed}, values)
        for anchor in targets:
            if torch.isnan(ran[anchor][anchors[anchor]]).any():
                raise FoldError("heads mix before attention (a kept head reads a folded one)")


# ------------------------------------------------------------------------------ new shapes


def apply_fold(gm: torch.fx.GraphModule, values: dict, plan: FoldPlan, config: SwitchHeadConfig,
               generator: torch.Generator, init_scale: float, copies: dict | None = None,
               counters: dict[str, int] | None = None) -> SitePlan:
    """Resize the site's graph to the kept heads (and new head size) and build its expert plan.
    `copies` shares the positional chains copied for a new head size between sites; `counters`
    (fold_heads's) count the edited ops and rebuilt head-size operands."""
    sizes = plan.sizes
    edits = [_edit_for(n, values, sizes) for n in plan.region]  # validate everything before mutating
    operands = _head_size_operands(plan, values) if plan.resized else []
    graph = gm.graph
    counters = counters if counters is not None else {}
    for node, edit in zip(plan.region, edits):
        if edit is not None:
            edit(graph, node)
            counters["edited_ops"] = counters.get("edited_ops", 0) + 1
    counters["head_size_operands"] = counters.get("head_size_operands", 0) + len(operands)
    for consumer, ext, dim in operands:
        new = resize_head_operand(gm, values, ext, consumer, dim, plan.site.head_dim, plan.head_dim,
                                  plan.site.path, copies if copies is not None else {})
        consumer.replace_input_with(ext, new)
    if plan.resized:
        rescale_scores(plan.site, plan.region, plan.site.head_dim, plan.head_dim)
    heads_only = sizes.heads_only if isinstance(sizes, ScaledSizes) else sizes
    _fold_external_operands(gm, plan, values, heads_only.keeps, config)
    if plan.resized:
        projection_weights = _random_projections(gm, values, plan, generator)
    else:
        projection_weights = _fold_projections(gm, values, plan, config)
    return _expert_plan(values, plan, projection_weights, config, generator, init_scale)


def _scaled(graph: torch.fx.Graph, arg: Any, old: int, new: int) -> Any:
    """A size argument scaled from old to new (ints directly, symbolic sizes by inserted ops)."""
    if old == new or (isinstance(arg, int) and arg == -1):
        return arg
    if isinstance(arg, int):
        return new
    gcd = math.gcd(old, new)
    return graph.call_function(operator.floordiv, (graph.call_function(operator.mul, (arg, new // gcd)), old // gcd))


def _edit_for(node: torch.fx.Node, values: dict, sizes: MaskSizes | ScaledSizes):
    """A function that rewrites `node`'s size arguments, None if it needs none; FoldError if the
    op's sizes cannot be rewritten."""
    target = node.target
    value = values.get(node)
    if node.op != "call_function":
        return None
    source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    changed = isinstance(value, torch.Tensor) and node in sizes and sizes.shape(node) != list(value.shape)
    if target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
        if not changed:
            return None
        old, new = list(value.shape), sizes.shape(node)

        def edit(graph, node, old=old, new=new):
            with graph.inserting_before(node):
                sizes = [_scaled(graph, a, o, n) for a, o, n in zip(node.args[1], old, new)]
            node.args = (node.args[0], sizes, *node.args[2:])
        return edit
    if target in (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim %= values[source].dim()
        pieces = [v.shape[dim] for v in value]
        bounds = torch.tensor([0, *pieces]).cumsum(0).tolist()
        new_sizes = [sizes.count(source, dim, bounds[i], bounds[i + 1]) for i in range(len(pieces))]
        if new_sizes == pieces:
            return None

        def edit(graph, node, new_sizes=new_sizes, dim=dim):
            node.target = aten.split_with_sizes.default
            node.args, node.kwargs = (node.args[0], new_sizes, dim), {}
        return edit
    if target in (aten.slice.Tensor, aten.narrow.default, aten.select.int):
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
            new_args = (node.args[0], dim_arg, sizes.count(source, dim, 0, start), sizes.count(source, dim, 0, end))

        def edit(graph, node, new_args=new_args):
            node.args = new_args
        return edit
    if target is aten.unflatten.int:
        if not changed:
            return None
        dim = node.args[1] % values[source].dim()
        new_sizes = sizes.shape(node)[dim:dim + len(node.args[2])]

        def edit(graph, node, new_sizes=new_sizes):
            node.args = (node.args[0], node.args[1], new_sizes)
        return edit
    if target in _NORMS and changed:  # a Q/K norm over the head (timm's qk_norm): over the new size
        trailing = range(value.dim() - len(node.args[1]), value.dim())
        heads = sizes.heads_only if isinstance(sizes, ScaledSizes) else sizes
        if not all(heads.whole(node, d) for d in trailing):
            raise FoldError(f"{describe(node)} normalises across heads: cannot change the number of heads through it")
        new_shape = sizes.shape(node)[-len(node.args[1]):]
        if new_shape == list(node.args[1]):
            return None

        def edit(graph, node, new_shape=new_shape):
            node.args = (node.args[0], new_shape, *node.args[2:])
        return edit
    if target is aten.repeat_interleave.self_int:
        if not changed:
            return None
        dim = node.args[2] % value.dim()
        repeats = sizes.shape(node)[dim] // sizes.shape(source)[dim]

        def edit(graph, node, repeats=repeats):
            node.args = (node.args[0], repeats, *node.args[2:])
        return edit
    if target in _SIZE_FREE or is_pointwise(target):
        return None
    if changed:
        raise FoldError(f"cannot change the {'head size' if isinstance(sizes, ScaledSizes) else 'number of heads'} "
                        f"through {getattr(target, '__name__', target)}")
    return None


def _head_size_operands(plan: FoldPlan, values) -> list[tuple[torch.fx.Node, torch.fx.Node, int]]:
    """(consumer, operand, dim) of every tensor from outside the region that enters a pointwise op
    (or baddbmm's additive input) along a dim that carries the head size, e.g. RoPE's cos and sin
    or a Q/K norm's weight. Such an operand must not carry the heads as well."""
    sizes = plan.sizes
    region = set(plan.region) | _projections(plan.site)  # a projection's output is resized with its weights
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


def _fold_external_operands(gm, plan: FoldPlan, values, keeps, config) -> None:
    """Per-head tensors from outside the region (T5's relative position bias, ALiBi, per-head masks)
    keep the kept heads' slices (fold_qk='first') or the mean over each group ('mean'). They enter
    pointwise ops, SDPA's attn_mask and baddbmm's additive input."""
    graph = gm.graph
    # A projection's output is resized with its weights: OPT scales q_proj's output before the head
    # view, so the projection itself enters a pointwise op of the region.
    region = set(plan.region) | _projections(plan.site)
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
                    folded = _fold_along(graph, gm, plan, ext, ext_dim, keep, config.fold_qk)
                node.replace_input_with(ext, folded)
                ext = folded


def _projections(site: AttentionSite) -> set[torch.fx.Node]:
    return {site.query_node, site.key_node, site.value_node}


def _fold_along(graph, gm, plan: FoldPlan, ext, dim: int, keep: torch.Tensor, fold_qk: str):
    """Fold dim `dim` of `ext`, which holds the heads (size H) or batch*heads (merged, batch-major)."""
    heads = plan.site.num_heads
    merged = keep.numel() != heads
    if not torch.equal(keep, torch.isin(torch.arange(keep.numel()) % heads, plan.members[:, 0])):
        raise FoldError("a per-head operand does not line up with the heads")
    owner = module_at(gm, plan.site.path)
    x = graph.call_function(aten.unflatten.int, (ext, dim, [-1, heads])) if merged else ext
    head_dim = dim + 1 if merged else dim
    columns = range(plan.members.shape[1]) if fold_qk == "mean" else range(1)
    picks = []
    for column in columns:
        name = register(owner, plan.site.path, "head_index", plan.members[:, column].clone(), buffer=True)
        picks.append(graph.call_function(aten.index_select.default, (x, head_dim, graph.get_attr(name))))
    x = picks[0] if len(picks) == 1 else graph.call_function(
        aten.mean.dim, (graph.call_function(aten.stack.default, (picks,)), [0]))
    return graph.call_function(aten.flatten.using_ints, (x, dim, dim + 1)) if merged else x


def _head_columns(values, proj, anchor, heads) -> torch.Tensor:
    """[H, dh] projection column that mainly feeds each (head, dim) position of a core operand."""
    ids = _ids(values[proj])
    landed = _replay(region_between([proj], anchor), {proj: ids}, values, "lenient")[anchor]
    width = values[proj].shape[-1]
    if landed.dim() >= 4:
        per_head = landed.reshape(-1, *landed.shape[-3:])[0, :, 0, :]
    else:
        per_head = landed[:heads, 0, :]
    return per_head % width


def _fold_projections(gm, values, plan: FoldPlan, config) -> dict[torch.fx.Node, tuple]:
    """New (weight [F2, d], bias) of each projection, keeping surviving columns: Q (and K without
    GQA) rows folded over each group. The V projection's is returned for the expert rewrite."""
    site = plan.site
    folded: dict[torch.fx.Node, list] = {}
    for proj in dict.fromkeys((site.query_node, site.key_node, site.value_node)):  # ordered, not by address
        weight, bias = linear_weight(values, proj)
        folded[proj] = [weight.clone(), None if bias is None else bias.clone()]
    if config.init != "random":
        for proj, columns in plan.head_columns.items():  # columns [H, dh]
            weight, bias = folded[proj]
            source_w, source_b = linear_weight(values, proj)
            for group in plan.members:
                target = columns[group[0]]
                pick = columns[group] if config.fold_qk == "mean" else columns[group[:1]]  # [g, dh]
                weight[target] = source_w[pick].mean(0)
                if bias is not None:
                    bias[target] = source_b[pick].mean(0)
    results = {}
    for proj, (weight, bias) in folded.items():
        keep = plan.masks[proj].reshape(-1, weight.shape[0]).any(0)
        results[proj] = (weight, bias, keep.nonzero().flatten())
        if proj is not site.value_node and not (bool(keep.all()) and proj not in plan.head_columns):
            _set_projection(gm, proj, weight[keep], None if bias is None else bias[keep], site.path)
    return results


def _random_projections(gm, values, plan: FoldPlan, generator) -> dict[torch.fx.Node, tuple]:
    """New random (weight [F2, d], bias [F2] of zeros, all F2 columns) of each projection for the
    new head size, with the original weight's std; Q and K are put in the graph, V is returned for
    the expert rewrite (the Q/K rows of a fused projection stay dense there)."""
    site = plan.site
    results = {}
    for proj in dict.fromkeys((site.query_node, site.key_node, site.value_node)):  # ordered, not by address
        weight, bias = linear_weight(values, proj)  # [F, d]
        rows = plan.sizes.shape(proj)[-1]
        std = float(weight.float().std()) if weight.numel() > 1 else 1.0
        new_weight = (torch.randn(rows, weight.shape[1], generator=generator) * std).to(weight.device, weight.dtype)
        new_bias = None if bias is None else torch.zeros(rows, dtype=bias.dtype, device=bias.device)
        results[proj] = (new_weight, new_bias, torch.arange(rows))
        if proj is not site.value_node:
            role = "qk" if site.query_node is site.key_node else "q" if proj is site.query_node else "k"
            _set_projection(gm, proj, new_weight, new_bias, site.path, role)
    return results


def _resized_columns(plan: FoldPlan, values, node: torch.fx.Node, columns: torch.Tensor) -> torch.Tensor:
    """[n, dh2] columns of the new tensor `node` (last dim) holding the heads whose old columns
    are `columns` [n, dh]; each head's columns must be contiguous and in order."""
    head_dim = columns.shape[1]
    starts = columns[:, 0]
    if not torch.equal(columns, starts[:, None] + torch.arange(head_dim)):
        raise FoldError(f"the heads' dims are not contiguous in {describe(node)}: cannot resize them")
    dim = values[node].dim() - 1
    new_starts = torch.tensor([plan.sizes.count(node, dim, 0, int(start)) for start in starts])
    return new_starts[:, None] + torch.arange(plan.head_dim)


def _set_projection(gm, proj, weight, bias, path, name: str = "folded") -> None:
    """Point a projection node at new weights (`<path>.<name>_weight`, `_bias`); the old ones go
    when nothing reads them any more."""
    graph = gm.graph
    owner = module_at(gm, path)
    _, weight_node, bias_node, transposed = linear_parts(proj)
    weight_name = register(owner, path, f"{name}_weight", (weight.t() if transposed else weight).contiguous())
    with graph.inserting_before(proj):
        new_weight = graph.get_attr(weight_name)
        proj.replace_input_with(weight_node, new_weight)
        if bias is not None and isinstance(bias_node, torch.fx.Node):
            proj.replace_input_with(bias_node, graph.get_attr(register(owner, path, f"{name}_bias", bias)))
    erase_unused(gm, [old for old in (weight_node, bias_node) if isinstance(old, torch.fx.Node)])


def _expert_plan(values, plan: FoldPlan, projection_weights, config, generator, init_scale) -> SitePlan:
    site, members = plan.site, plan.members
    new_heads, group = members.shape
    gqa = site.num_kv_heads < site.num_heads
    num_experts = config.resolved_num_experts(group)
    if config.top_k > num_experts:
        raise FoldError(f"top_k={config.top_k} exceeds num_experts={num_experts}")
    if config.init == "fold" and num_experts < group:
        raise FoldError(f"num_experts={num_experts} is smaller than the fold group of {group} heads")
    v_weight, v_bias, v_kept = projection_weights[site.value_node]
    o_weight, _ = linear_weight(values, site.output_node)
    kv_of_query = site.kv_head_of_query
    kv_heads = kv_of_query[members[:, 0]].unique() if gqa else kv_of_query[members[:, 0]]
    value_columns = site.value_columns[kv_heads]  # [G2, dh]

    o_input = linear_parts(site.output_node)[0]
    if plan.resized:
        value_columns = _resized_columns(plan, values, site.value_node, value_columns)  # [G2, dh2]
        output_columns = _resized_columns(plan, values, o_input, site.output_columns[members[:, 0]])  # [H2, dh2]
    else:
        o_keep = plan.masks[o_input]
        o_keep = o_keep.reshape(-1, o_keep.shape[-1]).any(0)
        new_index = torch.cumsum(o_keep.long(), 0) - 1
        output_columns = new_index[site.output_columns[members[:, 0]]]  # [H2, dh]

    d_in, head_dim = site.embed_dim, plan.head_dim
    if config.init == "random":
        weights = expert_init.random_init(len(kv_heads), new_heads, num_experts, d_in, site.query_dim, head_dim,
                                          site.out_dim, v_bias is not None, init_scale, generator,
                                          v_weight.dtype, v_weight.device)
    else:
        scale_v, scale_o = 2.0 / config.top_k, 2.0 * group / config.top_k
        expert_of = torch.arange(num_experts) % group  # which group member each expert copies
        noise = torch.randn(new_heads, num_experts, generator=generator) * config.fold_noise
        noise[:, :group] = 0.0
        factor = 1 + noise  # [H2, E]
        if gqa:  # V stays per KV head: copies of it
            v_heads = v_weight[value_columns].permute(0, 2, 1)  # [G2, d, dh]
            v_experts = v_heads.unsqueeze(1).expand(-1, num_experts, -1, -1) * scale_v
            v_bias_experts = (v_bias[value_columns].unsqueeze(1).expand(-1, num_experts, -1) * scale_v
                              if v_bias is not None else None)
        else:
            cols = site.value_columns[kv_of_query[members[:, expert_of]]]  # [H2, E, dh]
            v_experts = v_weight[cols].permute(0, 1, 3, 2) * factor[..., None, None] * scale_v  # [H2, E, d, dh]
            v_bias_experts = v_bias[cols] * factor[..., None] * scale_v if v_bias is not None else None
        o_cols = site.output_columns[members[:, expert_of]]  # [H2, E, dh]
        o_experts = o_weight[:, o_cols].permute(1, 2, 3, 0) * factor[..., None, None] * scale_o  # [H2, E, dh, d_out]
        v_input, q_input = linear_parts(site.value_node)[0], site.query_input
        weights = expert_init.ExpertWeights(
            v_experts=v_experts.contiguous(),
            v_experts_bias=None if v_bias_experts is None else v_bias_experts.contiguous(),
            v_router=expert_init.tiny_router(len(kv_heads) * num_experts, d_in, rms(values[v_input]),
                                             config.upcycle_router_scale, generator, v_weight.device),
            o_experts=o_experts.contiguous(),
            o_router=expert_init.tiny_router(new_heads * num_experts, site.query_dim, rms(values[q_input]),
                                             config.upcycle_router_scale, generator, v_weight.device),
        )
    return SitePlan(new_heads, len(kv_heads), value_columns, v_kept, v_weight, v_bias, output_columns, weights)
