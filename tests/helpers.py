"""Shared test helpers: cached conversions of zoo models (conversion is the slow part)."""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from pathlib import Path
from types import ModuleType

import torch

import switchhead
from zoo import ZOO_BY_NAME


@functools.lru_cache(maxsize=None)
def converted(case_name: str, num_experts: int = 4, top_k: int = 2, init: str = "upcycle"):
    """(original model, converted module) for a zoo case. Callers must not modify either."""
    case = ZOO_BY_NAME[case_name]
    torch.manual_seed(0)
    model = case.build()
    args, kwargs = case.example_inputs()
    config = switchhead.SwitchHeadConfig(num_experts=num_experts, top_k=top_k, init=init)
    return model, switchhead.convert(model, args, kwargs, config=config)


def new_parameter_names(module: torch.nn.Module) -> list[str]:
    markers = ("v_experts", "v_router", "o_experts", "o_router", "v_rest_")
    return [name for name, _ in module.named_parameters() if any(m in name.rsplit(".", 1)[-1] for m in markers)]


def output_sum(output) -> torch.Tensor:
    """A scalar that depends on every floating output, for backward passes."""
    leaves = torch.utils._pytree.tree_leaves(output)
    return sum((leaf.float() * torch.randn_like(leaf.float())).sum() for leaf in leaves
               if isinstance(leaf, torch.Tensor) and leaf.is_floating_point())


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as the module benchmarks.<name> (pytest puts the repository root on the path)."""
    return importlib.import_module(f"benchmarks.{name}")


def forge_saved_graph(directory: Path, edit) -> None:
    """Edit a saved model's graph document and record its new checksum, as a forger would."""
    path = directory / "model.graph.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    report = json.loads((directory / "report.json").read_text())
    report["sha256"]["model.graph.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / "report.json").write_text(json.dumps(report))
