"""switchhead-rewrite: find multi-head attention in any PyTorch model and rewrite it into SwitchHead."""

from switchhead import kernels as _kernels  # noqa: F401  (registers the switchhead:: ops the rewritten graphs call)
from switchhead.accounting import (
    AttentionCosts,
    AttentionGeometry,
    SiteCosts,
    attention_costs,
    format_table,
    paper_macs,
    paper_memory,
    site_costs,
    totals,
)
from switchhead.api import analyze, convert, find_attention, max_relative_error, report_of
from switchhead.inspect import expert_usage
from switchhead.io import LoadError, SaveError, load, save
from switchhead.config import SwitchHeadConfig
from switchhead.errors import (
    CaptureError,
    ConfigMismatchError,
    MissingInputsError,
    NoAttentionError,
    SwitchHeadError,
    VerificationError,
)
from switchhead.report import ConversionReport
from switchhead.site import AttentionSite, SkippedSite

__all__ = [
    "AttentionCosts", "AttentionGeometry", "AttentionSite", "CaptureError", "ConfigMismatchError", "ConversionReport", "LoadError",
    "MissingInputsError", "NoAttentionError", "SaveError", "SiteCosts", "SkippedSite", "SwitchHeadConfig",
    "SwitchHeadError", "VerificationError", "analyze", "attention_costs", "convert", "expert_usage",
    "find_attention", "format_table", "load", "max_relative_error", "paper_macs", "paper_memory", "report_of",
    "save", "site_costs", "totals",
]
