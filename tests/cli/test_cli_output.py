"""Output for people (issue 23): identical layers collapse into one row, the site table fits a
100-column terminal, the cost table prints as a table, the parameter change is signed."""

from __future__ import annotations

from rich.console import Console

import switchhead
import tiny_model
from switchhead.cli import collapse_sites, print_site_tables


def _site(path: str, heads: int = 9) -> dict:
    return {"path": path, "module_type": "LlamaAttention", "core": "sdpa", "num_heads": heads, "num_kv_heads": 3,
            "head_dim": 64, "embed_dim": 576, "query_dim": 576, "out_dim": 576, "cross": False,
            "value_projection": "model.layers.N.self_attn.v_proj (linear, 3 KV heads x 64 of its 192 outputs)",
            "output_projection": "model.layers.N.self_attn.o_proj (linear, 9 heads x 64 of its 576 inputs)"}


def test_identical_layers_collapse_into_one_row():
    sites = [_site(f"model.layers.{i}.self_attn") for i in range(30)]
    assert collapse_sites(sites, {s["path"] for s in sites}) == [("model.layers.0-29.self_attn", 30, sites[0])]
    sites[12] = _site("model.layers.12.self_attn", heads=3)  # a different layer splits the run
    rows = collapse_sites(sites, {s["path"] for s in sites})
    assert [(path, count) for path, count, _ in rows] == [
        ("model.layers.0-11.self_attn", 12), ("model.layers.12.self_attn", 1), ("model.layers.13-29.self_attn", 17)]
    rows = collapse_sites(sites[:3], {"model.layers.0.self_attn"})  # rewritten or not splits too
    assert [count for _, count, _ in rows] == [1, 2]


def test_site_table_fits_a_100_column_terminal():
    console = Console(width=100, record=True, color_system=None)
    sites = [_site(f"model.layers.{i}.self_attn") for i in range(30)]
    print_site_tables(console, sites, [{"path": "model.pooler", "op": "softmax", "reason": "no value product"}],
                      {s["path"] for s in sites})
    text = console.export_text()
    assert all(len(line) <= 100 for line in text.splitlines())
    for needle in ("module, type", "LlamaAttention x 30", "heads", "width", "kind", "projections", "rewrite", "model.layers.0-29.self_attn",
                   "9 (3 KV) x 64", "yes", "no value product"):
        assert needle in text, needle
    assert text.count("LlamaAttention") == 1


def test_cost_table_prints_as_a_table():
    torch_model = tiny_model.build_model()
    new = switchhead.convert(torch_model, (tiny_model.tokens(),))
    table = switchhead.report_of(new).cost_table(512)
    lines = str(table).splitlines()
    assert lines[0].split() == ["dense", "SwitchHead", "after/before"] and set(lines[1]) == {"-"}
    assert len(lines) == len(table) + 2 and lines[2].startswith("heads x head dim")
    assert all(row[0] in line for row, line in zip(table, lines[2:]))
    assert table[1][0] == "fast SDPA head size" and table[2][0] == "parameters (attention weights)"  # rows, for scripts


def test_parameter_change_is_signed(run_cli, write_model, tmp_path):
    result = run_cli(write_model(), "--init", "fold", "--heads", "1", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("parameters"))
    assert "(-" in line and "+-" not in line, line
