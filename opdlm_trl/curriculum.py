"""Schedules over training: the rollout-length curriculum (docs/method.md §6) and the rollout-threshold ramp.

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

The rollout threshold of dynamic decoding can ramp too (the reference code's ``dynamic_threshold_schedule``, e.g.
0.9 -> 0.7, off in its launchers): held at ``start`` for ``hold_steps``, then moved to ``end`` over ``ramp_steps``
along the same ``linear`` / ``cosine`` shapes, then clamped. A lower threshold late in training lets the student's
own rollouts commit several tokens a step, so it is trained on the multi-token states it will visit when decoded
fast (docs/results.md measures it as a lever).
"""

from __future__ import annotations

import math

from .masks import round_up_to_block

__all__ = ["RAMPS", "SCHEDULES", "completion_length", "rollout_threshold"]

SCHEDULES = ("linear", "cosine", "none")
RAMPS = ("linear", "cosine")  # the shapes of the threshold ramp ("none" = no ramp is `threshold_final=None`)


def ramp_fraction(progress: float, schedule: str) -> float:
    """How far along its ramp a schedule is at ``progress`` in [0, 1]: linear, or cosine (1 - cos, slow start)."""
    if schedule == "linear":
        return progress
    return 1.0 - math.cos(math.pi / 2 * progress)


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
    span = max_length - min_length
    return min(max_length, min_length + math.floor(span * ramp_fraction(step / warmup_steps, schedule)))


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


def rollout_threshold(
    step: int, start: float, end: float, hold_steps: int, ramp_steps: int, schedule: str = "cosine"
) -> float:
    """Dynamic-decoding threshold of the rollouts at optimizer step ``step`` (0-based: steps already taken).

    ``start`` up to ``hold_steps``, then ``start + (end - start) * f`` with ``f`` the ramp's fraction of
    ``(step - hold_steps) / ramp_steps``, clamped at ``end`` after the ramp.
    """
    if schedule not in RAMPS:
        raise ValueError(f"Unknown threshold schedule {schedule!r}; choose one of {RAMPS}.")
    if step < 0 or hold_steps < 0 or ramp_steps < 1:
        raise ValueError(f"Need step >= 0, hold_steps >= 0, ramp_steps >= 1; got {step}, {hold_steps}, {ramp_steps}.")
    progress = min(max(step - hold_steps, 0) / ramp_steps, 1.0)
    return start + (end - start) * ramp_fraction(progress, schedule)
