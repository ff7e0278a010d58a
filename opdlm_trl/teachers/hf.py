"""Teachers that run a Hugging Face causal LM in the trainer process: a separate frozen copy or the student itself.

:class:`LocalTeacher` (a separate frozen HF model) and :class:`SharedWeightsTeacher` (the student's own weights
with peft adapters off and causal attention) both call :func:`score_causal_lm`, which runs the backbone once and
applies the output head in chunks (:mod:`opdlm_trl.heads`): a long batch never materialises a ``(B, T, V)`` tensor,
and full-vocabulary targets stay hidden states until the loss needs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import replace

import torch

from ..collectives import chunk_bounds, distributed_world
from ..heads import OutputHead, output_rows
from ..masks import gather_predictions
from ..modeling import adapters_disabled, diffusion_settings, teacher_forward, unwrap_model
from .targets import TeacherBackend, TeacherContext, TeacherTargets, check_batch, empty_targets, excluded_token_ids

__all__ = ["LocalTeacher", "SharedWeightsTeacher", "score_causal_lm"]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Score without dropout even when called on a student in training mode; restore the mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states of the causal teacher view (adapters off, real-token position ids).

    The backbone is called instead of the full model so that no ``(B, T, V)`` logits exist; peft's
    ``disable_adapter`` switches the LoRA layers themselves, so calling the inner decoder under it
    runs the original weights.
    """
    decoder = unwrap_model(model).get_decoder()
    with adapters_disabled(model), _eval_mode(model):
        output = teacher_forward(decoder, input_ids, attention_mask, use_cache=False)
    return output.last_hidden_state


@torch.no_grad()
def score_causal_lm(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    top_k: int | None,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    exclude_token_ids: Iterable[int] = (),
    head: OutputHead | None = None,
) -> TeacherTargets:
    """Score completions with a causal HF model (shared by :class:`LocalTeacher` and :class:`SharedWeightsTeacher`).

    The backbone runs once over ``[prompt | completion]``; the hidden state predicting each real completion token
    (position ``i - 1``, via :func:`opdlm_trl.masks.gather_predictions`) goes through the output head ``chunk_size``
    targets at a time, in float32, for the committed token's log-prob and the top-k. Full-vocabulary targets
    (``top_k=None``) are returned as those hidden states plus the head (``TeacherTargets.hidden`` / ``.head``):
    ``O(H)`` per position, never ``O(V)``; :meth:`TeacherTargets.dense_log_probs` materialises them on demand.
    Every rank runs the same number of head chunks (:func:`opdlm_trl.collectives.chunk_bounds`): under ZeRO-3 each
    head call is an all-gather.

    Args:
        vocab_size: teacher vocabulary ``V_T``; output rows beyond it (an added student mask token)
            are dropped before the softmax. Default: all rows of the output head.
        exclude_token_ids: ids whose logit is set to ``finfo.min`` before the softmax (the student's
            mask token when it occupies a free row inside ``V_T``).
        head: the teacher's :class:`OutputHead` (built from the two arguments above when omitted).
    """
    head = head or OutputHead.of(model, vocab_size, exclude_token_ids, base_weights=hasattr(model, "peft_config"))
    vocab_size = head.vocab_size
    if top_k is not None and not 0 < top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}] or None (full vocabulary), got {top_k}.")
    check_batch(prompt_mask, completion_ids, completion_mask)
    device = next(unwrap_model(model).parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    where = completion_mask.bool()
    if not where.any() and not distributed_world():  # other ranks would still run their forward and head chunks
        hidden_size = unwrap_model(model).config.hidden_size
        return replace(empty_targets(completion_mask, top_k, vocab_size, hidden_size), head=head)

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    hidden = _hidden_states(model, input_ids, attention_mask)
    positions = torch.arange(prompt_ids.shape[1], input_ids.shape[1], device=device)
    predictors = gather_predictions(hidden, positions, shift=True)[where]  # (N, H)
    tokens = completion_ids[where]

    token_lp, top_ids, top_lp = [], [], []
    for start, end in chunk_bounds(predictors.shape[0], chunk_size):
        logprobs = head.log_probs(predictors[start:end])
        token_lp.append(logprobs.gather(-1, tokens[start:end, None]).squeeze(-1))
        if top_k is not None:
            values, indices = logprobs.topk(top_k, dim=-1)
            top_lp.append(values)
            top_ids.append(indices)

    if top_k is None:
        targets = empty_targets(completion_mask, None, None, predictors.shape[-1], predictors.dtype)
        targets.hidden[where] = predictors
    else:
        targets = empty_targets(completion_mask, top_k, vocab_size)
        targets.top_ids[where] = torch.cat(top_ids)
        targets.top_logprobs[where] = torch.cat(top_lp)
    targets.token_logprobs[where] = torch.cat(token_lp)
    return replace(targets, head=head)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class _CausalLMScorer(TeacherBackend):
    """Scoring shared by the local and shared-weights teachers: one chunked causal forward (score_causal_lm)."""

    # one padded forward per call (row groups save padding); targets over the whole vocabulary on request
    scores_padded_batch = True
    full_vocabulary = True
    option_fields = {"chunk_size": "teacher_chunk_size"}

    model: torch.nn.Module
    chunk_size: int
    vocab_size: int
    exclude_token_ids: tuple[int, ...]

    @property
    def head(self) -> OutputHead:
        """The teacher's output head over ``V_T`` (what full-vocabulary targets' hidden states go through)."""
        return OutputHead.of(
            self.model, self.vocab_size, self.exclude_token_ids, base_weights=hasattr(self.model, "peft_config")
        )

    def causal_lm(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The scored model with its peft adapters off (the original ARLM; a plain model as it is)."""
        return adapters_disabled(self.model)

    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask, top_k: int | None) -> TeacherTargets:
        return score_causal_lm(
            self.model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            top_k,
            self.chunk_size,
            head=self.head,
        )


class LocalTeacher(_CausalLMScorer):
    """A separate frozen HF causal LM (any device and dtype) scored in chunks.

    Scoring runs without gradients in eval mode, so a model passed here is used as it is and left as it was (an
    evaluation may borrow a model that is still being trained); the trainer's teacher is frozen by
    :meth:`from_context`.

    Costs a full copy of the teacher's parameters in the trainer process; use
    :class:`SharedWeightsTeacher` for a LoRA student, or a vLLM teacher to move the work elsewhere.
    """

    needs_teacher_model = True

    @classmethod
    def from_context(cls, context: TeacherContext, chunk_size: int = 1024, **kwargs) -> LocalTeacher:
        """The frozen model ``context.model`` (loaded when a path; ``kwargs`` then go to ``from_pretrained``),
        prepared for the trainer's accelerator and checked against the student's ``V_T``."""
        model = context.model
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            kwargs.setdefault("attn_implementation", "sdpa")
            model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
            kwargs = {}
        if model is None:
            raise ValueError("teacher_backend='local' needs `teacher_model` (a model or a path): pass model=.")
        model = freeze(model)  # the trainer's teacher: never trained, never in an optimizer
        if context.prepare_model is not None:
            model = context.prepare_model(model)
        teacher = cls(model, chunk_size=chunk_size, exclude_token_ids=context.exclude_token_ids, **kwargs)
        settings = context.settings
        if settings and teacher.vocab_size != settings.teacher_vocab_size:
            raise ValueError(
                f"Teacher vocabulary {teacher.vocab_size} != the student's teacher_vocab_size "
                f"{settings.teacher_vocab_size}: the teacher must be the model the student was converted from."
            )
        return teacher

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_size: int = 1024,
        exclude_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ):
        if hasattr(model, "peft_config"):
            raise ValueError("LocalTeacher takes a plain causal LM; for a peft student use SharedWeightsTeacher.")
        self.model = model
        self.chunk_size = chunk_size
        self.exclude_token_ids = tuple(int(i) for i in exclude_token_ids)
        self.vocab_size = vocab_size or output_rows(model)


class SharedWeightsTeacher(_CausalLMScorer):
    """The student itself as teacher: peft adapters disabled, ordinary causal attention, no extra weights.

    Exact only while the base weights stay frozen (a LoRA / adapter conversion); with a full
    fine-tune the "teacher" would drift with the student, which is why construction refuses a
    student without peft adapters unless ``allow_full_finetune=True`` (self-distillation from a
    moving target, rarely what you want).
    """

    @classmethod
    def from_context(cls, context: TeacherContext, chunk_size: int = 1024, **kwargs) -> SharedWeightsTeacher:
        """The student's base weights with adapters off: the original ARLM only for a peft (LoRA) student."""
        student = context.student
        if student is None:
            raise ValueError("kind='shared' needs student=.")
        if not hasattr(student, "peft_config") and not kwargs.get("allow_full_finetune"):
            raise ValueError(
                "teacher_backend='shared' runs the student's base weights with adapters disabled, which only "
                "equals the original ARLM for a peft (LoRA) student. Pass a peft_config or a teacher_model."
            )
        return cls(student, chunk_size=chunk_size, **kwargs)

    def __init__(self, student: torch.nn.Module, chunk_size: int = 1024, allow_full_finetune: bool = False):
        if not hasattr(student, "peft_config") and not allow_full_finetune:
            raise ValueError(
                "SharedWeightsTeacher needs a peft (LoRA) student: without adapters to disable, the teacher would be "
                "the student being trained. Wrap the student with peft, use LocalTeacher, or pass "
                "allow_full_finetune=True deliberately."
            )
        settings = diffusion_settings(student)
        self.student = student
        self.chunk_size = chunk_size
        self.vocab_size = settings.teacher_vocab_size
        self.exclude_token_ids = excluded_token_ids(settings)

    @property
    def model(self) -> torch.nn.Module:
        """The scored model: the student itself (its adapters are disabled inside the forward)."""
        return self.student
