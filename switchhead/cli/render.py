"""The human output of `switchhead-rewrite`: tables of the attention found, costs, the summary."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.table import Table

from switchhead.report import ConversionReport

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


def print_costs(out: Console, report: ConversionReport) -> None:
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


def print_summary(out: Console, result: dict[str, Any]) -> None:
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
