"""Looking inside a converted model: which experts its routers choose."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from switchhead.passes.rewrite_experts import ROUTER_META


class _RouterRecorder(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule):
        super().__init__(module)
        self.choices: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if ROUTER_META in n.meta:
            self.choices[n.meta[ROUTER_META]] = out[0].detach()  # expert index [N, heads, k]
        return out


def expert_usage(converted: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """For each router (by parameter name): how many tokens chose each expert, [heads, E].

    Runs `converted` once on the given inputs (no gradients).
    """
    recorder = _RouterRecorder(converted)
    flat = torch.fx._pytree.tree_flatten_spec((list(args), kwargs), converted._in_spec)
    with torch.no_grad():
        recorder.run(*flat)
    usage = {}
    for name, index in recorder.choices.items():
        router = converted.get_parameter(name)
        heads = index.shape[1]
        experts = router.shape[0] // heads
        one_hot = torch.nn.functional.one_hot(index, experts)  # [N, heads, k, E]
        usage[name] = one_hot.sum(dim=(0, 2))
    return usage
