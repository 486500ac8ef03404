"""bench_heal's baselines: the dense model with heads pruned (first head of each group, or the heads
that write most into the output projection, or as many as match the fold's attention MACs)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from switchhead.accounting import attention_costs, site_costs, site_geometry


def attention_layers(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, torch.nn.Linear, int, int, int]]:
    """(key module, its output projection, H, KV heads that stay, dh) of each HF BERT / Llama
    attention (BERT: 1, since a pruned head takes its own K and V with it; Llama: its KV heads)."""
    for module in model.modules():
        if hasattr(module, "self") and hasattr(getattr(module, "self"), "attention_head_size"):  # BertAttention
            inner = module.self  # multi-head: pruning a head drops its K and V too (KV groups of one head)
            yield inner, module.output.dense, inner.num_attention_heads, 1, inner.attention_head_size
        elif hasattr(module, "q_proj") and hasattr(module, "num_key_value_groups"):  # LlamaAttention
            heads = module.q_proj.out_features // module.head_dim
            yield module, module.o_proj, heads, module.k_proj.out_features // module.head_dim, module.head_dim


@torch.no_grad()
def head_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """id(attention) -> [H]: each head's mean norm of what it adds to the output projection, per real
    token of `batch` (the usual importance score: a head that writes little can go)."""
    scores, hooks = {}, []
    mask = batch.get("attention_mask")
    for key, proj, heads, _, dh in attention_layers(model):
        def hook(mod, args, key=key, heads=heads, dh=dh):
            ctx = args[0].float()  # [B, T, H*dh]
            w = mod.weight.float().view(mod.weight.shape[0], heads, dh)  # [d, H, dh]
            norms = torch.einsum("bthc,dhc->bthd", ctx.view(*ctx.shape[:2], heads, dh), w).norm(dim=-1)  # [B, T, H]
            m = mask.to(norms) if mask is not None else torch.ones(norms.shape[:2])
            scores[key] = (norms * m[..., None]).sum((0, 1)) / m.sum()
        hooks.append(proj.register_forward_pre_hook(hook))
    try:
        model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return scores


def valid_head_counts(heads: int, kv_heads: int) -> list[int]:
    """Head counts a pruning to one head per group can reach: groups of equal size inside KV groups."""
    return [h for h in range(kv_heads, heads + 1, kv_heads) if heads % h == 0 and (heads // kv_heads) % (heads // h) == 0]


def equal_mac_heads(site: dict[str, Any], fold_heads: int, num_experts: int, top_k: int, seq_len: int) -> int:
    """The dense head count whose attention MACs per token (causal, our accounting) come nearest the
    fold's: the fold's k of E experts cost more projection MACs than H2 dense heads, so pruning to H2
    gives pruning a smaller budget than the fold has."""
    fold = site_costs(site, num_experts, top_k, seq_len, num_heads=fold_heads).after.macs_per_token(causal=True)
    dense = site_geometry(site)
    mha = dense.num_kv_heads == dense.num_heads  # pruning takes K/V heads along; GQA keeps them
    counts = valid_head_counts(dense.num_heads, 1 if mha else dense.num_kv_heads)
    cost = {h: attention_costs(dataclasses.replace(dense, num_heads=h, num_kv_heads=h if mha else dense.num_kv_heads),
                               seq_len).macs_per_token(causal=True) for h in counts}
    return min(counts, key=lambda h: (abs(cost[h] - fold), -h))


def prune_heads(model: torch.nn.Module, heads: int, scores: dict[int, torch.Tensor] | None = None) -> torch.nn.Module:
    """A copy of an HF BERT or Llama model keeping one query head of each group of H/heads consecutive
    heads (Llama: inside each KV group; K/V heads stay), the same grouping as the fold: the first head
    of each group, or with `scores` (head_scores of the original) the group's highest-scoring head."""
    pruned = copy.deepcopy(model)
    originals = [key for key, *_ in attention_layers(model)]
    for key, (module, proj, count, kv, dh) in zip(originals, list(attention_layers(pruned))):
        if heads not in valid_head_counts(count, kv):
            raise ValueError(f"cannot prune {count} heads ({kv} KV) to {heads}: choose one of {valid_head_counts(count, kv)}")
        group = count // heads
        chosen = torch.arange(0, count, group)
        if scores is not None:
            chosen = chosen + scores[key].view(heads, group).argmax(1)
        keep = _rows(chosen, dh)
        if hasattr(module, "query"):  # BertSelfAttention
            for name in ("query", "key", "value"):
                setattr(module, name, _slice_linear(getattr(module, name), keep, out=True))
            module.num_attention_heads, module.all_head_size = heads, heads * dh
        else:
            module.q_proj = _slice_linear(module.q_proj, keep, out=True)
            module.num_key_value_groups = heads // kv
        for parent in pruned.modules():  # the output projection reads the kept heads only
            for name, child in parent.named_children():
                if child is proj:
                    setattr(parent, name, _slice_linear(proj, keep, out=False))
    return pruned


def _rows(first_heads: torch.Tensor, dh: int) -> torch.Tensor:
    return (first_heads[:, None] * dh + torch.arange(dh)).flatten()


def _slice_linear(linear: torch.nn.Linear, index: torch.Tensor, out: bool) -> torch.nn.Linear:
    weight = linear.weight.data[index] if out else linear.weight.data[:, index]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[index] if out else linear.bias.data)
    return new
