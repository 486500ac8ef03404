"""ONNX decoder-with-past: a converted decoder exports with past/present caches (dynamic batch, new
tokens and cache length, ai.switchhead nodes kept), and the onnxruntime greedy loop gives exactly
the PyTorch tokens from a left-padded batch of 3 prompts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from switchhead.exporters.onnx_decoder import export_decoder_onnx, onnx_generate  # noqa: E402
from zoo_cached import CACHED_ZOO, built, padded_prompts  # noqa: E402

NEW_TOKENS, EOS = 32, 60


# Llama is Mistral without GQA here: three cases cover both cache writes, GQA, RoPE and fused QKV.
ONNX_CASES = [c for c in CACHED_ZOO if c.name != "hf_llama"]


@pytest.mark.parametrize("case", ONNX_CASES, ids=lambda c: c.name)
def test_onnxruntime_generates_the_pytorch_tokens(case, tmp_path) -> None:
    import onnx

    _, converted = built(case.name)
    result = export_decoder_onnx(converted, tmp_path / "decoder.onnx")
    assert result.custom_nodes and all(n > 0 for n in result.custom_nodes.values())
    assert len(result.verify_errors) == 2  # the example prompt and a one-token step, both checked
    past = [name for name in result.inputs if name.startswith("past_key_values")]
    assert len(past) == 2 * case.layers
    for name in past:
        batch, heads, length, head_dim = result.inputs[name]
        assert isinstance(batch, str) and isinstance(length, str) and (heads, head_dim) == (case.kv_heads, case.head_dim)
    assert isinstance(result.inputs["input_ids"][1], str)  # new tokens: any number (prompt or one)
    outputs = [o.name for o in onnx.load(str(result.path), load_external_data=False).graph.output]
    assert outputs == ["logits"] + [f"present_{i}" for i in range(len(past))]
    ids, mask = padded_prompts(case.vocab)
    want = converted.generate(ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=EOS)
    got = onnx_generate(result.path, ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=EOS)
    assert torch.equal(got, want)


def test_a_folded_decoder_exports_its_smaller_cache(tmp_path) -> None:
    import switchhead
    from switchhead.decoder import convert_decoder
    from zoo_cached import CACHED_BY_NAME

    folded = convert_decoder(CACHED_BY_NAME["hf_llama"].build(), switchhead.SwitchHeadConfig(init="fold", num_heads=2))
    result = export_decoder_onnx(folded, tmp_path / "folded.onnx")
    assert [result.inputs[f"past_key_values_{i}"][1] for i in range(4)] == [2] * 4  # 4 heads folded to 2
    ids, mask = padded_prompts(61)
    assert torch.equal(onnx_generate(result.path, ids, mask, max_new_tokens=12), folded.generate(ids, mask, max_new_tokens=12))
