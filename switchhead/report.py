"""The conversion report: what was found, skipped, rewritten and verified. Goes with every output."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
from typing import Any

import torch

from switchhead import accounting
from switchhead.site import AttentionSite, SkippedSite

DEFAULT_COST_SEQ_LEN = 2048


@dataclasses.dataclass
class ConversionReport:
    sites: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    config: dict[str, Any]
    dynamic_shapes: bool
    static_reason: str | None
    rewrites: int
    verify_max_error: float | None  # max |a-b| / max |a| on the example inputs (shown, not checked)
    verify_rtol: float | None  # the limit verification applied to verify_error (None: not checked)
    parameters_before: int
    parameters_after: int
    versions: dict[str, str]
    notes: list[str] = dataclasses.field(default_factory=list)
    costs: dict[str, Any] = dataclasses.field(default_factory=dict)  # at DEFAULT_COST_SEQ_LEN
    # input name -> its dims that are dynamic in the converted graph (others are fixed at the example's)
    dynamic_dims: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    widened: list[str] = dataclasses.field(default_factory=list)  # size-1 example dims captured at 2
    verify_error: float | None = None  # ||a-b|| / ||a||, what verification checks (None: not checked)

    @classmethod
    def build(cls, sites: list[AttentionSite], skipped: list[SkippedSite], plans: list, **fields: Any) -> "ConversionReport":
        """`plans`: the SitePlan applied to each site (its new head counts and experts)."""
        described = []
        for site, plan in zip(sites, plans):
            entry = site.to_dict()
            entry.update(new_num_heads=plan.num_heads, new_num_kv_heads=plan.num_kv_heads,
                         new_head_dim=int(plan.weights.o_experts.shape[2]),
                         num_experts=int(plan.weights.v_experts.shape[1]),
                         kv_bytes=plan.weights.v_experts.element_size())
            described.append(entry)
        report = cls(sites=described, skipped=[s.to_dict() for s in skipped], versions=versions(), **fields)
        sizes = dict.fromkeys((entry["head_dim"], entry["new_head_dim"]) for entry in described)
        report.notes.extend(note for note in (accounting.head_dim_note(*pair) for pair in sizes) if note)
        report.costs = report.cost_summary(DEFAULT_COST_SEQ_LEN)
        return report

    def site_costs(self, seq_len: int) -> list[accounting.SiteCosts]:
        """Before/after costs of every rewritten site for sequences of `seq_len` tokens."""
        top_k = self.config["top_k"]
        return [accounting.site_costs(site, site["num_experts"], top_k, seq_len, num_heads=site["new_num_heads"],
                                      head_dim=site.get("new_head_dim"), num_kv_heads=site["new_num_kv_heads"],
                                      kv_bytes=site["kv_bytes"])
                for site in self.sites]

    def cost_table(self, seq_len: int) -> "CostTable":
        """Rows (label, before, after, after/before) over all sites, for the report and the CLI: the
        heads and head size of each side first, then the costs. `print()` it for an aligned table."""
        per_site = self.site_costs(seq_len)
        return CostTable([_geometry_row(per_site), _fast_path_row(per_site),
                          *accounting.format_table(*accounting.totals(per_site))])

    def cost_summary(self, seq_len: int) -> dict[str, Any]:
        per_site = self.site_costs(seq_len)
        before, after = accounting.totals(per_site)
        return {
            "seq_len": seq_len,
            "table": [list(row) for row in self.cost_table(seq_len)],
            "total_before": dataclasses.asdict(before),
            "total_after": dataclasses.asdict(after),
            "sites": [{"path": c.path, "before": dataclasses.asdict(c.before), "after": dataclasses.asdict(c.after)}
                      for c in per_site],
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class CostTable(list):
    """A list of (label, dense, SwitchHead, after/before) rows that prints as an aligned text table."""

    HEADER = ("", "dense", "SwitchHead", "after/before")

    def __str__(self) -> str:
        rows = [self.HEADER, *self]
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(self.HEADER))]
        lines = [f"{row[0]:<{widths[0]}}  " + "  ".join(f"{row[i]:>{widths[i]}}" for i in range(1, len(row)))
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(line.rstrip() for line in lines)


def _geometry_row(per_site: list[accounting.SiteCosts]) -> tuple[str, str, str, str]:
    """('heads x head dim', e.g. '16 x 64', '4 x 112, E=4, k=2', ''); distinct geometries joined."""
    def describe(g: accounting.AttentionGeometry) -> str:
        text = f"{g.num_heads} x {g.head_dim}" + (f" ({g.num_kv_heads} KV)" if g.num_kv_heads != g.num_heads else "")
        return text + (f", E={g.num_experts}, k={g.top_k}" if g.moe else "")

    def joined(geometries) -> str:
        return "; ".join(dict.fromkeys(describe(g) for g in geometries))
    return ("heads x head dim", joined(c.dense for c in per_site), joined(c.switchhead for c in per_site), "")


def _fast_path_row(per_site: list[accounting.SiteCosts]) -> tuple[str, str, str, str]:
    """('fast SDPA head size', 'yes' / 'no (76)', ...): whether flash/cuDNN attention takes each side's sizes."""
    def describe(geometries) -> str:
        slow = sorted({g.head_dim for g in geometries if not accounting.fast_attention_head_dim(g.head_dim)})
        return "yes" if not slow else "no (" + ", ".join(map(str, slow)) + ")"
    return ("fast SDPA head size", describe(c.dense for c in per_site), describe(c.switchhead for c in per_site), "")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("switchhead-rewrite", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
