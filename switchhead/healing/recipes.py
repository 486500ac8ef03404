"""heal_on_files(): the whole recipe from text files, for the command line and scripts."""

from __future__ import annotations

import os
from typing import Any, Literal, Sequence

import torch

from switchhead.healing.config import HealConfig
from switchhead.healing.data import PackedTokens, Sentences, find_text_files, split_files, text_lines, tokenize_files
from switchhead.healing.distill import HealResult, LogFn, heal


def heal_on_files(student: torch.nn.Module, teacher: torch.nn.Module, paths: Sequence[str | os.PathLike[str]],
                  tokenizer: Any, *, config: HealConfig | None = None, layout: Literal["packed", "sentences"] = "packed",
                  keys: Sequence[str] = ("input_ids",), held_out: float = 0.05, max_tokens: int | None = None,
                  log: LogFn | None = None, **overrides: Any) -> HealResult:
    """Heal on the text files under `paths`, tokenized with the model's own `tokenizer`.

    Files are split by name hash into training and held-out (`held_out` of the files). "packed":
    documents joined with EOS and cut into windows of config.seq_len, passed as `keys[0]` (causal
    LMs); "sentences": one line per sequence, padded per batch, passing `keys` of the tokenizer's
    output (encoders; `keys` must be the inputs the student was converted with).
    """
    cfg = config or HealConfig()
    if overrides:
        cfg = HealConfig.from_dict({**cfg.to_dict(), **overrides})
    train_files, eval_files = split_files(find_text_files(paths), held_out=held_out)
    eval_count = cfg.eval_samples or 256
    if layout == "packed":
        train = PackedTokens(tokenize_files(train_files, tokenizer, max_tokens), cfg.seq_len, keys[0])
        held = PackedTokens(tokenize_files(eval_files, tokenizer, eval_count * cfg.seq_len), cfg.seq_len, keys[0])
    elif layout == "sentences":
        train = Sentences(text_lines(train_files), tokenizer, cfg.seq_len, keys)
        held = Sentences(text_lines(eval_files)[:eval_count], tokenizer, cfg.seq_len, keys)
    else:
        raise ValueError(f"layout must be 'packed' or 'sentences', got {layout!r}")
    return heal(student, teacher, train, config=cfg, eval_data=held, log=log)
