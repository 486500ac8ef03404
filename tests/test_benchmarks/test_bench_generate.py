"""Smoke test of benchmarks/bench_generate.py on the CPU: tiny MHA and GQA decoders, dense vs folded
decode steps, the cache sizes, the JSON and the markdown section."""

from __future__ import annotations

import json

from helpers import load_benchmark


def test_tiny_cpu_run_measures_both_sides(tmp_path):
    bench = load_benchmark("bench_generate")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Kernels\n\nkernel table\n")
    results = bench.main(["--device", "cpu", "--tiny", "--contexts", "24", "--batches", "1", "3", "--warmup", "0",
                          "--iters", "1", "--json", str(tmp_path / "gen.json"), "--write", str(doc)])
    saved = json.loads((tmp_path / "gen.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    rows = {(r["model"], r["side"], r["batch"]): r for r in saved["rows"]}
    assert len(rows) == 2 * 2 * 2 and all("error" not in r for r in rows.values()), saved["rows"]
    for (model, side, batch), row in rows.items():
        assert row["tokens_per_s"] > 0 and row["kv_cache_bytes"] == row["kv_cache_bytes_per_token"] * batch * 25
    # MHA 4 -> 2 heads halves the cache; GQA 9 -> 3 query heads keeps its 3 KV heads
    assert rows[("tiny-MHA", "folded", 3)]["kv_cache_bytes"] * 2 == rows[("tiny-MHA", "dense", 3)]["kv_cache_bytes"]
    assert rows[("tiny-GQA", "folded", 3)]["kv_cache_bytes"] == rows[("tiny-GQA", "dense", 3)]["kv_cache_bytes"]
    text = doc.read_text()
    assert "kernel table" in text and text.count(f"## {bench.TITLE}") == 1 and "| tiny-MHA | 24 | 3 |" in text
    bench.main(["--from-json", str(tmp_path / "gen.json"), "--write", str(doc)])
    assert doc.read_text() == text
