"""switchhead.generate: sampling scores are warped exactly as Hugging Face's logits warpers do, and
bad arguments get a clear error."""

from __future__ import annotations

import pytest
import torch

from switchhead.errors import SwitchHeadError
from switchhead.generate import generate_with, next_token_scores


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                      (0.9, 7, 0.6), (1.0, 1, None)])
def test_scores_match_hugging_face_warpers(temperature, top_k, top_p) -> None:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    want = logits.clone()
    if temperature != 1.0:
        want = TemperatureLogitsWarper(temperature)(None, want)
    if top_k is not None:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p is not None:
        want = TopPLogitsWarper(top_p)(None, want)
    got = next_token_scores(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[torch.isfinite(got)], want[torch.isfinite(want)])
    if top_k is not None:
        assert int(torch.isfinite(got).sum(-1).max()) <= top_k


def _counting_step(vocab: int = 11):
    """A fake cached model: the next token is (last token + 1) mod vocab."""
    def step(ids, mask, positions, cache_position, cache):
        return torch.nn.functional.one_hot((ids + 1) % vocab, vocab).float()
    return step


def test_stops_at_eos_and_pads_finished_rows() -> None:
    ids = torch.tensor([[3, 4], [0, 8]])
    out = generate_with(_counting_step(), lambda b, n, d: [], ids, torch.tensor([[1, 1], [0, 1]]),
                        max_new_tokens=6, eos_token_id=10, pad_token_id=0)
    # row 1 reaches the EOS (10) after 2 tokens and is padded; row 0 reaches it after 6: all stop
    assert out.tolist() == [[3, 4, 5, 6, 7, 8, 9, 10], [0, 8, 9, 10, 0, 0, 0, 0]]


@pytest.mark.parametrize("kwargs, message", [({"max_new_tokens": 0}, "max_new_tokens"),
                                             ({"do_sample": True, "temperature": 0.0}, "temperature"),
                                             ({"attention_mask": torch.ones(1, 3)}, "attention_mask")])
def test_bad_arguments_are_refused(kwargs, message) -> None:
    with pytest.raises(SwitchHeadError, match=message):
        generate_with(_counting_step(), lambda b, n, d: [], torch.tensor([[1, 2]]), **kwargs)
