"""One process of the 2-process healing test: `torchrun --nproc_per_node 2 ddp_worker.py OUT`
(HEAL_STRATEGY=ddp or fsdp).

heal() starts the gloo process group from torchrun's environment by itself. Each rank writes its
final weights and loss history to OUT.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_case import PER_RANK_BATCH, folded_nanogpt, heal_config, held_out, tokens  # noqa: E402

from switchhead.healing import PackedTokens, heal  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)
teacher, student = folded_nanogpt()
strategy = os.environ.get("HEAL_STRATEGY", "ddp")
result = heal(student, teacher, PackedTokens(tokens(), 16, key=None), config=heal_config(PER_RANK_BATCH), strategy=strategy,
              eval_data=PackedTokens(held_out(), 16, key=None))
if strategy == "fsdp":  # sharded parameters: gather the full weights to compare them
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
    torch.distributed.destroy_process_group()
else:
    full = student.state_dict()
rank = int(os.environ["RANK"])
save_file({k: v.contiguous() for k, v in full.items()}, str(out / f"rank{rank}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps({"loss": [h["loss"] for h in result.history], "evals": result.evals}))
