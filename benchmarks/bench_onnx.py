"""Is a SwitchHead rewrite exported to ONNX as fast in stock onnxruntime (CPU) as the dense original?

For a small Llama (GQA) and a small ViT (Hugging Face transformers, no timm), at two sequence lengths,
batch 1, float32, onnxruntime CPU with default graph optimisations, in one run:
  dense            the original model exported with export_onnx (no custom ops);
  folded custom    convert(init="fold", num_heads=2): fewer heads, V/O experts folded from the dense
                   heads; `ai.switchhead` nodes + model-local functions (what export_onnx writes);
  folded inline    the same model with the function bodies written in place (inline=True);
  folded v0 bodies the custom form with the first (commit c2d796a) function bodies swapped in, to
                   show what the current bodies gain;
  folded onehot gates  the custom form with gate tables built by OneHot + batched MatMul (4 nodes
                   fewer per layer than ScatterElements, slower on 1-2 threads here): a candidate
                   for many threads, where per-node overhead weighs more;
  upcycled ...     (--upcycled) convert(init="upcycle"): same heads, E=4, k=2.
Llama is exported once (dynamic sequence) and timed at both lengths; ViT once per image size.

Two measurements per form, each interleaved round-robin over the forms (so load from other processes
hits all forms alike):
  latency  wall-clock, `--threads` intra-op threads (default: all cores); best of the per-round medians;
  cpu 1t   CPU time of one run with 1 intra-op thread (thread CPU time: robust to other load); median of
           the per-round medians.

    python -m benchmarks.bench_onnx --out onnx.md            # the table into onnx.md, and printed
    python -m benchmarks.bench_onnx --quick                   # smoke run: short sequences, few rounds
    python -m benchmarks.bench_onnx --write BENCHMARKS.md     # replace its "## ONNX Runtime" section
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import switchhead

import onnx
import onnxruntime as ort
import torch
from onnx import helper

from switchhead.config import INIT_METHODS
from switchhead.exporters import onnx_ops
from switchhead.exporters.onnx import export_onnx
from benchmarks.common import write_section

FOLD_HEADS = 2


@dataclass(frozen=True)
class Experiment:
    model: str
    tokens: tuple[int, ...]  # timed at each; one export serves them all (dynamic sequence)
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], tuple[tuple, dict]]  # tokens -> (args, kwargs)


@dataclass(frozen=True)
class Result:
    model: str
    tokens: int
    form: str
    heads: str
    ms: float
    vs_dense: float
    cpu_ms: float
    cpu_vs_dense: float


def _llama(layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _vit(image: int, layers: int = 4) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(hidden_size=192, num_hidden_layers=layers, num_attention_heads=6, intermediate_size=768,
                       image_size=image, patch_size=16, num_labels=100)
    torch.manual_seed(0)
    return ViTForImageClassification(config).eval()


def _tokens_of(image: int) -> int:
    return (image // 16) ** 2 + 1  # patches + [CLS]


def experiments(quick: bool) -> list[Experiment]:
    out = [Experiment("llama d256 L4 H8/KV2", (64, 256) if quick else (128, 512), _llama,
                      lambda t: ((), {"input_ids": torch.randint(0, 2000, (1, t))}))]
    for image in ((128, 224) if quick else (224, 384)):
        out.append(Experiment("HF ViT d192 L4 H6", (_tokens_of(image),), lambda i=image: _vit(i),
                              lambda _t, i=image: ((), {"pixel_values": torch.randn(1, 3, i, i)})))
    return out


# ------------------------------------------------------------------ the first function bodies, for comparison


def _v0_expert_v(with_bias: bool) -> onnx_ops.Body:
    """ExpertV's body at commit c2d796a: the gated experts summed with Mul + ReduceSum over the experts
    axis (now one batched MatMul). Same signature and semantics."""
    b = onnx_ops.Body("v0")
    values = onnx_ops.expert_values(b, with_bias)  # [N, H, E, dh], as in the current body
    g = onnx_ops.dense_gates(b, "x", "weight", "expert_index", "gates")  # [N, H, E]
    mixed = b("ReduceSum", b("Mul", values, b("Unsqueeze", g, b.ints(-1))), b.ints(2), keepdims=0)
    b("Flatten", mixed, axis=1, out="out")
    return b


def _onehot_gates(b: onnx_ops.Body, like: str, gates_axis: int, onehot_axis: int) -> str:
    """The gate table with fewer nodes than ScatterElements: OneHot(expert_index, E) [N, H, k, E]
    (onehot_axis=-1) or [N, H, E, k] (-2), times the gates in a batched MatMul."""
    depth = b("Shape", "weight", start=1, end=2)
    onehot = b("OneHot", "expert_index", depth, b("CastLike", b("Constant", value_floats=[0.0, 1.0]), like), axis=onehot_axis)
    gates = b("Unsqueeze", b("CastLike", "gates", like), b.ints(gates_axis))
    return b("MatMul", gates, onehot) if onehot_axis == -1 else b("MatMul", onehot, gates)


def _onehot_expert_v(with_bias: bool) -> onnx_ops.Body:
    b = onnx_ops.Body("v1")
    values = onnx_ops.expert_values(b, with_bias)  # [N, H, E, dh], as in the current body
    g = _onehot_gates(b, "x", 2, -1)  # [N, H, 1, k] @ [N, H, k, E] -> [N, H, 1, E]
    b("Flatten", b("MatMul", g, values), axis=1, out="out")
    return b


def _onehot_expert_o() -> onnx_ops.Body:
    b = onnx_ops.Body("o1")
    g = _onehot_gates(b, "attn", -1, -2)  # [N, H, E, k] @ [N, H, k, 1] -> [N, H, E, 1]
    gated = b("Mul", b("Unsqueeze", "attn", b.ints(2)), g)  # [N, H, E, dh]
    b("MatMul", b("Flatten", gated, axis=1), b("Flatten", "weight", axis=3), out="out")
    return b


def _v0_function(function: onnx.FunctionProto, opsets: list) -> onnx.FunctionProto:
    if function.name not in (onnx_ops.EXPERT_V, onnx_ops.EXPERT_V_BIAS):
        return function  # ExpertO's body is unchanged
    body = _v0_expert_v(function.name == onnx_ops.EXPERT_V_BIAS)
    return helper.make_function(function.domain, function.name, list(function.input), ["out"], body.nodes, opsets)


def _onehot_function(function: onnx.FunctionProto, opsets: list) -> onnx.FunctionProto:
    body = _onehot_expert_o() if function.name == onnx_ops.EXPERT_O else _onehot_expert_v(function.name == onnx_ops.EXPERT_V_BIAS)
    return helper.make_function(function.domain, function.name, list(function.input), ["out"], body.nodes, opsets)


def _with_bodies(src: Path, dst: Path, swap: Callable) -> None:
    """A copy of the custom-op file `src` with other function bodies (same signature and semantics)."""
    model = onnx.load(str(src))
    for function in model.functions:
        function.CopyFrom(swap(function, list(model.opset_import)))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))


# ------------------------------------------------------------------ timing


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if threads == 1:
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_ms(sessions: list[ort.InferenceSession], feed: dict, rounds: int, runs: int, *,
                   cpu: bool = False) -> list[float]:
    """Round-robin over the sessions so that load from other processes hits every form alike. Wall clock:
    per session the best (lowest) of the per-round medians. cpu=True: this thread's CPU time (1-thread
    sessions run on the calling thread), median of the per-round medians."""
    clock = time.thread_time if cpu else time.perf_counter
    for session in sessions:
        for _ in range(3):
            session.run(None, feed)
    per_round: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            for _ in range(2):  # untimed: lets the previous session's spinning pool threads go idle
                session.run(None, feed)
            times = []
            for _ in range(runs):
                t0 = clock()
                session.run(None, feed)
                times.append((clock() - t0) * 1e3)
            per_round[i].append(statistics.median(times))
    return [statistics.median(r) if cpu else min(r) for r in per_round]


def _feed(args: tuple, kwargs: dict, session: ort.InferenceSession) -> dict:
    values = [*args, *kwargs.values()]
    return {i.name: v.numpy() for i, v in zip(session.get_inputs(), values)}


def run(exps: list[Experiment], rounds: int, runs: int, threads: int, upcycled: bool, workdir: Path) -> list[Result]:
    results = []
    for exp in exps:
        model = exp.build()
        args, kwargs = exp.inputs(exp.tokens[0])
        configs = []
        if "fold" in INIT_METHODS:
            configs.append(("folded", switchhead.SwitchHeadConfig(init="fold", num_heads=FOLD_HEADS, top_k=2)))
        if upcycled:
            configs.append(("upcycled", switchhead.SwitchHeadConfig(num_experts=4, top_k=2, init="upcycle")))
        stem = f"{exp.model.split()[0]}-{exp.tokens[0]}"
        forms = [("dense", _heads(model), workdir / f"{stem}-dense.onnx")]
        export_onnx(model, forms[0][2], args, kwargs)
        for name, config in configs:
            module = switchhead.convert(model, args, kwargs, config=config)
            heads = _rewritten_heads(module)
            custom, inline = workdir / f"{stem}-{name}.onnx", workdir / f"{stem}-{name}-inline.onnx"
            export_onnx(module, custom, args, kwargs)
            export_onnx(module, inline, args, kwargs, inline=True)
            forms += [(f"{name} custom", heads, custom), (f"{name} inline", heads, inline)]
            if name == "folded":  # the same file with other function bodies
                for label, swap in (("v0 bodies", _v0_function), ("onehot gates", _onehot_function)):
                    path = workdir / f"{stem}-{name}-{label.replace(' ', '_')}.onnx"
                    _with_bodies(custom, path, swap)
                    forms.append((f"{name} {label}", heads, path))
        wall = [_session(path, threads) for _, _, path in forms]
        single = [_session(path, 1) for _, _, path in forms]
        for tokens in exp.tokens:
            feed = _feed(*exp.inputs(tokens), wall[0])
            _check_same_outputs(forms, single, feed)
            times = interleaved_ms(wall, feed, rounds, runs)
            cpu = interleaved_ms(single, feed, max(3, rounds // 2), max(3, runs // 2), cpu=True)
            for (label, heads, _), ms, cpu_ms in zip(forms, times, cpu):
                results.append(Result(exp.model, tokens, label, heads, ms, ms / times[0], cpu_ms, cpu_ms / cpu[0]))
                print(f"{exp.model} T={tokens} {label}: {ms:.2f} ms ({ms / times[0]:.2f}x), "
                      f"cpu 1t {cpu_ms:.2f} ms ({cpu_ms / cpu[0]:.2f}x)", flush=True)
    return results


def _check_same_outputs(forms: list, sessions: list[ort.InferenceSession], feed: dict) -> None:
    """Every form of one rewrite (inline, other bodies) computes what its custom form computes."""
    outputs = {label: session.run(None, feed)[0] for (label, _, _), session in zip(forms, sessions)}
    for label, got in outputs.items():
        reference = outputs.get(label.split()[0] + " custom")
        if reference is not None:
            error = float(abs(got - reference).max() / abs(reference).max())
            assert error < 1e-4, f"{label} differs from the custom form by {error:.3g}"


def _heads(model: torch.nn.Module) -> str:
    config = model.config
    kv = getattr(config, "num_key_value_heads", None)
    return f"H{config.num_attention_heads}" + (f"/KV{kv}" if kv and kv != config.num_attention_heads else "")


def _rewritten_heads(module) -> str:
    """H/E/k of the first rewritten site, from its O expert weights [H, E, dh, d_out] and the config."""
    weight = next(p for name, p in module.named_parameters() if name.endswith("o_experts"))
    return f"H{weight.shape[0]} E{weight.shape[1]} k{switchhead.report_of(module).config['top_k']}"


def table(results: list[Result]) -> str:
    lines = ["| model | tokens | form | heads | latency (ms) | vs dense | cpu 1t (ms) | vs dense |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.model} | {r.tokens} | {r.form} | {r.heads} | {r.ms:.2f} | {r.vs_dense:.2f}x "
                     f"| {r.cpu_ms:.2f} | {r.cpu_vs_dense:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter sequences and timing budget (a smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds over the forms")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per form and round")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime intra-op threads")
    ap.add_argument("--upcycled", action="store_true", help="also time the upcycled rewrite (same heads, E=4, k=2)")
    ap.add_argument("--out", type=Path, help="write the table (with its header line) to this file")
    ap.add_argument("--write", type=Path, help="write the table into this markdown file's '## ONNX Runtime' section")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(experiments(args.quick), rounds, args.runs, args.threads, args.upcycled, Path(tmp))
    versions = (f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}, "
                f"python {platform.python_version()}")
    load = f"load average before/after: {_load_before}/{_load()}" if _load_before else ""
    command = " ".join(["python -m benchmarks.bench_onnx", *sys.argv[1:]])
    body = "\n".join([
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, onnxruntime CPUExecutionProvider "
        f"({args.threads} intra-op threads, default graph optimisations); {versions}; batch 1, float32; "
        f"latency = best of {rounds} round-robin rounds of the median of {args.runs} runs; cpu 1t = CPU time "
        f"of one run with 1 thread, median over rounds; {load}; {time.perf_counter() - started:.0f} s; "
        f"command: `{command}`",
        "", table(results),
    ])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(body + "\n")
    if args.write:
        write_section(args.write, "ONNX Runtime", body)
    print(body)


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return ""


_load_before = _load()

if __name__ == "__main__":
    main()
