"""A generator of plain-torch multi-head attention modules, for the property tests of issue 9.

A `Spec` (a frozen dataclass, printed by hypothesis when a property fails) describes one attention
module; `build(spec)` writes it as an nn.Module and `inputs(spec, batch, seq)` gives its inputs.
The knobs are the ways real models write attention (see issue 2 / issue 9):

    projections   separate Q/K/V, or one fused linear ("split" [q|k|v], "3hd" [3, H, dh], "grouped"
                  [G, H/G + 2, dh], the per-head interleave of Bloom/Falcon; for cross-attention a
                  fused K/V linear on the memory)
    heads         H query heads, G KV heads (G | H; G = 1 is MQA), expanded by repeat_interleave,
                  expand + reshape (Llama's repeat_kv), SDPA's enable_gqa, or matmul broadcasting
    core          SDPA, matmul, einsum, bmm over [B*H, T, dh], baddbmm with the scale as alpha, bmm
                  with the scores viewed [B, H, T, S] around the softmax (HF Bloom)
    scale         SDPA default / q scaled before the product / scores scaled or divided after /
                  q and k each by dh^-1/4 / none (T5)
    masks         additive float input, boolean key padding input, causal (flag or built tril)
    extras        q/k LayerNorm per head or over the full width, nn.RMSNorm per head, RoPE, clamps, tanh soft-capping of
                  the scores, a learned positional bias on the scores
    layout        batch_first or [T, B, d]; cross-attention on a memory of another length and width
    blocks        1-2 attention calls, either separate modules or one module called twice
    example       the (batch, length) of the example inputs: also batch 1 and length 1, which
                  torch.export would specialise (issue 19); checked at another shape either way
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

MAX_LEN = 32  # RoPE tables and positional biases are sliced from buffers of this length


@dataclasses.dataclass(frozen=True)
class Spec:
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 4
    d_model: int = 8
    d_memory: int = 8
    proj: str = "separate"  # separate | fused
    layout: str = "split"  # split | 3hd | grouped  (fused projections only)
    qkv_bias: bool = True
    o_bias: bool = True
    core: str = "sdpa"  # sdpa | matmul | einsum | bmm | baddbmm | bmm4 (bmm, scores viewed 4-D)
    gqa: str = "repeat_interleave"  # repeat_interleave | expand | sdpa_gqa | broadcast
    scale: str = "default"  # default | before | after | div_after | qk_quarter | none
    mask: str = "none"  # none | additive | bool | causal_flag | causal_fill
    dropout: bool = False
    extras: tuple[str, ...] = ()  # qk_norm_head | qk_norm_full | qk_rms_head | rope | clamp | softcap | pos_bias
    batch_first: bool = True
    cross: bool = False
    blocks: int = 1
    shared: bool = False
    num_experts: int = 4
    top_k: int = 2
    example: tuple[int, int] = (2, 5)  # (batch, length) of the example inputs

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


# ------------------------------------------------------------------------------------ strategy


EXAMPLES = ((2, 5), (1, 5), (2, 1), (1, 1))  # (batch, length); size 1 is what torch.export specialises
CORES = ("sdpa", "matmul", "einsum", "bmm", "baddbmm", "bmm4")
EXTRAS = ("qk_norm_head", "qk_norm_full", "qk_rms_head", "rope", "clamp", "softcap", "pos_bias")
SCALES = ("default", "before", "after", "div_after", "qk_quarter", "none")


def spec_from(choose: Callable[[Sequence], Any], cores: tuple[str, ...] = CORES) -> Spec:
    """Attention written with one of `cores`, every knob picked by `choose(options)`."""
    heads = choose((1, 2, 3, 4))
    kv_heads = choose([g for g in range(1, heads + 1) if heads % g == 0])
    head_dim = choose((2, 4, 6))
    core = choose(cores)
    cross = choose((False, True))
    proj = choose(("separate", "fused"))
    layouts = ["split", "grouped"] + (["3hd"] if kv_heads == heads else [])
    gqa_modes = ["repeat_interleave", "expand"] + (["sdpa_gqa"] if core == "sdpa" else []) \
        + (["broadcast"] if core in ("matmul", "einsum") and kv_heads == 1 else [])
    masks = ["none", "additive", "bool", "causal_fill"] + (["causal_flag"] if core == "sdpa" else [])
    extras = tuple(sorted({choose(EXTRAS) for _ in range(choose((0, 1, 2)))}))
    layout = choose(layouts)
    if core == "sdpa":
        extras = tuple(e for e in extras if e not in ("softcap", "pos_bias"))  # SDPA has no hook for them
    if proj == "fused" and layout != "split":
        extras = tuple(e for e in extras if e != "qk_norm_full")  # q, k come out of the fusion per head
    num_experts = choose((1, 2, 3, 4))
    return Spec(
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        d_model=choose((heads * head_dim, 6, 10)), d_memory=choose((6, 10)),
        proj=proj, layout=layout, qkv_bias=choose((False, True)), o_bias=choose((False, True)),
        core=core, gqa=choose(gqa_modes), scale=choose(SCALES), mask=choose(masks),
        dropout=choose((False, True)), extras=extras, batch_first=choose((False, True)), cross=cross,
        blocks=choose((1, 1, 2)), shared=choose((False, True)),
        num_experts=num_experts, top_k=choose(range(1, num_experts + 1)), example=choose(EXAMPLES),
    )


@st.composite
def specs(draw, cores: tuple[str, ...] = CORES) -> Spec:
    return spec_from(lambda options: draw(st.sampled_from(options)), cores)


def covering_specs(cores: tuple[str, ...], pool: int = 400) -> list[Spec]:
    """A few specs that together have every feature of all_features(cores), picked greedily (most
    new features first) from seeded random specs: coverage that does not hang on what hypothesis
    happens to draw."""
    rng = random.Random(0)
    candidates = [spec_from(lambda options: options[rng.randrange(len(options))], cores) for _ in range(pool)]
    wanted, chosen = all_features(cores), []
    while wanted:
        best = max(candidates, key=lambda spec: len(features(spec) & wanted))
        if not features(best) & wanted:
            raise AssertionError(f"no spec of {cores} has {sorted(wanted)}")
        chosen.append(best)
        wanted -= features(best)
    return chosen


def features(spec: Spec) -> set[str]:
    """The knobs `spec` exercises, as "knob=value" (what the property tests must cover)."""
    found = {f"core={spec.core}", f"proj={spec.proj}", f"scale={spec.scale}", f"mask={spec.mask}",
             f"qkv_bias={spec.qkv_bias}", f"o_bias={spec.o_bias}", f"dropout={spec.dropout}",
             f"batch_first={spec.batch_first}", f"cross={spec.cross}", *(f"extra={e}" for e in spec.extras),
             "example={}x{}".format(*spec.example)}
    if spec.proj == "fused":
        grouped = "[H,3,dh]" if spec.kv_heads == spec.heads else "[G,H/G+2,dh]"
        found.add("layout=" + {"split": "[q|k|v]", "3hd": "[3,H,dh]", "grouped": grouped}[spec.layout])
    if spec.kv_heads < spec.heads:
        found |= {f"gqa={spec.gqa}", "heads=mqa" if spec.kv_heads == 1 else "heads=gqa"}
    if spec.blocks > 1:
        found.add("blocks=shared" if spec.shared else "blocks=2")
    return found


def all_features(cores: tuple[str, ...]) -> set[str]:
    """Every feature `specs(cores)` can draw (sdpa has its own GQA and causal forms, and no score hooks)."""
    eager = set(cores) - {"sdpa"}
    extras = set(EXTRAS) - (set() if eager else {"softcap", "pos_bias"})
    gqa = {"repeat_interleave", "expand"} | ({"sdpa_gqa"} if "sdpa" in cores else set()) \
        | ({"broadcast"} if eager & {"matmul", "einsum"} else set())
    masks = {"none", "additive", "bool", "causal_fill"} | ({"causal_flag"} if "sdpa" in cores else set())
    return ({f"core={c}" for c in cores} | {f"extra={e}" for e in extras} | {f"gqa={g}" for g in gqa}
            | {f"mask={m}" for m in masks} | {f"scale={s}" for s in SCALES}
            | {f"{knob}={value}" for knob in ("qkv_bias", "o_bias", "dropout", "batch_first", "cross")
               for value in (True, False)}
            | {"proj=separate", "proj=fused", "layout=[q|k|v]", "layout=[3,H,dh]", "layout=[H,3,dh]",
               "layout=[G,H/G+2,dh]", "heads=mqa", "heads=gqa", "blocks=2", "blocks=shared"}
            | {"example={}x{}".format(*e) for e in EXAMPLES})


# ------------------------------------------------------------------------------------- modules


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class GeneratedAttention(nn.Module):
    """One attention layer written as `spec` says. forward(x, memory, mask) -> same shape as x."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = s = spec
        kv_in = s.d_memory if s.cross else s.d_model
        if s.proj == "fused" and not s.cross:
            self.qkv = nn.Linear(s.d_model, s.width + 2 * s.kv_width, bias=s.qkv_bias)
        elif s.proj == "fused":
            self.q = nn.Linear(s.d_model, s.width, bias=s.qkv_bias)
            self.kv = nn.Linear(kv_in, 2 * s.kv_width, bias=s.qkv_bias)
        else:
            self.q = nn.Linear(s.d_model, s.width, bias=s.qkv_bias)
            self.k = nn.Linear(kv_in, s.kv_width, bias=s.qkv_bias)
            self.v = nn.Linear(kv_in, s.kv_width, bias=s.qkv_bias)
        self.o = nn.Linear(s.width, s.d_model, bias=s.o_bias)
        if "qk_norm_head" in s.extras:
            self.q_norm, self.k_norm = nn.LayerNorm(s.head_dim), nn.LayerNorm(s.head_dim)
        if "qk_rms_head" in s.extras:
            self.q_rms, self.k_rms = nn.RMSNorm(s.head_dim), nn.RMSNorm(s.head_dim)
        if "qk_norm_full" in s.extras:
            self.q_norm_full, self.k_norm_full = nn.LayerNorm(s.width), nn.LayerNorm(s.kv_width)
        if "rope" in s.extras:
            inv = 1.0 / (10000 ** (torch.arange(0, s.head_dim, 2).float() / s.head_dim))
            angles = torch.outer(torch.arange(MAX_LEN).float(), inv)
            angles = torch.cat((angles, angles), dim=-1)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
        if "pos_bias" in s.extras:
            self.pos_bias = nn.Parameter(torch.randn(s.heads, MAX_LEN, MAX_LEN) * 0.5)

    # -- projections: x [B, T, d] (or [T, B, d]) -> [B, heads, T, dh]

    def _heads(self, y: torch.Tensor, heads: int) -> torch.Tensor:
        lead = y.shape[:-1]
        y = y.reshape(*lead, heads, self.spec.head_dim)
        return y.transpose(1, 2) if self.spec.batch_first else y.permute(1, 2, 0, 3)

    def _project(self, x: torch.Tensor, src: torch.Tensor):
        s = self.spec
        if s.proj == "separate":
            q, k, v = self.q(x), self.k(src), self.v(src)
        elif not s.cross:
            fused = self.qkv(x)
            q, k, v = self._unfuse(fused, s.heads, (s.width, s.kv_width, s.kv_width))
        else:
            q = self.q(x)
            k, v = self._unfuse(self.kv(src), 0, (s.kv_width, s.kv_width))
        if "qk_norm_full" in s.extras:  # the strategy keeps this to un-split q and k
            q, k = self.q_norm_full(q), self.k_norm_full(k)
        # non-split fused layouts come back already [B, heads, T, dh]
        return tuple(z if z.dim() == 4 else self._heads(z, n) for z, n in ((q, s.heads), (k, s.kv_heads), (v, s.kv_heads)))

    def _unfuse(self, fused: torch.Tensor, heads: int, sizes: tuple[int, ...]):
        """Split a fused projection output; non-split layouts come back already per head."""
        s = self.spec
        if s.layout == "split":
            return fused.split(list(sizes), dim=-1)
        lead, dh, g = fused.shape[:-1], s.head_dim, s.kv_heads
        if s.layout == "3hd":  # [..., parts, G, dh]: all of q, then all of k, then all of v (G == H)
            parts = fused.view(*lead, len(sizes), g, dh).unbind(-3)
            return tuple(self._heads_from4(p) for p in parts)
        # grouped: [..., G, H/G (+q) ..., k, v, dh], the per-KV-group interleave (Falcon / Bloom)
        per = heads // g if heads else 0
        grouped = fused.view(*lead, g, per + 2, dh)
        k, v = self._heads_from4(grouped[..., per, :]), self._heads_from4(grouped[..., per + 1, :])
        if not heads:
            return k, v
        q = self._heads_from4(grouped[..., :per, :].reshape(*lead, g * per, dh))
        return q, k, v

    def _heads_from4(self, y: torch.Tensor) -> torch.Tensor:
        return y.transpose(1, 2) if self.spec.batch_first else y.permute(1, 2, 0, 3)

    # -- the core

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        s = self.spec
        src = memory if s.cross else x
        q, k, v = self._project(x, src)  # [B, H, T, dh], [B, G, S, dh] x2
        t, length = q.shape[2], k.shape[2]
        if "qk_norm_head" in s.extras:
            q, k = self.q_norm(q), self.k_norm(k)
        if "qk_rms_head" in s.extras:
            q, k = self.q_rms(q), self.k_rms(k)
        if "rope" in s.extras:
            cos_q, sin_q = self.cos[:t], self.sin[:t]
            cos_k, sin_k = self.cos[:length], self.sin[:length]
            q = q * cos_q + _rotate_half(q) * sin_q
            k = k * cos_k + _rotate_half(k) * sin_k
        if "clamp" in s.extras:
            q, k = q.clamp(-50.0, 50.0), k.clamp(min=-50.0)
        scale = s.head_dim ** -0.5
        if s.scale == "before":
            q = q * scale
        elif s.scale == "qk_quarter":
            q, k = q * s.head_dim ** -0.25, k * s.head_dim ** -0.25
        k, v = self._expand_kv(k), self._expand_kv(v)
        dropout_p = 0.1 if self.training else 0.0
        if s.core == "sdpa":
            out = self._sdpa(q, k, v, mask, dropout_p, scale, t, length)
        else:
            out = self._eager(q, k, v, mask, scale, t, length)
        b = out.shape[0]
        if s.batch_first:
            merged = out.transpose(1, 2).reshape(b, t, s.width)
        else:
            merged = out.permute(2, 0, 1, 3).reshape(t, b, s.width)
        return self.o(merged)

    def _expand_kv(self, z: torch.Tensor) -> torch.Tensor:
        s = self.spec
        rep = s.heads // s.kv_heads
        if rep == 1 or s.gqa in ("sdpa_gqa", "broadcast"):
            return z
        if s.gqa == "repeat_interleave":
            return z.repeat_interleave(rep, dim=1)
        b, g, n, dh = z.shape  # Llama's repeat_kv
        return z[:, :, None].expand(b, g, rep, n, dh).reshape(b, g * rep, n, dh)

    def _bool_mask(self, mask, t: int, length: int, device) -> torch.Tensor | None:
        """True where a query may attend to a key, broadcastable to [B, H, T, S]."""
        s = self.spec
        if s.mask == "bool":
            return mask[:, None, None, :]
        if s.mask == "causal_fill":
            return torch.ones(t, length, dtype=torch.bool, device=device).tril(length - t)
        return None

    def _sdpa(self, q, k, v, mask, dropout_p, scale, t, length):
        s = self.spec
        kwargs = {}
        if s.scale in ("before", "qk_quarter", "none"):
            kwargs["scale"] = 1.0
        elif s.scale in ("after", "div_after"):
            kwargs["scale"] = scale  # SDPA has no 'after': the scale is a kwarg either way
        if s.gqa == "sdpa_gqa" and s.heads != s.kv_heads:
            kwargs["enable_gqa"] = True
        if s.mask == "additive":
            kwargs["attn_mask"] = mask
        elif s.mask in ("bool", "causal_fill"):
            kwargs["attn_mask"] = self._bool_mask(mask, t, length, q.device)
        elif s.mask == "causal_flag":
            kwargs["is_causal"] = True
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **kwargs)

    def _eager(self, q, k, v, mask, scale, t, length):
        s = self.spec
        b, h, _, dh = q.shape
        merged = s.core in ("bmm", "baddbmm", "bmm4")  # the product over [B*H, T, dh], as MHA and Bloom
        scale_after = s.scale
        if merged:
            q3 = q.reshape(b * h, t, dh)
            k3 = k.expand(b, h, length, dh).reshape(b * h, length, dh)
            v3 = v.expand(b, h, length, dh).reshape(b * h, length, dh)
            if s.core == "baddbmm":
                alpha = scale if s.scale in ("default", "after") else 1.0
                scale_after = None if s.scale in ("default", "after") else s.scale
                base = torch.zeros(b * h, t, length, dtype=q.dtype, device=q.device)
                scores = torch.baddbmm(base, q3, k3.transpose(1, 2), alpha=alpha)
            else:
                scores = torch.bmm(q3, k3.transpose(1, 2))
            if s.core == "bmm4":  # HF Bloom: scores viewed [B, H, T, S] for masking and softmax
                scores = scores.view(b, h, t, length)
        elif s.core == "einsum" and k.shape[1] == 1 and h > 1:  # MQA by broadcasting: k, v [B, S, dh]
            scores = torch.einsum("bhqd,bkd->bhqk", q, k[:, 0])
        elif s.core == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            scores = q @ k.transpose(-2, -1)

        def fit(term: torch.Tensor) -> torch.Tensor:  # a [.., T, S] term in the scores' layout
            return term.expand(b, h, t, length).reshape(b * h, t, length) if scores.dim() == 3 else term

        if scale_after in ("default", "after"):
            scores = scores * scale
        elif scale_after == "div_after":
            scores = scores / math.sqrt(dh)
        if "softcap" in s.extras:
            scores = 5.0 * torch.tanh(scores / 5.0)
        if "pos_bias" in s.extras:
            scores = scores + fit(self.pos_bias[:, :t, :length])
        if s.mask == "additive":
            scores = scores + fit(mask)
        keep = self._bool_mask(mask, t, length, q.device)
        if keep is not None:
            scores = scores.masked_fill(~fit(keep), float("-inf"))
        weights = scores.softmax(dim=-1)
        if s.dropout:
            weights = F.dropout(weights, p=0.1, training=self.training)
        if merged:
            weights = weights.reshape(b * h, t, length) if weights.dim() == 4 else weights
            out = torch.bmm(weights, v3).view(b, h, t, dh)
        elif s.core == "einsum" and v.shape[1] == 1 and h > 1:
            out = torch.einsum("bhqk,bkd->bhqd", weights, v[:, 0])
        elif s.core == "einsum":
            out = torch.einsum("bhqk,bhkd->bhqd", weights, v)
        else:
            out = weights @ v
        return out


class GeneratedModel(nn.Module):
    """`spec.blocks` residual attention calls; `shared` calls one module for all of them."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        count = 1 if spec.shared else spec.blocks
        self.attns = nn.ModuleList(GeneratedAttention(spec) for _ in range(count))

    def forward(self, x, memory=None, mask=None):
        for i in range(self.spec.blocks):
            attn = self.attns[0 if self.spec.shared else i]
            x = x + attn(x, memory, mask)
        return x


def build(spec: Spec, seed: int = 0) -> GeneratedModel:
    torch.manual_seed(seed)
    return GeneratedModel(spec).eval()


def inputs(spec: Spec, batch: int, seq: int, seed: int = 1) -> tuple[tuple, dict]:
    """(args, kwargs) for `spec` at batch `batch` and query length `seq` (memory: seq + 2)."""
    g = torch.Generator().manual_seed(seed)
    length = seq + 2 if spec.cross else seq
    x_shape = (batch, seq, spec.d_model) if spec.batch_first else (seq, batch, spec.d_model)
    args = [torch.randn(*x_shape, generator=g)]
    m_shape = (batch, length, spec.d_memory) if spec.batch_first else (length, batch, spec.d_memory)
    args.append(torch.randn(*m_shape, generator=g) if spec.cross else None)
    if spec.mask == "additive":
        args.append(torch.randn(batch, 1, seq, length, generator=g))
    elif spec.mask == "bool":
        keep = torch.rand(batch, length, generator=g) > 0.3
        keep[:, 0] = True  # every query keeps a key: no all -inf rows
        args.append(keep)
    kwargs = {}
    if len(args) == 3:
        kwargs["mask"] = args.pop()
    if args[-1] is None:
        args.pop()
    else:
        kwargs["memory"] = args.pop()
    return tuple(args), kwargs


# ------------------------------------------------------------------------------------- checking


def examples(ci_count: int) -> int:
    """Examples of a property test: its CI count, or SWITCHHEAD_HYPOTHESIS_EXAMPLES for soak runs."""
    import os

    return int(os.environ.get("SWITCHHEAD_HYPOTHESIS_EXAMPLES", "0")) or ci_count


OTHER_SHAPE = (3, 7)
TOLERANCE = 1e-5


@dataclasses.dataclass
class Outcome:
    """What convert did with a generated model: the sites it rewrote, what it skipped and why."""

    sites: list[dict]
    skipped: list[dict]
    error_other_shape: float | None = None


def _uncached_fake_tensors():
    """Capture without torch's fake-tensor dispatch cache: a generated module is traced once, with
    symbolic sizes of its own, so no entry is ever hit again, and making them is a third of the
    capture's time (0.70 -> 0.49 s of CPU per example)."""
    import torch._dynamo.config

    return torch._dynamo.config.patch(fake_tensor_cache_enabled=False)


def check(spec: Spec) -> Outcome:
    """Convert (upcycle) the model of `spec`; the property of issue 9 on it.

    Every attention call is either rewritten or reported skipped with a reason; a rewritten model
    computes the original function to TOLERANCE at the example shape (convert's own verification;
    a VerificationError propagates: it is a wrong rewrite) and at another shape (also after a
    batch-1 or length-1 example).
    """
    import switchhead

    model = build(spec)
    args, kwargs = inputs(spec, *spec.example)
    config = switchhead.SwitchHeadConfig(num_experts=spec.num_experts, top_k=spec.top_k)
    try:
        with _uncached_fake_tensors():
            converted = switchhead.convert(model, args, kwargs, config=config)
    except switchhead.NoAttentionError:
        with _uncached_fake_tensors():
            analysis = switchhead.analyze(model, args, kwargs)
        assert not analysis.sites
        outcome = Outcome([], [s.to_dict() for s in analysis.skipped])
    else:
        report = switchhead.report_of(converted)
        outcome = Outcome(report.sites, report.skipped)
        assert report.verify_max_error is not None and report.verify_max_error <= TOLERANCE
        other_args, other_kwargs = inputs(spec, *OTHER_SHAPE, seed=2)
        with torch.no_grad():
            want, got = model(*other_args, **other_kwargs), converted(*other_args, **other_kwargs)
        outcome.error_other_shape = switchhead.max_relative_error(want, got)
        assert outcome.error_other_shape <= TOLERANCE, f"wrong rewrite at another shape: {outcome.error_other_shape:.3g}"
    assert len(outcome.sites) + len(outcome.skipped) == spec.blocks, (outcome.sites, outcome.skipped)
    assert all(s["reason"].strip() for s in outcome.skipped)
    for site in outcome.sites:
        assert (site["num_heads"], site["num_kv_heads"], site["head_dim"], site["cross"]) == (
            spec.heads, spec.kv_heads, spec.head_dim, spec.cross), site
    return outcome
