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
                          "--iters", "1", "--json", str(tmp_path / "gen.json"), "--write", str(doc),
                          "--profile", str(tmp_path / "profiles")])
    saved = json.loads((tmp_path / "gen.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    rows = {(r["model"], r["side"], r["batch"]): r for r in saved["rows"]}
    assert len(rows) == 2 * 2 * 2 and all("error" not in r for r in rows.values()), saved["rows"]
    for (model, side, batch), row in rows.items():
        assert row["tokens_per_s"] > 0 and row["kv_cache_bytes"] == row["kv_cache_bytes_per_token"] * batch * 25
    # MHA 4 -> 2 heads halves the cache; GQA 9 -> 3 query heads keeps its 3 KV heads
    assert rows[("tiny-MHA", "folded", 3)]["kv_cache_bytes"] * 2 == rows[("tiny-MHA", "dense", 3)]["kv_cache_bytes"]
    assert rows[("tiny-GQA", "folded", 3)]["kv_cache_bytes"] == rows[("tiny-GQA", "dense", 3)]["kv_cache_bytes"]
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == [
        f"profile_{m}_{s}.txt" for m in ("tiny-GQA", "tiny-MHA") for s in ("dense", "folded")]
    assert "aten::" in (tmp_path / "profiles" / "profile_tiny-MHA_folded.txt").read_text()
    text = doc.read_text()
    assert "kernel table" in text and text.count(f"## {bench.TITLE}") == 1 and "| tiny-MHA | 24 | 3 |" in text
    bench.main(["--from-json", str(tmp_path / "gen.json"), "--write", str(doc)])
    assert doc.read_text() == text


def test_verdicts_name_met_and_missed_targets():
    bench = load_benchmark("bench_generate")

    def row(heads, speed, cache):
        return {"heads_kv": heads, "tokens_per_s": speed, "kv_cache_bytes": cache}

    rows = {("mha", "dense", 8192, 16): row(16, 100, 4e9), ("mha", "folded", 8192, 16): row(4, 300, 1e9),
            ("mha", "dense", 1024, 1): row(16, 100, 4e9), ("mha", "folded", 1024, 1): row(4, 90, 1e9),
            ("gqa", "dense", 1024, 1): row(3, 100, 1e9), ("gqa", "folded", 1024, 1): row(3, 99, 1e9),
            ("gqa", "dense", 8192, 16): row(3, 100, 1e9), ("gqa", "folded", 8192, 16): row(3, 120, 1e9)}
    lines = bench.verdicts(rows)
    assert len(lines) == 2
    assert "mha, context 8192, batch 16: 3.00x faster with 4.0x less cache" in lines[0] and lines[0].endswith("met")
    assert "gqa, context 1024, batch 1" in lines[1] and "MISSED" in lines[1]
    rows[("mha", "folded", 8192, 16)] = row(4, 200, 1e9)
    assert "MISSED" in bench.verdicts(rows)[0]
