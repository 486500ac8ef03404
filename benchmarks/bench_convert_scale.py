"""Question: does conversion scale to real model sizes on a small CPU machine?

Builds a Llama-shaped model of about 1B parameters (Llama-3.2-1B geometry: d=2048, 16 layers,
32 query / 8 KV heads, random weights), converts it with the default upcycle config, and reports
wall-clock time per phase and peak resident memory relative to the model's own size.
Target (issue 2): at most 60 s and at most 2.5x the model's size on a 2-core CPU.

    python -m benchmarks.bench_convert_scale [--dtype float32|bfloat16] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import torch

import switchhead
from benchmarks.common import write_section


def build_llama_1b(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were left empty on meta
    model.tie_weights()
    return model.eval()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--write", action="store_true", help="append the result table to BENCHMARKS.md")
    options = parser.parse_args()
    dtype = getattr(torch, options.dtype)

    start = time.perf_counter()
    model = build_llama_1b(dtype)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_model = peak_rss_bytes()
    ids = torch.randint(0, 128256, (2, 16))

    start = time.perf_counter()
    new = switchhead.convert(model, (ids,), config=switchhead.SwitchHeadConfig(num_experts=4, top_k=2))
    convert_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    report = switchhead.report_of(new)

    rows = [
        ("parameters (dense)", f"{params / 1e9:.3f} B"),
        ("parameters (converted)", f"{report.parameters_after / 1e9:.3f} B"),
        ("dtype", options.dtype),
        ("model size", f"{model_bytes / 2**30:.2f} GiB"),
        ("sites rewritten", str(len(report.sites))),
        ("build model (not counted)", f"{build_s:.1f} s"),
        ("convert (capture + detect + rewrite + verify)", f"{convert_s:.1f} s"),
        ("peak RSS after building the model", f"{rss_model / 2**30:.2f} GiB"),
        ("peak RSS during conversion", f"{peak / 2**30:.2f} GiB = {peak / model_bytes:.2f}x model size"),
        ("verify max relative error", f"{report.verify_max_error:.2e}"),
    ]
    header = (f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}; "
              f"command: python -m benchmarks.bench_convert_scale --dtype {options.dtype}")
    table = "\n".join(["| measure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])
    print(header)
    print(table)
    verdict = "meets" if convert_s <= 60 and peak <= 2.5 * model_bytes else "MISSES"
    print(f"target (<= 60 s, <= 2.5x model size): {verdict}")
    if options.write:
        title = f"Conversion at scale: Llama-shaped 1B on CPU ({options.dtype})"
        body = f"{header}\n\n{table}\n\nTarget (issue 2): <= 60 s and <= 2.5x model size: **{verdict}**."
        write_section(Path("BENCHMARKS.md"), title, body)


if __name__ == "__main__":
    main()
