"""Row groups (opdlm_trl.grouping): the partition on hand cases, and that a grouped training step computes what the
single padded batch computes — teacher targets, student logits, loss and gradients — on prompts of mixed length."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from opdlm_trl.grouping import content_columns, length_groups, plan_groups, restore_row_order
from opdlm_trl.sampling import DiffusionSampler
from opdlm_trl.states import select_states
from opdlm_trl.tiny import tiny_model, tiny_tokenizer
from opdlm_trl.trainer import OPDTrainer
from tests.helpers import cpu_config

# prompts of very different lengths, so groups really cut padding
MIXED_PROMPTS = [
    [{"role": "user", "content": "def f(a):"}],
    [{"role": "user", "content": "def add(a, b):\n    " + "# add two numbers carefully " * 6}],
    [{"role": "user", "content": "x"}],
    [{"role": "user", "content": "def g(a, b, c):\n    " + "# long docstring text " * 12}],
    [{"role": "user", "content": "def h():"}],
]


def test_length_groups_minimise_the_padded_area_on_a_hand_case():
    lengths = torch.tensor([10, 100, 12, 98, 11])
    groups = length_groups(lengths, 2)
    assert [g.tolist() for g in groups] == [[0, 2, 4], [1, 3]]  # area 3*12 + 2*100 = 236 (any other cut is larger)
    assert [g.tolist() for g in length_groups(lengths, 1)] == [[0, 1, 2, 3, 4]]
    assert sorted(torch.cat(length_groups(lengths, 9)).tolist()) == [0, 1, 2, 3, 4]  # never more groups than rows
    assert len(length_groups(lengths, 9)) == 5
    with pytest.raises(ValueError, match="max_groups"):
        length_groups(lengths, 0)


def test_content_columns_cut_whole_prompt_blocks_and_trailing_completion_padding():
    prompt_mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    group = content_columns(torch.tensor([0, 1]), prompt_mask, completion_mask, block_size=4)
    assert group.prompt_start == 4  # 5 common padding columns, cut to whole blocks of 4
    assert group.completion_end == 4  # 3 used columns, rounded up to a block
    unblocked = content_columns(torch.tensor([1]), prompt_mask, completion_mask, block_size=None)
    assert (unblocked.prompt_start, unblocked.completion_end) == (6, 1)


def test_restore_row_order_inverts_the_grouping():
    values = torch.arange(5).float().unsqueeze(1) * 10
    groups = plan_groups(torch.ones(5, 4), torch.tensor([[1] * k + [0] * (4 - k) for k in (4, 1, 3, 1, 2)]), 4, 3)
    parts = [values[g.rows] for g in groups]
    assert torch.equal(restore_row_order(parts, groups), values)


def _trainer(tmp_path, groups: int) -> OPDTrainer:
    torch.manual_seed(0)
    dataset = Dataset.from_list([{"prompt": p} for p in MIXED_PROMPTS])
    return OPDTrainer(
        tiny_model("llama", seed=3),
        args=cpu_config(tmp_path / f"g{groups}", length_groups=groups, per_device_train_batch_size=5),
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
    )


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_step_equals_the_single_padded_batch(tmp_path, groups):
    reference, grouped = _trainer(tmp_path, 0), _trainer(tmp_path, groups)
    grouped.model.load_state_dict(reference.model.state_dict())
    sampler = DiffusionSampler(reference.sampler_config(16), pad_token_id=reference._tokenizer.pad_token_id)
    rollout = reference.rollout(MIXED_PROMPTS, sampler=sampler, generator=torch.Generator().manual_seed(0))
    plan = plan_groups(rollout.prompt_mask, rollout.completion_mask, None, groups)
    assert any(g.prompt_start > 0 for g in plan), "the case must actually cut padding"

    targets = [trainer.score(rollout) for trainer in (reference, grouped)]
    for name in ("token_logprobs", "hidden"):
        torch.testing.assert_close(getattr(targets[1], name), getattr(targets[0], name), atol=1e-5, rtol=1e-5)
    assert torch.equal(targets[1].mask, targets[0].mask)

    states = select_states(rollout, "per_block", generator=torch.Generator().manual_seed(1))
    losses, gradients = [], []
    for trainer in (reference, grouped):
        batch = trainer.training_batch(rollout, targets[0], states).to_dict()  # with the batch's normaliser
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.detach())
        gradients.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert states.loss_mask.sum() > 0
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-5, rtol=1e-4, msg=name)


def test_negative_length_groups_is_refused(tmp_path):
    with pytest.raises(ValueError, match="length_groups"):
        cpu_config(tmp_path, length_groups=-1)
