"""Pass: fit each folded site's O experts so that its output matches the dense attention's on the
example inputs (fold_vo="fit"), one site after another.

Contract
    Input: the GraphModule after `rewrite_experts`, a PassState whose `expert_ops` name each site's
    expert ops and whose example values hold the dense model's activations; config init="fold".
    Output: the same graph; each site's O expert weights replaced by their least-squares fit. Nothing
    else changes. Counter: `fitted_o_sites`.

Method (shape legend: N example tokens, H2 heads, E experts, k active, dh head size, d_out width)
    With the routing fixed, the O op is linear in its weights: out[n] = sum_{h, e} G[n, h, e]
    z[n, h] @ W[h, e], G the gates scattered to [N, H2, E] (zero where not chosen). So W [H2*E*dh,
    d_out] = argmin || Phi W - (y - b) ||^2 + ridge || W - W_copy ||^2, Phi [N, H2*E*dh] the gated attention outputs and
    y - b the dense O projection's output less its bias on the same tokens. Sites are fitted in graph
    order, each on the converted model's own activations with the earlier sites already fitted, so a
    site also corrects what the ones before it lost (layer-wise distillation in closed form). The
    fit follows the example tokens: give representative example inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from switchhead.errors import ConfigMismatchError
from switchhead.kernels.reference import dense_gates
from switchhead.passes.plan import PassResult, PassState

RIDGE = 1e-2  # of the mean diagonal of Phi^T Phi (1e-4 overfit MiniLM on 256 sentences)


class _Reached(Exception):
    def __init__(self, args: tuple):
        super().__init__("reached")
        self.args_values = args


class _RunUntil(torch.fx.Interpreter):
    """Runs the graph until `stop`, then raises _Reached with the values of stop's arguments."""

    def __init__(self, module: torch.fx.GraphModule, stop: torch.fx.Node):
        super().__init__(module)
        self.stop = stop

    def run_node(self, n: torch.fx.Node) -> Any:
        if n is self.stop:
            args, _ = self.fetch_args_kwargs_from_env(n)
            raise _Reached(args)
        return super().run_node(n)


def fit_experts(gm: torch.fx.GraphModule, state: PassState) -> PassResult:
    """Fit the O experts of every site of a fold (fold_vo="fit"); see the module docstring."""
    config = state.config
    if config.init != "fold" or config.fold_vo != "fit":
        return PassResult(gm, False)
    if state.resized_inputs:
        raise ConfigMismatchError("fold_vo='fit' runs the converted model on the example inputs, which cannot "
                                  "fill a resized KV cache: fold with switchhead.convert(), or use fold_vo='copy'")
    inputs = [state.values[n] for n in gm.graph.nodes if n.op == "placeholder"]
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    fitted = 0
    for site, ops in sorted(zip(state.sites, state.expert_ops), key=lambda pair: order[pair[1].output]):
        try:
            with torch.no_grad():
                _RunUntil(gm, ops.output).run(*inputs)
        except _Reached as reached:
            heads, weight_value, index, gates = reached.args_values[:4]
        else:
            raise RuntimeError(f"the O expert op of {site.path or '<root>'} did not run on the example inputs")
        target = state.values[site.output_node]
        target = target.reshape(-1, target.shape[-1])  # [N, d_out]
        if ops.output_bias is not None:
            target = target - state.values[ops.output_bias]
        weight = gm.get_parameter(ops.output.args[1].target)  # [H2, E, dh, d_out]
        weight.data.copy_(fitted_output_weight(heads, index, gates, target, weight.detach()).to(weight.dtype))
        fitted += 1
    return PassResult(gm, fitted > 0, {"fitted_o_sites": fitted})


def fitted_output_weight(heads: torch.Tensor, index: torch.Tensor, gates: torch.Tensor, target: torch.Tensor,
                         start: torch.Tensor) -> torch.Tensor:
    """heads [N, H2, dh], index / gates [N, H2, k], target [N, d_out], start [H2, E, dh, d_out] ->
    W [H2, E, dh, d_out] (fp64) minimising || expert_o(heads, W, index, gates) - target ||^2 +
    ridge * || W - start ||^2: an expert no example token chooses keeps its start."""
    h2, experts, dh, d_out = start.shape
    g = dense_gates(index, gates, experts, torch.float64)  # [N, H2, E]
    phi = (heads.to(torch.float64).unsqueeze(2) * g.unsqueeze(-1)).reshape(heads.shape[0], -1)  # [N, H2*E*dh]
    gram = phi.T @ phi
    ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
    rhs = phi.T @ target.to(torch.float64) + ridge * start.to(torch.float64).reshape(-1, d_out)
    return torch.linalg.solve(gram, rhs).reshape(h2, experts, dh, d_out)
