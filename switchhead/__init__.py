"""switchhead-rewrite: find multi-head attention in any PyTorch model and rewrite it into SwitchHead."""

from switchhead import kernels as _kernels  # registers the switchhead:: ops the rewritten graphs call
from switchhead.api import analyze, convert, find_attention, max_relative_error, report_of
from switchhead.config import SwitchHeadConfig
from switchhead.errors import (
    CaptureError,
    MissingInputsError,
    NoAttentionError,
    SwitchHeadError,
    VerificationError,
)
from switchhead.report import ConversionReport
from switchhead.site import AttentionSite, SkippedSite

__all__ = [
    "AttentionSite", "CaptureError", "ConversionReport", "MissingInputsError", "NoAttentionError",
    "SkippedSite", "SwitchHeadConfig", "SwitchHeadError", "VerificationError", "analyze", "convert",
    "find_attention", "max_relative_error", "report_of",
]
