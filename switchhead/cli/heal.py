"""The `--heal-*` options of `switchhead-rewrite`: heal the converted model against the original on
text files, with the model file's own tokenizer, before it is saved.

The convert command (convert.py) applies `heal_options`, checks them with `check_heal_options` and
calls `heal_converted` between converting and saving.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import click
import torch

from switchhead.healing.config import LAYOUTS, LOSSES

HEAL_PARAMS = ("heal_data", "heal_steps", "heal_minutes", "heal_lr", "heal_batch_size", "heal_seq_len", "heal_loss",
               "heal_layout", "heal_eval_every", "heal_checkpoint_dir", "heal_checkpoint_every", "heal_resume",
               "heal_train_only", "heal_device")


def heal_options(command: Callable) -> Callable:
    """Add the --heal-* options to a click command (they arrive as keyword arguments HEAL_PARAMS)."""
    options = [
        click.option("--heal-data", multiple=True, type=click.Path(path_type=Path), metavar="PATH",
                     help="After converting, heal the model by distillation from the original on these text files "
                          "(files or folders of .py/.txt/.md/.rst; repeat for more), tokenized with the model "
                          "file's `tokenizer` / `get_tokenizer()`. 5% of the files are held out for evaluation."),
        click.option("--heal-steps", type=int, default=1000, show_default=True, help="Optimizer steps of healing."),
        click.option("--heal-minutes", type=float, default=None, metavar="M",
                     help="Wall-clock budget of healing: stop after M minutes (the learning-rate decay follows "
                          "the clock); --heal-steps stays an upper bound."),
        click.option("--heal-lr", type=float, default=3e-4, show_default=True, help="Peak AdamW learning rate."),
        click.option("--heal-batch-size", type=int, default=8, show_default=True, help="Sequences per step."),
        click.option("--heal-seq-len", type=int, default=256, show_default=True,
                     help="Tokens per packed sequence (max tokens per sentence with --heal-layout sentences)."),
        click.option("--heal-loss", type=click.Choice(LOSSES), default="auto", show_default=True,
                     help="kl on logits, mse / cosine on hidden states, cosine_pooled adds the sentence embeddings' "
                          "cosine; auto: kl when the model outputs logits."),
        click.option("--heal-layout", type=click.Choice(["auto", *LAYOUTS]), default="auto",
                     show_default=True,
                     help="packed: documents joined and cut into --heal-seq-len windows (language models); "
                          "sentences: one line per sequence, padded (encoders); auto: sentences when the "
                          "example inputs have an attention_mask."),
        click.option("--heal-eval-every", type=int, default=100, show_default=True,
                     help="Evaluate on the held-out text every N steps (and before and after)."),
        click.option("--heal-checkpoint-dir", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
                     help="Write healing checkpoints here (at the end, on Ctrl-C, every --heal-checkpoint-every)."),
        click.option("--heal-checkpoint-every", type=int, default=0, show_default=True,
                     help="Steps between checkpoints (0: only at the end and on Ctrl-C)."),
        click.option("--heal-resume", is_flag=True, help="Continue from the newest checkpoint in --heal-checkpoint-dir."),
        click.option("--heal-train-only", metavar="REGEX",
                     help="Only train parameters whose name matches (e.g. 'layers' keeps embeddings frozen)."),
        click.option("--heal-device", metavar="DEVICE",
                     help="Where to heal: cpu, cuda, cuda:1 [default: cuda when available, else cpu]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@dataclasses.dataclass
class HealOptions:
    data: tuple[Path, ...]
    steps: int
    minutes: float | None
    lr: float
    batch_size: int
    seq_len: int
    loss: str
    layout: str
    eval_every: int
    checkpoint_dir: Path | None
    checkpoint_every: int
    resume: bool
    train_only: str | None
    device: str | None

    @property
    def enabled(self) -> bool:
        return bool(self.data)


def check_heal_options(ctx: click.Context, params: dict[str, Any], dry_run: bool,
                       usage_error: Callable[[str], Exception]) -> HealOptions:
    """Pop the --heal-* values from `params` and check them; `usage_error(message)` makes the
    exception raised for bad combinations."""
    values = {name: params.pop(name) for name in HEAL_PARAMS}
    opts = HealOptions(**{name[len("heal_"):]: value for name, value in values.items()})
    given = [name for name in HEAL_PARAMS
             if name != "heal_data" and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if not opts.enabled:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise usage_error(f"{flags} {'needs' if len(given) == 1 else 'need'} --heal-data PATH (the text to heal on)")
        return opts
    if dry_run:
        raise usage_error("--heal-data has no effect with --dry-run")
    for name, value in (("--heal-steps", opts.steps), ("--heal-batch-size", opts.batch_size),
                        ("--heal-seq-len", opts.seq_len)):
        if value < 1:
            raise usage_error(f"{name} must be at least 1, got {value}")
    if opts.eval_every < 0 or opts.checkpoint_every < 0:
        raise usage_error("--heal-eval-every and --heal-checkpoint-every must not be negative")
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise usage_error(f"--heal-lr must be a positive number, got {opts.lr}")
    if opts.minutes is not None and not (math.isfinite(opts.minutes) and opts.minutes > 0):
        raise usage_error(f"--heal-minutes must be a positive number, got {opts.minutes}")
    if opts.resume and opts.checkpoint_dir is None:
        raise usage_error("--heal-resume needs --heal-checkpoint-dir DIR")
    missing = [str(p) for p in opts.data if not p.exists()]
    if missing:
        raise usage_error(f"--heal-data {missing[0]}: no such file or directory")
    from switchhead.healing.data import find_text_files
    try:  # before the (long) conversion
        find_text_files(opts.data)
    except FileNotFoundError as exc:
        raise usage_error(f"--heal-data: {exc}") from None
    return opts


def _token_keys(args: tuple, kwargs: dict[str, Any], layout: str) -> tuple[str | None, ...]:
    """Which inputs the healing batches fill, from the example inputs the model was converted with."""
    if layout == "sentences":
        return tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in kwargs) or ("input_ids",)
    if "input_ids" in kwargs:
        return ("input_ids",)
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        return (None,)
    raise ValueError("cannot tell which input takes the token ids: the example inputs should be one tensor of "
                     "token ids (positional) or a dict with `input_ids`")


def heal_converted(loaded, converted: torch.nn.Module, opts: HealOptions, tokenizer: Any, show: bool,
                   echo: Callable[[str], None]) -> dict[str, Any]:
    """Heal `converted` in place against `loaded.model` on opts.data; returns the summary for the
    report. Raises ValueError / FileNotFoundError for problems with the data."""
    from switchhead.healing import HealConfig, heal
    from switchhead.healing.recipes import file_data

    args, kwargs = loaded.args, loaded.kwargs
    layout = opts.layout if opts.layout != "auto" else ("sentences" if "attention_mask" in kwargs else "packed")
    keys = _token_keys(args, kwargs, layout)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = HealConfig(steps=opts.steps, lr=opts.lr, warmup=min(50, max(opts.steps // 10, 1)),
                        batch_size=opts.batch_size, seq_len=opts.seq_len, loss=opts.loss,
                        eval_every=opts.eval_every, checkpoint_dir=str(opts.checkpoint_dir) if opts.checkpoint_dir else None,
                        checkpoint_every=opts.checkpoint_every, resume=opts.resume, train_only=opts.train_only,
                        time_limit_s=opts.minutes * 60 if opts.minutes else None, device=device, progress=show,
                        log_every=max(1, min(10, opts.steps // 10)))
    train, held, data_info = file_data(opts.data, tokenizer, opts.seq_len, layout=layout, keys=keys,
                                       eval_samples=config.eval_samples)
    if show:
        echo(f"Healing on {data_info['files']} file(s) ({_describe(data_info)}), {config.steps} steps x "
             f"{config.batch_size} on {device}")
    started = time.perf_counter()
    teacher = loaded.model
    was_training = teacher.training
    result = heal(converted, teacher, train, config=config, eval_data=held)
    teacher.train(was_training)
    converted.to("cpu")
    teacher.to("cpu")
    first, last = (result.evals[0], result.final_eval) if result.evals else (None, None)
    summary = {"steps": result.steps, "tokens": result.tokens, "loss": result.loss, "task": result.task,
               "time_s": round(time.perf_counter() - started, 3), "device": device, "data": data_info,
               "unhealed": first, "healed": last, "evals": result.evals,
               "final_train_loss": result.history[-1]["loss"] if result.history else None,
               "first_train_loss": result.history[0]["loss"] if result.history else None,
               "trainable_parameters": result.trainable_parameters, "checkpoint": result.checkpoint,
               "config": config.to_dict()}
    if show and first is not None:
        metric = "ppl" if result.task == "causal_lm" else "cosine"
        teacher_ppl = f" (original {first['teacher_ppl']:.4g})" if metric == "ppl" else ""
        echo(f"Healed: held-out {metric} {first[metric]:.4g} -> {last[metric]:.4g}{teacher_ppl} after "
             f"{result.steps} steps, {result.tokens} tokens, {summary['time_s']:.1f} s")
    return summary


def _describe(info: dict[str, Any]) -> str:
    held = (f"{info['held_out_files']} held out" if info["split"] == "files" else "the last 5% of the text held out")
    size = (f"{info['train_tokens']} training tokens" if info["layout"] == "packed"
            else f"{info['train_sentences']} training sentences")
    return f"{held}; {size}"
