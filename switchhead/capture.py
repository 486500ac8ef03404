"""Capture a model as an exported fx graph, and record the concrete value of every node.

`torch.export` (non-strict) is the only capture that works on real models (HF, torchvision, timm,
nn.Transformer*). The batch and sequence dims of the example inputs are exported as `Dim.AUTO`
(`varying_dims` says which), widened from 1 to 2 first (export specialises size-1 dims), so the
rewritten graph serves other batch sizes and sequence lengths wherever the model allows it; which
dims stayed dynamic is recorded exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import operator
from typing import Any

import torch
import torch.fx
from torch.export import Dim
from torch.fx import _pytree as fx_pytree
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from switchhead.errors import CaptureError, MissingInputsError
from switchhead.graph.cache_writes import thread_cache_writes
from switchhead.graph.ops import CAST_OPS, LAYOUT_OPS, NOOP_OPS


@dataclasses.dataclass
class Captured:
    """An exported graph module plus the example inputs it was captured with."""

    graph_module: torch.fx.GraphModule
    args: tuple[Any, ...]  # the inputs captured with: the example, size-1 batch / sequence dims widened
    kwargs: dict[str, Any]
    dynamic: bool  # some input dim is dynamic
    static_reason: str | None = None  # why no dim is dynamic
    dynamic_dims: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # input -> dynamic dims
    widened: tuple[str, ...] = ()  # e.g. "x dim 0: 1 -> 2": example dims widened before capture
    not_widened: str | None = None  # why size-1 dims that should vary were kept at 1

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
def hf_cache_disabled(model: torch.nn.Module):
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


def varying_dims(values: list[torch.Tensor]) -> list[list[int]]:
    """The dims of each tensor input that usually differ between calls (batch and sequence), by
    what the tensor holds; the others are exported static, which keeps capture fast (marking every
    dim of an image dynamic makes a Swin capture take minutes) and honest (a patch grid cannot vary).

    - integer and boolean tensors (token ids, positions, masks): every dim;
    - floating tensors of rank <= 3 (features [B, T, d] or [T, B, d], [B, d], [B]): all but the
      feature dim (rank 1: its only dim);
    - floating tensors of rank >= 4 (images [B, C, H, W], additive masks [B, 1, T, S]): dim 0, and
      each of the last two dims whose size is a sequence size of the inputs above.
    """
    dims: list[list[int]] = []
    for value in values:
        if not (value.is_floating_point() or value.is_complex()):
            dims.append(list(range(value.dim())))
        elif value.dim() <= 1:
            dims.append(list(range(value.dim())))
        elif value.dim() <= 3:
            dims.append(list(range(value.dim() - 1)))
        else:
            dims.append([0])
    # size 1 included: a length-1 example's additive mask [B, 1, 1, 1] must widen with the sequence
    sequence_sizes = {v.shape[d] for v, ds in zip(values, dims) if v.dim() <= 3 or not v.is_floating_point()
                      for d in ds}
    for value, ds in zip(values, dims):
        if value.is_floating_point() and value.dim() >= 4:
            ds.extend(d for d in (value.dim() - 2, value.dim() - 1) if value.shape[d] in sequence_sizes)
    return dims


@dataclasses.dataclass(frozen=True)
class Exported:
    """A torch.export program and what it says about shapes.

    `args`/`kwargs` are the inputs it was exported with: the example, with each dim of size 1
    that should vary widened to 2 (torch.export specialises a dim of size 1), named in `widened`.
    `dynamic_dims` maps each input (by the program's input names) to its dims that stayed dynamic.
    """

    program: torch.export.ExportedProgram
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dynamic_dims: dict[str, list[int]]
    widened: tuple[str, ...] = ()
    static_reason: str | None = None  # why no dim is dynamic, when none is
    not_widened: str | None = None  # why size-1 dims that should vary were kept at 1


def export_dynamic(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any = None
) -> Exported:
    """Export `model` (non-strict) with its batch and sequence dims dynamic where it allows it.

    `dynamic_shapes` (torch.export's format) replaces the automatic choice (`varying_dims`, every
    chosen dim Dim.AUTO: export keeps dynamic what the model lets vary). Without it, size-1 dims
    that should vary are widened to 2 first, as long as the model accepts the widened inputs.
    Falls back to static shapes when the dynamic export fails; raises CaptureError when that fails
    too.
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    widened: tuple[str, ...] = ()
    not_widened = None
    if dynamic_shapes is None:
        tensors = [v for v in flat if isinstance(v, torch.Tensor)]
        chosen = iter(varying_dims(tensors))
        dims = [next(chosen) if isinstance(v, torch.Tensor) else None for v in flat]
        flat, widened, not_widened = _widened(model, flat, spec, dims)
        args, kwargs = pytree.tree_unflatten(flat, spec)
        marked = pytree.tree_unflatten([{d: Dim.AUTO for d in ds} if ds is not None else None for ds in dims], spec)
        dynamic_shapes = _by_parameter(model, *marked)
    reason = None
    with mha_fastpath_disabled():
        try:
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:
            # Some models only export with their example shapes baked in; the report says so.
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            program = export_static(model, args, kwargs)
    found = program_dynamic_dims(program)
    if reason is None and not found:
        reason = "torch.export specialised every input dim (the model fixes them)"
    return Exported(program, tuple(args), dict(kwargs), found, widened, None if found else reason, not_widened)


def export_static(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> torch.export.ExportedProgram:
    """Export `model` (non-strict) with the example shapes; CaptureError when torch.export fails."""
    try:
        with mha_fastpath_disabled():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:
        raise CaptureError(f"torch.export could not capture the model: {type(exc).__name__}: {exc}") from exc


def _by_parameter(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """torch.export's dynamic_shapes keyed by forward's parameter names."""
    return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)


def _widened(model: torch.nn.Module, flat: list[Any], spec: Any, dims: list[list[int] | None]
             ) -> tuple[list[Any], tuple[str, ...], str | None]:
    """(`flat` with every size-1 dim in `dims` repeated to size 2, those dims, None) if the model
    runs on that; else the same with only the dim 0s widened (some size-1 dims broadcast, e.g. a
    mask's head dim) and why the model refused the rest; else (`flat`, (), why)."""
    labels = _labels(model, flat, spec)
    failure, tried = None, None
    for only_first in (False, True):
        picks = [[d for d in ds if value.shape[d] == 1 and (d == 0 or not only_first)] if ds is not None else []
                 for value, ds in zip(flat, dims)]
        if not any(picks) or picks == tried:
            break
        tried = picks
        grown = [_repeat(value, ds) for value, ds in zip(flat, picks)]
        args, kwargs = pytree.tree_unflatten(grown, spec)
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception as exc:  # the model cannot take these sizes: try fewer, and say why if none
            failure = failure or f"the model fails with {', '.join(_describe(labels, picks))} widened to 2: " \
                f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            continue
        return grown, tuple(f"{text}: 1 -> 2" for text in _describe(labels, picks)), failure
    return flat, (), failure


def _describe(labels: list[str], picks: list[list[int]]) -> list[str]:
    return [f"{labels[i]} dim {d}" for i, ds in enumerate(picks) for d in ds]


def _repeat(value: Any, dims: list[int]) -> Any:
    for dim in dims:
        value = value.repeat_interleave(2, dim=dim)
    return value


def _labels(model: torch.nn.Module, flat: list[Any], spec: Any) -> list[str]:
    """A name for each flat input: forward's parameter name, with the pytree path inside it."""
    named = _by_parameter(model, *pytree.tree_unflatten(list(range(len(flat))), spec))
    labels = [""] * len(flat)
    for name, value in named.items():
        for path, index in pytree.tree_flatten_with_path(value)[0]:
            labels[index] = name + pytree.keystr(path)
    return labels


def program_dynamic_dims(program: torch.export.ExportedProgram) -> dict[str, list[int]]:
    """{input name: its dims that are symbolic} over the user inputs of an exported program."""
    names = set(program.graph_signature.user_inputs)
    found = {}
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and node.name in names and isinstance(value, torch.Tensor):
            dims = [i for i, size in enumerate(value.shape) if not is_concrete_int(size)]  # a SymInt can be fixed
            if dims:
                found[node.name] = dims
    return found


@contextlib.contextmanager
def mha_fastpath_disabled():
    """nn.MultiheadAttention's inference fast path is one fused op with nothing to rewrite inside."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def capture(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            dynamic_shapes: Any = None) -> tuple[Captured, Any]:
    """Export `model` with dynamic batch / sequence dimensions where possible (`export_dynamic`),
    static shapes otherwise.

    Returns the capture and the model's own output on the inputs it was captured with (the
    verification reference).
    """
    with hf_cache_disabled(model):
        return _capture(model, args, kwargs, dynamic_shapes)


def _capture(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
             dynamic_shapes: Any) -> tuple[Captured, Any]:
    # The runs before the reference leave the random state as the caller set it (dropout masks of a
    # model in training mode must be the ones verification reproduces).
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception as exc:  # the user's model failing on its own inputs is a user error
            raise CaptureError(f"the model fails on its example inputs: {type(exc).__name__}: {exc}") from exc
        exported = export_dynamic(model, args, kwargs, dynamic_shapes)
    with torch.no_grad():  # on the inputs captured with (the widened ones)
        reference = model(*exported.args, **exported.kwargs)
    module = inline_inert_autocast(drop_metadata_asserts(exported.program.module()))
    thread_cache_writes(module)  # KV caches written in place: make the written values reach the reads
    captured = Captured(module, exported.args, exported.kwargs,
                        bool(exported.dynamic_dims), exported.static_reason, exported.dynamic_dims, exported.widened,
                        exported.not_widened)
    return captured, reference


aten = torch.ops.aten
# Ops that torch.autocast never recasts (no lower-precision or fp32 policy), so a region of them
# computes the same with autocast on or off.
_AUTOCAST_INERT = LAYOUT_OPS | CAST_OPS | NOOP_OPS | {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.cos.default, aten.sin.default,
    aten.cat.default, aten.stack.default, aten.arange.default, aten.arange.start, aten.arange.start_step,
    aten.sym_size.int, operator.getitem, operator.neg, operator.add, operator.sub, operator.mul,
    operator.floordiv,
}


def inline_inert_autocast(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Inline (in place) the `wrap_with_autocast` regions of `module` whose ops autocast leaves alone.

    x-transformers disables autocast around its rotary embedding; torch.export writes that as a
    region calling a submodule, which detection and index replay cannot look into (they saw the
    key depend on the query's projection through the region's shared outputs). Such a region
    computes the same with or without autocast, so its body can stand in the graph itself.
    """
    graph = module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.higher_order.wrap_with_autocast:
            continue
        body_node, operands = node.args[4], node.args[5:]
        body = getattr(module, body_node.target) if isinstance(body_node, torch.fx.Node) else None
        if not isinstance(body, torch.fx.GraphModule) or node.kwargs or any(
                n.op in ("call_function", "call_method", "call_module", "get_attr") and n.target not in _AUTOCAST_INERT
                for n in body.graph.nodes):
            continue
        if any(user.target is not operator.getitem for user in node.users):
            continue
        env: dict[torch.fx.Node, Any] = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], operands))
        with graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "call_function":
                    env[inner] = graph.node_copy(inner, lambda a: env[a])
        results = next(n for n in body.graph.nodes if n.op == "output").args[0]
        for user in list(node.users):
            replacement = results[user.args[1]]
            user.replace_all_uses_with(env[replacement] if isinstance(replacement, torch.fx.Node) else replacement)
            graph.erase_node(user)
        graph.erase_node(node)
        if not body_node.users:
            graph.erase_node(body_node)
            delattr(module, body_node.target)
        changed = True
    if changed:
        module.recompile()
    return module


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
