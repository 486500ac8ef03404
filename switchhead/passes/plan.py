"""What the passes hand each other: the per-site expert plan, the passes' errors, their results.

Every pass has one call shape, `pass_(gm, state) -> PassResult`: it reads and extends the
`PassState` (detection fills `sites`, folding `plans`, the rewrite `applied`) and returns what it
changed with counters of each kind of rewrite (tests assert them, as PyTorch's fx passes do).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from switchhead.config import SwitchHeadConfig
from switchhead.experts import ExpertWeights
from switchhead.site import AttentionSite, SkippedSite


class SiteRejected(Exception):
    """This core cannot be rewritten; the message is the reason reported to the user."""


class FoldError(Exception):
    """The heads of this site cannot be folded or resized; the message says why."""


@dataclasses.dataclass
class SitePlan:
    """What the rewrite of one site puts in the graph.

    Columns are in the coordinates of the V projection's output (`value_columns`,
    `value_projection_columns`) and of the O projection's input *after* any head folding
    (`output_columns`). `value_weight`/`value_bias` hold the V projection's full [F, d] weight, with
    any folded Q/K rows of a fused projection already in place.
    """

    num_heads: int
    num_kv_heads: int
    value_columns: torch.Tensor  # [G, dh] V-projection features of each (new) KV head
    value_projection_columns: torch.Tensor  # sorted V-projection features that survive
    value_weight: torch.Tensor  # [F, d]
    value_bias: torch.Tensor | None  # [F]
    output_columns: torch.Tensor  # [H, dh] O-projection input columns of each (new) head
    weights: ExpertWeights


@dataclasses.dataclass
class PassState:
    """What the passes read and write besides the graph: example values, config, findings."""

    values: dict[torch.fx.Node, Any]
    config: SwitchHeadConfig = dataclasses.field(default_factory=SwitchHeadConfig)
    sites: list[AttentionSite] = dataclasses.field(default_factory=list)  # detection: accepted
    skipped: list[SkippedSite] = dataclasses.field(default_factory=list)  # detection: why not
    plans: dict[int, SitePlan] = dataclasses.field(default_factory=dict)  # folding: by site index
    applied: list[SitePlan] = dataclasses.field(default_factory=list)  # rewrite: per site
    # folding: new shapes of graph inputs the graph writes its KV cache into, by placeholder name
    resized_inputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassResult:
    """A pass's outcome: the module (changed in place), whether it changed, how often each kind of
    rewrite happened."""

    graph_module: torch.fx.GraphModule
    modified: bool
    counters: dict[str, int] = dataclasses.field(default_factory=dict)


Pass = Callable[[torch.fx.GraphModule, PassState], PassResult]
