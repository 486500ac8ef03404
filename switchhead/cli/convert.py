"""`switchhead-rewrite model.py`: rewrite a model file's attention into SwitchHead and save it.

Human output (tables, summary) goes to stdout, progress to stderr; `--json` prints one JSON object
on stdout and nothing else; errors are one line on stderr with an exit code from `ExitCode`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console

import switchhead
from switchhead.cli.common import PROG, SAVE_PARTS, CliError, Command, ExitCode, Steps
from switchhead.cli.generate import generate_main
from switchhead.cli.heal import check_heal_options, heal_converted, heal_options
from switchhead.cli.render import print_costs, print_site_tables, print_summary
from switchhead.config import (DEFAULT_NUM_EXPERTS, FOLD_GROUPS, FOLD_QK, FOLD_ROUTER, INIT_METHODS, ConfigError,
                               SwitchHeadConfig)
from switchhead.inputs import accept_missing_mask
from switchhead.io import SaveError, holds_same_model, output_state, save
from switchhead.model_file import load_model_file, load_tokenizer, user_frame
from switchhead.report import versions

DEFAULTS = SwitchHeadConfig()


EPILOG = """\b
Example (a nanoGPT-style model that ships with the project):
  switchhead-rewrite examples/nanogpt.py --experts 4 --top-k 2 --output out/
  python -c "import switchhead; m = switchhead.load('out'); print(m)"

\b
The model file defines `model` (an nn.Module) or `build_model()`, and
`example_inputs` or `example_inputs()`: a tuple of positional inputs, a dict
of keyword inputs, or (args, kwargs). --entry / --inputs pick other names.

\b
Output: DIR/model.graph.json (the converted graph), DIR/model.safetensors
(weights), DIR/report.json; written to a temporary folder and moved into
place only when complete.

\b
Generating text with a saved decoder: switchhead-rewrite generate --help.

\b
Exit codes: 0 ok, 1 model file or model failed, 2 bad options, 3 no attention
to rewrite, 4 output refused or not writable, 5 verification failed,
70 internal error (please report), 130 interrupted.
"""

class ConvertCommand(Command):
    """The main command; a first argument `generate` runs `switchhead-rewrite generate` instead (a
    model file named `generate` is `./generate`)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        argv = list(sys.argv[1:] if args is None else args)
        if argv[:1] == ["generate"]:
            return generate_main.main(argv[1:], f"{prog_name or PROG} generate", complete_var, standalone_mode, **extra)
        return super().main(argv, prog_name, complete_var, standalone_mode, **extra)


@click.command(cls=ConvertCommand, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_file", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--experts", "-e", type=int, default=None,
              help=f"Experts per head (E) [default: {DEFAULT_NUM_EXPERTS}; with --init fold, the heads folded into each new head].")
@click.option("--top-k", "-k", type=int, default=DEFAULTS.top_k, show_default=True, help="Experts active per head and token (k <= E).")
@click.option("--init", type=click.Choice(INIT_METHODS), default=DEFAULTS.init, show_default=True,
              help="upcycle: experts copy the dense heads, same function (verified); random: paper's init; "
                   "fold: groups of dense heads become the experts of fewer heads (lossy: heal afterwards).")
@click.option("--heads", type=int, default=None, metavar="H",
              help="Heads of every rewritten attention (fewer heads is where SwitchHead saves compute); "
                   "needs --init fold or random. With GQA, a multiple of the KV heads.")
@click.option("--head-dim", type=int, default=None, metavar="DH",
              help="Head size of every rewritten attention (e.g. --heads 4 --head-dim 112 for the paper's 262M "
                   "setup); needs --init random. Q/K, the experts, the softmax scale and RoPE follow it.")
@click.option("--fold-qk", type=click.Choice(FOLD_QK), default=DEFAULTS.fold_qk, show_default=True,
              help="How a folded group's Q/K heads become one: their mean, the first head, or fitted to "
                   "the group's mean scores on the example inputs (fit).")
@click.option("--fold-groups", type=click.Choice(FOLD_GROUPS), default=DEFAULTS.fold_groups, show_default=True,
              help="Which heads fold together: consecutive ones, or those whose scores on the example inputs "
                   "agree (similar).")
@click.option("--fold-router", type=click.Choice(FOLD_ROUTER), default=DEFAULTS.fold_router, show_default=True,
              help="Folded routers: tiny random ones, or fitted so each token picks the heads that contributed "
                   "most to it on the example inputs (contribution).")
@click.option("--seq-len", type=int, default=2048, show_default=True,
              help="Sequence length of the before/after cost table (MACs per token, activation memory).")
@click.option("--filter", "module_filter", metavar="REGEX", help="Only rewrite attention whose module path matches (re.search).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("switchhead_out"), show_default=True,
              help="Output directory.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="Also export the converted model to ONNX (ai.switchhead custom ops with standard-op "
                   "functions) and check it in onnxruntime.")
@click.option("--onnx-inline", is_flag=True, help="With --onnx: standard ONNX ops only (no custom domain).")
@click.option("--kv-cache", is_flag=True,
              help="A decoder-only LM for generation (switchhead.convert_decoder): prefill and one-token decode "
                   "graphs over a static KV cache; `switchhead-rewrite generate DIR` then generates with it.")
@click.option("--dry-run", is_flag=True, help="Only find and report the attention; write nothing.")
@click.option("--report-json", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="Also write the report to PATH.")
@click.option("--quiet", "-q", is_flag=True, help="No progress, tables or summary; errors only.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout (for scripts).")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Seed for the model file and the expert/router init.")
@click.option("--force", is_flag=True, help="Write into an output directory that was not written by this tool.")
@click.option("--entry", metavar="NAME", help="Model (or function returning it) in the model file [model, build_model].")
@click.option("--inputs", "inputs_name", metavar="NAME", help="Example inputs (or function) in the model file [example_inputs].")
@click.option("--traceback", "show_traceback", is_flag=True, help="Show the Python traceback of an error.")
@heal_options
@click.pass_context
def main(ctx: click.Context, model_file: Path, experts: int | None, top_k: int, init: str, heads: int | None,
         head_dim: int | None, fold_qk: str, fold_groups: str, fold_router: str, seq_len: int,
         module_filter: str | None, output: Path, onnx_path: Path | None,
         onnx_inline: bool, kv_cache: bool, dry_run: bool, report_json: Path | None,
         quiet: bool, as_json: bool, seed: int, force: bool, entry: str | None, inputs_name: str | None,
         show_traceback: bool, **heal_params: Any) -> int:
    """Rewrite every multi-head attention of the model in MODEL_FILE into SwitchHead attention
    (mixture-of-experts V and O projections) and save the result."""
    show = not (quiet or as_json)
    # Logs and pipes get wide tables instead of rich's 80-column default.
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160) if show else None
    steps = Steps(Console(stderr=True, highlight=False) if show else None,
                  {"file": str(model_file), "output": str(output)})
    try:
        if onnx_inline and onnx_path is None:
            raise CliError("--onnx-inline needs --onnx PATH", ExitCode.USAGE)
        if dry_run:
            for name in ("output", "force", "onnx_path"):
                if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                    raise CliError(f"--{name} has no effect with --dry-run", ExitCode.USAGE)
        config = _config(experts, top_k, init, heads, head_dim, module_filter, seed,
                         {"fold_qk": fold_qk, "fold_groups": fold_groups, "fold_router": fold_router})
        if seq_len < 1:
            raise CliError(f"--seq-len must be at least 1, got {seq_len}", ExitCode.USAGE)
        heal = check_heal_options(ctx, heal_params, dry_run, lambda message: CliError(message, ExitCode.USAGE))
        if kv_cache and (dry_run or (heal is not None and heal.enabled)):
            raise CliError("--kv-cache cannot be combined with --dry-run or --heal-data yet", ExitCode.USAGE)
        if not dry_run:
            _check_output(output, force)
        result = _run(model_file, entry, inputs_name, config, output, dry_run, force, steps, out, seq_len,
                      onnx_path, onnx_inline, heal, kv_cache)
        result["timings_s"] = {k: round(v, 3) for k, v in steps.timings.items()}
        result["timings_s"]["total"] = round(sum(steps.timings.values()), 3)
        if report_json is not None:
            _write_json(report_json, result)
        if out is not None:
            print_summary(out, result)
        if as_json:
            click.echo(json.dumps(result, indent=2, sort_keys=True))
        return ExitCode.OK
    except BaseException as exc:  # noqa: BLE001  (every failure becomes one line and an exit code)
        steps.done(ok=False)
        error = _as_cli_error(exc, model_file)
        if show_traceback and not isinstance(exc, CliError):
            traceback.print_exception(exc)
        click.echo(f"{PROG}: error: {error}", err=True)
        if as_json:
            click.echo(json.dumps({"error": str(error), "exit_code": int(error.code), **error.details}, indent=2))
        return error.code


def _config(experts: int | None, top_k: int, init: str, heads: int | None, head_dim: int | None,
            module_filter: str | None, seed: int, fold: dict[str, str]) -> SwitchHeadConfig:
    """The config of the options; SwitchHeadConfig checks them and says what is wrong in the
    options' terms."""
    try:
        return SwitchHeadConfig(num_experts=experts, top_k=top_k, init=init, num_heads=heads, head_dim=head_dim,
                                module_filter=module_filter, seed=seed, **fold)
    except ConfigError as exc:
        raise CliError(exc.option_message, ExitCode.USAGE) from None


def _check_output(output: Path, force: bool) -> None:
    """Refuse a bad output before the (long) conversion; save() checks again when it writes."""
    state = output_state(output)
    if state == "file":
        raise CliError(f"--output {output} exists and is not a directory", ExitCode.OUTPUT)
    if state == "foreign" and not force:
        raise CliError(f"--output {output} exists and was not written by {PROG}; "
                       "pick another directory or pass --force to write into it", ExitCode.OUTPUT)


def _run(model_file: Path, entry: str | None, inputs_name: str | None, config, output: Path, dry_run: bool,
         force: bool, steps: Steps, out: Console | None, seq_len: int, onnx_path: Path | None = None,
         onnx_inline: bool = False, heal=None, kv_cache: bool = False) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    steps.start("load")
    # head counts the model's config refutes fail while the file builds it, before its weights load
    loaded = load_model_file(model_file, entry, inputs_name, check_module=config.check_declared_heads)
    tokenizer = _heal_tokenizer(loaded) if heal is not None and heal.enabled else None
    if dry_run:
        return _dry_run(loaded, config, steps, out)
    try:
        converted = (switchhead.convert_decoder(loaded.model, config, progress=steps.start) if kv_cache
                     else _convert(loaded, config, steps))
    except switchhead.NoAttentionError as exc:
        raise _explain_no_attention(loaded, config, steps, out) from exc
    report = switchhead.report_of(converted.prefill if kv_cache else converted)
    report.costs = report.cost_summary(seq_len)
    steps.done()
    if not force and output_state(output) == "ours" and not holds_same_model(output, report.to_dict()):
        # known now, before healing and saving (save() would refuse it too)
        raise CliError(f"--output {output} holds the output of another model; pick another directory or pass "
                       "--force to replace it", ExitCode.OUTPUT)
    if out is not None:
        print_site_tables(out, report.sites, report.skipped, {s["path"] for s in report.sites})
        print_costs(out, report)
    healed = _heal(loaded, converted, heal, tokenizer, steps) if tokenizer is not None else None
    steps.start("save")
    extra = {"source": str(model_file), "timings_s": {k: round(v, 3) for k, v in steps.timings.items()}}
    try:
        # a decoder's graphs remember their own example inputs (the cached form's)
        inputs = (None, None) if kv_cache else (loaded.args, loaded.kwargs)
        target = save(converted, output, *inputs, report, overwrite=force, extra=extra,
                      progress=lambda part: steps.detail(SAVE_PARTS[part]))
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc.strerror or exc}", ExitCode.OUTPUT) from exc
    steps.done()
    result = {**report.to_dict(), "dry_run": False, "source": str(model_file), "output": str(target),
              "output_files": sorted(p.name for p in target.iterdir())}
    if healed is not None:
        result["heal"] = healed
    if onnx_path is not None:
        result["onnx"] = _export_onnx(converted, (loaded.args, loaded.kwargs), onnx_path, onnx_inline, steps)
    return result


def _heal_tokenizer(loaded):
    """The model file's tokenizer, which --heal-data needs."""
    tokenizer = load_tokenizer(loaded)
    if tokenizer is None:
        raise CliError(f"--heal-data needs the model's tokenizer: define `tokenizer` or `get_tokenizer()` in "
                       f"{loaded.path.name} (e.g. `tokenizer = AutoTokenizer.from_pretrained(...)`)", ExitCode.USAGE)
    return tokenizer


def _heal(loaded, converted, heal, tokenizer, steps: Steps) -> dict[str, Any]:
    """Heal the converted model against the original (its own progress bar: no spinner meanwhile)."""
    started = time.perf_counter()
    echo = steps.console.print if steps.console is not None else (lambda message: None)
    try:
        summary = heal_converted(loaded, converted, heal, tokenizer, steps.console is not None, echo)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(f"healing: {(str(exc).strip().splitlines() or [''])[0]}", ExitCode.USAGE) from exc
    steps.timings["heal"] = time.perf_counter() - started
    return summary


def _export_onnx(converted, inputs, path: Path, inline: bool, steps: Steps) -> dict[str, Any]:
    """Export to ONNX and check it in onnxruntime (needs the `onnx` extras)."""
    steps.names["onnx"] = str(path)
    steps.start("onnx")
    try:
        from switchhead.exporters.onnx import export_onnx
    except ImportError as exc:
        raise CliError(f"--onnx needs the onnx extras: pip install 'switchhead-rewrite[onnx]' ({exc})",
                       ExitCode.USAGE) from exc
    args, kwargs = inputs
    try:
        if isinstance(converted, switchhead.CachedLM):  # --kv-cache: the decoder-with-past file
            from switchhead.exporters.onnx_decoder import export_decoder_onnx
            exported = export_decoder_onnx(converted, path, inline=inline)
        else:
            exported = export_onnx(converted, path, args, kwargs, inline=inline, progress=steps.detail)
    except OSError as exc:
        raise CliError(f"cannot write --onnx {path}: {exc.strerror or exc}", ExitCode.OUTPUT) from exc
    steps.done()
    return {"path": str(exported.path), "inline": exported.inline, "custom_nodes": exported.custom_nodes,
            "functions": list(exported.functions), "verify_errors": exported.verify_errors}


def _convert(loaded, config, steps: Steps):
    """convert(), one progress step per stage; a model converted on its dummy_inputs plus a mask still
    accepts calls without the mask, as convert(model) without inputs gives."""
    converted = switchhead.convert(loaded.model, loaded.args, loaded.kwargs, config=config, progress=steps.start)
    return accept_missing_mask(converted) if loaded.mask_added else converted


def _dry_run(loaded, config, steps: Steps, out: Console | None) -> dict[str, Any]:
    config.check_declared_heads(loaded.model)  # before the capture, as convert() does
    steps.start("analyze")
    analysis = switchhead.analyze(loaded.model, loaded.args, loaded.kwargs)
    steps.done()
    sites = [s.to_dict() for s in analysis.sites]
    skipped = [s.to_dict() for s in analysis.skipped]
    selected = _selected(sites, config.module_filter)
    if out is not None:
        print_site_tables(out, sites, skipped, selected)
    if not sites:
        raise CliError(f"no attention to rewrite in {loaded.path.name}{_skip_hint(skipped)}", ExitCode.NO_ATTENTION,
                       {"skipped": skipped})
    if not selected:
        raise _filter_error(config.module_filter, sites)
    config.check_sites([s for s in sites if s["path"] in selected])  # what --heads / --top-k would meet
    return {"dry_run": True, "source": str(loaded.path), "sites": sites, "skipped": skipped,
            "selected": sorted(selected), "config": config.to_dict(), "dynamic_shapes": analysis.captured.dynamic,
            "dynamic_dims": analysis.captured.dynamic_dims,
            "static_reason": analysis.captured.static_reason, "versions": versions(),
            "parameters_before": sum(p.numel() for p in loaded.model.parameters())}


def _explain_no_attention(loaded, config, steps: Steps, out: Console | None) -> CliError:
    """With a filter, tell 'the filter matches nothing' apart from 'there is no attention' (this
    captures the model once more, on the error path only)."""
    steps.done(ok=False)
    analysis = switchhead.analyze(loaded.model, loaded.args, loaded.kwargs)
    sites = [s.to_dict() for s in analysis.sites]
    skipped = [s.to_dict() for s in analysis.skipped]
    if sites and config.module_filter is not None:
        return _filter_error(config.module_filter, sites)
    if out is not None:
        print_site_tables(out, sites, skipped, set())
    return CliError(f"no attention to rewrite in {loaded.path.name}{_skip_hint(skipped)}", ExitCode.NO_ATTENTION,
                    {"skipped": skipped})


def _selected(sites: list[dict[str, Any]], module_filter: str | None) -> set[str]:
    return {s["path"] for s in sites if module_filter is None or re.search(module_filter, s["path"])}


def _filter_error(module_filter: str, sites: list[dict[str, Any]]) -> CliError:
    paths = [s["path"] or "<root>" for s in sites]
    shown = ", ".join(paths[:4]) + (f", ... ({len(paths)} in all)" if len(paths) > 4 else "")
    return CliError(f"--filter {module_filter!r} matches none of the attention modules: {shown}", ExitCode.USAGE)


def _skip_hint(skipped: list[dict[str, Any]]) -> str:
    if not skipped:
        return " (no softmax or scaled_dot_product_attention found)"
    return f" ({len(skipped)} softmax/attention op(s) skipped, first: {skipped[0]['reason']})"


def _as_cli_error(exc: BaseException, model_file: Path) -> CliError:
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return CliError("interrupted; no output was written", ExitCode.INTERRUPTED)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, switchhead.CaptureError):
        where = user_frame(exc.__cause__, model_file.resolve()) if exc.__cause__ is not None else None
        return CliError(f"{first_line}{f' (at {where})' if where else ''}", ExitCode.MODEL)
    if isinstance(exc, switchhead.VerificationError):
        return CliError(first_line, ExitCode.VERIFY)
    if isinstance(exc, switchhead.NoAttentionError):
        return CliError(first_line, ExitCode.NO_ATTENTION)
    if isinstance(exc, SaveError):
        return CliError(first_line, ExitCode.OUTPUT)
    if isinstance(exc, switchhead.ConfigMismatchError):
        return CliError(first_line, ExitCode.USAGE)
    if isinstance(exc, switchhead.SwitchHeadError):
        return CliError(first_line, ExitCode.MODEL)
    return CliError(f"internal error: {type(exc).__name__}: {first_line} (rerun with --traceback and please report it)",
                    ExitCode.INTERNAL)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a temporary file next to `path`, renamed over it when complete."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as exc:
        raise CliError(f"cannot write --report-json {path}: {exc.strerror or exc}", ExitCode.OUTPUT) from exc
