"""Plain PyTorch models for bench_e2e: a pre-LN decoder-only LM with RoPE.

Nothing here knows about SwitchHead: the SwitchHead side of every comparison is made from these
models by `switchhead.convert` (pairs.py). Attention is the textbook form: nn.Linear q/k/v/o
without bias, rotary embeddings on q and k (Llama's rotate-half form; with an odd head size, the paper's
47M dh = 41, the last channel passes unrotated), `F.scaled_dot_product_attention(is_causal=True)`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class LMConfig:
    name: str
    d: int
    layers: int
    heads: int
    head_dim: int
    vocab: int = 8000
    ff_mult: int = 4
    tied: bool = True
    rope_base: float = 10000.0


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """Llama's rotate-half RoPE on x [B, H, T, dh]; with an odd dh the last channel passes unrotated."""
    t, dh = x.shape[-2], x.shape[-1]
    r = dh - dh % 2
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, device=x.device, dtype=torch.float32) / r))  # [r/2]
    freqs = torch.outer(torch.arange(t, device=x.device, dtype=torch.float32), inv_freq)  # [T, r/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot = x[..., :r] if r != dh else x
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    out = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([out, x[..., r:]], dim=-1) if r != dh else out


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, rope_base: float = 10000.0):
        super().__init__()
        self.heads, self.head_dim, self.rope_base = heads, head_dim, rope_base
        self.q = nn.Linear(d, heads * head_dim, bias=False)
        self.k = nn.Linear(d, heads * head_dim, bias=False)
        self.v = nn.Linear(d, heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        q, k = rotary(q, self.rope_base), rotary(k, self.rope_base)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d, d_ff)
        self.down = nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d)
        self.attn = Attention(cfg.d, cfg.heads, cfg.head_dim, cfg.rope_base)
        self.ln2 = nn.LayerNorm(cfg.d)
        self.mlp = MLP(cfg.d, cfg.ff_mult * cfg.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DecoderLM(nn.Module):
    """tokens [B, T] (int64) -> logits [B, T, vocab]."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.lm_head = nn.Linear(cfg.d, cfg.vocab, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.embed.weight
        self.apply(_init)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class WithLoss(nn.Module):
    """(tokens, targets) -> mean next-token cross-entropy of `lm` (fp32 logits for the loss)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def rotary_at(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """`rotary` at explicit positions [B, T] (a cached decoder's new tokens), x [B, H, T, dh], dh even."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh))  # [dh/2]
    freqs = positions[:, None, :, None].float() * inv_freq  # [B, 1, T, dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CachedAttention(Attention):
    """Attention with K/V in buffers [1, H, length, dh], written at cache_position with index_copy_
    (the cached form of switchhead.cache: convert_decoder passes its own cache for them)."""

    def __init__(self, d: int, heads: int, head_dim: int, rope_base: float, length: int):
        super().__init__(d, heads, head_dim, rope_base)
        self.register_buffer("k_cache", torch.zeros(1, heads, length, head_dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, heads, length, head_dim), persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        q, k = rotary_at(q, positions, self.rope_base), rotary_at(k, positions, self.rope_base)
        self.k_cache.index_copy_(2, cache_position, k)
        self.v_cache.index_copy_(2, cache_position, v)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=bias)
        return self.o(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class CachedDecoderLM(DecoderLM):
    """DecoderLM (same parameters) over a static KV cache: forward(input_ids, attention_mask [B, S],
    position_ids, cache_position) -> logits of the new tokens, their K/V written into the cache."""

    def __init__(self, cfg: LMConfig, length: int = 16):
        super().__init__(cfg)
        for block in self.blocks:
            block.attn = CachedAttention(cfg.d, cfg.heads, cfg.head_dim, cfg.rope_base, length)
        self.apply(_init)
        if cfg.tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask, position_ids, cache_position):
        x = self.embed(input_ids)
        slots = torch.arange(attention_mask.shape[1], device=x.device)
        visible = (attention_mask[:, None, None, :] > 0) & (slots <= cache_position[:, None])  # [B, 1, T, S]
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, torch.finfo(x.dtype).min)
        for block in self.blocks:
            x = x + block.attn(block.ln1(x), bias, position_ids, cache_position)
            x = x + block.mlp(block.ln2(x))
        return self.lm_head(self.ln_f(x))


class HFLogits(nn.Module):
    """A Hugging Face causal LM as tokens [B, T] -> logits [B, T, vocab] (no KV cache)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits


def parameters(module: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
