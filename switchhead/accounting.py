"""What attention costs before and after the SwitchHead rewrite: parameters, MACs, KV cache, memory.

Shape legend: T = query tokens of one sequence, S = source tokens (T for self-attention),
C = 1 + cached chunks (Transformer-XL with one cached chunk: C = 2; keys span (C-1)T + S tokens),
d = width K/V are projected from, dq = width of the query tokens, do = output width,
H = query heads, Hkv = key/value heads, dh = head size, E = experts per head, k = active experts.

Convention of `attention_costs` (one layer, one sequence; "per token" divides by T):
- MACs count weight matmuls and the two attention matmuls (Q K^T, A V). Softmax, scaling, masks,
  RoPE and biases are not counted; parameters are weight matrices only.
- Dense: Q = T dq H dh, K = V = S d Hkv dh, O = T H dh do.
- SwitchHead: Q, K unchanged; V = k S d Hkv dh + k S Hkv dh (k expert outputs, each scaled by its
  gate); O = k T H dh do + k T H dh; routers = S d Hkv E (V, on the source) + T dq H E (O).
- Core: 2 H dh T ((C-1)T + S) in full, as the paper counts it; causal: query i sees (C-1)T + i + 1
  keys, so the T^2 term becomes T(T+1)/2. Cross-attention is never causal.
- Positional projection (Transformer-XL only): 2 C T d H dh MACs, 2 C T H dh floats, d H dh weights.
- Activation memory in floats: Q and the A V output (T H dh each), K and V (S Hkv dh each), scores
  and probabilities (2 H T ((C-1)T + S)), router scores (S Hkv E + T H E), positional (2 C T H dh).
- KV cache: 2 Hkv dh bytes-per-element per token (SwitchHead caches the mixed V: same size).
For the paper's geometries (Hkv = H, dq = do = d) this is the paper's formula term by term except
the routers (the paper counts 2 E d T C, not per head) and SwitchHead's XL positional term (see
`paper_macs`). `paper_macs` / `paper_memory` are the paper's formulas exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class AttentionGeometry:
    """One attention layer, as the accounting sees it.

    Args:
        d: width of the tokens K and V are projected from (the layer input for self-attention).
        num_heads: H, query heads. num_kv_heads: Hkv (default H). head_dim: dh.
        d_out: width of the output projection (default d). d_query: width of the query tokens (default d).
        num_experts: E, V/O experts per head; None for dense attention (E=1 is SwitchHead: its gates count).
        top_k: k, active experts per head and token (ignored when dense).
        cross: cross-attention (never causal; source length may differ).
        positional: Transformer-XL positional projection (the paper's XL runs; off for RoPE).
        chunks: C = 1 + cached chunks the keys span.
        kv_bytes: bytes per element of the KV cache.
    """

    d: int
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    d_out: int | None = None
    d_query: int | None = None
    num_experts: int | None = None
    top_k: int = 1
    cross: bool = False
    positional: bool = False
    chunks: int = 1
    kv_bytes: int = 2

    def __post_init__(self) -> None:
        for name, default in (("num_kv_heads", self.num_heads), ("d_out", self.d), ("d_query", self.d)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name in ("d", "num_heads", "head_dim", "num_kv_heads", "d_out", "d_query", "top_k", "chunks", "kv_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_experts is not None:
            if not isinstance(self.num_experts, int) or self.num_experts < 1:
                raise ValueError(f"num_experts must be None or a positive integer, got {self.num_experts!r}")
            if self.top_k > self.num_experts:
                raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")

    @property
    def moe(self) -> bool:
        return self.num_experts is not None


@dataclasses.dataclass(frozen=True)
class AttentionCosts:
    """Costs of one layer (or a sum of layers) for one sequence of `seq_len` query tokens."""

    seq_len: int
    params_q: int
    params_k: int
    params_v: int
    params_o: int
    params_routers: int
    params_positional: int
    macs_q: int
    macs_k: int
    macs_v: int
    macs_o: int
    macs_positional: int
    macs_routers: int
    macs_core: int  # T^2 terms in full (the paper's count)
    macs_core_causal: int
    kv_cache_bytes_per_token: int
    memory_floats: int  # attention activations

    @property
    def params(self) -> int:
        return (self.params_q + self.params_k + self.params_v + self.params_o + self.params_routers
                + self.params_positional)

    @property
    def macs_projections(self) -> int:
        return self.macs_q + self.macs_k + self.macs_v + self.macs_o + self.macs_positional

    def macs(self, causal: bool = False) -> int:
        return self.macs_projections + self.macs_routers + (self.macs_core_causal if causal else self.macs_core)

    def macs_per_token(self, causal: bool = False) -> float:
        return self.macs(causal) / self.seq_len

    def __add__(self, other: "AttentionCosts") -> "AttentionCosts":
        if not isinstance(other, AttentionCosts):
            return NotImplemented
        if other.seq_len != self.seq_len:
            raise ValueError(f"cannot add costs at seq_len {self.seq_len} and {other.seq_len}")
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        return AttentionCosts(**{**summed, "seq_len": self.seq_len})


def attention_costs(g: AttentionGeometry, seq_len: int, source_len: int | None = None) -> AttentionCosts:
    """Parameters, MACs and memory of one attention layer for a sequence of `seq_len` query tokens.

    `source_len` is the number of new key/value tokens (default `seq_len`; only cross-attention
    should differ). See the module docstring for the convention.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    T = seq_len
    S = T if source_len is None else source_len
    if not isinstance(S, int) or S < 1:
        raise ValueError(f"source_len must be a positive integer, got {source_len!r}")
    H, Hkv, dh, d, dq, do, C = g.num_heads, g.num_kv_heads, g.head_dim, g.d, g.d_query, g.d_out, g.chunks
    E = g.num_experts or 0
    k = g.top_k if g.moe else 1
    keys = (C - 1) * T + S
    causal_pairs = T * keys if g.cross else (C - 1) * T * T + T * (T + 1) // 2
    gate = k if g.moe else 0  # MACs per output element to scale the k expert outputs by their gates

    return AttentionCosts(
        seq_len=T,
        params_q=dq * H * dh,
        params_k=d * Hkv * dh,
        params_v=max(E, 1) * d * Hkv * dh,
        params_o=max(E, 1) * H * dh * do,
        params_routers=E * (d * Hkv + dq * H),
        params_positional=d * H * dh if g.positional else 0,
        macs_q=T * dq * H * dh,
        macs_k=S * d * Hkv * dh,
        macs_v=k * S * d * Hkv * dh + gate * S * Hkv * dh,
        macs_o=k * T * H * dh * do + gate * T * H * dh,
        macs_positional=2 * C * T * d * H * dh if g.positional else 0,
        macs_routers=E * (S * d * Hkv + T * dq * H),
        macs_core=2 * H * dh * T * keys,
        macs_core_causal=2 * H * dh * causal_pairs,
        kv_cache_bytes_per_token=2 * Hkv * dh * g.kv_bytes,
        memory_floats=(2 * T * H * dh + 2 * S * Hkv * dh + 2 * H * T * keys + E * (S * Hkv + T * H)
                       + (2 * C * T * H * dh if g.positional else 0)),
    )


def _check_paper_geometry(g: AttentionGeometry) -> None:
    if g.num_kv_heads != g.num_heads or g.d_out != g.d or g.d_query != g.d or g.cross:
        raise ValueError("the paper's formulas cover self-attention with num_kv_heads == num_heads and "
                         "d_query == d_out == d")


def paper_macs(g: AttentionGeometry, seq_len: int) -> int:
    """MACs of one layer by the paper's formulas (as its tables were computed; T^2 in full).

    Dense: H (4 T d dh + 2 C T^2 dh + 2 C T d dh); SwitchHead: H dh T d (2k+2) + 2 H k T dh
    + 2 H C T^2 dh + 2 E d T C + positional. The `2 C T d dh` positional terms are dropped without
    Transformer-XL. For SwitchHead the positional term is 2 H T d dh, without C: switchhead.md writes
    2 H C T d dh, but only the former reproduces the printed numbers (it is what the authors' table
    script, paper/common.py of RobertCsordas/moe_attention, computes).
    """
    _check_paper_geometry(g)
    H, dh, d, C, T = g.num_heads, g.head_dim, g.d, g.chunks, seq_len
    if not g.moe:
        return H * (4 * T * d * dh + 2 * C * T * T * dh + (2 * C * T * d * dh if g.positional else 0))
    E, k = g.num_experts, g.top_k
    return (H * dh * T * d * (2 * k + 2) + 2 * H * k * T * dh + 2 * H * C * T * T * dh + 2 * E * d * T * C
            + (2 * H * T * d * dh if g.positional else 0))


def paper_memory(g: AttentionGeometry, seq_len: int) -> int:
    """Attention activation memory of one layer in floats by the paper's formulas.

    Dense: H (4 T dh + 2 C T^2 + 2 C T dh); SwitchHead: H (4 T dh + 2 C T^2) + 2 E T C + 2 H T dh
    (positional term without C, as for `paper_macs`). Positional terms only with Transformer-XL.
    """
    _check_paper_geometry(g)
    H, dh, C, T = g.num_heads, g.head_dim, g.chunks, seq_len
    if not g.moe:
        return H * (4 * T * dh + 2 * C * T * T + (2 * C * T * dh if g.positional else 0))
    return H * (4 * T * dh + 2 * C * T * T) + 2 * g.num_experts * T * C + (2 * H * T * dh if g.positional else 0)


# PyTorch's fast SDPA kernels (flash / cuDNN / memory-efficient on CUDA) take head sizes that are
# multiples of 8 up to 256; other sizes fall back to slower kernels: on an H200 (bf16, causal, fwd+bwd,
# same tokens, 2026-12-03) H=4 dh=112 ran at 285-397 TFLOP/s, H=2 dh=76 and dh=132 at 26-135 (3-5x
# slower per FLOP).
FAST_HEAD_DIM_MULTIPLE = 8
FAST_HEAD_DIM_MAX = 256


def fast_attention_head_dim(head_dim: int) -> bool:
    """Whether PyTorch's fast SDPA kernels take this head size (a multiple of 8, at most 256)."""
    return head_dim % FAST_HEAD_DIM_MULTIPLE == 0 and 0 < head_dim <= FAST_HEAD_DIM_MAX


def nearest_fast_head_dims(head_dim: int) -> tuple[int, ...]:
    """The fast head sizes either side of `head_dim` (one of them when it is out of range)."""
    m = FAST_HEAD_DIM_MULTIPLE
    below, above = head_dim // m * m, -(-head_dim // m) * m
    return tuple(dict.fromkeys(x for x in (below, above) if 0 < x <= FAST_HEAD_DIM_MAX)) or (FAST_HEAD_DIM_MAX,)


def head_dim_note(dense_head_dim: int, head_dim: int) -> str | None:
    """A one-line warning when the converted head size leaves the fast SDPA kernels, else None (also when
    the conversion keeps a dense head size that was never on them: nothing was chosen there)."""
    if fast_attention_head_dim(head_dim) or head_dim == dense_head_dim:
        return None
    was = " (the dense model's %d is)" % dense_head_dim if fast_attention_head_dim(dense_head_dim) else ""
    sizes = " or ".join(str(x) for x in nearest_fast_head_dims(head_dim))
    return (f"head size {head_dim} is not on PyTorch's fast SDPA path{was}: flash/cuDNN attention needs a multiple "
            f"of {FAST_HEAD_DIM_MULTIPLE} up to {FAST_HEAD_DIM_MAX}, and other sizes ran 3-5x slower per FLOP on an "
            f"H200; choose head_dim={sizes}")


@dataclasses.dataclass(frozen=True)
class SiteCosts:
    """One rewritten site: its geometry and costs before (dense) and after (SwitchHead)."""

    path: str
    dense: AttentionGeometry
    switchhead: AttentionGeometry
    before: AttentionCosts
    after: AttentionCosts


def site_geometry(site: Mapping[str, Any], kv_bytes: int = 2) -> AttentionGeometry:
    """The dense geometry of an `AttentionSite.to_dict()`."""
    return AttentionGeometry(d=site["embed_dim"], num_heads=site["num_heads"], head_dim=site["head_dim"],
                             num_kv_heads=site["num_kv_heads"], d_out=site["out_dim"], d_query=site["query_dim"],
                             cross=bool(site["cross"]), kv_bytes=kv_bytes)


def site_costs(site: Mapping[str, Any], num_experts: int, top_k: int, seq_len: int, *,
               num_heads: int | None = None, head_dim: int | None = None, num_kv_heads: int | None = None,
               source_len: int | None = None, kv_bytes: int = 2) -> SiteCosts:
    """Before/after costs of one site (an `AttentionSite.to_dict()`) rewritten with E experts, top-k.

    `num_heads` / `head_dim` give the SwitchHead side's heads when they change (default: unchanged).
    KV heads default to min(Hkv, new H): query heads are folded inside a KV group first, then KV
    heads fold with them.
    """
    dense = site_geometry(site, kv_bytes)
    heads = dense.num_heads if num_heads is None else num_heads
    kv_heads = min(dense.num_kv_heads, heads) if num_kv_heads is None else num_kv_heads
    switch = dataclasses.replace(dense, num_heads=heads, num_kv_heads=kv_heads,
                                 head_dim=dense.head_dim if head_dim is None else head_dim,
                                 num_experts=num_experts, top_k=top_k)
    return SiteCosts(path=site["path"], dense=dense, switchhead=switch,
                     before=attention_costs(dense, seq_len, source_len),
                     after=attention_costs(switch, seq_len, source_len))


def totals(sites: Iterable[SiteCosts]) -> tuple[AttentionCosts, AttentionCosts]:
    """(before, after) summed over sites."""
    sites = list(sites)
    if not sites:
        raise ValueError("totals() needs at least one site")
    before, after = sites[0].before, sites[0].after
    for site in sites[1:]:
        before, after = before + site.before, after + site.after
    return before, after


def format_count(value: float, unit: str = "") -> str:
    """1234 -> '1.23K', 2.4e9 -> '2.40G' (three significant digits)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def _ratio(before: float, after: float) -> str:
    if before == 0:
        return "new" if after else "-"
    return f"{after / before:.2f}x"


def format_table(before: AttentionCosts, after: AttentionCosts) -> list[tuple[str, str, str, str]]:
    """Rows (label, before, after, after/before) of a before/after comparison, as plain text."""
    T = before.seq_len
    rows = [
        ("parameters (attention weights)", before.params, after.params, ""),
        (f"MACs/token, projections (T={T})", before.macs_projections / T, after.macs_projections / T, ""),
        ("MACs/token, attention core (full T^2)", before.macs_core / T, after.macs_core / T, ""),
        ("MACs/token, attention core (causal)", before.macs_core_causal / T, after.macs_core_causal / T, ""),
        ("MACs/token, routers", before.macs_routers / T, after.macs_routers / T, ""),
        ("MACs/token, total (full T^2)", before.macs_per_token(), after.macs_per_token(), ""),
        ("MACs/token, total (causal)", before.macs_per_token(True), after.macs_per_token(True), ""),
        ("KV cache per token", before.kv_cache_bytes_per_token, after.kv_cache_bytes_per_token, "B"),
        (f"attention activations (floats, T={T})", before.memory_floats, after.memory_floats, ""),
    ]
    return [(label, format_count(b, unit), format_count(a, unit), _ratio(b, a)) for label, b, a, unit in rows]

