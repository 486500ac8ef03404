"""Head counts that the model's own config refutes fail while the model file builds the model, before
the weights load or the capture (issue 23: the SmolLM2 GGUF dry run with --heads 4 took 26.6 s)."""

from __future__ import annotations

import pytest
import torch

import switchhead
from switchhead.cli import ExitCode
from switchhead.config import declared_heads
from test_cli_errors import TINY_MODEL, assert_failed

# A model that declares 9 heads / 3 KV heads in a Hugging Face-style config as it is built; the
# SystemExit stands for what from_pretrained does next (reading the weights).
DECLARING_MODEL = """
import types
import torch

class Declares(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(num_attention_heads=9, num_key_value_heads=3)
        self.proj = torch.nn.Linear(4, 4)

model = Declares()
raise SystemExit("the file went on past the model's construction")
"""


@pytest.mark.parametrize("mode", [("--dry-run",), ()])
def test_heads_the_config_refutes_stop_the_model_file(run_cli, write_model, tmp_path, mode):
    out = () if mode else ("-o", tmp_path / "out")
    result = run_cli(write_model(DECLARING_MODEL), *mode, "--init", "fold", "--heads", "4", *out)
    assert_failed(result, ExitCode.USAGE, "num_heads=4 does not fit Declares's config: its 9 heads (3 KV heads) fold "
                                          "into 3, 9 heads; pick one of those (--heads)")
    assert not (tmp_path / "out").exists()


def test_heads_the_config_allows_let_the_file_run(run_cli, write_model):
    result = run_cli(write_model(DECLARING_MODEL), "--dry-run", "--init", "fold", "--heads", "3")
    assert_failed(result, ExitCode.MODEL, "past the model's construction")


def test_a_filter_leaves_the_config_unchecked(run_cli, write_model):
    """The filter may leave the attention the config describes out, so only the sites decide."""
    result = run_cli(write_model(DECLARING_MODEL), "--dry-run", "--init", "fold", "--heads", "4", "--filter", "x")
    assert_failed(result, ExitCode.MODEL, "past the model's construction")


def test_a_model_without_a_config_is_checked_on_its_sites(run_cli, write_model):
    result = run_cli(write_model(TINY_MODEL), "--dry-run", "--init", "fold", "--heads", "3")
    assert_failed(result, ExitCode.USAGE, "num_heads=3 does not fit first (and 1 more like it)")


def test_convert_checks_the_config_before_capturing(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=36, intermediate_size=36, num_hidden_layers=1,
                                         num_attention_heads=9, num_key_value_heads=3))

    def no_capture(*args, **kwargs):
        raise AssertionError("captured before the options were checked")
    monkeypatch.setattr(switchhead.api, "capture", no_capture)
    cfg = switchhead.SwitchHeadConfig(init="fold", num_heads=4)
    with pytest.raises(switchhead.ConfigMismatchError, match="num_heads=4 does not fit LlamaForCausalLM's config: "
                                                             r"its 9 heads \(3 KV heads\) fold into 3, 9 heads"):
        switchhead.convert(model, kwargs={"input_ids": torch.zeros(2, 3, dtype=torch.long)}, config=cfg)


@pytest.mark.parametrize("config, expected", [
    ({"num_attention_heads": 9, "num_key_value_heads": 3}, (9, 3)),
    ({"num_attention_heads": 8, "num_key_value_heads": None}, (8, None)),  # KV heads not declared
    ({"num_attention_heads": 8, "num_key_value_heads": 3}, (8, None)),  # not a layout: unknown
    ({"num_attention_heads": [4, 8]}, (None, None)),  # per-layer counts: nothing declared
    ({"num_attention_heads": True}, (None, None)),
])
def test_declared_heads(config, expected):
    model = torch.nn.Module()
    model.config = type("Config", (), config)()
    assert declared_heads(model) == expected
