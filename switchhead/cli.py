"""`switchhead-rewrite model.py`: rewrite a model file's attention into SwitchHead and save it.

Human output (tables, summary) goes to stdout, progress to stderr; `--json` prints one JSON object
on stdout and nothing else; errors are one line on stderr with an exit code from `ExitCode`.
"""

from __future__ import annotations

import contextlib
import enum
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
from rich.table import Table

import switchhead
from switchhead.healing.command import check_heal_options, heal_converted, heal_options
from switchhead.inputs import accept_missing_mask
from switchhead.io import SaveError, holds_same_model, output_state, save
from switchhead.model_file import load_model_file, load_tokenizer, user_frame
from switchhead.report import versions

PROG = "switchhead-rewrite"


class ExitCode(enum.IntEnum):
    OK = 0
    MODEL = 1  # the model file, the model or its capture failed
    USAGE = 2  # bad or contradictory options (also: --filter matches no attention)
    NO_ATTENTION = 3  # the model has no attention to rewrite
    OUTPUT = 4  # the output directory is refused, or writing failed
    VERIFY = 5  # the converted model does not compute what the original does
    INTERNAL = 70  # a bug of ours
    INTERRUPTED = 130


class CliError(Exception):
    def __init__(self, message: str, code: ExitCode, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.details = details or {}


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
Exit codes: 0 ok, 1 model file or model failed, 2 bad options, 3 no attention
to rewrite, 4 output refused or not writable, 5 verification failed,
70 internal error (please report), 130 interrupted.
"""

STEP_LABELS = {
    "load": "Loading {file}",
    "analyze": "Capturing with torch.export and finding attention",
    "capture": "Capturing with torch.export",
    "detect": "Finding attention",
    "rewrite": "Rewriting into SwitchHead attention",
    "verify": "Verifying against the original model",
    "save": "Saving to {output} and checking the saved program",
    "onnx": "Exporting ONNX to {onnx} and checking it in onnxruntime",
}


SAVE_PARTS = {"write": "writing the graph and weights", "check": "loading them back and comparing outputs"}


class _Command(click.Command):
    """Click command whose usage errors are one line with exit code 2, like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        try:
            code = super().main(args, prog_name or PROG, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            click.echo(f"{PROG}: error: {exc.format_message()} (see --help)", err=True)
            code = ExitCode.USAGE
        except click.Abort:
            code = ExitCode.INTERRUPTED
        code = int(code or 0)
        if standalone_mode:
            sys.exit(code)
        return code


class Steps:
    """Progress on stderr: one spinner for the running step, a check mark and its time when done."""

    def __init__(self, console: Console | None, names: dict[str, str]):
        self.console, self.names = console, names
        self.timings: dict[str, float] = {}
        self._current: tuple[str, float] | None = None
        self._status = None

    def start(self, key: str) -> None:
        self.done()
        self._current = (key, time.perf_counter())
        if self.console is not None:
            self._status = self.console.status(STEP_LABELS.get(key, key).format(**self.names) + " ...")
            self._status.start()

    def detail(self, text: str) -> None:
        """Say which part of the running step is under way (long steps: save, ONNX)."""
        if self._status is not None and self._current is not None:
            label = STEP_LABELS.get(self._current[0], self._current[0]).format(**self.names)
            self._status.update(f"{label}: {text} ...")

    def done(self, ok: bool = True) -> None:
        if self._current is None:
            return
        key, started = self._current
        self._current = None
        if self._status is not None:
            self._status.stop()
            self._status = None
        if ok:
            self.timings[key] = time.perf_counter() - started
            if self.console is not None:
                label = STEP_LABELS.get(key, key).format(**self.names)
                self.console.print(f"[green]✓[/] {label} [dim]({self.timings[key]:.2f} s)[/]")


@click.command(cls=_Command, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_file", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--experts", "-e", type=int, default=None,
              help="Experts per head (E) [default: 4; with --init fold, the heads folded into each new head].")
@click.option("--top-k", "-k", type=int, default=2, show_default=True, help="Experts active per head and token (k <= E).")
@click.option("--init", type=click.Choice(["upcycle", "random", "fold"]), default="upcycle", show_default=True,
              help="upcycle: experts copy the dense heads, same function (verified); random: paper's init; "
                   "fold: groups of dense heads become the experts of fewer heads (lossy: heal afterwards).")
@click.option("--heads", type=int, default=None, metavar="H",
              help="Heads of every rewritten attention (fewer heads is where SwitchHead saves compute); "
                   "needs --init fold or random. With GQA, a multiple of the KV heads.")
@click.option("--head-dim", type=int, default=None, metavar="DH",
              help="Head size of every rewritten attention (e.g. --heads 4 --head-dim 112 for the paper's 262M "
                   "setup); needs --init random. Q/K, the experts, the softmax scale and RoPE follow it.")
@click.option("--fold-qk", type=click.Choice(["mean", "first"]), default="mean", show_default=True,
              help="How a folded group's Q/K heads become one: their mean, or the first head.")
@click.option("--seq-len", type=int, default=2048, show_default=True,
              help="Sequence length of the before/after cost table (MACs per token, activation memory).")
@click.option("--filter", "module_filter", metavar="REGEX", help="Only rewrite attention whose module path matches (re.search).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("switchhead_out"), show_default=True,
              help="Output directory.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="Also export the converted model to ONNX (ai.switchhead custom ops with standard-op "
                   "functions) and check it in onnxruntime.")
@click.option("--onnx-inline", is_flag=True, help="With --onnx: standard ONNX ops only (no custom domain).")
@click.option("--dry-run", is_flag=True, help="Only find and report the attention; write nothing.")
@click.option("--report-json", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="Also write the report to PATH.")
@click.option("--quiet", "-q", is_flag=True, help="No progress, tables or summary; errors only.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout (for scripts).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the model file and the expert/router init.")
@click.option("--force", is_flag=True, help="Write into an output directory that was not written by this tool.")
@click.option("--entry", metavar="NAME", help="Model (or function returning it) in the model file [model, build_model].")
@click.option("--inputs", "inputs_name", metavar="NAME", help="Example inputs (or function) in the model file [example_inputs].")
@click.option("--traceback", "show_traceback", is_flag=True, help="Show the Python traceback of an error.")
@heal_options
@click.pass_context
def main(ctx: click.Context, model_file: Path, experts: int | None, top_k: int, init: str, heads: int | None,
         head_dim: int | None, fold_qk: str, seq_len: int, module_filter: str | None, output: Path, onnx_path: Path | None,
         onnx_inline: bool, dry_run: bool, report_json: Path | None,
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
        config = _config(experts, top_k, init, heads, head_dim, fold_qk, module_filter, seed)
        if seq_len < 1:
            raise CliError(f"--seq-len must be at least 1, got {seq_len}", ExitCode.USAGE)
        heal = check_heal_options(ctx, heal_params, dry_run, lambda message: CliError(message, ExitCode.USAGE))
        if not dry_run:
            _check_output(output, force)
        result = _run(model_file, entry, inputs_name, config, output, dry_run, force, steps, out, seq_len,
                      onnx_path, onnx_inline, heal)
        result["timings_s"] = {k: round(v, 3) for k, v in steps.timings.items()}
        result["timings_s"]["total"] = round(sum(steps.timings.values()), 3)
        if report_json is not None:
            _write_json(report_json, result)
        if out is not None:
            _print_summary(out, result)
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


def _config(experts: int | None, top_k: int, init: str, heads: int | None, head_dim: int | None, fold_qk: str,
            module_filter: str | None, seed: int):
    if experts is not None and experts < 1:
        raise CliError(f"--experts must be at least 1, got {experts}", ExitCode.USAGE)
    if top_k < 1 or (experts is not None and top_k > experts):
        raise CliError(f"--top-k must be between 1 and --experts ({experts or 'E'}), got {top_k}", ExitCode.USAGE)
    if heads is not None and init == "upcycle":
        raise CliError("--heads changes the model's function: use it with --init fold (pretrained) or --init random",
                       ExitCode.USAGE)
    if head_dim is not None and head_dim < 1:
        raise CliError(f"--head-dim must be at least 1, got {head_dim}", ExitCode.USAGE)
    if head_dim is not None and init != "random":
        raise CliError("--head-dim needs --init random (the dense heads cannot fill heads of another size)",
                       ExitCode.USAGE)
    if module_filter is not None:
        try:
            re.compile(module_filter)
        except re.error as exc:
            raise CliError(f"--filter {module_filter!r} is not a valid regular expression: {exc}", ExitCode.USAGE) from None
    try:
        return switchhead.SwitchHeadConfig(num_experts=experts, top_k=top_k, init=init, num_heads=heads, head_dim=head_dim,
                                           fold_qk=fold_qk,
                                           module_filter=module_filter, seed=seed)
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None


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
         onnx_inline: bool = False, heal=None) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    steps.start("load")
    loaded = load_model_file(model_file, entry, inputs_name)
    tokenizer = _heal_tokenizer(loaded) if heal is not None and heal.enabled else None
    if dry_run:
        return _dry_run(loaded, config, steps, out)
    try:
        converted = _convert(loaded, config, steps)
    except switchhead.NoAttentionError as exc:
        raise _explain_no_attention(loaded, config, steps, out) from exc
    report = switchhead.report_of(converted)
    report.costs = report.cost_summary(seq_len)
    steps.done()
    if not force and output_state(output) == "ours" and not holds_same_model(output, report.to_dict()):
        # known now, before healing and saving (save() would refuse it too)
        raise CliError(f"--output {output} holds the output of another model; pick another directory or pass "
                       "--force to replace it", ExitCode.OUTPUT)
    if out is not None:
        print_site_tables(out, report.sites, report.skipped, {s["path"] for s in report.sites})
        _print_costs(out, report)
    healed = _heal(loaded, converted, heal, tokenizer, steps) if tokenizer is not None else None
    steps.start("save")
    extra = {"source": str(model_file), "timings_s": {k: round(v, 3) for k, v in steps.timings.items()}}
    try:
        target = save(converted, output, loaded.args, loaded.kwargs, report, overwrite=force, extra=extra,
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


# ------------------------------------------------------------------------------------- rendering


def print_site_tables(out: Console, sites: list[dict[str, Any]], skipped: list[dict[str, Any]], selected: set[str]) -> None:
    if sites:
        # the projections take what the terminal has left (expand: ratio columns share the rest)
        table = Table(title=f"Attention found ({len(sites)})", title_justify="left", expand=True)
        # only the module paths and projections wrap: the numbers stay whole on a narrow terminal
        for column, justify, wraps in [("module, type", "left", True), ("heads", "right", False),
                                       ("width", "right", False), ("kind", "left", False),
                                       ("projections", "left", True), ("rewrite", "center", False)]:
            table.add_column(column, justify=justify, no_wrap=not wraps, overflow="fold",
                             ratio=1 if column == "projections" else None)
        rows = collapse_sites(sites, selected)
        table.columns[0].min_width = min(32, max(len(path) for path, _, _ in rows))  # paths whole where they can be
        for path, count, s in rows:
            width = str(s["embed_dim"]) if s["query_dim"] == s["embed_dim"] else f"{s['query_dim']}/{s['embed_dim']}"
            kv = f" ({s['num_kv_heads']} KV)" if s["num_kv_heads"] != s["num_heads"] else ""
            module = f"{path}\n[dim]{s['module_type']}" + (f" x {count}" if count > 1 else "") + "[/]"
            table.add_row(module, f"{s['num_heads']}{kv} x {s['head_dim']}", width,
                          f"{'cross' if s['cross'] else 'self'}, {s['core']}",
                          f"V: {s['value_projection']}\nO: {s['output_projection']}",
                          "[green]yes[/]" if s["path"] in selected else "[dim]no[/]")
        out.print(table)
    if skipped:
        table = Table(title=f"Softmax / attention ops not rewritten ({len(skipped)})", title_justify="left")
        table.add_column("module", overflow="fold")
        table.add_column("op", no_wrap=True)
        table.add_column("reason", overflow="fold")
        for path, count, s in collapse_sites(skipped, set(), keys=("op", "reason")):
            table.add_row(path + (f" ({count})" if count > 1 else ""), s["op"], s["reason"])
        out.print(table)


_NUMBER = re.compile(r"(?<![^.])\d+(?![^.])")  # a path component that is a number (a layer index)
SITE_KEYS = ("module_type", "core", "num_heads", "num_kv_heads", "head_dim", "embed_dim", "query_dim", "cross",
             "value_projection", "output_projection")


def collapse_sites(sites: list[dict[str, Any]], selected: set[str],
                   keys: tuple[str, ...] = SITE_KEYS) -> list[tuple[str, int, dict[str, Any]]]:
    """Runs of consecutive sites that differ only in the layer numbers of their paths, as
    (path with each varying number shown as its range, e.g. "model.layers.0-29.self_attn", count,
    first site of the run)."""
    rows: list[tuple[str, int, dict[str, Any]]] = []
    runs: list[tuple[Any, list[dict[str, Any]]]] = []
    for site in sites:
        path = site["path"] or "<root>"
        key = (_NUMBER.sub("#", path), path in selected, *(site.get(k) for k in keys))
        if runs and runs[-1][0] == key:
            runs[-1][1].append(site)
        else:
            runs.append((key, [site]))
    for _, members in runs:
        paths = [m["path"] or "<root>" for m in members]
        numbers = [[int(n) for n in _NUMBER.findall(p)] for p in paths]
        parts = _NUMBER.split(paths[0])
        shown = parts[0]
        for position, rest in enumerate(parts[1:]):
            shown += _ranges(sorted({n[position] for n in numbers})) + rest
        rows.append((shown, len(members), members[0]))
    return rows


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _print_costs(out: Console, report) -> None:
    """Before/after table of what attention costs (all rewritten sites together)."""
    costs = report.costs
    table = Table(title=f"Attention cost, all rewritten modules (sequence length {costs['seq_len']})",
                  title_justify="left")
    for column, justify in [("", "left"), ("dense", "right"), ("SwitchHead", "right"), ("after/before", "right")]:
        table.add_column(column, justify=justify, no_wrap=True)
    for row in costs["table"]:
        table.add_row(*row)
    out.print(table)
    for note in report.notes:
        out.print(f"[yellow]note:[/] {note}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def _print_summary(out: Console, result: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    config = result["config"]
    rows: list[tuple[str, str]] = []
    if result["dry_run"]:
        rows.append(("found", f"{len(result['sites'])} attention module(s), {len(result['selected'])} selected; "
                              "nothing written (--dry-run)"))
    else:
        first = result["sites"][0]
        heads = f"{first['num_heads']} -> {first['new_num_heads']} heads, " if first["new_num_heads"] != first["num_heads"] else ""
        if first.get("new_head_dim", first["head_dim"]) != first["head_dim"]:
            heads += f"head dim {first['head_dim']} -> {first['new_head_dim']}, "
        rows.append(("rewrote", f"{result['rewrites']} projection(s) in {len(result['sites'])} attention module(s): "
                                f"{heads}E={first['num_experts']}, top-{config['top_k']}, init={config['init']}, "
                                f"seed={config['seed']}"))
        before, after = result["parameters_before"], result["parameters_after"]
        delta = after - before
        rows.append(("parameters", f"{_count(before)} -> {_count(after)} ({'+' if delta >= 0 else '-'}{_count(abs(delta))})"))
        if result.get("verify_error") is not None:
            rows.append(("verified", f"relative error {result['verify_error']:.2e} (||a-b||/||a||, limit "
                                     f"{result['verify_rtol']:.2g}); max relative error {result['verify_max_error']:.2e}"))
        else:
            rows.append(("verified", f"outputs' structure and shapes only (init={config['init']} changes the function)"))
    shapes = "dynamic: " + "; ".join(f"{name} dims {', '.join(map(str, dims))}"
                                     for name, dims in result["dynamic_dims"].items()) \
        + " (the other dims are fixed)" if result["dynamic_shapes"] else f"static: {result['static_reason']}"
    rows.append(("shapes", shapes))
    if not result["dry_run"]:
        rows.append(("saved", f"{result['output']} ({', '.join(result['output_files'])})"))
    if "onnx" in result:
        onnx = result["onnx"]
        errors = ", ".join(f"{k} {v:.1e}" for k, v in onnx["verify_errors"].items())
        form = "standard ops only" if onnx["inline"] else f"custom ops {onnx['custom_nodes']}"
        rows.append(("onnx", f"{onnx['path']} ({form}; onnxruntime vs PyTorch: {errors})"))
    timings = result["timings_s"]
    rows.append(("timings", " · ".join(f"{k} {v:.2f} s" for k, v in timings.items())))
    for key, value in rows:
        grid.add_row(key, value)
    out.print(grid)
    if not result["dry_run"]:
        out.print(f"Load it with: [bold]switchhead.load({result['output']!r})[/]")
