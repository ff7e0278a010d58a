"""Row groups of similar length: the same forwards with less padding (an exact speed-up).

A generation batch holds prompts of very different lengths (HumanEval prompts with a chat template: 95 to 449
tokens, median 184), left-padded to the longest, and completions right-padded to the longest rollout. Every padded
column still costs a full transformer column in the teacher's scoring forward and in the student's
``[prompt | x0 | x_t]`` forward and backward: on the training split, ~38% of the prompt columns of a random batch of
8 are padding. Rows never attend to each other and padding keys are never attended (the padding-invariance
property of :mod:`opdlm_trl.masks`), so forwarding rows in a few groups of similar length, each cut to the columns
its rows use, computes the same values with fewer columns. Only the order of floating-point reductions can change.

Why a fixed number of groups: under DDP / DeepSpeed every process must run the same number of forwards per step
(ZeRO-3 gathers parameters collectively in each forward), so the partition never depends on the data beyond the
group boundaries: ``min(max_groups, rows)`` non-empty groups on every process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .masks import blocks_needed

__all__ = ["RowGroup", "content_columns", "length_groups", "merge_groups", "plan_groups", "restore_row_order"]


@dataclass(frozen=True)
class RowGroup:
    """Rows forwarded together and the column windows they need.

    Attributes:
        rows: ``(G,)`` row indices into the batch, ascending.
        prompt_start: first prompt column kept (leading columns are padding in every row of the group).
        completion_end: completion columns ``[0, completion_end)`` are kept (later ones are padding everywhere).
    """

    rows: torch.Tensor
    prompt_start: int
    completion_end: int


def length_groups(lengths: torch.Tensor, max_groups: int) -> list[torch.Tensor]:
    """Split rows into ``min(max_groups, rows)`` groups of similar length, minimising the padded area.

    ``lengths`` are the columns each row needs. Rows are sorted by length and cut into contiguous runs; the cost of a
    run is ``rows x longest row``. Optimal over contiguous cuts by dynamic programming (``O(K B^2)``, B is a batch,
    not a dataset). Returns the row indices of each group, ascending inside a group.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}.")
    rows = lengths.shape[0]
    groups = min(max_groups, rows)
    if groups <= 1:
        return [torch.arange(rows, device=lengths.device)] if rows else []
    order = torch.argsort(lengths.cpu(), stable=True)
    sorted_lengths = lengths.cpu()[order].tolist()
    inf = float("inf")
    # cost[k][i]: best area of the first i sorted rows in k groups; cut[k][i]: start of the last group.
    cost = [[inf] * (rows + 1) for _ in range(groups + 1)]
    cut = [[0] * (rows + 1) for _ in range(groups + 1)]
    cost[0][0] = 0.0
    for k in range(1, groups + 1):
        for i in range(k, rows + 1):
            for j in range(k - 1, i):  # last group = sorted rows j..i-1, longest is sorted_lengths[i-1]
                value = cost[k - 1][j] + (i - j) * sorted_lengths[i - 1]
                if value < cost[k][i]:
                    cost[k][i], cut[k][i] = value, j
    bounds, end = [], rows
    for k in range(groups, 0, -1):
        start = cut[k][end]
        bounds.append((start, end))
        end = start
    return [order[start:end].sort().values.to(lengths.device) for start, end in reversed(bounds)]


def content_columns(
    rows: torch.Tensor, prompt_mask: torch.Tensor, completion_mask: torch.Tensor, block_size: int | None
) -> RowGroup:
    """The column windows of ``rows``: leading all-padding prompt columns and trailing all-padding completion ones.

    Prompt columns are dropped in whole blocks only, so every kept column stays in the same block (blocks count
    from canvas column 0 and the prompt ends on a block boundary). Completion columns can be dropped one by one:
    dropping from the right never moves a block boundary.
    """
    prompt_width = prompt_mask.shape[1]
    real_prompt = prompt_mask[rows].bool().any(0)
    leading = int(real_prompt.long().argmax()) if real_prompt.any() else prompt_width
    if block_size is not None:
        leading = (leading // block_size) * block_size
    used = completion_mask[rows].bool().any(0)
    completion_end = int(used.nonzero().max()) + 1 if used.any() else 0
    if block_size is not None and completion_end:
        completion_end = min(blocks_needed(completion_end, block_size) * block_size, completion_mask.shape[1])
    return RowGroup(rows=rows, prompt_start=leading, completion_end=completion_end)


def plan_groups(
    prompt_mask: torch.Tensor, completion_mask: torch.Tensor, block_size: int | None, max_groups: int
) -> list[RowGroup]:
    """Group rows by the columns they need (real prompt + completion tokens) and cut each group's windows.

    ``completion_mask`` marks the completion columns a row uses: for the student's forward, the training batch's
    ``completion_key_mask`` (the layout's keys, :class:`opdlm_trl.batch.TrainingBatch`); for the teacher, the
    completion mask of the tokens it scores.
    """
    lengths = prompt_mask.long().sum(1) + completion_mask.long().sum(1)
    return [
        content_columns(rows, prompt_mask, completion_mask, block_size) for rows in length_groups(lengths, max_groups)
    ]


def restore_row_order(parts: list[torch.Tensor], groups: list[RowGroup]) -> torch.Tensor:
    """Concatenate per-group row tensors and put rows back in batch order."""
    order = torch.cat([group.rows for group in groups])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(parts)[inverse]


def merge_groups(parts: list, groups: list[RowGroup]):
    """Per-group dataclasses of row tensors (e.g. teacher targets) as one, rows back in batch order.

    Fields that are None in the groups stay None, fields that are no tensor (a teacher's output head) are the first
    group's; every tensor field must have rows on dimension 0.
    """
    values = {}
    for item in dataclasses.fields(parts[0]):
        tensors = [getattr(part, item.name) for part in parts]
        if isinstance(tensors[0], torch.Tensor):
            values[item.name] = restore_row_order(tensors, groups)
    return dataclasses.replace(parts[0], **values)
