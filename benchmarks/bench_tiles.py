"""Which tile shapes make the sparse expert kernels fastest? (H200, bf16, one run)

Times each Triton kernel of the expert ops on its own, routing precomputed (route_triton.route), for
every shape of bench_kernels.py and a bounded list of tile configs, against cuBLAS on the FLOP-matched
useful work of the same launch (V: [N, d] @ [d, H*k*dh]; O: [N, H*k*dh] @ [H*k*dh, d]). Roles:
  V fwd     fan_out(x, W_V), tokens in head order      (also "V fwd unsorted": identity order)
  V dG      fan_out(x, W_V, gate_input=dY, store_out=False): V backward's gate gradient
  O dattn   fan_out(dY, W_O^T, gate_input=attn): O backward's input and gate gradients
  O fwd     fan_in(attn, W_O), tokens in signature order (also "O fwd unsorted")
  V dx      fan_in(dY, W_V^T): V backward's input gradient
The defaults (fan_out_config / fan_in_config) are marked; the table prints the best config per row.

    python -m benchmarks.bench_tiles [--tokens 16384 65536] [--shapes 262M ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import SHAPES, timer
from switchhead.kernels import fan_in, fan_out, route_triton
from switchhead.kernels.fan_out import TileConfig
from switchhead.kernels.select import select_experts


def fan_out_configs(c: int) -> list[TileConfig]:
    bn = max(16, min(128, 1 << (c - 1).bit_length())) if c <= 128 else 64
    return [TileConfig(128, bn, 64, 8, 3), TileConfig(128, bn, 64, 8, 4), TileConfig(128, bn, 32, 8, 4),
            TileConfig(64, bn, 64, 4, 4), TileConfig(64, bn, 64, 4, 3)] + (
        [TileConfig(128, 64, 64, 8, 4)] if bn == 128 else [])


FAN_IN_CONFIGS = [TileConfig(128, 128, 64, 8, 3), TileConfig(128, 128, 64, 8, 4), TileConfig(64, 128, 64, 4, 4),
                  TileConfig(128, 128, 32, 8, 4), TileConfig(128, 64, 64, 4, 4), TileConfig(64, 64, 64, 4, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--shapes", nargs="+", choices=[s.name for s in SHAPES])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bench = timer("cuda", 40)  # CUDA-graph replay medians: a launch's host cost stays out of small rows
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for s in [s for s in SHAPES if not args.shapes or s.name in args.shapes]:
        for n in args.tokens:
            torch.manual_seed(0)
            idx, g = select_experts(torch.randn(n, s.h, s.e, device=dev), s.k)
            r = route_triton.route(idx, g, s.e, head=True, sig=True)
            x = torch.randn(n, s.d, device=dev, dtype=dt)
            dy = torch.randn(n, s.h, s.dh, device=dev, dtype=dt)
            w_v = torch.randn(s.h, s.e, s.d, s.dh, device=dev, dtype=dt) * s.d ** -0.5
            w_o = torch.randn(s.h, s.e, s.dh, s.d, device=dev, dtype=dt) * (s.h * s.dh) ** -0.5
            ident = torch.arange(n, device=dev, dtype=torch.int32)
            dense_v = torch.randn(s.d, s.h * s.k * s.dh, device=dev, dtype=dt)
            o_in = torch.randn(n, s.h * s.k * s.dh, device=dev, dtype=dt)
            cublas = {"V": bench(lambda: x @ dense_v),
                      "O": bench(lambda: o_in @ dense_v.t())}
            roles = {
                "V fwd": ("V", fan_out_configs(s.dh), lambda c: fan_out.fan_out(x, w_v, None, r.table, r.bits, r.head_order, config=c)),
                "V fwd unsorted": ("V", fan_out_configs(s.dh), lambda c: fan_out.fan_out(
                    x, w_v, None, r.table, r.bits, ident.expand(s.h, n), config=c)),
                "V dG": ("V", fan_out_configs(s.dh), lambda c: fan_out.fan_out(
                    x, w_v, None, r.table, r.bits, r.head_order, gate_input=dy, config=c, store_out=False)),
                "O dattn": ("V", fan_out_configs(s.dh), lambda c: fan_out.fan_out(
                    x, w_o.transpose(2, 3), None, r.table, r.bits, r.head_order, gate_input=dy, config=c)),
                "O fwd": ("O", FAN_IN_CONFIGS, lambda c: fan_in.fan_in(dy, w_o, r.table, r.bits, r.sig_order, config=c)),
                "O fwd unsorted": ("O", FAN_IN_CONFIGS, lambda c: fan_in.fan_in(dy, w_o, r.table, r.bits, ident, config=c)),
                "V dx": ("O", FAN_IN_CONFIGS, lambda c: fan_in.fan_in(dy, w_v.transpose(2, 3), r.table, r.bits, r.sig_order, config=c)),
            }
            for role, (kind, configs, fn) in roles.items():
                times = {}
                for c in [None, *configs]:
                    try:
                        times[c] = bench(lambda: fn(c))
                    except Exception as err:  # a config the compiler rejects (shared memory): listed, not fatal
                        print(f"{s.name} {n} {role} {c}: {type(err).__name__}: {str(err)[:100]}", flush=True)
                best = min((c for c in times if c is not None), key=times.get)
                row = dict(shape=s.name, tokens=n, role=role, default_ms=times[None], best=str(best),
                           best_ms=times[best], cublas_ms=cublas[kind],
                           all={str(c): t for c, t in times.items()})
                rows.append(row)
                print(f"| {s.name} | {n // 1024}k | {role} | {times[None]:.3f} | "
                      f"{100 * cublas[kind] / times[None]:.0f}% | {best.block_m}x{best.block_n}x{best.block_k} "
                      f"w{best.num_warps} s{best.num_stages} | {times[best]:.3f} | {100 * cublas[kind] / times[best]:.0f}% |",
                      flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print("\n| shape | N | kernel | default ms | default % cuBLAS | best tile | best ms | best % cuBLAS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["best"]
        print(f"| {r['shape']} | {r['tokens'] // 1024}k | {r['role']} | {r['default_ms']:.3f} | "
              f"{100 * r['cublas_ms'] / r['default_ms']:.0f}% | {b} | {r['best_ms']:.3f} | "
              f"{100 * r['cublas_ms'] / r['best_ms']:.0f}% |")


if __name__ == "__main__":
    main()
