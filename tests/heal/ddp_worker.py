"""One process of the 2-process healing test: `torchrun --nproc_per_node 2 ddp_worker.py OUT`.

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
from ddp_case import PER_RANK_BATCH, folded_nanogpt, heal_config, tokens  # noqa: E402

from switchhead.heal import PackedTokens, heal  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)
teacher, student = folded_nanogpt()
result = heal(student, teacher, PackedTokens(tokens(), 16, key=None), config=heal_config(PER_RANK_BATCH))
rank = int(os.environ["RANK"])
save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps([h["loss"] for h in result.history]))
