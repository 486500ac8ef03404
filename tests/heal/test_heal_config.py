"""HealConfig: validation, schedule, JSON round trip."""

import json

import pytest

from switchhead.healing import HealConfig


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", 1.5), ("batch_size", -1), ("seq_len", True), ("lr", 0.0), ("lr", float("nan")),
    ("warmup", -1), ("grad_clip", -1.0), ("min_lr_ratio", 1.5), ("betas", (0.9, 1.0)), ("loss", "l1"),
    ("task", "seq2seq"), ("precision", "fp16"), ("strategy", "zero3"), ("train_only", "("), ("version", 99),
    ("compile", "yes"), ("eval_every", -5), ("keep_checkpoints", 0),
])
def test_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        HealConfig(**{field: value})


def test_resume_needs_a_directory():
    with pytest.raises(ValueError, match="checkpoint_dir"):
        HealConfig(resume=True)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = HealConfig(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3)
    lrs = [cfg.lr_at(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert cfg.lr_at(100) == pytest.approx(1e-4)


def test_round_trips_through_json():
    cfg = HealConfig(steps=7, betas=(0.8, 0.9), loss="mse", train_only="layers", checkpoint_dir="/tmp/x")
    assert HealConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        HealConfig.from_dict({"stepz": 3})


def test_heal_is_the_top_level_verb():
    import switchhead
    import switchhead.healing
    from switchhead.healing import heal

    assert switchhead.heal is heal and switchhead.healing.HealConfig is HealConfig
