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
from switchhead.api import analyze, convert, find_attention, max_relative_error, relative_error, report_of
from switchhead.decoder import CachedLM, convert_decoder
from switchhead.healing import HealConfig, heal
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

_ONNX_NAMES = ("export_onnx", "OnnxExport", "OnnxExportError")


def __getattr__(name: str):
    """ONNX export needs the optional `onnx` extras: imported on first use, not with the package."""
    if name in _ONNX_NAMES:
        from switchhead.exporters import onnx as onnx_exporter

        return getattr(onnx_exporter, name)
    raise AttributeError(f"module 'switchhead' has no attribute {name!r}")


__all__ = [
    "export_onnx", "OnnxExport", "OnnxExportError",
    "HealConfig", "heal",
    "AttentionCosts", "AttentionGeometry", "AttentionSite", "CaptureError", "ConfigMismatchError", "ConversionReport", "LoadError",
    "MissingInputsError", "NoAttentionError", "SaveError", "SiteCosts", "SkippedSite", "SwitchHeadConfig",
    "SwitchHeadError", "VerificationError", "analyze", "attention_costs", "convert", "expert_usage",
    "find_attention", "format_table", "load", "max_relative_error", "paper_macs", "paper_memory", "relative_error", "report_of",
    "save", "site_costs", "totals",
]
