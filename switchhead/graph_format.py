"""A converted module's fx graphs as plain JSON data, and back, without torch.export.

Saving the graph the converted module already runs needs no re-export (which, on a 30-layer model,
took most of a minute) and loading it needs no fake tensors or symbolic shapes (tens of seconds
in torch.export.load): only the nodes, their operators and constant arguments, and where each
tensor lives. Nothing is executed or unpickled on load: operators are looked up by name among
torch's registered ops and a short list of functions (`FUNCTIONS_ALLOWED`).

A document is {"version", "graphs": [{"path", "nodes", "codegen"}...], "tensors": {name: kind}},
graphs innermost first and the root ("") last; each node is
{"name", "op", "target", "args", "kwargs", "meta"} with arguments encoded by `_encode`.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.fx
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from switchhead.errors import SwitchHeadError
from switchhead.graph.surgery import ensure_module

GRAPH_FORMAT_VERSION = 1
# Python functions a graph may call: operator's and math's, torch's symbolic-size helpers, ours.
FUNCTIONS_ALLOWED = "operator and math functions, torch.sym_*, switchhead functions"
KEPT_META = ("nn_module_stack", "stack_trace", "switchhead_router")  # node meta worth keeping
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_FORMATS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.memory_format)}


class GraphFormatError(SwitchHeadError):
    """A graph holds something this format cannot store, or a document cannot be rebuilt."""


# ------------------------------------------------------------------------------------- writing


def dump_module(module: torch.fx.GraphModule) -> dict[str, Any]:
    """The document of `module`: every GraphModule in it and the kind of every tensor attribute."""
    graphs = []
    for path, sub in sorted(module.named_modules(), key=lambda item: -item[0].count(".") - bool(item[0])):
        if isinstance(sub, torch.fx.GraphModule):
            graphs.append({"path": path, "nodes": [_dump_node(sub, n) for n in sub.graph.nodes if not _is_guard(sub, n)],
                           "codegen": _dump_codegen(sub.graph._codegen)})
    return {"version": GRAPH_FORMAT_VERSION, "graphs": graphs, "tensors": tensor_kinds(module)}


def tensor_kinds(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """name -> {"kind": parameter | buffer | attribute, ...} for every tensor reachable by name
    (tied tensors under each of their names)."""
    kinds: dict[str, dict[str, Any]] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name, value in sub._parameters.items():
            if value is not None:
                kinds[prefix + name] = {"kind": "parameter", "requires_grad": value.requires_grad}
        for name, value in sub._buffers.items():
            if value is not None:
                kinds[prefix + name] = {"kind": "buffer", "persistent": name not in sub._non_persistent_buffers_set}
        for name, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                kinds[prefix + name] = {"kind": "attribute"}
    return kinds


def _is_guard(owner: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """torch.export's input-guard call (`_guards_fn`): Python code made at export time, which cannot be
    stored as data; the graph's own shape checks and the input spec still apply."""
    return node.op == "call_module" and not node.users and not isinstance(owner.get_submodule(node.target), torch.fx.GraphModule)


def _dump_node(owner: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, Any]:
    if node.op == "call_module" and not isinstance(owner.get_submodule(node.target), torch.fx.GraphModule):
        raise GraphFormatError(f"node {node.name} calls module {node.target}, which is not a graph: cannot store it")
    where = f"node {node.name}"
    meta = {key: _plain(node.meta[key], where) for key in KEPT_META if key in node.meta}
    return {"name": node.name, "op": node.op, "target": _dump_target(node), "args": _encode(node.args, where),
            "kwargs": _encode(dict(node.kwargs), where), "meta": meta}


def _dump_target(node: torch.fx.Node) -> Any:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return {"op": target.name()}
    if isinstance(target, torch._ops.HigherOrderOperator):
        return {"hop": target.name()}
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(name, str) and _allowed(module, name)) or _function(module, name) is not target:
        raise GraphFormatError(f"node {node.name} calls {target!r}, which is not a torch op or one of the "
                               f"{FUNCTIONS_ALLOWED}: cannot store it")
    return {"fn": f"{module}:{name}"}


def _allowed(module: str, qualname: str) -> bool:
    return (module in ("_operator", "math") or (module == "torch" and qualname.startswith("sym_"))
            or module == "switchhead" or module.startswith("switchhead."))


def _encode(value: Any, where: str) -> Any:
    """JSON data for a node argument; lists stay lists, everything else is a one-key object."""
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        items = [_encode(v, where) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, where) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start, where), _encode(value.stop, where), _encode(value.step, where)]}
    raise GraphFormatError(f"{where} has an argument of type {type(value).__name__}, which cannot be stored")


def _plain(value: Any, where: str) -> Any:
    """Meta values as JSON (tuples become lists; anything else its str())."""
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _dump_codegen(codegen: CodeGen) -> dict[str, Any] | None:
    if type(codegen) is CodeGen:
        return None
    if not isinstance(codegen, _PyTreeCodeGen):
        raise GraphFormatError(f"a graph uses code generator {type(codegen).__name__}, which cannot be stored")
    info = codegen.pytree_info
    try:
        return {"orig_args": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec),
                "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None}
    except Exception as exc:  # the types of the model's inputs/outputs are not registered by name
        raise GraphFormatError(f"the model's input/output structure cannot be stored: {exc}") from exc


# ------------------------------------------------------------------------------------- reading


def load_module(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """Rebuild the module of `dump_module` with `tensors` (name -> value, tied names sharing one tensor;
    parameters are made Parameters again, tied names the same Parameter)."""
    if document.get("version") != GRAPH_FORMAT_VERSION:
        raise GraphFormatError(f"graph format version {document.get('version')} is not supported "
                               f"(this build reads {GRAPH_FORMAT_VERSION})")
    kinds = document["tensors"]
    if set(kinds) != set(tensors):
        missing, unknown = sorted(set(kinds) - set(tensors)), sorted(set(tensors) - set(kinds))
        raise GraphFormatError(f"the graph and its weights disagree (missing {missing[:3]}, unknown {unknown[:3]})")
    values = _values(kinds, tensors)
    container = torch.nn.Module()
    for name, value in values.items():
        _place(container, name, value, kinds[name])
    built: torch.fx.GraphModule | None = None
    for entry in document["graphs"]:  # innermost first, so a parent finds its subgraphs in place
        owner = ensure_module(container, entry["path"])
        graph = _load_graph(entry)
        built = torch.fx.GraphModule(owner, graph, class_name="GraphModule")
        if entry["path"]:
            parent, _, attr = entry["path"].rpartition(".")
            setattr(ensure_module(container, parent), attr, built)
    if built is None or document["graphs"][-1]["path"] != "":
        raise GraphFormatError("the document has no root graph")
    for name, value in values.items():  # GraphModule copied plain tensors as buffers: restore each kind
        _place(built, name, value, kinds[name])
    return built


def _values(kinds: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    made: dict[int, torch.Tensor] = {}
    values = {}
    for name, kind in kinds.items():
        value = tensors[name]
        if kind["kind"] == "parameter":
            value = made.setdefault(id(value), torch.nn.Parameter(value, requires_grad=kind["requires_grad"]))
        values[name] = value
    return values


def _place(root: torch.nn.Module, name: str, value: torch.Tensor, kind: dict[str, Any]) -> None:
    path, _, attr = name.rpartition(".")
    owner = ensure_module(root, path)
    owner._parameters.pop(attr, None)
    owner._buffers.pop(attr, None)
    owner.__dict__.pop(attr, None)
    if kind["kind"] == "parameter":
        owner.register_parameter(attr, value)
    elif kind["kind"] == "buffer":
        owner.register_buffer(attr, value, persistent=kind["persistent"])
    else:
        setattr(owner, attr, value)


def _load_graph(entry: dict[str, Any]) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for record in entry["nodes"]:
        where = f"node {record['name']}"
        target = _load_target(record["target"], where)
        args = _decode(record["args"], nodes, where)
        kwargs = _decode(record["kwargs"], nodes, where)
        if record["op"] == "output":
            node = graph.output(args[0])
        else:
            node = graph.create_node(record["op"], target, tuple(args), kwargs, name=record["name"])
        if node.name != record["name"]:
            raise GraphFormatError(f"{where} is named twice in its graph")
        for key, value in record["meta"].items():
            node.meta[key] = _meta(key, value)
        nodes[record["name"]] = node
    codegen = entry["codegen"]
    if codegen is not None:
        try:
            in_spec = pytree.treespec_loads(codegen["in_spec"])
            out_spec = pytree.treespec_loads(codegen["out_spec"]) if codegen["out_spec"] is not None else None
        except Exception as exc:  # a type of the model's outputs is not registered in this process
            raise GraphFormatError(f"cannot rebuild the model's input/output structure ({exc}); import the library "
                                   "that defines it (e.g. transformers) before loading") from exc
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(codegen["orig_args"], in_spec, out_spec))
    graph.lint()
    return graph


def _meta(key: str, value: Any) -> Any:
    if key == "nn_module_stack":  # {key: (path, type)} as torch.export writes it
        return {k: tuple(v) for k, v in value.items()}
    return value


def _load_target(target: Any, where: str) -> Any:
    if isinstance(target, str):
        return target
    if "op" in target:
        namespace, _, rest = target["op"].partition("::")
        name, _, overload = rest.partition(".")
        try:
            return getattr(getattr(getattr(torch.ops, namespace), name), overload or "default")
        except (AttributeError, RuntimeError) as exc:
            raise GraphFormatError(f"{where} calls {target['op']}, which this torch does not have: {exc}") from None
    if "hop" in target:
        try:
            return getattr(torch.ops.higher_order, target["hop"])
        except AttributeError:
            raise GraphFormatError(f"{where} uses {target['hop']}, which this torch does not have") from None
    module, _, name = target["fn"].partition(":")
    function = _function(module, name) if _allowed(module, name) else None
    # the object found must be defined under that very name: a path through another module's
    # attributes ("torch.sym_x.os.system") is refused
    if function is None or getattr(function, "__module__", None) != module or getattr(function, "__qualname__", None) != name:
        raise GraphFormatError(f"{where} calls {target['fn']}, which is not one of the {FUNCTIONS_ALLOWED}: refusing it")
    return function


def _function(module: str, qualname: str) -> Any:
    try:
        value: Any = importlib.import_module(module)
        for part in qualname.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as exc:
        raise GraphFormatError(f"cannot find {module}:{qualname}: {exc}") from None
    return value


def _decode(value: Any, nodes: dict[str, torch.fx.Node], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes, where) for v in value]
    if not isinstance(value, dict):
        return value
    (key, inner), = value.items()
    if key == "node":
        if inner not in nodes:
            raise GraphFormatError(f"{where} reads {inner}, which comes later or not at all")
        return nodes[inner]
    if key == "tuple":
        return tuple(_decode(v, nodes, where) for v in inner)
    if key == "dict":
        return {k: _decode(v, nodes, where) for k, v in inner.items()}
    if key == "float":
        return float(inner)
    if key == "slice":
        return slice(*(_decode(v, nodes, where) for v in inner))
    table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _FORMATS}.get(key)
    if table is not None:
        if inner not in table:
            raise GraphFormatError(f"{where}: unknown {key} {inner!r}")
        return table[inner]
    if key == "device":
        return torch.device(inner)
    raise GraphFormatError(f"{where}: unknown argument encoding {key!r}")

