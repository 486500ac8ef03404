"""Are the expert ops faster than every simple alternative? (H200, bf16, one run, same inputs)

For the paper's and the fold shapes at N tokens, random routing (router logits -> select_experts),
each variant compiled with torch.compile (token dim dynamic) and timed by CUDA-graph replay medians
(triton.testing.do_bench_cudagraph; launch overhead out, same for every row):
  ours     torch.ops.switchhead.expert_v / expert_o as a model calls them (impl="auto": choice.py's
           rule per op); also with impl="dense" and impl="sparse" forced;
  allE     the all-experts formula of kernels/reference.py, torch.compile'd: one GEMM over all H*E*dh
           columns, dense gate table, multiply and sum (the simplest fast alternative);
  cublas   a FLOP-matched dense GEMM of the useful work: V [N, d] @ [d, H*k*dh], O [N, H*k*dh] @
           [H*k*dh, d]; forward+backward as two nn.Linear-style layers (dX, dW);
  grouped  gather rows per (head, expert) + torch._grouped_mm + gate + index_add (eager).
Ops: V fwd, O fwd, and fwd+bwd = V then O, gradients of x, both weights and both gate sets.
Useful FLOPs: 2*N*H*k*d*dh per projection forward, 3x that per projection forward+backward.
Also: the routers' selection (select_experts, compiled, one kernel) against torch.topk, and its share
of the op time.

    python -m benchmarks.bench_kernels [--tokens 16384 65536] [--shapes 262M ...]
        [--write BENCHMARKS.md] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import switchhead.kernels  # noqa: F401  (registers the ops)
from switchhead.kernels import choice, reference
from switchhead.kernels.select import select_experts

from benchmarks.common import SHAPES, Shape, timer, write_section


OPS = ("V fwd", "O fwd", "fwd+bwd")
SPARSE_TARGETS = {"V fwd": 0.75, "O fwd": 0.60, "fwd+bwd": 0.50}  # of cuBLAS, at 262M and Llama-1B fold
SPARSE_TARGET_SHAPES = ("262M", "Llama-1B fold")
IMPL_VARIANTS = ("auto", "dense", "sparse")


@dataclass
class Row:
    shape: str
    tokens: int
    op: str
    choice: str  # what auto ran: V fwd / V bwd / O fwd / O bwd
    ms: dict[str, float]  # variant -> median ms
    useful_flops: float
    max_rel_err: dict[str, float]  # variant -> error against fp64

    def ratio(self, base: str, variant: str = "auto") -> float:
        return self.ms[base] / self.ms[variant]


def problem(s: Shape, n: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    idx_v, g_v = select_experts(torch.randn(n, s.h, s.e, device=device), s.k)
    idx_o, g_o = select_experts(torch.randn(n, s.h, s.e, device=device), s.k)
    return dict(
        x=rand(n, s.d), w_v=rand(s.h, s.e, s.d, s.dh, scale=s.d ** -0.5), attn=rand(n, s.h, s.dh),
        w_o=rand(s.h, s.e, s.dh, s.d, scale=(s.h * s.dh) ** -0.5), idx_v=idx_v, g_v=g_v, idx_o=idx_o, g_o=g_o,
        gy=rand(n, s.d),
    )


def _leaves(p):
    return [p[k].detach().requires_grad_() for k in ("x", "w_v", "w_o", "g_v", "g_o")]


TOKEN_INPUTS = ("x", "attn", "idx_v", "g_v", "idx_o", "g_o", "gy")


def compiled_layer(s: Shape, v_op: Callable, o_op: Callable) -> tuple[Callable, ...]:
    """V, O and V-then-O, each compiled once per shape: weights static, the token dim dynamic
    (marked on each problem's inputs), as in a model compiled for varying batch and length."""
    def layer(x, w_v, w_o, g_v, g_o, idx_v, idx_o):
        y = v_op(x, w_v, idx_v, g_v)
        return o_op(y.view(x.shape[0], s.h, s.dh), w_o, idx_o, g_o)

    return tuple(torch.compile(f) for f in (v_op, o_op, layer))


def expert_fns(p, compiled: tuple[Callable, ...]) -> tuple[Callable, ...]:
    """(V fwd, O fwd, fwd+bwd) closures over one problem."""
    v, o, vo = compiled
    leaves = _leaves(p)
    for t in leaves[0:1] + leaves[3:]:
        torch._dynamo.mark_dynamic(t, 0)

    def fwd_bwd():
        out = vo(*leaves, p["idx_v"], p["idx_o"])
        return torch.autograd.grad(out, leaves, p["gy"])

    return (lambda: v(p["x"], p["w_v"], p["idx_v"], p["g_v"]),
            lambda: o(p["attn"], p["w_o"], p["idx_o"], p["g_o"]), fwd_bwd)


def ours(impl: str):
    def v_op(x, w, idx, g):
        return torch.ops.switchhead.expert_v(x, w, None, idx, g, impl)

    def o_op(a, w, idx, g):
        return torch.ops.switchhead.expert_o(a, w, idx, g, impl)

    return v_op, o_op


def all_experts():
    def v_op(x, w, idx, g):
        return reference.expert_v_reference(x, w, None, idx, g)

    return v_op, reference.expert_o_reference


def cublas(p, s: Shape) -> tuple[Callable, ...]:
    n, width, dev, dt = p["x"].shape[0], s.h * s.k * s.dh, p["x"].device, p["x"].dtype
    w1 = torch.randn(s.d, width, device=dev, dtype=dt, requires_grad=True)
    w2 = torch.randn(width, s.d, device=dev, dtype=dt, requires_grad=True)
    z = torch.randn(n, width, device=dev, dtype=dt)
    x = p["x"].detach().requires_grad_()
    return (lambda: x @ w1), (lambda: z @ w2), (lambda: torch.autograd.grad((x @ w1) @ w2, [x, w1, w2], p["gy"]))


def grouped(p, s: Shape) -> tuple[Callable, ...]:
    """gather + torch._grouped_mm (bf16, sm90) + gate + index_add, eager. Needs d, dh multiples of 8."""
    n = p["x"].shape[0]
    w_v = p["w_v"].detach().reshape(s.h * s.e, s.d, s.dh).contiguous().requires_grad_()
    w_o = p["w_o"].detach().reshape(s.h * s.e, s.dh, s.d).contiguous().requires_grad_()
    x = p["x"].detach().requires_grad_()
    g_v, g_o = p["g_v"].detach().requires_grad_(), p["g_o"].detach().requires_grad_()

    def groups(idx, g):
        key = (torch.arange(s.h, device=idx.device).view(1, s.h, 1) * s.e + idx).flatten()
        order = torch.sort(key).indices
        counts = torch.zeros(s.h * s.e, dtype=torch.int32, device=idx.device).scatter_add_(
            0, key, torch.ones_like(key, dtype=torch.int32))  # bincount would sync
        return order, torch.cumsum(counts, 0, dtype=torch.int32), g.flatten()[order]

    def v(x=x):
        order, offs, gate = groups(p["idx_v"], g_v)
        y = torch._grouped_mm(x[order // (s.h * s.k)], w_v, offs=offs) * gate.unsqueeze(1).to(x.dtype)
        dest = order // (s.h * s.k) * s.h + order % (s.h * s.k) // s.k
        return torch.zeros(n * s.h, s.dh, device=x.device, dtype=x.dtype).index_add(0, dest, y).view(n, s.h, s.dh)

    def o(a=p["attn"]):
        order, offs, gate = groups(p["idx_o"], g_o)
        y = torch._grouped_mm(a.reshape(n * s.h, s.dh)[order // s.k] * gate.unsqueeze(1).to(a.dtype), w_o, offs=offs)
        return torch.zeros(n, s.d, device=a.device, dtype=a.dtype).index_add(0, order // (s.h * s.k), y)

    return v, o, (lambda: torch.autograd.grad(o(v()), [x, w_v, w_o, g_v, g_o], p["gy"]))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


def auto_choice(s: Shape, training: bool = False) -> str:
    """What impl="auto" runs for V fwd / V bwd / O fwd / O bwd at this shape (in a training step or not)."""
    def pick(op):
        return choice.choose_impl(op, "auto", device_type="cuda", d=s.d, heads=s.h, experts=s.e, top_k=s.k,
                                  head_dim=s.dh, training=training)
    return "/".join(pick(op) for op in choice.OPS)


def run_shape(s: Shape, n: int, device: str, compiled: dict[str, tuple], bench, with_grouped: bool) -> list[Row]:
    p = problem(s, n, device, torch.bfloat16 if device == "cuda" else torch.float32)
    for name in TOKEN_INPUTS:
        torch._dynamo.mark_dynamic(p[name], 0)
    flops = 2 * n * s.h * s.k * s.d * s.dh
    cands = {name: expert_fns(p, fns) for name, fns in compiled.items()}
    cands["cublas"] = cublas(p, s)
    if with_grouped and s.d % 8 == 0 and s.dh % 8 == 0:
        cands["grouped"] = grouped(p, s)
    # correctness of every expert variant's forward against fp64 (V and O)
    d64 = {k: (t.double() if t.is_floating_point() else t) for k, t in p.items()}
    want_v = reference.expert_v_reference(d64["x"], d64["w_v"], None, d64["idx_v"], d64["g_v"])
    want_o = reference.expert_o_reference(d64["attn"], d64["w_o"], d64["idx_o"], d64["g_o"])
    errors = {name: max(rel_err(fns[0]().detach().reshape(want_v.shape), want_v), rel_err(fns[1]().detach(), want_o))
              for name, fns in cands.items() if name not in ("cublas",)}
    rows = []
    for i, (op, useful) in enumerate(zip(OPS, (flops, flops, 6 * flops))):
        ms = {name: bench(fns[i]) for name, fns in cands.items()}
        if "dense" not in ms and auto_choice(s).count("sparse") == 0:
            ms["dense"] = ms["auto"]  # auto ran the dense formula everywhere: the same compiled program
        rows.append(Row(s.name, n, op, auto_choice(s, training=op == "fwd+bwd"), ms, useful, errors))
        print(f"{s.name} N={n} {op}: " + " ".join(f"{k}={v:.3f}" for k, v in ms.items()), flush=True)
    return rows


def backward_rows(shapes: list[Shape], tokens: list[int], device: str, bench) -> list[dict]:
    """Each backward op alone, impl dense vs sparse (compiled, token dim dynamic): the per-op choice."""
    out = []
    for s in shapes:
        def v_bwd(gy, x, w, idx, g, impl):
            return torch.ops.switchhead.expert_v_backward(gy, x, w, None, idx, g, impl)

        def o_bwd(gy, a, w, idx, g, impl):
            return torch.ops.switchhead.expert_o_backward(gy, a, w, idx, g, impl)

        fns = {impl: (torch.compile(v_bwd), torch.compile(o_bwd)) for impl in ("dense", "sparse")}
        for n in tokens:
            p = problem(s, n, device, torch.bfloat16)
            gy_v = torch.randn(n, s.h * s.dh, device=device, dtype=torch.bfloat16)
            for t in (p["x"], p["attn"], p["gy"], gy_v, p["idx_v"], p["g_v"], p["idx_o"], p["g_o"]):
                torch._dynamo.mark_dynamic(t, 0)
            ms = {}
            for impl, (v, o) in fns.items():
                ms[("V bwd", impl)] = bench(lambda: v(gy_v, p["x"], p["w_v"], p["idx_v"], p["g_v"], impl))
                ms[("O bwd", impl)] = bench(lambda: o(p["gy"], p["attn"], p["w_o"], p["idx_o"], p["g_o"], impl))
            for op in ("V bwd", "O bwd"):
                out.append(dict(shape=s.name, tokens=n, op=op, dense_ms=ms[(op, "dense")], sparse_ms=ms[(op, "sparse")]))
                print(f"{s.name} N={n} {op}: dense={ms[(op, 'dense')]:.3f} sparse={ms[(op, 'sparse')]:.3f}", flush=True)
        torch._dynamo.reset()
    return out


def routing_rows(shapes: list[Shape], n: int, device: str, bench) -> list[dict]:
    """select_experts (compiled) vs torch.topk + sigmoid, [N, H, E] fp32 logits."""
    out = []
    for s in shapes:
        logits = torch.randn(n, s.h, s.e, device=device)
        fast = torch.compile(select_experts, dynamic=True)
        ms_sel = bench(lambda: fast(logits, s.k))
        ms_topk = bench(lambda: (lambda t: (t.indices, t.values.sigmoid()))(logits.topk(s.k, dim=-1)))
        idx, gates = fast(logits, s.k)
        same = bool(torch.equal(idx, torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., : s.k]))
        # In a model the selection is compiled together with its consumer: its cost there is the V op
        # routed from the logits minus the V op given the routing, both compiled (default impl).
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        x = torch.randn(n, s.d, device=device, dtype=dtype)
        w = (torch.randn(s.h, s.e, s.d, s.dh, device=device) * s.d ** -0.5).to(dtype)
        given = torch.compile(lambda x, w, i, g: torch.ops.switchhead.expert_v(x, w, None, i, g))
        routed = torch.compile(lambda x, w, lg: torch.ops.switchhead.expert_v(x, w, None, *select_experts(lg, s.k)))
        ms_given = bench(lambda: given(x, w, idx, gates))
        ms_routed = bench(lambda: routed(x, w, logits))
        out.append(dict(shape=s.name, tokens=n, select_ms=ms_sel, topk_ms=ms_topk, same_as_stable_sort=same,
                        v_given_ms=ms_given, v_routed_ms=ms_routed))
    return out


def table(rows: list[Row]) -> str:
    def pct(r, v):
        return f"{100 * r.ms['cublas'] / r.ms[v]:.0f}%" if v in r.ms else "n/a"

    lines = ["| shape | N | op | auto runs (V/dV/O/dO) | auto ms | x allE | dense x allE | sparse x allE | "
             "sparse % cuBLAS (target) | auto % cuBLAS | x grouped |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = ""
        if r.shape in SPARSE_TARGET_SHAPES and "sparse" in r.ms:
            miss = r.ms["cublas"] / r.ms["sparse"] < SPARSE_TARGETS[r.op]
            target = f" ({100 * SPARSE_TARGETS[r.op]:.0f}%{' MISS' if miss else ''})"
        cells = [r.shape, f"{r.tokens // 1024}k", r.op, r.choice.replace("dense", "D").replace("sparse", "S"),
                 f"{r.ms['auto']:.3f}", f"{r.ratio('allE'):.2f}x{'' if r.ratio('allE') >= 1 else ' MISS'}",
                 f"{r.ms['allE'] / r.ms['dense']:.2f}x" if "dense" in r.ms else "n/a",
                 f"{r.ms['allE'] / r.ms['sparse']:.2f}x" if "sparse" in r.ms else "n/a",
                 pct(r, "sparse") + target, pct(r, "auto"),
                 f"{r.ratio('grouped'):.2f}x" if "grouped" in r.ms else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--shapes", nargs="+", choices=[s.name for s in SHAPES], help="only these shapes")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run: dense variants only)")
    ap.add_argument("--rep", type=int, default=60, help="ms of measurement per timing")
    ap.add_argument("--write", type=Path, help="write the table into this markdown file's '## Kernels' section")
    ap.add_argument("--json", type=Path, help="write every timing here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    shapes = [s for s in SHAPES if not args.shapes or s.name in args.shapes]
    bench = timer(args.device, args.rep)
    rows: list[Row] = []
    for s in shapes:
        # "dense" separately only where auto runs something else; no sparse kernels off CUDA
        variants = [v for v in IMPL_VARIANTS if (v != "dense" or "sparse" in auto_choice(s)) and (cuda or v != "sparse")]
        compiled = {v: compiled_layer(s, *ours(v)) for v in variants} | {"allE": compiled_layer(s, *all_experts())}
        for n in args.tokens:
            rows += run_shape(s, n, args.device, compiled, bench, with_grouped=cuda)
            if cuda:
                torch.cuda.empty_cache()
        torch._dynamo.reset()
        if args.json:  # after every shape: a run cut short keeps what it measured
            args.json.write_text(json.dumps(dict(rows=[asdict(r) for r in rows]), indent=1))
    bwd = backward_rows(shapes, args.tokens, args.device, bench) if cuda else []
    sel = routing_rows(shapes, min(args.tokens), args.device, bench)
    dev = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    import triton

    versions = f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"
    worst = max(max(r.max_rel_err.values()) for r in rows)
    op_ms = {(r.shape, r.tokens, r.op): r.ms["auto"] for r in rows}
    sel_lines = [f"| {x['shape']} | {x['tokens'] // 1024}k | {1e3 * x['select_ms']:.1f} | {1e3 * x['topk_ms']:.1f} | "
                 f"{100 * x['select_ms'] / op_ms[(x['shape'], x['tokens'], 'V fwd')]:.1f}% / "
                 f"{100 * x['select_ms'] / op_ms[(x['shape'], x['tokens'], 'O fwd')]:.1f}% | "
                 f"{'yes' if x['same_as_stable_sort'] else 'NO'} | {x['v_given_ms']:.3f} | {x['v_routed_ms']:.3f} | "
                 f"{100 * (x['v_routed_ms'] - x['v_given_ms']) / x['v_given_ms']:+.1f}% |" for x in sel]
    body = "\n".join([
        f"Device: {dev}; {versions}; bf16, random routing, torch.compile (dynamic tokens) for every expert variant, "
        "CUDA-graph replay medians, one run.",
        f"Command: `python -m benchmarks.bench_kernels --tokens {' '.join(map(str, args.tokens))}"
        f"{' --shapes ' + ' '.join(repr(s) for s in args.shapes) if args.shapes else ''}"
        f"{' --write ' + str(args.write) if args.write else ''}`",
        "x allE = time of the compiled all-experts formula / ours (above 1: ours faster; target >= 1.00 on every "
        "row); % cuBLAS = FLOP-matched cuBLAS time / that variant's time; auto runs: D = dense formula, S = "
        "sparse Triton kernels, for V fwd / V bwd / O fwd / O bwd.",
        f"Largest error of any variant's V/O forward against fp64, over all rows: {worst:.1e} (bf16).",
        "", table(rows), "",
        "Router selection (select_experts compiled, one kernel) against torch.topk + sigmoid, fp32 logits "
        "[N, H, E]; share = selection alone / auto op time (V fwd / O fwd); in situ = the V op compiled with its "
        "selection from the logits against the V op given the selection (target: routing < 5% of the op):", "",
        "| shape | N | select us | topk us | share of op | = stable sort | V given ms | V from logits ms | in situ |",
        "|---|---|---|---|---|---|---|---|---|", *sel_lines,
        "", "Each backward op alone (compiled), the dense formula against the sparse kernels (choice.py's input):", "",
        "| shape | N | op | dense ms | sparse ms | sparse / dense speed |", "|---|---|---|---|---|---|",
        *[f"| {b['shape']} | {b['tokens'] // 1024}k | {b['op']} | {b['dense_ms']:.3f} | {b['sparse_ms']:.3f} | "
          f"{b['dense_ms'] / b['sparse_ms']:.2f}x |" for b in bwd],
    ])
    if args.write:
        write_section(args.write, "Kernels", body)
    if args.json:
        args.json.write_text(json.dumps(dict(device=dev, versions=versions, rows=[asdict(r) for r in rows],
                                             routing=sel, backward=bwd), indent=1))
    print(body)
    return dict(rows=rows, routing=sel)


if __name__ == "__main__":
    main()
