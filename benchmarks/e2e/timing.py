"""Clocks, memory and profiles of bench_e2e's measurements: CUDA-event medians (wall clock on the CPU),
the host's issue time, peak memory, and a torch.profiler summary."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log


class Timer:
    """Clocks of one device: synchronised first calls, medians of timed steps, host issue time."""

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


def new_cudagraph_step(step: Callable[[], Any]) -> Callable[[], Any]:
    """Each call starts a new CUDA-graph step: the previous step's outputs may be overwritten."""
    def marked():
        torch.compiler.cudagraph_mark_step_begin()
        return step()
    return marked


def memory_reset(device: torch.device) -> int:
    """Reset CUDA's peak counter; the bytes allocated now (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def memory_peak(device: torch.device) -> int | None:
    """Peak bytes allocated since memory_reset (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def free(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks: the next model starts on an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the run


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
