"""Parallel-decoding diagnostics: how much parallelism is reachable, and what the student does.

Pure tensor functions and tallies, shared by the trainer's metrics (:class:`opdlm_trl.OPDTrainer` logs the
out-of-order rate and the confidence by offset from its own rollouts and logits) and by evaluation
(:mod:`opdlm_trl.eval` reports them for every student row, ``docs/evaluation.md``). Nothing here loads a model or
imports :mod:`opdlm_trl.eval`, so training never loads the evaluation CLI or its code sandbox.

* **Oracle ceiling** (a conservative chain bound): on a greedy text (the teacher's own; and, beside it,
  each student row's own output: how much parallelism the text the student actually writes allows),
  a position ``j`` whose left neighbours ``i..j-1`` in its block are still masked can be predicted by a
  perfectly distilled student with confidence at least ``prod_{k=i..j} p_T(x_k | x_<k)``: its prediction is
  the teacher's marginal over the unknown neighbours, a sum in which the greedy path is one term.
  Conservative twice over (other paths add probability; the student may also be sure of a different
  token). A student that commits every position whose bound reaches the threshold needs one denoising step per
  chain restart; ``tokens / steps`` is the tokens per forward it reaches (:func:`chain_bound_steps`,
  :func:`oracle_ceiling`, :class:`OracleCeiling`; :func:`opdlm_trl.eval.teacher_oracle_ceiling` runs it on a
  teacher's greedy answers).
* **Confidence by offset**: the student's top-1 probability at a masked position ``d`` places right
  of its block's frontier (first still-masked position), beside the teacher's max probability there.
  A student stuck at ~1 token per forward is confident at ``d = 0`` only.
* **Out-of-order commits**: the fraction of the student's commits made while a position to their left
  in the block was still masked (:func:`out_of_order_commits`); OPD's targets condition on the left
  only, so these are the commits its training never checks. ``0`` for ``commit_order="left_to_right"``.

The threshold sweep (dynamic decoding at several thresholds beside the AR teacher and the oracle ceiling) is
evaluation: :func:`opdlm_trl.eval.threshold_sweep`, drawn by :func:`opdlm_trl.eval.report.plot_sweep`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .masks import blocks_needed, frontier_offsets
from .modeling import suppress_mask_logit

__all__ = [
    "CEILING_NOTE",
    "HISTOGRAM_BINS",
    "OWN_TEXT_NOTE",
    "OffsetConfidence",
    "OracleCeiling",
    "chain_bound_steps",
    "offset_confidence_metrics",
    "offset_confidence_sums",
    "oracle_ceiling",
    "out_of_order_commits",
    "teacher_top1_logprob",
    "top1_probability",
]

HISTOGRAM_BINS = 10  # bins of 0.1 over [0, 1]
DEFAULT_OFFSETS = 4  # frontier offsets 0..3
CEILING_NOTE = (
    "conservative chain bound: tokens/forward of a student that commits, on the teacher's own greedy text, "
    "every position whose chain probability prod_{k=i..j} p_T(x_k | x_<k) from the frontier i reaches the threshold"
)
OWN_TEXT_NOTE = CEILING_NOTE.replace("on the teacher's own greedy text", "on this student row's own output")


def _check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}.")


def _check_block_size(block_size: int | None) -> None:
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None (one block), got {block_size!r}.")


# ------------------------------------------------------------------------------------------ oracle ceiling


def chain_bound_steps(
    token_logprobs: torch.Tensor, mask: torch.Tensor, block_size: int | None, threshold: float
) -> torch.Tensor:
    """``(B, n_blocks)`` denoising steps of the chain-bound oracle on a teacher-scored completion batch.

    ``token_logprobs`` ``(B, C)``: ``log p_T(x_j | prompt, x_<j)`` of the teacher's own greedy tokens
    (:attr:`opdlm_trl.teachers.TeacherTargets.token_logprobs`); ``mask`` ``(B, C)``: the real tokens
    (through the stop token). Completion position 0 starts a block (the sampler's prompt ends on a
    block boundary); ``block_size=None`` = one block. Inside a block, each step starts at the frontier
    (first uncommitted position), always commits it, and keeps committing while the running product of
    ``p_T`` from the frontier stays ``>= threshold``; the first position that breaks the chain is the
    next step's frontier. Padding after the stop counts neither as a token nor as a step.
    """
    _check_threshold(threshold)
    _check_block_size(block_size)
    if token_logprobs.shape != mask.shape or token_logprobs.dim() != 2:
        raise ValueError(
            f"token_logprobs {tuple(token_logprobs.shape)} and mask {tuple(mask.shape)} must be the same (B, C) shape."
        )
    batch, length = mask.shape
    size = max(length, 1) if block_size is None else block_size
    padded = blocks_needed(length, size) * size
    real = torch.nn.functional.pad(mask.bool(), (0, padded - length)).view(batch, -1, size)
    logprobs = torch.nn.functional.pad(token_logprobs.double(), (0, padded - length)).view(batch, -1, size)
    log_threshold = math.log(threshold) if threshold > 0 else -math.inf
    steps = torch.zeros(real.shape[:2], dtype=torch.long, device=mask.device)
    running = torch.zeros(real.shape[:2], dtype=torch.float64, device=mask.device)
    started = torch.zeros(real.shape[:2], dtype=torch.bool, device=mask.device)
    for offset in range(size):
        here, logprob = real[..., offset], logprobs[..., offset]
        extended = running + logprob
        restart = here & (~started | (extended < log_threshold))
        steps += restart.long()
        running = torch.where(restart, logprob, torch.where(here, extended, running))
        started |= here
    return steps


def oracle_ceiling(
    token_logprobs: torch.Tensor, mask: torch.Tensor, block_size: int | None, threshold: float
) -> float:
    """Chain-bound tokens per forward of one batch: real tokens / oracle steps, pooled (``nan`` if empty)."""
    steps = int(chain_bound_steps(token_logprobs, mask, block_size, threshold).sum())
    return int(mask.bool().sum()) / steps if steps else float("nan")


class OracleCeiling:
    """Pools the chain bound over batches for several block sizes and thresholds (tokens / steps).

    ``note`` says whose text was scored (the teacher's greedy text by default; :data:`OWN_TEXT_NOTE` for a
    student's own output)."""

    def __init__(self, block_sizes: Iterable[int | None], thresholds: Iterable[float], note: str = CEILING_NOTE):
        self.block_sizes = list(dict.fromkeys(block_sizes))
        self.thresholds = sorted(set(float(t) for t in thresholds))
        for block_size in self.block_sizes:
            _check_block_size(block_size)
        for threshold in self.thresholds:
            _check_threshold(threshold)
        self.note = note
        self.tokens = 0
        self.steps = {(b, t): 0 for b in self.block_sizes for t in self.thresholds}

    def add(self, token_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a teacher-scored batch of greedy completions (``token_logprobs``: the teacher's, of that text)."""
        self.tokens += int(mask.bool().sum())
        for block_size, threshold in self.steps:
            self.steps[block_size, threshold] += int(
                chain_bound_steps(token_logprobs, mask, block_size, threshold).sum()
            )

    def ceiling(self, block_size: int | None, threshold: float) -> float:
        steps = self.steps[block_size, float(threshold)]
        return self.tokens / steps if steps else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"tokens", "note", "by_block": {block: {threshold: ceiling}}}`` (string keys)."""
        return {
            "tokens": self.tokens,
            "note": self.note,
            "by_block": {str(b): {f"{t:g}": self.ceiling(b, t) for t in self.thresholds} for b in self.block_sizes},
        }


# ------------------------------------------------------------------------------------ out-of-order commits


def out_of_order_commits(step_map: torch.Tensor, mask: torch.Tensor, block_size: int) -> tuple[int, int]:
    """``(out-of-order commits, commits)`` of a decoded batch, counted over ``mask``'s positions.

    ``step_map`` ``(B, C)``: the block-local step at which each position was committed (``-1`` never,
    :attr:`opdlm_trl.sampling.Rollout.step_map`), ``C`` a multiple of ``block_size``; ``mask``: the
    positions to count (the real tokens, through the stop). A commit at step ``s`` is out of order when
    a position to its left in the same block was still masked after step ``s`` (committed later, or
    never): after such a step the committed tokens are not a prefix of the block.
    """
    _check_block_size(block_size)
    if step_map.shape != mask.shape or step_map.dim() != 2 or step_map.shape[1] % block_size:
        raise ValueError(
            f"step_map {tuple(step_map.shape)} and mask {tuple(mask.shape)} must be the same (B, C) shape with C a "
            f"multiple of block_size={block_size}."
        )
    never = torch.iinfo(torch.long).max
    steps = step_map.long().masked_fill(step_map < 0, never).view(step_map.shape[0], -1, block_size)
    left_latest = torch.nn.functional.pad(steps.cummax(-1).values[..., :-1], (1, 0), value=-1)
    committed = (steps != never) & mask.bool().view_as(steps)
    out_of_order = committed & (left_latest > steps)
    return int(out_of_order.sum()), int(committed.sum())


# ------------------------------------------------------------------------------------ confidence by offset


def top1_probability(
    logits: torch.Tensor, mask_token_id: int | None = None, vocab_size: int | None = None, chunk_rows: int = 1024
) -> torch.Tensor:
    """Largest probability of each row of ``logits`` (``(..., V)`` -> ``(...)``), as the sampler ranks it.

    The sampler never proposes ``[MASK]`` nor ids beyond the teacher vocabulary, so both are excluded
    from the softmax the same way (``mask_token_id`` / ``vocab_size``; ``None`` = keep). Rows are
    processed ``chunk_rows`` at a time: in the trainer this runs beside the loss graph, so it must not
    add a full ``(N, V)`` float32 copy.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if vocab_size is not None:
        flat = flat[:, :vocab_size]
    parts = []
    for start in range(0, flat.shape[0], chunk_rows):
        chunk = flat[start : start + chunk_rows].float()
        if mask_token_id is not None:
            chunk = suppress_mask_logit(chunk, mask_token_id)
        parts.append((chunk.amax(-1) - chunk.logsumexp(-1)).exp())
    empty = flat.new_zeros(0, dtype=torch.float32)
    return (torch.cat(parts) if parts else empty).view(logits.shape[:-1])


def teacher_top1_logprob(
    top_logprobs: torch.Tensor | None = None, full_logprobs: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The teacher's max log-probability per position from top-k (descending) or full targets; None if neither."""
    if top_logprobs is not None:
        return top_logprobs[..., 0].float()
    if full_logprobs is not None:
        return full_logprobs.float().amax(-1)
    return None


def offset_confidence_sums(
    student_prob: torch.Tensor,
    teacher_prob: torch.Tensor | None,
    offsets: torch.Tensor,
    max_offset: int = DEFAULT_OFFSETS,
) -> torch.Tensor:
    """``(4, max_offset)`` rows: student prob sums, teacher prob sums, counts, teacher counts per offset.

    Sums, not means, so processes and batches pool exactly (gather, then divide). Positions with an
    offset outside ``[0, max_offset)`` (not masked, or farther from the frontier) are ignored; without
    teacher targets the teacher rows stay zero.
    """
    offsets = offsets.long()
    valid = (offsets >= 0) & (offsets < max_offset)
    index = offsets.clamp(0, max_offset - 1)
    sums = torch.zeros((4, max_offset), dtype=torch.float32, device=student_prob.device)
    weight = valid.float()
    sums[0].index_add_(0, index, student_prob.float() * weight)
    sums[2].index_add_(0, index, weight)
    if teacher_prob is not None:
        sums[1].index_add_(0, index, teacher_prob.float().to(student_prob.device) * weight)
        sums[3].index_add_(0, index, weight)
    return sums


def offset_confidence_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Per-offset means ``confidence/student_offset{d}`` and ``confidence/teacher_offset{d}`` of pooled sums.

    Offsets without any position are left out (a mean over nothing is not a measurement).
    """
    metrics = {}
    for offset in range(sums.shape[1]):
        if sums[2, offset] > 0:
            metrics[f"confidence/student_offset{offset}"] = float(sums[0, offset] / sums[2, offset])
        if sums[3, offset] > 0:
            metrics[f"confidence/teacher_offset{offset}"] = float(sums[1, offset] / sums[3, offset])
    return metrics


def _histogram(values: torch.Tensor, offsets: torch.Tensor, max_offset: int) -> torch.Tensor:
    bins = (values.float() * HISTOGRAM_BINS).long().clamp(0, HISTOGRAM_BINS - 1)
    counts = torch.zeros(max_offset * HISTOGRAM_BINS, dtype=torch.long)
    counts.index_add_(0, (offsets * HISTOGRAM_BINS + bins).cpu(), torch.ones_like(bins).cpu())
    return counts.view(max_offset, HISTOGRAM_BINS)


class OffsetConfidence:
    """Evaluation tally: per frontier offset, mean and 0.1-bin histogram of student and teacher confidence.

    Fed by :meth:`add` (flat probabilities and offsets) or :meth:`add_records` (the sampler's
    ``record_logits`` trajectory of one batch).
    """

    def __init__(self, max_offset: int = DEFAULT_OFFSETS):
        if max_offset < 1:
            raise ValueError(f"max_offset must be >= 1, got {max_offset}.")
        self.max_offset = max_offset
        self.sums = torch.zeros((4, max_offset), dtype=torch.float64)
        self.student_hist = torch.zeros((max_offset, HISTOGRAM_BINS), dtype=torch.long)
        self.teacher_hist = torch.zeros((max_offset, HISTOGRAM_BINS), dtype=torch.long)

    def add(self, student_prob: torch.Tensor, teacher_prob: torch.Tensor | None, offsets: torch.Tensor) -> None:
        """Positions with their frontier offset (``-1`` or ``>= max_offset``: ignored)."""
        student_prob, offsets = student_prob.flatten().cpu(), offsets.flatten().cpu().long()
        teacher_prob = None if teacher_prob is None else teacher_prob.flatten().cpu()
        self.sums += offset_confidence_sums(student_prob, teacher_prob, offsets, self.max_offset).double()
        keep = (offsets >= 0) & (offsets < self.max_offset)
        self.student_hist += _histogram(student_prob[keep], offsets[keep], self.max_offset)
        if teacher_prob is not None:
            self.teacher_hist += _histogram(teacher_prob[keep], offsets[keep], self.max_offset)

    def add_records(self, records, rollout, teacher_top1: torch.Tensor | None, settings) -> None:
        """Every denoising step of one decoded batch.

        ``records``: the sampler's :class:`opdlm_trl.sampling.StepRecord` list for ``rollout``
        (``DiffusionSampler(record_logits=True)``); ``teacher_top1`` ``(B, C)``: the teacher's max
        probability at each completion position given the final text ``x0`` (None: student only);
        ``settings``: the student's :class:`opdlm_trl.modeling.DiffusionSettings`. At step ``s`` of
        block ``b`` a position is masked iff it was committed at a step ``>= s`` (or never); only real
        completion positions count (the teacher has no target past the stop).
        """
        size = rollout.block_size
        teacher_top1 = None if teacher_top1 is None else teacher_top1.cpu()
        for record in records:
            span = slice(record.block * size, (record.block + 1) * size)
            step_map = rollout.step_map[record.rows, span].cpu()
            masked = (step_map < 0) | (step_map >= record.step)
            real = rollout.completion_mask[record.rows, span].cpu().bool()
            offsets = frontier_offsets(masked, size).masked_fill(~real, -1)
            student = top1_probability(record.logits, settings.mask_token_id, settings.teacher_vocab_size).cpu()
            teacher = None if teacher_top1 is None else teacher_top1[record.rows.cpu(), span]
            self.add(student, teacher, offsets)

    def summary(self) -> dict[str, Any]:
        """JSON-ready means per offset (None where empty) and histograms (``bins``: lower edges, then 1.0)."""

        def mean(row: int, count_row: int) -> list[float | None]:
            return [
                float(self.sums[row, d] / self.sums[count_row, d]) if self.sums[count_row, d] > 0 else None
                for d in range(self.max_offset)
            ]

        has_teacher = bool(self.sums[3].sum() > 0)
        return {
            "offsets": list(range(self.max_offset)),
            "count": [int(c) for c in self.sums[2].tolist()],
            "student_mean": mean(0, 2),
            "teacher_mean": mean(1, 3) if has_teacher else None,
            "bins": [round(i / HISTOGRAM_BINS, 1) for i in range(HISTOGRAM_BINS + 1)],
            "student_hist": self.student_hist.tolist(),
            "teacher_hist": self.teacher_hist.tolist() if has_teacher else None,
        }
