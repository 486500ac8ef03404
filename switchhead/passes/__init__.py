"""Graph passes; convert() runs them in the order of the table in README.md (detect, then rewrite)."""

from switchhead.passes.detect_attention import detect_attention
from switchhead.passes.rewrite_experts import rewrite_experts

__all__ = ["detect_attention", "rewrite_experts"]
