"""Token generation over the cached form (switchhead.cache): one prefill call, then one-token decode
calls over a static KV cache, with Hugging Face `generate`'s semantics for padding, positions,
sampling and stopping."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from switchhead.errors import SwitchHeadError

# step(input_ids [B, T], attention_mask [B, S], position_ids [B, T], cache_position [T], cache) -> logits [B, T, V]
Step = Callable[..., torch.Tensor]


def next_token_scores(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None) -> torch.Tensor:
    """Sampling scores [B, V] from last-token logits, warped as Hugging Face does (temperature,
    then top-k, then top-p; filtered entries become -inf)."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def generate_with(step: Step, allocate: Callable[[int, int, torch.device], list[torch.Tensor]],
                  input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None,
                  eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                  generator: torch.Generator | None = None,
                  streamer: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
    """The prompt followed by the generated tokens, [B, L + n] (n <= max_new_tokens: generation
    stops once every sequence has produced an EOS; finished sequences are padded with
    `pad_token_id`, by default the first EOS id), as Hugging Face's `generate` returns them.

    `attention_mask` [B, L] marks real tokens (left padding is 0). `allocate(batch, length, device)`
    gives the empty cache; `step` is the model in the cached form. `streamer` gets each new token
    column [B] as soon as it is chosen."""
    if input_ids.dim() != 2:
        raise SwitchHeadError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise SwitchHeadError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise SwitchHeadError(f"temperature must be positive when sampling, got {temperature}")
    batch, prompt = input_ids.shape
    device = input_ids.device
    prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    if prompt_mask.shape != input_ids.shape:
        raise SwitchHeadError(f"attention_mask has shape {tuple(prompt_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    length = prompt + max_new_tokens
    cache = allocate(batch, length, device)
    # The mask covers every cache slot; slots not yet written are masked by causality.
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    mask[:, :prompt] = prompt_mask
    # Positions as Hugging Face derives them from the mask: pads get 1, real tokens count from 0.
    positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
    tokens, unfinished = input_ids, torch.ones(batch, dtype=torch.bool, device=device)
    eos_ids = torch.tensor(eos, device=device, dtype=input_ids.dtype)
    step_ids, cache_position = input_ids, torch.arange(prompt, device=device)
    with torch.no_grad():
        for index in range(max_new_tokens):
            logits = step(step_ids, mask, positions, cache_position, cache)[:, -1, :]
            if do_sample:
                probs = next_token_scores(logits, temperature, top_k, top_p).softmax(-1)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                chosen = logits.float().argmax(-1)
            if pad is not None:
                chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
            tokens = torch.cat([tokens, chosen[:, None].to(tokens.dtype)], dim=1)
            if streamer is not None:
                streamer(chosen)
            if eos:
                unfinished &= ~torch.isin(chosen, eos_ids)
                if not unfinished.any():
                    break
            slot = prompt + index
            if index + 1 < max_new_tokens:
                mask[:, slot] = 1
                positions = positions[:, -1:] + 1
                step_ids, cache_position = chosen[:, None].to(input_ids.dtype), torch.tensor([slot], device=device)
    return tokens
