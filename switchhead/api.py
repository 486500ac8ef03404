"""The public verbs: find_attention and convert."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from switchhead.capture import Captured, capture, record_values
from switchhead.config import SwitchHeadConfig
from switchhead.device import follow_device_moves
from switchhead.errors import NoAttentionError, VerificationError
from switchhead.graph.surgery import resize_input
from switchhead.inputs import accept_missing_mask, remember_inputs, resolve_inputs
from switchhead.passes import PIPELINE, PassState, run_passes
from switchhead.report import ConversionReport
from switchhead.site import AttentionSite, SkippedSite

REPORT_KEY = "switchhead_report"
COUNTERS_KEY = "switchhead_pass_counters"
FilterFn = Callable[[str], bool]


@dataclasses.dataclass
class Analysis:
    """A captured model, the example value of every node, and what detection found there."""

    captured: Captured
    values: dict[torch.fx.Node, Any]
    sites: list[AttentionSite]
    skipped: list[SkippedSite]
    reference_output: Any
    mask_added: bool = False  # an all-ones attention_mask was added to the model's dummy_inputs
    counters: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # by pass


def analyze(
    model: torch.nn.Module,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    filter_fn: FilterFn | None = None,
    module_filter: str | None = None,
    dynamic_shapes: Any = None,
) -> Analysis:
    """Capture `model` and find its attention; sites excluded by a filter are reported as skipped.
    `dynamic_shapes` (torch.export's format) replaces the automatic dynamic batch / sequence dims."""
    args, kwargs, mask_added = resolve_inputs(model, args, kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        captured, reference = capture(model, args, kwargs, dynamic_shapes)
    values = record_values(captured)
    state = PassState(values)
    counters = run_passes(captured.graph_module, state, PIPELINE[:1])
    kept, skipped = [], state.skipped
    for site in state.sites:
        if (filter_fn is None or filter_fn(site.path)) and (module_filter is None or re.search(module_filter, site.path)):
            kept.append(site)
        else:
            skipped.append(SkippedSite(site.path, site.core, "excluded by the filter"))
    return Analysis(captured, values, kept, skipped, reference, mask_added, counters)


def find_attention(
    model: torch.nn.Module,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    filter_fn: FilterFn | None = None,
) -> list[AttentionSite]:
    """Every multi-head attention in `model` that convert() would rewrite. Never changes the model."""
    return analyze(model, args, kwargs, filter_fn=filter_fn).sites


def convert(
    model: torch.nn.Module,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    config: SwitchHeadConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    progress: Callable[[str], None] | None = None,
    dynamic_shapes: Any = None,
) -> torch.fx.GraphModule:
    """Rewrite every multi-head attention of `model` into SwitchHead attention.

    Returns an fx GraphModule with the same inputs and output structure as `model`; its report is
    `report_of(result)`. Like torch.export's modules, the result shares every parameter it did not
    replace with `model`: training one trains the other, so deep-copy either if both must change
    independently (distilling the original into the result, say). With init="upcycle" and config.verify, the result is checked against the
    original on the example inputs and a VerificationError is raised on mismatch. `progress` is
    called with the name of each step as it starts ("capture", "rewrite", "verify").
    The batch and sequence dims of the inputs stay dynamic where the model allows it (a size-1
    example dim is widened to 2 for the capture; the report names the dynamic dims exactly);
    `dynamic_shapes` (torch.export's format) chooses them instead.
    """
    config = config or SwitchHeadConfig()
    step = progress or (lambda name: None)
    if filter_fn is None:
        config.check_declared_heads(model)  # before the capture, the longest step
    step("capture")
    analysis = analyze(model, args, kwargs, filter_fn=filter_fn, module_filter=config.module_filter,
                       dynamic_shapes=dynamic_shapes)
    if not analysis.sites:
        reasons = "; ".join(sorted({f"{s.path or '<root>'}: {s.reason}" for s in analysis.skipped})[:3])
        raise NoAttentionError(f"no attention to rewrite in {type(model).__name__}" + (f" (skipped: {reasons})" if reasons else ""))
    config.check_sites(analysis.sites)
    parameters_before = sum(p.numel() for p in model.parameters())
    gm = analysis.captured.graph_module
    step("rewrite")
    state = PassState(analysis.values, config, analysis.sites, analysis.skipped)
    counters = {**analysis.counters, **run_passes(gm, state, PIPELINE[1:])}
    plans = state.applied
    analysis.values.clear()  # the example activations are no longer needed
    if state.resized_inputs:  # folding resized the KV cache the graph writes into
        resize_example_inputs(analysis.captured, state.resized_inputs)
    same_function = all(p.num_heads == s.num_heads and p.weights.v_experts.shape[1] == 1
                        for p, s in zip(plans, analysis.sites)) if config.init == "fold" else config.init == "upcycle"
    step("verify")
    exact = same_function and config.verify
    rtol = (config.verify_rtol if config.verify_rtol is not None
            else default_rtol(analysis.reference_output, len(plans))) if exact else None
    error, max_error = _verify(gm, analysis, rtol, exact=exact, depth=len(plans))
    notes = [f"example dims kept at 1 (static): {analysis.captured.not_widened}"] if analysis.captured.not_widened else []
    if config.init == "fold" and not same_function:
        notes.append("init='fold' is lossy: the folded heads only approximate the dense model; heal it "
                     "(distillation from the original) before use")
    gm.meta[REPORT_KEY] = ConversionReport.build(
        analysis.sites, analysis.skipped, plans, config=config.to_dict(),
        dynamic_shapes=analysis.captured.dynamic, static_reason=analysis.captured.static_reason,
        dynamic_dims=analysis.captured.dynamic_dims, widened=list(analysis.captured.widened),
        rewrites=counters["rewrite_experts"]["rewrites"], verify_max_error=max_error, verify_error=error, verify_rtol=rtol,
        parameters_before=parameters_before,
        parameters_after=sum(p.numel() for p in gm.parameters()), notes=notes,
    )
    gm.meta[COUNTERS_KEY] = counters
    remember_inputs(gm, analysis.captured.args, analysis.captured.kwargs)
    if analysis.mask_added:
        accept_missing_mask(gm)
    return follow_device_moves(gm)


def resize_example_inputs(captured: Captured, shapes: dict[str, list[int]]) -> None:
    """Replace the example inputs named in `shapes` (by placeholder) with zeros of the new shapes:
    KV caches, empty in the examples (the example prompt fills them from slot 0)."""
    placeholders = [n.target for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    swap = {}
    for name, value in zip(placeholders, captured.flat_inputs()):
        if name in shapes:
            resize_input(captured.graph_module, name, shapes[name], value)
            swap[id(value)] = torch.zeros(shapes[name], dtype=value.dtype, device=value.device)
    captured.args, captured.kwargs = pytree.tree_map(lambda v: swap.get(id(v), v), (captured.args, captured.kwargs))


def report_of(converted: torch.fx.GraphModule) -> ConversionReport:
    """The ConversionReport that convert() attached to its result."""
    if REPORT_KEY not in getattr(converted, "meta", {}):
        raise ValueError("this module was not produced by switchhead.convert()")
    return converted.meta[REPORT_KEY]


def pass_counters(converted: torch.fx.GraphModule) -> dict[str, dict[str, int]]:
    """How often each pass of convert() rewrote each kind of thing, by pass name (detect_attention:
    sites / skipped, fold_heads: folded sites and edited ops, rewrite_experts: expert ops)."""
    if COUNTERS_KEY not in getattr(converted, "meta", {}):
        raise ValueError("this module was not produced by switchhead.convert() in this process")
    return converted.meta[COUNTERS_KEY]


def _worst_ratio(expected: Any, actual: Any, measure: Callable[[torch.Tensor], float]) -> float:
    """max over the floating outputs of measure(a - b) / measure(a) on their finite entries (a: the
    expected output); inf where the two disagree on which entries are finite. Checks that structure
    and shapes match (VerificationError)."""
    want, want_spec = pytree.tree_flatten(expected)
    got, got_spec = pytree.tree_flatten(actual)
    if want_spec != got_spec:
        raise VerificationError(f"converted model returns {got_spec}, the original {want_spec}")
    worst = 0.0
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if a.shape != b.shape:
                raise VerificationError(f"converted output has shape {tuple(b.shape)}, the original {tuple(a.shape)}")
            a64, b64 = a.detach().double(), b.detach().double()
            finite = torch.isfinite(a64)
            if not torch.equal(finite, torch.isfinite(b64)):
                return float("inf")
            if finite.any():
                scale, diff = measure(a64[finite]), measure((a64 - b64)[finite])
                worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def max_relative_error(expected: Any, actual: Any) -> float:
    """max |a - b| / max |a| over the floating tensors of two outputs of the same structure."""
    return _worst_ratio(expected, actual, lambda t: t.abs().max().item())


def relative_error(expected: Any, actual: Any) -> float:
    """||a - b|| / ||a|| (Euclidean norms over the finite entries), the worst floating output of two
    outputs of the same structure.

    This is the measure that tells float rounding from a wrong rewrite: rounding errors are many
    small independent terms, so their norm stays near eps * sqrt(depth) of the output's norm, while
    a misread head moves a whole slice of the output by its own size. The max elementwise ratio
    (max_relative_error) instead grows with the output's size and the spread of its values."""
    return _worst_ratio(expected, actual, lambda t: torch.linalg.vector_norm(t).item())


def default_rtol(output: Any, depth: int = 1) -> float:
    """The limit of relative_error for a model with `depth` rewritten attention layers: 1e-5, or twice
    the rounding error of the least precise floating output (fp16, bf16), times sqrt(depth), since
    independent rounding errors of the layers add up in quadrature."""
    dtypes = [t.dtype for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max([1e-5] + [2 * torch.finfo(d).eps for d in dtypes]) * math.sqrt(max(depth, 1))


def _verify(gm: torch.fx.GraphModule, analysis: Analysis, rtol: float | None, exact: bool,
            depth: int) -> tuple[float | None, float | None]:
    """Run the converted model on the example inputs. Its outputs must have the original's
    structure and shapes; when it should compute the same function (`exact`), the same values:
    relative_error at most `rtol` (required when `exact`). Returns (relative_error,
    max_relative_error), both None when not `exact`."""
    captured = analysis.captured
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same dropout masks as the reference run, if the model is training
            output = gm(*captured.args, **captured.kwargs)
    except Exception as exc:
        raise VerificationError(f"the converted model fails on the example inputs: {type(exc).__name__}: {exc}") from exc
    max_error = max_relative_error(analysis.reference_output, output)  # also checks structure and shapes
    if not exact:
        return None, None
    error = relative_error(analysis.reference_output, output)
    if not error <= rtol:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in pytree.tree_leaves(output)
                         if isinstance(t, torch.Tensor) and t.is_floating_point()})
        raise VerificationError(
            f"converted model differs from the original by {error:.3g} (||a-b||/||a||), above the {rtol:.3g} that "
            f"rounding in {'/'.join(dtypes) or 'float'} over {depth} attention layer(s) explains: its attention was "
            "misread; please report this model (or raise SwitchHeadConfig.verify_rtol if you expect more rounding)"
        )
    return error, max_error
