"""The routers' expert selection: the k best of E logits per head, by comparisons instead of a sort.

Shape legend: N tokens, H heads, E experts per head, k active experts per head.

For the small E of SwitchHead (<= 16), `torch.topk` and sorts cost far more than the arithmetic: on an
H200, 160 us at N=16k, H=4, E=4, k=2 against 11 us for this selection compiled into one kernel
(BENCHMARKS.md, "Kernels"). Expert e's rank is the number of experts that beat it (a larger logit, or
an equal one at a lower index); the experts of rank 0..k-1 are chosen, in that order. That is
exactly torch.topk's choice and order, ties to the lower index; NaN ranks above everything, as in
topk. Every step is elementwise or a reduction over E, so Inductor fuses the selection with the
sigmoid and with the gate table that the expert ops build from it, and nothing is sorted or synced.
"""

from __future__ import annotations

import torch
from torch import Tensor


def select_experts(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """logits [N, H, E] -> (expert_index [N, H, k] int64, gates [N, H, k]): the k largest logits of each
    head in descending order (ties to the lower index), and the sigmoid of each chosen logit."""
    e = logits.shape[-1]
    experts = torch.arange(e, device=logits.device)
    ranked = torch.where(torch.isnan(logits), torch.inf, logits)  # NaN first, as torch.topk has it
    cand, rival = ranked.unsqueeze(-1), ranked.unsqueeze(-2)  # [N, H, E, 1], [N, H, 1, E]
    lower = experts.view(1, e) < experts.view(e, 1)  # [E, E]: rival j sits before candidate e
    beats = (rival > cand) | ((rival == cand) & lower)  # [N, H, E, E]
    rank = beats.sum(-1)  # [N, H, E]: place of each expert in the descending order
    slot = rank.unsqueeze(-2) == torch.arange(k, device=logits.device).view(k, 1)  # [N, H, k, E]
    expert_index = torch.where(slot, experts, 0).sum(-1)  # [N, H, k]
    chosen = torch.where(slot, logits.unsqueeze(-2), 0).sum(-1)  # exactly one term per slot
    return expert_index, torch.sigmoid(chosen)
