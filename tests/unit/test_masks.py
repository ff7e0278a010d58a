"""Unit tests of opdlm_trl.masks on hand-written examples (no model involved)."""

from __future__ import annotations

import pytest
import torch

from opdlm_trl.masks import (
    align_block_logits,
    block_causal_mask,
    gather_predictions,
    left_pad_to_block,
    logits_to_keep_for_block,
    pad_to_blocks,
    position_ids_from_mask,
    round_up_to_block,
    shown_at,
    split_previous_logit,
    training_layout,
    widen_to_blocks,
)

BLOCKED = torch.finfo(torch.float32).min


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean view of an additive mask, checking on the way that it holds only 0 and finfo.min."""
    assert bool(((mask == 0) | (mask == torch.finfo(mask.dtype).min)).all()), "mask values must be 0 or finfo.min"
    return mask == 0


def assert_no_fully_blocked_row(mask: torch.Tensor) -> None:
    """A fully blocked row gives NaN softmax in low precision: every query must see at least one key."""
    assert bool(allowed(mask).any(-1).all())


def test_block_causal_mask_hand_example():
    # 6 canvas slots, block 2 -> blocks [0, 0, 1, 1, 2, 2]; slot 0 is left padding.
    key_mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    mask = block_causal_mask(key_mask, block_size=2)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],  # padding query: itself (never fully blocked) + its real block-mate
            [0, 1, 0, 0, 0, 0],  # block 0: the pad key is hidden
            [0, 1, 1, 1, 0, 0],  # block 1 sees block 0 and both of its own tokens (bidirectional)
            [0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 1],  # block 2 sees everything real
            [0, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert mask.shape == (1, 1, 6, 6)
    assert mask.dtype == torch.float32
    assert torch.equal(allowed(mask)[0, 0], expected)
    assert mask[0, 0, 1, 0].item() == BLOCKED
    assert_no_fully_blocked_row(mask)


def test_block_causal_mask_dtype_and_bidirectional():
    key_mask = torch.tensor([[1, 1, 1, 0]])
    half = block_causal_mask(key_mask, block_size=None, dtype=torch.float16)
    assert half.dtype == torch.float16
    assert half.min().item() == torch.finfo(torch.float16).min
    expected = torch.tensor([[1, 1, 1, 0]] * 3 + [[1, 1, 1, 1]], dtype=torch.bool)  # pad query sees itself
    assert torch.equal(allowed(half)[0, 0], expected)


def test_block_causal_mask_prompt_length_splits_two_blocks():
    # block_size=None with a prompt length: prompt = block 0, completion = one bidirectional block 1.
    mask = block_causal_mask(torch.ones(1, 5, dtype=torch.long), None, prompt_length=2)
    expected = torch.tensor([[1, 1, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 1]] * 3, dtype=torch.bool)
    assert torch.equal(allowed(mask)[0, 0], expected)


@pytest.mark.parametrize("block_size", [1, 2, 3, None])
@pytest.mark.parametrize("query_length", [1, 2, 4])
def test_cached_query_slice_equals_full_mask_rows(block_size, query_length):
    key_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    full = block_causal_mask(key_mask, block_size)
    cached = block_causal_mask(key_mask, block_size, query_length=query_length)
    assert cached.shape == (2, 1, query_length, 8)
    assert torch.equal(cached, full[:, :, -query_length:])


def test_block_causal_rows_never_fully_blocked_even_for_all_padding():
    key_mask = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]])
    for block_size in (1, 2, None):
        assert_no_fully_blocked_row(block_causal_mask(key_mask, block_size))


@pytest.mark.parametrize(
    ("block_size", "width"),
    [(2, 4), (4, 4), (3, 3), (None, 3), (1, 3)],
)
def test_left_pad_to_block_width_and_placement(block_size, width):
    input_ids, attention_mask = left_pad_to_block([[5, 6, 7], [8]], block_size, pad_token_id=0)
    assert input_ids.shape == attention_mask.shape == (2, width)
    assert input_ids[0, -3:].tolist() == [5, 6, 7]
    assert input_ids[1, -1].item() == 8
    assert attention_mask.sum(-1).tolist() == [3, 1]
    assert attention_mask[1, -1].item() == 1 and attention_mask[1, : width - 1].sum().item() == 0
    assert bool((input_ids[attention_mask == 0] == 0).all())


def test_left_pad_to_block_longer_prompt_rounds_up():
    input_ids, attention_mask = left_pad_to_block([[1] * 5], 4, pad_token_id=9)
    assert input_ids.tolist() == [[9, 9, 9, 1, 1, 1, 1, 1]]
    assert attention_mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]


def test_position_ids_count_real_tokens_only():
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    positions = position_ids_from_mask(attention_mask)
    assert positions[attention_mask.bool()].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    assert int(positions.min()) == 0  # padding slots clamp to 0, never negative


def test_gather_predictions_and_align_block_logits():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    targets = torch.tensor([2, 3])
    assert torch.equal(gather_predictions(logits, targets, shift=False), logits[:, 2:4])
    assert torch.equal(gather_predictions(logits, targets, shift=True), logits[:, 1:3])
    with pytest.raises(ValueError, match="needs a token before the first target"):
        gather_predictions(logits, torch.tensor([0]), shift=True)

    block = logits[:, 2:4]
    previous = logits[:, 1]
    assert torch.equal(align_block_logits(block, previous, shift=False), block)
    assert torch.equal(align_block_logits(block, previous, shift=True), logits[:, 1:3])
    with pytest.raises(ValueError, match="last clean position"):
        align_block_logits(block, None, shift=True)


def _hand_layout(shift: bool, completion_mask: torch.Tensor | None = None):
    prompt_ids = torch.tensor([[11, 12]])
    clean = torch.tensor([[21, 22, 23, 24]])
    noisy = torch.tensor([[21, 99, 99, 24]])
    if completion_mask is None:
        completion_mask = torch.ones(1, 4, dtype=torch.long)
    return training_layout(
        prompt_ids, torch.ones(1, 2, dtype=torch.long), clean, noisy, completion_mask, block_size=2, shift=shift
    )


# Layout indices for P=2, C=4, block 2: 0-1 prompt (block 0) | 2-3 clean block 1 | 4-5 clean block 2
# | 6-7 noisy block 1 | 8-9 noisy block 2.
HAND_PATTERN = torch.tensor(
    [
        # 0  1  2  3  4  5  6  7  8  9
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # prompt
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # clean block 1: causal across blocks, never sees noisy
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # clean block 2
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],  # noisy block 1: prompt + itself, not its clean copy
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],  # noisy block 2: prompt + clean block 1 + itself
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],
    ],
    dtype=torch.bool,
)


def test_training_layout_hand_example_cell_by_cell():
    layout = _hand_layout(shift=False)
    assert layout.input_ids.tolist() == [[11, 12, 21, 22, 23, 24, 21, 99, 99, 24]]
    assert layout.attention_mask.shape == (1, 1, 10, 10)
    pattern = allowed(layout.attention_mask)[0, 0]
    for query in range(10):
        for key in range(10):
            assert pattern[query, key] == HAND_PATTERN[query, key], f"cell (query={query}, key={key})"
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 2, 3, 4, 5]]
    assert layout.noisy_start == 6
    assert layout.source_index.tolist() == [6, 7, 8, 9]


def test_training_layout_shifted_sources():
    # A block's first token is read from the last clean position before it (prompt end, clean block 1
    # end); the others from the noisy position just before them.
    layout = _hand_layout(shift=True)
    assert layout.source_index.tolist() == [1, 6, 3, 8]
    assert torch.equal(allowed(layout.attention_mask)[0, 0], HAND_PATTERN)


def test_training_layout_completion_padding_hidden_and_no_fully_blocked_row():
    layout = _hand_layout(shift=False, completion_mask=torch.tensor([[1, 1, 1, 0]]))
    pattern = allowed(layout.attention_mask)[0, 0]
    expected = HAND_PATTERN.clone()
    expected[:, 5] = False  # the clean pad key
    expected[:, 9] = False  # the noisy pad key
    expected[5, 5] = expected[9, 9] = True  # pad queries still see themselves
    assert torch.equal(pattern, expected)
    assert_no_fully_blocked_row(layout.attention_mask)


def test_training_layout_bidirectional_completion():
    prompt_ids = torch.tensor([[0, 11, 12]])
    prompt_mask = torch.tensor([[0, 1, 1]])
    ids = torch.tensor([[21, 22]])
    layout = training_layout(prompt_ids, prompt_mask, ids, ids, torch.ones(1, 2), block_size=None, shift=True)
    pattern = allowed(layout.attention_mask)[0, 0]
    # indices: 0 pad | 1-2 prompt | 3-4 clean completion | 5-6 noisy completion
    assert pattern[5].tolist() == [False, True, True, False, False, True, True]
    assert pattern[3].tolist() == [False, True, True, True, True, False, False]
    assert layout.position_ids.tolist() == [[0, 0, 1, 2, 3, 2, 3]]
    assert layout.source_index.tolist() == [2, 5]
    assert_no_fully_blocked_row(layout.attention_mask)


def test_training_layout_rejects_prompt_off_block_boundary():
    with pytest.raises(ValueError, match="must be a multiple of block_size"):
        training_layout(
            torch.ones(1, 3, dtype=torch.long),
            torch.ones(1, 3),
            torch.ones(1, 4, dtype=torch.long),
            torch.ones(1, 4, dtype=torch.long),
            torch.ones(1, 4),
            block_size=2,
            shift=False,
        )


# ------------------------------------------------------------------------------------------- block arithmetic


@pytest.mark.parametrize(
    ("length", "block_size", "expected"), [(0, 4, 0), (1, 4, 4), (4, 4, 4), (5, 4, 8), (7, 1, 7), (7, None, 7)]
)
def test_round_up_to_block(length, block_size, expected):
    assert round_up_to_block(length, block_size) == expected


def test_pad_to_blocks_right_side_places_tokens_first_and_keeps_one_block():
    ids, mask = pad_to_blocks([[5, 6, 7, 8, 9], [1]], 4, pad_token_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    empty_ids, empty_mask = pad_to_blocks([[]], 4, pad_token_id=3, side="right", min_length=1)
    assert empty_ids.tolist() == [[3, 3, 3, 3]] and empty_mask.tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="side must be one of"):
        pad_to_blocks([[1]], 4, 0, side="middle")


def test_widen_to_blocks_is_the_list_rule_on_tensors():
    """A left-padded tensor batch re-padded to blocks equals padding the token lists directly."""
    rows = [[5, 6, 7, 8, 9], [1, 2]]
    ids, mask = pad_to_blocks(rows, None, pad_token_id=0)  # width 5: not a block multiple
    widened = widen_to_blocks(ids, mask, 4, pad_token_id=0, side="left")
    expected = pad_to_blocks(rows, 4, pad_token_id=0)
    assert all(torch.equal(a, b) for a, b in zip(widened, expected, strict=True))


def test_shown_at_is_committed_before_the_step():
    step_map = torch.tensor([[0, 2, 1, -1]])
    assert shown_at(step_map, 0).tolist() == [[False, False, False, False]]
    assert shown_at(step_map, 2).tolist() == [[True, False, True, False]]
    assert shown_at(step_map).tolist() == [[True, True, True, False]]  # the block after its last step
    per_position = torch.tensor([[1, 3, 0, 5]])
    assert shown_at(step_map, per_position).tolist() == [[True, True, False, False]]


def test_shifted_decoding_keeps_and_splits_the_logit_before_the_block():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    assert logits_to_keep_for_block(4, shift=True) == 5 and logits_to_keep_for_block(4, shift=False) == 4
    previous, block = split_previous_logit(logits, shift=True)
    assert torch.equal(previous, logits[:, 0]) and torch.equal(block, logits[:, 1:])
    previous, block = split_previous_logit(logits[:, 1:], shift=False)
    assert previous is None and torch.equal(block, logits[:, 1:])
