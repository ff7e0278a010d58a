"""Tokens per forward vs training tokens on the synthetic language: where OPD levers are compared in minutes.

The larger run of ``tests/unit/test_synthetic_opd.py``: a tiny teacher trained from scratch on
:class:`opdlm_trl.synthetic.PhraseChain` (chain-bound ceiling 2.46 tokens per forward at 0.9, block 4), converted by
OPD through the public API for ``--steps`` optimizer steps per seed; every ``--eval-every`` steps the student is
decoded on held-out prompts (:func:`opdlm_trl.synthetic.evaluate_student`: dynamic decoding at 0.9 with the project's
sampler, static and dynamic teacher NLL beside the teacher's own). One JSON holds the curve of every seed and is
rewritten after each evaluation; a rerun skips seeds already complete (short enough not to need mid-run resume: one
seed of 100 steps with four evaluations took 3.5-6 minutes on a 2-core machine shared with other jobs).

Levers are OPDConfig fields given as ``--set name=value`` (the value is parsed as JSON when it parses, else kept as
text, e.g. ``--set learning_rate=1e-3 --set state_selection=every_step``); every evaluation decodes with each of
``--eval-orders`` (both commit orders by default):

    python benchmarks/synthetic_curve.py --out results/synthetic_plain.json
    python benchmarks/synthetic_curve.py --out results/synthetic_lr1e-3.json --set learning_rate=1e-3
    python benchmarks/synthetic_curve.py --out results/synthetic_l2r.json --set commit_order=left_to_right
    python benchmarks/synthetic_curve.py --smoke --out /tmp/synthetic.json                   # CI
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from opdlm_trl import OPDTrainer, to_diffusion
from opdlm_trl.sampling import COMMIT_RULES
from opdlm_trl.synthetic import PhraseChain, evaluate_student, opd_config, phrase_chain_tokenizer, prompt_dataset
from opdlm_trl.synthetic import train_teacher as fit_teacher

EVAL_SEED = 12345  # held-out prompts (training prompts use seed + 1 of each run)


def parse_setting(text: str) -> tuple[str, object]:
    """``name=value`` with ``value`` read as JSON when it parses (numbers, booleans, quoted strings), else text."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--set expects name=value, got {text!r}.")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


class CurveCallback(TrainerCallback):
    """Evaluates the student every ``every`` optimizer steps and hands each point to ``record``."""

    def __init__(self, every: int, evaluate, record):
        self.every, self.evaluate, self.record = every, evaluate, record
        self.trainer = None
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            train_seconds = time.perf_counter() - self.started
            point = self.evaluate(self.trainer.model)
            self.trainer.model.train()
            self.record(
                {
                    "step": state.global_step,
                    "training_tokens": self.trainer.training_tokens,
                    "train_seconds": round(train_seconds, 1),
                    **point,
                }
            )
            self.started = time.perf_counter() - train_seconds  # evaluation time is not training time


def load_or_train_teacher(directory: Path, language: PhraseChain, tokenizer, steps: int):
    """The teacher of the run (trained once, kept as safetensors beside the JSON so reruns compare like with like)."""
    from transformers import AutoModelForCausalLM

    if (directory / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    began = time.perf_counter()
    teacher = fit_teacher(language, tokenizer, steps=steps, seed=0)
    teacher.config.opdlm_teacher_seconds = round(time.perf_counter() - began, 1)
    teacher.save_pretrained(directory, safe_serialization=True)
    return teacher


def lora_config(rank: int | None):
    """LoRA on every linear layer at ``rank`` (alpha = 2 x rank, peft's usual scale), or None for a full fine-tune."""
    if rank is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON written after every evaluation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--teacher-dir", default=None, help="where the teacher is kept (default: OUT with .teacher)")
    parser.add_argument("--eval-orders", nargs="+", choices=tuple(COMMIT_RULES), default=list(COMMIT_RULES),
                        help="commit orders every evaluation decodes with (each gets its own metrics)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model runs fastest on one)")
    parser.add_argument("--smoke", action="store_true", help="CI: 2 steps of one seed, a 20-step teacher, 4 prompts")
    parser.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[],
                        help="an OPDConfig field, name=value (repeatable)")  # fmt: skip
    parser.add_argument("--train-prompts", type=int, default=None,
                        help="cycle this many training prompts (the forgetting lever; default: a fresh prompt for "
                             "every rollout, steps x batch)")  # fmt: skip
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="train LoRA adapters of this rank on every linear layer instead of all weights (the "
                             "teacher is then the base model with the adapters off)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.train_prompts is not None and args.train_prompts < 1:
        parser.error(f"--train-prompts must be at least 1, got {args.train_prompts}.")
    if args.lora_rank is not None and args.lora_rank < 1:
        parser.error(f"--lora-rank must be at least 1, got {args.lora_rank}.")
    if args.smoke:
        args.seeds, args.steps, args.eval_every, args.eval_prompts, args.teacher_steps = [0], 2, 1, 4, 20
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides = dict(args.settings)
    run_shape = {"train_prompts": args.train_prompts, "lora_rank": args.lora_rank}

    language = PhraseChain()
    tokenizer = phrase_chain_tokenizer(language)
    teacher_dir = Path(args.teacher_dir) if args.teacher_dir else out.with_suffix(".teacher")
    teacher = load_or_train_teacher(teacher_dir, language, tokenizer, args.teacher_steps)
    eval_prompts = prompt_dataset(language, args.eval_prompts, seed=EVAL_SEED)
    report = json.loads(out.read_text()) if out.exists() else {}
    recorded = report.get("settings")
    if recorded and (recorded["overrides"], {k: recorded.get(k) for k in run_shape}) != (overrides, run_shape):
        raise SystemExit(
            f"{out} holds a run with other settings ({recorded['overrides']}, "
            f"{ {k: recorded.get(k) for k in run_shape} }); use another --out."
        )
    report.setdefault("settings", {"overrides": overrides, **run_shape, "steps": args.steps,
                                   "eval_prompts": args.eval_prompts,
                                   "language": repr(language), "teacher_steps": args.teacher_steps,
                                   "recipe": opd_config(os.devnull, **overrides).to_dict()})  # fmt: skip
    report.setdefault("runs", {})

    def save() -> None:
        out.write_text(json.dumps(report, indent=1, default=str))

    for seed in args.seeds:
        run = report["runs"].get(str(seed))
        if run and run.get("complete"):
            print(f"seed {seed}: complete in {out}, skipped")
            continue
        run = report["runs"][str(seed)] = {"points": [], "complete": False}
        student, student_tokenizer = to_diffusion(copy.deepcopy(teacher), tokenizer, block_size=4, shift=True)

        def evaluate(model, student_tokenizer=student_tokenizer):
            return {order: evaluate_student(model, teacher, student_tokenizer, eval_prompts, commit_order=order)
                    for order in args.eval_orders}  # fmt: skip

        def record(point, run=run, seed=seed):
            run["points"].append(point)
            save()
            for order in args.eval_orders:
                m = point[order]
                print(f"seed {seed} step {point['step']:4d} tokens {point['training_tokens']:7d} {order:13s} "
                      f"tok/fwd {m['tokens_per_forward']:.2f} ({m['tokens_per_forward'] / m['ceiling']:.0%} of "
                      f"{m['ceiling']:.2f}) static NLL {m['static_nll']:.3f} (teacher {m['teacher_nll']:.3f}) "
                      f"out-of-order {m['out_of_order_rate']:.3f}", flush=True)  # fmt: skip

        record({"step": 0, "training_tokens": 0, "train_seconds": 0.0, **evaluate(student)})
        callback = CurveCallback(args.eval_every, evaluate, record)
        config = opd_config(
            out.with_suffix(f".seed{seed}"),
            **{"max_steps": args.steps, "seed": seed, "logging_steps": 10, **overrides},
        )
        prompt_count = args.train_prompts or args.steps * config.per_device_train_batch_size
        prompts = prompt_dataset(language, prompt_count, seed=seed + 1)
        student = copy.deepcopy(teacher).requires_grad_(True)  # evaluate_student's scorer froze the teacher in place
        trainer = OPDTrainer(
            student,
            args=config,
            train_dataset=prompts,
            processing_class=tokenizer,
            callbacks=[callback],
            peft_config=lora_config(args.lora_rank),
        )
        callback.trainer = trainer
        trainer.train()
        run["complete"] = True
        save()
    print(format_table(report))
    return report


def final_rows(report: dict) -> list[dict]:
    """The last point of every complete seed, one row per (seed, evaluation commit order)."""
    rows = []
    for seed, run in sorted(report["runs"].items()):
        if not run.get("complete"):
            continue
        last = run["points"][-1]
        for order, metrics in last.items():
            if isinstance(metrics, dict):
                rows.append({"seed": int(seed), "order": order, "step": last["step"],
                             "training_tokens": last["training_tokens"], **metrics})  # fmt: skip
    return rows


def format_table(report: dict) -> str:
    """Markdown table of :func:`final_rows` (share = tokens per forward / the teacher-text ceiling)."""
    lines = ["| seed | eval order | tokens | tok/fwd @0.9 | share of ceiling | static NLL | teacher NLL | out-of-order |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in final_rows(report):
        lines.append(
            f"| {row['seed']} | {row['order']} | {row['training_tokens']} | {row['tokens_per_forward']:.2f} | "
            f"{row['tokens_per_forward'] / row['ceiling']:.0%} | {row['static_nll']:.3f} | {row['teacher_nll']:.3f} | "
            f"{row['out_of_order_rate']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
