"""The model zoo every pass is tested on: tiny random-weight configs, built here, no downloads.

Each case builds (model, example args, example kwargs), gives inputs of another shape, and says how
many attention sites the model has and what they look like.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class ZooCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple[tuple, dict]]  # (batch, seq) -> (args, kwargs)
    sites: int
    heads: int
    kv_heads: int
    head_dim: int
    cross_sites: int = 0
    example: tuple[int, int] = (2, 7)
    other: tuple[int, int] = (3, 5)
    head_dim_refusal: str | None = None  # what resizing the heads is refused with (None: it works)
    # Known bugs by what they break ("fold", "compile"): those tests expect a failure (xfail, strict).
    known_bugs: tuple[tuple[str, str], ...] = ()
    # False for cases added for a fold bug whose ops other cases already export: their ONNX tests
    # took 10-15 s each, and CI must stay under 15 minutes.
    onnx: bool = True

    def bug(self, kind: str) -> str | None:
        return dict(self.known_bugs).get(kind)

    def example_inputs(self) -> tuple[tuple, dict]:
        return self.inputs(*self.example)

    def other_inputs(self) -> tuple[tuple, dict]:
        return self.inputs(*self.other)


def zoo_params(cases: list, kind: str) -> list:
    """`cases` (ZooCases, or tuples starting with one) as pytest params, a known bug of `kind`
    marked xfail(strict=True): the test says so when it is fixed."""
    import pytest

    params = []
    for item in cases:
        values = item if isinstance(item, tuple) else (item,)
        reason = values[0].bug(kind)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(*values, marks=marks, id="-".join(str(getattr(v, "name", v)) for v in values)))
    return params


def _tokens(vocab: int, **extra: Callable[[int, int], Any]):
    def make(batch: int, seq: int):
        kwargs = {"input_ids": torch.randint(0, vocab, (batch, seq))}
        kwargs.update({k: f(batch, seq) for k, f in extra.items()})
        return (), kwargs
    return make


def _features(width: int, batch_first: bool = True, memory: int | None = None):
    def make(batch: int, seq: int):
        shape = (batch, seq, width) if batch_first else (seq, batch, width)
        args = (torch.randn(*shape),)
        if memory is not None:
            mem = (batch, seq + 2, width) if batch_first else (seq + 2, batch, width)
            args += (torch.randn(*mem),)
        return args, {}
    return make


def _token_arg(vocab: int):
    def make(batch: int, seq: int):
        return (torch.randint(0, vocab, (batch, seq)),), {}
    return make


def _images(batch: int, _seq: int):
    return (torch.randn(batch, 3, 32, 32),), {}


# ------------------------------------------------------------------------ hand-written modules


class NanoGPTBlockAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused c_attn Linear, split, SDPA with is_causal."""

    def __init__(self, d: int = 48, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 48, heads: int = 4, layers: int = 2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(64, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln_1": nn.LayerNorm(d), "attn": NanoGPTBlockAttention(d, heads),
            "ln_2": nn.LayerNorm(d), "mlp": nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
        }) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = x + block["attn"](block["ln_1"](x))
            x = x + block["mlp"](block["ln_2"](x))
        return self.lm_head(self.ln_f(x))


class EagerAttention(nn.Module):
    """Hand-written eager attention: matmul, scale, masked_fill, softmax, dropout, matmul."""

    def __init__(self, d: int = 40, heads: int = 5):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.drop = nn.Dropout(0.1)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dh)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = self.drop(scores.softmax(-1)) @ v
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class EagerEncoder(nn.Module):
    def __init__(self, d: int = 40, heads: int = 5):
        super().__init__()
        self.layers = nn.ModuleList(EagerAttention(d, heads) for _ in range(2))
        self.norm = nn.LayerNorm(d)

    def forward(self, x, mask):
        for layer in self.layers:
            x = x + layer(self.norm(x), mask)
        return x


def _eager_inputs(batch: int, seq: int):
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, -2:] = False
    return (torch.randn(batch, seq, 40), mask), {}


class BloomStyleAttention(nn.Module):
    """Bloom/Falcon-style: fused QKV interleaved per head ([H, 3, dh]), baddbmm with an ALiBi-like
    per-head bias and the scale as alpha, bmm with the values over merged batch*heads."""

    def __init__(self, d: int = 36, heads: int = 3):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.dense = nn.Linear(d, d)
        slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(heads)])
        self.register_buffer("slopes", slopes)

    def forward(self, x):
        b, t, d = x.shape
        fused = self.qkv(x).view(b, t, self.heads, 3, self.dh)
        q, k, v = (fused[..., i, :].transpose(1, 2).reshape(b * self.heads, t, self.dh) for i in range(3))
        alibi = (self.slopes.view(1, -1, 1, 1) * torch.arange(t, device=x.device).view(1, 1, 1, t))
        alibi = alibi.expand(b, -1, 1, -1).reshape(b * self.heads, 1, t)
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=self.dh ** -0.5)
        out = torch.bmm(scores.softmax(-1), v)
        return self.dense(out.view(b, self.heads, t, self.dh).transpose(1, 2).reshape(b, t, d))


class EinsumMQAAttention(nn.Module):
    """Multi-query attention written with einsum: one K/V head shared by all query heads, the
    scale folded into q before the product, a boolean causal mask through torch.where."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * self.dh, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.dh).transpose(1, 2) * self.dh ** -0.5
        k, v = self.kv(x).split(self.dh, dim=-1)
        k, v = (z.unsqueeze(1).expand(b, self.heads, t, self.dh) for z in (k, v))
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
        out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class FairseqStyleAttention(nn.Module):
    """fairseq's MultiheadAttention: q scaled right after its projection, before the head view
    (as HF OPT and Whisper do), heads merged with the batch into [B*H, T, dh] for bmm."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q = self.q_proj(x) * self.dh ** -0.5

        def heads(z):
            return z.view(b, t, self.heads, self.dh).transpose(1, 2).reshape(b * self.heads, t, self.dh)
        q, k, v = heads(q), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
        return self.out_proj(out.view(b, self.heads, t, self.dh).transpose(1, 2).reshape(b, t, d))


def _stack(block: Callable[[], nn.Module], width: int, layers: int = 2) -> Callable[[], nn.Module]:
    """A pre-norm residual stack of `layers` copies of an attention block."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
            self.attns = nn.ModuleList(block() for _ in range(layers))

        def forward(self, x):
            for norm, attn in zip(self.norms, self.attns):
                x = x + attn(norm(x))
            return x
    return Stack


class MHAWrapper(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool, cross: bool, d: int = 32, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.need_weights, self.cross = need_weights, cross

    def forward(self, x, memory=None):
        kv = memory if self.cross else x
        out, weights = self.attn(x, kv, kv, need_weights=self.need_weights)
        return (out, weights) if self.need_weights else out


# ------------------------------------------------------------------------ library models


def _torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10)


def _timm_vit() -> nn.Module:
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_heads=3, embed_dim=48, num_classes=10)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _llama(layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64))


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_decoder_layers=2, num_heads=4, decoder_start_token_id=0))


def _opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=32))


def _x_transformers(decoder: bool, **attn) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from x_transformers import Decoder, Encoder, TransformerWrapper
        layers = (Decoder if decoder else Encoder)(dim=32, depth=2, heads=4, attn_dim_head=8, **attn)
        return TransformerWrapper(num_tokens=99, max_seq_len=64, attn_layers=layers)
    return build


def _x_transformers_vit() -> nn.Module:
    from x_transformers import Encoder, ViTransformerWrapper
    return ViTransformerWrapper(image_size=32, patch_size=8, num_classes=10,
                                attn_layers=Encoder(dim=32, depth=2, heads=4, attn_dim_head=8))


def _vit_pytorch(rotary: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        if rotary:  # rotary ViT; its depth-wise convolutions replace the q/k/v linears, so they are off
            from vit_pytorch.rvt import RvT
            return RvT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8,
                       use_ds_conv=False)
        from vit_pytorch import ViT
        return ViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8)
    return build


def _timm_swin() -> nn.Module:
    import timm  # one stage of two blocks, the second shifted: 8x8 patches in windows of 4x4
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=4,
                             depths=(2,), num_heads=(4,), embed_dim=32, num_classes=10)


def _vit_pytorch_qk_norm() -> nn.Module:
    from vit_pytorch.simple_vit_with_qk_norm import SimpleViT  # q/k: F.normalize times a per-head gamma [H, 1, dh]
    return SimpleViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8)


def _eval(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Seeded, in eval mode; HF decoders without a KV cache (so outputs compare like for like);
    zero-initialised classifier heads (torchvision's ViT) re-drawn so outputs are not trivially 0."""
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = build().eval()
        for module in model.modules():
            if getattr(getattr(module, "config", None), "use_cache", False):
                module.config.use_cache = False
            if isinstance(module, nn.Linear) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.2)
        return model
    return make


ZOO: list[ZooCase] = [
    ZooCase("mha_self_batch_first", _eval(lambda: MHAWrapper(True, False, False)), _features(32), 1, 4, 4, 8),
    ZooCase("mha_self_seq_first_weights", _eval(lambda: MHAWrapper(False, True, False)), _features(32, False), 1, 4, 4, 8),
    ZooCase("mha_cross_batch_first_weights", _eval(lambda: MHAWrapper(True, True, True)), _features(32, True, 1), 1, 4, 4, 8, 1),
    ZooCase("mha_cross_seq_first", _eval(lambda: MHAWrapper(False, False, True)), _features(32, False, 1), 1, 4, 4, 8, 1),
    ZooCase("transformer_encoder", _eval(lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False)), _features(32), 2, 4, 4, 8),
    ZooCase("transformer_decoder", _eval(lambda: nn.TransformerDecoder(
        nn.TransformerDecoderLayer(32, 4, 64, batch_first=True), 2)), _features(32, True, 1), 4, 4, 4, 8, 2),
    ZooCase("torchvision_vit", _eval(_torchvision_vit), _images, 2, 4, 4, 8),
    ZooCase("timm_vit", _eval(_timm_vit), _images, 2, 3, 3, 16),
    ZooCase("hf_bert", _eval(_bert), _tokens(99, attention_mask=lambda b, t: torch.ones(b, t, dtype=torch.long)), 2, 4, 4, 8),
    ZooCase("hf_gpt2", _eval(_gpt2), _tokens(99), 2, 4, 4, 8),
    ZooCase("hf_llama_gqa", _eval(_llama), _tokens(99), 2, 6, 2, 8),
    ZooCase("hf_t5", _eval(_t5), _tokens(99, decoder_input_ids=lambda b, t: torch.randint(0, 99, (b, t + 1))), 6, 4, 4, 8, 2),
    ZooCase("nanogpt", _eval(NanoGPT), lambda b, t: ((torch.randint(0, 64, (b, t)),), {}), 2, 4, 4, 12),
    ZooCase("eager_attention", _eval(EagerEncoder), _eager_inputs, 2, 5, 5, 8),
    ZooCase("bloom_style_baddbmm", _eval(_stack(BloomStyleAttention, 36)), _features(36), 2, 3, 3, 12),
    ZooCase("einsum_mqa", _eval(_stack(EinsumMQAAttention, 32)), _features(32), 2, 4, 1, 8),
    # Issue 19: third-party architectures, by the class of bug they showed.
    # An example of batch 1 / length 1 (torch.export specialises size-1 dims): timm, HF.
    ZooCase("timm_vit_batch1", _eval(_timm_vit), _images, 2, 3, 3, 16, example=(1, 7)),
    ZooCase("hf_llama_batch1_len1", _eval(lambda: _llama(layers=1)), _tokens(99), 1, 6, 2, 8, example=(1, 1)),
    # Rotary under a disabled-autocast region (export wraps it in a submodule): x-transformers
    # (with grouped KV heads), vit-pytorch's rotary ViT.
    ZooCase("x_transformers_rotary_gqa", _eval(_x_transformers(False, rotary_pos_emb=True, attn_kv_heads=2)),
            _token_arg(99), 2, 4, 2, 8, head_dim_refusal="does not scale with the head size",  # RoPE on 32 dims
            known_bugs=(("compile", "torch.compile(dynamic=True) breaks the graph at the kept autocast-off region "
                                    "of the rotary frequencies (it runs an einsum, so it is not inlined): dynamo's "
                                    "wrap_with_autocast refuses a subgraph with a free symbol ('unexpected freevars': "
                                    "the sequence length, passed or read from a tensor's shape), and duck sizing in "
                                    "the resume function ties the batch to the frequencies' size 2, so it recompiles; the region as "
                                    "a call running its body under torch.autocast compiles once (checked by hand), "
                                    "but save/load, ONNX export and device moves read the HOP"),)),
    ZooCase("vit_pytorch_rvt", _eval(_vit_pytorch(True)), _images, 2, 4, 4, 8,
            head_dim_refusal="does not scale with the head size"),
    # The softmax in a parameter-free child module, fold crashed with AttributeError (x-transformers'
    # Attend, the encoder above too; timm's Swin, nn.Softmax as `softmax`, with a per-head
    # relative position bias).
    ZooCase("x_transformers_decoder", _eval(_x_transformers(True)), _token_arg(99), 2, 4, 4, 8),
    ZooCase("timm_swin", _eval(_timm_swin), _images, 2, 4, 4, 8, onnx=False),
    # Per-head operands fold refused or that the resize must follow: q scaled right after its
    # projection, before the head view (HF OPT, fairseq's layout); q/k L2-normalised and scaled by a
    # per-head gamma (vit-pytorch; detection stopped at the norm, then fold did).
    ZooCase("hf_opt", _eval(_opt), _tokens(99), 2, 4, 4, 8),
    ZooCase("fairseq_style", _eval(_stack(FairseqStyleAttention, 32)), _features(32), 2, 4, 4, 8),
    ZooCase("vit_pytorch_qk_norm", _eval(_vit_pytorch_qk_norm), _images, 2, 4, 4, 8, onnx=False,
            head_dim_refusal="spans the heads or the head size twice"),  # gamma is [H, 1, dh]
    # Images cut into patches (ONNX's second check must not grow the image): vit-pytorch, x-transformers.
    ZooCase("vit_pytorch_vit", _eval(_vit_pytorch(False)), _images, 2, 4, 4, 8),
    ZooCase("x_transformers_vit", _eval(_x_transformers_vit), _images, 2, 4, 4, 8),
]

ZOO_BY_NAME = {case.name: case for case in ZOO}
ONNX_ZOO = [case for case in ZOO if case.onnx]
