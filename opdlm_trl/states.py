"""Which noisy states the student is trained on (docs/method.md §4), and the MDLM forward process (§5).

A rollout records, for every completion position, the denoising step at which the sampler
committed it (``step_map``, block-local, ``-1`` = never committed). That record reconstructs every
state the sampler visited: the state at ``(block b, step s)`` has blocks ``< b`` clean, the positions
of block ``b`` with ``step_map >= s`` (or ``-1``) still ``[MASK]``, and blocks ``> b`` not written yet.

Because noisy block ``b`` of the ``[prompt | x0 | x_t]`` training layout (:mod:`opdlm_trl.masks`)
attends only the prompt, the clean blocks before ``b`` and itself, one training row can carry a
*different* visited state in every block. This module builds that noisy copy ``x_t`` and the
supervision mask; it never builds the layout and never calls a model.

Selections:

* ``per_block`` (reference code, default): every block that the sampler ran picks one of its own
  steps uniformly; all blocks are stitched into one row.
* ``global_step`` (paper, Algorithm 1): one step ``k`` uniform over all of the row's steps; only the
  block containing ``k`` carries its state and is supervised; the other decoded blocks are clean.
  (Equivalent to choosing block ``b`` with probability proportional to its step count, then a step
  uniformly inside it.)
* ``every_step``: every visited state once. The batch grows to ``K * B`` rows (``K`` = most steps any block
  took): copy ``k`` of a row carries step ``k`` of each block that took more than ``k`` steps (the other blocks
  stay clean and unsupervised), and ``TrainingStates.source_row`` names the rollout row of each copy. The
  reference code trains one state per block; this supervises all of them from the same rollout, at ``K`` times
  the student's forward and backward (a lever measured in docs/results.md, not the method's default).
* ``random_remask`` (the "OPDLM_off" ablation): ignore the trajectory; per row draw
  ``t ~ U(eps, 1)`` and mask every committed position independently with probability ``t``
  (at least one supervisable position per non-empty row).

Supervised positions (``loss_mask``) are masked in the chosen state, lie inside the completion
(``completion_mask == 1``: up to and including the end-of-turn token, or up to but excluding it with
``exclude_stop_token=True``, as the paper's reference code does) and were committed
(``step_map >= 0``). Positions the sampler never decoded (``decoded_mask == 0``) and positions it
never committed are ``[MASK]`` in the noisy copy; the layout key-masks them anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .masks import shown_at

__all__ = [
    "SELECTIONS",
    "TrainingStates",
    "mdlm_states",
    "select_states",
    "select_states_from_tensors",
    "stop_token_mask",
]

SELECTIONS = ("per_block", "global_step", "every_step", "random_remask")


@dataclass
class TrainingStates:
    """Noisy completion copy and supervision for one training forward.

    Attributes:
        noisy_ids: ``(B, C)`` ``x_t``: ``mask_token_id`` at masked / undecoded positions, ``x0`` elsewhere.
        loss_mask: ``(B, C)`` bool, positions that carry a loss.
        state_step: ``(B, n_blocks)`` block-local step chosen for each block, ``-1`` where the block
            carries no trajectory state (not run, not chosen, or a forward-process selection).
        mask_rate: ``(B,)`` float32 masking rate ``t`` of each row, for MDLM weighting and metrics:
            the drawn ``t`` for a row-level forward process, the mean of the drawn block rates for the
            per-block forward process, and for trajectory states the realised fraction of masked
            positions among the supervisable positions of the chosen blocks (0 where there are none).
        position_rate: ``(B, C)`` float32 ``t`` that governed each position (the block's own ``t`` in
            the per-block forward process, else the row's ``mask_rate``); gather it at supervised
            positions for :func:`opdlm_trl.losses.mdlm_loss`.
        source_row: ``(N,)`` long, the rollout row of each state row where a selection makes several rows of
            one rollout row (``every_step``; every tensor above then has ``N`` rows); None: row ``i`` is rollout
            row ``i``.
    """

    noisy_ids: torch.Tensor
    loss_mask: torch.Tensor
    state_step: torch.Tensor
    mask_rate: torch.Tensor
    position_rate: torch.Tensor
    source_row: torch.Tensor | None = None

    def rows_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-rollout-row tensor (``(B, ...)``) aligned with these states' rows."""
        return tensor if self.source_row is None else tensor[self.source_row.to(tensor.device)]

    def supervised_per_rollout_row(self, n_rows: int) -> torch.Tensor:
        """``(B,)`` supervised positions of each rollout row, summed over its state rows."""
        counts = self.loss_mask.sum(1)
        if self.source_row is None:
            return counts
        return torch.zeros(n_rows, dtype=counts.dtype, device=counts.device).index_add_(0, self.source_row, counts)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``U[0, 1)`` draws; taken on the generator's device (a CPU generator also serves GPU tensors)."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def _uniform_index(count: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform integer in ``[0, count)`` elementwise (vectorised ``randint`` with per-element bounds); -1 where 0."""
    draw = torch.floor(_uniform(tuple(count.shape), generator, count.device) * count).long()
    draw = torch.minimum(draw, count - 1)  # float rounding can hit ``count`` exactly
    return torch.where(count > 0, draw, torch.full_like(draw, -1))


def _check_shapes(completion_ids: torch.Tensor, block_steps: torch.Tensor, block_size: int, **others) -> None:
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be (B, C), got shape {tuple(completion_ids.shape)}.")
    batch, width = completion_ids.shape
    if block_size < 1 or width % block_size:
        raise ValueError(
            f"Completion width {width} must be a positive multiple of block_size={block_size}: "
            "pad the completion to whole blocks (the sampler always does)."
        )
    for name, tensor in others.items():
        if tuple(tensor.shape) != (batch, width):
            raise ValueError(f"{name} must have shape {(batch, width)}, got {tuple(tensor.shape)}.")
    if tuple(block_steps.shape) != (batch, width // block_size):
        raise ValueError(
            f"block_steps must have shape {(batch, width // block_size)}, got {tuple(block_steps.shape)}."
        )


def _check_trajectory(
    decoded_mask: torch.Tensor, step_map: torch.Tensor, block_steps: torch.Tensor, block_size: int
) -> None:
    """Reject a step map that cannot come from the sampler (one vectorised check, one host sync)."""
    batch, width = step_map.shape
    ran = block_steps > 0
    decoded_block = decoded_mask.bool().reshape(batch, -1, block_size).any(-1)
    steps_at = block_steps.repeat_interleave(block_size, dim=1)
    bad_step = (step_map >= steps_at) | (step_map < -1) | ((step_map >= 0) & ~decoded_mask.bool())
    if bool((decoded_block != ran).any() | bad_step.any()):
        raise ValueError(
            "Inconsistent trajectory: every block with block_steps > 0 must be marked in decoded_mask (and only "
            "those), and step_map must lie in [-1, block_steps) at decoded positions. Pass the sampler's Rollout "
            "unchanged."
        )


def _per_block_steps(block_steps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniform step per block that ran; -1 for blocks that did not."""
    return _uniform_index(block_steps.long(), generator)


def _global_steps(block_steps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One step uniform over the row's trajectory; its block gets its local step, every other block -1."""
    steps = block_steps.long()
    cumulative = steps.cumsum(1)
    global_step = _uniform_index(cumulative[:, -1], generator)  # (B,), -1 for a row with no steps
    block = (cumulative <= global_step[:, None]).sum(1).clamp(max=steps.shape[1] - 1)
    before = cumulative.gather(1, block[:, None]) - steps.gather(1, block[:, None])
    local = global_step[:, None] - before
    chosen = torch.full_like(steps, -1)
    local = torch.where(global_step[:, None] >= 0, local, torch.full_like(local, -1))
    return chosen.scatter(1, block[:, None], local)


def _states_from_steps(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    decoded_mask: torch.Tensor,
    step_map: torch.Tensor,
    state_step: torch.Tensor,
    block_size: int,
    mask_token_id: int,
) -> TrainingStates:
    """Stitch the visited state ``(b, state_step[b])`` of every chosen block into one noisy row."""
    step_at = state_step.repeat_interleave(block_size, dim=1)  # (B, C) chosen step of each position's block
    chosen = step_at >= 0
    masked = chosen & ~shown_at(step_map, step_at)
    decoded = decoded_mask.bool()
    noisy_ids = torch.where(masked | ~decoded, torch.full_like(completion_ids, mask_token_id), completion_ids)
    supervisable = chosen & completion_mask.bool() & decoded & (step_map >= 0)
    loss_mask = masked & supervisable
    mask_rate = loss_mask.sum(1).float() / supervisable.sum(1).clamp(min=1).float()
    return TrainingStates(
        noisy_ids=noisy_ids,
        loss_mask=loss_mask,
        state_step=state_step,
        mask_rate=mask_rate,
        position_rate=mask_rate[:, None].expand_as(step_map).contiguous(),
    )


def _every_step_states(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    decoded_mask: torch.Tensor,
    step_map: torch.Tensor,
    block_steps: torch.Tensor,
    block_size: int,
    mask_token_id: int,
) -> TrainingStates:
    """Every visited state once: copy ``k`` of each row carries step ``k`` of every block with more steps."""
    steps = block_steps.long()
    copies = max(int(steps.max()), 1) if steps.numel() else 1
    parts = [
        _states_from_steps(
            completion_ids,
            completion_mask,
            decoded_mask,
            step_map,
            torch.where(steps > k, torch.full_like(steps, k), torch.full_like(steps, -1)),
            block_size,
            mask_token_id,
        )
        for k in range(copies)
    ]
    rows = torch.arange(completion_ids.shape[0], device=completion_ids.device)
    return TrainingStates(
        noisy_ids=torch.cat([p.noisy_ids for p in parts]),
        loss_mask=torch.cat([p.loss_mask for p in parts]),
        state_step=torch.cat([p.state_step for p in parts]),
        mask_rate=torch.cat([p.mask_rate for p in parts]),
        position_rate=torch.cat([p.position_rate for p in parts]),
        source_row=rows.repeat(copies),
    )


def _forward_process(
    completion_ids: torch.Tensor,
    maskable: torch.Tensor,
    supervisable: torch.Tensor,
    position_rate: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each ``maskable`` position with probability ``position_rate``; supervise the ``supervisable`` ones.

    At least one supervisable position per non-empty row is masked: it avoids rows that carry no loss
    at small ``t`` (a wasted forward) and biases the rate of very short rows slightly upward, as in
    common MDLM implementations. Positions outside ``maskable`` are always ``[MASK]``.
    Returns ``(noisy_ids, loss_mask)``.
    """
    masked = (_uniform(tuple(maskable.shape), generator, maskable.device) < position_rate) & maskable
    scores = _uniform(tuple(maskable.shape), generator, maskable.device).masked_fill(~supervisable, -1.0)
    forced = torch.zeros_like(masked).scatter(1, scores.argmax(1, keepdim=True), True)
    needs_one = supervisable.any(1, keepdim=True) & ~(masked & supervisable).any(1, keepdim=True)
    masked = masked | (forced & needs_one)
    noisy_ids = torch.where(masked | ~maskable, torch.full_like(completion_ids, mask_token_id), completion_ids)
    return noisy_ids, masked & supervisable


def _draw_rates(shape: tuple[int, ...], eps: float, generator: torch.Generator | None, device) -> torch.Tensor:
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps}.")
    return eps + (1.0 - eps) * _uniform(shape, generator, device)


def _random_states(
    completion_ids: torch.Tensor,
    maskable: torch.Tensor,
    supervisable: torch.Tensor,
    n_blocks: int,
    block_size: int,
    mask_token_id: int,
    generator: torch.Generator | None,
    eps: float,
    per_block: bool,
) -> TrainingStates:
    batch = completion_ids.shape[0]
    device = completion_ids.device
    if per_block:
        block_rate = _draw_rates((batch, n_blocks), eps, generator, device)
        position_rate = block_rate.repeat_interleave(block_size, dim=1)
        has_tokens = supervisable.reshape(batch, n_blocks, block_size).any(-1)
        mask_rate = (block_rate * has_tokens).sum(1) / has_tokens.sum(1).clamp(min=1)
    else:
        mask_rate = _draw_rates((batch,), eps, generator, device)
        position_rate = mask_rate[:, None].expand(batch, completion_ids.shape[1]).contiguous()
    noisy_ids, loss_mask = _forward_process(
        completion_ids, maskable, supervisable, position_rate, mask_token_id, generator
    )
    return TrainingStates(
        noisy_ids=noisy_ids,
        loss_mask=loss_mask,
        state_step=torch.full((batch, n_blocks), -1, dtype=torch.long, device=device),
        mask_rate=mask_rate,
        position_rate=position_rate,
    )


def stop_token_mask(completion_mask: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` bool: the stop token of each row that ended on one (``stopped``, ``(B,)`` bool).

    The sampler ends a stopped row's ``completion_mask`` at its stop token, so the stop is the row's last
    completion position; rows cut by the length limit have none. Everything after the stop is already outside
    ``completion_mask``, so removing this position removes "the stop token and anything after it".
    """
    positions = torch.arange(completion_mask.shape[1], device=completion_mask.device)
    last = (completion_mask.long().sum(1) - 1)[:, None]  # -1 for an empty row: matches no position
    return (positions[None, :] == last) & stopped.to(completion_mask.device).bool()[:, None]


def select_states_from_tensors(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    decoded_mask: torch.Tensor,
    step_map: torch.Tensor,
    block_steps: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    selection: str = "per_block",
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    unsupervised: torch.Tensor | None = None,
) -> TrainingStates:
    """Training states from plain rollout tensors (see the module docstring for the selections).

    Args:
        completion_ids: ``(B, C)`` committed tokens ``x0``, ``C = n_blocks * block_size``.
        completion_mask: ``(B, C)`` 1 for real completion tokens up to and including the stop token.
        decoded_mask: ``(B, C)`` 1 for every position of every block the sampler ran.
        step_map: ``(B, C)`` block-local commit step, ``-1`` = never committed.
        block_steps: ``(B, n_blocks)`` steps each block took (0 = block not run).
        block_size: tokens per block.
        mask_token_id: the student's ``[MASK]`` id.
        selection: one of :data:`SELECTIONS`.
        generator: optional ``torch.Generator`` for reproducible draws.
        eps: lower bound of ``t`` for ``random_remask``.
        unsupervised: optional ``(B, C)`` bool, completion positions that never carry a loss although they are
            in ``completion_mask`` (the stop tokens, :func:`stop_token_mask`); they stay in the states as context.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"Unknown state selection {selection!r}; choose one of {SELECTIONS}.")
    _check_shapes(
        completion_ids,
        block_steps,
        block_size,
        completion_mask=completion_mask,
        decoded_mask=decoded_mask,
        step_map=step_map,
    )
    if unsupervised is not None:
        completion_mask = completion_mask.bool() & ~unsupervised.bool()
    if selection == "random_remask":
        # The whole committed canvas is re-masked at rate t (tokens committed after the stop in its
        # block stay visible context when unmasked, as in the visited states); only the completion
        # up to the stop is supervised.
        committed = decoded_mask.bool() & (step_map >= 0)
        supervisable = committed & completion_mask.bool()
        n_blocks = block_steps.shape[1]
        return _random_states(
            completion_ids, committed, supervisable, n_blocks, block_size, mask_token_id, generator, eps, False
        )
    _check_trajectory(decoded_mask, step_map, block_steps, block_size)
    if selection == "every_step":
        return _every_step_states(
            completion_ids, completion_mask, decoded_mask, step_map, block_steps, block_size, mask_token_id
        )
    choose = _per_block_steps if selection == "per_block" else _global_steps
    state_step = choose(block_steps, generator)
    return _states_from_steps(
        completion_ids, completion_mask, decoded_mask, step_map, state_step, block_size, mask_token_id
    )


def select_states(
    rollout_like: Any,
    selection: str = "per_block",
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    exclude_stop_token: bool = False,
) -> TrainingStates:
    """Training states from a :class:`opdlm_trl.sampling.Rollout` (or any object with its fields).

    Reads ``completion_ids``, ``completion_mask``, ``decoded_mask``, ``step_map``, ``block_steps``,
    ``block_size`` and ``mask_token_id`` (and ``finish_reason`` with ``exclude_stop_token``); see
    :func:`select_states_from_tensors`. ``exclude_stop_token=True`` never supervises the stop token of a row
    that ended on one (the reference code's choice; default: the stop is supervised like any token).
    """
    unsupervised = None
    if exclude_stop_token:
        stopped = torch.tensor([reason == "stop" for reason in rollout_like.finish_reason], dtype=torch.bool)
        unsupervised = stop_token_mask(rollout_like.completion_mask, stopped)
    return select_states_from_tensors(
        rollout_like.completion_ids,
        rollout_like.completion_mask,
        rollout_like.decoded_mask,
        rollout_like.step_map,
        rollout_like.block_steps,
        int(rollout_like.block_size),
        int(rollout_like.mask_token_id),
        selection=selection,
        generator=generator,
        eps=eps,
        unsupervised=unsupervised,
    )


def mdlm_states(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    per_block: bool = False,
) -> TrainingStates:
    """MDLM (``per_block=False``: one ``t ~ U(eps, 1)`` per row) or BD3LM (``per_block=True``: one per
    block) forward process over data completions, for the MDLM/SFT baseline objective (docs/method.md §5).

    Every position with ``completion_mask == 1`` is masked independently with its ``t``; at least one
    per non-empty row. ``position_rate`` carries the ``t`` for the ``1/t`` weight.
    """
    batch, width = completion_ids.shape
    if block_size < 1 or width % block_size:
        raise ValueError(f"Completion width {width} must be a positive multiple of block_size={block_size}.")
    if tuple(completion_mask.shape) != (batch, width):
        raise ValueError(f"completion_mask must have shape {(batch, width)}, got {tuple(completion_mask.shape)}.")
    return _random_states(
        completion_ids,
        completion_mask.bool(),
        completion_mask.bool(),
        width // block_size,
        block_size,
        mask_token_id,
        generator,
        eps,
        per_block,
    )
