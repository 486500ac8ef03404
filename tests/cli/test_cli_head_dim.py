"""--head-dim: a new head size from the command line, in the report and cost table, saved and loaded."""

import json

import torch

import switchhead
from switchhead.cli import ExitCode


def test_head_dim_converts_reports_and_saves(run_cli, write_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli(write_model(), "--init", "random", "--heads", "1", "--head-dim", "12", "-e", "3", "-k", "2",
                     "--seq-len", "64", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert all((s["num_heads"], s["head_dim"], s["new_num_heads"], s["new_head_dim"]) == (2, 8, 1, 12)
               for s in printed["sites"])
    assert printed["costs"]["table"][0] == ["heads x head dim", "2 x 8", "1 x 12, E=3, k=2", ""]
    kv_cache = next(row for row in printed["costs"]["table"] if row[0] == "KV cache per token")
    assert kv_cache[1:] == ["256B", "192B", "0.75x"]  # 2 x heads x head size x 4 bytes, twice: 2 x 8 -> 1 x 12
    loaded = switchhead.load(out)
    assert dict(loaded.named_parameters())["first.o_experts"].shape == (1, 3, 12, 16)
    assert loaded(torch.randint(0, 32, (3, 4))).shape == (3, 4, 32)


def test_head_dim_in_the_human_summary(run_cli, write_model, tmp_path):
    result = run_cli(write_model(), "--init", "random", "--head-dim", "6", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "head dim 8 -> 6" in result.stdout


def test_head_dim_needs_random_init(run_cli, write_model, tmp_path):
    for init in ("upcycle", "fold"):
        result = run_cli(write_model(), "--init", init, "--head-dim", "12", "-o", tmp_path / "out")
        assert result.exit_code == ExitCode.USAGE
        assert "--head-dim needs --init random" in result.stderr
    result = run_cli(write_model(), "--init", "random", "--head-dim", "0", "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.USAGE and "--head-dim must be at least 1" in result.stderr
