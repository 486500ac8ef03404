"""Graph passes, each `pass_(gm, state) -> PassResult` (plan.py); PIPELINE is their order
(README.md: what each reads and writes, the invariants all keep)."""

from __future__ import annotations

import torch.fx

from switchhead.passes.detect_attention import detect_attention
from switchhead.passes.fold_heads import fold_heads
from switchhead.passes.plan import Pass, PassResult, PassState
from switchhead.passes.rewrite_experts import rewrite_experts

# Detection alone is `analyze`; convert() runs the rest on what it accepted.
PIPELINE: tuple[Pass, ...] = (detect_attention, fold_heads, rewrite_experts)


def run_passes(gm: torch.fx.GraphModule, state: PassState, passes: tuple[Pass, ...]) -> dict[str, dict[str, int]]:
    """Run `passes` in order on `gm`; returns each pass's counters by the pass's name."""
    counters = {}
    for pass_ in passes:
        result = pass_(gm, state)
        counters[pass_.__name__] = result.counters
    return counters


__all__ = ["PIPELINE", "Pass", "PassResult", "PassState", "detect_attention", "fold_heads", "rewrite_experts",
           "run_passes"]
