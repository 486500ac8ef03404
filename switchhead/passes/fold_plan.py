"""Planning of the fold pass (`fold_heads.py`): which heads fold together and which elements of every
tensor between a site's projections and its O projection survive.

Method
    Query heads are grouped, G = H / H2 per group, inside their KV group (GQA keeps its KV heads).
    Each group keeps its first head's place in the graph. Which elements of every tensor survive is
    learned by replaying element ids from that tensor to the attention core (`lenient` provenance)
    and keeping those that land on a kept head; a NaN rerun checks that dropped heads never leak
    into kept ones. A tensor's new shape is its surviving sub-block, which must be rectangular
    (`resize.MaskSizes`; for a new head size `resize.ScaledSizes`, from masks that also keep p of
    each head's dh positions). Nothing here changes the graph.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from switchhead.graph.ops import MATMUL_OPS, linear_parts
from switchhead.graph.provenance import ProvenanceError, ancestors, region_between, replay, replay_or_raise, rerun
from switchhead.passes import fold_fit
from switchhead.passes.plan import FoldError
from switchhead.passes.resize import MaskSizes, ScaledSizes, probe_positions
from switchhead.site import AttentionSite

aten = torch.ops.aten


@dataclasses.dataclass
class FoldPlan:
    site: AttentionSite
    members: torch.Tensor  # [H2, G] dense query heads of each new head; column 0 keeps its place
    masks: dict[torch.fx.Node, torch.Tensor]  # surviving elements of every tensor in the region (all of dh)
    region: list[torch.fx.Node]  # nodes between the projections and the O projection, in order
    # (projection, [H, dh] columns) of Q and of K without GQA: a list, as one fused projection holds both
    head_columns: list[tuple[torch.fx.Node, torch.Tensor]]
    sizes: MaskSizes | ScaledSizes  # new sizes of the region's tensors
    head_dim: int  # the new head size

    @property
    def resized(self) -> bool:
        return self.head_dim != self.site.head_dim


def projections(site: AttentionSite) -> set[torch.fx.Node]:
    """The site's Q, K and V projection nodes (one node for a fused projection)."""
    return {site.query_node, site.key_node, site.value_node}


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

def plan_fold(values: dict, site: AttentionSite, num_heads: int, head_dim: int | None = None,
              groups: str = "consecutive") -> FoldPlan:
    """Which elements of every tensor between the projections and the O projection survive, and
    the new sizes of those tensors with `num_heads` heads of `head_dim` (None: unchanged).
    groups="similar" groups heads whose scores agree on the example activations where the scores
    are bilinear in the projections (fold_fit.py), consecutive heads elsewhere."""
    query, key = site.core_operands[:2]
    roles = [(site.query_node, query)] + ([(site.key_node, key)] if site.num_kv_heads == site.num_heads else [])
    head_columns = [(proj, _head_columns(values, proj, anchor, site.num_heads)) for proj, anchor in roles]
    members = group_heads(site, num_heads)
    if groups == "similar" and members.shape[1] > 1 and fold_fit.fittable(site, head_columns):
        members = fold_fit.similar_groups(_score_gram(values, head_columns), members)
    head_dim = head_dim or site.head_dim
    masks, region = _surviving(values, site, members[:, 0])
    sizes: MaskSizes | ScaledSizes = MaskSizes(masks)
    if head_dim != site.head_dim:
        probes = [(p, MaskSizes(_surviving(values, site, members[:, 0], positions)[0]))
                  for p, positions in probe_positions(site.head_dim)]
        sizes = ScaledSizes([*probes, (site.head_dim, sizes)], head_dim)
    return FoldPlan(site, members, masks, region, head_columns, sizes, head_dim)

def _score_gram(values, head_columns) -> torch.Tensor:
    """[H, H] inner products of the dense heads' scores on the example activations."""
    (queries, xq), (keys, xk) = (fold_fit.head_rows(values, proj, columns) for proj, columns in head_columns)
    return fold_fit.score_gram(queries, keys, xq, xk)


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
    projected = projections(site)
    core_out, o_input = site.core_node, linear_parts(site.output_node)[0]
    region = region_between(projected, o_input)
    region = [n for n in region if n not in projected]

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
    for node in [*projected, *region]:
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
        _check_no_leak(values, site, projected, anchors, masks)
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
