"""A time budget ends healing on the clock, with the learning rate decayed to its floor; few files
fall back to holding out the end of the text."""

from __future__ import annotations

import copy

import pytest
import torch

import switchhead
from heal_helpers import CharTokenizer
from switchhead.healing import HealConfig, file_data, heal
from zoo import ZOO_BY_NAME


@pytest.fixture(scope="module")
def llama():
    case = ZOO_BY_NAME["hf_llama_gqa"]
    teacher = case.build()
    args, kwargs = case.example_inputs()
    return teacher, switchhead.convert(teacher, args, kwargs, config=switchhead.SwitchHeadConfig(init="fold", num_heads=2))


def test_time_limit_ends_the_run_and_decays_the_lr(llama):
    teacher, student = copy.deepcopy(llama)
    tokens = torch.randint(0, 99, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = HealConfig(steps=10**6, lr=1e-3, warmup=2, min_lr_ratio=0.1, batch_size=2, seq_len=16, eval_every=0,
                     eval_every_s=1.0, log_every=1, progress=False, time_limit_s=6.0)
    result = heal(student, teacher, tokens, config=cfg, eval_data=tokens[:64])
    assert 3 <= result.steps < 10**6
    assert result.history[-1]["lr"] <= 1e-3 * 0.1 * 1.5  # at the floor when the time is spent
    assert max(h["lr"] for h in result.history) > 0.5e-3
    assert len(result.evals) >= 3 and result.evals[-1]["step"] == result.steps  # time-driven evaluations
    assert result.evals[-1]["elapsed_s"] >= 6.0


def test_lr_schedule_follows_the_further_of_steps_and_time():
    cfg = HealConfig(steps=100, lr=1.0, warmup=0, min_lr_ratio=0.0)
    assert cfg.lr_at(50) == pytest.approx(0.5)
    assert cfg.lr_at(50, time_fraction=1.0) == pytest.approx(0.0)
    assert cfg.lr_at(99, time_fraction=0.1) < 0.01
    with pytest.raises(ValueError, match="time_limit_s"):
        HealConfig(time_limit_s=0)


def test_few_files_hold_out_the_end_of_the_text(tmp_path):
    (tmp_path / "only.txt").write_text("one healing document. " * 100)
    train, held, info = file_data([tmp_path], CharTokenizer(), 16, held_out=0.1)
    assert info["split"] == "tail" and len(train) > 0 and len(held) >= 1
    assert len(train) * 16 + len(held) * 16 <= 2201
