"""Healing: distill the dense original into its folded SwitchHead student (issue 7).

    from switchhead.heal import heal, HealConfig, data
    result = heal(student, teacher, data.pack_files(files, tokenizer, 256), steps=500, lr=3e-4)
"""

import sys
import types

from switchhead.heal import data
from switchhead.heal.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from switchhead.heal.config import HealConfig
from switchhead.heal.data import HealData, PackedTokens, Sentences, pack_files, split_files, text_lines
from switchhead.heal.distill import HealInterrupted, HealResult, heal
from switchhead.heal.recipes import heal_on_files

__all__ = [
    "CheckpointError", "HealConfig", "HealData", "HealInterrupted", "HealResult", "PackedTokens", "Sentences",
    "data", "heal", "heal_on_files", "latest_checkpoint", "load_checkpoint", "pack_files", "split_files", "text_lines",
]


class _CallableModule(types.ModuleType):
    """`switchhead.heal(student, teacher, data, ...)` calls heal(); `switchhead.heal.HealConfig` and
    the other names stay reachable: the verb and its package share one name."""

    def __call__(self, *args, **kwargs) -> HealResult:
        return heal(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
