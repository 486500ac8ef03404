"""Where does each side of the 262M pair spend its training step? (issue 16's profile; H200, bf16)

The dense LM of benchmarks/e2e/models.py and its SwitchHead rewrite (H=4 E=4 k=2 dh=112, the paper's
C4 config), each compiled (default mode, batch and sequence dynamic) and profiled over a few training
steps (forward, cross-entropy, backward, fused AdamW) with `torch.profiler` at each length T, with the
same tokens per step. Printed per length: GPU time per step of each kernel category, SwitchHead
against dense (the baseline), then each side's top kernels and its matrix products by input shape
(which GEMM is the router's, which the experts'). The SwitchHead-only categories (routers, gating,
expert kernels) are what the rewrite adds beyond the heads it removed.

    python -m benchmarks.bench_profile --out OUT [--seq-lens 512 2048] [--tokens 16384]
    python -m benchmarks.bench_profile --from-json benchmarks/results/profile_h200_2026-12-04.json
    python -m benchmarks.bench_profile --device cpu --tiny --out /tmp/prof     # smoke test
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import importlib.metadata
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

import switchhead
from benchmarks.common import write_section
from benchmarks.e2e import models as em

MODELS = {
    "262M": (em.LMConfig("262M", d=1024, layers=18, heads=16, head_dim=64),
             dict(num_heads=4, num_experts=4, top_k=2, head_dim=112)),
    "tiny": (em.LMConfig("tiny", d=32, layers=1, heads=4, head_dim=8, vocab=128),
             dict(num_heads=2, num_experts=3, top_k=2, head_dim=12)),
}
# kernel name -> category; first match wins (Inductor names its kernels after the aten ops they fuse)
CATEGORIES = (
    ("attention core", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("expert kernels (ours)", re.compile(r"_fan_in|_fan_out|_wgrad|_route|_select|_sig_", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("GEMM (cuBLAS/CUTLASS)", re.compile(r"gemm|sm90_|xmma|cutlass|nvjet|cublas|splitK", re.I)),
    ("Inductor reduction", re.compile(r"^triton_(red|per)_")),
    ("Inductor pointwise", re.compile(r"^triton_poi_")),
    ("copy / fill / other", re.compile(r".")),
)
SECTION = "Training-step profile (262M pair, H200)"
ANNOTATION = re.compile(r"^## |#")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::linear")


def category(kernel: str) -> str:
    return next(name for name, pattern in CATEGORIES if pattern.search(kernel))


def device_us(event: Any) -> float:
    return float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0) or 0)


def profile_steps(step, steps: int, cuda: bool) -> dict[str, Any]:
    """Kernels (name -> us per step), categories (name -> us per step) and GEMMs by input shape."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    kernels: dict[str, float] = collections.Counter()
    if cuda:
        for e in prof.key_averages():
            # "## Call CompiledFxGraph ..." and "Optimizer.step#..." are annotations spanning kernels
            if (getattr(e, "device_type", None) == DeviceType.CUDA and device_us(e) > 0
                    and not ANNOTATION.search(e.key)):
                kernels[e.key] += device_us(e) / steps
    else:  # CPU smoke run: top-level ops stand in for kernels
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                kernels[e.key] += e.self_cpu_time_total / steps
    gemms = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in GEMM_OPS:
            total = (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)) if cuda else e.cpu_time_total
            gemms.append({"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count / steps,
                          "us": float(total) / steps})
    gemms.sort(key=lambda g: -g["us"])
    return {"kernels": dict(kernels), "categories": categories(kernels), "gemms": gemms[:25]}


def build(name: str, device: torch.device) -> dict[str, torch.nn.Module]:
    cfg, sh = MODELS[name]
    torch.manual_seed(0)
    dense = em.DecoderLM(cfg)
    t = time.perf_counter()
    converted = switchhead.convert(copy.deepcopy(dense).to(device), (torch.randint(0, cfg.vocab, (2, 16), device=device),),
                                   config=switchhead.SwitchHeadConfig(init="random", **sh))
    print(f"converted {name} in {time.perf_counter() - t:.1f} s", flush=True)
    return {"dense": dense.to(device), "switchhead": converted}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = MODELS[args.model][0]
    models = build(args.model, device)
    out: dict[str, Any] = {"model": args.model, "tokens": args.tokens, "rows": [], "meta": {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "triton": _version("triton"), "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.bench_profile " + " ".join(args.argv)}}
    for side, lm in models.items():
        wrapper = torch.compile(em.WithLoss(lm), disable=not cuda)
        params = [p for p in lm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
        for T in args.seq_lens:
            B = max(1, args.tokens // T)
            tokens = torch.randint(0, cfg.vocab, (B, T + 1), generator=torch.Generator().manual_seed(T)).to(device)
            x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            if cuda:
                for t in (x, y):
                    torch._dynamo.mark_dynamic(t, 0)
                    torch._dynamo.mark_dynamic(t, 1)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = wrapper(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            for _ in range(args.warmup):
                step()
            if cuda:
                torch.cuda.synchronize()
            print(f"{side} T={T}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
            row = {"side": side, "seq_len": T, "batch": B, **profile_steps(step, args.steps, cuda)}
            out["rows"].append(row)
        models[side] = None  # the next side's model, wrapper and optimizer state replace this one's
    return out


def categories(kernels: dict[str, float]) -> dict[str, float]:
    """us per step of each category, annotations (spans over other kernels) left out."""
    cats: dict[str, float] = collections.Counter()
    for name, us in kernels.items():
        if not ANNOTATION.search(name):
            cats[category(name)] += us
    return dict(cats)


def table(result: dict[str, Any], top: int = 12) -> str:
    lines = []
    for T in sorted({r["seq_len"] for r in result["rows"]}):
        rows = {r["side"]: {**r, "categories": categories(r["kernels"]),
                            "kernels": {k: v for k, v in r["kernels"].items() if not ANNOTATION.search(k)}}
                for r in result["rows"] if r["seq_len"] == T}
        dense, sh = rows.get("dense"), rows.get("switchhead")
        lines += [f"### {result['model']}, T={T}, {result['tokens']} tokens per step: GPU ms per training step", "",
                  "| category | dense | SwitchHead | SH - dense |", "|---|---|---|---|"]
        for name, _ in CATEGORIES:
            a = dense["categories"].get(name, 0.0) / 1e3 if dense else 0.0
            b = sh["categories"].get(name, 0.0) / 1e3 if sh else 0.0
            lines.append(f"| {name} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
        tot = [sum(r["categories"].values()) / 1e3 if r else 0.0 for r in (dense, sh)]
        lines += [f"| all kernels | {tot[0]:.3f} | {tot[1]:.3f} | {tot[1] - tot[0]:+.3f} ({tot[1] / max(tot[0], 1e-9):.2f}x) |", ""]
        for side, r in rows.items():
            lines += [f"{side} T={T}, top kernels (ms/step, category, name):", ""]
            for name, us in sorted(r["kernels"].items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"    {us / 1e3:8.3f}  {category(name)[:12]:12s}  {name[:110]}")
            lines += ["", f"{side} T={T}, matrix products by input shape (ms/step incl. children, calls/step):", ""]
            for g in r["gemms"][:top]:
                lines.append(f"    {g['us'] / 1e3:8.3f}  {g['calls']:5.1f}  {g['op']:12s} {g['shapes']}")
            lines.append("")
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def section(result: dict[str, Any], source: str, top: int = 8) -> str:
    """The BENCHMARKS.md section: the category table at every length, SwitchHead against dense, and
    the kernels and matrix products only the SwitchHead step runs (what the rewrite adds)."""
    meta = result.get("meta", {})
    lengths = sorted({r["seq_len"] for r in result["rows"]})
    by = {(r["side"], r["seq_len"]): {k: v for k, v in r["kernels"].items() if not ANNOTATION.search(k)}
          for r in result["rows"]}
    gemms = {(r["side"], r["seq_len"]): r["gemms"] for r in result["rows"]}
    layers = MODELS[result["model"]][0].layers
    lines = [
        "Issue 16's question: where does the SwitchHead training step spend the time that dense does not? "
        f"GPU kernel time per step (ms), torch.profiler over a few steps after warm-up, both sides compiled "
        f"(default mode, batch and length dynamic), bf16 autocast, {result['tokens']} tokens per step.",
        f"Device: {meta.get('device', 'not recorded')}; torch {meta.get('torch', '?')}, triton "
        f"{meta.get('triton', '?')}; {meta.get('date', '')}. Raw: `{source}`.", "",
        f"    {meta.get('command', 'python -m benchmarks.bench_profile --out OUT')}",
        f"    python -m benchmarks.bench_profile --from-json {source} --write BENCHMARKS.md", "",
        "| category | " + " | ".join(f"T={t} dense | T={t} SH | SH - dense" for t in lengths) + " |",
        "|---|" + "---|---|---|" * len(lengths)]
    cats = {key: categories(kernels) for key, kernels in by.items()}
    for name in [c for c, _ in CATEGORIES] + ["all kernels"]:
        cells = []
        for t in lengths:
            a, b = (sum(cats[(side, t)].values()) if name == "all kernels" else cats[(side, t)].get(name, 0.0)
                    for side in ("dense", "switchhead"))
            ratio = f" ({b / a:.2f}x)" if name == "all kernels" and a else ""
            cells.append(f"{a / 1e3:.3f} | {b / 1e3:.3f} | {(b - a) / 1e3:+.3f}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    t = lengths[0]
    # Inductor numbers its kernels per graph (gelu_view_6 here, gelu_view_18 there): compare without it;
    # the attention core is replaced, not added
    stem = {re.sub(r"_\d+$", "", k) for k in by[("dense", t)]}
    added = {k: v for k, v in by[("switchhead", t)].items()
             if re.sub(r"_\d+$", "", k) not in stem and category(k) != "attention core"}
    lines += ["", f"Kernels only the SwitchHead step runs at T={t} (ms per step, us per layer of {layers}; by "
              "their names and sizes: the fp32 router GEMMs, the expert weight gradients, the gate gradients' "
              "reductions):", ""]
    lines += [f"    {us / 1e3:7.3f} ms {us / layers:7.1f} us  {name[:100]}"
              for name, us in sorted(added.items(), key=lambda kv: -kv[1])[:top]]
    dense_shapes = {g["shapes"] for g in gemms[("dense", t)]}
    lines += ["", f"Matrix products only the SwitchHead step runs at T={t} (ms per step, calls per step, input shapes):",
              ""]
    lines += [f"    {g['us'] / 1e3:7.3f} ms {g['calls']:5.0f}  {g['op']} {g['shapes']}"
              for g in gemms[("switchhead", t)] if g["shapes"] not in dense_shapes][:top]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("profile_out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 512 2048")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per step (default 16384)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--from-json", type=Path, help="no run: the tables of an earlier profile.json")
    ap.add_argument("--write", type=Path, help=f"replace the '## {SECTION}' section of this markdown file")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        print(table(result))
        if args.write:
            write_section(args.write, SECTION, section(result, str(args.from_json)))
        return result
    args.model = "tiny" if args.tiny else "262M"
    args.seq_lens = args.seq_lens or ([16, 8] if args.tiny else [512, 2048])
    args.tokens = args.tokens or (32 if args.tiny else 16384)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (args.out / "profile.md").write_text(text + "\n")
    if args.write:
        write_section(args.write, SECTION, section(result, str(args.out / "profile.json")))
    print(text)
    return result


if __name__ == "__main__":
    main()
