"""`switchhead-rewrite --heal-data`: heal the folded model against the original on text files with
the model file's own tokenizer, then save; and the one-line errors of the --heal-* options."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import switchhead
from switchhead.cli import ExitCode
from test_cli_errors import assert_failed

TINY = (Path(__file__).parent / "tiny_model.py").read_text()
CHAR_TOKENIZER = '''

class CharTokenizer:
    """One token per character; document separator 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}


def get_tokenizer():
    return CharTokenizer()
'''


def write_text(folder: Path, files: int = 3, words: int = 1500) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    vocabulary = "the cat sat on a mat and dog ran".split()
    for i in range(files):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(vocabulary) for _ in range(words)))
    return folder


def test_heal_data_heals_then_saves_a_loadable_model(write_model, run_cli, tmp_path):
    model = write_model(TINY + CHAR_TOKENIZER)
    text = write_text(tmp_path / "text")
    result = run_cli(model, "--init", "fold", "--heads", "1", "--heal-data", text, "--heal-steps", "30",
                     "--heal-seq-len", "32", "--heal-batch-size", "8", "--heal-lr", "1e-2", "--heal-eval-every", "15",
                     "--output", tmp_path / "out", "--report-json", tmp_path / "report.json")
    assert result.exit_code == 0, result.stderr
    assert "Healed: held-out" in result.stderr
    heal = json.loads((tmp_path / "report.json").read_text())["heal"]
    assert heal["steps"] == 30 and heal["tokens"] == 30 * 8 * 32 and heal["data"]["split"] in ("files", "tail")
    assert heal["final_train_loss"] < 0.5 * heal["first_train_loss"]
    assert heal["healed"]["cosine"] > heal["unhealed"]["cosine"]  # the model returns bare logits: cosine task
    assert [e["step"] for e in heal["evals"]] == [0, 15, 30]
    # the saved model is the healed one
    loaded = switchhead.load(tmp_path / "out")
    ids = torch.randint(1, 32, (2, 12))
    original = run_model_file(model)
    with torch.no_grad():
        assert loaded(ids).shape == original(ids).shape == (2, 12, 32)


def run_model_file(path: Path):
    from switchhead.model_file import load_model_file
    return load_model_file(path).model


def test_heal_data_without_a_tokenizer_says_what_to_add(write_model, run_cli, tmp_path):
    model = write_model(TINY)
    result = run_cli(model, "--init", "fold", "--heads", "1", "--heal-data", write_text(tmp_path / "text"),
                     "--output", tmp_path / "out")
    line = assert_failed(result, ExitCode.USAGE, "--heal-data needs the model's tokenizer", "get_tokenizer()", "model.py")
    assert len(line) < 300
    assert not (tmp_path / "out").exists()


def test_heal_data_without_text_files(write_model, run_cli, tmp_path):
    model = write_model(TINY + CHAR_TOKENIZER)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "weights.bin").write_bytes(b"\0")
    assert_failed(run_cli(model, "--init", "fold", "--heads", "1", "--heal-data", empty), ExitCode.USAGE,
                  "--heal-data", "no text files")
    assert_failed(run_cli(model, "--init", "fold", "--heads", "1", "--heal-data", tmp_path / "missing"),
                  ExitCode.USAGE, "no such file or directory")


def test_heal_options_without_heal_data(write_model, run_cli, tmp_path):
    model = write_model(TINY + CHAR_TOKENIZER)
    assert_failed(run_cli(model, "--init", "fold", "--heads", "1", "--heal-steps", "5"), ExitCode.USAGE,
                  "--heal-steps needs --heal-data")
    assert_failed(run_cli(model, "--heal-lr", "1e-3", "--heal-resume"), ExitCode.USAGE,
                  "--heal-lr, --heal-resume need --heal-data")
    text = write_text(tmp_path / "text", files=1, words=50)
    assert_failed(run_cli(model, "--init", "fold", "--heads", "1", "--heal-data", text, "--heal-resume"),
                  ExitCode.USAGE, "--heal-resume needs --heal-checkpoint-dir")
    assert_failed(run_cli(model, "--dry-run", "--heal-data", text), ExitCode.USAGE, "no effect with --dry-run")
