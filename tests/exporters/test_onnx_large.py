"""A real model over 2 GB of weights (protobuf's limit) exports, checks and runs (`pytest -m big`:
about a minute and 6 GB of memory, so not part of the default run)."""

from __future__ import annotations

import onnx
import pytest
import torch

import switchhead

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.big


def test_folded_llama_over_2gb_goes_to_external_data(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    new = switchhead.convert(model, (), {"input_ids": ids},
                             config=switchhead.SwitchHeadConfig(init="fold", num_heads=8, top_k=2))
    weight_bytes = sum(p.numel() * p.element_size() for p in new.parameters())
    assert weight_bytes > 2 * 2**30
    del model

    result = switchhead.export_onnx(new, tmp_path / "model.onnx", kwargs={"input_ids": ids})

    data = tmp_path / "model.onnx.data"
    assert result.external_data and data.stat().st_size >= weight_bytes
    assert result.path.stat().st_size < 2**20  # the graph alone
    assert result.custom_nodes == {"ExpertV": 2, "ExpertO": 2}
    onnx.checker.check_model(str(result.path), full_check=True)
    # verify=True ran onnxruntime on the example and a second shape against PyTorch
    assert len(result.verify_errors) == 2 and max(result.verify_errors.values()) < 1e-4
