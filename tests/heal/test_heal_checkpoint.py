"""Checkpoints are atomic: a write killed half way leaves the last good one readable."""

import pytest
import torch

from switchhead.healing import checkpoint as ckpt


def _write(root, step, value, keep=2):
    model = {"w": torch.full((3,), float(value))}
    optimizer = {"state": {"w": {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3) * value}},
                 "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["w"]}]}
    return ckpt.save_checkpoint(root, step, model, optimizer, ckpt.rng_state(0), {"tokens": step * 10}, keep)


def test_round_trip(tmp_path):
    path = _write(tmp_path, 5, 2.0)
    model, optimizer, rng, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert path.name == "step_00000005" and meta["step"] == 5 and meta["tokens"] == 50
    assert torch.equal(model["w"], torch.full((3,), 2.0))
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(optimizer["state"]["w"]["exp_avg"], torch.full((3,), 2.0))
    assert torch.equal(rng["cpu/0"], torch.get_rng_state())


def test_a_write_killed_half_way_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _write(tmp_path, 1, 1.0)
    real = ckpt.save_file
    calls = []

    def dies_on_second_file(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while writing optimizer.safetensors
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, 2, 9.0)
    monkeypatch.setattr(ckpt, "save_file", real)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))[0]["w"][0] == 1.0
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_stale_temporary_directory_is_ignored_then_removed(tmp_path):
    _write(tmp_path, 1, 1.0)
    (tmp_path / ".tmp-step_00000002-999").mkdir()  # a process killed with SIGKILL mid-write
    (tmp_path / "latest").unlink()  # and even a lost pointer: the newest complete step is used
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
    _write(tmp_path, 2, 2.0)
    assert not list(tmp_path.glob(".tmp-*"))


def test_keeps_only_the_newest(tmp_path):
    for step in range(1, 5):
        _write(tmp_path, step, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]


def test_unreadable_checkpoint_raises_checkpoint_error(tmp_path):
    path = _write(tmp_path, 1, 1.0)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors|cannot read"):
        ckpt.load_checkpoint(path)
