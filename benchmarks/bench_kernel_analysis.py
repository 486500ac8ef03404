"""Question: what does torch.compile's analysis of our Triton kernels cost, and does it see each
kernel write only its outputs?

For every call site of a user Triton kernel, torch lowers the kernel to TTIR and walks back from its
stores to find the tensors it writes (benchmarks/compile/launches.py); each written tensor that is
read again later costs a device copy, and the analysis itself is compile time, paid per call site
and per layer. For the paper's shapes this records every launch of the four ops (forward and
backward of V and O, without bias as in the paper), runs torch's analysis on each (median of
--repeats), and prints per launch: seconds, the tensors torch believes written, and which of those
are inputs of the op (each one a copy). No GPU is needed: the analysis targets Hopper without one.

    python -m benchmarks.bench_kernel_analysis [--tokens 4096] [--write BENCHMARKS.md] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from benchmarks.compile.launches import analysed_writes, recorded_launches
from benchmarks.common import SHAPES as EXPERT_SHAPES, write_section

from switchhead.kernels import triton_ops  # noqa: E402

# name: (d, H, E, k, dh), the paper's SwitchHead configurations (issue #4)
SHAPES = {s.name: (s.d, s.h, s.e, s.k, s.dh) for s in EXPERT_SHAPES if s.name in ("262M", "262M-Wt103", "47M")}
TITLE = "Compile: torch's analysis of the user Triton kernels"


def op_calls(tokens: int, d: int, h: int, e: int, k: int, dh: int) -> dict:
    """The four ops on bf16 CPU tensors (never launched: only their launches are recorded)."""
    bf = torch.bfloat16
    x, attn = torch.randn(tokens, d, dtype=bf), torch.randn(tokens, h, dh, dtype=bf)
    w_v, w_o = torch.randn(h, e, d, dh, dtype=bf), torch.randn(h, e, dh, d, dtype=bf)
    idx = torch.rand(tokens, h, e).topk(k, dim=-1).indices
    gates = torch.rand(tokens, h, k)
    inputs = (x, attn, w_v, w_o, idx, gates)
    return inputs, {
        "expert_v": lambda: triton_ops.expert_v_triton(x, w_v, None, idx, gates),
        "expert_v_backward": lambda: triton_ops.expert_v_backward_triton(
            torch.randn(tokens, h * dh, dtype=bf), x, w_v, None, idx, gates),
        "expert_o": lambda: triton_ops.expert_o_triton(attn, w_o, idx, gates),
        "expert_o_backward": lambda: triton_ops.expert_o_backward_triton(
            torch.randn(tokens, d, dtype=bf), attn, w_o, idx, gates),
    }


def measure(tokens: int, repeats: int) -> list[dict]:
    rows = []
    for shape, dims in SHAPES.items():
        inputs, calls = op_calls(tokens, *dims)
        for op, call in calls.items():
            with recorded_launches() as launches:
                call()
                for launch in launches:
                    results = [analysed_writes(launch) for _ in range(repeats)]
                    written = results[0][0]
                    copies = sorted(w for w in written if any(launch.args[w] is t for t in inputs))
                    rows.append({"shape": shape, "op": op, "kernel": launch.name,
                                 "analysis_ms": 1e3 * statistics.median(s for _, s in results),
                                 "written": sorted(written), "inputs_written": copies})
    return rows


def report(rows: list[dict], meta: dict) -> str:
    command = f"python -m benchmarks.bench_kernel_analysis --tokens {meta['tokens']} --repeats {meta['repeats']}"
    lines = [(f"Run {meta['date']} on {meta['machine']}: torch {meta['torch']}, triton {meta['triton']}, "
              f"{meta['tokens']} tokens, median of {meta['repeats']}; command `{command}`."),
             "",
             ("| shape | launches per layer (fwd+bwd) | analysis per layer, one pass (s) | slowest kernel (ms) "
              "| op inputs torch believes written |"),
             "|---|---|---|---|---|"]
    for shape in SHAPES:
        mine = [r for r in rows if r["shape"] == shape]
        slowest = max(mine, key=lambda r: r["analysis_ms"])
        copies = [f"{r['op']}/{r['kernel']}: {', '.join(r['inputs_written'])}" for r in mine if r["inputs_written"]]
        total_s = sum(r["analysis_ms"] for r in mine) / 1e3
        lines.append(f"| {shape} | {len(mine)} | {total_s:.2f} | {slowest['kernel']} in {slowest['op']}: "
                     f"{slowest['analysis_ms']:.0f} | {'; '.join(copies) or 'none'} |")
    lines += ["", "Per launch, 262M:", "", "| op | kernel | analysis (ms) | written (torch's analysis) |",
              "|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['kernel']} | {r['analysis_ms']:.0f} | {', '.join(r['written'])} |"
              for r in rows if r["shape"] == "262M"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", type=Path, help="replace this section of BENCHMARKS.md")
    ap.add_argument("--out", type=Path, help="write kernel_analysis.json here")
    args = ap.parse_args(argv)
    import datetime

    import triton
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "triton": triton.__version__, "tokens": args.tokens, "repeats": args.repeats}
    rows = measure(args.tokens, args.repeats)
    body = report(rows, meta)
    print(body)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_analysis.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.write:
        write_section(args.write, TITLE, body)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
