"""The validated, versioned configuration of a healing run."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from switchhead.config import check_known_fields, check_regex

LOSSES = ("auto", "kl", "mse", "cosine", "cosine_pooled")
TASKS = ("auto", "causal_lm", "encoder")
PRECISIONS = ("auto", "fp32", "bf16")
LAYOUTS = ("packed", "sentences")  # how text files become sequences (recipes.file_data)
STRATEGIES = ("auto", "ddp", "fsdp")
HEAL_CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class HealConfig:
    """How a folded student is healed by distillation from its dense teacher.

    Args:
        steps: optimizer steps to run in total (a resumed run counts the steps already done).
        lr: peak AdamW learning rate, reached after `warmup` steps, then cosine decay to
            `lr * min_lr_ratio` at `steps`.
        stop_at: end this invocation at this step (with a checkpoint when checkpoint_dir is set)
            while the schedule still runs to `steps`: for jobs with a time limit, resumed later.
        time_limit_s: a wall-clock budget for the whole run (the first evaluation and the first,
            compiling, step included): training ends when it is spent, and the cosine decay runs
            on the fraction of the budget spent after the first step (or on steps, whichever is
            further), so a run of any speed ends at the low learning rate. `steps` stays an upper
            bound. Timed runs are not bit-for-bit reproducible (the schedule follows the clock).
        warmup: linear warmup steps (from lr / warmup).
        min_lr_ratio: final learning rate as a fraction of `lr`.
        weight_decay: AdamW decoupled weight decay (applied to tensors with 2+ dims only).
        betas: AdamW betas.
        train_only: optional regex; only parameters whose name matches (re.search) are trained,
            e.g. "layers|encoder" keeps the embeddings frozen (folding changed only attention, and
            a frozen embedding matrix saves most of the optimizer's time on small models).
        grad_clip: clip the global gradient norm to this value (0 disables).
        batch_size: sequences per step on EACH process; the global batch is batch_size * world size.
        seq_len: tokens per packed sequence when `data` is a tensor of token ids.
        loss: "kl" on logits (temperature `temperature`), "mse" on the hidden states (relative to the
            teacher's mean square), "cosine" (1 - cosine similarity of each token's hidden state),
            "cosine_pooled" (cosine plus 1 - cosine of the mean-pooled sentence embeddings, per
            token), or "auto": kl where the output has logits, else mse.
        temperature: softmax temperature of the KL loss (the loss is scaled by temperature**2).
        task: what the evaluation measures: "causal_lm" (perplexity on next tokens), "encoder"
            (cosine similarity of mean-pooled embeddings to the teacher's), "auto" (causal_lm when
            the output has logits).
        eval_every: evaluate on `eval_data` every this many steps (0: only at start and end).
        eval_every_s: also evaluate when this many seconds passed since the last evaluation (0: off).
        eval_samples: at most this many held-out sequences per evaluation (0: all).
        checkpoint_dir: where checkpoints go (None: no checkpoints).
        checkpoint_every: write a checkpoint every this many steps (0: only at the end and on Ctrl-C).
        keep_checkpoints: how many of the newest checkpoints to keep.
        resume: continue from the newest checkpoint in checkpoint_dir when there is one.
        device: "cpu", "cuda", "cuda:1", ...; None: the student's device (under torchrun with CUDA,
            the local rank's GPU).
        precision: "bf16" autocast, "fp32", or "auto" (bf16 on CUDA, fp32 elsewhere). Weights and
            optimizer state stay fp32.
        compile: torch.compile student and teacher; None: on CUDA only.
        strategy: multi-process wrapping under torchrun: "ddp", "fsdp" (FSDP2 fully_shard), "auto" (ddp).
        seed: seed of the data order (and of torch's RNG at the start of a fresh run).
        log_every: steps between progress updates and `log` callbacks.
        progress: show a rich progress bar (rank 0 only).
        version: version of this config format.
    """

    steps: int = 1000
    lr: float = 1e-4
    stop_at: int | None = None
    time_limit_s: float | None = None
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    train_only: str | None = None
    grad_clip: float = 1.0
    batch_size: int = 8
    seq_len: int = 256
    loss: Literal["auto", "kl", "mse", "cosine", "cosine_pooled"] = "auto"
    temperature: float = 1.0
    task: Literal["auto", "causal_lm", "encoder"] = "auto"
    eval_every: int = 100
    eval_every_s: float = 0.0
    eval_samples: int = 256
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    device: str | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool | None = None
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    version: int = HEAL_CONFIG_VERSION

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "keep_checkpoints"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup", "eval_every", "eval_samples", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.stop_at is not None:
            _positive_int("stop_at", self.stop_at)
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.time_limit_s is not None and not (isinstance(self.time_limit_s, (int, float))
                                                  and math.isfinite(self.time_limit_s) and self.time_limit_s > 0):
            raise ValueError(f"time_limit_s must be a positive number of seconds, got {self.time_limit_s!r}")
        for name in ("weight_decay", "grad_clip", "eval_every_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name, allowed in (("loss", LOSSES), ("task", TASKS), ("precision", PRECISIONS), ("strategy", STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.train_only is not None:
            check_regex("train_only", self.train_only)
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be True, False or None, got {self.compile!r}")
        if self.version != HEAL_CONFIG_VERSION:
            raise ValueError(f"heal config version {self.version} is not supported (this build reads {HEAL_CONFIG_VERSION})")

    def lr_at(self, step: int, time_fraction: float = 0.0) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay over
        the steps, or over the time budget when `time_fraction` (of it spent) is further."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(self.steps - self.warmup, 1)
        progress = min(max((step - self.warmup) / span, time_fraction), 1.0)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HealConfig":
        check_known_fields(cls, data)
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
