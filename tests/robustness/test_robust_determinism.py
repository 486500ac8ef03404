"""Issue 9, determinism: the same model and seed give the same converted weights and the same report,
byte for byte, whatever the global RNG state, in this process and in fresh processes (other hash
seeds), through the API and the command line.

report.json is compared byte for byte, except for the command line's "timings_s" (wall-clock step
times, different on every run by nature): sites, skipped, config, costs, verify_max_error, versions,
manifest, example input shapes and "source" (both runs read the same model file) must be identical.
The weights and program files are compared by content; see _assert_same_outputs for the three
serialisation details excluded there, each pinned by a strict xfail."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import attention_gen as gen
import switchhead
from attention_gen import Spec

SPEC = Spec(heads=4, kv_heads=2, head_dim=4, d_model=16, proj="fused", layout="grouped", mask="causal_flag",
            extras=("rope",), blocks=2, num_experts=3, top_k=2)
TIMING_FIELDS = ("timings_s",)
TINY_MODEL = Path(__file__).resolve().parents[1] / "cli" / "tiny_model.py"


def _convert(seed: int = 0, rng: int = 0, init: str = "upcycle"):
    model = gen.build(SPEC)
    args, kwargs = gen.inputs(SPEC, 2, 5)
    torch.manual_seed(rng)  # the global RNG must not matter: only config.seed does
    config = switchhead.SwitchHeadConfig(num_experts=3, top_k=2, seed=seed, init=init)
    return switchhead.convert(model, args, kwargs, config=config), args, kwargs


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


@pytest.mark.parametrize("init", ["upcycle", "random"])
def test_same_seed_same_weights_and_report_in_process(init):
    first, _, _ = _convert(rng=1, init=init)
    second, _, _ = _convert(rng=2, init=init)
    assert _same_state(first, second)
    assert switchhead.report_of(first).to_json() == switchhead.report_of(second).to_json()
    assert str(first.graph) == str(second.graph)
    other, _, _ = _convert(seed=1, rng=1, init=init)
    routers = [k for k in first.state_dict() if k.endswith("_router")]
    assert routers and not all(torch.equal(first.state_dict()[k], other.state_dict()[k]) for k in routers), \
        "config.seed does not reach the routers"


def _safetensors_parts(path: Path) -> tuple[dict, dict, bytes]:
    """(tensor header, metadata, data) of a safetensors file."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    return header, header.pop("__metadata__", {}), data[8 + size:]


def _drop_graph_ids(raw: bytes) -> bytes:
    """model.json without torch's per-process `from_node` graph ids (id() of a Python graph); the
    from_node records are JSON strings inside the JSON, hence the escaped quotes."""
    return re.sub(rb'graph_id(\\\\)*\\?": \d+', b"graph_id", raw)


def _program_parts(path: Path) -> dict[str, object]:
    """The archive's members, minus the fields that differ by nature (see _assert_same_outputs)."""
    with zipfile.ZipFile(path) as archive:
        parts = {}
        for name in archive.namelist():
            if name.endswith(".data/serialization_id"):
                continue
            raw = archive.read(name)
            parts[name] = _drop_graph_ids(raw) if name.endswith("models/model.json") else raw
        return parts


def _assert_same_outputs(a: Path, b: Path, timing_fields=()) -> None:
    """Same report.json (bytes, modulo `timing_fields`), same tensors and safetensors header, same
    program. Excluded, besides timing: in model.pt2 torch's random `.data/serialization_id` and the
    `graph_id` of each node's `from_node` record (id() of a Python object), and so the program's
    checksum in report.json; a strict xfail below asks for a byte-identical program."""
    reports = [json.loads((d / "report.json").read_text()) for d in (a, b)]
    for report in reports:  # the program's checksum follows its bytes, which are not deterministic (xfail below)
        report["sha256"].pop("model.pt2")
    if timing_fields:
        for report in reports:
            for field in timing_fields:
                assert field in report, f"{field} is no longer written: update TIMING_FIELDS"
                report.pop(field)
    else:
        texts = [(d / "report.json").read_text() for d in (a, b)]
        digests = [json.loads(t)["sha256"]["model.pt2"] for t in texts]
        assert texts[0].replace(digests[0], "") == texts[1].replace(digests[1], "")
    assert reports[0] == reports[1]
    assert _safetensors_parts(a / "model.safetensors") == _safetensors_parts(b / "model.safetensors")
    assert _program_parts(a / "model.pt2") == _program_parts(b / "model.pt2")


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    dirs = []
    for i, rng in enumerate((3, 4)):
        converted, args, kwargs = _convert(rng=rng)
        dirs.append(switchhead.save(converted, root / f"out{i}", args, kwargs))
    return dirs


def test_saved_outputs_are_identical(two_saves):
    _assert_same_outputs(*two_saves)


def test_saved_weights_file_is_byte_identical(two_saves):
    a, b = two_saves
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.xfail(strict=True, reason="bug: io._write_program saves the program as torch.export.save "
                   "writes it: every node's metadata.from_node[].graph_id is id() of a Python graph and "
                   ".data/serialization_id is random, so model.pt2 differs between identical conversions")
def test_saved_program_file_is_byte_identical(two_saves):
    a, b = two_saves
    assert (a / "model.pt2").read_bytes() == (b / "model.pt2").read_bytes()


@pytest.mark.slow
def test_command_line_in_fresh_processes_with_other_hash_seeds(tmp_path):
    """The command twice on the same model file, in interpreters with other PYTHONHASHSEEDs: the same
    outputs, report.json modulo TIMING_FIELDS."""
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"cli{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        code = "from switchhead.cli import main; main()"
        subprocess.run([sys.executable, "-c", code, str(TINY_MODEL), "--quiet", "--output", str(out)],
                       env=env, check=True, capture_output=True, timeout=300)
        outs.append(out)
    _assert_same_outputs(*outs, timing_fields=TIMING_FIELDS)
