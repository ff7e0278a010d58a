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

:func:`build_teacher` (:mod:`.factory`) builds any of them from a config. The package imports only ``torch``
and this package at import time: ``transformers``, ``requests`` and ``vllm`` are imported where needed, so it
also loads inside the separate vLLM virtualenv.
"""

from .factory import TEACHER_KINDS, build_teacher
from .hf import LocalTeacher, SharedWeightsTeacher, score_causal_lm
from .targets import Teacher, TeacherServerError, TeacherTargets, targets_from_logprob_maps
from .vllm import SERVER_COMMAND_HINT, VLLMColocateTeacher, VLLMServerTeacher

__all__ = [
    "SERVER_COMMAND_HINT",
    "TEACHER_KINDS",
    "LocalTeacher",
    "SharedWeightsTeacher",
    "Teacher",
    "TeacherServerError",
    "TeacherTargets",
    "VLLMColocateTeacher",
    "VLLMServerTeacher",
    "build_teacher",
    "score_causal_lm",
    "targets_from_logprob_maps",
]
