"""`switchhead-rewrite MODEL --kv-cache` then `switchhead-rewrite generate DIR --prompt ...`: a saved
decoder continues the prompt with the model file's tokenizer, streaming the same tokens that
generate() gives."""

from __future__ import annotations

import inspect

import pytest
import torch

import zoo_cached

MODEL_FILE = inspect.getsource(zoo_cached.BufferCachedDecoder) + '''

class CharTokenizer:
    """Characters ' ' .. '\\\\' as token ids 0 .. 60."""
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(max(ord(c) - 32, 0), 60) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 32) for i in ids)


tokenizer = CharTokenizer()


def build_model():
    torch.manual_seed(0)
    return BufferCachedDecoder().eval()


def example_inputs():
    return (torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 64, dtype=torch.long),
            torch.arange(2).view(1, 2), torch.arange(2))
'''
HEADER = "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n"


@pytest.fixture
def saved(write_model, run_cli, tmp_path):
    path = write_model(HEADER + MODEL_FILE)
    result = run_cli(path, "--kv-cache", "--quiet", "--output", tmp_path / "out", "--onnx", tmp_path / "decoder.onnx")
    assert result.exit_code == 0, result.output
    return path, tmp_path / "out"


def test_generate_streams_the_models_tokens(saved, run_cli) -> None:
    import switchhead

    path, out = saved
    result = run_cli("generate", out, "--prompt", "HELLO", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    model = switchhead.load(out)
    ids = torch.tensor([[ord(c) - 32 for c in "HELLO"]])  # all inside the 61 characters
    want = "".join(chr(int(i) + 32) for i in model.generate(ids, max_new_tokens=12)[0])
    assert result.stdout == want + "\n"
    assert len(result.stdout) == 5 + 12 + 1
    from switchhead.exporters.onnx_decoder import onnx_generate

    assert torch.equal(onnx_generate(out.parent / "decoder.onnx", ids, max_new_tokens=12), model.generate(ids, max_new_tokens=12))


def test_generate_refuses_what_it_cannot_use(saved, run_cli, write_model, tmp_path) -> None:
    _, out = saved
    result = run_cli("generate", out, "--prompt", "hi", "--top-k", "3")
    assert result.exit_code == 2 and "--sample" in result.stderr
    plain = run_cli(write_model(), "--quiet", "--output", tmp_path / "plain")
    assert plain.exit_code == 0
    result = run_cli("generate", tmp_path / "plain", "--prompt", "hi")
    assert result.exit_code == 2 and "convert_decoder" in result.stderr
    result = run_cli("generate", tmp_path / "missing", "--prompt", "hi")
    assert result.exit_code == 4
