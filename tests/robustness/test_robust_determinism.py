"""Issue 9, determinism: the same model and seed give the same converted weights and the same report,
byte for byte, whatever the global RNG state, in this process and in fresh processes (other hash
seeds), through the API and the command line.

Every saved file (model.graph.json, model.safetensors, report.json) is compared byte for byte; only the
command line's report.json has one field that differs by nature, "timings_s" (wall-clock step
times), and is compared without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def _convert(seed: int = 0, rng: int = 0, init: str = "upcycle", **config):
    model = gen.build(SPEC)
    args, kwargs = gen.inputs(SPEC, 2, 5)
    torch.manual_seed(rng)  # the global RNG must not matter: only config.seed does
    config = switchhead.SwitchHeadConfig(num_experts=3, top_k=2, seed=seed, init=init, **config)
    return switchhead.convert(model, args, kwargs, config=config), args, kwargs


def save_conversion(directory: str, rng: int) -> Path:
    """Convert SPEC (seed 0) with the global RNG at `rng` and save it to `directory`."""
    converted, args, kwargs = _convert(rng=rng)
    return switchhead.save(converted, directory, args, kwargs)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


@pytest.mark.parametrize("init", ["upcycle", "random", "fold"])
def test_same_seed_same_weights_and_report_in_process(init):
    config = {"init": init, "num_heads": 2} if init == "fold" else {"init": init}
    first, _, _ = _convert(rng=1, **config)
    second, _, _ = _convert(rng=2, **config)
    assert _same_state(first, second)
    assert switchhead.report_of(first).to_json() == switchhead.report_of(second).to_json()
    assert str(first.graph) == str(second.graph)
    other, _, _ = _convert(seed=1, rng=1, **config)
    routers = [k for k in first.state_dict() if k.endswith("_router")]
    assert routers and not all(torch.equal(first.state_dict()[k], other.state_dict()[k]) for k in routers), \
        "config.seed does not reach the routers"


def _assert_same_files(a: Path, b: Path, timing_fields: tuple[str, ...] = ()) -> None:
    """The same files in `a` and `b`, byte for byte; report.json without `timing_fields`."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "report.json" in names
    for name in names:
        first, second = (a / name).read_bytes(), (b / name).read_bytes()
        if name == "report.json" and timing_fields:
            reports = [json.loads(raw) for raw in (first, second)]
            for report in reports:
                for field in timing_fields:
                    assert field in report, f"{field} is no longer written: update TIMING_FIELDS"
                    report.pop(field)
            assert reports[0] == reports[1]
        else:
            assert first == second, f"{name} differs between {a} and {b}"


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("determinism")
    return [save_conversion(str(root / f"out{i}"), rng) for i, rng in enumerate((3, 4))]


def test_saved_files_are_byte_identical_in_process(two_saves):
    _assert_same_files(*two_saves)


@pytest.mark.slow
def test_saved_files_are_byte_identical_in_fresh_processes(two_saves, tmp_path):
    """Two fresh interpreters (other hash seeds, other global RNG seeds) save what this process saved."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); from test_robust_determinism import save_conversion; " \
           "save_conversion(sys.argv[2], int(sys.argv[3]))"
    runs = {}
    for hash_seed, rng in (("1", "5"), ("2", "6")):  # side by side: half the wall time on two cores
        out = tmp_path / f"fresh{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        runs[out] = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(out), rng],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for out, run in runs.items():
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err.decode()[-2000:]
        _assert_same_files(two_saves[0], out)


def test_saved_program_loads_and_checks_its_checksums(two_saves):
    """The normalised program loads (load verifies the sha256 of both files) and computes what the
    conversion computes, at another shape."""
    args, kwargs = gen.inputs(SPEC, 3, 7, seed=2)
    with torch.no_grad():
        converted, _, _ = _convert(rng=3)
        assert torch.equal(switchhead.load(two_saves[0])(*args, **kwargs), converted(*args, **kwargs))


@pytest.mark.slow
def test_command_line_in_fresh_processes_with_other_hash_seeds(tmp_path):
    """The command twice on the same model file, in interpreters with other PYTHONHASHSEEDs: the same
    files, report.json modulo TIMING_FIELDS."""
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"cli{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        code = "from switchhead.cli import main; main()"
        subprocess.run([sys.executable, "-c", code, str(TINY_MODEL), "--quiet", "--output", str(out)],
                       env=env, check=True, capture_output=True, timeout=300)
        outs.append(out)
    _assert_same_files(*outs, timing_fields=TIMING_FIELDS)
