"""The distillation losses against hand-computed values on random hidden states with padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from switchhead.healing.losses import LOSSES, token_mask


def _outputs(seed: int, batch=3, tokens=7, width=16, layers=3):
    """An HF-like encoder output: last_hidden_state and hidden_states (embeddings first)."""
    g = torch.Generator().manual_seed(seed)
    states = tuple(torch.randn(batch, tokens, width, generator=g) for _ in range(layers + 1))
    return {"last_hidden_state": states[-1], "hidden_states": states}


def _mask_of(lengths):
    def mask_of(shape, device):
        return token_mask({"attention_mask": (torch.arange(shape[1]) < lengths[:, None]).long()}, shape, device)
    return mask_of


def test_cosine_pooled_is_token_cosine_plus_sentence_cosine_per_token():
    student, teacher = _outputs(0), _outputs(1)
    lengths = torch.tensor([7, 4, 1])
    mask = (torch.arange(7) < lengths[:, None]).float()
    total, count = LOSSES["cosine_pooled"](student, teacher, _mask_of(lengths), 1.0)

    layers = zip(student["hidden_states"][1:], teacher["hidden_states"][1:])
    per_token = sum(1 - F.cosine_similarity(s, t, dim=-1) for s, t in layers) / 3  # [B, T]
    pooled_s = (student["last_hidden_state"] * mask[..., None]).sum(1) / lengths[:, None]
    pooled_t = (teacher["last_hidden_state"] * mask[..., None]).sum(1) / lengths[:, None]
    per_sentence = 1 - F.cosine_similarity(pooled_s, pooled_t, dim=-1)
    want = (per_token * mask).sum() + (per_sentence * lengths).sum()
    torch.testing.assert_close(total, want)
    assert count == lengths.sum()
    cosine_total, _ = LOSSES["cosine"](student, teacher, _mask_of(lengths), 1.0)
    assert total > cosine_total  # the sentence term is there


def test_cosine_pooled_ignores_padding_and_is_zero_on_the_teacher():
    teacher = _outputs(1)
    lengths = torch.tensor([7, 4, 1])
    same, _ = LOSSES["cosine_pooled"](teacher, teacher, _mask_of(lengths), 1.0)
    assert abs(same.item()) < 1e-5
    student = _outputs(0)
    padded = {"hidden_states": tuple(h.clone() for h in student["hidden_states"])}
    for h in padded["hidden_states"]:
        h[1, 4:] = 1e3  # only padding positions change
    padded["last_hidden_state"] = padded["hidden_states"][-1]
    a, _ = LOSSES["cosine_pooled"](student, teacher, _mask_of(lengths), 1.0)
    b, _ = LOSSES["cosine_pooled"](padded, teacher, _mask_of(lengths), 1.0)
    torch.testing.assert_close(a, b)
