"""Every bad input of issue 3: one line on stderr, its own exit code, and nothing written."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import switchhead.api
import switchhead.io
from switchhead.cli import ExitCode

TINY_MODEL = (Path(__file__).parent / "tiny_model.py").read_text()
NO_ATTENTION_MODEL = """
import torch
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
example_inputs = (torch.randn(3, 8),)
"""


def leftovers(folder: Path) -> list[str]:
    """Staging folders a run must never leave behind."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("switchhead-rewrite: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def assert_failed(result, code: ExitCode, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    line = error_line(result)
    for needle in needles:
        assert needle in line, line
    return line


# --------------------------------------------------------------------------- the model file


def test_missing_file(run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli(tmp_path / "nope.py", "-o", out)
    assert_failed(result, ExitCode.MODEL, "nope.py: no such file")
    assert not out.exists()


def test_syntax_error_points_at_the_users_line(run_cli, write_model, tmp_path):
    path = write_model("import torch\n\nmodel = torch.nn.Linear(2,\n")
    line = assert_failed(run_cli(path, "-o", tmp_path / "out"), ExitCode.MODEL, "model.py:3", "SyntaxError")
    assert not (tmp_path / "out").exists(), line


def test_import_error_shows_the_users_frame_not_ours(run_cli, write_model, tmp_path):
    path = write_model("import torch\n\ndef helper():\n    raise RuntimeError('boom in helper')\n\nhelper()\n")
    line = assert_failed(run_cli(path, "-o", tmp_path / "out"), ExitCode.MODEL,
                         "model.py:4", "raise RuntimeError('boom in helper')", "RuntimeError: boom in helper")
    assert "switchhead/" not in line and "Traceback" not in line


def test_build_model_raising(run_cli, write_model, tmp_path):
    path = write_model("def build_model():\n    return 1 / 0\n\nexample_inputs = ()\n")
    assert_failed(run_cli(path, "-o", tmp_path / "out"), ExitCode.MODEL, "build_model()", "model.py:2", "ZeroDivisionError")


def test_no_model(run_cli, write_model, tmp_path):
    path = write_model("import torch\nexample_inputs = (torch.zeros(1),)\n")
    assert_failed(run_cli(path, "-o", tmp_path / "out"), ExitCode.MODEL, "defines neither `model`", "--entry")


def test_model_of_the_wrong_type(run_cli, write_model, tmp_path):
    path = write_model("model = 42\nexample_inputs = ()\n")
    assert_failed(run_cli(path, "-o", tmp_path / "out"), ExitCode.MODEL, "`model` is a int", "torch.nn.Module")


def test_unknown_entry_name(run_cli, write_model, tmp_path):
    assert_failed(run_cli(write_model(), "--entry", "missing", "-o", tmp_path / "out"), ExitCode.MODEL,
                  "has no `missing`", "--entry")


def test_no_inputs(run_cli, write_model, tmp_path):
    path = write_model("import torch\nmodel = torch.nn.Linear(2, 2)\n")
    assert_failed(run_cli(path, "-o", tmp_path / "out"), ExitCode.MODEL, "defines no `example_inputs`", "--inputs")


def test_inputs_of_the_wrong_type(run_cli, write_model, tmp_path):
    path = write_model("import torch\nmodel = torch.nn.Linear(2, 2)\nexample_inputs = [torch.zeros(2)]\n")
    assert_failed(run_cli(path, "-o", tmp_path / "out"), ExitCode.MODEL, "is a list", "(args, kwargs)")


def test_model_failing_on_its_inputs(run_cli, write_model, tmp_path):
    path = write_model("""
        import torch

        class Broken(torch.nn.Module):
            def forward(self, x):
                return x @ torch.ones(3, 3)

        model = Broken()
        example_inputs = (torch.zeros(2, 5),)
    """)
    out = tmp_path / "out"
    assert_failed(run_cli(path, "-o", out), ExitCode.MODEL, "fails on its example inputs", "model.py:6", "x @ torch.ones(3, 3)")
    assert not out.exists()


def test_no_attention_has_its_own_exit_code(run_cli, write_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli(write_model(NO_ATTENTION_MODEL), "-o", out)
    assert_failed(result, ExitCode.NO_ATTENTION, "no attention to rewrite")
    assert not out.exists()
    assert_failed(run_cli(write_model(NO_ATTENTION_MODEL), "--dry-run"), ExitCode.NO_ATTENTION, "no attention")


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("options, needle", [
    (["--experts", "4", "--top-k", "5"], "--top-k must be between 1 and --experts (4)"),
    (["--experts", "0"], "--experts must be at least 1"),
    (["--top-k", "0"], "--top-k must be between 1"),
    (["--filter", "attn("], "not a valid regular expression"),
    (["--init", "zeros"], "'zeros' is not one of"),
    (["--experts", "many"], "'many' is not a valid integer"),
    (["--dry-run", "--output", "somewhere"], "--output has no effect with --dry-run"),
    (["--dry-run", "--force"], "--force has no effect with --dry-run"),
])
def test_contradictory_or_bad_options(run_cli, write_model, tmp_path, options, needle):
    result = run_cli(write_model(), *options)
    assert_failed(result, ExitCode.USAGE, needle)
    assert not (tmp_path / "switchhead_out").exists()


def test_missing_argument_is_one_line(run_cli):
    assert_failed(run_cli(), ExitCode.USAGE, "Missing argument 'MODEL_FILE'")


def test_filter_matching_no_attention(run_cli, write_model, tmp_path):
    out = tmp_path / "out"
    line = assert_failed(run_cli(write_model(), "--filter", "norm", "-o", out), ExitCode.USAGE,
                         "--filter 'norm' matches none of the attention modules", "first", "second")
    assert not out.exists(), line
    assert_failed(run_cli(write_model(), "--filter", "^x", "--dry-run"), ExitCode.USAGE, "matches none")


# --------------------------------------------------------------------------- the output directory


def test_foreign_output_directory_is_refused_unless_forced(run_cli, write_model, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_failed(run_cli(write_model(), "-o", out), ExitCode.OUTPUT, "not written by switchhead-rewrite", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    result = run_cli(write_model(), "-o", out, "--force", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.graph.json", "model.safetensors", "notes.txt", "report.json"]
    assert (out / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_output_that_is_a_file(run_cli, write_model, tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    assert_failed(run_cli(write_model(), "-o", out, "--force"), ExitCode.OUTPUT, "is not a directory")
    assert out.read_text() == "x"


def test_disk_error_leaves_nothing(run_cli, write_model, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(switchhead.io, "save_file", disk_full)
    out = tmp_path / "deep" / "out"
    assert_failed(run_cli(write_model(), "-o", out), ExitCode.OUTPUT, "cannot write", "No space left on device")
    assert not (tmp_path / "deep").exists()  # not even the parent folder it created


def test_interrupted_save_keeps_the_previous_output(run_cli, write_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(write_model(), "-o", out, "-q").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(switchhead.io, "_write_text", interrupt)
    assert_failed(run_cli(write_model(), "-o", out, "--experts", "8"), ExitCode.INTERRUPTED, "interrupted")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_report_json_unwritable(run_cli, write_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_failed(run_cli(write_model(), "--dry-run", "--report-json", blocker / "r.json"), ExitCode.OUTPUT,
                  "cannot write --report-json")


def test_heads_without_fold_or_random_is_a_usage_error(run_cli, write_model, tmp_path):
    assert_failed(run_cli(write_model(), "--heads", "1", "-o", tmp_path / "out"), ExitCode.USAGE,
                  "--heads changes the model's function")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, where", [
    ((), "LlamaModel's config"),  # the counts its config declares, before the capture
    (("--filter", "layers"), "model.layers.0.self_attn (and 1 more like it)"),  # a filter: the attention found
])
def test_heads_the_model_cannot_fold_to_is_a_usage_error(run_cli, tmp_path, monkeypatch, options, where):
    """Refused before any rewrite, with the head counts that would work."""
    def no_rewrite(*args, **kwargs):
        raise AssertionError("the options were not checked before the rewrite")

    monkeypatch.setattr(switchhead.api, "PIPELINE", switchhead.api.PIPELINE[:1] + (no_rewrite, no_rewrite))
    examples = Path(__file__).parents[2] / "examples"
    result = run_cli(examples / "llama_small.py", "--init", "fold", "--heads", "3", *options, "-o", tmp_path / "out")
    assert_failed(result, ExitCode.USAGE, f"num_heads=3 does not fit {where}", "its 4 heads (2 KV heads) fold into 2, 4 heads")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (("--heads", "3"), "num_heads=3 does not fit first (and 1 more like it): its 2 heads fold into 1, 2 heads"),
    (("--heads", "1", "--experts", "1", "--top-k", "1"), "num_experts=1 is smaller than the 2 heads folded into each"),
])
def test_dry_run_checks_fold_options(run_cli, write_model, options, message):
    assert_failed(run_cli(write_model(), "--dry-run", "--init", "fold", *options), ExitCode.USAGE, message)


def test_fold_without_heads_asks_for_heads_before_loading(run_cli, write_model):
    model = write_model("raise SystemExit('the model file must not be loaded')\n")
    for mode in (("--dry-run",), ()):
        assert_failed(run_cli(model, "--init", "fold", *mode), ExitCode.USAGE, "init='fold' needs num_heads (--heads)")


def test_output_of_another_model_is_refused_unless_forced(run_cli, write_model, tmp_path):
    out = tmp_path / "out"
    assert run_cli(write_model(), "-o", out, "-q").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = write_model(TINY_MODEL.replace("VOCAB, WIDTH, HEADS = 32, 16, 2", "VOCAB, WIDTH, HEADS = 32, 16, 4"), "other.py")
    assert_failed(run_cli(other, "-o", out), ExitCode.OUTPUT, "holds the output of another model", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run_cli(other, "-o", out, "-q", "--force").exit_code == 0


def test_onnx_inline_without_onnx_is_a_usage_error(run_cli, write_model, tmp_path):
    assert_failed(run_cli(write_model(), "--onnx-inline", "-o", tmp_path / "out"), ExitCode.USAGE,
                  "--onnx-inline needs --onnx PATH")
    assert not (tmp_path / "out").exists()
