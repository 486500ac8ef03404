"""What the benchmark scripts share: the expert-op shapes, a kernel timer, timestamped progress lines,
one-line errors, and replacing one '## Title' section of a markdown file (BENCHMARKS.md) while leaving
the others as they are."""

from __future__ import annotations

import datetime
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

START = time.perf_counter()  # when the benchmark process started (imported first thing by every script)


@dataclass(frozen=True)
class Shape:
    """An expert op's geometry: width d, H heads, E experts, k active, head size dh."""

    name: str
    d: int
    h: int
    e: int
    k: int
    dh: int


# the paper's SwitchHead configurations (262M, 262M-Wt103, 47M) and two folds of pretrained models
SHAPES = [
    Shape("262M", 1024, 4, 4, 2, 112),
    Shape("262M-Wt103", 1024, 2, 8, 4, 132),
    Shape("47M", 412, 2, 5, 3, 76),
    Shape("SmolLM2 fold", 576, 3, 3, 2, 64),
    Shape("Llama-1B fold", 2048, 8, 4, 2, 64),
]


def timer(device: str, rep_ms: int) -> Callable[[Callable[[], object]], float]:
    """A function timing `fn` in ms: CUDA-graph replay medians (do_bench_cudagraph; plain launches when the
    step cannot be captured), or wall-clock medians on the CPU (the tests' smoke runs)."""
    if device == "cpu":  # the CPU smoke run of the tests: plain wall-clock medians
        def bench_cpu(fn):
            fn()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e3

        return bench_cpu
    from triton.testing import do_bench, do_bench_cudagraph

    def bench_cuda(fn):
        fn()
        torch.cuda.synchronize()
        try:
            return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
        except RuntimeError as err:  # not capturable: plain launches, said in the output
            print(f"not capturable, timed with do_bench: {str(err).splitlines()[0][:120]}", flush=True)
            torch.cuda.synchronize()
            return do_bench(fn, rep=rep_ms, return_mode="median")

    return bench_cuda


def log(msg: str) -> None:
    """Print `msg` with the UTC time and the seconds since START, flushed (long runs are watched live)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
    print(f"[{now} +{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def short_error(err: BaseException) -> str:
    """'Type: first line of the message' (at most 240 characters): what a results row records."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:240]}"


def write_section(path: Path, title: str, body: str) -> None:
    """Put '## {title}' + `body` in place of that section (up to the next '## ' heading), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
