"""heal(): knowledge distillation from the dense original into its folded SwitchHead student.

One loop for one process and for `torchrun --nproc_per_node N`: each process takes its rows of the
same global batch (data.Sampler), losses are summed and divided by the global token count, so
gradients equal those of one process on the global batch. Weights, optimizer, data position and
RNG go into atomic checkpoints (checkpoint.py); a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import threading
import time
from typing import Any, Callable

import torch
import torch.fx
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils import _pytree as pytree

from switchhead.graph.surgery import module_at
from switchhead.healing import checkpoint as ckpt
from switchhead.healing import distributed as D
from switchhead.healing.config import HealConfig
from switchhead.healing.data import HealData, Sampler, as_heal_data
from switchhead.healing.losses import (
    LOSSES,
    embedding_cosine,
    next_token_nll,
    resolve_loss,
    resolve_task,
    token_mask,
)
from switchhead.healing.progress import Progress

LogFn = Callable[[dict[str, Any]], None]
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class HealInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped heal() after a whole step; `result.checkpoint` is where it saved."""

    def __init__(self, result: "HealResult"):
        super().__init__(f"healing stopped at step {result.steps}" +
                         (f"; checkpoint {result.checkpoint}" if result.checkpoint else ""))
        self.result = result


@dataclasses.dataclass
class HealResult:
    """What a healing run did. `history` has one record per logged step, `evals` one per evaluation."""

    student: torch.nn.Module
    steps: int
    tokens: int
    loss: str
    task: str
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    checkpoint: str | None
    trainable_parameters: int
    frozen_unused: list[str]
    untied: list[str] = dataclasses.field(default_factory=list)
    interrupted: bool = False
    first_step_s: float | None = None  # clock at the end of the first step (compiling, on CUDA)
    elapsed_s: float = 0.0  # the run's clock at the end

    @property
    def final_eval(self) -> dict[str, Any] | None:
        return self.evals[-1] if self.evals else None


def heal(student: torch.nn.Module, teacher: torch.nn.Module, data: HealData | torch.Tensor, *,
         config: HealConfig | None = None, eval_data: HealData | torch.Tensor | None = None,
         log: LogFn | None = None, **overrides: Any) -> HealResult:
    """Distill `teacher` (the dense original) into `student` (its converted copy), in place.

    `data`/`eval_data`: a HealData (data.PackedTokens, data.Sentences, or any object with
    `__len__` and `batch(indices) -> (args, kwargs)`), or a tensor of token ids. The batches must
    be valid inputs of both models. Settings are `config` (a HealConfig) with keyword overrides,
    e.g. `heal(s, t, data, steps=500, lr=3e-4)`. `log` is called with every progress record and
    every evaluation. Parameters the student shares with the teacher (convert() reuses the
    original's) are copied first, so the teacher is never changed. Parameters of a GraphModule
    student that its graph never reads (the dense
    Q/K/V weights that folding replaced) are frozen. Ctrl-C or SIGTERM finishes the current step,
    writes a checkpoint and raises HealInterrupted.

    Under torchrun heal() starts the process group when none exists and ends it on return, except
    with strategy="fsdp": the student then stays sharded across the processes (gather it with
    torch.distributed.checkpoint.state_dict.get_model_state_dict) and the caller ends the group.
    """
    cfg = dataclasses.replace(config or HealConfig(), **overrides) if overrides else (config or HealConfig())
    info, device = D.setup(cfg.device, student)
    try:
        return _Run(student, teacher, data, eval_data, cfg, info, device, log).run()
    finally:
        if cfg.strategy != "fsdp":  # an FSDP student stays sharded: its weights need the group
            D.teardown(info)


def _used_parameter_names(module: torch.nn.Module) -> set[str] | None:
    """Names of the parameters a GraphModule's graph reads; None for other modules (all used)."""
    if not isinstance(module, torch.fx.GraphModule):
        return None
    attrs = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in module.graph.nodes if n.op == "call_module"}
    return {name for name, _ in module.named_parameters()
            if name in attrs or any(name.startswith(f"{m}.") for m in called)}


def _untie(student: torch.nn.Module, teacher: torch.nn.Module) -> list[str]:
    """Give the student its own copy of every parameter it shares with the teacher (convert()'s
    GraphModule reuses the original's Parameter objects): training must not move the targets.
    Ties inside the student stay ties. Returns the names of the parameters copied."""
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    copies: dict[int, torch.nn.Parameter] = {}
    untied = []
    for name, param in list(student.named_parameters(remove_duplicate=False)):
        if param.data_ptr() not in teacher_storage:
            continue
        if id(param) not in copies:
            copies[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        path, _, attr = name.rpartition(".")
        owner = module_at(student, path)
        owner._parameters[attr] = copies[id(param)]
        untied.append(name)
    return untied


def _to(batch: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x, batch)


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop reads after each step; a second Ctrl-C raises."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@torch.no_grad()
def metric_sums(student: torch.nn.Module, teacher: torch.nn.Module | None, data: HealData, indices: list[int],
                task: str, batch_size: int, device: torch.device, autocast: Callable[[], Any]) -> torch.Tensor:
    """[4] float64 on `device`: the student's held-out metric sum and count over the samples `indices`
    of `data`, then the teacher's (zeros without a teacher). causal_lm: next-token NLL and predicted
    tokens; encoder: cosine of mean-pooled sentence embeddings to the teacher's (needs the teacher)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # student sum, count, teacher sum, count
    for start in range(0, len(indices), batch_size):
        args, kwargs = _to(data.batch(indices[start:start + batch_size]), device)
        with autocast():
            s_out = student(*args, **kwargs)
            t_out = teacher(*args, **kwargs) if teacher is not None else None
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = token_mask(kwargs, ids.shape, device)
        if task == "causal_lm":
            s, n = next_token_nll(s_out, ids, mask)
            sums[:2] += torch.stack([s, n]).double()
            if t_out is not None:
                sums[2:] += torch.stack(next_token_nll(t_out, ids, mask)).double()
        else:
            sums[:2] += torch.stack(embedding_cosine(s_out, t_out, mask)).double()
    return sums


@torch.no_grad()
def evaluate(student: torch.nn.Module, teacher: torch.nn.Module, data: HealData | torch.Tensor, *,
             config: HealConfig | None = None, **overrides: Any) -> dict[str, float]:
    """The held-out metrics heal() reports, on other data (one process): {"ppl", "teacher_ppl"} for a
    causal LM, {"cosine"} (to the teacher's sentence embeddings) for an encoder. Uses the config's
    task, batch size, eval_samples (0: all), device and precision; the models move to that device."""
    cfg = dataclasses.replace(config or HealConfig(), **overrides) if overrides else (config or HealConfig())
    device = D.resolve_device(cfg.device, student, 0, False)
    data = as_heal_data(data, cfg.seq_len)
    student, teacher = student.to(device), teacher.to(device).eval()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    args, kwargs = _to(data.batch([0]), device)
    task = resolve_task(cfg.task, teacher(*args, **kwargs))
    total = len(data) if cfg.eval_samples == 0 else min(len(data), cfg.eval_samples)
    sums = metric_sums(student, teacher, data, list(range(total)), task, cfg.batch_size, device, autocast)
    if task == "causal_lm":
        return {"ppl": math.exp(sums[0].item() / max(sums[1].item(), 1)),
                "teacher_ppl": math.exp(sums[2].item() / max(sums[3].item(), 1)), "eval_samples": total}
    return {"cosine": sums[0].item() / max(sums[1].item(), 1), "eval_samples": total}


class _Run:
    def __init__(self, student, teacher, data, eval_data, cfg: HealConfig, info: D.DistInfo, device, log):
        self.cfg, self.info, self.device, self.log = cfg, info, device, log
        self.student = student.to(device)
        self.teacher = teacher.to(device).eval()
        self.untied = _untie(self.student, self.teacher)  # the teacher runs under no_grad; its flags stay
        used = _used_parameter_names(self.student)
        self.frozen = []
        for name, p in self.student.named_parameters():
            if used is not None and name not in used and p.requires_grad:
                p.requires_grad_(False)
                self.frozen.append(name)
            elif cfg.train_only is not None and not re.search(cfg.train_only, name):
                p.requires_grad_(False)
        params = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        self.trainable = sum(p.numel() for _, p in params)
        self.data = as_heal_data(data, cfg.seq_len)
        self.eval_data = None if eval_data is None else as_heal_data(eval_data, cfg.seq_len)
        self.sampler = Sampler(len(self.data), cfg.seed)
        self.global_batch = cfg.batch_size * info.world
        self.model = D.wrap(self.student, cfg.strategy, device, info)
        params = [p for p in self.student.parameters() if p.requires_grad]  # FSDP2 replaced them with shards
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr_at(0), betas=cfg.betas)
        self.compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
        self.call_student = torch.compile(self.model) if self.compile else self.model
        self.call_teacher = torch.compile(self.teacher) if self.compile else self.teacher
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.step, self.tokens = 0, 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.loss_name = self.task = None
        self.teacher_metrics: dict[str, float] | None = None
        self.last_checkpoint: str | None = None
        # The run's clock (seconds, the same on every process: the mean of their clocks, shared in
        # the step's collective). It goes on across a resume; the time budget's decay starts after
        # the first (compiling) step.
        self.clock_offset, self.clock, self.first_step_clock, self.last_eval_clock = 0.0, 0.0, None, 0.0
        self.started = time.perf_counter()

    def _local_clock(self) -> float:
        return self.clock_offset + time.perf_counter() - self.started

    def _time_fraction(self) -> float:
        """How much of the time budget after the first step is spent (0 without a budget)."""
        limit = self.cfg.time_limit_s
        if limit is None or self.first_step_clock is None:
            return 0.0
        return 1.0 if limit <= self.first_step_clock else (self.clock - self.first_step_clock) / (limit - self.first_step_clock)

    def _lr(self, step: int) -> float:
        return self.cfg.lr_at(step, self._time_fraction())

    # ---------------------------------------------------------------------- checkpoints

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.cfg.checkpoint_dir) if self.cfg.resume else None
        if path is None:
            return
        model, optimizer, rng, meta = ckpt.load_checkpoint(path)
        if meta["global_batch"] != self.global_batch:
            raise ckpt.CheckpointError(f"{path} was written with a global batch of {meta['global_batch']}, "
                                       f"this run has {self.global_batch}: the data position would not match")
        set_model_state_dict(self.student, model, options=StateDictOptions(full_state_dict=True, strict=True))
        set_optimizer_state_dict(self.student, self.optimizer, optimizer, options=StateDictOptions(full_state_dict=True))
        ckpt.restore_rng(rng, self.info.rank)
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.history, self.evals = meta["history"], meta["evals"]
        self.teacher_metrics = meta.get("teacher_metrics")
        self.last_checkpoint = str(path)
        self.clock_offset = self.clock = self.last_eval_clock = float(meta.get("elapsed_s", 0.0))
        self.first_step_clock = meta.get("first_step_s")
        self.started = time.perf_counter()

    def _save(self) -> None:
        if self.cfg.checkpoint_dir is None:
            return
        model = get_model_state_dict(self.student, options=FULL)
        optimizer = get_optimizer_state_dict(self.student, self.optimizer, options=FULL)
        rngs = D.gather_objects(ckpt.rng_state(self.info.rank), self.info)
        if self.info.is_main:
            meta = {"tokens": self.tokens, "samples": self.step * self.global_batch, "global_batch": self.global_batch,
                    "world_size": self.info.world, "config": self.cfg.to_dict(), "history": self.history,
                    "evals": self.evals, "teacher_metrics": self.teacher_metrics, "elapsed_s": self.clock,
                    "first_step_s": self.first_step_clock}
            path = ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.step, model, optimizer,
                                        {k: v for r in rngs for k, v in r.items()}, meta, self.cfg.keep_checkpoints)
            self.last_checkpoint = str(path)
        D.barrier(self.info)
        if not self.info.is_main:
            self.last_checkpoint = str(ckpt.latest_checkpoint(self.cfg.checkpoint_dir))

    # ---------------------------------------------------------------------- evaluation

    def _evaluate(self) -> dict[str, Any] | None:
        if self.eval_data is None:
            return None
        total = len(self.eval_data) if self.cfg.eval_samples == 0 else min(len(self.eval_data), self.cfg.eval_samples)
        total -= total % self.info.world  # equal shares: an FSDP forward is a collective on every rank
        mine = list(range(self.info.rank, total, self.info.world))
        need_teacher = self.task == "encoder" or self.teacher_metrics is None
        sums = metric_sums(self.student, self.teacher if need_teacher else None, self.eval_data, mine, self.task,
                           self.cfg.batch_size, self.device, self.autocast)
        sums = D.all_sum(sums, self.info)
        record: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        if self.task == "causal_lm":
            if self.teacher_metrics is None:
                self.teacher_metrics = {"teacher_ppl": math.exp(sums[2].item() / max(sums[3].item(), 1))}
            record["ppl"] = math.exp(sums[0].item() / max(sums[1].item(), 1))
            record.update(self.teacher_metrics)
        else:
            record["cosine"] = sums[0].item() / max(sums[1].item(), 1)
        record["eval_samples"] = total
        record["elapsed_s"] = round(self.clock, 3)
        self.last_eval_clock = self.clock
        self.evals.append(record)
        if self.log:
            self.log({"kind": "eval", **record})
        return record

    # ---------------------------------------------------------------------- training

    def _train_step(self, stop: _StopFlag) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        cfg, info = self.cfg, self.info
        indices = self.sampler.indices(self.step * self.global_batch, self.global_batch)
        local = indices[info.rank * cfg.batch_size:(info.rank + 1) * cfg.batch_size]
        args, kwargs = _to(self.data.batch(local), self.device)
        with torch.no_grad(), self.autocast():
            t_out = self.call_teacher(*args, **kwargs)
        with self.autocast():
            s_out = self.call_student(*args, **kwargs)
        mask_of = lambda shape, device: token_mask(kwargs, shape, device)  # noqa: E731
        loss_sum, count = LOSSES[self.loss_name](s_out, t_out, mask_of, cfg.temperature)
        # One collective: the global token count, whether any process was asked to stop, the clock.
        flags = torch.tensor([float(stop.signal is not None), self._local_clock()], dtype=torch.float64)
        shared = D.all_sum(torch.cat([count.detach().double().reshape(1), flags.to(count.device)]), info)
        global_count = shared[0].float().clamp_min(1)
        (loss_sum * info.world / global_count).backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.zeros((), device=self.device))
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.clock = shared[2].item() / info.world
        return loss_sum.detach(), global_count, grad_norm, bool(shared[1].item() > 0)

    def run(self) -> HealResult:
        cfg, info = self.cfg, self.info
        if cfg.checkpoint_dir is not None:
            self._resume()
        with torch.no_grad():  # decide loss and task from one teacher output
            args, kwargs = _to(self.data.batch(self.sampler.indices(0, 1)), self.device)
            probe = self.teacher(*args, **kwargs)
            self.loss_name, self.task = resolve_loss(cfg.loss, probe), resolve_task(cfg.task, probe)
            del probe
        if not self.evals:
            self._evaluate()
        end = min(cfg.steps, cfg.stop_at or cfg.steps)
        bar = Progress(cfg.steps, enabled=cfg.progress and info.is_main)
        interrupted = False
        window_loss, window_count, window_tokens, window_start = 0.0, 0.0, 0, time.perf_counter()
        with bar, _StopFlag() as stop:
            bar.advance_to(self.step)
            while self.step < end:
                lr = self._lr(self.step)
                loss_sum, global_count, grad_norm, stopping = self._train_step(stop)
                self.step += 1
                if self.first_step_clock is None:
                    self.first_step_clock = self.clock
                out_of_time = cfg.time_limit_s is not None and self.clock >= cfg.time_limit_s
                self.tokens += int(global_count.item())
                window_loss += D.all_sum(loss_sum, info).item() if info.world > 1 else loss_sum.item()
                window_count += global_count.item()
                window_tokens += int(global_count.item())
                last = self.step == end or stopping or out_of_time
                if self.step % cfg.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    record = {"kind": "train", "step": self.step, "tokens": self.tokens,
                              "loss": window_loss / max(window_count, 1), "lr": lr,
                              "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                    self.history.append(record)
                    bar.update(self.step, record["loss"], record["tokens_per_s"])
                    if self.log:
                        self.log(record)
                    window_loss, window_count, window_tokens, window_start = 0.0, 0.0, 0, time.perf_counter()
                if not last and ((cfg.eval_every and self.step % cfg.eval_every == 0) or
                                 (cfg.eval_every_s and self.clock - self.last_eval_clock >= cfg.eval_every_s)):
                    self._evaluate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                    self._save()
                if stopping:
                    interrupted = True
                    break
                if out_of_time:
                    break
        if not interrupted and (not self.evals or self.evals[-1]["step"] != self.step):
            self._evaluate()
        if cfg.checkpoint_dir is not None and (self.last_checkpoint is None or not self.last_checkpoint.endswith(ckpt.step_name(self.step))):
            self._save()
        result = HealResult(self.student, self.step, self.tokens, self.loss_name, self.task, self.history, self.evals,
                            self.last_checkpoint, self.trainable, self.frozen, self.untied, interrupted,
                            self.first_step_clock, self.clock)
        if interrupted:
            raise HealInterrupted(result)
        return result
