"""The one teacher factory: a backend kind (``OPDConfig.teacher_backend``) and its options -> a :class:`Teacher`.

Backends live in a registry, :data:`TEACHERS` (kind -> :class:`~opdlm_trl.teachers.targets.TeacherBackend`
subclass). A class carries its capabilities as class attributes (``scores_padded_batch``, ``full_vocabulary``,
``needs_teacher_model``, ``option_fields``) and builds itself with ``from_context``, so the config's choices, its
checks, its options and the trainer's row grouping all read the registry; a new backend is one
:func:`register_teacher` call, from any module. :func:`build_teacher`, called by :class:`opdlm_trl.OPDTrainer` and
by scripts, resolves ``auto`` and derives once what every backend may need (the mask token to exclude, the student's
settings) into a :class:`~opdlm_trl.teachers.targets.TeacherContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..modeling import diffusion_settings
from ..registry import register
from .hf import LocalTeacher, SharedWeightsTeacher
from .targets import Teacher, TeacherBackend, TeacherContext, excluded_token_ids
from .vllm import VLLMColocateTeacher, VLLMServerTeacher

__all__ = ["AUTO", "TEACHERS", "build_teacher", "register_teacher", "resolve_kind", "teacher_class"]

# The trainer's own choice (not a backend): a separate local teacher when a teacher model is given, else the
# student's own base weights (resolve_kind).
AUTO = "auto"

# kind -> backend class; OPDConfig.teacher_backend is "auto" or one of these keys.
TEACHERS: dict[str, type[TeacherBackend]] = {}


def register_teacher(kind: str, backend: type[TeacherBackend] | None = None, *, replace: bool = False):
    """Make ``kind`` a valid ``teacher_backend`` built by ``backend`` (a :class:`TeacherBackend` subclass).

    Call it directly, ``register_teacher("mine", MyTeacher)``, or as a class decorator; register before the
    ``OPDConfig`` is made (its check reads the registry). The class docstring's first line is its summary in
    ``--help``. A second class under a taken kind is refused unless ``replace=True``.
    """

    def add(cls: type[TeacherBackend]) -> type[TeacherBackend]:
        if kind == AUTO:
            raise ValueError(f"{AUTO!r} is the trainer's own choice of backend, not a kind to register.")
        if not (isinstance(cls, type) and issubclass(cls, TeacherBackend)):
            raise TypeError(
                f"register_teacher({kind!r}) needs a subclass of opdlm_trl.teachers.TeacherBackend (its class "
                f"attributes say what the trainer may do with it), got {cls!r}."
            )
        return register(TEACHERS, kind, cls, "teacher kind", replace)

    return add if backend is None else add(backend)


for _kind, _backend in (
    ("local", LocalTeacher),
    ("shared", SharedWeightsTeacher),
    ("vllm_server", VLLMServerTeacher),
    ("vllm_colocate", VLLMColocateTeacher),
):
    register_teacher(_kind, _backend)


def teacher_class(kind: str) -> type[TeacherBackend]:
    """The backend class registered as ``kind``; an unknown kind raises, listing the registered ones."""
    try:
        return TEACHERS[kind]
    except KeyError:
        raise ValueError(
            f"Unknown teacher kind {kind!r}; choose {AUTO!r} or one of {tuple(TEACHERS)} "
            "(add one with opdlm_trl.teachers.register_teacher)."
        ) from None


def resolve_kind(kind: str, model) -> str:
    """``"auto"``: a separate local teacher when a teacher model is given, else the student's own base weights."""
    if kind == AUTO:
        return "local" if model is not None else "shared"
    return kind


def build_teacher(
    kind: str,
    *,
    student: torch.nn.Module | None = None,
    model: torch.nn.Module | str | None = None,
    tokenizer=None,
    top_k: int | None = None,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    exclude_token_ids=None,
    **options: Any,
) -> Teacher:
    """Build a teacher from a config (``kind`` a key of :data:`TEACHERS`, or ``"auto"``).

    ``student`` (a converted model) supplies the mask token to exclude and the teacher vocabulary ``V_T`` used for
    the checks. ``model`` is the teacher model object or path (``local``, and the path for ``vllm_colocate``).
    ``prepare_model`` wraps a frozen local teacher model before use (the trainer passes its accelerator's
    DeepSpeed / device preparation: only the trainer knows its accelerator). ``exclude_token_ids`` overrides the
    student's mask token as the ids never to return. The remaining ``options`` go to the backend's
    ``from_context`` (e.g. ``chunk_size`` for local/shared, ``base_url`` for ``vllm_server``).
    """
    backend = teacher_class(resolve_kind(kind, model))
    settings = diffusion_settings(student) if student is not None else None
    if exclude_token_ids is None:
        exclude_token_ids = excluded_token_ids(settings) if settings else ()
    context = TeacherContext(
        student=student,
        model=model,
        tokenizer=tokenizer,
        top_k=top_k,
        settings=settings,
        exclude_token_ids=tuple(int(i) for i in exclude_token_ids),
        prepare_model=prepare_model,
    )
    return backend.from_context(context, **options)
