"""Token routing for the Triton expert kernels from fixed-shape torch ops: the reference.

The ops route with route_triton.route (a counting sort in three Triton launches); these torch-op
versions define what it computes (the tests compare the two) and feed the kernels in tests and scripts.

Shape legend:
    N = tokens, H = heads, E = experts per head, k = active experts per head.

Nothing here reads a value back to the host: every output has a shape known from the inputs' shapes,
so the routing traces under torch.compile without graph breaks and launches without a sync.

- `gate_table`: the chosen gates scattered into a dense fp32 table G [N, H, E] (0 where unchosen).
- `expert_bits`: the chosen set of each (token, head) as a bit mask [N, H] (int32, bit e = expert e).
- `head_order`: per head, tokens sorted by their expert set [H, N]; a tile of consecutive tokens then
  shares one set (the fan-out kernel skips the experts no token of its tile chose).
- `signature_order`: tokens sorted by the sets of all heads at once [N] (the fan-in kernel sums over
  heads, so its tiles need one token order for every head; later heads are less coherent).
- `expert_groups`: the (token, head, slot) assignments sorted by (head, expert) with group offsets,
  for the weight-gradient kernel, which reduces over the tokens of one expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The most experts per head the sparse path (routing and Triton kernels) takes: route_triton's counting
# sort has one key per expert set, 2^E per head (256 at E = 8), counted in per-block histograms. Ops
# with more experts run the dense formula (choice.py), which has no such limit.
MAX_EXPERTS = 8
_KEY_BITS = 31  # int32 sort keys: one-sweep radix sorts of 4 passes instead of 8 for int64

# Every sort is one flat torch.sort of int32 keys: a 2-D sort along dim 1 runs as a segmented sort with
# one thread block per head, several times slower at these sizes.


def check_experts(num_experts: int) -> int:
    """`num_experts`, or ValueError when the sparse path cannot take that many (MAX_EXPERTS)."""
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"the sparse expert kernels take at most {MAX_EXPERTS} experts per head, got {num_experts}")
    return num_experts


def gate_table(expert_index: Tensor, gates: Tensor, num_experts: int) -> Tensor:
    """G [N, H, E] fp32: gates[n, h, j] at expert expert_index[n, h, j], 0 elsewhere."""
    n, h, _ = expert_index.shape
    table = torch.zeros(n, h, num_experts, dtype=torch.float32, device=gates.device)
    return table.scatter(2, expert_index, gates.to(torch.float32))


def expert_bits(expert_index: Tensor) -> Tensor:
    """[N, H] int32 bit mask of the chosen experts (indices within a row are distinct, so sum == or)."""
    one = torch.ones((), dtype=torch.int32, device=expert_index.device)
    return (one << expert_index.to(torch.int32)).sum(-1, dtype=torch.int32)


def head_order(bits: Tensor, num_experts: int) -> Tensor:
    """[H, N] int64: for each head, the tokens sorted by their expert set."""
    n, h = bits.shape
    heads = torch.arange(h, dtype=torch.int32, device=bits.device).unsqueeze(1)
    key = (heads << num_experts) | bits.t()  # [H, N]; head-major, so one flat sort keeps heads apart
    flat = torch.sort(key.flatten()).indices.view(h, n)  # row h holds h*N + (tokens of head h)
    return flat - heads.to(flat.dtype) * n


def signature_order(bits: Tensor, num_experts: int) -> Tensor:
    """[N] int64: tokens sorted by the expert sets of the first heads that fit a 31-bit key."""
    heads = max(1, min(bits.shape[1], _KEY_BITS // num_experts))
    key = bits[:, 0]
    for h in range(1, heads):
        key = (key << num_experts) | bits[:, h]
    return torch.sort(key).indices


def expert_groups(expert_index: Tensor, gates: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Assignments sorted by (head, expert): token ids [N*H*k], fp32 gates [N*H*k], offsets [H*E+1]."""
    n, h, k = expert_index.shape
    heads = torch.arange(h, dtype=torch.int32, device=expert_index.device).view(1, h, 1)
    key = (heads * num_experts + expert_index.to(torch.int32)).flatten()
    sorted_key, order = torch.sort(key)
    tokens = torch.div(order, h * k, rounding_mode="floor")
    sorted_gates = gates.to(torch.float32).flatten()[order]
    groups = torch.arange(h * num_experts + 1, device=key.device, dtype=sorted_key.dtype)
    offsets = torch.searchsorted(sorted_key, groups)
    return tokens, sorted_gates, offsets
