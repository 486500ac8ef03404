"""bench_e2e's output from its results (a run's, or an earlier e2e.json): the side-by-side tables, the
verdicts against issue 8's targets, the text table printed at the end, and the ratio plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from switchhead import accounting
from benchmarks.common import log

TARGETS = {
    "attn_realisation": 1.1,  # at T >= 2048
    "train_262M_8192": 0.8,
    "regression_tolerance": 0.02,  # "no regression": within timing noise
}


def _get(rows, model, T, measure, side):
    for r in rows:
        if (r["model"], r["seq_len"], r["measure"], r["side"]) == (model, T, measure, side):
            return r
    return None


def _cell(r, key, fmt="{:.2f}"):
    if r is None:
        return "-"
    if r.get("error"):
        return "ERR" if not r["error"].startswith("skipped") else "skip"
    v = r.get(key)
    return "-" if v is None else fmt.format(v)


def _ratio(a, b, key, inverse=False):
    if a is None or b is None or a.get("error") or b.get("error") or a.get(key) is None or b.get(key) is None:
        return None
    return (a[key] / b[key]) if inverse else (b[key] / a[key])


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per (model, T): the side-by-side numbers, ratios (switchhead / dense) and target checks."""
    rows = results["rows"]
    keys = sorted({(r["model"], r["seq_len"]) for r in rows if r["measure"] != "profile"},
                  key=lambda k: (list(results["pairs"]).index(k[0]) if k[0] in results["pairs"] else 0, k[1]))
    out = []
    for model, T in keys:
        s: dict[str, Any] = {"model": model, "seq_len": T}
        for measure, key in (("train", "ms"), ("prefill", "tokens_per_s"), ("attn", "ms")):
            d, w = _get(rows, model, T, measure, "dense"), _get(rows, model, T, measure, "switchhead")
            s[measure] = (d, w)
            s[f"{measure}_ratio"] = _ratio(d, w, key)
        d, w = s["train"]
        s["memory_ratio"] = _ratio(d, w, "peak_gb")
        a = s["attn"][1] or s["attn"][0] or {}
        s["mac_ratio"] = a.get("attn_mac_ratio")
        s["model_mac_ratio"] = a.get("model_mac_ratio")
        s["realisation"] = s["attn_ratio"] / s["mac_ratio"] if s["attn_ratio"] and s["mac_ratio"] else None
        s["batch"] = next((r["batch"] for r in rows if (r["model"], r["seq_len"]) == (model, T)), None)
        out.append(s)
    return {"per_length": out}


def _x(v, fmt="{:.2f}x"):
    return "-" if v is None else fmt.format(v)


def _verdict(label: str, values: list[tuple[str, float | None]], ok: Callable[[float], bool], fmt: str) -> str:
    """'- label: **met** / **not met** / **incomplete** / not measured (name: value, ...)'."""
    present = [v for _, v in values if v is not None]
    if not present:
        return f"- {label}: not measured"
    if not all(ok(v) for v in present):
        status = "**not met**"
    else:
        status = "**met**" if len(present) == len(values) else "**met where measured** (incomplete)"
    return f"- {label}: {status} (" + ", ".join(f"{name}: {_x(v, fmt)}" for name, v in values) + ")"


def target_lines(summary: dict[str, Any], lengths: list[int]) -> list[str]:
    """One verdict line per target of issue 8 that the results speak to."""
    lines = []
    per = summary["per_length"]
    real = [(f"{s['model']} T={s['seq_len']}", s["realisation"]) for s in per if s["seq_len"] >= 2048]
    if real:
        lines.append(_verdict(f"Attention realisation <= {TARGETS['attn_realisation']} at T >= 2048", real,
                              lambda v: v <= TARGETS["attn_realisation"], "{:.2f}"))
    train = [("262M T=8192", s["train_ratio"]) for s in per if s["model"] == "262M" and s["seq_len"] == 8192]
    if train:
        lines.append(_verdict(f"262M training step at T=8192 <= {TARGETS['train_262M_8192']}x dense", train,
                              lambda v: v <= TARGETS["train_262M_8192"], "{:.2f}x"))
    mem = [(f"{s['model']} T={s['seq_len']}", s["memory_ratio"]) for s in per]
    if mem:
        lines.append(_verdict("Peak training memory <= dense at every length", mem, lambda v: v <= 1.0, "{:.2f}x"))
    if lengths:
        tol = TARGETS["regression_tolerance"]
        short = [s for s in per if s["seq_len"] == min(lengths)]
        values = [(f"{s['model']} {k} time", s[k + "_ratio"]) for s in short for k in ("train", "attn")]
        values += [(f"{s['model']} prefill time", 1 / s["prefill_ratio"] if s["prefill_ratio"] else None)
                   for s in short]
        lines.append(_verdict(f"No regression at T={min(lengths)} (SwitchHead / dense time within "
                              f"{100 * tol:.0f}%)", values, lambda v: v <= 1.0 + tol, "{:.2f}x"))
    return lines


HOW = """What is measured (both sides in the same process, one model on the device at a time):
- **train**: one step = forward, cross-entropy, backward, fused AdamW, `zero_grad`; the whole model
  compiled with its loss. **peak GB**: `torch.cuda.max_memory_allocated` over the timed steps (weights,
  gradients, AdamW state, activations).
- **prefill**: forward only (`no_grad`), all logits; tokens/s = B*T / median time.
- **attention layer**: one `Attention` module (q/k/v/o, RoPE, causal SDPA) with the model's geometry,
  converted by itself with the same config (the converted LM is one flat graph with no per-layer
  submodule to take out), compiled; forward + backward of x [B, T, d] with gradients for x and weights.
- **MAC ratio**: `switchhead.accounting.attention_costs` of that layer (causal core, per sequence),
  SwitchHead geometry read from the converted expert weights; **model MAC ratio** adds MLP and LM head
  per token. **realisation** = attention time ratio / MAC ratio (1.0: the MAC saving fully shows up as
  time saved; target <= 1.1 at T >= 2048).
- **host ms** (CUDA): the host's time to issue one step with no synchronisation in the loop; close to
  the step's CUDA-event time, the GPU waited for kernel launches (the step is launch-bound)."""


def markdown(results: dict[str, Any]) -> str:
    """The '## End-to-end' section (and e2e.md): setup, both tables, verdicts, failures and notes."""
    m = results["meta"]
    summary = summarise(results)
    per = summary["per_length"]
    lengths = sorted({s["seq_len"] for s in per})
    dev = m.get("gpu", m["device"])
    lines = [
        f"Device: {dev}; torch {m['torch']}" + (f", triton {m['triton']}" if "triton" in m else "") +
        f", python {m['python']}; {'bf16 autocast' if m['bf16'] else 'fp32'}; "
        f"{'torch.compile (' + m.get('compile_mode', 'default') + ' mode, ' + m['shapes'] + ' shapes)' if m['compile'] else 'eager'}; "
        f"{m['tokens_per_step']} tokens per step (B = tokens // T); medians of {m['iters']} "
        f"{'CUDA-event-timed' if m['device'].startswith('cuda') else 'wall-clock'} steps after {m['warmup']} "
        f"warm-up steps; run {m['date_utc']}" + (f", {m['wall_s']:.0f} s in all." if 'wall_s' in m else "."),
        f"Command: `python -m benchmarks.bench_e2e {m['argv']}`",
        "",
    ]
    for name, info in results["pairs"].items():
        if "config" not in info:
            lines.append(f"- **{name}**: not built ({info.get('convert_error')})")
            continue
        c, p = info["config"], info["switchhead"]
        g = info.get("geometry")
        sh_geo = (f"H={g['num_heads']} E={g['num_experts']} k={g['top_k']} dh={g['head_dim']}" if g else
                  f"H={p['heads']} E={p['experts']} k={p['top_k']}" + (f" dh={p['head_dim']}" if p["head_dim"] else ""))
        fb = (f" (**not the paper's dh={p['head_dim']}: convert kept the dense head size**)"
              if g and p["head_dim"] and g["head_dim"] != p["head_dim"] else "")
        if info.get("convert_error"):
            fb += f" (**conversion failed**: {info['convert_error']})"
        params_sh = (f"{accounting.format_count(info['params_switchhead'])} parameters" if "params_switchhead" in info
                     else "-")
        lines.append(f"- **{name}**: d={c['d']}, {c['layers']} layers, vocab {c['vocab']}"
                     f"{', tied embeddings' if c['tied'] else ''}; dense H={c['heads']} dh={c['head_dim']} "
                     f"({accounting.format_count(info['params_dense'])} parameters) vs SwitchHead {sh_geo}{fb} ({params_sh})")
    lines += ["", HOW, "", "Whole model (ratio = SwitchHead / dense; prefill ratio = SwitchHead speed / dense speed):", "",
              "| model | T | B | train ms dense | train ms SH | train ratio | model MAC ratio | peak GB dense | "
              "peak GB SH | memory ratio | prefill tok/s dense | prefill tok/s SH | prefill ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in per:
        (td, tw), (pd, pw) = s["train"], s["prefill"]
        lines.append(f"| {s['model']} | {s['seq_len']} | {s['batch']} | {_cell(td, 'ms')} | {_cell(tw, 'ms')} | "
                     f"{_x(s['train_ratio'])} | {_x(s['model_mac_ratio'])} | {_cell(td, 'peak_gb')} | "
                     f"{_cell(tw, 'peak_gb')} | {_x(s['memory_ratio'])} | {_cell(pd, 'tokens_per_s', '{:,.0f}')} | "
                     f"{_cell(pw, 'tokens_per_s', '{:,.0f}')} | {_x(s['prefill_ratio'])} |")
    lines += ["", "One attention layer, forward + backward (MACs: `switchhead.accounting`, one layer, causal core):", "",
              "| model | T | B | attn ms dense | attn ms SH | time ratio | MAC ratio | realisation | host ms dense | host ms SH |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in per:
        d, w = s["attn"]
        lines.append(f"| {s['model']} | {s['seq_len']} | {s['batch']} | {_cell(d, 'ms', '{:.3f}')} | "
                     f"{_cell(w, 'ms', '{:.3f}')} | {_x(s['attn_ratio'])} | {_x(s['mac_ratio'])} | "
                     f"{_x(s['realisation'], '{:.2f}')} | {_cell(d, 'host_ms', '{:.3f}')} | "
                     f"{_cell(w, 'host_ms', '{:.3f}')} |")
    lines += ["", "Targets (issue 8):", ""] + target_lines(summary, lengths)
    errors = [r for r in results["rows"] if r.get("error") and not r["error"].startswith("skipped")]
    skipped = [r for r in results["rows"] if r.get("error", "").startswith("skipped")]
    if errors or skipped:
        lines += ["", "Failed or skipped:", ""]
        lines += [f"- {r['model']} T={r['seq_len']} {r['measure']} {r['side']}: {r['error']}" for r in errors]
        if skipped:
            reasons = sorted({r["error"][len("skipped: "):] for r in skipped})
            lines.append(f"- skipped ({'; '.join(reasons)}): " + ", ".join(
                f"{r['model']} T={r['seq_len']} {r['measure']} {r['side']}" for r in skipped))
    notes = results.get("notes", []) + [n for info in results["pairs"].values() for n in info.get("notes", [])]
    profiles = [r for r in results["rows"] if r["measure"] == "profile" and r.get("profile")]
    if profiles:
        notes.append("Profiles (top-15 kernels of the attention layer, fwd+bwd): " +
                     ", ".join(f"`{Path(r['profile']).name}`" for r in profiles) + " in the output directory.")
    # every first call over 1 s, each with its length: a later length's recompile must not hide the first compile
    slow_first = [r for r in results["rows"] if r.get("first_call_s") is not None and r["first_call_s"] > 1.0]
    if slow_first:
        notes.append("First calls (compile, or recompile at a new length) over 1 s, with the part spent analysing "
                     "user Triton kernels (TTIR per call site): " + ", ".join(
                         f"{r['model']} {r['measure']} {r['side']} T={r['seq_len']} {r['first_call_s']:.0f} s" + (
                             f" ({r['ttir_analyses']} analyses, {r['ttir_analysis_s']:.0f} s)"
                             if r.get("ttir_analyses") else "")
                         for r in slow_first))
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def text_table(results: dict[str, Any]) -> str:
    """The fixed-width table printed at the end of a run, with the verdicts."""
    summary = summarise(results)
    head = (f"{'model':12} {'T':>5} {'B':>3} | {'train d':>8} {'train SH':>8} {'ratio':>6} | {'mem d':>6} {'mem SH':>6} "
            f"{'ratio':>6} | {'pre tok/s d':>11} {'SH':>11} {'ratio':>6} | {'attn d':>7} {'attn SH':>7} {'ratio':>6} "
            f"{'MACs':>6} {'real.':>6}")
    lines = [head, "-" * len(head)]
    for s in summary["per_length"]:
        (td, tw), (pd, pw), (ad, aw) = s["train"], s["prefill"], s["attn"]
        lines.append(
            f"{s['model']:12} {s['seq_len']:>5} {s['batch']:>3} | {_cell(td, 'ms', '{:.1f}'):>8} "
            f"{_cell(tw, 'ms', '{:.1f}'):>8} {_x(s['train_ratio']):>6} | {_cell(td, 'peak_gb'):>6} "
            f"{_cell(tw, 'peak_gb'):>6} {_x(s['memory_ratio']):>6} | {_cell(pd, 'tokens_per_s', '{:,.0f}'):>11} "
            f"{_cell(pw, 'tokens_per_s', '{:,.0f}'):>11} {_x(s['prefill_ratio']):>6} | {_cell(ad, 'ms', '{:.3f}'):>7} "
            f"{_cell(aw, 'ms', '{:.3f}'):>7} {_x(s['attn_ratio']):>6} {_x(s['mac_ratio']):>6} "
            f"{_x(s['realisation'], '{:.2f}'):>6}")
    return "\n".join(lines + [""] + target_lines(summary, sorted({s['seq_len'] for s in summary['per_length']})))


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """out_dir/e2e.png: SwitchHead / dense ratios against T per model (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not available: no plot (run --from-json ... --plot DIR where it is)")
        return []
    per = summarise(results)["per_length"]
    models = list(dict.fromkeys(s["model"] for s in per))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    series = (("train_ratio", "train step time"), ("memory_ratio", "peak train memory"),
              ("prefill_time_ratio", "prefill time"), ("attn_ratio", "attention fwd+bwd time"),
              ("mac_ratio", "attention MACs (accounting)"))
    for ax, model in zip(axes[0], models):
        rows = [{**s, "prefill_time_ratio": 1 / s["prefill_ratio"] if s["prefill_ratio"] else None}
                for s in per if s["model"] == model]
        for key, label in series:
            pts = [(s["seq_len"], s[key]) for s in rows if s[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if key == "mac_ratio" else "-")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        lengths = sorted({s["seq_len"] for s in rows})
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("SwitchHead / dense (lower is better)")
        ax.set_title(f"{model}: SwitchHead vs dense ({results['meta'].get('gpu', results['meta']['device'])})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "e2e.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot written: {path}")
    return [path]
