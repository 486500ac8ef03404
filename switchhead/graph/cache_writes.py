"""Make the dataflow through in-place KV-cache writes explicit in an exported graph.

torch.export keeps in-place writes into inputs and buffers as they are (`index_put_(slice(cache),
...)` for `cache[:, :, positions] = k`), and the attention then reads `cache` itself: the values
written reach it through memory, not through an edge of the graph. Dataflow walks (detection,
provenance) need the edge, so every later reader of a written tensor is made to read the write's
result instead, when that result is the whole tensor (the write's target is the tensor or a view
of all of it), which is the same memory: the graph computes exactly what it did.
"""

from __future__ import annotations

import torch
import torch.fx

from switchhead.graph.ops import CACHE_WRITE_OPS

aten = torch.ops.aten
_WHOLE_VIEWS = {aten.alias.default, aten.slice.Tensor}


def whole_view_base(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor `node` is a view of all of (through full slices and aliases), or `node` itself."""
    while node.op == "call_function" and node.target in _WHOLE_VIEWS:
        if node.target is aten.slice.Tensor:
            start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
            end = node.args[3] if len(node.args) > 3 else node.kwargs.get("end")
            step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
            if start not in (None, 0) or step != 1 or not (end is None or (isinstance(end, int) and end >= 2**62)):
                break
        node = node.args[0]
    return node


def thread_cache_writes(gm: torch.fx.GraphModule) -> int:
    """Point the readers of each in-place cache write's tensor after the write at the write's
    result (see the module docstring); returns how many uses moved."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    moved = 0
    for write in list(gm.graph.nodes):
        if write.op != "call_function" or write.target not in CACHE_WRITE_OPS or not str(write.target).endswith("_.default"):
            continue
        target = write.args[CACHE_WRITE_OPS[write.target][0]]
        base = whole_view_base(target)
        for written in {target, base}:
            for user in list(written.users):
                if user is not write and order[user] > order[write] and user.op != "output":
                    user.replace_input_with(written, write)
                    moved += 1
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved
