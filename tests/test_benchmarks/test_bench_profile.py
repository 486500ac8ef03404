"""Smoke test of benchmarks/bench_profile.py on the CPU: the tiny pair profiled at two lengths, every
category table and the JSON; and the kernel-name categories it sums on the H200."""

from __future__ import annotations

import json

from helpers import load_benchmark


def test_tiny_cpu_run_profiles_both_sides_at_each_length(tmp_path):
    bench = load_benchmark("bench_profile")
    result = bench.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--seq-lens", "16", "8",
                         "--warmup", "1", "--steps", "1"])
    assert {(r["side"], r["seq_len"]) for r in result["rows"]} == {
        (side, t) for side in ("dense", "switchhead") for t in (16, 8)}
    for row in result["rows"]:
        assert sum(row["categories"].values()) > 0 and row["gemms"]
    assert json.loads((tmp_path / "profile.json").read_text())["rows"][0]["side"] == "dense"
    text = (tmp_path / "profile.md").read_text()
    assert "| all kernels |" in text and "T=8" in text and "T=16" in text
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Kernels\n\nkept\n")
    again = bench.main(["--from-json", str(tmp_path / "profile.json"), "--write", str(doc)])
    assert again["rows"] == json.loads((tmp_path / "profile.json").read_text())["rows"]
    written = doc.read_text()
    assert "kept" in written and f"## {bench.SECTION}" in written and "| all kernels |" in written
    assert again["meta"]["device"] == "cpu" and "--tiny" in again["meta"]["command"]


def test_kernel_names_fall_into_their_categories():
    bench = load_benchmark("bench_profile")
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16": "attention core",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "GEMM (cuBLAS/CUTLASS)",
        "sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x32x8": "GEMM (cuBLAS/CUTLASS)",
        "triton_red_fused_mul_sum_transpose_unsqueeze_view_10": "Inductor reduction",
        "triton_poi_fused_gelu_view_18": "Inductor pointwise",
        "_fan_out_kernel": "expert kernels (ours)",
        "multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>": "optimizer",
        "Memset (Device)": "copy / fill / other",
    }
    assert {name: bench.category(name) for name in names} == names
    assert bench.ANNOTATION.search("## Call CompiledFxGraph abc ##") and not bench.ANNOTATION.search("triton_poi_x")
