"""The conversion report: what was found, skipped, rewritten and verified. Goes with every output."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
from typing import Any

import torch

from switchhead.site import AttentionSite, SkippedSite


@dataclasses.dataclass
class ConversionReport:
    sites: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    config: dict[str, Any]
    dynamic_shapes: bool
    static_reason: str | None
    rewrites: int
    verify_max_error: float | None
    parameters_before: int
    parameters_after: int
    versions: dict[str, str]
    notes: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def build(cls, sites: list[AttentionSite], skipped: list[SkippedSite], plans: list, **fields: Any) -> "ConversionReport":
        """`plans`: the SitePlan applied to each site (its new head counts and experts)."""
        described = []
        for site, plan in zip(sites, plans):
            entry = site.to_dict()
            entry.update(new_num_heads=plan.num_heads, new_num_kv_heads=plan.num_kv_heads,
                         num_experts=int(plan.weights.v_experts.shape[1]))
            described.append(entry)
        return cls(sites=described, skipped=[s.to_dict() for s in skipped], versions=versions(), **fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("switchhead-rewrite", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
