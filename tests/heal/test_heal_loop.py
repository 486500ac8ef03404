"""heal() on tiny folded zoo models: it learns, it resumes bit for bit, Ctrl-C checkpoints."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch

import switchhead
from heal_helpers import CharTokenizer
from switchhead.healing import HealConfig, HealInterrupted, heal, heal_on_files, latest_checkpoint
from zoo import ZOO_BY_NAME

FOLD = switchhead.SwitchHeadConfig(init="fold", num_heads=2, top_k=2)


@pytest.fixture(scope="module")
def llama():
    """(teacher, folded student) of the tiny GQA Llama, 6 -> 2 heads. Tests copy the student."""
    case = ZOO_BY_NAME["hf_llama_gqa"]
    teacher = case.build()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(10)  # peaked next-token distributions: a KL worth reducing
    args, kwargs = case.example_inputs()
    return teacher, switchhead.convert(teacher, args, kwargs, config=FOLD)


def _tokens(n=4000, seed=0):
    return torch.randint(0, 99, (n,), generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    base = dict(steps=8, lr=3e-3, warmup=2, batch_size=2, seq_len=16, eval_every=0, log_every=1, progress=False)
    return HealConfig(**{**base, **kw})


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_heal_lowers_the_distillation_loss_and_leaves_the_teacher_alone(llama):
    teacher, student = copy.deepcopy(llama)  # one deepcopy: the student still shares Parameters with the teacher
    before_teacher = _state(teacher)
    few = _tokens(64)  # four windows, all in every batch: the loss must go down
    result = heal(student, teacher, few, config=_cfg(steps=12, lr=3e-3, warmup=3, batch_size=4), eval_data=_tokens(200, 1))
    assert result.loss == "kl" and result.task == "causal_lm" and result.steps == 12
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    assert result.evals[0]["step"] == 0 and result.evals[-1]["step"] == 12
    assert result.evals[-1]["ppl"] > 1 and result.evals[0]["teacher_ppl"] == result.evals[-1]["teacher_ppl"]
    assert result.tokens == 12 * 4 * 16
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_teacher.items())
    # convert() shares the original's Parameters: heal() copied them, and trained the copies too.
    assert "model.layers.0.mlp.down_proj.weight" in result.untied
    assert not torch.equal(student.get_parameter("model.layers.0.mlp.down_proj.weight"),
                           teacher.get_parameter("model.layers.0.mlp.down_proj.weight"))
    assert all(p.requires_grad for p in teacher.parameters())  # untouched: it ran under no_grad


def test_train_only_freezes_everything_else(llama):
    teacher, folded = llama
    student = copy.deepcopy(folded)
    before = _state(student)
    heal(student, teacher, _tokens(), config=_cfg(steps=2, train_only=r"self_attn"))
    after = _state(student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("self_attn" in k for k in changed)


def test_two_n_steps_equal_n_steps_resume_n_steps_bit_for_bit(llama, tmp_path):
    teacher, folded = llama
    straight = copy.deepcopy(folded)
    heal(straight, teacher, _tokens(), config=_cfg(steps=8))
    first, second = copy.deepcopy(folded), copy.deepcopy(folded)
    cfg = _cfg(steps=8, checkpoint_dir=str(tmp_path), checkpoint_every=4)
    partial = heal(first, teacher, _tokens(), config=HealConfig.from_dict({**cfg.to_dict(), "stop_at": 4}))
    assert partial.steps == 4 and latest_checkpoint(tmp_path).name == "step_00000004"
    result = heal(second, teacher, _tokens(), config=HealConfig.from_dict({**cfg.to_dict(), "resume": True}))
    assert result.steps == 8 and [h["step"] for h in result.history] == list(range(1, 9))
    want, got = _state(straight), _state(second)
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed run differs from the straight run"


def test_ctrl_c_finishes_the_step_checkpoints_and_resume_matches(llama, tmp_path):
    teacher, folded = llama
    straight = copy.deepcopy(folded)
    heal(straight, teacher, _tokens(), config=_cfg(steps=6))
    stopped = copy.deepcopy(folded)
    cfg = _cfg(steps=6, checkpoint_dir=str(tmp_path))

    def interrupt(record):
        if record.get("step") == 3 and record["kind"] == "train":
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(HealInterrupted) as caught:
        heal(stopped, teacher, _tokens(), config=cfg, log=interrupt)
    assert caught.value.result.steps == 4 and caught.value.result.interrupted  # the signal lands during step 4
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    resumed = copy.deepcopy(folded)
    heal(resumed, teacher, _tokens(), config=HealConfig.from_dict({**cfg.to_dict(), "resume": True}))
    want, got = _state(straight), _state(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)


class _BertSentences:
    """Random token rows with padding, as an encoder's tokenizer would give them."""

    def __init__(self, n=64, seq=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 99, (n, seq), generator=g)
        self.lengths = torch.randint(4, seq + 1, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def batch(self, indices):
        ids, lengths = self.ids[indices], self.lengths[indices]
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
        return (), {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize(("loss", "resolved"), [("auto", "mse"), ("cosine_pooled", "cosine_pooled")])
def test_encoder_heals_on_hidden_states_and_reports_embedding_cosine(loss, resolved):
    case = ZOO_BY_NAME["hf_bert"]
    teacher = case.build()
    args, kwargs = case.example_inputs()
    student = switchhead.convert(teacher, args, kwargs, config=FOLD)
    data = _BertSentences()
    config = _cfg(steps=10, lr=3e-4, warmup=2, batch_size=64, loss=loss)
    result = heal(student, teacher, data, config=config, eval_data=data)
    assert result.loss == resolved and result.task == "encoder"
    assert 0 < result.evals[0]["cosine"] <= 1 and 0 < result.evals[-1]["cosine"] <= 1
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_kl_on_an_encoder_is_refused():
    case = ZOO_BY_NAME["hf_bert"]
    teacher = case.build()
    with pytest.raises(ValueError, match="logits"):
        heal(copy.deepcopy(teacher), teacher, _BertSentences(), config=_cfg(steps=1, loss="kl"))


def test_heal_on_files_packs_text_and_holds_out_whole_files(llama, tmp_path):
    teacher, folded = llama
    for i in range(30):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}: " + "some healing text. " * 20)
    result = heal_on_files(copy.deepcopy(folded), teacher, [tmp_path], CharTokenizer(), config=_cfg(steps=2),
                           held_out=0.2, eval_samples=4)
    assert result.steps == 2 and result.evals[-1]["eval_samples"] == 4 and result.evals[-1]["ppl"] > 1


def test_evaluate_gives_the_metrics_heal_reports(llama):
    """healing.evaluate on the held-out data heal() used gives heal()'s last evaluation; the teacher
    against itself has the teacher's perplexity."""
    from switchhead.healing import evaluate

    teacher, student = copy.deepcopy(llama)
    held = _tokens(200, 1)
    result = heal(student, teacher, _tokens(64), config=_cfg(steps=3), eval_data=held)
    got = evaluate(result.student, teacher, held, config=_cfg())
    assert got["ppl"] == pytest.approx(result.evals[-1]["ppl"], rel=1e-6)
    assert got["teacher_ppl"] == pytest.approx(result.evals[-1]["teacher_ppl"], rel=1e-6)
    same = evaluate(teacher, teacher, held, config=_cfg())
    assert same["ppl"] == pytest.approx(same["teacher_ppl"], rel=1e-9) and same["ppl"] != got["ppl"]
