"""Healing data: packed token windows for language models, padded sentences for encoders.

A data set is anything with `__len__` (number of samples) and `batch(indices) -> (args, kwargs)`,
the inputs of one call of the model. The order of samples is a pure function of (seed, position),
so a run can stop and resume at any step, and every process of a distributed run takes its own
rows of the same global batch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import torch

Batch = tuple[tuple[Any, ...], dict[str, Any]]
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


class HealData(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> Batch: ...


class PackedTokens:
    """Token ids cut into non-overlapping windows of `seq_len` (the tail is dropped).

    `key` names the model's keyword argument ("input_ids"); None passes the ids positionally.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, key: str | None = "input_ids"):
        tokens = torch.as_tensor(tokens).flatten().long()
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if tokens.numel() < seq_len:
            raise ValueError(f"{tokens.numel()} tokens do not fill one sequence of {seq_len}")
        count = tokens.numel() // seq_len
        self.windows = tokens[: count * seq_len].view(count, seq_len)
        self.key = key

    def __len__(self) -> int:
        return self.windows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    def batch(self, indices: Sequence[int]) -> Batch:
        ids = self.windows[torch.as_tensor(list(indices), dtype=torch.long)]
        return ((ids,), {}) if self.key is None else ((), {self.key: ids})


class Sentences:
    """Texts tokenized one per sequence, padded to the longest of each batch.

    `keys` are the tokenizer outputs the model takes (they must match the inputs it was
    converted with: an exported student only accepts those). `pad_to_max=True` pads every batch
    to `max_length` instead: one shape, so torch.compile compiles once.
    """

    def __init__(self, texts: Sequence[str], tokenizer: Any, max_length: int = 128,
                 keys: Sequence[str] = ("input_ids", "attention_mask"), pad_to_max: bool = False):
        if not texts:
            raise ValueError("no texts")
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.keys = tuple(keys)
        self.pad_to_max = pad_to_max

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, indices: Sequence[int]) -> Batch:
        encoded = self.tokenizer([self.texts[i] for i in indices], padding="max_length" if self.pad_to_max else True,
                                 truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        missing = [k for k in self.keys if k not in encoded]
        if missing:
            raise ValueError(f"the tokenizer gives no {', '.join(missing)}")
        return (), {k: encoded[k] for k in self.keys}


class Sampler:
    """Sample indices of each global batch: an independent shuffle of the data per epoch."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("the data set is empty")
        self.size, self.seed = size, seed
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator)
        return self._order

    def indices(self, start: int, count: int) -> list[int]:
        """The samples at global positions start .. start + count - 1."""
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.size)
            out.append(int(self._permutation(epoch)[offset]))
        return out


def as_heal_data(data: Any, seq_len: int) -> HealData:
    """`data` as a HealData: a HealData passes through; a tensor of token ids is packed into
    windows of seq_len (1-D) or used row by row (2-D)."""
    if isinstance(data, torch.Tensor):
        if data.dim() == 2:
            return PackedTokens(data.flatten(), data.shape[1])
        return PackedTokens(data, seq_len)
    if hasattr(data, "batch") and hasattr(data, "__len__"):
        return data
    raise TypeError(f"data must be a HealData (PackedTokens, Sentences, ...) or a tensor of token ids, "
                    f"got {type(data).__name__}")


# ------------------------------------------------------------------------------ text files


def find_text_files(paths: Iterable[str | os.PathLike[str]], suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Path]:
    """Every file named in `paths`, and every file with one of `suffixes` under the directories
    among them, sorted."""
    files: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        elif path.is_file():
            files.add(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(suffixes)}) under {', '.join(map(str, paths))}")
    return sorted(files)


def split_files(files: Sequence[Path], held_out: float = 0.05, salt: str = "heal") -> tuple[list[Path], list[Path]]:
    """(train, held-out) split by file, decided by a hash of each file's name: stable across
    machines and runs, and no held-out file ever contributes a training token."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    train, evaluation = [], []
    for path in files:
        digest = hashlib.sha256(f"{salt}:{Path(path).name}:{Path(path).parent.name}".encode()).digest()
        (evaluation if int.from_bytes(digest[:8], "big") / 2**64 < held_out else train).append(path)
    if not train or not evaluation:
        raise ValueError(f"{len(files)} files give an empty split at held_out={held_out}")
    return train, evaluation


def read_text(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def tokenize_files(files: Sequence[Path], tokenizer: Any, max_tokens: int | None = None,
                   chunk_chars: int = 1 << 16, files_per_call: int = 64) -> torch.Tensor:
    """The files' token ids, each document followed by the tokenizer's EOS (else SEP) token,
    stopping once `max_tokens` are collected.

    `tokenizer(text, add_special_tokens=False)["input_ids"]` must give a text's ids (any Hugging
    Face tokenizer does). A fast one (`is_fast`) is given the texts of `files_per_call` files at
    once, which it spreads over the CPU cores."""
    separator = getattr(tokenizer, "eos_token_id", None)
    if separator is None:
        separator = getattr(tokenizer, "sep_token_id", None)
    group = files_per_call if getattr(tokenizer, "is_fast", False) else 1
    pieces: list[torch.Tensor] = []
    total = 0
    for first in range(0, len(files), group):
        texts = [read_text(path) for path in files[first:first + group]]
        # long files in pieces: fast tokenizers are quadratic-ish on very long inputs
        chunks = [[text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars)] for text in texts]
        flat = [chunk for file_chunks in chunks for chunk in file_chunks]
        if group > 1:
            flat_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        else:
            flat_ids = [tokenizer(chunk, add_special_tokens=False)["input_ids"] for chunk in flat]
        position = 0
        for file_chunks in chunks:
            ids: list[int] = []
            for chunk_ids in flat_ids[position:position + len(file_chunks)]:
                ids.extend(chunk_ids)
            position += len(file_chunks)
            if separator is not None:
                ids.append(separator)
            pieces.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        raise ValueError("no tokens")
    tokens = torch.cat(pieces)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def pack_files(files: Sequence[Path], tokenizer: Any, seq_len: int, max_tokens: int | None = None,
               key: str | None = "input_ids") -> PackedTokens:
    """Text files tokenized with the model's tokenizer and packed into windows of seq_len."""
    return PackedTokens(tokenize_files(files, tokenizer, max_tokens), seq_len, key)


def text_lines(files: Sequence[Path], min_chars: int = 24, max_chars: int = 400) -> list[str]:
    """Non-blank lines of the files, stripped, between min_chars and max_chars long, without
    repeats: sentences for encoders."""
    seen: dict[str, None] = {}
    for path in files:
        for line in read_text(path).splitlines():
            line = line.strip()
            if min_chars <= len(line) <= max_chars:
                seen.setdefault(line, None)
    return list(seen)
