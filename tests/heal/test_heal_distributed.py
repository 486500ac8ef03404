"""torchrun --nproc_per_node 2 (gloo, CPU), DDP and FSDP2: both ranks end identical, and the run
equals one process on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_case import PER_RANK_BATCH, folded_nanogpt, heal_config, held_out, tokens
from switchhead.healing import PackedTokens, heal

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def single_process():
    """(loss history, final weights) of one process on the global batch."""
    teacher, student = folded_nanogpt()
    result = heal(student, teacher, PackedTokens(tokens(), 16, key=None), config=heal_config(2 * PER_RANK_BATCH),
                  eval_data=PackedTokens(held_out()[: 6 * 16], 16, key=None))  # the 6 windows two ranks share
    return [h["loss"] for h in result.history], student.state_dict(), result.evals


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path, strategy, single_process):
    env = {**os.environ, "HEAL_STRATEGY": strategy, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(HERE / "ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    want_loss, want_state, want_evals = single_process
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), "ranks ended with different weights"
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["loss"] == pytest.approx(want_loss, rel=1e-4)
        assert [e["step"] for e in got["evals"]] == [e["step"] for e in want_evals] == [0, 3, 6]
        assert [e["cosine"] for e in got["evals"]] == pytest.approx([e["cosine"] for e in want_evals], rel=1e-5)
        assert got["evals"][-1]["eval_samples"] == 6
    for key, value in ranks[0].items():
        torch.testing.assert_close(value, want_state[key], rtol=1e-4, atol=1e-5)
