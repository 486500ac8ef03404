"""Converted modules follow `.to()` / `.cuda()` / `.cpu()`, device constants in the graph included.

torch.export records the devices the model ran on while it was captured: `arange(..., device=cpu)`,
`.to(device=cpu)`, `wrap_with_autocast('cpu', ...)` regions (its `_assert_tensor_metadata` checks
are gone already: capture.drop_metadata_asserts). Moving the parameters of `ep.module()` to a GPU
leaves those behind, and the first call fails ("Tensor device mismatch"). `follow_device_moves`
makes a converted GraphModule rewrite them whenever its parameters move, so converting on the CPU
and training on a GPU works like any nn.Module.
"""

from __future__ import annotations

import itertools

import torch

_AUTOCAST_REGION = "wrap_with_autocast"


def module_device(module: torch.nn.Module) -> torch.device | None:
    """The device of the module's first parameter or buffer (None when it has neither)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if first is None else first.device


def retarget_devices(module: torch.nn.Module, old: torch.device, new: torch.device) -> int:
    """Rewrite every device constant equal to `old` in the graphs of `module` (and its subgraphs) to
    `new`, and recompile them. Returns how many nodes changed."""
    changed = 0
    for graph_module in module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        count = 0
        for node in graph_module.graph.nodes:
            count += _retarget_node(node, old, new)
        if count:
            graph_module.recompile()
        changed += count
    return changed


def _same_device(value, device: torch.device) -> bool:
    return isinstance(value, (torch.device, str)) and torch.device(value) == device


def _retarget_node(node: torch.fx.Node, old: torch.device, new: torch.device) -> int:
    count = 0
    if _same_device(node.kwargs.get("device"), old):
        node.kwargs = {**node.kwargs, "device": new}
        count += 1
    if node.op != "call_function":
        return count
    if node.target is torch.ops.aten.to.device and _same_device(node.args[1], old):
        node.args = (node.args[0], new, *node.args[2:])
        count += 1
    if _target_name(node.target) == _AUTOCAST_REGION and node.args and node.args[0] == old.type \
            and old.type != new.type:
        node.args = (new.type, *node.args[1:])
        count += 1
    return count


def _target_name(target) -> str:
    # higher-order ops carry their name as __name__ on newer torch, only as _name on older ones
    return str(getattr(target, "__name__", None) or getattr(target, "_name", None) or target)


class DeviceFollowingGraphModule(torch.fx.GraphModule):
    """A GraphModule that, after `_apply` moved its tensors, moves its graph's device constants too."""

    def _apply(self, fn, *args, **kwargs):
        old = module_device(self)
        result = super()._apply(fn, *args, **kwargs)
        new = module_device(self)
        if old is not None and new is not None and old != new:
            retarget_devices(self, old, new)
        return result


def follow_device_moves(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make `module` (in place) rewrite its graph's device constants when it is moved; returns it."""
    if isinstance(module, DeviceFollowingGraphModule):
        return module
    # GraphModule gives every instance its own class named GraphModuleImpl (its forward lives there)
    # and, on deepcopy, derives the copy's class from the first base with another name: ours, so
    # copies follow moves too.
    module.__class__ = type("GraphModuleImpl", (DeviceFollowingGraphModule,), {})
    module.recompile()
    return module
