"""The command on good input: each shipped example end to end, the output modes, and the options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import switchhead
from switchhead.io import load
from switchhead.model_file import load_model_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def other_inputs(name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Inputs of another batch size (and sequence length, where the model has one)."""
    if name == "vit_small":
        return (torch.randn(3, *args[0].shape[1:]),), {}
    if kwargs:
        return (), {"input_ids": torch.randint(0, 100, (1, 9))}
    return (torch.randint(0, 100, (1, 9)),), {}


@pytest.mark.parametrize("name", ["nanogpt", "llama_small", "vit_small"])
def test_example_converts_saves_and_loads(run_cli, tmp_path, name):
    out = tmp_path / "out"
    result = run_cli(EXAMPLES / f"{name}.py", "--quiet", "--output", out)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.graph.json", "model.safetensors", "report.json"]

    torch.manual_seed(0)  # the command seeds the model file with --seed (default 0)
    original = load_model_file(EXAMPLES / f"{name}.py")
    loaded = load(out)
    report = switchhead.report_of(loaded)
    assert len(report.sites) == {"nanogpt": 4, "llama_small": 2, "vit_small": 4}[name]
    assert report.verify_max_error <= 1e-5
    for args, kwargs in [(original.args, original.kwargs), other_inputs(name, original.args, original.kwargs)]:
        with torch.no_grad():
            error = switchhead.max_relative_error(original.model(*args, **kwargs), loaded(*args, **kwargs))
        assert error <= 1e-5, (name, error)


def test_human_output(run_cli, write_model, tmp_path):
    result = run_cli(write_model(), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    for text in ("Attention found (2)", "first", "second", "fused QKV", "rewrote", "verified", "max relative error",
                 "timings", "Load it with"):
        assert text in result.stdout, text
    for step in ("Loading", "Saving"):
        assert step in result.stderr


def test_quiet_prints_nothing(run_cli, write_model, tmp_path):
    result = run_cli(write_model(), "-q", "-o", tmp_path / "out")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


def test_json_and_report_json(run_cli, write_model, tmp_path):
    out, report_path = tmp_path / "out", tmp_path / "reports" / "r.json"
    result = run_cli(write_model(), "--json", "--report-json", report_path, "-o", out, "--experts", "3", "--top-k", "1")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads(report_path.read_text())
    assert printed["config"]["num_experts"] == 3 and printed["config"]["top_k"] == 1
    assert [s["path"] for s in printed["sites"]] == ["first", "second"]
    assert printed["output"] == str(out.resolve()) and not printed["dry_run"]
    assert {"load", "capture", "rewrite", "verify", "save", "total"} <= set(printed["timings_s"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["format"] == "switchhead-rewrite" and saved["sites"] == printed["sites"]
    assert saved["parameters_after"] > saved["parameters_before"]


def test_dry_run_writes_nothing(run_cli, write_model, tmp_path):
    result = run_cli(write_model(), "--dry-run", "--json", "--filter", "sec")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] and [s["path"] for s in report["sites"]] == ["first", "second"]
    assert report["selected"] == ["second"]
    assert not (tmp_path / "switchhead_out").exists()


def test_filter_rewrites_only_matching_modules(run_cli, write_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli(write_model(), "--filter", "^first$", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["path"] for s in report["sites"]] == ["first"]
    assert any(s["path"] == "second" for s in report["skipped"])


def test_default_output_and_rerun_replace_our_own_output(run_cli, write_model, tmp_path):
    assert run_cli(write_model(), "-q").exit_code == 0
    assert run_cli(write_model(), "-q", "--experts", "8", "--top-k", "3").exit_code == 0
    report = json.loads((tmp_path / "switchhead_out" / "report.json").read_text())
    assert report["config"]["num_experts"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "switchhead_out"]


def test_seed_makes_random_init_reproducible(run_cli, write_model, tmp_path):
    def weights(seed: int, out: str) -> dict[str, torch.Tensor]:
        result = run_cli(write_model(), "-q", "--init", "random", "--seed", seed, "-o", tmp_path / out)
        assert result.exit_code == 0, result.stderr
        return load_file(tmp_path / out / "model.safetensors")

    a, b, c = weights(3, "a"), weights(3, "b"), weights(4, "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_entry_and_inputs_names_and_neighbour_imports(run_cli, write_model, tmp_path):
    write_model("WIDTH = 16\n", name="settings.py")
    path = write_model("""
        import torch
        from settings import WIDTH  # a file next to the model file

        def make():
            return torch.nn.TransformerEncoderLayer(WIDTH, 2, 32, batch_first=True).eval()

        batch = ((torch.randn(2, 5, WIDTH),), {})
    """)
    result = run_cli(path, "--entry", "make", "--inputs", "batch", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["sites"]) == 1
    assert str(path.parent) not in sys.path


def test_help_shows_a_worked_example(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0
    for text in ("examples/nanogpt.py", "switchhead.load", "Exit codes", "--experts", "--top-k", "--filter", "--force"):
        assert text in result.stdout, text


def test_fold_to_fewer_heads_prints_costs_and_saves(run_cli, tmp_path):
    out = tmp_path / "folded"
    result = run_cli(EXAMPLES / "llama_small.py", "--init", "fold", "--heads", "2", "--seq-len", "512", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert all(s["num_heads"] == 4 and s["new_num_heads"] == 2 and s["num_experts"] == 2 for s in printed["sites"])
    assert printed["costs"]["seq_len"] == 512
    core = next(row for row in printed["costs"]["table"] if row[0].startswith("MACs/token, attention core (full"))
    assert core[3] == "0.50x"
    assert printed["notes"] and "lossy" in printed["notes"][0]
    loaded = switchhead.load(out)
    assert sum(1 for n in loaded.graph.nodes if "expert_o" in str(n.target)) == 2


def test_fold_cost_table_in_human_output(run_cli, write_model, tmp_path):
    result = run_cli(write_model(), "--init", "fold", "--heads", "1", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "Attention cost" in result.stdout and "after/before" in result.stdout and "lossy" in result.stdout


def test_onnx_export_from_the_command_line(run_cli, write_model, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "model.onnx"
    result = run_cli(write_model(), "-o", tmp_path / "out", "--onnx", onnx_file, "--json")
    assert result.exit_code == 0, result.stderr
    exported = json.loads(result.stdout)["onnx"]
    assert onnx_file.exists() and not exported["inline"]
    assert sum(exported["custom_nodes"].values()) == 4  # 2 attentions x (V, O)
    assert exported["verify_errors"] and max(exported["verify_errors"].values()) < 1e-4


HF_WITHOUT_INPUTS = """
import torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
model = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=37)).eval()
"""


def test_model_file_without_inputs_takes_the_mask_or_none(run_cli, write_model, tmp_path):
    """No example_inputs in the file: the model's dummy_inputs plus an all-ones mask; the saved model
    takes a tokenizer's input_ids with or without attention_mask."""
    out = tmp_path / "out"
    result = run_cli(write_model(HF_WITHOUT_INPUTS), "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    loaded = switchhead.load(out)
    ids = torch.randint(0, 99, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        alone, ones = loaded(input_ids=ids), loaded(input_ids=ids, attention_mask=torch.ones_like(ids))
        padded = loaded(input_ids=ids, attention_mask=mask)
    assert torch.equal(alone.last_hidden_state, ones.last_hidden_state)
    assert not torch.allclose(padded.last_hidden_state, ones.last_hidden_state)
