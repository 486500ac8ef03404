"""The tiny run that the distributed test repeats in one process and in two."""

import torch

import switchhead
from switchhead.healing import HealConfig
from zoo import ZOO_BY_NAME

PER_RANK_BATCH = 2


def folded_nanogpt():
    case = ZOO_BY_NAME["nanogpt"]
    teacher = case.build()
    args, kwargs = case.example_inputs()
    config = switchhead.SwitchHeadConfig(init="fold", num_heads=2, top_k=2)
    return teacher, switchhead.convert(teacher, args, kwargs, config=config)


def tokens():
    return torch.randint(0, 64, (2048,), generator=torch.Generator().manual_seed(0))


def held_out():
    return torch.randint(0, 64, (7 * 16,), generator=torch.Generator().manual_seed(1))  # 7 windows: uneven shares


def heal_config(batch_size: int) -> HealConfig:
    return HealConfig(steps=6, lr=3e-3, warmup=2, batch_size=batch_size, loss="kl", eval_every=3, log_every=1,
                      progress=False, device="cpu")
