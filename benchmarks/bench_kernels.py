"""How fast are the SwitchHead expert kernels against cuBLAS and the usual MoE baselines? (H200, bf16)

For the paper's shapes and T = 8k..64k tokens, times in one run, each through a CUDA graph replay
(triton.testing.do_bench_cudagraph, median; launch overhead out, L2 not flushed, same for every row):
  ours     torch.ops.switchhead.expert_v / expert_o (Triton routing + Triton kernels), and their
           forward+backward (autograd through both ops: dx, dW, d gates for V and O);
  cublas   a FLOP-matched dense GEMM: V [T, d] @ [d, H*k*dh], O [T, H*k*dh] @ [H*k*dh, d],
           fwd+bwd the two as nn.Linear-style forward + backward (dX, dW);
  dense    all E experts through cuBLAS, gate table multiply and sum in torch;
  grouped  gather rows per (head, expert) + torch._grouped_mm + gate + scatter/sum (index_add).
Useful FLOPs: 2*T*H*k*d*dh per projection forward, 3x that for forward+backward.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--tokens 8192 16384 ...] [--shapes 262M ...]
        [--write BENCHMARKS.md] [--sweep] [--breakdown [--breakdown-tokens 16384]]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

import switchhead.kernels  # noqa: F401  (registers the ops)
from switchhead.kernels import route_triton, routing
from switchhead.kernels.fan_in import fan_in
from switchhead.kernels.fan_out import TileConfig, fan_out
from switchhead.kernels.wgrad import expert_wgrad
sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_section import write_section  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    h: int
    e: int
    k: int
    dh: int


SHAPES = [
    Shape("262M", 1024, 4, 4, 2, 112),
    Shape("262M-Wt103", 1024, 2, 8, 4, 132),
    Shape("47M", 412, 2, 5, 3, 76),
]
TARGETS = {"V fwd": 0.75, "O fwd": 0.60, "fwd+bwd": 0.50}


@dataclass(frozen=True)
class Row:
    shape: str
    tokens: int
    op: str
    ours_ms: float
    tflops: float
    cublas_ms: float
    dense_ms: float
    grouped_ms: float | None

    @property
    def of_cublas(self) -> float:
        return self.cublas_ms / self.ours_ms


NOTES: list[str] = []
REP_MS = 60  # do_bench(_cudagraph) measuring time per timing (--rep)


def bench(fn: Callable[[], object], label: str = "") -> float:
    """Median ms of CUDA-graph replays of fn; plain launches (noted) where fn cannot be captured."""
    fn()
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(fn, rep=REP_MS, return_mode="median")
    except RuntimeError as err:
        NOTES.append(f"{label}: not capturable in a CUDA graph ({str(err).splitlines()[0][:100]}), timed eagerly")
        torch.cuda.synchronize()
        return do_bench(fn, rep=REP_MS, return_mode="median")


def problem(s: Shape, t: int, dtype=torch.bfloat16):
    dev = "cuda"
    scores_v = torch.randn(t, s.h, s.e, device=dev)
    scores_o = torch.randn(t, s.h, s.e, device=dev)
    gv, iv = scores_v.topk(s.k, dim=-1)
    go, io = scores_o.topk(s.k, dim=-1)
    return dict(
        x=torch.randn(t, s.d, device=dev, dtype=dtype),
        w_v=torch.randn(s.h, s.e, s.d, s.dh, device=dev, dtype=dtype) * s.d ** -0.5,
        attn=torch.randn(t, s.h, s.dh, device=dev, dtype=dtype),
        w_o=torch.randn(s.h, s.e, s.dh, s.d, device=dev, dtype=dtype) * (s.h * s.dh) ** -0.5,
        idx_v=iv, g_v=gv.sigmoid(), idx_o=io, g_o=go.sigmoid(),
        gy=torch.randn(t, s.d, device=dev, dtype=dtype),
    )


def ours(p, s: Shape):
    t = p["x"].shape[0]
    v = lambda: torch.ops.switchhead.expert_v(p["x"], p["w_v"], None, p["idx_v"], p["g_v"])  # noqa: E731
    o = lambda: torch.ops.switchhead.expert_o(p["attn"], p["w_o"], p["idx_o"], p["g_o"])  # noqa: E731
    leaves = [p["x"].requires_grad_(), p["w_v"].requires_grad_(), p["w_o"].requires_grad_(),
              p["g_v"].requires_grad_(), p["g_o"].requires_grad_()]

    def fwd_bwd():
        y = torch.ops.switchhead.expert_v(p["x"], p["w_v"], None, p["idx_v"], p["g_v"])
        out = torch.ops.switchhead.expert_o(y.view(t, s.h, s.dh), p["w_o"], p["idx_o"], p["g_o"])
        return torch.autograd.grad(out, leaves, p["gy"])

    return v, o, fwd_bwd


def cublas(p, s: Shape):
    t, width = p["x"].shape[0], s.h * s.k * s.dh
    w1 = torch.randn(s.d, width, device="cuda", dtype=p["x"].dtype, requires_grad=True)
    w2 = torch.randn(width, s.d, device="cuda", dtype=p["x"].dtype, requires_grad=True)
    z = torch.randn(t, width, device="cuda", dtype=p["x"].dtype)
    x = p["x"].detach().requires_grad_()

    def fwd_bwd():
        return torch.autograd.grad((x @ w1) @ w2, [x, w1, w2], p["gy"])

    return (lambda: x @ w1), (lambda: z @ w2), fwd_bwd


def dense(p, s: Shape):
    t = p["x"].shape[0]
    dtype = p["x"].dtype
    w_v = p["w_v"].detach().permute(2, 0, 1, 3).reshape(s.d, -1).contiguous().requires_grad_()
    w_o = p["w_o"].detach().reshape(-1, s.d).requires_grad_()
    x, attn = p["x"].detach().requires_grad_(), p["attn"].detach()
    g_v = routing.gate_table(p["idx_v"], p["g_v"].detach(), s.e).to(dtype).requires_grad_()
    g_o = routing.gate_table(p["idx_o"], p["g_o"].detach(), s.e).to(dtype).requires_grad_()

    def v(x=x):
        return ((x @ w_v).view(t, s.h, s.e, s.dh) * g_v.unsqueeze(-1)).sum(2).view(t, -1)

    def o(a=attn):
        return (a.unsqueeze(2) * g_o.unsqueeze(-1)).reshape(t, -1) @ w_o

    def fwd_bwd():
        return torch.autograd.grad(o(v().view(t, s.h, s.dh)), [x, w_v, w_o, g_v, g_o], p["gy"])

    return v, o, fwd_bwd


def _pad8(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Zero-pad the given dims to multiples of 8 elements (_grouped_mm wants 16-byte strides)."""
    pad = [0] * (2 * t.dim())
    for dim in dims:
        pad[2 * (t.dim() - 1 - dim) + 1] = -t.shape[dim] % 8
    return torch.nn.functional.pad(t, pad)


def grouped(p, s: Shape):
    """gather + torch._grouped_mm (bf16, sm90) + gate + scatter-sum. d and dh are zero-padded to
    multiples of 8 outside the timed region (this favours the baseline)."""
    t = p["x"].shape[0]
    w_v = _pad8(p["w_v"].detach(), 2, 3).view(s.h * s.e, -1, _pad8(p["w_v"][0, 0], 0, 1).shape[1])
    w_o = _pad8(p["w_o"].detach(), 2, 3).view(s.h * s.e, w_v.shape[2], w_v.shape[1])
    w_v, w_o = w_v.contiguous().requires_grad_(), w_o.contiguous().requires_grad_()
    x, attn = _pad8(p["x"].detach(), 1).requires_grad_(), _pad8(p["attn"].detach(), 2)
    dh_p = w_v.shape[2]
    g_v, g_o = p["g_v"].detach().requires_grad_(), p["g_o"].detach().requires_grad_()

    def groups(idx, g):
        heads = torch.arange(s.h, device="cuda").view(1, s.h, 1)
        key = (heads * s.e + idx).flatten()
        order = torch.sort(key).indices
        counts = torch.zeros(s.h * s.e, dtype=torch.int32, device="cuda").scatter_add_(
            0, key, torch.ones_like(key, dtype=torch.int32))
        return order, torch.cumsum(counts, 0, dtype=torch.int32), g.flatten()[order]

    def v(x=x):
        order, offs, gate = groups(p["idx_v"], g_v)
        y = torch._grouped_mm(x[order // (s.h * s.k)], w_v, offs=offs) * gate.unsqueeze(1).to(x.dtype)
        slot = order % (s.h * s.k) // s.k  # head of each assignment
        out = torch.zeros(t * s.h, dh_p, device="cuda", dtype=x.dtype)
        return out.index_add(0, order // (s.h * s.k) * s.h + slot, y).view(t, s.h, dh_p)

    def o(a=attn):
        order, offs, gate = groups(p["idx_o"], g_o)
        rows = a.reshape(t * s.h, dh_p)[order // s.k]
        y = torch._grouped_mm(rows * gate.unsqueeze(1).to(a.dtype), w_o, offs=offs)
        return torch.zeros(t, y.shape[1], device="cuda", dtype=a.dtype).index_add(0, order // (s.h * s.k), y)

    def fwd_bwd():
        out = o(v())[:, : s.d]
        return torch.autograd.grad(out, [x, w_v, w_o, g_v, g_o], p["gy"])

    return v, o, fwd_bwd


def run(shapes: list[Shape], tokens: list[int]) -> tuple[list[Row], list[str]]:
    rows, notes = [], []
    for s in shapes:
        for t in tokens:
            p = problem(s, t)
            flops = 2 * t * s.h * s.k * s.d * s.dh
            cands = {name: make(p, s) for name, make in (("ours", ours), ("cublas", cublas), ("dense", dense))}
            try:
                cands["grouped"] = grouped(p, s)
                for f in cands["grouped"]:
                    f()
            except RuntimeError as err:
                cands.pop("grouped", None)
                notes.append(f"{s.name} T={t}: grouped_mm baseline failed: {str(err).splitlines()[0][:120]}")
            want_v, want_o = (f().detach().float() for f in cands["ours"][:2])
            for name in ("dense", "grouped"):
                if name in cands:
                    got_v = cands[name][0]().detach().float().reshape(t, s.h, -1)[..., : s.dh].reshape(t, -1)
                    got_o = cands[name][1]().detach().float()[:, : s.d]
                    err = max(((got_v - want_v).norm() / want_v.norm()).item(),
                              ((got_o - want_o).norm() / want_o.norm()).item())
                    if not err < 2e-2:
                        notes.append(f"{s.name} T={t}: {name} baseline disagrees with ours (rel err {err:.1e})")
            for i, (op, useful) in enumerate((("V fwd", flops), ("O fwd", flops), ("fwd+bwd", 6 * flops))):
                ms = {name: bench(fns[i], f"{s.name} T={t} {op} {name}") for name, fns in cands.items()}
                rows.append(Row(s.name, t, op, ms["ours"], useful / ms["ours"] * 1e-9, ms["cublas"],
                                ms["dense"], ms.get("grouped")))
            del p, cands
            torch.cuda.empty_cache()
    return rows, notes


def sweep(shapes: list[Shape], t: int) -> list[str]:
    """Kernel-only times (routing precomputed) of a few tile configs: which defaults to keep."""
    lines = []
    cfgs = [TileConfig(bm, bn, bk, w, st) for bm, bn, bk, w, st in (
        (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 32, 4, 4),
        (128, 64, 64, 4, 3), (64, 256, 32, 8, 3), (128, 256, 32, 8, 3), (64, 64, 32, 4, 4))]
    for s in shapes:
        p = problem(s, t)
        r = route_triton.route(p["idx_v"], p["g_v"], s.e, head=True, sig=True)
        table, bits, ho, so = r.table, r.bits, r.head_order, r.sig_order
        flops = 2 * t * s.h * s.k * s.d * s.dh
        for name, call in (
            ("fan_out V", lambda c: fan_out(p["x"], p["w_v"], None, table, bits, ho, config=c)),
            ("fan_in O", lambda c: fan_in(p["attn"], p["w_o"], table, bits, so, config=c)),
        ):
            res = []
            for c in cfgs:
                try:
                    res.append((bench(lambda: call(c)), c))
                except Exception as err:  # a config the compiler rejects (e.g. out of shared memory)
                    lines.append(f"  {s.name} {name} {c}: {type(err).__name__}")
            res.sort(key=lambda r: r[0])
            for ms, c in res[:3]:
                lines.append(f"sweep {s.name} T={t} {name}: {ms * 1e3:7.1f} us {flops / ms * 1e-9:6.0f} TFLOP/s "
                             f"bm={c.block_m} bn={c.block_n} bk={c.block_k} w={c.num_warps} st={c.num_stages}")
    return lines


ROUTE_VARIANTS = {  # what each op's routing computes (triton_ops.py)
    "V fwd": dict(head=True),
    "O fwd": dict(sig=True),
    "V bwd": dict(sig=True, groups=True),
    "O bwd": dict(head=True, groups=True),
}


def breakdown(shapes: list[Shape], t: int) -> list[str]:
    """Where forward+backward time goes: routing (old torch ops vs the Triton counting sort, per op) and
    each kernel alone (routing precomputed), and forward+backward with either routing."""
    lines = []
    for s in shapes:
        p = problem(s, t)
        idx, g = p["idx_v"], p["g_v"]
        old = route_triton.route_torch(idx, g, s.e, sig=True, head=True, groups=True)
        new = route_triton.route(idx, g, s.e, sig=True, head=True, groups=True)
        table, bits, ho = new.table, new.bits, new.head_order
        gy_v = torch.randn(t, s.h, s.dh, device="cuda", dtype=p["x"].dtype)
        x_heads = p["x"].unsqueeze(1).expand(t, s.h, s.d)
        gy_heads = p["gy"].unsqueeze(1).expand(t, s.h, s.d)
        flops = 2 * t * s.h * s.k * s.d * s.dh
        parts = {
            "torch gate_table+bits": (lambda: (routing.gate_table(idx, g, s.e), routing.expert_bits(idx)), 0),
            "torch head_order": (lambda: routing.head_order(bits, s.e), 0),
            "torch signature_order": (lambda: routing.signature_order(bits, s.e), 0),
            "torch expert_groups": (lambda: routing.expert_groups(idx, g, s.e), 0),
        }
        for op, kw in ROUTE_VARIANTS.items():
            parts[f"route {op}: torch"] = (lambda kw=kw: route_triton.route_torch(idx, g, s.e, **kw), 0)
            parts[f"route {op}: triton"] = (lambda kw=kw: route_triton.route(idx, g, s.e, **kw), 0)
        parts |= {
            "fan_out V fwd": (lambda: fan_out(p["x"], p["w_v"], None, table, bits, ho), flops),
            "fan_in O fwd (old sig)": (lambda: fan_in(p["attn"], p["w_o"], table, bits, old.sig_order), flops),
            "fan_in O fwd (new sig)": (lambda: fan_in(p["attn"], p["w_o"], table, bits, new.sig_order), flops),
            "fan_in V dX+dG": (lambda: fan_in(gy_v, p["w_v"].transpose(2, 3), table, bits, new.sig_order, p["x"]),
                               flops),
            "fan_out O dA+dG": (lambda: fan_out(p["gy"], p["w_o"].transpose(2, 3), None, table, bits, ho,
                                                p["attn"]), flops),
            "wgrad V dW": (lambda: expert_wgrad(x_heads, gy_v, *new.groups, s.e, False, torch.bfloat16), flops),
            "wgrad O dW": (lambda: expert_wgrad(p["attn"], gy_heads, *new.groups, s.e, False, torch.bfloat16),
                           flops),
        }
        fwd_bwd = ours(p, s)[2]
        for name, (fn, f) in parts.items():
            ms = bench(fn, f"breakdown {s.name} {name}")
            rate = f" {f / ms * 1e-9:5.0f} TFLOP/s" if f else ""
            lines.append(f"breakdown {s.name} T={t // 1024}k {name:24s} {ms * 1e3:7.1f} us{rate}")
            print(lines[-1], flush=True)
        for label, force in (("torch", True), ("triton", False)):
            with torch_routing(force):
                ms = bench(fwd_bwd, f"breakdown {s.name} fwd+bwd {label} routing")
            lines.append(f"breakdown {s.name} T={t // 1024}k {'fwd+bwd, ' + label + ' routing':24s} {ms * 1e3:7.1f} us")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    return lines


@contextlib.contextmanager
def torch_routing(force: bool):
    """Route with the torch ops (force) or the Triton counting sort inside the block."""
    before = os.environ.get(route_triton.TORCH_ROUTING_ENV)
    os.environ[route_triton.TORCH_ROUTING_ENV] = "1" if force else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[route_triton.TORCH_ROUTING_ENV]
        else:
            os.environ[route_triton.TORCH_ROUTING_ENV] = before


def table(rows: list[Row]) -> str:
    head = ("| shape | T | op | ours ms | TFLOP/s | % cuBLAS (target) | vs dense | vs grouped_mm |\n"
            "|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        grouped = f"{r.grouped_ms / r.ours_ms:.2f}x" if r.grouped_ms else "n/a"
        miss = "" if r.of_cublas >= TARGETS[r.op] else " MISS"
        out.append(f"| {r.shape} | {r.tokens // 1024}k | {r.op} | {r.ours_ms:.3f} | {r.tflops:.0f} | "
                   f"{100 * r.of_cublas:.0f}% ({100 * TARGETS[r.op]:.0f}%){miss} | {r.dense_ms / r.ours_ms:.2f}x | {grouped} |")
    return "\n".join(out)


def main() -> None:
    global REP_MS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--write", type=Path, help="write the table into this markdown file's '## Kernels' section")
    ap.add_argument("--sweep", action="store_true", help="also time tile configs of the two forward kernels")
    ap.add_argument("--breakdown", action="store_true", help="also time routing and each kernel alone")
    ap.add_argument("--breakdown-tokens", type=int, default=16384, help="tokens of the --breakdown problems")
    ap.add_argument("--shapes", nargs="+", choices=[s.name for s in SHAPES], help="only these shapes")
    ap.add_argument("--rep", type=int, default=REP_MS, help="ms of measurement per timing")
    args = ap.parse_args()
    REP_MS = args.rep
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"
    if args.sweep:
        for line in sweep(SHAPES if not args.shapes else [s for s in SHAPES if s.name in args.shapes], 16384):
            print(line, flush=True)
    shapes = [s for s in SHAPES if not args.shapes or s.name in args.shapes]
    extra = breakdown(shapes, args.breakdown_tokens) if args.breakdown else []
    rows, notes = run(shapes, args.tokens)
    notes += NOTES
    body = "\n".join([
        f"Device: {dev}; {versions}; bf16, random routing, CUDA-graph replay medians.",
        f"Command: `PYTHONPATH=. python benchmarks/bench_kernels.py --tokens {' '.join(map(str, args.tokens))}"
        f"{' --shapes ' + ' '.join(args.shapes) if args.shapes else ''}"
        f"{' --write ' + str(args.write) if args.write else ''}"
        f"{' --breakdown --breakdown-tokens ' + str(args.breakdown_tokens) if extra else ''}"
        f"{' --rep ' + str(args.rep) if args.rep != 60 else ''}`",
        "% cuBLAS = time of a FLOP-matched cuBLAS GEMM / our time; vs dense / vs grouped_mm = their time / ours.",
        "", table(rows), "", *[f"- {n}" for n in notes],
        *(["", f"Time per part at {args.breakdown_tokens // 1024}k tokens (routing precomputed for the kernels; "
            "'route <op>' = all the routing one op call computes, old torch ops vs the Triton counting sort):",
            "", "```", *extra, "```"] if extra else []),
    ])
    if args.write:
        write_section(args.write, "Kernels", body)
    print(body)


if __name__ == "__main__":
    main()
