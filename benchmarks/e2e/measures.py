"""bench_e2e's measurements: `Bench` builds each pair, times every (measure, length, side) and keeps
the results (written to e2e.json and e2e.md after every measurement, so a killed run keeps them)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import switchhead
from benchmarks.common import START, log, short_error
from benchmarks.compile.probe import triton_analysis_probe
from benchmarks.e2e import models as em
from benchmarks.e2e.pairs import SIDES, Pair, convert_pair, expert_geometry, mac_figures
from benchmarks.e2e.report import markdown
from benchmarks.e2e.timing import Timer, free, memory_peak, memory_reset, new_cudagraph_step, profile_kernels


class Bench:
    """One run: its arguments, compiled modules by (pair, side, measure), and the results so far."""

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
        return self.args.budget_s > 0 and time.perf_counter() - START > self.args.budget_s

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
        """Fill `row` from `body()` (or with the error / skip reason), append it and save; a failed dynamic
        compile is retried static once."""
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
            step = new_cudagraph_step(step)
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
        """The dense LM (on the CPU until measured), its rewrite, and one attention layer of each."""
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
        try:
            sh_attn = convert_pair(attn, (torch.randn(2, 16, cfg.d),), pair, f"{name} attention layer", self.device)
            self.off_device(sh_attn)
            built["attn_switchhead"] = sh_attn
            built["geometry"] = expert_geometry(sh_attn, pair, cfg.d)
            built["attn_report"] = switchhead.report_of(sh_attn)
            info["geometry"] = dataclasses.asdict(built["geometry"])
        except Exception as err:  # noqa: BLE001  (the row records it; the run goes on)
            info["attn_convert_error"] = short_error(err)
            info["attn_convert_traceback"] = traceback.format_exc(limit=-6)
            log(f"FAIL  convert {name} attention layer: {info['attn_convert_error']}")
        try:
            example = torch.randint(0, cfg.vocab, (2, 16))  # short: conversion time grows with T
            sh = convert_pair(dense, (example,), pair, f"{name} LM", self.device)
            self.off_device(sh)
            built["switchhead"] = sh
            info["params_switchhead"] = em.parameters(sh)
            info["sites"] = len(switchhead.report_of(sh).sites)
            if info["sites"] != cfg.layers:
                notes.append(f"{name}: convert rewrote {info['sites']} of {cfg.layers} attention layers")
        except Exception as err:  # noqa: BLE001  (the row records it; the run goes on)
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


def meta(args: argparse.Namespace) -> dict[str, Any]:
    """When, with what and how the run was made (the tables' first line)."""
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "argv": " ".join(sys.argv[1:]), "tokens_per_step": args.tokens, "warmup": args.warmup,
            "iters": args.iters, "compile": args.compile, "compile_mode": args.compile_mode, "shapes": args.shapes,
            "bf16": args.bf16}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


# --------------------------------------------------------------------------- tables
