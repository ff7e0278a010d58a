"""The training batch: what a trainer's generation hook hands TRL and what its loss hook reads back.

TRL's ``_prepare_inputs`` shuffles the generation hook's result along dim 0 and cuts it into accumulation slices
(``shuffle_sequence_dict`` / ``split_tensor_dict``, :data:`opdlm_trl._trl.BATCH_CONTRACT`), so what travels through
TRL must stay a plain ``dict`` of tensors. :class:`TrainingBatch` names those tensors once: the generation hook
builds one and returns :meth:`TrainingBatch.to_dict`, ``compute_loss`` reads a slice back with
:meth:`TrainingBatch.of`. ``OPDTrainer`` and the baselines share it, so every trainer's batch has the same keys.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

__all__ = ["TEACHER_TARGET_KEYS", "SupervisedRows", "TrainingBatch"]

# The TeacherTargets fields a batch carries, each as ``teacher_<name>`` (the targets' own mask is the completion
# mask and is not needed by the loss).
TEACHER_TARGET_KEYS = ("token_logprobs", "top_ids", "top_logprobs", "full_logprobs", "hidden")


@dataclass
class TrainingBatch:
    """One generation batch (or an accumulation slice of it) in the ``[prompt | x0 | x_t]`` training layout.

    Every tensor has the batch's rows on dim 0. ``(B, P)`` prompt tensors are left-padded to a block boundary,
    ``(B, C)`` completion tensors are right-padded to whole blocks.

    Attributes:
        prompt_ids / prompt_mask: the rendered prompt and its padding mask.
        clean_ids: ``x0`` as the student's forward sees it (a rollout's never-committed positions stay [MASK]).
        noisy_ids: ``x_t``, the partially masked state the student is trained to denoise.
        completion_key_mask: 1 at every completion column the layout's keys include (every position of every
            block the sampler ran; for given text, the real tokens). Keys outside it are never attended.
        loss_mask: the supervised positions (masked in ``x_t``, real in ``x0``).
        completion_ids: the committed tokens (the target of ``token_pg`` and of the MDLM loss).
        teacher_token_logprobs / teacher_top_ids / teacher_top_logprobs / teacher_full_logprobs / teacher_hidden: the
            teacher's targets (:class:`opdlm_trl.teachers.TeacherTargets`), None when absent. Full-vocabulary targets
            of a local or shared-weights teacher travel as ``teacher_hidden`` (``O(H)`` per position): a
            ``(B, C, V)`` tensor held across the accumulation window would cost 19 GB at Qwen3's vocabulary and
            4,000-token rollouts.
        position_rate: ``(B, C)`` masking rate ``t`` of each position's row or block (MDLM's ``1/t`` weight).
        row_tokens: ``(B,)`` completion tokens of each row (MDLM's per-row divisor).
        normaliser: 0-d float the loss of every micro-batch divides by in training: what the trainer's reduction
            averages over, counted over the whole generation batch (all accumulation steps, all processes) and
            divided by the number of processes (DDP averages their gradients). TRL copies a 0-d tensor whole into
            every slice. Set by the trainer's ``training_batch`` (``DiffusionTrainer._with_normaliser``).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    clean_ids: torch.Tensor
    noisy_ids: torch.Tensor
    completion_key_mask: torch.Tensor
    loss_mask: torch.Tensor
    completion_ids: torch.Tensor
    teacher_token_logprobs: torch.Tensor | None = None
    teacher_top_ids: torch.Tensor | None = None
    teacher_top_logprobs: torch.Tensor | None = None
    teacher_full_logprobs: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    position_rate: torch.Tensor | None = None
    row_tokens: torch.Tensor | None = None
    normaliser: torch.Tensor | None = None

    @classmethod
    def of(cls, inputs: TrainingBatch | dict) -> TrainingBatch:
        """A view of a batch dict (what TRL hands ``compute_loss``); a ``TrainingBatch`` is returned as is.

        Keys that are no field (a caller's extras) are ignored; missing optional fields are None.
        """
        if isinstance(inputs, cls):
            return inputs
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in inputs.items() if key in names})

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The dict TRL splits and shuffles: every field that is set (None fields are left out)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
        }

    def with_targets(self, targets) -> TrainingBatch:
        """This batch with a :class:`~opdlm_trl.teachers.TeacherTargets`' tensors as ``teacher_*`` fields."""
        return dataclasses.replace(self, **{f"teacher_{key}": getattr(targets, key) for key in TEACHER_TARGET_KEYS})

    @property
    def supervised(self) -> torch.Tensor:
        """``(B, C)`` bool ``loss_mask``: row-major order of the supervised positions is the loss's ``N`` order."""
        return self.loss_mask.bool()

    @property
    def row_index(self) -> torch.Tensor:
        """``(N,)`` batch row of every supervised position, in the loss's order."""
        return self.supervised.nonzero()[:, 0]

    @functools.cached_property
    def supervised_targets(self) -> dict[str, torch.Tensor | None]:
        """Teacher targets at the supervised positions: ``(N, ...)`` tensors (or None), keyed like the losses'
        ``teacher_*`` arguments without the prefix.

        Cached: the loss and the metrics read the same gathered tensors, and a full-vocabulary one is ``(N, V)``.
        """
        selected = self.supervised
        return {
            key: None if getattr(self, f"teacher_{key}") is None else getattr(self, f"teacher_{key}")[selected]
            for key in TEACHER_TARGET_KEYS
        }

    def supervised_rows(self, frontier_offset: torch.Tensor | None = None) -> SupervisedRows:
        """The per-position tensors the loss reads, at the supervised positions (sliceable into loss chunks)."""
        selected = self.supervised
        return SupervisedRows(
            targets=self.supervised_targets,
            tokens=self.completion_ids[selected],
            row=self.row_index,
            position_rate=None if self.position_rate is None else self.position_rate[selected],
            frontier_offset=frontier_offset,
        )


@dataclass
class SupervisedRows:
    """``(N, ...)`` tensors of a batch at its supervised positions, in the loss's row-major order.

    The loss is computed over chunks of these rows (:meth:`slice`), so nothing sized ``(N, V)`` exists at once.

    Attributes:
        targets: the teacher's targets keyed like :data:`TEACHER_TARGET_KEYS` (None where absent).
        tokens: the committed token at each position (``token_pg``'s and MDLM's target).
        row: the batch row of each position.
        position_rate: MDLM's masking rate ``t`` of each position, or None.
        frontier_offset: distance of each position from its block's frontier (the trainer's metrics), or None.
    """

    targets: dict[str, torch.Tensor | None]
    tokens: torch.Tensor
    row: torch.Tensor
    position_rate: torch.Tensor | None = None
    frontier_offset: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def slice(self, start: int, end: int) -> SupervisedRows:
        """Positions ``[start, end)`` of every tensor."""

        def part(tensor):
            return None if tensor is None else tensor[start:end]

        return SupervisedRows(
            targets={key: part(value) for key, value in self.targets.items()},
            tokens=self.tokens[start:end],
            row=self.row[start:end],
            position_rate=part(self.position_rate),
            frontier_offset=part(self.frontier_offset),
        )

    def with_target(self, key: str, value: torch.Tensor) -> SupervisedRows:
        """A copy with one target replaced (e.g. full log-probs computed from the teacher's hidden states)."""
        return dataclasses.replace(self, targets={**self.targets, key: value})
