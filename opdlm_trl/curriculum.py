"""Rollout-length curriculum (docs/method.md §6).

Early in training the student's rollouts are short: long completions from an unconverted student
are mostly noise, cost sampler time and give the teacher little to correct. The length grows from
``min_length`` to ``max_length`` over ``warmup_steps`` steps (the caller's unit: :class:`OPDTrainer` passes
optimizer steps, one generation batch each; docs/trainer.md converts the reference code's rollout steps):

* ``linear`` (paper): ``L_s = min(L_max, L_min + floor(s / S_warm * (L_max - L_min)))``;
* ``cosine`` (reference code): ``L_min + (L_max - L_min) * (1 - cos(pi/2 * s / S_warm))``, floored;
* ``none``: ``L_max`` from the start.

The sampler decodes whole blocks, so the result is rounded *up* to a multiple of ``block_size``
(at least one block) and capped at ``max_length`` rounded *down* to a block multiple, so the
curriculum never asks for more tokens than the configured budget (unless that budget is below one
block, in which case one block is the only possible length).
"""

from __future__ import annotations

import math

from .masks import round_up_to_block

__all__ = ["SCHEDULES", "completion_length"]

SCHEDULES = ("linear", "cosine", "none")


def _validate(step: int, min_length: int, max_length: int, warmup_steps: int, schedule: str, block_size: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown curriculum schedule {schedule!r}; choose one of {SCHEDULES}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}.")
    if not 0 <= min_length <= max_length:
        raise ValueError(
            f"Need 0 <= min_length <= max_length, got min_length={min_length}, max_length={max_length}: "
            "lower the minimum or raise the maximum completion length."
        )


def _ramp(step: int, min_length: int, max_length: int, warmup_steps: int, schedule: str) -> int:
    """Un-rounded length at ``step``."""
    if schedule == "none" or warmup_steps == 0 or step >= warmup_steps:
        return max_length
    progress = step / warmup_steps
    span = max_length - min_length
    if schedule == "linear":
        return min(max_length, min_length + math.floor(progress * span))
    return min(max_length, min_length + math.floor(span * (1.0 - math.cos(math.pi / 2 * progress))))


def completion_length(
    step: int,
    min_length: int,
    max_length: int,
    warmup_steps: int,
    schedule: str = "linear",
    block_size: int | None = 1,
) -> int:
    """Completion length (tokens) for rollout step ``step``, a positive multiple of ``block_size``.

    Args:
        step: step (0-based), in the unit of ``warmup_steps``.
        min_length: length at step 0 (before rounding).
        max_length: length after ``warmup_steps``; also the hard cap.
        warmup_steps: steps of the ramp; 0 means ``max_length`` at once.
        schedule: ``"linear"``, ``"cosine"`` or ``"none"``.
        block_size: tokens per block; ``None`` (one block for the whole completion) means no rounding.
    """
    block = 1 if block_size is None else int(block_size)
    _validate(step, min_length, max_length, warmup_steps, schedule, block)
    length = _ramp(step, min_length, max_length, warmup_steps, schedule)
    cap = max(block, (max_length // block) * block)
    rounded_up = max(block, round_up_to_block(length, block))
    return min(rounded_up, cap)
