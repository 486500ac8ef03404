"""heal_on_files(): the whole recipe from text files, for the command line and scripts."""

from __future__ import annotations

import os
from typing import Any, Literal, Sequence

import torch

from switchhead.healing.config import LAYOUTS, HealConfig
from switchhead.healing.data import PackedTokens, Sentences, find_text_files, split_files, text_lines, tokenize_files
from switchhead.healing.distill import HealResult, LogFn, heal


def file_data(paths: Sequence[str | os.PathLike[str]], tokenizer: Any, seq_len: int, *,
              layout: Literal["packed", "sentences"] = "packed", keys: Sequence[str | None] = ("input_ids",),
              held_out: float = 0.05, eval_samples: int = 256, max_tokens: int | None = None,
              ) -> tuple[PackedTokens | Sentences, PackedTokens | Sentences, dict[str, Any]]:
    """(train, held-out, description) from the text files under `paths`.

    Files are split by name hash (`held_out` of them never trained on). With too few files for
    that split, the end of the text is held out instead (`held_out` of the tokens, or of the
    lines, and at least one sequence). "packed": documents joined with EOS and cut into windows of
    seq_len, passed as `keys[0]` (None: positionally); "sentences": one line per sequence, padded
    per batch, passing `keys` of the tokenizer's output.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'packed' or 'sentences', got {layout!r}")
    files = find_text_files(paths)
    try:
        train_files, eval_files = split_files(files, held_out=held_out)
        split = "files"
    except ValueError:
        train_files, eval_files, split = files, [], "tail"
    info: dict[str, Any] = {"files": len(files), "train_files": len(train_files), "held_out_files": len(eval_files),
                            "split": split, "layout": layout}
    if layout == "packed":
        if split == "files":
            train_ids = tokenize_files(train_files, tokenizer, max_tokens)
            eval_ids = tokenize_files(eval_files, tokenizer, eval_samples * seq_len)
        else:
            ids = tokenize_files(files, tokenizer)
            held = min(max(int(ids.numel() * held_out), seq_len), eval_samples * seq_len)
            if ids.numel() - held < seq_len:
                raise ValueError(f"the text files give {ids.numel()} tokens: too few for one training and one "
                                 f"held-out sequence of {seq_len} (--heal-seq-len)")
            train_ids, eval_ids = ids[:-held], ids[-held:]
            if max_tokens is not None:
                train_ids = train_ids[:max_tokens]
        train = PackedTokens(train_ids, seq_len, keys[0])
        evaluation = PackedTokens(eval_ids, seq_len, keys[0])
        info.update(train_tokens=len(train) * seq_len, held_out_tokens=len(evaluation) * seq_len)
    else:
        if split == "files":
            train_lines, eval_lines = text_lines(train_files), text_lines(eval_files)
        else:
            lines = text_lines(files)
            held = max(int(len(lines) * held_out), 1)
            if len(lines) - held < 1:
                raise ValueError(f"the text files give {len(lines)} usable line(s): too few for training and held-out")
            train_lines, eval_lines = lines[:-held], lines[-held:]
        if not train_lines or not eval_lines:
            raise ValueError("the text files give no usable lines (24 to 400 characters) for sentences")
        train = Sentences(train_lines, tokenizer, seq_len, keys)
        evaluation = Sentences(eval_lines[:eval_samples or None], tokenizer, seq_len, keys)
        info.update(train_sentences=len(train), held_out_sentences=len(evaluation))
    return train, evaluation, info


def heal_on_files(student: torch.nn.Module, teacher: torch.nn.Module, paths: Sequence[str | os.PathLike[str]],
                  tokenizer: Any, *, config: HealConfig | None = None, layout: Literal["packed", "sentences"] = "packed",
                  keys: Sequence[str | None] = ("input_ids",), held_out: float = 0.05, max_tokens: int | None = None,
                  log: LogFn | None = None, **overrides: Any) -> HealResult:
    """Heal on the text files under `paths`, tokenized with the model's own `tokenizer` (see
    file_data() for the split and the layouts; `keys` must be the inputs the student was
    converted with)."""
    cfg = config or HealConfig()
    if overrides:
        cfg = HealConfig.from_dict({**cfg.to_dict(), **overrides})
    train, held, _ = file_data(paths, tokenizer, cfg.seq_len, layout=layout, keys=keys, held_out=held_out,
                               eval_samples=cfg.eval_samples or 256, max_tokens=max_tokens)
    return heal(student, teacher, train, config=cfg, eval_data=held, log=log)
