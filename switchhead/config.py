"""The validated, versioned configuration of a SwitchHead rewrite."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from switchhead.kernels.choice import IMPLS as EXPERT_IMPLS
from switchhead.errors import ConfigMismatchError

INIT_METHODS = ("upcycle", "random", "fold")
FOLD_QK = ("mean", "first", "fit")
FOLD_ROUTER = ("random", "contribution")
FOLD_GROUPS = ("consecutive", "similar")
DEFAULT_NUM_EXPERTS = 4
CONFIG_VERSION = 1


class ConfigError(ValueError):
    """An invalid config field. `option_message` says the same in the command line's terms (its
    option names), where they differ from the field names."""

    def __init__(self, message: str, field: str, option_message: str | None = None):
        super().__init__(message)
        self.field = field
        self.option_message = option_message or message


def check_regex(name: str, pattern: str, option: str | None = None) -> None:
    """ConfigError naming the field (and the command-line `option`) when `pattern` is not a valid
    regular expression."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{name} is not a valid regular expression: {exc}", name,
                          f"{option} {pattern!r} is not a valid regular expression: {exc}" if option else None) from None


def check_known_fields(cls: type, data: Mapping[str, Any]) -> None:
    """ValueError naming the keys of `data` that are not fields of the dataclass `cls`."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")


@dataclasses.dataclass(frozen=True)
class SwitchHeadConfig:
    """How attention is rewritten into SwitchHead attention.

    Args:
        num_experts: E, V/O experts per head. None: the fold group size with init="fold", else 4.
        top_k: k, experts active per head and token (1 <= k <= E).
        init: "upcycle" copies each dense head into all of its experts and sets the routers so the
            converted model computes the original function (to float rounding); "random" uses the
            paper's initialisation for training from scratch; "fold" turns groups of dense heads
            into the experts of fewer heads (lossy: heal the model afterwards).
        num_heads: heads of every rewritten attention (None: as many as the dense model). Fewer
            heads is where SwitchHead saves compute; needs init="fold" or "random". With GQA it must
            be a multiple of the KV heads (query heads are grouped inside their KV group).
        head_dim: head size of every rewritten attention (None: the dense model's). Only with
            init="random": Q/K projections, V/O experts, the softmax scale (1/sqrt(head_dim) where
            the model used 1/sqrt of its own), RoPE tables and Q/K norms follow it.
        fold_qk: how a group's Q and K heads become one: "mean" of the group (as GQA uptraining
            pools K/V heads), the "first" head of the group, or "fit": Q/K rows whose scores best
            match the mean of the group's scores on the example inputs' activations (least squares;
            where scores are bilinear in the projections: no RoPE, no q/k norm, no GQA; the mean
            elsewhere). Give representative example inputs for "fit".
        fold_groups: which dense heads fold together: "consecutive" heads, or "similar": heads whose
            scores on the example inputs' activations agree (equal-size groups, a local optimum of
            the loss against each group's mean score; where scores are bilinear in the projections
            as for fold_qk="fit", consecutive heads elsewhere, and inside the KV groups with GQA).
        fold_router: how a folded head's routers start: "random" (tiny random logits, gates 1/2, as
            with upcycling) or "contribution": fitted on the example inputs' activations so that each
            token's top-k experts are the group's dense heads that contributed most to it (logits of
            std 0.1, so the order survives the first optimizer steps; passes/fold_route.py). Give
            representative example inputs for "contribution".
        fold_noise: relative std of the noise that tells apart experts copied from the same head
            when num_experts exceeds the fold group size.
        module_filter: optional regex; only attention whose module path matches (re.search) is
            rewritten. `convert(filter_fn=...)` takes a callable as well.
        init_scale: scale of the random init (paper: 1/sqrt(n_layers)); None -> 1/sqrt(#sites).
        upcycle_router_scale: standard deviation of the upcycled routers' logits on the example
            inputs. Small enough that gates stay equal to float rounding (exact function), non-zero
            so that tokens pick different experts and the identical experts diverge in training.
        expert_impl: how the expert ops compute on CUDA: "auto" (the faster of the two for the op and
            shape, by the measured rule in kernels/choice.py), "dense" (all experts through one GEMM,
            gated) or "sparse" (the routed Triton kernels). The CPU always computes densely.
        verify: compare converted and original outputs on the example inputs (upcycle only).
        verify_rtol: the largest relative error ||a-b|| / ||a|| (switchhead.relative_error) that
            verification accepts; None: 1e-5, or twice the rounding error of the model's outputs
            when they are fp16/bf16, times sqrt(number of rewritten attention layers).
        seed: seed of the random router / expert initialisation (None: torch's global RNG).
        version: version of this config format.
    """

    num_experts: int | None = None
    top_k: int = 2
    init: Literal["upcycle", "random", "fold"] = "upcycle"
    num_heads: int | None = None
    head_dim: int | None = None
    fold_qk: Literal["mean", "first", "fit"] = "mean"
    fold_groups: Literal["consecutive", "similar"] = "consecutive"
    fold_router: Literal["random", "contribution"] = "random"
    fold_noise: float = 1e-2
    module_filter: str | None = None
    init_scale: float | None = None
    upcycle_router_scale: float = 1e-6
    expert_impl: Literal["auto", "dense", "sparse"] = "auto"
    verify: bool = True
    verify_rtol: float | None = None
    seed: int | None = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        """Check every field; ConfigError (a ValueError) names the first bad one, in the field's
        terms and in the command line's (`ConfigError.option_message`)."""
        experts, top_k = self.num_experts, self.top_k
        if experts is not None and (not isinstance(experts, int) or experts < 1):
            raise ConfigError(f"num_experts must be a positive integer, got {experts!r}", "num_experts",
                              f"--experts must be at least 1, got {experts}")
        top_k_option = f"--top-k must be between 1 and --experts ({experts or 'E'}), got {top_k}"
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be a positive integer, got {top_k!r}", "top_k", top_k_option)
        if experts is not None and top_k > experts:
            raise ConfigError(f"top_k must be an integer in [1, num_experts={experts}], got {top_k!r}", "top_k",
                              top_k_option)
        if self.init not in INIT_METHODS:
            raise ConfigError(f"init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}", "init")
        if self.num_heads is not None:
            if not isinstance(self.num_heads, int) or self.num_heads < 1:
                raise ConfigError(f"num_heads must be a positive integer, got {self.num_heads!r}", "num_heads",
                                  f"--heads must be at least 1, got {self.num_heads}")
            if self.init == "upcycle":
                raise ConfigError("num_heads changes the model's function: use init='fold' (pretrained) or 'random'",
                                  "num_heads", "--heads changes the model's function: use it with --init fold "
                                  "(pretrained) or --init random")
        if self.head_dim is not None:
            if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 1:
                raise ConfigError(f"head_dim must be a positive integer, got {self.head_dim!r}", "head_dim",
                                  f"--head-dim must be at least 1, got {self.head_dim}")
            if self.init != "random":
                raise ConfigError(f"head_dim changes the heads' size, which init='{self.init}' cannot fill from the "
                                  "dense heads: use init='random' (or leave head_dim unset)", "head_dim",
                                  "--head-dim needs --init random (the dense heads cannot fill heads of another size)")
        if self.num_heads is None and self.init == "fold" and experts is None and top_k > 1:
            raise ConfigError(f"init='fold' needs num_heads (--heads), fewer than the model's heads: without it "
                              f"every head stays its own single expert, fewer than top_k={top_k}", "num_heads")
        if self.fold_qk not in FOLD_QK:
            raise ConfigError(f"fold_qk must be one of {', '.join(FOLD_QK)}, got {self.fold_qk!r}", "fold_qk")
        if self.fold_groups not in FOLD_GROUPS:
            raise ConfigError(f"fold_groups must be one of {', '.join(FOLD_GROUPS)}, got {self.fold_groups!r}",
                              "fold_groups")
        if self.fold_router not in FOLD_ROUTER:
            raise ConfigError(f"fold_router must be one of {', '.join(FOLD_ROUTER)}, got {self.fold_router!r}",
                              "fold_router")
        if not (math.isfinite(self.fold_noise) and 0 <= self.fold_noise < 1):
            raise ConfigError(f"fold_noise must be in [0, 1), got {self.fold_noise!r}", "fold_noise")
        if self.module_filter is not None:
            check_regex("module_filter", self.module_filter, "--filter")
        if self.init_scale is not None and not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ConfigError(f"init_scale must be a positive number, got {self.init_scale!r}", "init_scale")
        if not (math.isfinite(self.upcycle_router_scale) and 0 < self.upcycle_router_scale <= 1e-3):
            raise ConfigError(f"upcycle_router_scale must be in (0, 1e-3], got {self.upcycle_router_scale!r}",
                              "upcycle_router_scale")
        if self.expert_impl not in EXPERT_IMPLS:
            raise ConfigError(f"expert_impl must be one of {', '.join(EXPERT_IMPLS)}, got {self.expert_impl!r}",
                              "expert_impl")
        if self.verify_rtol is not None and not (math.isfinite(self.verify_rtol) and self.verify_rtol > 0):
            raise ConfigError(f"verify_rtol must be a positive number, got {self.verify_rtol!r}", "verify_rtol")
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"config version {self.version} is not supported (this build reads {CONFIG_VERSION})",
                              "version")

    def check_sites(self, sites: Iterable[Any]) -> None:
        """ConfigMismatchError, before any rewrite, when the head count, experts or top_k cannot be
        applied to the attention found (`AttentionSite`s or their report dicts): what detection
        alone tells, so a bad option fails right after capture instead of deep in the rewrite."""
        changes_heads = self.init == "fold" or self.num_heads is not None or self.head_dim is not None
        shapes: dict[tuple[int, int], list[str]] = {}
        for site in sites:
            get = site.get if isinstance(site, Mapping) else lambda key: getattr(site, key)
            shapes.setdefault((get("num_heads"), get("num_kv_heads")), []).append(get("path") or "<root>")
        for (heads, kv_heads), paths in shapes.items():
            where = paths[0] + (f" (and {len(paths) - 1} more like it)" if len(paths) > 1 else "")
            gqa = kv_heads < heads
            choices = [h for h in range(1, heads + 1) if heads % h == 0 and (not gqa or h % kv_heads == 0)]
            new_heads = self.num_heads or heads
            if changes_heads and new_heads not in choices:
                raise ConfigMismatchError(
                    f"num_heads={new_heads} does not fit {where}: its {heads} heads"
                    + (f" ({kv_heads} KV heads)" if gqa else "")
                    + f" fold into {', '.join(map(str, choices))} heads; pick one of those (--heads)")
            group = heads // new_heads if changes_heads else 1
            experts = self.resolved_num_experts(group)
            if self.top_k > experts:
                raise ConfigMismatchError(f"top_k={self.top_k} exceeds the {experts} expert(s) per head of {where}"
                                          + (f" (folding {group} heads into each)" if self.init == "fold" else "")
                                          + "; lower top_k (--top-k) or raise num_experts (--experts)")
            if self.init == "fold" and experts < group:
                raise ConfigMismatchError(f"num_experts={experts} is smaller than the {group} heads folded into each "
                                          f"new head of {where}; use num_experts >= {group} (--experts)")

    def check_declared_heads(self, model: Any) -> None:
        """check_sites on the head counts `model` declares in a Hugging Face-style `config`
        (`num_attention_heads`, `num_key_value_heads`), before any capture: a bad --heads is refused
        as soon as the model is built (SmolLM2-135M from its GGUF: capturing it took 8 s more).
        Nothing is checked when the model declares no head count or a module filter is set. Unknown
        KV heads are checked as none, which only refuses what every KV layout refuses."""
        heads, kv_heads = declared_heads(model)
        if heads is not None and self.module_filter is None:  # a filter may leave those heads out
            self.check_sites([{"path": f"{type(model).__name__}'s config", "num_heads": heads,
                               "num_kv_heads": kv_heads or heads}])

    def resolved_num_experts(self, group_size: int) -> int:
        """E for a site whose new heads each fold `group_size` dense heads."""
        if self.num_experts is not None:
            return self.num_experts
        return group_size if self.init == "fold" else DEFAULT_NUM_EXPERTS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SwitchHeadConfig":
        check_known_fields(cls, data)
        return cls(**data)


def declared_heads(model: Any) -> tuple[int | None, int | None]:
    """(query heads, KV heads) from `model.config` (Hugging Face's `num_attention_heads` and
    `num_key_value_heads`, which its configs map from their own names), None where not declared
    as a positive integer."""
    config = getattr(model, "config", None)

    def count(name: str) -> int | None:
        value = getattr(config, name, None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    heads, kv_heads = count("num_attention_heads"), count("num_key_value_heads")
    return heads, kv_heads if heads is not None and kv_heads is not None and heads % kv_heads == 0 else None
