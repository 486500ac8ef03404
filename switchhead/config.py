"""The validated, versioned configuration of a SwitchHead rewrite."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

INIT_METHODS = ("upcycle", "random")
CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SwitchHeadConfig:
    """How attention is rewritten into SwitchHead attention.

    Args:
        num_experts: E, V/O experts per head.
        top_k: k, experts active per head and token (1 <= k <= E).
        init: "upcycle" copies each dense head into all of its experts and sets the routers so the
            converted model computes the original function (to float rounding); "random" uses the
            paper's initialisation for training from scratch.
        module_filter: optional regex; only attention whose module path matches (re.search) is
            rewritten. `convert(filter_fn=...)` takes a callable as well.
        init_scale: scale of the random init (paper: 1/sqrt(n_layers)); None -> 1/sqrt(#sites).
        upcycle_router_scale: standard deviation of the upcycled routers' logits on the example
            inputs. Small enough that gates stay equal to float rounding (exact function), non-zero
            so that tokens pick different experts and the identical experts diverge in training.
        verify: compare converted and original outputs on the example inputs (upcycle only).
        verify_rtol: the largest relative error (max |a-b| / max |a|) that verification accepts.
        seed: seed of the random router / expert initialisation (None: torch's global RNG).
        version: version of this config format.
    """

    num_experts: int = 4
    top_k: int = 2
    init: Literal["upcycle", "random"] = "upcycle"
    module_filter: str | None = None
    init_scale: float | None = None
    upcycle_router_scale: float = 1e-6
    verify: bool = True
    verify_rtol: float = 1e-5
    seed: int | None = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")
        if self.module_filter is not None:
            try:
                re.compile(self.module_filter)
            except re.error as exc:
                raise ValueError(f"module_filter is not a valid regular expression: {exc}") from None
        if self.init_scale is not None and not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {self.init_scale!r}")
        if not (math.isfinite(self.upcycle_router_scale) and 0 < self.upcycle_router_scale <= 1e-3):
            raise ValueError(f"upcycle_router_scale must be in (0, 1e-3], got {self.upcycle_router_scale!r}")
        if not (math.isfinite(self.verify_rtol) and self.verify_rtol > 0):
            raise ValueError(f"verify_rtol must be a positive number, got {self.verify_rtol!r}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is not supported (this build reads {CONFIG_VERSION})")

    def resolved_num_experts(self, group_size: int) -> int:
        """E for a site whose new heads each fold `group_size` dense heads."""
        return self.num_experts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SwitchHeadConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SwitchHeadConfig fields: {', '.join(unknown)}")
        return cls(**data)
