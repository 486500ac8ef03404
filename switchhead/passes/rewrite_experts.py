"""Pass: rewrite each detected site's V and O projections into SwitchHead expert ops.

Contract
    Input: the GraphModule and a PassState with the example values that detection saw, its
    AttentionSites, the config and any plans of head folding.
    Output: the same GraphModule, rewritten in place; the plan applied to each site in
    `state.applied`; counters `expert_v`, `expert_o` (one each per site) and `rewrites` (both).
    - The V projection's V columns become `switchhead::expert_v` routed on the V projection's input
      (the source tokens); other columns of a fused projection keep a dense linear, and the columns
      are put back in their original order, so everything downstream is untouched.
    - The O projection becomes `switchhead::expert_o` routed on the query projection's input (the
      destination tokens); the dense bias stays one shared bias.
    - Routers compute in fp32, autocast or not: logits = x W_r^T, top-k per head (by comparisons,
      kernels/select.py), gates = sigmoid(chosen logits). Where V and O read the same tokens
      (self-attention) both routers share one GEMM over their stacked weights.
    - The expert ops get `config.expert_impl` when it is not "auto" (kernels/choice.py).
    - Q, K, positional terms, masks and the attention core are not touched.
    - New parameters live on the attention's module path (`<path>.v_experts`, `.v_router`,
      `.o_experts`, `.o_router`, ...); replaced dense weights that nothing reads any more are removed.
    - Inserted reshapes use the tokens' runtime sizes, so dynamic batch / sequence sizes keep working.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from switchhead import experts as expert_init
from switchhead.config import SwitchHeadConfig
from switchhead.graph.ops import linear_parts
from switchhead.graph.surgery import drop_unused_attributes, ensure_module, erase_dead, linear_weight, register, rms
from switchhead.kernels.select import select_experts
from switchhead.passes.plan import PassResult, PassState, SitePlan
from switchhead.site import AttentionSite

aten = torch.ops.aten
ROUTER_META = "switchhead_router"  # on each router's top-k node: the router parameter's name


def rewrite_experts(gm: torch.fx.GraphModule, state: PassState) -> PassResult:
    """Rewrite every site of `state` in place (2 projections each); `state.applied` gets the plan
    applied to each site.

    `state.plans` maps a site's index to a precomputed plan (head folding makes its own); the others
    get the upcycle or random plan of the config.
    """
    config, values = state.config, state.values
    generator, init_scale = expert_init.init_setup(config.seed, config.init_scale, len(state.sites))
    replaced_attrs: set[str] = set()
    for index, site in enumerate(state.sites):
        plan = state.plans.get(index) or dense_plan(values, site, config, generator, init_scale)
        _rewrite_site(gm, values, site, plan, config, replaced_attrs)
        state.applied.append(plan)
    gm.graph.lint()
    drop_unused_attributes(gm, replaced_attrs)
    gm.recompile()
    count = len(state.sites)
    return PassResult(gm, count > 0, {"expert_v": count, "expert_o": count, "rewrites": 2 * count})


def dense_plan(values, site: AttentionSite, config: SwitchHeadConfig, generator, init_scale) -> SitePlan:
    """Same heads as the dense model: upcycled copies of each head, or the paper's random init."""
    v_weight, v_bias = linear_weight(values, site.value_node)  # [F, d], [F]
    o_weight, _ = linear_weight(values, site.output_node)  # [d_out, H*dh]
    cols = site.value_columns  # [G, dh]
    num_experts = config.resolved_num_experts(group_size=1)
    if config.init == "random":
        weights = expert_init.random_init(
            site.num_kv_heads, site.num_heads, num_experts, site.embed_dim, site.query_dim,
            site.head_dim, site.out_dim, v_bias is not None, init_scale, generator,
            v_weight.dtype, v_weight.device,
        )
    else:
        weights = expert_init.upcycle(
            v_weight[cols].permute(0, 2, 1),  # [G, d, dh]
            v_bias[cols] if v_bias is not None else None,  # [G, dh]
            o_weight[:, site.output_columns].permute(1, 2, 0),  # [H, dh, d_out]
            site.query_dim, num_experts, config.top_k,
            rms(values[linear_parts(site.value_node)[0]]), rms(values[site.query_input]),
            config.upcycle_router_scale, generator,
        )
    return SitePlan(site.num_heads, site.num_kv_heads, cols, torch.arange(v_weight.shape[0]), v_weight, v_bias,
                    site.output_columns, weights)


def _rewrite_site(gm, values, site: AttentionSite, plan: SitePlan, config: SwitchHeadConfig, replaced_attrs):
    v_proj, o_proj = site.value_node, site.output_node
    v_input = linear_parts(v_proj)[0]
    o_input = linear_parts(o_proj)[0]
    weights = plan.weights
    owner = ensure_module(gm, site.path)
    names = {
        name: register(owner, site.path, name, tensor)
        for name, tensor in (
            ("v_experts", weights.v_experts), ("v_experts_bias", weights.v_experts_bias),
            ("v_router", weights.v_router), ("o_experts", weights.o_experts), ("o_router", weights.o_router),
        ) if tensor is not None
    }
    num_experts = weights.v_experts.shape[1]

    graph = gm.graph
    before = set(graph.nodes)
    impl = () if config.expert_impl == "auto" else (config.expert_impl,)  # default graphs stay as before

    # ---- V: fan-out expert projection routed on the source tokens. The projection's surviving
    # columns are rebuilt in their original order: [dense rest | experts] -> permutation.
    cols = plan.value_columns.flatten()
    kept = plan.value_projection_columns
    rest = kept[~torch.isin(kept, cols)]
    # Self-attention routes V and O on the same tokens: one fp32 router GEMM for both (on the 262M model
    # at 16k tokens, two [N, d] x [d, 16] fp32 GEMMs took 44 us each, 4% of a training step).
    shared = site.query_input is v_input
    with graph.inserting_before(v_proj):
        x2, lead = _rows(graph, v_input, values[v_input].dim(), site.embed_dim)
        routes = _routers(graph, x2, [(names["v_router"], plan.num_kv_heads)]
                          + ([(names["o_router"], plan.num_heads)] if shared else []), num_experts, config.top_k)
        index, gates = routes[0]
        v_out = graph.call_function(torch.ops.switchhead.expert_v.default, (
            x2, graph.get_attr(names["v_experts"]),
            graph.get_attr(names["v_experts_bias"]) if "v_experts_bias" in names else None, index, gates,
            *impl))
        if rest.numel():
            rest_w = register(owner, site.path, "v_rest_weight", plan.value_weight[rest].clone())
            rest_b = (register(owner, site.path, "v_rest_bias", plan.value_bias[rest].clone())
                      if plan.value_bias is not None else None)
            dense = graph.call_function(aten.linear.default, (x2, graph.get_attr(rest_w), graph.get_attr(rest_b) if rest_b else None))
            v_out = graph.call_function(aten.cat.default, ([dense, v_out], -1))
        # position of each surviving column (ascending feature order) in [rest | experts]
        order = torch.cat([rest, cols]).argsort()
        if not torch.equal(order, torch.arange(order.numel())):
            order_name = register(owner, site.path, "v_column_order", order, buffer=True)
            v_out = graph.call_function(aten.index_select.default, (v_out, -1, graph.get_attr(order_name)))
        v_new = _unrows(graph, v_out, lead, kept.numel())
    before = _replace(graph, v_proj, v_new, before, replaced_attrs)

    # ---- O: fan-in expert projection routed on the destination (query) tokens.
    head_dim = plan.output_columns.shape[1]  # the plan's: a head-size change differs from the site's
    width = plan.num_heads * head_dim
    o_bias = linear_parts(o_proj)[2]
    with graph.inserting_before(o_proj):
        z2, lead = _rows(graph, o_input, values[o_input].dim(), width)
        head_columns = plan.output_columns.flatten()
        if not torch.equal(head_columns, torch.arange(width)):
            order_name = register(owner, site.path, "o_column_order", head_columns.clone(), buffer=True)
            z2 = graph.call_function(aten.index_select.default, (z2, -1, graph.get_attr(order_name)))
        heads = graph.call_function(aten.reshape.default, (z2, [-1, plan.num_heads, head_dim]))
        if shared:
            index, gates = routes[1]
        else:
            q2, _ = _rows(graph, site.query_input, values[site.query_input].dim(), site.query_dim)
            index, gates = _routers(graph, q2, [(names["o_router"], plan.num_heads)], num_experts, config.top_k)[0]
        o_out = graph.call_function(torch.ops.switchhead.expert_o.default, (
            heads, graph.get_attr(names["o_experts"]), index, gates, *impl))
        if o_bias is not None:
            o_out = graph.call_function(aten.add.Tensor, (o_out, o_bias))
        o_new = _unrows(graph, o_out, lead, site.out_dim)
    _replace(graph, o_proj, o_new, before, replaced_attrs)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, d], router weight [heads*E, d] -> logits [N, heads*E] in fp32, whatever autocast is on.

    The paper's routers compute in fp32; a bare fp32 linear in the graph would be cast to bf16/fp16
    by autocast (linear is on its lower-precision list), top-k would then rank bf16 logits and the
    gates would be bf16. The autocast-off regions survive torch.compile, torch.export (as
    `wrap_with_autocast` HOPs, so `switchhead.save`/`load` keep them; checked on torch 2.14) and
    ONNX export.
    """
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        return torch.nn.functional.linear(x.float(), weight.float())


def router_logits_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """router_logits for graphs that never run under autocast (ONNX has none): the same fp32 linear
    without the autocast-off regions, which torch.export turns into two subgraphs per router and
    then takes most of its time splitting (about 45 s of a 60 s export of a 30-layer model)."""
    return torch.nn.functional.linear(x.float(), weight.float())


def _routers(graph: torch.fx.Graph, x2: torch.fx.Node, routers: list[tuple[str, int]], num_experts: int,
             top_k: int) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """Routers reading the same tokens x2 [N, d], as (router parameter name, heads) -> one fp32 GEMM
    for all of them (their weights stacked), then top-k per head by comparisons (kernels/select.py)
    -> per router (expert index [N, heads, k], gates [N, heads, k])."""
    weights = [graph.get_attr(name) for name, _ in routers]
    stacked = weights[0] if len(weights) == 1 else graph.call_function(aten.cat.default, (weights, 0))
    # fp32 also when the module is later cast to half precision, or runs under autocast
    logits = graph.call_function(router_logits, (x2, stacked))  # [N, sum(heads) * E]
    out, start = [], 0
    for name, heads in routers:
        part = logits
        if len(routers) > 1:
            part = graph.call_function(aten.slice.Tensor, (logits, 1, start, start + heads * num_experts))
        start += heads * num_experts
        part = graph.call_function(aten.reshape.default, (part, [-1, heads, num_experts]))
        top = graph.call_function(select_experts, (part, top_k))
        top.meta[ROUTER_META] = name
        out.append((graph.call_function(operator.getitem, (top, 0)), graph.call_function(operator.getitem, (top, 1))))
    return out


def _rows(graph: torch.fx.Graph, x: torch.fx.Node, rank: int, width: int) -> tuple[torch.fx.Node, list]:
    """x [..., width] -> ([N, width], runtime sizes of the leading dims)."""
    if rank == 2:
        return x, []
    lead = [graph.call_function(aten.sym_size.int, (x, i)) for i in range(rank - 1)]
    return graph.call_function(aten.reshape.default, (x, [-1, width])), lead


def _unrows(graph: torch.fx.Graph, y: torch.fx.Node, lead: list, width: int) -> torch.fx.Node:
    if not lead:
        return y
    return graph.call_function(aten.reshape.default, (y, [*lead, width]))


def _replace(graph: torch.fx.Graph, old: torch.fx.Node, new: torch.fx.Node, before: set, replaced_attrs: set[str]) -> set:
    """Swap `old` for `new`; the nodes added since `before` inherit old's module path (for reports)."""
    stack = old.meta.get("nn_module_stack", {})
    for node in graph.nodes:
        if node not in before:
            node.meta["nn_module_stack"] = stack
    old.replace_all_uses_with(new)
    replaced_attrs |= erase_dead(graph, [old])
    return set(graph.nodes)
