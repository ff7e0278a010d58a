"""Teachers that run a Hugging Face causal LM in the trainer process: a separate frozen copy or the student itself.

:class:`LocalTeacher` (a separate frozen HF model) and :class:`SharedWeightsTeacher` (the student's own weights
with peft adapters off and causal attention) both call :func:`score_causal_lm`, which runs the backbone once and
applies the output head in chunks, so a long batch never materialises a ``(B, T, V)`` float32 tensor beyond the
requested outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from ..masks import gather_predictions
from ..modeling import adapters_disabled, diffusion_settings, suppress_mask_logit, teacher_forward, unwrap_model
from .targets import TeacherTargets, check_batch, empty_targets, excluded_token_ids

__all__ = ["LocalTeacher", "SharedWeightsTeacher", "score_causal_lm"]


def _head_postprocess(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logit transforms some architectures apply after ``lm_head`` (Gemma soft-capping, Cohere scale)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


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
) -> TeacherTargets:
    """Score completions with a causal HF model (shared by :class:`LocalTeacher` and :class:`SharedWeightsTeacher`).

    The backbone runs once over ``[prompt | completion]``; the hidden state predicting each real
    completion token (position ``i - 1``, via :func:`opdlm_trl.masks.gather_predictions`) goes through
    the output head ``chunk_size`` targets at a time, in float32, with ``log_softmax`` per chunk.

    Args:
        vocab_size: teacher vocabulary ``V_T``; output rows beyond it (an added student mask token)
            are dropped before the softmax. Default: all rows of the output head.
        exclude_token_ids: ids whose logit is set to ``finfo.min`` before the softmax (the student's
            mask token when it occupies a free row inside ``V_T``).
    """
    base = unwrap_model(model)
    device = next(base.parameters()).device
    head = base.get_output_embeddings()
    vocab_size = vocab_size or _rows(head.weight)
    if top_k is not None and not 0 < top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}] or None (full vocabulary), got {top_k}.")
    check_batch(prompt_mask, completion_ids, completion_mask)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    targets = empty_targets(completion_mask, top_k, vocab_size)
    if not completion_mask.any():
        return targets

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    hidden = _hidden_states(model, input_ids, attention_mask)
    positions = torch.arange(prompt_ids.shape[1], input_ids.shape[1], device=device)
    predictors = gather_predictions(hidden, positions, shift=True)[completion_mask.bool()]  # (N, H)
    tokens = completion_ids[completion_mask.bool()]
    postprocess = _head_postprocess(base.config)
    excluded = [int(i) for i in exclude_token_ids if 0 <= int(i) < vocab_size]

    token_lp, top_ids, top_lp, full = [], [], [], []
    for start in range(0, predictors.shape[0], chunk_size):
        logits = postprocess(head(predictors[start : start + chunk_size]))[..., :vocab_size].float()
        for token_id in excluded:
            logits = suppress_mask_logit(logits, token_id)
        logprobs = torch.log_softmax(logits, dim=-1)
        token_lp.append(logprobs.gather(-1, tokens[start : start + chunk_size, None]).squeeze(-1))
        if top_k is None:
            full.append(logprobs)
        else:
            values, indices = logprobs.topk(top_k, dim=-1)
            top_lp.append(values)
            top_ids.append(indices)

    where = completion_mask.bool()
    targets.token_logprobs[where] = torch.cat(token_lp)
    if top_k is None:
        targets.full_logprobs[where] = torch.cat(full)
    else:
        targets.top_ids[where] = torch.cat(top_ids)
        targets.top_logprobs[where] = torch.cat(top_lp)
    return targets


def _rows(weight: torch.Tensor) -> int:
    """Rows of an output head; under DeepSpeed ZeRO-3 the local tensor is an empty shard and ``ds_shape`` is the full one."""
    return getattr(weight, "ds_shape", weight.shape)[0]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class _CausalLMScorer:
    """Scoring shared by the local and shared-weights teachers: one chunked causal forward (score_causal_lm)."""

    model: torch.nn.Module
    chunk_size: int
    vocab_size: int
    exclude_token_ids: tuple[int, ...]

    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask, top_k: int | None) -> TeacherTargets:
        return score_causal_lm(
            self.model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            top_k,
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
            exclude_token_ids=self.exclude_token_ids,
        )


class LocalTeacher(_CausalLMScorer):
    """A separate frozen HF causal LM (any device and dtype) scored in chunks.

    Costs a full copy of the teacher's parameters in the trainer process; use
    :class:`SharedWeightsTeacher` for a LoRA student, or a vLLM teacher to move the work elsewhere.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_size: int = 1024,
        exclude_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ):
        if hasattr(model, "peft_config"):
            raise ValueError("LocalTeacher takes a plain causal LM; for a peft student use SharedWeightsTeacher.")
        self.model = freeze(model)
        self.chunk_size = chunk_size
        self.exclude_token_ids = tuple(int(i) for i in exclude_token_ids)
        self.vocab_size = vocab_size or _rows(unwrap_model(model).get_output_embeddings().weight)


class SharedWeightsTeacher(_CausalLMScorer):
    """The student itself as teacher: peft adapters disabled, ordinary causal attention, no extra weights.

    Exact only while the base weights stay frozen (a LoRA / adapter conversion); with a full
    fine-tune the "teacher" would drift with the student, which is why construction refuses a
    student without peft adapters unless ``allow_full_finetune=True`` (self-distillation from a
    moving target, rarely what you want).
    """

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
