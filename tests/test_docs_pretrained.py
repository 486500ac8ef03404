"""docs/pretrained.md runs: its Python blocks, in order, on a tiny Llama saved with save_pretrained
(9 query heads over 3 KV heads, like SmolLM2) and a word-level tokenizer, with the folder and the
number of healing steps swapped in. The GGUF and command-line blocks are shown, not run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "pretrained.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
TEXT = "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 40


def _tiny_pretrained(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]", TEXT)))
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=36, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)


def test_the_worked_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "tiny_llama"
    _tiny_pretrained(folder)
    (tmp_path / "corpus.txt").write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in BLOCK.findall(DOC.read_text()) if "gguf_file" not in b and not b.startswith("# smollm2.py")]
    code = "\n".join(blocks)
    for old, new in [('folder = "HuggingFaceTB/SmolLM2-135M"', f"folder = {str(folder)!r}"), ("steps=2000", "steps=3")]:
        assert old in code, f"docs/pretrained.md no longer has {old!r}: update this test"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102  (our own documentation)
    assert namespace["report"].verify_error <= namespace["report"].verify_rtol
    assert "3 x 4, E=3, k=2" in str(namespace["switchhead"].report_of(namespace["folded"]).cost_table(2048))
    assert (tmp_path / "smollm2_folded" / "model.graph.json").is_file()
    assert (tmp_path / "smollm2_folded.onnx").is_file() and namespace["exported"].verify_errors
