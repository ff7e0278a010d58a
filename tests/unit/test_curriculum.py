"""Schedules: the rollout-length curriculum (endpoints, monotonicity, block rounding, validation) and the
rollout-threshold ramp (hold, ramp, clamp)."""

from __future__ import annotations

import math

import pytest

from opdlm_trl.curriculum import completion_length, rollout_threshold


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_endpoints(schedule):
    assert completion_length(0, 100, 4000, 10, schedule, block_size=4) == 100
    assert completion_length(10, 100, 4000, 10, schedule, block_size=4) == 4000
    assert completion_length(57, 100, 4000, 10, schedule, block_size=4) == 4000


def test_linear_matches_paper_formula_before_rounding():
    for step in range(12):
        expected = min(4000, 100 + math.floor(step / 10 * 3900))
        assert completion_length(step, 100, 4000, 10, "linear", block_size=1) == expected


def test_cosine_matches_reference_ramp_and_starts_slower_than_linear():
    for step in range(100):  # at step 100 the ramp is exactly L_max (cos(pi/2) is not exactly 0 in floats)
        expected = 32 + math.floor(992 * (1 - math.cos(math.pi / 2 * step / 100)))
        assert completion_length(step, 32, 1024, 100, "cosine", block_size=1) == expected
    assert completion_length(30, 32, 1024, 100, "cosine", 1) < completion_length(30, 32, 1024, 100, "linear", 1)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "none"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_monotone_and_block_multiples(schedule, block_size):
    lengths = [completion_length(s, 10, 300, 25, schedule, block_size) for s in range(40)]
    assert all(a <= b for a, b in zip(lengths, lengths[1:], strict=False))
    assert all(length % block_size == 0 and length >= block_size for length in lengths)
    assert max(lengths) <= max(block_size, 300 // block_size * block_size)


def test_rounding_up_and_cap():
    # 10 tokens -> rounded up to 12 (three blocks of 4); the cap 302 -> 300 (never above the budget).
    assert completion_length(0, 10, 302, 5, "linear", block_size=4) == 12
    assert completion_length(5, 10, 302, 5, "linear", block_size=4) == 300
    # min 0 still yields one block; a budget below one block yields one block.
    assert completion_length(0, 0, 64, 5, "linear", block_size=16) == 16
    assert completion_length(0, 1, 3, 5, "linear", block_size=4) == 4


def test_none_and_zero_warmup_give_max_at_once():
    assert completion_length(0, 100, 400, 10, "none", block_size=4) == 400
    assert completion_length(0, 100, 400, 0, "linear", block_size=4) == 400
    assert completion_length(0, 100, 400, 0, "cosine", block_size=4) == 400


def test_block_size_none_means_no_rounding():
    assert completion_length(3, 10, 101, 10, "linear", block_size=None) == 10 + math.floor(0.3 * 91)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schedule": "exp"}, "schedule"),
        ({"step": -1}, "step"),
        ({"min_length": 500}, "min_length"),
        ({"warmup_steps": -2}, "warmup_steps"),
        ({"block_size": 0}, "block_size"),
        ({"max_length": 0, "min_length": 0}, "max_length"),
    ],
)
def test_validation(kwargs, message):
    arguments = {"step": 0, "min_length": 10, "max_length": 100, "warmup_steps": 5, "schedule": "linear"}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        completion_length(**arguments)


def test_threshold_ramp_holds_then_ramps_then_clamps_by_hand():
    # 0.9 -> 0.7, hold 2 steps, linear over 4: 0.9, 0.9, 0.9, 0.85, 0.8, 0.75, 0.7, 0.7
    expected = [0.9, 0.9, 0.9, 0.85, 0.8, 0.75, 0.7, 0.7]
    got = [rollout_threshold(step, 0.9, 0.7, 2, 4, "linear") for step in range(8)]
    assert got == pytest.approx(expected)


def test_cosine_threshold_ramp_is_the_reference_shape_and_starts_slower():
    # Reference code "cos": start + (end - start) * (1 - cos(pi/2 * progress)); at half-way 1 - cos(pi/4) = 0.2929.
    assert rollout_threshold(5, 0.9, 0.7, 0, 10, "cosine") == pytest.approx(0.9 - 0.2 * (1 - math.sqrt(0.5)))
    assert rollout_threshold(5, 0.9, 0.7, 0, 10, "cosine") > rollout_threshold(5, 0.9, 0.7, 0, 10, "linear")
    assert rollout_threshold(10, 0.9, 0.7, 0, 10, "cosine") == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"schedule": "none"}, "schedule"), ({"step": -1}, "step"), ({"ramp_steps": 0}, "ramp_steps"),
     ({"hold_steps": -1}, "hold_steps")],
)  # fmt: skip
def test_threshold_ramp_validation(kwargs, message):
    arguments = {"step": 0, "start": 0.9, "end": 0.7, "hold_steps": 0, "ramp_steps": 5, "schedule": "linear"}
    with pytest.raises(ValueError, match=message):
        rollout_threshold(**{**arguments, **kwargs})
