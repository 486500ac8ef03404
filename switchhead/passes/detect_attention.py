"""Pass: find every multi-head attention and trace it to its V projection, O projection and query.

Contract
    Input: an exported fx GraphModule and a PassState with the example value of every node
    (capture.record_values).
    Output: an AttentionSite per rewritable attention core (`state.sites`) and a SkippedSite
    (one-line reason) per softmax / SDPA that is not one (`state.skipped`); counters `sites` and
    `skipped`. The graph is never modified.

Method (dataflow, no per-model patterns)
    1. Cores: every SDPA node, and every softmax over the last dim whose output (through casts and
       dropout) is the left operand of a matmul/bmm/einsum, and whose input (through masks, scales
       and biases) is a matmul/bmm/baddbmm/einsum: the query-key product.
    2. Value: walk back from the core's value operand through pure data-movement ops (and through a
       KV-cache write to the values written) to a linear map with a parameter weight. Replaying
       feature ids from that projection (graph.provenance) gives each KV head's projection columns,
       whatever the split / view / interleave / GQA expansion / cache.
    3. Output: walk forward from the core output through data movement to a linear map; replaying
       (head, dim) ids gives the columns of each head at the O projection's input.
    4. Query: the one linear map the query depends on; its input routes the O experts. Replaying row
       ids through the query path (RoPE, norms and scales pass row ids through) proves that its rows
       line up with the O projection's rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from switchhead.graph.ops import (
    CACHE_WRITE_OPS,
    CAST_OPS,
    LAYOUT_OPS,
    MATMUL_OPS,
    NOOP_OPS,
    SDPA_OPS,
    SOFTMAX_OPS,
    is_pointwise,
    linear_parts,
)
from switchhead.graph.provenance import region_between, replay_or_raise
from switchhead.graph.surgery import attribute
from switchhead.passes.plan import PassResult, PassState, SiteRejected
from switchhead.site import AttentionSite, SkippedSite

aten = torch.ops.aten
_PASS_THROUGH = LAYOUT_OPS | CAST_OPS | NOOP_OPS | {aten.dropout.default}
_MAX_SCORE_DEPTH = 24
# Reshapes between the score product, the softmax and the value product (HF Bloom views its
# [B*H, T, S] scores as [B, H, T, S] around the softmax).
_SCORE_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                 aten.contiguous.default}


def module_of(node: torch.fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module a node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", "<root>"
    path, cls = list(stack.values())[-1]
    return path, _class_name(cls)


def _class_name(cls: Any) -> str:
    return getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1].rstrip("'>")


def _attention_module(core: torch.fx.Node, projections: list[torch.fx.Node]) -> tuple[str, str]:
    """(path, class name) of the innermost module that holds the core and the projections: the
    attention module, where the new parameters go (x-transformers computes the softmax in `Attend`,
    a child without parameters that the exported graph module does not have)."""
    def paths(node: torch.fx.Node) -> set[str]:
        return {path for path, _ in (node.meta.get("nn_module_stack") or {}).values()}
    shared = set.intersection(*(paths(p) for p in projections))
    for path, cls in reversed(list((core.meta.get("nn_module_stack") or {}).values())):
        if path in shared:
            return path, _class_name(cls)
    return "", "<root>"


class _Graph:
    """Per-graph caches: which nodes are parameter-derived constants."""

    def __init__(self, gm: torch.fx.GraphModule, values: dict[torch.fx.Node, Any]):
        self.gm = gm
        self.values = values
        self._const: dict[torch.fx.Node, bool] = {}

    def is_parameter_derived(self, node: Any) -> bool:
        """True for a node computed from trainable parameters alone (a weight, or a slice of one)."""
        if not isinstance(node, torch.fx.Node):
            return False
        if node not in self._const:
            if node.op == "get_attr":
                self._const[node] = isinstance(attribute(self.gm, node.target), torch.nn.Parameter)
            elif node.op == "placeholder" or not node.all_input_nodes:
                self._const[node] = False
            else:
                self._const[node] = all(
                    self.is_parameter_derived(a) for a in node.all_input_nodes
                )
        return self._const[node]

    def projection(self, node: torch.fx.Node):
        parts = linear_parts(node)
        if parts is None:
            return None
        data, weight, bias, _ = parts
        if self.is_parameter_derived(weight) and not self.is_parameter_derived(data):
            return parts
        return None


def detect_attention(gm: torch.fx.GraphModule, state: PassState) -> PassResult:
    """Find the attention sites of `gm` (into `state.sites`, the rest into `state.skipped`); see the
    module docstring for the contract. Counters: `sites`, `skipped`."""
    graph = _Graph(gm, state.values)
    sites, skipped = state.sites, state.skipped
    found_before, skipped_before = len(sites), len(skipped)
    claimed: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_OPS | SOFTMAX_OPS:
            continue
        kind = "sdpa" if node.target in SDPA_OPS else "softmax"
        path, _ = module_of(node)
        try:
            site = _trace_site(graph, node, kind)
            if site.value_node in claimed or site.output_node in claimed:
                raise SiteRejected("its projections already belong to another attention")
        except SiteRejected as rejected:
            skipped.append(SkippedSite(path, kind, str(rejected)))
            continue
        claimed.update((site.value_node, site.output_node))
        sites.append(site)
    return PassResult(gm, False, {"sites": len(sites) - found_before, "skipped": len(skipped) - skipped_before})


# --------------------------------------------------------------------------------------------- core


def _operands(node: torch.fx.Node) -> tuple[Any, Any]:
    """(left, right) operands of a matmul-like node."""
    spec = MATMUL_OPS[node.target]
    if spec is None:  # einsum(equation, [a, b])
        operands = node.args[1]
        if len(operands) != 2 or einsum_subscripts(node.args[0]) is None:
            raise SiteRejected(f"einsum '{node.args[0]}' is not a batched matrix product")
        return operands[0], operands[1]
    return node.args[spec[0]], node.args[spec[1]]


def einsum_subscripts(equation: str) -> tuple[str, str, str] | None:
    """(a, b, out) subscripts of '...ij,...jk->...ik' or of the score form '...id,...jd->...ij'.

    The output keeps the left operand's batch letters; the right operand's batch letters are some
    of them in the same order: it is broadcast over the others (multi-query attention written
    einsum('bhqd,bkd->bhqk') / einsum('bhqk,bkd->bhqd'), as PaLM does). None for anything else.
    """
    lhs, _, out = equation.replace(" ", "").partition("->")
    a, _, b = lhs.partition(",")
    if "." in equation or not (len(a) == len(out) >= 2 <= len(b)) or any(len(set(s)) != len(s) for s in (a, b, out)):
        return None
    batch, letters = a[:-2], iter(a[:-2])
    if out[:-2] != batch or not all(c in letters for c in b[:-2]):
        return None
    product = b[-2] == a[-1] and out[-2:] == a[-2] + b[-1]
    scores = b[-1] == a[-1] and out[-2:] == a[-2] + b[-2]
    return (a, b, out) if product or scores else None


def _as_read_by(graph: _Graph, product: torch.fx.Node, ids: torch.Tensor) -> torch.Tensor:
    """Ids of a product's right operand as the product reads it: an einsum broadcasts it over the
    batch letters it lacks, so the value of MQA einsum('bhqk,bkd->bhqd') reads as [b, h, k, d]."""
    if product.target is not aten.einsum.default:
        return ids
    a, b, _ = einsum_subscripts(product.args[0])
    if len(b) == len(a):
        return ids
    sizes = iter(ids.shape[:-2])
    shape = [next(sizes) if letter in b else 1 for letter in a[:-2]] + list(ids.shape[-2:])
    left = graph.values[_operands(product)[0]]
    return ids.reshape(shape).expand(*left.shape[:-2], *ids.shape[-2:])


def _softmax_core(graph: _Graph, softmax: torch.fx.Node) -> tuple[Any, Any, Any, torch.fx.Node]:
    """(query, key, value, core output) of a softmax attention, or SiteRejected."""
    scores = graph.values[softmax.args[0]]
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if not isinstance(scores, torch.Tensor) or scores.dim() < 2 or dim not in (-1, scores.dim() - 1):
        raise SiteRejected("softmax is not over the last dim of a score matrix")
    products, frontier = [], [softmax]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user.op != "call_function":
                continue
            if user.target in MATMUL_OPS and _operands(user)[0] is current:
                products.append(user)
            elif user.target in CAST_OPS | NOOP_OPS | _SCORE_LAYOUT | {aten.dropout.default}:
                frontier.append(user)
    if len(products) != 1:
        raise SiteRejected(
            "softmax output does not multiply a value tensor (not attention)"
            if not products else "softmax output multiplies several tensors"
        )
    product = products[0]
    # Back from the softmax through what may sit between scores and softmax: scales, masks, biases,
    # soft-capping, casts (pointwise ops), following the operand shaped like the scores.
    node = softmax.args[0]
    for _ in range(_MAX_SCORE_DEPTH):
        if node.op != "call_function":
            break
        if node.target in MATMUL_OPS:
            query, key = _operands(node)
            return query, key, _operands(product)[1], product
        if not (is_pointwise(node.target) or node.target in CAST_OPS | NOOP_OPS | _SCORE_LAYOUT):
            break
        rank = graph.values[node].dim()
        scores_like = [node.args[0]] if node.target in _SCORE_LAYOUT else [
            a for a in node.all_input_nodes
            if isinstance(graph.values.get(a), torch.Tensor) and graph.values[a].dim() == rank
            and not graph.is_parameter_derived(a)]
        if not scores_like:
            break
        node = scores_like[0]
    raise SiteRejected("softmax input is not a query-key product")


def _find_core(graph: _Graph, node: torch.fx.Node, kind: str) -> tuple[Any, Any, Any, torch.fx.Node]:
    if kind == "sdpa":
        return node.args[0], node.args[1], node.args[2], node
    return _softmax_core(graph, node)


# --------------------------------------------------------------------------------------- tracing


def _walk_back_to_projection(graph: _Graph, node: Any) -> torch.fx.Node:
    while isinstance(node, torch.fx.Node):
        if graph.projection(node):
            return node
        if node.op == "call_function" and node.target in CACHE_WRITE_OPS:  # V read back from a KV cache
            node = node.args[CACHE_WRITE_OPS[node.target][1]]
            continue
        if node.op != "call_function" or node.target not in _PASS_THROUGH or node.target in (aten.cat.default, aten.stack.default):
            break
        node = node.args[0]
    raise SiteRejected("value does not come from a linear projection")


def _walk_forward_to_projection(graph: _Graph, core_out: torch.fx.Node) -> torch.fx.Node:
    found, frontier, seen = [], [core_out], {core_out}
    while frontier:
        current = frontier.pop()
        for user in current.users:
            parts = graph.projection(user)
            if parts and parts[0] is current:
                found.append(user)
            elif user.op == "call_function" and user.target in _PASS_THROUGH and user not in seen:
                seen.add(user)
                frontier.append(user)
    if len(found) != 1:
        raise SiteRejected(
            "attention output does not reach a linear projection" if not found
            else "attention output reaches several projections"
        )
    return found[0]


def _source_projection(graph: _Graph, operand: Any, role: str) -> torch.fx.Node:
    """The one linear map a query / key operand of the core is computed from (through anything)."""
    if not isinstance(operand, torch.fx.Node):
        raise SiteRejected(f"{role} is not a graph value")
    found, stack, seen = set(), [operand], {operand}
    while stack:
        node = stack.pop()
        if graph.projection(node):
            found.add(node)
            continue
        for arg in node.all_input_nodes:
            if arg not in seen and arg.op == "call_function" and not graph.is_parameter_derived(arg):
                seen.add(arg)
                stack.append(arg)
    if len(found) != 1:
        raise SiteRejected(
            f"{role} does not come from a linear projection" if not found
            else f"{role} depends on several projections"
        )
    return found.pop()


def _ids(shape: torch.Size, kind: str) -> torch.Tensor:
    """Seed ids for a projection output [..., F]: feature index, or row (token) index."""
    if kind == "feature":
        return torch.arange(shape[-1]).expand(shape).contiguous()
    rows = math.prod(shape[:-1])
    return torch.arange(rows).view(*shape[:-1], 1).expand(shape).contiguous()


def _replay(graph: _Graph, source: torch.fx.Node, target: Any, seed: torch.Tensor, mode: str, what: str) -> torch.Tensor:
    if target is source:
        return seed
    prov = replay_or_raise(region_between([source], target), {source: seed}, graph.values, mode,
                           lambda message: SiteRejected(f"{what} path: {message}"))
    result = prov.get(target)
    if not isinstance(result, torch.Tensor) or result.shape != graph.values[target].shape:
        raise SiteRejected(f"{what} path could not be followed")
    return result


def _constant_along(ids: torch.Tensor, dim: int) -> bool:
    return bool((ids == ids.select(dim, 0).unsqueeze(dim)).all())


def _projection_label(proj: torch.fx.Node, role: str, fused: bool, attention_type: str) -> str:
    """e.g. 'separate linear (Linear)', 'fused QKV addmm (Conv1D)', 'in-projection linear (MultiheadAttention)'."""
    op = {aten.linear.default: "linear", aten.addmm.default: "addmm"}.get(proj.target, "matmul")
    _, owner = module_of(proj)
    if owner == attention_type:  # called functionally inside the attention module itself
        kind = "in-projection" if role == "value" else "out-projection"
        return f"{'fused ' if fused else ''}{kind} {op} ({owner})"
    return f"{'fused QKV' if fused else 'separate'} {op} ({owner})"


def _trace_site(graph: _Graph, node: torch.fx.Node, kind: str) -> AttentionSite:
    values = graph.values
    query, key, value, core_out = _find_core(graph, node, kind)
    if not isinstance(value, torch.fx.Node):
        raise SiteRejected("value is not a graph value")

    # Value: each KV head's columns in the V projection.
    v_proj = _walk_back_to_projection(graph, value)
    v_shape = values[v_proj].shape
    v_features = _replay(graph, v_proj, value, _ids(v_shape, "feature"), "exact", "value")
    v_features = _as_read_by(graph, core_out, v_features)
    if v_features.dim() < 3:
        raise SiteRejected("value tensor has no head dimension")
    head_dim = v_features.shape[-1]
    if not _constant_along(v_features, -2):
        raise SiteRejected("value features vary along the sequence")
    rows = v_features.select(-2, 0)  # [*lead, dh]
    lead_shape = rows.shape[:-1]
    columns, class_of_lead = torch.unique(rows.reshape(-1, head_dim), dim=0, return_inverse=True)
    if any(row.unique().numel() != head_dim for row in columns) or columns.unique().numel() != columns.numel():
        raise SiteRejected("value heads overlap in the projection")
    num_kv_heads = columns.shape[0]

    # Query heads, and the KV head each one reads.
    out_value = values[core_out]
    if not isinstance(out_value, torch.Tensor) or out_value.dim() != v_features.dim() or out_value.shape[-1] != head_dim:
        raise SiteRejected("attention output does not have the value's layout")
    o_proj = _walk_forward_to_projection(graph, core_out)
    o_input, o_weight, _, o_transposed = linear_parts(o_proj)
    if out_value.dim() >= 4:
        num_heads, v_heads = out_value.shape[-3], lead_shape[-1]
        per_head = class_of_lead.view(-1, v_heads)
        if not bool((per_head == per_head[0]).all()):
            raise SiteRejected("value heads differ between batch elements")
        if num_heads % v_heads:
            raise SiteRejected("query heads are not a multiple of value heads")
        kv_of_query = per_head[0].repeat_interleave(num_heads // v_heads)
    else:
        # [batch * H, T, dh]: the heads are what the O projection reads per token (GQA repeats the
        # KV heads across the merged dim, so the value alone does not tell H).
        num_heads = values[o_input].shape[-1] // head_dim
        lead = class_of_lead.view(-1, num_heads) if num_heads and class_of_lead.numel() % num_heads == 0 else None
        if lead is None or not bool((lead == lead[0]).all()):
            raise SiteRejected("batch and head dims are merged in an unknown order")
        kv_of_query = lead[0]

    # Output: columns of each query head at the O projection's input.
    out_features, out_tokens = _core_output_ids(out_value, num_heads)
    z_features = _replay(graph, core_out, o_input, out_features, "exact", "output")
    z_tokens = _replay(graph, core_out, o_input, out_tokens, "exact", "output")
    width = num_heads * head_dim
    z_features = z_features.reshape(-1, z_features.shape[-1])
    if z_features.shape[-1] != width or not bool((z_features == z_features[0]).all()):
        raise SiteRejected("output projection input is not exactly the attention heads")
    if z_features[0].sort().values.ne(torch.arange(width)).any() or not _constant_along(z_tokens, -1):
        raise SiteRejected("output projection input mixes heads or tokens")
    output_columns = z_features[0].argsort().view(num_heads, head_dim)
    z_rows = z_tokens.reshape(-1, width)[:, 0]

    # Query: its projection's input routes the O experts; its rows must be the O rows.
    q_proj = _source_projection(graph, query, "query")
    k_proj = _source_projection(graph, key, "key")
    q_input = linear_parts(q_proj)[0]
    q_rows = _replay(graph, q_proj, query, _ids(values[q_proj].shape, "row"), "rows", "query")
    row_of_token = _query_row_of_token(q_rows, num_heads)
    q_input_rows = math.prod(values[q_input].shape[:-1])
    if row_of_token is None or z_rows.numel() != q_input_rows or not torch.equal(row_of_token[z_rows], torch.arange(q_input_rows)):
        raise SiteRejected("query rows are not aligned with the output projection's rows")

    v_input = linear_parts(v_proj)[0]
    o_weight_value = values[o_weight]
    path, module_type = _attention_module(node, [v_proj, o_proj])
    return AttentionSite(
        path=path,
        module_type=module_type,
        core=kind,
        num_heads=int(num_heads),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        embed_dim=int(values[v_input].shape[-1]),
        query_dim=int(values[q_input].shape[-1]),
        out_dim=int(o_weight_value.shape[1] if o_transposed else o_weight_value.shape[0]),
        cross=v_input is not q_input,
        value_projection=_projection_label(v_proj, "value", v_shape[-1] != num_kv_heads * head_dim, module_type),
        output_projection=_projection_label(o_proj, "output", False, module_type),
        value_node=v_proj,
        value_columns=columns,
        kv_head_of_query=kv_of_query,
        output_node=o_proj,
        output_columns=output_columns,
        query_input=q_input,
        core_node=core_out,
        query_node=q_proj,
        key_node=k_proj,
        core_operands=(query, key, value),
    )


def _core_output_ids(out: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature ids (head * dh + j) and token ids (batch * T + t) of the core output.

    Rank >= 4 outputs are [*batch, H, T, dh]; rank 3 outputs are [batch * H, T, dh], batch-major.
    """
    shape = out.shape
    seq, head_dim = shape[-2], shape[-1]
    if out.dim() >= 4:
        head = torch.arange(num_heads).view(num_heads, 1, 1)
        batch = torch.arange(math.prod(shape[:-3])).view(*shape[:-3], 1, 1, 1)
    else:
        lead = torch.arange(shape[0]).view(-1, 1, 1)
        head, batch = lead % num_heads, lead // num_heads
    features = (head * head_dim + torch.arange(head_dim)).expand(shape)
    tokens = (batch * seq + torch.arange(seq).view(seq, 1)).expand(shape)
    return features.contiguous(), tokens.contiguous()


def _query_row_of_token(q_rows: torch.Tensor, num_heads: int) -> torch.Tensor | None:
    """Query-projection row of each core token (batch * T + t); None if rows differ across heads."""
    if q_rows.dim() < 4:  # [batch * H, T, dq] -> [batch, H, T, dq]
        if q_rows.shape[0] % num_heads:
            return None
        q_rows = q_rows.reshape(-1, num_heads, *q_rows.shape[1:])
    seq = q_rows.shape[-2]
    per_token = q_rows.movedim(-3, -1).reshape(-1, seq, q_rows.shape[-1] * q_rows.shape[-3])
    if not _constant_along(per_token, -1):
        return None
    return per_token[..., 0].reshape(-1)
