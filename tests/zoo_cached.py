"""The decoder-only LMs generation is tested on: tiny random configs with a KV cache, built here.

Each case builds an eval-mode model in one of the two cached kinds switchhead.cache knows (a Hugging
Face causal LM, or a hand-written decoder keeping K/V in buffers) and says its attention shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class CachedCase:
    name: str
    build: Callable[[], nn.Module]
    heads: int
    kv_heads: int
    head_dim: int
    layers: int = 2
    vocab: int = 61
    hf: bool = True  # compared with Hugging Face's own generate (static cache)


class BufferCachedDecoder(nn.Module):
    """A hand-written decoder keeping K/V in buffers [B, H, S, dh]: layer 0 writes them with
    index_copy_, layer 1 with index assignment (cache[:, :, positions] = k); learned positions."""

    def __init__(self, vocab: int = 61, d: int = 32, heads: int = 4, layers: int = 2, length: int = 64):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.ModuleList()
        for i in range(layers):
            block = nn.Module()
            block.norm, block.q, block.k, block.v, block.o = nn.LayerNorm(d), *(nn.Linear(d, d) for _ in range(4))
            block.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.blocks.append(block)
            self.register_buffer(f"k{i}", torch.zeros(1, heads, length, self.dh), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(1, heads, length, self.dh), persistent=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask, position_ids, cache_position):
        B, T = input_ids.shape
        x = self.embed(input_ids) + self.pos(position_ids)  # [B, T, d]
        # slot s is visible from new token t when it is a real token no later than t: [B, 1, T, S]
        slots = torch.arange(attention_mask.shape[1], device=x.device)
        visible = (attention_mask[:, None, None, :] > 0) & (slots[None, None, None, :] <= cache_position[None, None, :, None])
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, torch.finfo(x.dtype).min)
        for i, block in enumerate(self.blocks):
            h = block.norm(x)
            q, k, v = (proj(h).view(B, T, self.heads, self.dh).transpose(1, 2) for proj in (block.q, block.k, block.v))
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            if i % 2 == 0:
                k_cache.index_copy_(2, cache_position, k)
                v_cache.index_copy_(2, cache_position, v)
            else:
                k_cache[:, :, cache_position] = k
                v_cache[:, :, cache_position] = v
            z = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=bias)  # [B, H, T, dh]
            x = x + block.o(z.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(x)
        return self.head(self.norm(x))


def _seeded(build: Callable[[], nn.Module], std: float | None = 0.2) -> Callable[[], nn.Module]:
    """Seeded, in eval mode; weights redrawn with `std` (HF's 0.02 leaves logits so close that
    greedy decoding follows rounding; None keeps the model's own init)."""
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = build().eval()
        for module in model.modules():
            if std is not None and isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        return model
    return make


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))


def _mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(vocab_size=61, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                                            sliding_window=None))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    # untied head: with tied embeddings this tiny GPT-2 repeats its last token, a weak comparison
    return GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=60))


CACHED_ZOO: list[CachedCase] = [
    CachedCase("buffer_cached_decoder", _seeded(BufferCachedDecoder, std=None), 4, 4, 8, hf=False),
    CachedCase("hf_llama", _seeded(_llama), 4, 4, 8),
    CachedCase("hf_gpt2", _seeded(_gpt2), 4, 4, 8),
    CachedCase("hf_mistral_gqa", _seeded(_mistral), 6, 2, 8),
]
CACHED_BY_NAME = {case.name: case for case in CACHED_ZOO}


def padded_prompts(vocab: int, lengths: tuple[int, ...] = (7, 4, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of random prompts of `lengths`: (input_ids, attention_mask) [B, max]."""
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
        ids[row, :width - n] = 0
    return ids, mask


@functools.lru_cache(maxsize=None)
def built(name: str) -> tuple[nn.Module, Any]:
    """(model, its upcycled switchhead.convert_decoder result), converted once per test process."""
    from switchhead.decoder import convert_decoder

    model = CACHED_BY_NAME[name].build()
    return model, convert_decoder(model)
