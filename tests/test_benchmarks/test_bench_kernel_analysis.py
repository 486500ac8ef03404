"""benchmarks/bench_kernel_analysis.py on the CPU: every launch of the paper shapes analysed, none
believed to write an input of its op, the JSON and the BENCHMARKS.md section written."""

from __future__ import annotations

import json

import pytest

from helpers import load_benchmark

pytest.importorskip("triton")


def test_paper_shapes_are_analysed_and_reported(tmp_path):
    bench = load_benchmark("bench_kernel_analysis")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Kernels\n\nkernel table\n")
    result = bench.main(["--tokens", "1500", "--repeats", "1", "--write", str(doc), "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "kernel_analysis.json").read_text())["rows"]
    assert rows == result["rows"]
    assert {r["shape"] for r in rows} == set(bench.SHAPES)
    assert all(len([r for r in rows if r["shape"] == s]) == 19 for s in bench.SHAPES)  # 4 + 6 + 4 + 5 launches
    assert all(r["analysis_ms"] > 0 and r["written"] for r in rows)
    assert not any(r["inputs_written"] for r in rows)
    text = doc.read_text()
    assert "kernel table" in text and f"## {bench.TITLE}" in text and "| 262M | 19 |" in text
