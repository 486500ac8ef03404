"""Distillation losses and held-out metrics, as (sum, count) pairs.

Every function returns the SUM over tokens (or sentences) and the count, so that a distributed run
can divide by the global count: the loss is then the same as one process on the global batch.
Shapes: B batch, T tokens, V vocabulary, D hidden width; mask [B, T] is 1 on real tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

Pair = tuple[torch.Tensor, torch.Tensor]


def _field(output: Any, name: str) -> torch.Tensor | None:
    if isinstance(output, dict) or hasattr(output, "keys"):
        try:
            return output[name] if name in output.keys() else None
        except (KeyError, TypeError):
            return None
    return getattr(output, name, None)


def logits_of(output: Any) -> torch.Tensor | None:
    """The output's logits (a `.logits` field or "logits" key), None if it has none."""
    value = _field(output, "logits")
    return value if isinstance(value, torch.Tensor) else None


def hidden_of(output: Any) -> torch.Tensor:
    """The output's hidden states: `.last_hidden_state`, else its first floating tensor."""
    value = _field(output, "last_hidden_state")
    if isinstance(value, torch.Tensor):
        return value
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dim() >= 2:
            return leaf
    raise ValueError(f"the model's output ({type(output).__name__}) has no floating tensor to distill")


def hidden_pairs(student: Any, teacher: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) hidden states to match: every layer's when both outputs carry
    `hidden_states` (HF models with config.output_hidden_states; the embeddings, identical in
    both, are skipped), else the last hidden states only."""
    s_all, t_all = _field(student, "hidden_states"), _field(teacher, "hidden_states")
    if isinstance(s_all, (tuple, list)) and isinstance(t_all, (tuple, list)) and len(s_all) == len(t_all) > 1:
        return list(zip(s_all[1:], t_all[1:]))
    return [(hidden_of(student), hidden_of(teacher))]


def token_mask(kwargs: dict[str, Any], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """[B, T] float mask of real tokens: the attention_mask input when it fits, else all ones."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(shape):
        return mask.to(device=device, dtype=torch.float32)
    return torch.ones(shape, device=device, dtype=torch.float32)


def kl_loss(student: Any, teacher: Any, mask_of: Callable, temperature: float) -> Pair:
    """sum over tokens of KL(teacher || student) of the softmaxed logits, times temperature**2.
    An output that is a bare [B, T, V] tensor is taken as the logits."""
    s, t = (x if isinstance(x, torch.Tensor) else logits_of(x) for x in (student, teacher))
    if s is None or t is None:
        raise ValueError("loss='kl' needs outputs with logits; use loss='mse' for this model")
    mask = mask_of(s.shape[:2], s.device)
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # [B, T]
    return (per_token * mask).sum() * temperature ** 2, mask.sum()


def _per_layer(student: Any, teacher: Any, mask_of: Callable, token_loss: Callable) -> Pair:
    pairs = hidden_pairs(student, teacher)
    mask = mask_of(pairs[0][0].shape[:2], pairs[0][0].device)
    per_token = sum(token_loss(s.float().flatten(2), t.float().flatten(2)) for s, t in pairs) / len(pairs)
    return (per_token * mask).sum(), mask.sum()


def mse_loss(student: Any, teacher: Any, mask_of: Callable, temperature: float) -> Pair:
    """sum over tokens of |s - t|^2 / |t|^2 on the hidden states (relative squared error),
    averaged over the layers of hidden_pairs()."""
    return _per_layer(student, teacher, mask_of,
                      lambda s, t: (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12))


def cosine_loss(student: Any, teacher: Any, mask_of: Callable, temperature: float) -> Pair:
    """sum over tokens of 1 - cos(s, t) on the hidden states, averaged over hidden_pairs()."""
    return _per_layer(student, teacher, mask_of, lambda s, t: 1 - F.cosine_similarity(s, t, dim=-1))


def cosine_pooled_loss(student: Any, teacher: Any, mask_of: Callable, temperature: float) -> Pair:
    """cosine_loss plus, for each sentence, 1 - cos of the mean-pooled sentence embeddings (what an
    encoder is scored on), counted once per real token of the sentence so both terms weigh alike."""
    total, count = cosine_loss(student, teacher, mask_of, temperature)
    hidden = hidden_of(student)
    mask = mask_of(hidden.shape[:2], hidden.device)
    per_sentence = 1 - F.cosine_similarity(mean_pooled(student, mask), mean_pooled(teacher, mask), dim=-1)  # [B]
    return total + (per_sentence * mask.sum(1)).sum(), count


LOSSES: dict[str, Callable[..., Pair]] = {"kl": kl_loss, "mse": mse_loss, "cosine": cosine_loss,
                                          "cosine_pooled": cosine_pooled_loss}


def resolve_loss(name: str, teacher_output: Any) -> str:
    if name != "auto":
        return name
    return "kl" if logits_of(teacher_output) is not None else "mse"


def resolve_task(name: str, teacher_output: Any) -> str:
    if name != "auto":
        return name
    return "causal_lm" if logits_of(teacher_output) is not None else "encoder"


# ------------------------------------------------------------------------------ held-out metrics


def next_token_nll(output: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> Pair:
    """sum of -log p(token t+1 | tokens <= t) and the number of predicted tokens."""
    logits = logits_of(output)
    if logits is None:
        raise ValueError("perplexity needs outputs with logits")
    target = input_ids[:, 1:].to(logits.device)
    weight = mask[:, 1:] * mask[:, :-1]
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), reduction="none")
    return (nll * weight.flatten()).sum(), weight.sum()


def mean_pooled(output: Any, mask: torch.Tensor) -> torch.Tensor:
    """[B, D] sentence embeddings: hidden states averaged over real tokens."""
    hidden = hidden_of(output).float()
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def embedding_cosine(student: Any, teacher: Any, mask: torch.Tensor) -> Pair:
    """sum over sentences of cos(student embedding, teacher embedding), and the count."""
    cos = F.cosine_similarity(mean_pooled(student, mask), mean_pooled(teacher, mask), dim=-1)
    return cos.sum(), torch.tensor(float(cos.numel()), device=cos.device)
