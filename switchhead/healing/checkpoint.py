"""Atomic training checkpoints: safetensors for every tensor, JSON for the rest, no pickle.

Layout of `checkpoint_dir`:
    step_00000100/model.safetensors      the student's full state dict
    step_00000100/optimizer.safetensors  optimizer state tensors, keys "state/<param fqn>/<name>"
    step_00000100/rng.safetensors        torch RNG states, keys "cpu/<rank>", "cuda/<rank>/<device>"
    step_00000100/state.json             step, samples consumed, param groups, config, metrics
    latest                               name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory, each file fsynced, then renamed into
place; `latest` is replaced (write + fsync + os.replace) only after that. A kill at any moment
leaves the previous `latest` and its directory untouched; temporary directories of killed writes
are removed by the next write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

LATEST = "latest"
FORMAT = "switchhead-heal-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint cannot be read; the message says which file and why."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    _fsync(path)


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A (full, FQN-keyed) optimizer state dict as tensors + JSON-able rest."""
    tensors, scalars = {}, {}
    for fqn, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{fqn}/{name}"] = value
            else:
                scalars[f"{fqn}/{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, rest_key = key.split("/", 1)
        fqn, name = rest_key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = value
    for key, value in rest["scalars"].items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(directory: str | os.PathLike[str], step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], rng: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write one checkpoint atomically and point `latest` at it; keep the newest `keep`."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = step_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _save_tensors(model_state, tmp / "model.safetensors")
        opt_tensors, opt_rest = flatten_optimizer(optimizer_state)
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        _save_tensors(rng, tmp / "rng.safetensors")
        _write_json(tmp / "state.json", {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                                         "optimizer": opt_rest, **meta})
        _fsync(tmp)
        final = root / name
        if final.exists():  # re-saving a step (a resumed run stopped again at once): swap it out
            old = root / f".tmp-old-{name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".tmp-{LATEST}-{os.getpid()}"
    pointer.write_text(name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / LATEST)
    _fsync(root)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in `directory`, None if there is none."""
    root = Path(directory)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                         dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimizer state, rng states, meta) of one checkpoint directory."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} is not a version-{FORMAT_VERSION} healing checkpoint")
        model = load_file(str(path / "model.safetensors"))
        optimizer = unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta.pop("optimizer"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    return model, optimizer, rng, meta


def rng_state(rank: int) -> dict[str, torch.Tensor]:
    """This process's torch RNG states, keyed by rank."""
    states = {f"cpu/{rank}": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda/{rank}/{index}"] = state
    return states


def restore_rng(states: dict[str, torch.Tensor], rank: int) -> None:
    """Restore this rank's RNG states (rank 0's when the checkpoint has none for this rank)."""
    source = rank if f"cpu/{rank}" in states else 0
    if f"cpu/{source}" in states:
        torch.set_rng_state(states[f"cpu/{source}"])
    if torch.cuda.is_available():
        cuda = sorted((k for k in states if k.startswith(f"cuda/{source}/")), key=lambda k: int(k.rsplit("/", 1)[1]))
        if cuda:
            torch.cuda.set_rng_state_all([states[k] for k in cuda])
