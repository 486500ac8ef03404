"""What detection learns about each attention, and why an attention-like op was skipped."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx


@dataclasses.dataclass
class AttentionSite:
    """One multi-head attention found in a captured graph.

    The public fields describe the attention; the underscored ones hold the graph nodes and index
    maps the rewrite needs (they are not part of reports).
    """

    path: str  # module path of the attention (from nn_module_stack), "" for the root module
    module_type: str  # class name of that module
    core: str  # "sdpa" or "softmax" (matmul -> [scale] -> [mask] -> softmax -> [dropout] -> matmul)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int  # width of the tokens V is projected from
    query_dim: int  # width of the tokens Q is projected from (the O router's input)
    out_dim: int  # width of the output projection
    cross: bool
    value_projection: str
    output_projection: str

    value_node: torch.fx.Node = dataclasses.field(repr=False, default=None)
    value_columns: torch.Tensor = dataclasses.field(repr=False, default=None)  # [Hkv, dh] proj features
    kv_head_of_query: torch.Tensor = dataclasses.field(repr=False, default=None)  # [H] KV head of each query head
    output_node: torch.fx.Node = dataclasses.field(repr=False, default=None)
    output_columns: torch.Tensor = dataclasses.field(repr=False, default=None)  # [H, dh] proj input features
    query_input: torch.fx.Node = dataclasses.field(repr=False, default=None)
    core_node: torch.fx.Node = dataclasses.field(repr=False, default=None)
    query_node: torch.fx.Node = dataclasses.field(repr=False, default=None)  # the Q projection
    key_node: torch.fx.Node | None = dataclasses.field(repr=False, default=None)  # the K projection
    core_operands: tuple = dataclasses.field(repr=False, default=())  # (query, key, value) at the core

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}


@dataclasses.dataclass
class SkippedSite:
    """A softmax / SDPA that was not rewritten, with a one-line reason."""

    path: str
    op: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
