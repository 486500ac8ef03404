"""Save a converted model to a directory, and load it back without unpickling anything.

A saved directory (format version 1) holds three files:

    model.pt2          the converted program, a torch.export archive WITHOUT weights: every
                       parameter, buffer and tensor constant is stored as a one-element placeholder
    model.safetensors  the real values of those tensors (tied weights stored once, see "aliases")
    report.json        the conversion report plus this format's manifest ("format", "files", ...)

`save` writes into a temporary sibling directory, loads the result back, checks that it computes
exactly what the converted module computes, and only then moves it into place: a failed or
interrupted save leaves no partial output. `load` reads the archive only after checking that it
holds no pickled payloads (torch.export.load unpickles those), and takes every tensor value from the
safetensors file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx
from safetensors import safe_open
from safetensors.torch import save_file
from torch.fx.traceback import NodeSource
from torch.utils import _pytree as pytree

from switchhead.api import REPORT_KEY
from switchhead.capture import drop_metadata_asserts, export_dynamic
from switchhead.device import follow_device_moves
from switchhead.errors import SwitchHeadError
from switchhead.report import ConversionReport

FORMAT = "switchhead-rewrite"
FORMAT_VERSION = 1
PROGRAM_FILE = "model.pt2"
WEIGHTS_FILE = "model.safetensors"
METADATA_KEY = "switchhead"  # the one safetensors metadata entry: JSON of format, version, aliases
REPORT_FILE = "report.json"
OUTPUT_FILES = (WEIGHTS_FILE, PROGRAM_FILE, REPORT_FILE)  # in the order they are moved into place

# Entries a data-only torch.export archive may hold (below its root folder). Anything else (AOTI
# shared libraries, pickled legacy weights, ...) makes `load` refuse the file.
_ARCHIVE_FILES = {"archive_format", "archive_version", "version", "byteorder"}
_ARCHIVE_DIRS = (".data/", "models/", "data/weights/", "data/constants/", "data/sample_inputs/", "extra/")


class SaveError(SwitchHeadError):
    """The output directory cannot be used, or the saved program does not reproduce the model."""


class LoadError(SwitchHeadError):
    """A directory is not a complete, safe switchhead-rewrite output."""


# ----------------------------------------------------------------------------------------- save


def save(
    converted: torch.fx.GraphModule,
    directory: str | os.PathLike[str],
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    report: ConversionReport | None = None,
    *,
    overwrite: bool = False,
    check: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save `converted` (from switchhead.convert) to `directory`; returns the directory.

    args/kwargs are example inputs (those given to convert). The program is exported with dynamic
    batch/sequence dimensions when the conversion was dynamic. `report` defaults to the one
    convert() attached. A directory that exists is replaced only when it is a previous output (or
    empty); any other directory is refused unless `overwrite`, and then only our three files in it
    are replaced. `check` loads the saved files back and requires identical outputs on the example
    inputs. `extra` adds keys to report.json.
    """
    kwargs = dict(kwargs or {})
    if report is None:
        report = getattr(converted, "meta", {}).get(REPORT_KEY)
    target = Path(directory).expanduser().resolve()
    state = output_state(target)
    if state == "file":
        raise SaveError(f"output {target} exists and is not a directory")
    if state == "foreign" and not overwrite:
        raise SaveError(f"output directory {target} exists and was not written by {FORMAT}; "
                        "choose another directory or pass --force / overwrite=True")
    program, static_reason = export_program(converted, args, kwargs,
                                            dynamic=report.dynamic_shapes if report is not None else True)
    device = next((str(t.device) for t in _program_tensors(program).values()), "cpu")
    with _staging_directory(target) as stage:
        _write_weights(program, stage / WEIGHTS_FILE)
        _write_program(program, stage / PROGRAM_FILE)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "files": {"program": PROGRAM_FILE, "weights": WEIGHTS_FILE},
            "sha256": {name: _sha256(stage / name) for name in (PROGRAM_FILE, WEIGHTS_FILE)},
            "program_dynamic_shapes": static_reason is None,
            "program_static_reason": static_reason,
            "device": device,
            "example_inputs": describe_inputs(args, kwargs),
        }
        body = {**(report.to_dict() if report is not None else {}), **(extra or {}), **manifest}
        _write_text(stage / REPORT_FILE, json.dumps(body, indent=2, sort_keys=True) + "\n")
        if check:
            check_round_trip(converted, load(stage), args, kwargs)
        _commit(stage, target, state)
    return target


def export_program(
    converted: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic: bool = True
) -> tuple[torch.export.ExportedProgram, str | None]:
    """Re-export a converted module (its switchhead ops have fake kernels) with its batch and
    sequence dims dynamic when `dynamic` (`capture.export_dynamic`: size-1 example dims are widened,
    so a batch-1 example still saves a model that takes other batch sizes), else static.

    Returns the program and, when it is static, why (None when it is dynamic)."""
    if not dynamic:
        return torch.export.export(converted, args, kwargs, strict=False), "the conversion was static"
    exported = export_dynamic(converted, args, kwargs)
    return exported.program, exported.static_reason


def describe_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """JSON-able shapes and dtypes of example inputs, e.g. {"args": ["float32[2, 7, 32]"], ...}."""

    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
        return value if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__

    return {"args": pytree.tree_map(one, list(args)), "kwargs": pytree.tree_map(one, kwargs)}


def check_round_trip(saved: torch.nn.Module, loaded: torch.nn.Module, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> None:
    """Raise SaveError unless `loaded` has the same tensors as `saved` and computes identical outputs."""
    want, got = saved.state_dict(), loaded.state_dict()
    if set(want) != set(got):
        raise SaveError(f"saved program has tensors {sorted(set(got) ^ set(want))[:3]} that differ from the model's")
    for name, value in want.items():
        if not torch.equal(value.detach().cpu(), got[name].detach().cpu()):
            raise SaveError(f"saved tensor {name} differs from the model's")
    outputs = []
    for module in (saved, loaded):
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outputs.append(module(*args, **kwargs))
    want_leaves, want_spec = pytree.tree_flatten(outputs[0])
    got_leaves, got_spec = pytree.tree_flatten(outputs[1])
    same = want_spec == got_spec and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(want_leaves, got_leaves)
    )
    if not same:
        raise SaveError("the saved program does not reproduce the converted model's outputs; please report this model")


def output_state(directory: str | os.PathLike[str]) -> str:
    """"missing", "empty", "ours" (a previous output), "foreign" (another directory) or "file"."""
    path = Path(directory)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return "empty"
    if entries <= set(OUTPUT_FILES) and REPORT_FILE in entries:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((path / REPORT_FILE).read_text()).get("format") == FORMAT:
                return "ours"
    return "foreign"


@contextlib.contextmanager
def _staging_directory(target: Path) -> Iterator[Path]:
    """A fresh directory next to `target` (same file system, so the final rename is atomic); it and
    any parent folders created for it are removed unless the body moved it into place."""
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not target.exists():
            for parent in created:  # innermost first
                with contextlib.suppress(OSError):
                    parent.rmdir()


def _commit(stage: Path, target: Path, state: str) -> None:
    if state == "missing":
        os.replace(stage, target)
    elif state in ("empty", "ours"):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    else:  # a foreign directory the caller allowed us to write into: replace only our files
        for name in OUTPUT_FILES:
            os.replace(stage / name, target / name)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _program_tensors(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    tensors = dict(program.state_dict)
    for name, value in program.constants.items():
        if not isinstance(value, torch.Tensor):
            raise SaveError(f"cannot save constant {name} of type {type(value).__name__}: only tensors are supported")
        tensors[name] = value
    return tensors


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _write_weights(program: torch.export.ExportedProgram, path: Path) -> None:
    """Every tensor of the program into safetensors; a tensor tied to an earlier one is stored once
    and recorded in the metadata's "aliases" (name -> stored name)."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, int]] = set()
    for name, tensor in _program_tensors(program).items():
        key = _storage_key(tensor)
        if key is not None and key in first_of:
            aliases[name] = first_of[key]
            continue
        value = tensor.detach().contiguous()
        if key is not None:
            first_of[key] = name
            storage = (value.device, value.untyped_storage().data_ptr())
            if storage in storages:  # an overlapping view of a stored tensor: safetensors needs its own copy
                value = value.clone()
            storages.add((value.device, value.untyped_storage().data_ptr()))
        stored[name] = value
    # One metadata key: safetensors keeps the metadata in a hash map, so several keys would be
    # written in a different order from run to run (and the file's bytes would differ).
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "aliases": aliases}
    save_file(stored, str(path), metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})


def _write_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """The archive without weights or example inputs: each tensor becomes a one-element placeholder
    broadcast to its shape (same dtype, shape and requires_grad), filled in by `load`."""
    tensors = _program_tensors(program)
    placeholders = {}
    for name, tensor in tensors.items():
        hollow = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
        if isinstance(tensor, torch.nn.Parameter):
            hollow = torch.nn.Parameter(hollow, requires_grad=tensor.requires_grad)
        placeholders[name] = hollow
    originals = dict(program.state_dict), dict(program.constants), program.example_inputs
    try:
        for name in program.state_dict:
            program.state_dict[name] = placeholders[name]
        for name in program.constants:
            program.constants[name] = placeholders[name]
        program.example_inputs = None
        with warnings.catch_warnings(), _stable_provenance(program):
            # the placeholders do not cover a whole storage, by design
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            torch.export.save(program, str(path))
    finally:
        program.state_dict.update(originals[0])
        program.constants.update(originals[1])
        program.example_inputs = originals[2]


@contextlib.contextmanager
def _stable_provenance(program: torch.export.ExportedProgram) -> Iterator[None]:
    """While the program is written, its nodes' provenance (`from_node`) names graphs by order of
    first appearance. torch records id() of each Python graph there, different on every run: the
    archive's bytes, and its `.data/serialization_id` (a checksum of them), would differ too."""
    numbers: dict[int, int] = {}
    originals = []
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            sources = node.meta.get("from_node")
            if sources:
                originals.append((node, sources))
                node.meta["from_node"] = [NodeSource._from_dict(_renumbered(s.to_dict(), numbers))
                                          if isinstance(s, NodeSource) else s for s in sources]
    try:
        yield
    finally:
        for node, sources in originals:
            node.meta["from_node"] = sources


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")  # in repr() of a function: differs per process


def _renumbered(record: dict[str, Any], numbers: dict[int, int]) -> dict[str, Any]:
    """A serialized NodeSource with each graph id replaced by its number in `numbers` (grown as met),
    and a Python function target's repr without its address ("<function router_logits at 0x7f..>")."""
    graph_id = record.get("graph_id", -1)
    if graph_id != -1:  # -1: no graph recorded
        graph_id = numbers.setdefault(graph_id, len(numbers))
    record = {**record, "graph_id": graph_id, "from_node": [_renumbered(r, numbers) for r in record.get("from_node") or []]}
    if isinstance(record.get("target"), str):
        record["target"] = _ADDRESS.sub(">", record["target"])
    return record


# ----------------------------------------------------------------------------------------- load


def load(directory: str | os.PathLike[str], *, device: str | torch.device | None = None) -> torch.fx.GraphModule:
    """The module saved in `directory` by `save` (or the command line), ready to run and train.

    Its tensors come from model.safetensors, onto `device` (default: the device it was saved
    from; the program may have that device baked into some of its ops); the program archive is
    read only after checking that it holds no pickled data. `switchhead.report_of(module)` gives
    the saved report.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    program_path = root / manifest["files"]["program"]
    check_archive_is_data_only(program_path)
    check_checksums(root, manifest)
    try:
        with warnings.catch_warnings():  # torch 2.11 warns that the (read-only) placeholders are not writable
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            program = torch.export.load(str(program_path))
    except Exception as exc:
        raise LoadError(f"{program_path} cannot be read by torch {torch.__version__}: {type(exc).__name__}: {exc}") from exc
    module = program.module()
    tensors = _read_weights(root / manifest["files"]["weights"], device or manifest.get("device", "cpu"))
    _install_tensors(module, tensors, program_path)
    fields = {name: manifest[name] for name in ConversionReport.__dataclass_fields__ if name in manifest}
    if len(fields) == len(ConversionReport.__dataclass_fields__):
        module.meta[REPORT_KEY] = ConversionReport(**fields)
    # saving re-exported the graph, which pinned capture-time dtypes again (see drop_metadata_asserts)
    return follow_device_moves(drop_metadata_asserts(module))


def read_manifest(root: Path) -> dict[str, Any]:
    """report.json of a saved directory, checked for format, version and files."""
    report = root / REPORT_FILE
    if not root.is_dir():
        raise LoadError(f"{root} is not a directory")
    try:
        manifest = json.loads(report.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{root} is not a {FORMAT} output: {REPORT_FILE} is missing") from None
    except ValueError as exc:
        raise LoadError(f"{report} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoadError(f"{report} was not written by {FORMAT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LoadError(f"{root} has format version {manifest.get('format_version')}; this build reads {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or {files.get("program"), files.get("weights")} != {PROGRAM_FILE, WEIGHTS_FILE}:
        raise LoadError(f"{report} does not name the program and weights files")
    for name in (PROGRAM_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise LoadError(f"{root} is incomplete: {name} is missing")
    if not isinstance(manifest.get("sha256"), dict):
        raise LoadError(f"{report} records no checksums of the program and weights")
    return manifest


def check_checksums(root: Path, manifest: dict[str, Any]) -> None:
    """The program and weights are the bytes `save` wrote (sha256 recorded in report.json)."""
    for name in (PROGRAM_FILE, WEIGHTS_FILE):
        if manifest["sha256"].get(name) != _sha256(root / name):
            raise LoadError(f"{root / name} does not match the checksum in {REPORT_FILE}: it was changed or damaged "
                            "after saving; save the model again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_archive_is_data_only(path: Path) -> None:
    """Refuse a .pt2 archive that torch.export.load would unpickle anything from (pickled weights or
    constants, custom objects, example inputs) or that carries compiled code."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise LoadError(f"{path} is not a torch.export archive: {exc}") from None
    with archive:
        for info in archive.infolist():
            inner = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
            if info.is_dir() or inner in _ARCHIVE_FILES:
                continue
            if not inner.startswith(_ARCHIVE_DIRS):
                raise LoadError(f"{path} holds {inner!r}, which a weights-free program never contains; refusing to load it")
            if inner.startswith("data/sample_inputs/") and info.file_size:
                raise LoadError(f"{path} holds pickled example inputs; refusing to load it")
            if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".pt") and info.file_size:
                raise LoadError(f"{path} holds pickled tensors ({inner}); refusing to load it")
            if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".json"):
                _check_payload_config(path, inner, archive.read(info))


def _check_payload_config(path: Path, name: str, raw: bytes) -> None:
    try:
        config = json.loads(raw).get("config", {})
    except (ValueError, AttributeError):
        raise LoadError(f"{path}: {name} is not a payload config") from None
    for fqn, meta in config.items():
        pickled = meta.get("use_pickle", True) or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_"))
        if pickled:
            raise LoadError(f"{path}: {fqn} is stored as a pickled object; refusing to load it")


def _read_weights(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:
        raise LoadError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        header = json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        raise LoadError(f"{path} has unreadable {METADATA_KEY} metadata") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("aliases", {}), dict):
        raise LoadError(f"{path} was not written by {FORMAT}")
    for alias, name in header.get("aliases", {}).items():
        if name not in tensors:
            raise LoadError(f"{path}: alias {alias} names a missing tensor {name}")
        tensors[alias] = tensors[name]
    return tensors


def _install_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], program_path: Path) -> None:
    """Replace every placeholder of the loaded program by its safetensors value, keeping parameters
    parameters (same requires_grad) and tied names tied."""
    expected = _tensor_attributes(module)
    if set(expected) != set(tensors):
        missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise LoadError(f"{program_path} and its weights disagree (missing {missing[:3]}, unknown {unknown[:3]})")
    made: dict[int, torch.Tensor] = {}
    for name, placeholder in expected.items():
        value = tensors[name]
        if value.shape != placeholder.shape or value.dtype != placeholder.dtype:
            raise LoadError(f"weight {name} is {value.dtype}{list(value.shape)}, the program expects "
                            f"{placeholder.dtype}{list(placeholder.shape)}")
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        if isinstance(placeholder, torch.nn.Parameter):
            value = made.setdefault(id(value), torch.nn.Parameter(value, requires_grad=placeholder.requires_grad))
            owner._parameters[attr] = value
        elif attr in owner._buffers:
            owner._buffers[attr] = value
        else:
            setattr(owner, attr, value)


def _tensor_attributes(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                found[prefix + name] = value
        found.update({prefix + n: v for n, v in sub._parameters.items() if v is not None})
        found.update({prefix + n: v for n, v in sub._buffers.items() if v is not None})
    return found
