"""export_onnx: write a (converted or dense) model as ONNX that stock onnxruntime runs, and check it.

Pipeline: torch.export (dynamic dims by default) -> torch.onnx.export(dynamo=True) with the two expert
ops translated to `ai.switchhead` nodes -> attach their model-local functions (or inline them) ->
save (weights in external data above 1 GiB) -> onnx.checker full check -> onnxruntime CPU vs PyTorch on the
example inputs and on inputs of a second shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from switchhead.capture import export_dynamic, export_static, hf_cache_disabled, mha_fastpath_disabled
from switchhead.errors import CaptureError, SwitchHeadError, VerificationError
from switchhead.inputs import example_inputs
from switchhead.passes.rewrite_experts import router_logits, router_logits_fp32

try:
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"ONNX export needs onnx, onnxscript and onnxruntime ({exc}); pip install onnx onnxscript onnxruntime"
    ) from exc

from switchhead.exporters import onnx_ops

DEFAULT_RTOL = 1e-4
MIN_OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to `<name>.data` (protobuf files stop at 2 GB)


class OnnxExportError(SwitchHeadError):
    """The model could not be exported to ONNX, or the written file fails the ONNX checker."""


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """What export_onnx wrote and checked.

    Args:
        path: the .onnx file (weights beside it in `<name>.data` when external_data).
        inline: True when the expert ops were expanded into standard ops (no custom domain left).
        custom_nodes: `ai.switchhead` op type -> number of nodes in the main graph.
        functions: the model-local functions attached (`domain::name`).
        inputs: input name -> shape, symbolic dims as strings (dynamic) and sizes as ints (static).
        external_data: whether the weights were written to a separate file.
        static_reason: why the dynamic export failed and static shapes were used (None: not needed).
        verify_errors: inputs label -> max relative error of onnxruntime vs PyTorch (empty: not verified).
    """

    path: Path
    inline: bool
    custom_nodes: dict[str, int]
    functions: tuple[str, ...]
    inputs: dict[str, list[int | str]]
    external_data: bool
    static_reason: str | None
    verify_errors: dict[str, float]


def export_onnx(
    module: torch.nn.Module,
    path: str | os.PathLike,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    inline: bool = False,
    verify: bool = True,
    dynamic: bool = True,
    opset_version: int | None = None,
    external_data: bool | None = None,
    check_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    verify_rtol: float = DEFAULT_RTOL,
    optimize: bool | None = None,
    progress: Callable[[str], None] | None = None,
    dynamic_shapes: Any = None,
) -> OnnxExport:
    """Export `module` (a switchhead.convert() result or any dense model) to ONNX at `path`.

    Args:
        module: the model; called as `module(*args, **kwargs)`.
        path: the .onnx file to write (parent folders are created).
        args, kwargs: example inputs (default: those convert() used, or the model's own
            `example_inputs()` / `dummy_inputs`).
        inline: write standard ONNX ops only (expert ops expanded in place) for runtimes without
            function support; default keeps `ai.switchhead` nodes plus their model-local functions.
        verify: run the file in onnxruntime (CPU) on the example inputs and on inputs of a second
            shape and compare with PyTorch; raise VerificationError above `verify_rtol`.
        dynamic: export the batch and sequence dims dynamic where the model allows it, as convert()
            captures them (image sizes, feature widths and dims the model fixes stay static; a size-1
            example dim is widened for the export); False bakes the example shapes in.
        opset_version: default ONNX opset (>= 18); None: the exporter's default.
        external_data: weights in a separate `<name>.data` file; None: only above 1 GiB of weights
            (a single protobuf file cannot pass 2 GB).
        check_inputs: (args, kwargs) of the second shape; default: the example inputs with every
            dynamic dim of the file grown by one (values rotated cyclically, so token ids and masks
            stay valid): for images the batch only.
        verify_rtol: the largest accepted max |onnx - torch| / max |torch| per output.
        optimize: run the ONNX exporter's graph optimizer (constant folding, type propagation,
            redundant node removal). None: only with `inline` (runtimes without function support
            get the tidiest graph); onnxruntime applies its own optimizations when it loads a
            model, and on SmolLM2-135M the exporter's took about 60 of the export's 150 CPU seconds.
        progress: called with a description of each stage as it starts (the whole export takes
            minutes on a 135M model on a small CPU).
        dynamic_shapes: with `dynamic`, torch.export's dynamic_shapes instead of the automatic
            batch / sequence dims.
    """
    step = progress or (lambda text: None)
    if opset_version is not None and opset_version < MIN_OPSET:
        raise ValueError(f"opset_version must be >= {MIN_OPSET} (the expert functions use its ops), got {opset_version}")
    args, kwargs = example_inputs(module, args, kwargs)
    path = Path(path)
    with _export_mode(module):
        step("capturing with torch.export")
        program, static_reason = _torch_export(_without_autocast_regions(module), args, kwargs, dynamic, dynamic_shapes)
        step("translating to ONNX")
        try:
            onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=onnx_ops.translation_table(),
                                             opset_version=opset_version, verbose=False,
                                             optimize=inline if optimize is None else optimize)
        except Exception as exc:
            raise OnnxExportError(f"torch.onnx.export failed: {_first_line(exc)}") from exc
    model = onnx_program.model
    _pin_numeric_dims(model)
    functions = _attach_functions(model)
    if inline:
        with _quiet("onnxscript"):
            _inline_functions(model)
        functions = ()
    if external_data is None:
        external_data = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None) > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    step(f"writing {path.name}")
    ir.save(model, path, external_data=f"{path.name}.data" if external_data else None)
    step("checking it with onnx.checker")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"the written model fails onnx.checker: {_first_line(exc)}") from exc
    result = OnnxExport(
        path=path, inline=inline, custom_nodes=_custom_node_counts(model), functions=functions,
        inputs={v.name: [d if isinstance(d, int) else str(d) for d in v.shape] for v in model.graph.inputs},
        external_data=external_data,
        static_reason=static_reason, verify_errors={},
    )
    if verify:
        step("running it in onnxruntime against PyTorch")
        errors = _verify(module, program, path, args, kwargs, check_inputs, verify_rtol, result.inputs)
        result = dataclasses.replace(result, verify_errors=errors)
    return result


# ------------------------------------------------------------------ export


@contextlib.contextmanager
def _export_mode(module: torch.nn.Module):
    """The capture settings of switchhead.convert (no HF KV cache, no fused MHA fast path)."""
    with hf_cache_disabled(module), mha_fastpath_disabled(), torch.no_grad(), _quiet("onnxscript"):
        yield


@contextlib.contextmanager
def _quiet(logger_name: str):
    """The ONNX optimizer logs a warning per op it does not fold; keep the user's console readable."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _without_autocast_regions(module: torch.nn.Module) -> torch.nn.Module:
    """A converted module's graph with its routers' autocast-off regions dropped (ONNX runs without
    autocast, so they change nothing there; torch.export is several times faster without them).
    A new GraphModule sharing the module's tensors; other modules are returned as they are."""
    if not isinstance(module, torch.fx.GraphModule) or not any(
            n.target is router_logits for n in module.graph.nodes):
        return module
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    graph._codegen = module.graph._codegen
    for node in graph.nodes:
        if node.target is router_logits:
            node.target = router_logits_fp32
    return torch.fx.GraphModule(module, graph, class_name=type(module).__name__)


def _torch_export(module, args, kwargs, dynamic: bool, dynamic_shapes: Any = None
                  ) -> tuple[torch.export.ExportedProgram, str | None]:
    """Dynamic: the batch and sequence dims as convert() captures them (`capture.export_dynamic`:
    size-1 example dims widened, the others static); static: the example shapes
    (`capture.export_static`)."""
    if dynamic:
        exported = export_dynamic(module, args, kwargs, dynamic_shapes)
        return exported.program, exported.static_reason
    try:
        return export_static(module, args, kwargs), None
    except CaptureError as exc:
        raise OnnxExportError(_first_line(exc)) from exc


def _pin_numeric_dims(model: ir.Model) -> None:
    """Dims that torch.export specialised can come out as dim_param "32": make them plain sizes."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape([_numeric(d) for d in value.shape])


def _numeric(dim):
    if isinstance(dim, ir.SymbolicDim) and dim.value is not None and dim.value.isdigit():
        return int(dim.value)
    return dim


def _attach_functions(model: ir.Model) -> tuple[str, ...]:
    """Add the function of every `ai.switchhead` op type the graph uses; opset imports = the model's."""
    used = sorted(_custom_node_counts(model))
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    for op_type in used:
        function = ir.serde.deserialize_function(onnx_ops.function_proto(op_type, opsets))
        model.functions[function.identifier()] = function
    return tuple(f"{onnx_ops.DOMAIN}::{op_type}" for op_type in used)


def _inline_functions(model: ir.Model) -> None:
    """Expand the expert functions in place and drop the casts that became no-ops.

    (Not onnxscript.optimizer.optimize: on a batch-1 export it folded a Reshape shape into a value
    that no node produces and no initializer holds, and the checker rejected the file.)"""
    InlinePass()(model)
    for node in list(model.graph):
        if node.op_type == "CastLike" and node.domain == "" and _dtype(node.inputs[0]) is not None \
                and _dtype(node.inputs[0]) == _dtype(node.inputs[1]) and not node.outputs[0].is_graph_output():
            ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
            model.graph.remove(node, safe=True)
    RemoveUnusedFunctionsPass()(model)
    RemoveUnusedOpsetsPass()(model)
    model.opset_imports.pop(onnx_ops.DOMAIN, None)


def _dtype(value: ir.Value) -> ir.DataType | None:
    """A value's dtype, also for the outputs of `Constant(value_float=...)` the functions create."""
    producer = value.producer()
    if value.dtype is None and producer is not None and producer.op_type == "Constant" and "value_float" in producer.attributes:
        return ir.DataType.FLOAT
    return value.dtype


def _custom_node_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:  # top-level nodes: the expert ops are never inside control flow
        if node.domain == onnx_ops.DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------ verification


def _verify(module, program, path: Path, args, kwargs, check_inputs, rtol: float,
            onnx_inputs: dict[str, list[int | str]]) -> dict[str, float]:
    """onnxruntime (CPU) vs PyTorch on the example inputs and on a second shape."""
    from switchhead.api import max_relative_error

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_spec = program.call_spec.in_spec
    names = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    cases = [("example", args, kwargs)]
    symbolic = any(isinstance(d, str) for shape in onnx_inputs.values() for d in shape)
    if check_inputs is not None:
        cases.append(("second", *check_inputs))
    elif symbolic:
        cases.append(("second", *_grown_inputs(args, kwargs, in_spec, names, onnx_inputs)))
    errors = {}
    for label, case_args, case_kwargs in cases:
        flat = fx_pytree.tree_flatten_spec((list(case_args), dict(case_kwargs)), in_spec)
        shapes = ", ".join(f"{n}{list(t.shape)}" for n, t in zip(names, flat) if isinstance(t, torch.Tensor))
        with _export_mode(module):
            try:
                expected = module(*case_args, **case_kwargs)
            except Exception as exc:
                raise VerificationError(f"the PyTorch model fails on the {label} inputs ({shapes}): {_first_line(exc)}; "
                                        "pass check_inputs=(args, kwargs) of a shape it accepts") from exc
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, flat) if n in onnx_inputs}
        try:
            got = session.run(None, feed)
        except Exception as exc:
            raise VerificationError(f"onnxruntime cannot run {path.name} on the {label} inputs ({shapes}): {_first_line(exc)}") from exc
        want = [leaf.cpu() for leaf in pytree.tree_leaves(expected) if isinstance(leaf, torch.Tensor)]
        if len(want) != len(got):
            raise VerificationError(f"{path.name} has {len(got)} outputs, the PyTorch model {len(want)} tensors")
        error = max_relative_error(want, [torch.from_numpy(g) for g in got])
        if not error <= rtol:
            raise VerificationError(f"{path.name} differs from PyTorch by {error:.3g} (max relative error > {rtol:g}) "
                                    f"on the {label} inputs ({shapes})")
        errors[f"{label} ({shapes})"] = error
    return errors


def _grown_inputs(args, kwargs, in_spec, names: list[str], onnx_inputs: dict[str, list[int | str]]):
    """The example inputs with every symbolic ONNX dim one larger, values rotated cyclically along it (so
    token ids and masks stay valid and the rows differ from the example's)."""
    flat = fx_pytree.tree_flatten_spec((list(args), dict(kwargs)), in_spec)
    grown = []
    for name, value in zip(names, flat):
        for dim, size in enumerate(onnx_inputs.get(name, [])):
            if isinstance(size, str) and isinstance(value, torch.Tensor):
                old = value.shape[dim]
                value = value.index_select(dim, (torch.arange(old + 1, device=value.device) + 1) % old)
        grown.append(value)
    new_args, new_kwargs = pytree.tree_unflatten(grown, in_spec)
    return tuple(new_args), new_kwargs
