"""Save a converted model to a directory, and load it back without unpickling anything.

A saved directory (format version 2) holds three files:

    model.graph.json   the converted module's fx graphs as data (switchhead.graph_format): the graph
                       it already runs, stored without re-exporting it
    model.safetensors  the values of its parameters, buffers and tensor constants (tied weights
                       stored once, see "aliases") and its example inputs
    report.json        the conversion report plus this format's manifest ("format", "files", ...)

`save` writes into a temporary sibling directory, loads the result back, checks that it computes
exactly what the converted module computes, and only then moves it into place: a failed or
interrupted save leaves no partial output. `load` executes and unpickles nothing: operators are
looked up by name, tensors come from the safetensors file. (Format version 1, a torch.export
archive `model.pt2`, took most of a minute to write and tens of seconds to read on a 135M model;
this build no longer reads it: save such a model again from its source.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, Iterator

import torch
import torch.fx
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils import _pytree as pytree

from switchhead.api import REPORT_KEY
from switchhead.cache import CacheLayout
from switchhead.decoder import CachedLM, share_tensors
from switchhead.device import follow_device_moves
from switchhead.errors import SwitchHeadError
from switchhead.graph_format import GraphFormatError, dump_module, load_module
from switchhead.inputs import DEFAULT_MASK_KEY, accept_missing_mask, example_inputs, remember_inputs
from switchhead.report import ConversionReport

FORMAT = "switchhead-rewrite"
FORMAT_VERSION = 2
PROGRAM_FILE = "model.graph.json"
LEGACY_PROGRAM_FILE = "model.pt2"  # format version 1 (no longer read)
INPUTS_PREFIX = "switchhead:example_inputs/"  # safetensors names of the example inputs (no module path has ':')
WEIGHTS_FILE = "model.safetensors"
METADATA_KEY = "switchhead"  # the one safetensors metadata entry: JSON of format, version, aliases
REPORT_FILE = "report.json"
OUTPUT_FILES = (WEIGHTS_FILE, PROGRAM_FILE, REPORT_FILE)  # in the order they are moved into place
DECODE_PROGRAM_FILE = "decode.graph.json"  # a converted decoder's one-token graph (switchhead.decoder)
DECODE_PREFIX = "switchhead:decode/"  # safetensors names of the decode graph's tensors (shared ones are aliases)
KNOWN_FILES = {*OUTPUT_FILES, DECODE_PROGRAM_FILE, LEGACY_PROGRAM_FILE}  # what a previous output of any version holds

class SaveError(SwitchHeadError):
    """The output directory cannot be used, or the saved program does not reproduce the model."""


class LoadError(SwitchHeadError):
    """A directory is not a complete, safe switchhead-rewrite output."""


# ----------------------------------------------------------------------------------------- save


def save(
    converted: torch.fx.GraphModule | CachedLM,
    directory: str | os.PathLike[str],
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    report: ConversionReport | None = None,
    *,
    overwrite: bool = False,
    check: bool = True,
    extra: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Save `converted` (from switchhead.convert or switchhead.load) to `directory`; returns the directory.

    The graph the module runs is stored as it is (no re-export). args/kwargs are example inputs for
    the check and for later exports; by default the ones convert() used. `report` defaults to the
    one convert() attached. A directory that exists is replaced only when it is empty or a previous
    output of the same model (same attention sites and parameter count); any other directory is
    refused unless `overwrite`, and then, when it is not ours, only our three files in it are
    replaced. `check` loads the saved files back and requires identical outputs on the example
    inputs. `extra` adds keys to report.json. `progress` is called with each step's name as it
    starts ("write", "check"). A CachedLM (switchhead.convert_decoder) is saved as its prefill graph
    plus `decode.graph.json`, the weights stored once; `load` gives the CachedLM back.
    """
    step = progress or (lambda name: None)
    decoder = converted if isinstance(converted, CachedLM) else None
    if decoder is not None:
        converted = decoder.prefill
    args, kwargs = example_inputs(converted, args, kwargs)
    if report is None:
        report = getattr(converted, "meta", {}).get(REPORT_KEY)
    target = Path(directory).expanduser().resolve()
    state = output_state(target)
    if state == "file":
        raise SaveError(f"output {target} exists and is not a directory")
    if state == "foreign" and not overwrite:
        raise SaveError(f"output directory {target} exists and was not written by {FORMAT}; "
                        "choose another directory or pass --force / overwrite=True")
    if state == "ours" and not overwrite and report is not None and not holds_same_model(target, report.to_dict()):
        raise SaveError(f"output directory {target} holds another model's output; choose another directory "
                        "or pass --force / overwrite=True to replace it")
    step("write")
    try:
        document = dump_module(converted)
        decode_document = dump_module(decoder.decode) if decoder is not None else None
    except GraphFormatError as exc:
        raise SaveError(f"cannot save this module: {exc}") from None
    tensors = _tensor_attributes(converted)
    device = next((str(t.device) for t in tensors.values()), "cpu")
    inputs = _input_tensors(args, kwargs, document)
    programs = {PROGRAM_FILE: document}
    if decoder is not None:
        programs[DECODE_PROGRAM_FILE] = decode_document
        tensors.update({DECODE_PREFIX + n: t for n, t in _tensor_attributes(decoder.decode).items()})
        inputs.update({DECODE_PREFIX + n: t for n, t in _input_tensors(*example_inputs(decoder.decode), decode_document).items()})
    files = (*OUTPUT_FILES, *programs.keys() - {PROGRAM_FILE})
    with _staging_directory(target) as stage:
        mode = _file_mode(stage)
        _write_weights(tensors, inputs, stage / WEIGHTS_FILE)
        for name, body in programs.items():
            _write_text(stage / name, json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "files": {"program": PROGRAM_FILE, "weights": WEIGHTS_FILE,
                      **({"decode_program": DECODE_PROGRAM_FILE} if decoder is not None else {})},
            "sha256": {name: _sha256(stage / name) for name in (*programs, WEIGHTS_FILE)},
            "program_dynamic_shapes": report.dynamic_shapes if report is not None else None,
            "program_static_reason": report.static_reason if report is not None else None,
            "device": device,
            "example_inputs": describe_inputs(args, kwargs),
            "default_attention_mask": bool(converted.meta.get(DEFAULT_MASK_KEY, False)),
        }
        if decoder is not None:
            manifest["cache_layout"] = decoder.layout.to_dict()
        body = {**(report.to_dict() if report is not None else {}), **(extra or {}), **manifest}
        _write_text(stage / REPORT_FILE, json.dumps(body, indent=2, sort_keys=True) + "\n")
        for name in files:
            os.chmod(stage / name, mode)
        os.chmod(stage, mode | (mode & 0o444) >> 2)  # mkdtemp made it private; as a new folder would be
        if check:
            step("check")
            loaded = _load(stage, None, checksums=False)  # just hashed
            if decoder is not None:
                check_round_trip(decoder.decode, loaded.decode, *example_inputs(decoder.decode))
                loaded = loaded.prefill
            check_round_trip(converted, loaded, args, kwargs)
        _commit(stage, target, state, files)
    return target


def holds_same_model(directory: Path, report: dict[str, Any]) -> bool:
    """Whether the output in `directory` was converted from the same model as `report` describes:
    the same parameter count and the same attention sites (path, type, heads, head size, width)."""
    try:
        saved = json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return _model_identity(saved) == _model_identity(report)


def _model_identity(report: dict[str, Any]) -> Any:
    keys = ("path", "module_type", "num_heads", "num_kv_heads", "head_dim", "embed_dim")
    sites = report.get("sites") if isinstance(report.get("sites"), list) else []
    return report.get("parameters_before"), [[site.get(k) for k in keys] for site in sites if isinstance(site, dict)]


def _file_mode(folder: Path) -> int:
    """The mode a new file gets under the process's umask (read off a probe file, without changing
    the umask, which is process-wide)."""
    probe = folder / ".mode"
    with open(probe, "w"):
        pass
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    return mode


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
    if entries <= KNOWN_FILES and REPORT_FILE in entries:
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


def _commit(stage: Path, target: Path, state: str, files: tuple[str, ...] = OUTPUT_FILES) -> None:
    if state == "missing":
        os.replace(stage, target)
    elif state in ("empty", "ours"):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    else:  # a foreign directory the caller allowed us to write into: replace only our files
        for name in files:
            os.replace(stage / name, target / name)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _write_weights(tensors: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor into safetensors; a tensor tied to an earlier one is stored once and recorded in
    the metadata's "aliases" (name -> stored name)."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, int]] = set()
    for name, tensor in {**tensors, **inputs}.items():
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


def _input_tensors(args: tuple[Any, ...], kwargs: dict[str, Any], document: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The example inputs' tensors by safetensors name; their structure (and plain values) go into
    `document["example_inputs"]`, left out when a leaf is neither a tensor nor a JSON scalar."""
    leaves, spec = pytree.tree_flatten((list(args), dict(kwargs)))
    tensors, encoded = {}, []
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[f"{INPUTS_PREFIX}{index}"] = leaf
            encoded.append({"tensor": f"{INPUTS_PREFIX}{index}"})
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            encoded.append({"value": leaf})
        else:
            return {}
    document["example_inputs"] = {"spec": pytree.treespec_dumps(spec), "leaves": encoded}
    return tensors


# ----------------------------------------------------------------------------------------- load


def load(directory: str | os.PathLike[str], *, device: str | torch.device | None = None
         ) -> torch.fx.GraphModule | CachedLM:
    """The module saved in `directory` by `save` (or the command line), ready to run and train (a
    CachedLM, with `generate`, for a saved switchhead.convert_decoder result).

    Its tensors come from model.safetensors, onto `device` (default: the device it was saved
    from; the program may have that device baked into some of its ops); nothing is unpickled or
    executed. `switchhead.report_of(module)` gives the saved report; the module remembers its
    example inputs, so saving or exporting it again needs none.
    """
    return _load(Path(directory), device, checksums=True)


def _load(root: Path, device: str | torch.device | None, checksums: bool) -> torch.fx.GraphModule | CachedLM:
    manifest = read_manifest(root)
    if checksums:
        check_checksums(root, manifest)
    tensors = read_weights(root / WEIGHTS_FILE, device or manifest.get("device", "cpu"))
    decode_tensors = {n[len(DECODE_PREFIX):]: tensors.pop(n) for n in [n for n in tensors if n.startswith(DECODE_PREFIX)]}
    module = _rebuild(root / PROGRAM_FILE, tensors, manifest)
    decode_file = manifest["files"].get("decode_program")
    if decode_file is None:
        return module
    decode = _rebuild(root / decode_file, decode_tensors, manifest)
    try:
        share_tensors(decode, module)
        layout = CacheLayout.from_dict(manifest["cache_layout"])
    except (SwitchHeadError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LoadError(f"{root} holds a decoder whose graphs or cache layout are damaged: {exc}; save it again") from None
    return CachedLM(module, decode, layout)


def _rebuild(program_path: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> torch.fx.GraphModule:
    """The module of one saved graph document, with its example inputs and the saved report."""
    inputs = {name: tensors.pop(name) for name in [n for n in tensors if n.startswith(INPUTS_PREFIX)]}
    try:
        document = json.loads(program_path.read_text(encoding="utf-8"))
        module = load_module(document, tensors)
        if "example_inputs" in document:
            remember_inputs(module, *_decoded_inputs(document["example_inputs"], inputs))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # bad JSON, GraphFormatError, a damaged document
        raise LoadError(f"{program_path} cannot be rebuilt: {type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0]}") from None
    if manifest.get("default_attention_mask"):
        accept_missing_mask(module)
    required = [f.name for f in dataclasses.fields(ConversionReport)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if all(name in manifest for name in required):
        module.meta[REPORT_KEY] = ConversionReport(**{f.name: manifest[f.name] for f in dataclasses.fields(ConversionReport)
                                                      if f.name in manifest})
    return follow_device_moves(module)


def _decoded_inputs(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    leaves = []
    for leaf in entry["leaves"]:
        if "tensor" in leaf:
            if leaf["tensor"] not in tensors:
                raise LoadError(f"the saved example inputs name a missing tensor {leaf['tensor']}")
            leaves.append(tensors[leaf["tensor"]])
        else:
            leaves.append(leaf["value"])
    args, kwargs = pytree.tree_unflatten(leaves, pytree.treespec_loads(entry["spec"]))
    return tuple(args), kwargs


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
        raise LoadError(f"{root} has format version {manifest.get('format_version')}; this build reads {FORMAT_VERSION}"
                        + (" (version 1 is no longer read: save the model again)" if manifest.get("format_version") == 1 else ""))
    files = manifest.get("files")
    if not isinstance(files, dict) or {files.get("program"), files.get("weights")} != {PROGRAM_FILE, WEIGHTS_FILE}:
        raise LoadError(f"{report} does not name the program and weights files")
    if files.get("decode_program", DECODE_PROGRAM_FILE) != DECODE_PROGRAM_FILE:
        raise LoadError(f"{report} names an unknown decode program {files['decode_program']!r}")
    for name in (PROGRAM_FILE, WEIGHTS_FILE, *([DECODE_PROGRAM_FILE] if "decode_program" in files else [])):
        if not (root / name).is_file():
            raise LoadError(f"{root} is incomplete: {name} is missing")
    if not isinstance(manifest.get("sha256"), dict):
        raise LoadError(f"{report} records no checksums of the program and weights")
    return manifest


def check_checksums(root: Path, manifest: dict[str, Any]) -> None:
    """The program and weights are the bytes `save` wrote (sha256 recorded in report.json)."""
    for name in (PROGRAM_FILE, WEIGHTS_FILE, *([manifest["files"]["decode_program"]] if "decode_program" in manifest["files"] else [])):
        if manifest["sha256"].get(name) != _sha256(root / name):
            raise LoadError(f"{root / name} does not match the checksum in {REPORT_FILE}: it was changed or damaged "
                            "after saving; save the model again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a saved model.safetensors on `device`, aliases resolved; LoadError when it is not one."""
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
