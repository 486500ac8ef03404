"""Issue 9, loading: switchhead.load refuses tampered or truncated outputs with a LoadError (never
another exception, never a half-loaded model), and never unpickles anything, even from a file
crafted to run code when unpickled. Every case edits a real saved directory."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

import attention_gen as gen
import switchhead
from attention_gen import Spec
from switchhead.io import LoadError
from helpers import forge_saved_graph

SPEC = Spec(heads=2, kv_heads=2, head_dim=4, d_model=8, proj="fused", mask="causal_flag")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    model = gen.build(SPEC)
    args, kwargs = gen.inputs(SPEC, 2, 5)
    converted = switchhead.convert(model, args, kwargs)
    return switchhead.save(converted, tmp_path_factory.mktemp("saved") / "out", args, kwargs), converted, args


@pytest.fixture
def saved(pristine, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(pristine[0], directory)
    return directory


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Any unpickling during a test of this file fails it."""
    def refuse(*args, **kwargs):
        raise AssertionError("switchhead.load unpickled data")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def _load_fails(directory: Path, match: str | None = None):
    with pytest.raises(LoadError, match=match) as info:
        switchhead.load(directory)
    assert str(info.value).strip()
    return str(info.value)


def test_the_pristine_copy_loads(saved, pristine):
    loaded = switchhead.load(saved)
    x = gen.inputs(SPEC, 3, 7, seed=2)[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), pristine[1](x))


# ------------------------------------------------------------------------------ model.safetensors


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1], ids=["empty", "7_bytes", "length_only", "header_cut", "last_byte_cut"])
def test_truncated_weights_are_refused(saved, keep):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    _load_fails(saved, "safetensors|weights|disagree")


def _edit_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8:8 + size]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])


def test_header_length_beyond_the_file_is_refused(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    _load_fails(saved, "safetensors")


def _first_tensor(header):
    """The first stored matrix (a tensor of rank >= 2) of a safetensors header."""
    return next(name for name, entry in header.items() if name != "__metadata__" and len(entry["shape"]) >= 2)


@pytest.mark.parametrize("tamper", ["shape", "dtype", "renamed", "dropped", "alias_to_nowhere", "foreign_format"])
def test_edited_weights_header_is_refused(saved, tamper):
    def edit(header):
        name = _first_tensor(header)
        entry = header[name]
        if tamper == "shape":  # same byte count, another shape
            entry["shape"] = [int(torch.tensor(entry["shape"]).prod())]
        elif tamper == "dtype":
            entry["dtype"] = "I32"
        elif tamper == "renamed":
            header["not." + name] = header.pop(name)
        elif tamper == "dropped":
            header.pop(name)
        elif tamper == "alias_to_nowhere":
            header["__metadata__"]["aliases"] = json.dumps({name + ".copy": "missing.tensor"})
        else:
            header["__metadata__"]["format"] = "something-else"
        return header

    _edit_header(saved / "model.safetensors", edit)
    _load_fails(saved)


def test_flipped_weight_byte_is_refused(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    _load_fails(saved)


# ----------------------------------------------------------------------------- model.graph.json


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_truncated_program_is_refused(saved, fraction):
    path = saved / "model.graph.json"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    _load_fails(saved, "model.graph.json")


def _nodes(document):
    return [n for graph in document["graphs"] for n in graph["nodes"]]


def test_graph_op_redirected_to_a_python_function_is_refused_and_nothing_runs(saved, tmp_path):
    """Targets are resolved by name: 'os:system' or a path through torch's attributes to it must be
    refused at load, before anything runs."""
    sentinel = tmp_path / "ran"
    for forged in ("posix:system", "torch.serialization:os.system", "switchhead.io:os.system"):
        def redirect(document, forged=forged):
            node = next(n for n in _nodes(document) if isinstance(n["target"], dict) and "op" in n["target"])
            node["target"] = {"fn": forged}
            node["args"] = [f"touch {sentinel}"]
        forge_saved_graph(saved, redirect)
        _load_fails(saved, "refusing")
    assert not sentinel.exists()


@pytest.mark.parametrize("tamper", ["unknown_op", "dangling_node", "bad_encoding", "missing_key", "no_root", "version"])
def test_forged_graph_document_is_refused(saved, tamper):
    def edit(document):
        nodes = _nodes(document)
        op = next(n for n in nodes if isinstance(n["target"], dict) and "op" in n["target"])
        if tamper == "unknown_op":
            op["target"] = {"op": "aten::no_such_op.default"}
        elif tamper == "dangling_node":
            op["args"] = [{"node": "nowhere"}]
        elif tamper == "bad_encoding":
            op["args"] = [{"pickle": "gASV"}]
        elif tamper == "missing_key":
            del op["kwargs"]
        elif tamper == "no_root":
            document["graphs"][-1]["path"] = "elsewhere"
        else:
            document["version"] = 99
    forge_saved_graph(saved, edit)
    _load_fails(saved)


def test_edited_graph_op_is_refused(saved, pristine):
    path = saved / "model.graph.json"
    text = path.read_text()
    op = re.search(r'"aten::(?!tanh")\w+"', text).group(0)  # the first aten op of the graph, as tanh
    edited = text.replace(op, '"aten::tanh"', 1)
    assert edited != path.read_text()
    path.write_text(edited)
    _load_fails(saved)


# ---------------------------------------------------------------------------------- report.json


@pytest.mark.parametrize("tamper", ["truncated", "not_an_object", "format", "version", "files"])
def test_tampered_report_is_refused(saved, tamper):
    path = saved / "report.json"
    text = path.read_text()
    report = json.loads(text)
    if tamper == "truncated":
        path.write_text(text[: len(text) // 2])
    elif tamper == "not_an_object":
        path.write_text("[1, 2, 3]")
    else:
        if tamper == "format":
            report["format"] = "pickle"
        elif tamper == "version":
            report["format_version"] = 99
        else:
            report["files"]["program"] = "../../etc/passwd"
        path.write_text(json.dumps(report))
    _load_fails(saved)


def test_swapped_weights_of_another_model_are_refused(saved, tmp_path):
    other = Spec(heads=2, kv_heads=1, head_dim=4, d_model=8)
    model = gen.build(other)
    args, kwargs = gen.inputs(other, 2, 5)
    elsewhere = switchhead.save(switchhead.convert(model, args, kwargs), tmp_path / "other", args, kwargs)
    shutil.copy(elsewhere / "model.safetensors", saved / "model.safetensors")
    _load_fails(saved)
