"""Graph edits the passes share: looking up and adding modules, registering tensors, erasing what
nothing reads any more, and reading a linear map's weights from the example values.

One implementation each; the passes (`switchhead/passes/`) import these and never each other.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.fx

from switchhead.graph.ops import linear_parts


def module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted `path` ("" is `root` itself)."""
    return root.get_submodule(path) if path else root


def ensure_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted `path`, adding empty modules for the parts that do not exist."""
    module = root
    for part in filter(None, path.split(".")):
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    return module


def attribute(root: torch.nn.Module, target: str) -> Any:
    """The tensor (or module) a get_attr node's dotted `target` names."""
    owner, _, name = target.rpartition(".")
    return getattr(module_at(root, owner), name)


def register(owner: torch.nn.Module, path: str, name: str, tensor: torch.Tensor, buffer: bool = False) -> str:
    """Register a new parameter (or buffer) on `owner` (the module at `path`) under a free name;
    returns its full dotted path."""
    unique, i = name, 1
    while hasattr(owner, unique):
        unique, i = f"{name}_{i}", i + 1
    if buffer:
        # index buffers are built on the CPU; they must live where the module's weights are
        reference = next(itertools.chain(owner.parameters(), owner.buffers()), None)
        owner.register_buffer(unique, tensor if reference is None else tensor.to(reference.device))
    else:
        owner.register_parameter(unique, torch.nn.Parameter(tensor.contiguous()))
    return f"{path}.{unique}" if path else unique


def erase_dead(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> set[str]:
    """Erase each of `nodes` that no node reads, and then the inputs only they read (weights, their
    slices and transposes); returns the attribute targets of the erased get_attr nodes."""
    stack, erased, freed = list(nodes), set(), set()
    while stack:
        node = stack.pop()
        if node in erased or node.users or node.op not in ("call_function", "get_attr"):
            continue
        if node.op == "get_attr":
            freed.add(node.target)
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)
    return freed


def drop_unused_attributes(gm: torch.fx.GraphModule, candidates: set[str]) -> None:
    """Delete the parameters and buffers among `candidates` that no graph node reads any more."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in candidates - used:
        parent, _, leaf = target.rpartition(".")
        owner = module_at(gm, parent)
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        elif leaf in owner._buffers:
            del owner._buffers[leaf]


def erase_unused(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> None:
    """erase_dead, then drop the attributes it freed that nothing else reads."""
    drop_unused_attributes(gm, erase_dead(gm.graph, nodes))


def linear_weight(values: dict[torch.fx.Node, Any], node: torch.fx.Node) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [out, in] weight and [out] bias of a linear-like node, from the example values."""
    _, weight, bias, transposed = linear_parts(node)
    w = values[weight].detach()
    w = w.t() if transposed else w
    b = values[bias].detach() if isinstance(bias, torch.fx.Node) else None
    return w, b


def rms(t: torch.Tensor) -> float:
    """Root mean square of a tensor's values."""
    return float(t.detach().float().pow(2).mean().sqrt())


def resize_input(gm: torch.fx.GraphModule, name: str, shape: list[int], example: torch.Tensor) -> None:
    """Declare graph input `name` (a placeholder) with the new `shape`, its dims that keep the size
    of `example` (the old example value) keeping their symbolic size. torch.export's guard call
    (`_guards_fn`, code fixed at export time) goes: the input spec and the placeholders' values
    are what the module then checks its inputs against."""
    node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name)
    old = node.meta.get("val")
    if old is not None:
        sizes = [old.shape[d] if d < old.dim() and shape[d] == example.shape[d] else shape[d] for d in range(len(shape))]
        with old.fake_mode:
            node.meta["val"] = torch.empty(sizes, dtype=old.dtype, device=old.device)
    for guard in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(guard)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
