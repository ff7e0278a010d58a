"""The one teacher factory: a backend name (``OPDConfig.teacher_backend``) and its options -> a :class:`Teacher`.

Both :class:`opdlm_trl.OPDTrainer` and scripts call :func:`build_teacher`, so the backend resolution (``auto``),
the checks a backend needs (a peft student for ``shared``, a model for ``local``, a path for ``vllm_colocate``),
the mask-token exclusion and the vocabulary check are written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..modeling import diffusion_settings
from .hf import LocalTeacher, SharedWeightsTeacher, freeze
from .targets import Teacher, excluded_token_ids
from .vllm import VLLMColocateTeacher, VLLMServerTeacher

__all__ = ["TEACHER_KINDS", "build_teacher"]

TEACHER_KINDS = ("local", "shared", "vllm_server", "vllm_colocate")


def resolve_kind(kind: str, model) -> str:
    """``"auto"``: a separate local teacher when a teacher model is given, else the student's own base weights."""
    if kind == "auto":
        return "local" if model is not None else "shared"
    return kind


def build_teacher(
    kind: str,
    *,
    student: torch.nn.Module | None = None,
    model: torch.nn.Module | str | None = None,
    base_url: str | None = None,
    tokenizer=None,
    top_k: int | None = None,
    chunk_size: int = 1024,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    **kwargs: Any,
) -> Teacher:
    """Build a teacher from a config (``kind`` in :data:`TEACHER_KINDS`, or ``"auto"``).

    ``student`` (a converted model) supplies the mask token to exclude and the teacher vocabulary ``V_T`` used for
    the checks. ``model`` is the teacher model object or path (``local``, and the path for ``vllm_colocate``).
    ``prepare_model`` wraps a frozen local teacher model before use (the trainer passes its accelerator's
    DeepSpeed / device preparation: only the trainer knows its accelerator). Remaining keyword arguments go to the
    backend's constructor.
    """
    kind = resolve_kind(kind, model)
    settings = diffusion_settings(student) if student is not None else None
    exclude = kwargs.pop("exclude_token_ids", None)
    if exclude is None:
        exclude = excluded_token_ids(settings) if settings else ()
    if kind == "shared":
        return _shared(student, chunk_size, **kwargs)
    if kind == "local":
        return _local(model, settings, chunk_size, exclude, prepare_model, **kwargs)
    if kind == "vllm_server":
        if base_url is None:
            raise ValueError("kind='vllm_server' needs base_url= (teacher_url, e.g. http://127.0.0.1:8000).")
        vocab_size = kwargs.pop("vocab_size", settings.teacher_vocab_size if settings else None)
        return VLLMServerTeacher(
            base_url, top_k=top_k, vocab_size=vocab_size, tokenizer=tokenizer, exclude_token_ids=exclude, **kwargs
        )
    if kind == "vllm_colocate":
        if not isinstance(model, str) or not model or top_k is None:
            raise ValueError(
                "kind='vllm_colocate' needs model= (a local model dir: teacher_model_name_or_path) and top_k=."
            )
        return VLLMColocateTeacher(model, top_k, exclude_token_ids=exclude, **kwargs)
    raise ValueError(f"Unknown teacher kind {kind!r}; choose from {TEACHER_KINDS}.")


def _shared(student, chunk_size: int, **kwargs) -> SharedWeightsTeacher:
    """The student's base weights with adapters off: the original ARLM only for a peft (LoRA) student."""
    if student is None:
        raise ValueError("kind='shared' needs student=.")
    if not hasattr(student, "peft_config") and not kwargs.get("allow_full_finetune"):
        raise ValueError(
            "teacher_backend='shared' runs the student's base weights with adapters disabled, which only "
            "equals the original ARLM for a peft (LoRA) student. Pass a peft_config or a teacher_model."
        )
    return SharedWeightsTeacher(student, chunk_size=chunk_size, **kwargs)


def _local(model, settings, chunk_size: int, exclude, prepare_model, **kwargs) -> LocalTeacher:
    """A separate frozen causal LM (loaded when ``model`` is a path), checked against the student's ``V_T``."""
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM

        kwargs.setdefault("attn_implementation", "sdpa")
        model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        kwargs = {}
    if model is None:
        raise ValueError("teacher_backend='local' needs `teacher_model` (a model or a path): pass model=.")
    if prepare_model is not None:
        model = prepare_model(freeze(model))
    teacher = LocalTeacher(model, chunk_size=chunk_size, exclude_token_ids=exclude, **kwargs)
    if settings and teacher.vocab_size != settings.teacher_vocab_size:
        raise ValueError(
            f"Teacher vocabulary {teacher.vocab_size} != the student's teacher_vocab_size "
            f"{settings.teacher_vocab_size}: the teacher must be the model the student was converted from."
        )
    return teacher
