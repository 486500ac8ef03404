"""A converted module moved with .to() runs on the new device: the graph's device constants move too."""

from __future__ import annotations

import copy

import torch
from helpers import converted
from zoo import ZOO_BY_NAME

import switchhead


def _devices(module: torch.nn.Module) -> set[str]:
    found = set()
    for graph_module in module.modules():
        if isinstance(graph_module, torch.fx.GraphModule):
            found |= {str(n.kwargs["device"]) for n in graph_module.graph.nodes if "device" in n.kwargs}
    return found


def test_moved_copy_runs_on_the_new_device_and_the_original_stays() -> None:
    # HF Llama's capture holds arange(device=cpu) and .to() metadata checks: "meta" stands in for a GPU
    _, new = converted("hf_llama_gqa")
    assert _devices(new) == {"cpu"}
    moved = copy.deepcopy(new).to("meta")
    assert _devices(moved) == {"meta"} and _devices(new) == {"cpu"}
    args, kwargs = ZOO_BY_NAME["hf_llama_gqa"].other_inputs()
    out = moved(*[a.to("meta") for a in args], **kwargs)
    assert out.logits.device.type == "meta"


def test_loaded_module_follows_moves(tmp_path) -> None:
    _, new = converted("hf_llama_gqa")
    args, kwargs = ZOO_BY_NAME["hf_llama_gqa"].example_inputs()
    switchhead.save(new, tmp_path / "out", args, kwargs)
    loaded = switchhead.load(tmp_path / "out")
    assert _devices(loaded.to("meta")) <= {"meta"}
