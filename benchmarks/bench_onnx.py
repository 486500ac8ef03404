"""Is a SwitchHead rewrite exported to ONNX as fast in stock onnxruntime (CPU) as the dense original?

For a small Llama (GQA) and a small ViT, at two sequence lengths, batch 1, float32, onnxruntime CPU
with default graph optimisations, in one run:
  dense      the original model exported with export_onnx (no custom ops);
  upcycled   convert(init="upcycle"): same heads, E=4 experts, k=2;
  folded     convert(init="fold", num_heads=...): fewer heads, experts folded from the dense heads
             (skipped where this build has no head folding);
each SwitchHead form twice: `ai.switchhead` nodes + model-local functions ("custom") and the same
bodies inlined ("inline"). All forms of one model are timed round-robin (load from other processes
hits them alike); each form's latency is its best per-round median.

    PYTHONPATH=. python benchmarks/bench_onnx.py [--quick] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime as ort
import torch

import switchhead
from switchhead.config import INIT_METHODS
from switchhead.exporters.onnx import export_onnx


@dataclass(frozen=True)
class Experiment:
    model: str
    tokens: int
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    fold_heads: int  # heads after folding


@dataclass(frozen=True)
class Result:
    model: str
    tokens: int
    form: str
    heads: str
    ms: float
    vs_dense: float


def _llama(layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _vit(image: int, layers: int = 4) -> torch.nn.Module:
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=image, depth=layers, num_heads=6,
                             embed_dim=192, num_classes=100).eval()


def experiments(quick: bool) -> list[Experiment]:
    out = []
    for seq in ((64, 256) if quick else (128, 512)):
        out.append(Experiment("llama d256 L4 H8/KV2", seq, _llama,
                              lambda s=seq: ((), {"input_ids": torch.randint(0, 2000, (1, s))}), fold_heads=2))
    for image in ((128, 224) if quick else (224, 384)):  # patch 16: (image/16)^2 + 1 tokens
        out.append(Experiment("timm ViT d192 L4 H6", (image // 16) ** 2 + 1, lambda i=image: _vit(i),
                              lambda i=image: ((torch.randn(1, 3, i, i),), {}), fold_heads=2))
    return out


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_ms(sessions: list[ort.InferenceSession], feed: dict, rounds: int, runs: int) -> list[float]:
    """Round-robin over the sessions so that load from other processes hits every form alike; per
    session the best (lowest) of the per-round medians."""
    for session in sessions:
        for _ in range(3):
            session.run(None, feed)
    best = [float("inf")] * len(sessions)
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - t0) * 1e3)
            best[i] = min(best[i], statistics.median(times))
    return best


def _feed(args: tuple, kwargs: dict, session: ort.InferenceSession) -> dict:
    values = [*args, *kwargs.values()]
    return {i.name: v.numpy() for i, v in zip(session.get_inputs(), values)}


def run(exps: list[Experiment], rounds: int, runs: int, threads: int, workdir: Path) -> list[Result]:
    results = []
    for exp in exps:
        model = exp.build()
        args, kwargs = exp.inputs()
        configs = [("upcycled", switchhead.SwitchHeadConfig(num_experts=4, top_k=2, init="upcycle"))]
        if "fold" in INIT_METHODS:
            configs.append(("folded", switchhead.SwitchHeadConfig(init="fold", num_heads=exp.fold_heads, top_k=2)))
        rows = [("dense", _heads(model), model, False)]
        for form, config in configs:
            module = switchhead.convert(model, args, kwargs, config=config)
            heads = _rewritten_heads(module)
            rows += [(f"{form} custom", heads, module, False), (f"{form} inline", heads, module, True)]
        sessions = []
        for label, _, module, inline in rows:
            path = workdir / f"{exp.model.split()[0]}-{exp.tokens}-{label.replace(' ', '_')}.onnx"
            export_onnx(module, path, args, kwargs, inline=inline)
            sessions.append(_session(path, threads))
        times = interleaved_ms(sessions, _feed(args, kwargs, sessions[0]), rounds, runs)
        for (label, heads, _, _), ms in zip(rows, times):
            results.append(Result(exp.model, exp.tokens, label, heads, ms, ms / times[0]))
            print(f"{exp.model} T={exp.tokens} {label}: {ms:.2f} ms", flush=True)
    return results


def _heads(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is not None:
        return f"H{config.num_attention_heads}"
    return f"H{model.blocks[0].attn.num_heads}"


def _rewritten_heads(module) -> str:
    """H/E/k of the first rewritten site, from its O expert weights [H, E, dh, d_out] and the config."""
    weight = next(p for name, p in module.named_parameters() if name.endswith("o_experts"))
    return f"H{weight.shape[0]} E{weight.shape[1]} k{switchhead.report_of(module).config['top_k']}"


def table(results: list[Result]) -> str:
    lines = ["| model | tokens | form | heads | latency (ms) | vs dense |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.model} | {r.tokens} | {r.form} | {r.heads} | {r.ms:.2f} | {r.vs_dense:.2f}x |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = "## ONNX Runtime\n\n" + body.strip() + "\n"
    if re.search(r"^## ONNX Runtime\n", text, flags=re.M):
        text = re.sub(r"^## ONNX Runtime\n.*?(?=^## |\Z)", section + "\n", text, flags=re.M | re.S)
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter sequences and timing budget (a smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds over the forms")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per form and round")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime intra-op threads")
    ap.add_argument("--write", type=Path, help="write the table into this markdown file's '## ONNX Runtime' section")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(experiments(args.quick), rounds, args.runs, args.threads, Path(tmp))
    versions = (f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}, "
                f"python {platform.python_version()}")
    body = "\n".join([
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, onnxruntime CPUExecutionProvider "
        f"({args.threads} intra-op threads, default graph optimisations); {versions}; batch 1, float32; "
        f"latency = best of {rounds} round-robin rounds of the median of {args.runs} runs; command: "
        f"`PYTHONPATH=. python benchmarks/bench_onnx.py{' --quick' if args.quick else ''}"
        f"{' --write ' + str(args.write) if args.write else ''}`",
        "", table(results),
    ])
    if args.write:
        write_section(args.write, body)
    print(body)


if __name__ == "__main__":
    main()
