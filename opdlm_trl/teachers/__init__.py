"""Teacher targets: the frozen ARLM's next-token distribution along a finished sequence (docs/method.md §3).

For ``x0 = prompt + completion`` the target of completion position ``i`` is ``p_T(. | prompt, x0_<i)``,
read from one causal forward over ``x0`` at position ``i - 1``. Every denoising state of a trajectory
reuses the same targets, so a rollout is scored once.

Four backends share two code paths:

* :mod:`.hf`: :class:`LocalTeacher` (a separate frozen HF model) and :class:`SharedWeightsTeacher` (the
  student's own weights with peft adapters off) both call :func:`score_causal_lm`.
* :mod:`.vllm`: :class:`VLLMServerTeacher` (a stock OpenAI-compatible vLLM server, ``prompt_logprobs``) and
  :class:`VLLMColocateTeacher` (in-process ``vllm.LLM``) both turn per-position ``{token id: logprob}`` maps
  into targets with :func:`targets_from_logprob_maps` (:mod:`.targets`).

:func:`build_teacher` (:mod:`.factory`) builds any of them from a config, by kind: :data:`TEACHERS` is the registry
(kind -> :class:`TeacherBackend` subclass, capabilities as class attributes) and :func:`register_teacher` adds a
backend from outside the package. The package imports only ``torch``
and this package at import time: ``transformers``, ``requests`` and ``vllm`` are imported where needed, so it
also loads inside the separate vLLM virtualenv.
"""

from .factory import TEACHERS, build_teacher, register_teacher, teacher_class
from .hf import LocalTeacher, SharedWeightsTeacher, score_causal_lm
from .targets import (
    Teacher,
    TeacherBackend,
    TeacherContext,
    TeacherServerError,
    TeacherTargets,
    targets_from_logprob_maps,
)
from .vllm import SERVER_COMMAND_HINT, VLLMColocateTeacher, VLLMServerTeacher

__all__ = [
    "SERVER_COMMAND_HINT",
    "TEACHERS",
    "LocalTeacher",
    "SharedWeightsTeacher",
    "Teacher",
    "TeacherBackend",
    "TeacherContext",
    "TeacherServerError",
    "TeacherTargets",
    "VLLMColocateTeacher",
    "VLLMServerTeacher",
    "build_teacher",
    "register_teacher",
    "score_causal_lm",
    "teacher_class",
    "targets_from_logprob_maps",
]
