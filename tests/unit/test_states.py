"""Training-state selection: hand-checked states, the visited-state definition, statistics, seeding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from opdlm_trl.states import (
    SELECTIONS,
    _states_from_steps,
    mdlm_states,
    select_states,
    select_states_from_tensors,
    stop_token_mask,
)

M = 99  # mask id
BLOCK = 2


def hand_rollout() -> SimpleNamespace:
    """B=2, block 2, three blocks.

    Row 0: stop token 14 at position 4; block 0 committed position 1 at step 0 and 0 at step 1; block 1
    both at step 0; block 2 position 4 at step 0, position 5 (after the stop) never.
    Row 1: stop token 21 at position 1 in block 0 (2 steps); blocks 1-2 never run.
    """
    return SimpleNamespace(
        completion_ids=torch.tensor([[10, 11, 12, 13, 14, 0], [20, 21, 0, 0, 0, 0]]),
        completion_mask=torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]),
        decoded_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]),
        step_map=torch.tensor([[1, 0, 0, 0, 0, -1], [0, 1, -1, -1, -1, -1]]),
        block_steps=torch.tensor([[2, 1, 1], [2, 0, 0]]),
        block_size=BLOCK,
        mask_token_id=M,
    )


def from_steps(rollout, state_step):
    return _states_from_steps(
        rollout.completion_ids,
        rollout.completion_mask,
        rollout.decoded_mask,
        rollout.step_map,
        torch.tensor(state_step),
        rollout.block_size,
        rollout.mask_token_id,
    )


def reference_state(rollout, row: int, state_step: list[int]) -> tuple[list[int], list[bool]]:
    """The method's definition written literally, one position at a time."""
    noisy, supervised = [], []
    for j in range(rollout.completion_ids.shape[1]):
        s = state_step[j // rollout.block_size]
        committed_at = int(rollout.step_map[row, j])
        decoded = bool(rollout.decoded_mask[row, j])
        masked = s >= 0 and (committed_at >= s or committed_at == -1)
        noisy.append(M if (masked or not decoded) else int(rollout.completion_ids[row, j]))
        supervised.append(masked and bool(rollout.completion_mask[row, j]) and committed_at >= 0)
    return noisy, supervised


def test_per_block_hand_case():
    r = hand_rollout()
    states = from_steps(r, [[0, 0, 0], [1, -1, -1]])
    assert states.noisy_ids.tolist() == [[M, M, M, M, M, M], [20, M, M, M, M, M]]
    assert states.loss_mask.int().tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]
    assert states.mask_rate.tolist() == [1.0, 0.5]

    states = from_steps(r, [[1, 0, 0], [0, -1, -1]])
    assert states.noisy_ids.tolist() == [[M, 11, M, M, M, M], [M, M, M, M, M, M]]
    assert states.loss_mask.int().tolist() == [[1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    assert states.mask_rate.tolist() == pytest.approx([0.8, 1.0])


def test_global_step_hand_case():
    # Only block 1 of row 0 carries its state (step 0); the other decoded blocks are clean x0.
    states = from_steps(hand_rollout(), [[-1, 0, -1], [-1, -1, -1]])
    assert states.noisy_ids.tolist() == [[10, 11, M, M, 14, 0], [20, 21, M, M, M, M]]
    assert states.loss_mask.int().tolist() == [[0, 0, 1, 1, 0, 0], [0] * 6]


@pytest.mark.parametrize("selection", ["per_block", "global_step"])
def test_selected_states_follow_the_visited_state_definition(selection):
    r = hand_rollout()
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        states = select_states(r, selection, generator=generator)
        for row in range(2):
            noisy, supervised = reference_state(r, row, states.state_step[row].tolist())
            assert states.noisy_ids[row].tolist() == noisy
            assert states.loss_mask[row].tolist() == supervised
        # Nothing supervised after the stop, in padding or in blocks that were not run.
        assert not (states.loss_mask & ~r.completion_mask.bool()).any()
        chosen_steps = states.state_step
        in_range = (chosen_steps >= -1) & (chosen_steps < r.block_steps.clamp(min=1))
        assert in_range.all()
        assert (chosen_steps[r.block_steps == 0] == -1).all()
        if selection == "per_block":
            assert (chosen_steps[r.block_steps > 0] >= 0).all()
        else:
            assert ((chosen_steps >= 0).sum(1) == torch.tensor([1, 1])).all()


def test_every_step_hand_case():
    """Two copies (the most steps any block took): copy k carries step k of every block with more steps."""
    r = hand_rollout()
    states = select_states(r, "every_step")
    first, second = from_steps(r, [[0, 0, 0], [0, -1, -1]]), from_steps(r, [[1, -1, -1], [1, -1, -1]])
    assert states.source_row.tolist() == [0, 1, 0, 1]
    assert torch.equal(states.noisy_ids, torch.cat([first.noisy_ids, second.noisy_ids]))
    assert torch.equal(states.loss_mask, torch.cat([first.loss_mask, second.loss_mask]))
    assert states.state_step.tolist() == [[0, 0, 0], [0, -1, -1], [1, -1, -1], [1, -1, -1]]
    assert states.supervised_per_rollout_row(2).tolist() == [5 + 1, 2 + 1]
    assert torch.equal(states.rows_of(r.completion_ids), r.completion_ids.repeat(2, 1))


def test_every_step_trains_each_visited_state_once_and_each_position_once_per_state_it_was_masked_in():
    r = repeated(hand_rollout(), 3)
    r.block_steps[:, 1] = torch.where(r.block_steps[:, 1] > 0, 3, 0)  # a three-step block too
    r.step_map[0::2, 2:4] = torch.tensor([2, 1])
    states = select_states(r, "every_step")
    visited = {(row, b, s) for row in range(6) for b in range(3) for s in range(int(r.block_steps[row, b]))}
    trained = [
        (int(states.source_row[i]), b, int(states.state_step[i, b]))
        for i in range(len(states.source_row))
        for b in range(3)
        if states.state_step[i, b] >= 0
    ]
    assert len(trained) == len(visited) and set(trained) == visited
    # a committed position is still masked in the states before its commit step and at it: step_map + 1 times
    supervisable = r.completion_mask.bool() & (r.step_map >= 0)
    expected = torch.where(supervisable, r.step_map + 1, 0).sum(1)
    assert torch.equal(states.supervised_per_rollout_row(6), expected)
    for i, row in enumerate(states.source_row.tolist()):
        noisy, supervised = reference_state(r, row, states.state_step[i].tolist())
        assert states.noisy_ids[i].tolist() == noisy and states.loss_mask[i].tolist() == supervised


def repeated(rollout, times: int) -> SimpleNamespace:
    fields = {k: v.repeat(times, 1) if isinstance(v, torch.Tensor) else v for k, v in vars(rollout).items()}
    return SimpleNamespace(**fields)


def test_per_block_step_choice_is_uniform():
    r = repeated(hand_rollout(), 2000)
    r.block_steps[:, 1] = torch.where(r.block_steps[:, 1] > 0, 3, 0)  # a three-step block too
    r.step_map[0::2, 2:4] = torch.tensor([2, 1])
    states = select_states(r, "per_block", generator=torch.Generator().manual_seed(1))
    row0 = states.state_step[0::2]
    counts_two = torch.bincount(row0[:, 0], minlength=2)  # 2000 draws over {0, 1}
    counts_three = torch.bincount(row0[:, 1], minlength=3)  # 2000 draws over {0, 1, 2}
    assert counts_two.sum() == 2000 and counts_three.sum() == 2000
    assert (counts_two - 1000).abs().max() < 120, counts_two  # ~5 standard deviations
    assert (counts_three - 667).abs().max() < 110, counts_three
    assert (states.state_step[1::2, 1:] == -1).all()


def test_global_step_is_uniform_over_the_rows_steps():
    r = repeated(hand_rollout(), 2000)
    states = select_states(r, "global_step", generator=torch.Generator().manual_seed(2))
    row0 = states.state_step[0::2]  # 4 global steps: (b0,s0) (b0,s1) (b1,s0) (b2,s0)
    global_index = torch.where(row0[:, 0] >= 0, row0[:, 0], torch.where(row0[:, 1] >= 0, 2, 3))
    counts = torch.bincount(global_index, minlength=4)
    assert (counts - 500).abs().max() < 100, counts
    assert ((row0 >= 0).sum(1) == 1).all()


@pytest.mark.parametrize("selection", ["per_block", "global_step", "random_remask"])
def test_seeded_reproducibility(selection):
    r = repeated(hand_rollout(), 64)
    first = select_states(r, selection, generator=torch.Generator().manual_seed(7))
    second = select_states(r, selection, generator=torch.Generator().manual_seed(7))
    other = select_states(r, selection, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.noisy_ids, second.noisy_ids) and torch.equal(first.loss_mask, second.loss_mask)
    assert torch.equal(first.mask_rate, second.mask_rate)
    assert not torch.equal(first.loss_mask, other.loss_mask)


def long_rollout(batch: int, width: int) -> SimpleNamespace:
    """Rows of ``width`` tokens, every block run, committed in one step each."""
    return SimpleNamespace(
        completion_ids=torch.randint(0, 50, (batch, width), generator=torch.Generator().manual_seed(0)),
        completion_mask=torch.ones(batch, width, dtype=torch.long),
        decoded_mask=torch.ones(batch, width, dtype=torch.long),
        step_map=torch.zeros(batch, width, dtype=torch.long),
        block_steps=torch.ones(batch, width // 4, dtype=torch.long),
        block_size=4,
        mask_token_id=M,
    )


def test_random_remask_rate_matches_t():
    r = long_rollout(400, 256)
    states = select_states(r, "random_remask", generator=torch.Generator().manual_seed(3), eps=1e-3)
    fraction = states.loss_mask.float().mean(1)
    t = states.mask_rate
    assert t.min() >= 1e-3 and t.max() < 1
    deviation = (fraction - t).abs()
    assert deviation.mean() < 0.03 and deviation.max() < 0.15, (deviation.mean(), deviation.max())
    assert torch.corrcoef(torch.stack([fraction, t]))[0, 1] > 0.99
    assert torch.equal(states.noisy_ids == M, states.loss_mask)  # every position eligible here
    assert torch.equal(states.noisy_ids[~states.loss_mask], r.completion_ids[~states.loss_mask])
    assert (states.state_step == -1).all()


def test_random_remask_respects_stop_and_masks_at_least_one():
    r = repeated(hand_rollout(), 500)
    states = select_states(r, "random_remask", generator=torch.Generator().manual_seed(4), eps=0.0)
    assert not (states.loss_mask & ~r.completion_mask.bool()).any()
    assert (states.loss_mask.sum(1) >= 1).all()
    assert (states.noisy_ids[~r.completion_mask.bool()] == M).all()
    # a row with a single eligible token always has it masked, even at tiny t
    single = SimpleNamespace(**vars(hand_rollout()))
    single.completion_mask = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    many = repeated(single, 300)
    states = select_states(many, "random_remask", generator=torch.Generator().manual_seed(5), eps=0.0)
    assert states.loss_mask[0::2, 0].all() and states.loss_mask[0::2].sum() == 300
    assert not states.loss_mask[1::2].any()  # empty rows stay empty


def post_stop_rollout() -> SimpleNamespace:
    """Row 0 stops at position 1 (token 21) but the sampler had committed position 3 (token 23) of the
    same block at step 0; position 2 was never committed. Block 1 never ran."""
    return SimpleNamespace(
        completion_ids=torch.tensor([[20, 21, 0, 23, 0, 0, 0, 0]]),
        completion_mask=torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]]),
        decoded_mask=torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]]),
        step_map=torch.tensor([[1, 2, -1, 0, -1, -1, -1, -1]]),
        block_steps=torch.tensor([[3, 0]]),
        block_size=4,
        mask_token_id=M,
    )


def test_random_remask_keeps_post_stop_tokens_as_unsupervised_context():
    r = repeated(post_stop_rollout(), 2000)
    states = select_states(r, "random_remask", generator=torch.Generator().manual_seed(12))
    assert not states.loss_mask[:, 2:].any() and (states.loss_mask[:, :2].sum(1) >= 1).all()
    assert (states.noisy_ids[:, 2] == M).all() and (states.noisy_ids[:, 4:] == M).all()
    shown = states.noisy_ids[:, 3] == 23
    assert torch.equal(shown, states.noisy_ids[:, 3] != M)
    # The post-stop token is re-masked at rate t like the rest of the canvas: E[1 - t] = 1/2.
    assert abs(shown.float().mean().item() - (1 - states.mask_rate).mean().item()) < 0.05


def test_states_agree_with_the_samplers_replay():
    """Every stitched block equals ``Rollout.state(block, step)`` of the sampler (opdlm_trl.sampling)."""
    from opdlm_trl.sampling import Rollout

    for make in (hand_rollout, post_stop_rollout):
        r = make()
        batch, width = r.completion_ids.shape
        rollout = Rollout(
            prompt_ids=torch.ones(batch, r.block_size, dtype=torch.long),
            prompt_mask=torch.ones(batch, r.block_size, dtype=torch.long),
            completion_ids=r.completion_ids,
            completion_mask=r.completion_mask,
            decoded_mask=r.decoded_mask,
            step_map=r.step_map,
            global_step_map=r.step_map,  # unused here
            block_steps=r.block_steps,
            nfe=0,
            tokens_per_step=1.0,
            finish_reason=["stop"] * batch,
            block_size=r.block_size,
            shift=False,
            mask_token_id=M,
        )
        generator = torch.Generator().manual_seed(13)
        for _ in range(20):
            states = select_states(rollout, "per_block", generator=generator)
            for row in range(batch):
                for block, step in enumerate(states.state_step[row].tolist()):
                    if step < 0:
                        continue
                    span = slice(block * r.block_size, (block + 1) * r.block_size)
                    replay = rollout.state(block, step)[row, span]
                    assert states.noisy_ids[row, span].tolist() == replay.tolist()


def test_mdlm_states_row_and_block_rates():
    r = long_rollout(300, 64)
    rows = mdlm_states(r.completion_ids, r.completion_mask, 4, M, torch.Generator().manual_seed(6))
    assert torch.equal(rows.position_rate, rows.mask_rate[:, None].expand(-1, 64))
    blocks = mdlm_states(r.completion_ids, r.completion_mask, 16, M, torch.Generator().manual_seed(6), per_block=True)
    block_rate = blocks.position_rate.view(300, 4, 16)
    assert torch.equal(block_rate, block_rate[:, :, :1].expand(-1, -1, 16))  # constant inside a block
    assert (block_rate[:, :, 0].std(1) > 0).all()  # different across blocks
    assert torch.allclose(blocks.mask_rate, block_rate[:, :, 0].mean(1))
    fraction = blocks.loss_mask.view(300, 4, 16).float().mean(-1)
    assert (fraction - block_rate[:, :, 0]).abs().mean() < 0.1


def test_mask_rate_is_realised_fraction_for_trajectory_states():
    r = hand_rollout()
    states = select_states(r, "per_block", generator=torch.Generator().manual_seed(0))
    supervisable = r.completion_mask.bool() & (r.step_map >= 0)
    expected = states.loss_mask.sum(1).float() / supervisable.sum(1).float()
    assert torch.allclose(states.mask_rate, expected)


def test_plain_tensors_entry_point_equals_rollout_entry_point():
    r = hand_rollout()
    a = select_states(r, generator=torch.Generator().manual_seed(9))
    b = select_states_from_tensors(
        r.completion_ids,
        r.completion_mask,
        r.decoded_mask,
        r.step_map,
        r.block_steps,
        r.block_size,
        r.mask_token_id,
        generator=torch.Generator().manual_seed(9),
    )
    assert torch.equal(a.noisy_ids, b.noisy_ids) and torch.equal(a.state_step, b.state_step)


def test_errors_name_the_problem():
    r = hand_rollout()
    with pytest.raises(ValueError, match="selection"):
        select_states(r, "every_block")
    bad = SimpleNamespace(**vars(r))
    bad.step_map = r.step_map.clone()
    bad.step_map[0, 2] = 5  # block 1 took one step
    with pytest.raises(ValueError, match="Inconsistent trajectory"):
        select_states(bad)
    bad = SimpleNamespace(**vars(r))
    bad.block_size = 4
    with pytest.raises(ValueError, match="multiple of block_size"):
        select_states(bad)
    with pytest.raises(ValueError, match="eps"):
        select_states(r, "random_remask", eps=1.0)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_exclude_stop_token_never_supervises_the_stop_and_changes_nothing_else(selection):
    """Row 0 ended on its stop token (position 4); row 1 was cut by the length limit, its last token stays."""
    rollout = hand_rollout()
    rollout.finish_reason = ["stop", "length"]
    stop = torch.zeros(2, 6, dtype=torch.bool)
    stop[0, 4] = True
    assert torch.equal(stop_token_mask(rollout.completion_mask, torch.tensor([True, False])), stop)
    default_supervises_stop = last_of_cut_row_supervised = False
    for seed in range(40):
        kept = select_states(rollout, selection, torch.Generator().manual_seed(seed))
        excluded = select_states(rollout, selection, torch.Generator().manual_seed(seed), exclude_stop_token=True)
        stop_rows = kept.rows_of(stop)  # every_step: several state rows per rollout row
        assert not (excluded.loss_mask & stop_rows).any()
        default_supervises_stop |= bool((kept.loss_mask & stop_rows).any())
        last_of_cut_row_supervised |= bool(excluded.loss_mask[1, 1])
        if selection != "random_remask":  # trajectory states: the same visited state, one position less supervised
            assert torch.equal(excluded.noisy_ids, kept.noisy_ids)
            assert torch.equal(excluded.loss_mask, kept.loss_mask & ~stop_rows)
    assert default_supervises_stop and last_of_cut_row_supervised
