"""Healing: distill the dense original into its folded SwitchHead student.

    from switchhead.healing import heal, HealConfig, data   # heal is also switchhead.heal
    result = heal(student, teacher, data.pack_files(files, tokenizer, 256), steps=500, lr=3e-4)
"""

from switchhead.healing import data
from switchhead.healing.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from switchhead.healing.config import HealConfig
from switchhead.healing.data import HealData, PackedTokens, Sentences, pack_files, split_files, text_lines
from switchhead.healing.distill import HealInterrupted, HealResult, evaluate, heal
from switchhead.healing.recipes import file_data, heal_on_files

__all__ = [
    "CheckpointError", "HealConfig", "HealData", "HealInterrupted", "HealResult", "PackedTokens", "Sentences",
    "data", "evaluate", "file_data", "heal", "heal_on_files", "latest_checkpoint", "load_checkpoint", "pack_files", "split_files", "text_lines",
]
