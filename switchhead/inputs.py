"""Example inputs: given by the caller, described by the model itself, or remembered by a converted
module (so that saving and exporting it need no inputs again)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx

from switchhead.capture import resolve_example_inputs

EXAMPLE_INPUTS_KEY = "switchhead_example_inputs"  # in a converted GraphModule's meta: (args, kwargs)
DEFAULT_MASK_KEY = "switchhead_default_mask"  # in its meta: True when a missing attention_mask means all ones


def example_inputs(
    model: torch.nn.Module, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) to run `model` on (see resolve_inputs)."""
    args, kwargs, _ = resolve_inputs(model, args, kwargs)
    return args, kwargs


def resolve_inputs(
    model: torch.nn.Module, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    """(args, kwargs, mask_added): the given inputs; else those a converted module remembers; else the
    model's own `example_inputs()`; else a Hugging Face model's `dummy_inputs` with an all-ones
    `attention_mask` added when forward takes one (dummy_inputs holds only input_ids, and a model
    captured without the mask would refuse it afterwards). `mask_added` says that happened."""
    if args is not None or kwargs is not None:
        return (*resolve_example_inputs(model, args, kwargs), False)
    remembered = model.meta.get(EXAMPLE_INPUTS_KEY) if isinstance(model, torch.fx.GraphModule) else None
    if remembered is not None:
        return tuple(remembered[0]), dict(remembered[1]), False
    from_dummy = not callable(getattr(model, "example_inputs", None))
    args, kwargs = resolve_example_inputs(model, None, None)
    ids = kwargs.get("input_ids")
    if (from_dummy and not args and isinstance(ids, torch.Tensor) and "attention_mask" not in kwargs
            and "attention_mask" in inspect.signature(model.forward).parameters):
        return args, {**kwargs, "attention_mask": torch.ones_like(ids)}, True
    return args, kwargs, False


def remember_inputs(module: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Keep the example inputs on a converted module for save() and export_onnx()."""
    module.meta[EXAMPLE_INPUTS_KEY] = (tuple(args), dict(kwargs))


def accept_missing_mask(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Let `module`, captured with an attention_mask it was not given by the user, be called without
    one, as the Hugging Face model could: a missing mask is all ones (no padding), which is what
    Hugging Face models assume for attention_mask=None."""
    module.meta[DEFAULT_MASK_KEY] = True
    # first: torch.export registered a hook that checks the inputs against the captured signature
    module.register_forward_pre_hook(_default_mask, with_kwargs=True, prepend=True)
    return module


def _default_mask(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    ids = kwargs.get("input_ids")
    if "attention_mask" not in kwargs and isinstance(ids, torch.Tensor):
        return args, {**kwargs, "attention_mask": torch.ones_like(ids)}
    return None
