"""Capture a model as an exported fx graph, and record the concrete value of every node.

`torch.export` (non-strict) is the only capture that works on real models (HF, torchvision, timm,
nn.Transformer*). Every tensor dimension of the example inputs is exported as `Dim.AUTO`, so the
rewritten graph serves other batch sizes and sequence lengths wherever the model allows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any

import torch
import torch.fx
from torch.export import Dim
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from switchhead.errors import CaptureError, MissingInputsError


@dataclasses.dataclass
class Captured:
    """An exported graph module plus the example inputs it was captured with."""

    graph_module: torch.fx.GraphModule
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dynamic: bool  # False when export had to fall back to static shapes
    static_reason: str | None = None  # why dynamic export failed

    def flat_inputs(self) -> list[Any]:
        return fx_pytree.tree_flatten_spec((list(self.args), self.kwargs), self.graph_module._in_spec)


def resolve_example_inputs(
    model: torch.nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs from the caller, else from `model.example_inputs()`, else from a HF model's
    `dummy_inputs`."""
    if args is None and kwargs is None:
        if callable(getattr(model, "example_inputs", None)):
            args, kwargs = _split_inputs(model.example_inputs())
        elif isinstance(getattr(model, "dummy_inputs", None), dict):
            args, kwargs = (), dict(model.dummy_inputs)
        else:
            raise MissingInputsError(
                f"{type(model).__name__} cannot describe its own inputs: pass example inputs, "
                "e.g. convert(model, args=(x,)) or kwargs={'input_ids': ids}"
            )
    args = tuple(args) if args is not None else ()
    kwargs = dict(kwargs) if kwargs is not None else {}
    if not isinstance(args, tuple):
        raise MissingInputsError("args must be a tuple of positional example inputs, e.g. args=(x,)")
    return args, kwargs


def _split_inputs(value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(value, dict):
        return (), value
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict) and isinstance(value[0], tuple):
        return value
    if isinstance(value, tuple):
        return value, {}
    return (value,), {}


def _is_hf_model(model: torch.nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


@contextlib.contextmanager
def _hf_cache_disabled(model: torch.nn.Module):
    """A HF model that returns a KV-cache object cannot be exported (the cache is not a pytree):
    capture with `use_cache = False` in every config of the model (encoder-decoders keep copies),
    so the converted graph keeps the model's call signature."""
    configs = {id(c): c for m in model.modules() if _is_hf_model(m)
               for c in [getattr(m, "config", None)] if getattr(c, "use_cache", False)}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _auto_dynamic_shapes(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Dim.AUTO on every dimension of every tensor input, keyed by forward's parameter names:
    export decides which dims are really dynamic."""

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {i: Dim.AUTO for i in range(value.dim())}
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


@contextlib.contextmanager
def _mha_fastpath_disabled():
    """nn.MultiheadAttention's inference fast path is one fused op with nothing to rewrite inside."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def capture(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Captured, Any]:
    """Export `model` with dynamic dimensions where possible, static shapes otherwise.

    Returns the capture and the model's own output on the example inputs (the verification reference).
    """
    with _hf_cache_disabled(model):
        return _capture(model, args, kwargs)


def _capture(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Captured, Any]:
    try:
        with torch.no_grad():
            reference = model(*args, **kwargs)
    except Exception as exc:  # the user's model failing on its own inputs is a user error
        raise CaptureError(f"the model fails on its example inputs: {type(exc).__name__}: {exc}") from exc
    dynamic_shapes = _auto_dynamic_shapes(model, args, kwargs)
    with _mha_fastpath_disabled():
        try:
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            dynamic = True
            static_reason = None
        except Exception as exc:
            # Some models only export with their example shapes baked in; the report says so.
            static_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            try:
                program = torch.export.export(model, args, kwargs, strict=False)
            except Exception as exc:
                raise CaptureError(f"torch.export could not capture the model: {type(exc).__name__}: {exc}") from exc
            dynamic = False
    return Captured(drop_metadata_asserts(program.module()), args, kwargs, dynamic, static_reason), reference


def drop_metadata_asserts(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Erase torch.export's `_assert_tensor_metadata` checks from `module` and its subgraphs (in place).

    Export pins the dtype and device every `.to()` / `.float()` saw during capture. A converted model is
    meant to be trained and run like the original, under autocast and on other devices, where those
    facts change: HF's rotary embedding, captured in fp32, computes a matmul that autocast makes bf16,
    and the pinned fp32 check would fail. The checks have no users and compute nothing.
    """
    for graph_module in module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        asserts = [n for n in graph_module.graph.nodes
                   if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default]
        for node in asserts:
            graph_module.graph.erase_node(node)
        if asserts:
            graph_module.recompile()
    return module


class _Recorder(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule):
        super().__init__(module)
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


def record_values(captured: Captured) -> dict[torch.fx.Node, Any]:
    """The concrete value of every node on the example inputs (tensors, ints, lists)."""
    recorder = _Recorder(captured.graph_module)
    with torch.no_grad():
        recorder.run(*captured.flat_inputs())
    return recorder.values
