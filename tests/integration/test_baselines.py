"""Baselines on tiny local models: the MDLM objective, off-policy KD and teacher answers (opdlm_trl.baselines)."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from opdlm_trl.baselines import (
    MDLMConfig,
    MDLMTrainer,
    OffPolicyKDTrainer,
    completion_text,
    mdlm_reduce,
    right_pad_to_blocks,
    teacher_responses,
)
from opdlm_trl.modeling import student_forward, suppress_mask_logit
from opdlm_trl.tiny import tiny_model, tiny_tokenizer
from opdlm_trl.trainer import TeacherDistillationTrainer
from tests.helpers import cpu_config

BLOCK = 4
SHIFTS = [False, True]


def _config(shift: bool, **overrides) -> MDLMConfig:
    settings = dict(shift=shift, block_size=BLOCK, max_completion_length=16)
    return cpu_config("/tmp/opdlm-test-baselines", MDLMConfig, **{**settings, **overrides})


def _rows(completions: list[str]) -> Dataset:
    prompts = ["def add(a, b):", "class Stack:", "def fibonacci(n):", "x = 1"]
    return Dataset.from_dict({"prompt": prompts[: len(completions)], "completion": completions})


LONG = ["    return a + b", "    def push(self, item):", "    if n < 2:\n        return n", "y = x + 1"]


def _mdlm(shift: bool, rows: Dataset, **overrides) -> MDLMTrainer:
    return MDLMTrainer(
        tiny_model("llama"), args=_config(shift, **overrides), train_dataset=rows, processing_class=tiny_tokenizer()
    )


def _batch(trainer, rows: Dataset, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions([rows[i] for i in range(len(rows))])


@pytest.mark.parametrize("shift", SHIFTS)
def test_mdlm_loss_matches_hand_computation(shift):
    """One-block completions: the layout forward equals a plain block-causal canvas forward over [prompt | x_t]."""
    rows = _rows(["a", "b", "1", "+"])
    trainer = _mdlm(shift, rows, block_masking=False)
    batch = _batch(trainer, rows)
    assert batch["completion_ids"].shape[1] == BLOCK  # every completion (+ EOS) fits one block
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        canvas = torch.cat([batch["prompt_ids"], batch["noisy_ids"]], 1)
        keys = torch.cat([batch["prompt_mask"], batch["completion_key_mask"]], 1)
        logits = student_forward(model, canvas, keys, block_size=BLOCK).logits
    mask_id = trainer.settings.mask_token_id
    width = batch["prompt_ids"].shape[1]
    expected = []
    for row in range(canvas.shape[0]):
        total = 0.0
        for j in batch["loss_mask"][row].nonzero()[:, 0].tolist():
            source = width + j - 1 if shift else width + j
            log_probs = torch.log_softmax(suppress_mask_logit(logits[row, source].float(), mask_id), -1)
            total += -log_probs[batch["completion_ids"][row, j]].item() / batch["position_rate"][row, j].item()
        expected.append(total / batch["completion_key_mask"][row].sum().item())
    assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-5)


@pytest.mark.parametrize("block_masking", [False, True])
def test_inverse_t_weight_per_sequence_and_per_block(block_masking):
    rows = _rows(LONG)
    trainer = _mdlm(False, rows, block_masking=block_masking, max_completion_length=32)
    batch = _batch(trainer, rows, seed=3)
    rate, real = batch["position_rate"], batch["completion_key_mask"].bool()
    blocks = rate.reshape(rate.shape[0], -1, BLOCK)
    assert torch.equal(blocks, blocks[..., :1].expand_as(blocks))  # one t per block at least
    per_row_constant = torch.equal(rate, rate[:, :1].expand_as(rate))
    assert per_row_constant != block_masking  # per block: rates differ between blocks of a row
    assert bool(((rate > 1e-3 - 1e-9) & (rate <= 1)).all())
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        logits = trainer.student_logits(batch)
    selected = batch["loss_mask"].bool()
    nll = -torch.log_softmax(logits.float(), -1).gather(1, batch["completion_ids"][selected][:, None])[:, 0]
    weighted = torch.zeros(rate.shape[0]).index_add(0, selected.nonzero()[:, 0], nll / rate[selected])
    assert loss == pytest.approx((weighted / real.sum(1)).mean().item(), rel=1e-5)


def test_mdlm_reduce_divides_by_completion_length_not_masked_count():
    per_position = torch.tensor([2.0, 4.0, 6.0])
    rows = torch.tensor([0, 0, 1])
    lengths = torch.tensor([4, 3])
    assert mdlm_reduce(per_position, rows, lengths).item() == pytest.approx((6 / 4 + 6 / 3) / 2)
    assert mdlm_reduce(per_position, rows, lengths, "token").item() == pytest.approx(12 / 7)
    assert mdlm_reduce(per_position, rows, lengths, normaliser=4).item() == pytest.approx((6 / 4 + 6 / 3) / 4)


@pytest.mark.parametrize("shift", SHIFTS)
def test_prompt_never_masked_and_layout(shift):
    rows = _rows(LONG)
    trainer = _mdlm(shift, rows, max_completion_length=32)
    tokenizer = trainer.processing_class
    mask_id = trainer.settings.mask_token_id
    for seed in range(5):
        batch = _batch(trainer, rows, seed)
        assert batch["prompt_ids"].shape[1] % BLOCK == 0 and batch["completion_ids"].shape[1] % BLOCK == 0
        assert not (batch["prompt_ids"] == mask_id).any()
        assert not (batch["clean_ids"] == mask_id).any()
        real = batch["completion_key_mask"].bool()
        assert torch.equal(batch["loss_mask"], (batch["noisy_ids"] == mask_id) & real)
        assert bool(batch["loss_mask"].any(1).all())  # at least one supervised token per row
    prompt_lists = trainer.prompt_token_lists(list(rows["prompt"]))
    for row, ids in enumerate(prompt_lists):  # left-padded: the prompt ends on the block boundary
        assert batch["prompt_ids"][row, -len(ids) :].tolist() == ids
        assert batch["prompt_mask"][row].sum().item() == len(ids)
    lengths = batch["completion_key_mask"].sum(1)
    last = batch["completion_ids"].gather(1, (lengths - 1)[:, None])[:, 0]
    assert (last == tokenizer.eos_token_id).all()  # completions end with the end-of-turn token
    cut = trainer.given_text([dict(rows[0], completion_finished=False), rows[1]])
    assert cut.completion_mask.sum(1).tolist() == [lengths[0].item() - 1, lengths[1].item()]  # no EOS when cut


def test_mdlm_training_reduces_loss_and_counts_completion_tokens():
    rows = _rows(LONG)
    trainer = _mdlm(True, rows, max_steps=12, learning_rate=3e-3, max_completion_length=32)
    fixed = _batch(trainer, rows, seed=7)
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model.eval(), fixed).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model.eval(), fixed).item()
    assert after < 0.85 * before, (before, after)  # measured: 4.52 -> 3.45
    per_step = int(fixed["completion_key_mask"].sum())
    assert trainer.training_tokens == 12 * per_step
    assert not isinstance(trainer, TeacherDistillationTrainer) and not hasattr(trainer, "teacher")


@pytest.mark.parametrize("shift", SHIFTS)
def test_offpolicy_kd_supervises_masked_positions_with_finite_losses(shift):
    rows = _rows(LONG)
    student = tiny_model("llama")
    trainer = OffPolicyKDTrainer(
        student,
        copy.deepcopy(student),
        args=_config(shift, max_steps=3, max_completion_length=32),
        train_dataset=rows,
        processing_class=tiny_tokenizer(),
    )
    mask_id = trainer.settings.mask_token_id
    batch = _batch(trainer, rows, seed=1)
    real = batch["completion_key_mask"].bool()
    assert torch.equal(batch["loss_mask"], (batch["noisy_ids"] == mask_id) & real)
    rates = batch["loss_mask"].sum(1) / real.sum(1)
    assert bool((rates > 0).all())
    hidden = batch["teacher_hidden"]  # full-vocabulary targets travel as the teacher's hidden states
    assert batch.get("teacher_full_logprobs") is None and torch.isfinite(hidden[real]).all()
    full = trainer.teacher.head.log_probs(hidden[real])
    assert torch.allclose(full.exp().sum(-1), torch.ones(int(real.sum())), atol=1e-4)
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        unsupervised = dict(batch, teacher_hidden=hidden.roll(1, -1).where(~batch["loss_mask"][..., None], hidden))
        supervised = dict(batch, teacher_hidden=hidden.roll(1, -1).where(batch["loss_mask"][..., None], hidden))
        assert trainer.compute_loss(model, unsupervised).item() == loss  # targets elsewhere are never read
        assert abs(trainer.compute_loss(model, supervised).item() - loss) > 1e-3
    trainer.model.train()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.training_tokens == 3 * int(real.sum())


def test_missing_completion_column_and_bad_config_fail_early():
    rows = Dataset.from_dict({"prompt": ["x = 1"]})
    with pytest.raises(ValueError, match="completion"):
        _mdlm(False, rows)
    with pytest.raises(ValueError, match="mask_weighting"):
        _config(False, mask_weighting="linear")
    with pytest.raises(ValueError, match="mask_eps"):
        _config(False, mask_eps=0.0)


def test_completion_formats_and_right_padding():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    ids, mask = right_pad_to_blocks([[5, 6, 7, 8, 9], [1]], 4, 0)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.sum(1).tolist() == [5, 1]


def test_teacher_responses_are_greedy_and_counted():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    rows = Dataset.from_dict({"prompt": ["def add(a, b):", "x = 1", "class Stack:"], "task": [1, 2, 3]})
    answers = teacher_responses(model, tokenizer, rows, max_new_tokens=6, batch_size=2)
    assert answers.column_names == ["prompt", "task", "completion", "completion_tokens", "completion_finished"]
    assert all(1 <= n <= 6 for n in answers["completion_tokens"])
    for done, count in zip(answers["completion_finished"], answers["completion_tokens"], strict=True):
        assert done or count == 6  # an unfinished answer used the whole generation budget
    ids = tokenizer("x = 1", return_tensors="pt")["input_ids"]
    greedy = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
    assert answers["completion"][1] == expected[: len(answers["completion"][1])]
    assert expected.startswith(answers["completion"][1])
