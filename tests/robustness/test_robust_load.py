"""Issue 9, loading: switchhead.load refuses tampered or truncated outputs with a LoadError (never
another exception, never a half-loaded model), and never unpickles anything, even from a file
crafted to run code when unpickled. Every case edits a real saved directory."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import attention_gen as gen
import switchhead
from attention_gen import Spec
from switchhead.io import LoadError

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


def _rewrite_member(archive: Path, suffix: str, edit) -> None:
    """Rewrite the zip member whose name ends with `suffix` (bytes -> bytes), keeping the others."""
    with zipfile.ZipFile(archive) as z:
        items = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for info, data in items:
            z.writestr(info, edit(data) if info.filename.endswith(suffix) else data)


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


# ------------------------------------------------------------------------------------ model.pt2


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_truncated_program_is_refused(saved, fraction):
    path = saved / "model.pt2"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    _load_fails(saved, "model.pt2")


def test_program_json_cut_in_the_middle_is_refused(saved):
    _rewrite_member(saved / "model.pt2", "models/model.json", lambda raw: raw[: len(raw) // 2])
    _load_fails(saved, "model.pt2")


def test_program_that_unpickles_code_is_refused_and_nothing_runs(saved, tmp_path):
    """A weights config switched to pickle, pointing at a payload that would create a file when
    unpickled (a real exploit shape): refused before anything is read."""
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    payload = pickle.dumps(Exploit())

    def to_pickle(raw):
        config = json.loads(raw)
        first = next(iter(config["config"].values()))
        first["use_pickle"], first["path_name"] = True, "weight_0"
        return json.dumps(config).encode()

    _rewrite_member(saved / "model.pt2", "model_weights_config.json", to_pickle)
    _rewrite_member(saved / "model.pt2", "data/weights/weight_0", lambda raw: payload)
    _load_fails(saved, "pickle")
    assert not sentinel.exists()


def test_program_with_a_pickled_member_is_refused(saved):
    with zipfile.ZipFile(saved / "model.pt2", "a") as z:
        root = z.namelist()[0].split("/")[0]
        z.writestr(f"{root}/data/constants/extra.pt", pickle.dumps({"a": 1}))
    _load_fails(saved, "refusing")


def test_graph_op_redirected_to_a_python_function_is_refused_or_inert(saved, tmp_path):
    """model.json targets are resolved by name under `torch.`: 'torch.serialization.os.system' is
    os.system. Loading must refuse it (or at least never call it)."""
    sentinel = tmp_path / "ran"

    def redirect(raw):
        program = json.loads(raw)
        for node in program["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.sigmoid.default":
                node["target"] = "torch.serialization.os.system"
        return json.dumps(program).encode()

    _rewrite_member(saved / "model.pt2", "models/model.json", redirect)
    try:
        module = switchhead.load(saved)
    except LoadError:
        return
    with pytest.raises(Exception):
        module(torch.full((2, 5, 8), 1.0))
    assert not sentinel.exists()


def test_edited_graph_op_is_refused(saved, pristine):
    def swap(raw):
        return raw.replace(b"torch.ops.aten.sigmoid.default", b"torch.ops.aten.tanh.default")

    _rewrite_member(saved / "model.pt2", "models/model.json", swap)
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
