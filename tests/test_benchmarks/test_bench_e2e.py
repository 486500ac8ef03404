"""Smoke test of benchmarks/bench_e2e.py on the CPU: the tiny pair end to end (convert, attention
layer, training step, prefill, profile), the JSON, the markdown section and its replacement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import load_benchmark


def _load():
    return load_benchmark("bench_e2e")


def test_tiny_cpu_run_writes_json_and_section(tmp_path):
    bench = _load()
    out = tmp_path / "out"
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Kernels\n\nkernel table\n\n## End-to-end\n\nold numbers\n\n## Healing\n\nheal\n")
    results = bench.main(["--device", "cpu", "--tiny", "--out", str(out), "--seq-lens", "24", "--tokens", "48",
                          "--warmup", "0", "--iters", "1", "--profile", "--write", str(doc)])

    saved = json.loads((out / "e2e.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"], default=str))
    rows = {(r["measure"], r["side"]): r for r in saved["rows"]}
    for measure in ("attn", "train", "prefill", "profile"):
        for side in ("dense", "switchhead"):
            row = rows[(measure, side)]
            assert "error" not in row, row.get("traceback", row.get("error"))
            assert row["ms"] > 0
    assert 0 < rows[("attn", "switchhead")]["attn_mac_ratio"] < 2
    assert rows[("train", "switchhead")]["loss"] > 0
    geometry = saved["pairs"]["tiny"]["geometry"]
    assert geometry["num_heads"] == 2 and geometry["num_experts"] == 3
    assert (out / "profile_tiny_24_switchhead.txt").read_text().strip()

    text = doc.read_text()
    assert "old numbers" not in text and "kernel table" in text and "## Healing\n\nheal" in text
    assert text.count("## End-to-end") == 1 and "| tiny | 24 | 2 |" in text
    # regenerating from the JSON gives the same section
    bench.main(["--from-json", str(out / "e2e.json"), "--write", str(doc)])
    assert doc.read_text() == text


def test_triton_analysis_probe_counts_analyses_and_restores_torch():
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from torch._higher_order_ops import triton_kernel_wrap

    triton_analysis_probe = load_benchmark("compile.probe").triton_analysis_probe

    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(dst + offsets, tl.load(src + offsets, mask=offsets < n), mask=offsets < n)

    original = triton_kernel_wrap.identify_accessed_tensors
    kwargs = {"src": torch.ones(4), "dst": torch.empty(4), "n": 4, "BLOCK": 8}
    with triton_analysis_probe() as stats:
        for _ in range(2):  # what torch does per call site while compiling
            triton_kernel_wrap.identify_accessed_tensors(_copy, kwargs, {})
    assert stats["ttir_analyses"] == 2 and stats["ttir_analysis_s"] > 0
    assert triton_kernel_wrap.identify_accessed_tensors is original



def test_first_call_note_lists_every_length():
    """A recompile at a later length must not hide the first (longest) compile of the same measure:
    the H200 run of benchmarks/results/e2e_h200_session5_47M.json compiled the SwitchHead prefill in 100 s at T=8192
    and took 4 s at T=2048."""
    bench = _load()
    results = json.loads((Path(__file__).parents[2] / "benchmarks" / "results" / "e2e_h200_session5_47M.json").read_text())
    note = next(line for line in bench.markdown(results).splitlines() if line.startswith("- First calls"))
    assert "47M prefill switchhead T=8192 100 s (512 analyses, 59 s)" in note
    assert "47M prefill switchhead T=2048 4 s" in note
