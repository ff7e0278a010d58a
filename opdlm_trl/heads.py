"""A model's output head applied outside its forward: logits from hidden states, a chunk of positions at a time.

Why outside: with a 151,936-token vocabulary a ``(N, V)`` float32 tensor costs 608 KB per position, 2.4 GB for one
4,000-token row. Neither the teacher targets held between generation and loss nor the loss itself can afford that
at the paper's rollout lengths, so the trainer keeps *hidden states* (``H`` values per position) and turns them into
distributions here, chunk by chunk (:func:`opdlm_trl.losses.chunked` frees each chunk's ``(chunk, V)`` tensors).

The head is called as a module (not its weight read directly), so DeepSpeed ZeRO-3's hooks gather and release it
exactly as in the model's own forward; callers loop over :func:`opdlm_trl.collectives.chunk_bounds` so that every
rank calls it the same number of times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .modeling import adapters_disabled, suppress_mask_logit, unwrap_model

__all__ = ["OutputHead", "head_postprocess"]


def head_postprocess(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logit transforms some architectures apply after ``lm_head`` (Cohere's scale, Gemma's soft-capping)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


@dataclass(frozen=True)
class OutputHead:
    """The output head of ``model`` as a function of its final hidden states.

    Attributes:
        model: the model whose head is applied (a peft wrapper is fine: the head module is looked up on the base).
        vocab_size: output rows kept; rows beyond it (an added student mask row, for a teacher) are dropped.
        suppressed_ids: ids whose logit is set to ``finfo.min`` (the student's ``[MASK]``; for a teacher, a mask
            token that occupies a free row inside its vocabulary).
        base_weights: apply the head with peft adapters disabled (the shared-weights teacher: LoRA on ``lm_head``
            must not leak into the teacher).
    """

    model: torch.nn.Module
    vocab_size: int
    suppressed_ids: tuple[int, ...] = ()
    base_weights: bool = False

    @classmethod
    def of(cls, model: torch.nn.Module, vocab_size: int | None = None, suppressed_ids: Iterable[int] = (), **kw):
        rows = output_rows(model)
        vocab_size = rows if vocab_size is None else min(int(vocab_size), rows)
        kept = tuple(int(i) for i in suppressed_ids if 0 <= int(i) < vocab_size)
        return cls(model, vocab_size, kept, **kw)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(n, vocab_size)`` float32 logits of ``(n, H)`` hidden states (postprocessed, suppressed ids at min)."""
        base = unwrap_model(self.model)
        context = adapters_disabled(self.model) if self.base_weights else contextlib.nullcontext()
        with context:
            logits = base.get_output_embeddings()(hidden)
        logits = head_postprocess(base.config)(logits)[..., : self.vocab_size].float()
        for token_id in self.suppressed_ids:
            logits = suppress_mask_logit(logits, token_id)
        return logits

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(n, vocab_size)`` float32 log-probabilities, normalised over the kept rows."""
        return torch.log_softmax(self.logits(hidden), dim=-1)


def output_rows(model: torch.nn.Module) -> int:
    """Rows of a model's output head; under ZeRO-3 the local tensor is an empty shard and ``ds_shape`` the full one."""
    weight = unwrap_model(model).get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]
