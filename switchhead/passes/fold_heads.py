"""Pass: give each attention fewer heads (H -> H2), folding groups of dense heads into experts.

Contract
    Input: the GraphModule and a PassState with the example values and AttentionSites that
    detection produced and a config with `num_heads` or `head_dim` (and init "fold" or "random").
    Output: the graph computes attention with H2 heads; per site a SitePlan (`state.plans`) for the expert rewrite,
    whose V/O experts are the folded heads. Everything between the Q/K/V projections and the O
    projection that carries a head dimension is resized: views, reshapes, expands (GQA repeats),
    splits and slices of fused projections, the SDPA / matmul operands, and masks or positional terms
    that broadcast over heads. Batch and sequence sizes stay symbolic.

Method
    Planning (`fold_plan.py`) groups the heads and learns which elements of every tensor survive;
    then every op's size arguments are rewritten by the planner of its op (`fold_edits.py`, all
    checked before the first edit), per-head operands from outside are folded, the Q/K/V
    projections get their new rows and the experts are built (`experts.fold`, `experts.random_init`).

Folding rules (documented for users)
    Q (and K, without GQA): each new head gets the mean (fold_qk="mean") or the first
    (fold_qk="first") of its group's heads, column by column; or (fold_qk="fit") Q and K rows whose
    scores best match the mean of the group's scores on the example activations (fold_fit.py), where
    the scores are bilinear in the projections (no RoPE, no q/k norm, no GQA), the mean elsewhere. V/O: expert e of a new head is the
    group's head e; with E > G, expert e copies head e mod G times (1 + fold_noise * N(0, 1)).
    V experts are scaled by 2/k and O experts by 2G/k, so with routers at sigmoid(0) = 1/2 the k
    active V experts average and the O experts add up like the dense group's heads did. Routers
    start tiny and random as with upcycling, or (fold_router="contribution") fitted so that each
    token's top-k experts are its group's heads that contributed most to it (fold_route.py). With
    GQA the V experts are copies of their KV head. Heads are grouped consecutively, or
    (fold_groups="similar") by how alike their scores are on the example activations (fold_plan.py,
    fold_fit.py).
    H2 = H and E = 1 reproduces the dense model exactly; any real fold is lossy and needs healing.

New head size (init="random" with head_dim, `resize.py`)
    Sizes are learned as for folding, from masks that also keep p of each head's dh positions, for
    two p; they are affine in p and extrapolated to dh2. Q/K projections get new random weights
    with the original's std (biases zero), V/O experts the paper's random init at dh2; the softmax
    scale, RoPE tables and Q/K norm weights follow dh2, or the site is refused.
"""

from __future__ import annotations


import torch
import torch.fx

from switchhead import experts as expert_init
from switchhead.config import SwitchHeadConfig
from switchhead.errors import ConfigMismatchError
from switchhead.graph.cache_writes import whole_view_base
from switchhead.graph.ops import CACHE_WRITE_OPS, linear_parts
from switchhead.graph.provenance import describe
from switchhead.graph.surgery import erase_unused, linear_weight, module_at, register, rms
from switchhead.passes import fold_fit, fold_route
from switchhead.passes.fold_edits import fold_external_operands, head_size_operands, size_edit
from switchhead.passes.fold_plan import FoldPlan, plan_fold
from switchhead.passes.plan import FoldError, PassResult, PassState, SitePlan
from switchhead.passes.resize import ScaledSizes, rescale_scores, resize_head_operand
from switchhead.site import AttentionSite


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
            folds.append(plan_fold(values, site, config.num_heads or site.num_heads, config.head_dim, config.fold_groups))
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
        counters["resized_caches"] = counters.get("resized_caches", 0) + _resize_caches(fold, state)
    erase_unused(gm, list(copies))
    return PassResult(gm, bool(folds), counters)

def _resize_caches(fold: FoldPlan, state: PassState) -> int:
    """Record the new shape of each KV cache input the site writes into (the written tensor's, at
    the kept heads and new head size): the caller passes a cache of that shape."""
    count = 0
    for node in fold.region:
        if node.op != "call_function" or node.target not in CACHE_WRITE_OPS:
            continue
        cache = whole_view_base(node.args[CACHE_WRITE_OPS[node.target][0]])
        if cache.op != "placeholder":
            raise FoldError("the KV cache it writes is not a graph input (a buffer cannot be resized): pass the "
                            "cache as an input (switchhead.convert_decoder does)")
        state.resized_inputs[cache.target] = list(fold.sizes.shape(node))
        count += 1
    return count


def _mismatch(site: AttentionSite, exc: FoldError, config: SwitchHeadConfig) -> ConfigMismatchError:
    if config.head_dim is None:
        return ConfigMismatchError(f"cannot fold the heads of {site.path or '<root>'}: {exc}")
    return ConfigMismatchError(f"cannot resize the heads of {site.path or '<root>'} to head_dim={config.head_dim}: "
                               f"{exc}; change num_heads / head_dim or exclude this module with module_filter")

def apply_fold(gm: torch.fx.GraphModule, values: dict, plan: FoldPlan, config: SwitchHeadConfig,
               generator: torch.Generator, init_scale: float, copies: dict | None = None,
               counters: dict[str, int] | None = None) -> SitePlan:
    """Resize the site's graph to the kept heads (and new head size) and build its expert plan.
    `copies` shares the positional chains copied for a new head size between sites; `counters`
    (fold_heads's) count the edited ops and rebuilt head-size operands."""
    sizes = plan.sizes
    edits = [size_edit(n, values, sizes) for n in plan.region]  # validate everything before mutating
    operands = head_size_operands(plan, values) if plan.resized else []
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
    fold_external_operands(gm, plan, values, heads_only.keeps, config.fold_qk)
    if plan.resized:
        projection_weights = _random_projections(gm, values, plan, generator)
    else:
        projection_weights = _fold_projections(gm, values, plan, config, counters)
    return _expert_plan(values, plan, projection_weights, config, generator, init_scale, counters)

def _fold_projections(gm, values, plan: FoldPlan, config, counters: dict[str, int]) -> dict[torch.fx.Node, tuple]:
    """New (weight [F2, d], bias) of each projection, keeping surviving columns: Q (and K without
    GQA) rows folded over each group (fitted where fold_qk="fit" applies: fold_fit.py, counted in
    `fitted_qk_sites`; the mean elsewhere). The V projection's is returned for the expert rewrite."""
    site = plan.site
    folded: dict[torch.fx.Node, list] = {}
    for proj in dict.fromkeys((site.query_node, site.key_node, site.value_node)):  # ordered, not by address
        weight, bias = linear_weight(values, proj)
        folded[proj] = [weight.clone(), None if bias is None else bias.clone()]
    if config.init != "random":
        for proj, columns in plan.head_columns:  # columns [H, dh]
            weight, bias = folded[proj]
            source_w, source_b = linear_weight(values, proj)
            for group in plan.members:
                target = columns[group[0]]
                pick = columns[group[:1]] if config.fold_qk == "first" else columns[group]  # [g, dh]
                weight[target] = source_w[pick].mean(0)
                if bias is not None:
                    bias[target] = source_b[pick].mean(0)
        if config.fold_qk == "fit" and fold_fit.fittable(plan.site, plan.head_columns):
            _fit_qk(values, plan, folded)
            counters["fitted_qk_sites"] = counters.get("fitted_qk_sites", 0) + 1
    results = {}
    for proj, (weight, bias) in folded.items():
        keep = plan.masks[proj].reshape(-1, weight.shape[0]).any(0)
        results[proj] = (weight, bias, keep.nonzero().flatten())
        if proj is not site.value_node and not (bool(keep.all()) and all(proj is not p for p, _ in plan.head_columns)):
            _set_projection(gm, proj, weight[keep], None if bias is None else bias[keep], site.path)
    return results

def _fit_qk(values, plan: FoldPlan, folded: dict[torch.fx.Node, list]) -> None:
    """Each new head's Q and K rows fitted to its group's mean scores on the example activations."""
    (q_proj, q_cols), (k_proj, k_cols) = plan.head_columns  # [H, dh] rows of each projection
    queries, xq = fold_fit.head_rows(values, q_proj, q_cols)  # H x [dh, Dq], [N, Dq]
    keys, xk = fold_fit.head_rows(values, k_proj, k_cols)
    for group in plan.members:
        a, b = fold_fit.fit_group([queries[h] for h in group], [keys[h] for h in group], xq, xk)
        for proj, cols, fit in ((q_proj, q_cols, a), (k_proj, k_cols, b)):
            weight, bias = folded[proj]
            target = cols[group[0]]
            weight[target] = fit[:, :weight.shape[1]].to(weight.dtype)
            if bias is not None:
                bias[target] = fit[:, -1].to(bias.dtype)


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

def _route_by_contribution(values, site: AttentionSite, weights: expert_init.ExpertWeights, o_cols: torch.Tensor,
                           output_heads: torch.Tensor, value_heads: torch.Tensor | None,
                           value_bias: torch.Tensor | None, counters: dict[str, int]) -> None:
    """Replace the tiny random routers by ones fitted to the dense heads' contributions on the example
    tokens (fold_route.py); the V router only where its experts differ (not GQA). Counted in
    `contribution_routers`."""
    o_input = linear_parts(site.output_node)[0]
    z, xq = values[o_input], values[site.query_input]
    z, xq = z.reshape(-1, z.shape[-1]), xq.reshape(-1, xq.shape[-1])  # [N, F], [N, d_q]
    fitted = 0
    if z.shape[0] == xq.shape[0]:  # one query token per row of the O projection's input
        contributions = fold_route.output_contributions(z, o_cols, output_heads)
        weights.o_router = fold_route.fitted_router(xq, contributions).to(weights.o_router.device)
        fitted += 1
    if value_heads is not None:
        xv = values[linear_parts(site.value_node)[0]]
        xv = xv.reshape(-1, xv.shape[-1])
        contributions = fold_route.value_contributions(xv, value_heads, value_bias, output_heads)
        weights.v_router = fold_route.fitted_router(xv, contributions).to(weights.v_router.device)
        fitted += 1
    counters["contribution_routers"] = counters.get("contribution_routers", 0) + fitted


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

def _expert_plan(values, plan: FoldPlan, projection_weights, config, generator, init_scale,
                 counters: dict[str, int]) -> SitePlan:
    site, members = plan.site, plan.members
    new_heads, group = members.shape
    gqa = site.num_kv_heads < site.num_heads
    num_experts = config.resolved_num_experts(group)  # fits top_k and the group: config.check_sites
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
        expert_of = torch.arange(num_experts) % group  # which group member each expert copies
        if gqa:  # V stays per KV head: copies of it
            value_heads = v_weight[value_columns].permute(0, 2, 1).unsqueeze(1).expand(-1, num_experts, -1, -1)
            value_bias = (v_bias[value_columns].unsqueeze(1).expand(-1, num_experts, -1)
                          if v_bias is not None else None)
        else:
            cols = site.value_columns[kv_of_query[members[:, expert_of]]]  # [H2, E, dh]
            value_heads = v_weight[cols].permute(0, 1, 3, 2)  # [H2, E, d, dh]
            value_bias = v_bias[cols] if v_bias is not None else None
        o_cols = site.output_columns[members[:, expert_of]]  # [H2, E, dh]
        v_input = linear_parts(site.value_node)[0]
        output_heads = o_weight[:, o_cols].permute(1, 2, 3, 0)  # [H2, E, dh, d_out]
        weights = expert_init.fold(
            value_heads, value_bias, output_heads,
            group, gqa, site.query_dim, config.top_k, config.fold_noise, rms(values[v_input]),
            rms(values[site.query_input]), config.upcycle_router_scale, generator,
        )
        if config.fold_router == "contribution" and config.top_k < num_experts:
            _route_by_contribution(values, site, weights, o_cols, output_heads, None if gqa else value_heads,
                                   value_bias, counters)
    return SitePlan(new_heads, len(kv_heads), value_columns, v_kept, v_weight, v_bias, output_columns, weights)
