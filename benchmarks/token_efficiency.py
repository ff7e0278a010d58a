"""Token efficiency: how many training tokens each conversion method needs to approach the AR teacher.

Not a test: a long, resumable background job. For every (method, shift, seed) the student (the teacher's
checkpoint converted with ``to_diffusion(shift=...)``) is trained ONCE; each time its cumulative training
tokens cross a budget of ``--budgets`` it is evaluated on held-out HumanEval prompts with greedy static and
dynamic decoding (:func:`opdlm_trl.eval.evaluate_model`). Methods:

* ``opd``               OPDTrainer, on-policy rollouts, one visited state per block (the method)
* ``opd_random_remask`` OPDTrainer, on-policy x0 with random masks (the paper's OPDLM_off ablation)
* ``offpolicy_kd``      OffPolicyKDTrainer, forward KL to the teacher on the teacher's greedy answers
* ``sft_teacher``       MDLMTrainer (1/t-weighted MDLM objective) on the teacher's greedy answers
* ``mdlm_raw``          MDLMTrainer on raw text (HumanEval canonical solutions)

Budgets count OPD's generated rollout tokens and the baselines' completion tokens trained on; the teacher
tokens generated to build the SFT/KD data are reported separately (``teacher_generation_tokens``).
Outputs in ``--out-dir``: ``results.json`` (rewritten after every evaluation), ``token_efficiency.png`` and
``token_efficiency.md``.

Resuming, at two granularities: a rerun with the same ``--out-dir`` skips finished cells (their budgets are in
``results.json``), and a cell killed mid-training continues from its newest *complete* training checkpoint
(``runs/<cell>/checkpoint-N``, written every ``--save-steps`` optimizer steps; see
``opdlm_trl.checkpoints.last_complete_checkpoint``) instead of starting again. The resumed cell repeats the
uninterrupted one exactly on CPU (transformers restores the RNG state; evaluations run under a forked RNG, so
skipping an evaluation that the killed run already recorded changes nothing). A finished cell's checkpoints are
deleted unless ``--keep-checkpoints`` (a full SmolLM2-135M checkpoint with AdamW state is ~1.6 GB).

    python benchmarks/token_efficiency.py --smoke                                  # tiny models, < 60 s
    python benchmarks/token_efficiency.py --smoke --methods opd --budgets 16 96    # a longer tiny cell
    nice -n 10 python benchmarks/token_efficiency.py --methods opd sft_teacher --budgets 512 1024 2048 \\
        --seeds 0 --eval-prompts 32 --new-tokens 32 --out-dir benchmarks/out/token_efficiency
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

METHODS = ("opd", "opd_random_remask", "offpolicy_kd", "sft_teacher", "mdlm_raw")
TEACHER_DATA = ("offpolicy_kd", "sft_teacher")
METRICS = ("pass_at_1", "teacher_nll_per_token", "top1_agreement", "tokens_per_forward")
SCORED = ("pass_at_1", "teacher_nll_per_token", "top1_agreement")  # metrics with a teacher target
DECODINGS = ("static", "dynamic")
TARGET_FRACTIONS = (0.9, 0.8)  # "tokens to reach 90% (and 80%) of the teacher's score"
MIN_TEACHER_PASSES = 5  # below this many teacher-solved problems a pass@1 target is noise


# ------------------------------------------------------------------------------------------ models and data


def load_pair(args: argparse.Namespace):
    """``(model, tokenizer)`` of the teacher checkpoint, fresh (the student is converted from a fresh copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.smoke:
        from opdlm_trl.tiny import tiny_model, tiny_tokenizer

        return tiny_model("llama", hidden_size=64, num_layers=2), tiny_tokenizer()
    from opdlm_trl.data import default_model_dir

    path = args.model or default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(path)


def train_prompts(args: argparse.Namespace):
    from opdlm_trl.data import humaneval_prompt_dataset

    rows = humaneval_prompt_dataset("train", heldout_size=args.heldout_size)
    return rows.select(range(min(args.train_prompts, len(rows))))


def teacher_data(args: argparse.Namespace, results: dict) -> Any:
    """Greedy teacher answers to the training prompts (cached in results.json); counts their tokens."""
    from datasets import Dataset

    from opdlm_trl.baselines import teacher_responses

    cached = results.get("teacher_data")
    if cached is None:
        model, tokenizer = load_pair(args)
        began = time.perf_counter()
        rows = teacher_responses(
            model,
            tokenizer,
            train_prompts(args),
            args.new_tokens,
            args.eval_batch_size,
            max_prompt_length=args.max_prompt_length,
        )
        cached = {
            "completion": list(rows["completion"]),
            "completion_tokens": [int(n) for n in rows["completion_tokens"]],
            "completion_finished": [bool(b) for b in rows["completion_finished"]],
            "teacher_generation_tokens": int(sum(rows["completion_tokens"])),
            "seconds": time.perf_counter() - began,
        }
        results["teacher_data"] = cached
    rows = train_prompts(args)
    return Dataset.from_dict(
        {
            "prompt": list(rows["prompt"]),
            "completion": cached["completion"],
            "completion_finished": cached["completion_finished"],
        }
    )


def raw_data(args: argparse.Namespace):
    rows = train_prompts(args)
    return rows.add_column("completion", list(rows["canonical_solution"]))


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(
    student, teacher, tokenizer, args: argparse.Namespace, teacher_generate: bool, decodings=DECODINGS
) -> dict:
    """Scores per decoding; a decoding not run gets ``{}`` (plots and tables skip it)."""
    from opdlm_trl.eval import evaluate_model, student_system

    was_training = student.training
    # A forked RNG: the training stream is the same whether or not an evaluation ran, so a cell resumed from a
    # checkpoint that skips an evaluation the killed run already recorded repeats the uninterrupted cell.
    with torch.random.fork_rng(devices=[]):
        report = evaluate_model(
            student,
            teacher=teacher,
            tokenizer=tokenizer,
            dataset="humaneval",
            split="heldout",
            limit=args.eval_prompts,
            heldout_size=args.heldout_size,
            max_new_tokens=args.new_tokens,
            threshold=args.threshold,
            teacher_generate=teacher_generate,
            decodings=decodings,
            batch_size=args.eval_batch_size,
            max_prompt_length=args.max_prompt_length,
            keep_samples=True,
        )
    student.train(was_training)
    out = {
        d: {m: report["results"][student_system(d)][m] for m in (*METRICS, "mean_completion_tokens")}
        if d in decodings
        else {}
        for d in DECODINGS
    }
    out["sample"] = report["samples"][0]["outputs"] if report["samples"] else {}
    if teacher_generate:
        out["teacher_ar"] = {m: report["results"]["teacher_ar"][m] for m in (*METRICS, "mean_completion_tokens")}
        # the chain-bound ceiling of parallel decoding on the teacher's own greedy text (opdlm_trl.diagnostics)
        out["teacher_ar"]["oracle_ceiling"] = report.get("oracle_ceiling")
    if "dynamic" in decodings:
        out["dynamic"]["oracle_ceiling"] = report["results"][student_system("dynamic")].get("oracle_ceiling")
    for decoding in decodings:
        # the same chain bound on the student's own text, and the share of its commits made out of reading order
        student = report["results"][student_system(decoding)]
        out[decoding]["own_text_oracle_ceiling"] = student.get("own_text_oracle_ceiling")
        out[decoding]["out_of_order_rate"] = student.get("out_of_order_rate")
    return out


# ------------------------------------------------------------------------------------------ training


def build_trainer(method: str, shift: bool, seed: int, args: argparse.Namespace, results: dict, callback):
    from opdlm_trl.baselines import MDLMConfig, MDLMTrainer, OffPolicyKDTrainer
    from opdlm_trl.config import OPDConfig
    from opdlm_trl.trainer import OPDTrainer

    student, tokenizer = load_pair(args)
    teacher, _ = load_pair(args)
    common = dict(
        output_dir=str(cell_dir(method, shift, seed, args)),
        max_steps=10 * max(args.budgets),  # never reached: the budget callback stops training
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        bf16=args.bf16,  # training only: evaluations decode and score in float32 either way
        gradient_checkpointing=False,
        report_to="none",
        # checkpoints for a resume inside the cell; only the newest is kept (transformers deletes the older one
        # after the new one is fully written, so a kill mid-save still leaves a complete checkpoint)
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=max(args.save_steps, 1),
        save_total_limit=1,
        logging_steps=1,
        disable_tqdm=True,
        shift=shift,
        block_size=args.block_size,
        max_completion_length=args.new_tokens,
        max_prompt_length=args.max_prompt_length,
        prompt_truncation="left",
        temperature=1.0,
    )
    peft_config = None
    if args.finetune == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    kwargs = dict(processing_class=tokenizer, callbacks=[callback], peft_config=peft_config)
    teacher_model = None if peft_config is not None else teacher
    if method in ("opd", "opd_random_remask"):
        selection = "per_block" if method == "opd" else "random_remask"
        config = OPDConfig(**common, threshold=args.threshold, state_selection=selection)  # rollouts: OPD's only
        return OPDTrainer(student, teacher_model, args=config, train_dataset=train_prompts(args), **kwargs), teacher
    data = raw_data(args) if method == "mdlm_raw" else teacher_data(args, results)
    config = MDLMConfig(**common, block_masking=True)
    if method == "offpolicy_kd":
        return OffPolicyKDTrainer(student, teacher_model, args=config, train_dataset=data, **kwargs), teacher
    return MDLMTrainer(student, args=config, train_dataset=data, **kwargs), teacher


def cell_key(method: str, shift: bool, seed: int) -> str:
    return f"{method}|shift={int(shift)}|seed={seed}"


def cell_dir(method: str, shift: bool, seed: int, args: argparse.Namespace) -> Path:
    """The cell's trainer ``output_dir``: its training checkpoints live here."""
    return Path(args.out_dir) / "runs" / f"{method}-shift{int(shift)}-seed{seed}"


def resume_point(trainer, results: dict, key: str) -> str | None:
    """The cell's newest complete checkpoint (None: start the cell from scratch), noted in ``results["resumes"]``.

    Incomplete newer checkpoints (a kill while one was written) are skipped with a warning by
    ``last_complete_checkpoint``.
    """
    from opdlm_trl.checkpoints import last_complete_checkpoint

    if trainer.args.save_strategy == "no":
        return None
    checkpoint = last_complete_checkpoint(trainer.args.output_dir, trainer.args)
    if checkpoint is not None:
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        results.setdefault("resumes", []).append({"cell": key, "checkpoint": checkpoint, "step": step})
        log(f"{key}: resuming from {checkpoint} (optimizer step {step})")
    return checkpoint


def remove_checkpoints(output_dir: str) -> None:
    """A finished cell's checkpoints are never resumed again (its budgets are in results.json): free the disk."""
    for path in Path(output_dir).glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)


def cell_budgets(seed_index: int, args: argparse.Namespace) -> list[int]:
    """All budgets for the first seed; the ``--extra-seed-budgets`` smallest ones for the other seeds."""
    budgets = sorted(args.budgets)
    return budgets if seed_index == 0 else budgets[: args.extra_seed_budgets]


def done_budgets(results: dict, key: str) -> set[int]:
    return {r["budget"] for r in results["records"] if r["cell"] == key}


def run_cell(method: str, shift: bool, seed: int, budgets: list[int], args, results: dict, save) -> None:
    """Train one (method, shift, seed) once; evaluate at every budget crossing; stop after the last one."""
    from transformers import TrainerCallback

    key = cell_key(method, shift, seed)
    pending = [b for b in budgets if b not in done_budgets(results, key)]
    if not pending:
        return
    torch.manual_seed(seed)
    began = time.perf_counter()
    holder: dict[str, Any] = {}

    class BudgetCallback(TrainerCallback):
        def on_step_end(self, train_args, state, control, **_):
            trainer = holder["trainer"]
            tokens = trainer.training_tokens
            while pending and tokens >= pending[0]:
                budget = pending.pop(0)
                dynamic = args.dynamic_budgets == "all" or (args.dynamic_budgets == "last" and not pending)
                decodings = DECODINGS if dynamic else ("static",)
                scores = evaluate(trainer.model, holder["teacher"], trainer.processing_class, args, False, decodings)
                results["records"].append(
                    {
                        "cell": key,
                        "method": method,
                        "shift": shift,
                        "seed": seed,
                        "budget": budget,
                        "training_tokens": tokens,
                        "steps": state.global_step,
                        "train_seconds": time.perf_counter() - began,
                        **scores,
                    }
                )
                save()
                log(f"{key} budget {budget}: tokens {tokens} static {scores['static']} dynamic {scores['dynamic']}")
            if not pending:
                control.should_training_stop = True
            return control

    trainer, teacher = build_trainer(method, shift, seed, args, results, BudgetCallback())
    holder.update(trainer=trainer, teacher=teacher)
    checkpoint = resume_point(trainer, results, key)
    save()  # teacher data may have just been generated
    trainer.train(resume_from_checkpoint=checkpoint)
    save(figure=True)
    if not args.keep_checkpoints:
        remove_checkpoints(trainer.args.output_dir)


def run_init(shift: bool, args: argparse.Namespace, results: dict, save) -> None:
    """Score the unconverted-then-converted student at 0 tokens, and the AR teacher once."""
    from opdlm_trl.modeling import to_diffusion

    key = cell_key("init", shift, 0)
    if done_budgets(results, key):
        return
    student, tokenizer = load_pair(args)
    teacher, _ = load_pair(args)
    student, tokenizer = to_diffusion(student, tokenizer, block_size=args.block_size, shift=shift)
    scores = evaluate(student, teacher, tokenizer, args, teacher_generate="teacher" not in results)
    if "teacher_ar" in scores:
        results["teacher"] = scores.pop("teacher_ar")
    results["records"].append(
        {"cell": key, "method": "init", "shift": shift, "seed": 0, "budget": 0, "training_tokens": 0, **scores}
    )
    save()
    log(f"{key}: {scores['static']} / {scores['dynamic']}; teacher {results.get('teacher')}")


# ------------------------------------------------------------------------------------------ reporting


def mean_curve(results: dict, method: str, shift: bool, decoding: str, metric: str) -> list[tuple[int, float]]:
    """Seed-mean score at each budget (skipping missing values)."""
    by_budget: dict[int, list[float]] = {}
    for record in results["records"]:
        if record["method"] == method and record["shift"] == shift:
            value = record[decoding].get(metric)
            if value is not None and math.isfinite(value):
                by_budget.setdefault(record["budget"], []).append(value)
    return [(b, sum(v) / len(v)) for b, v in sorted(by_budget.items())]


def reaches(metric: str, value: float, teacher: float, fraction: float = 0.9) -> bool:
    """``fraction`` of the teacher's score; for NLL (lower is better): within ``1 - fraction`` of its NLL."""
    if metric == "teacher_nll_per_token":
        return value <= (2.0 - fraction) * teacher
    return value >= fraction * teacher


def has_target(results: dict, metric: str) -> bool:
    """A target needs a teacher score worth a fraction: pass@1 needs >= MIN_TEACHER_PASSES solved problems
    (90% of one solved problem is met by any lucky student)."""
    teacher = (results.get("teacher") or {}).get(metric)
    if teacher is None:
        return False
    if metric == "pass_at_1":
        return teacher * results["config"].get("eval_prompts", 0) >= MIN_TEACHER_PASSES
    return metric == "teacher_nll_per_token" or teacher > 0


def tokens_to_reach(
    results: dict, method: str, shift: bool, decoding: str, metric: str, fraction: float = 0.9
) -> int | None:
    if not has_target(results, metric):
        return None
    teacher = results["teacher"][metric]
    for budget, value in mean_curve(results, method, shift, decoding, metric):
        if budget > 0 and reaches(metric, value, teacher, fraction):
            return budget
    return None


def summary(results: dict) -> dict:
    """Tokens to reach each target per (method, shift, decoding, metric, fraction), and the ratio to OPD.

    ``ratio_at_least``: where OPD (same shift) reached the target and the method did not, its largest
    measured budget over OPD's tokens, a lower bound of the ratio.
    """
    cells = sorted({(r["method"], r["shift"]) for r in results["records"] if r["method"] != "init"})
    table = {}
    for method, shift in cells:
        for decoding in DECODINGS:
            measured = [b for b, _ in mean_curve(results, method, shift, decoding, "top1_agreement") if b > 0]
            for metric in SCORED:
                for fraction in TARGET_FRACTIONS:
                    tokens = tokens_to_reach(results, method, shift, decoding, metric, fraction)
                    opd = tokens_to_reach(results, "opd", shift, decoding, metric, fraction)
                    table[f"{method}|shift={int(shift)}|{decoding}|{metric}|{fraction}"] = {
                        "tokens": tokens,
                        "ratio_to_opd": (tokens / opd) if tokens and opd else None,
                        "ratio_at_least": (max(measured) / opd) if opd and not tokens and measured else None,
                    }
    return table


def ratio_text(entry: dict) -> str:
    if entry["ratio_to_opd"] is not None:
        return f"{entry['ratio_to_opd']:.2f}"
    return f">{entry['ratio_at_least']:.1f}" if entry["ratio_at_least"] is not None else "-"


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(results: dict) -> str:
    lines = [
        f"# Token efficiency ({results['config']['mode']})",
        "",
        f"Config: `{json.dumps(results['config'], sort_keys=True)}`",
        "",
    ]
    teacher = results.get("teacher") or {}
    lines += ["Teacher (AR greedy): " + ", ".join(f"{m} {fmt(teacher.get(m))}" for m in METRICS), ""]
    data = results.get("teacher_data")
    if data:
        lines += [
            f"Teacher generation cost of the SFT/KD data: {data['teacher_generation_tokens']} tokens "
            f"({data['seconds']:.0f} s).",
            "",
        ]
    header = (
        "| method | shift | budget | tokens | "
        + " | ".join(f"{d} {m}" for d in DECODINGS for m in ("pass@1", "NLL/tok", "top1", "tok/fwd"))
        + " |"
    )
    lines += [header, "|" + "---|" * (4 + 4 * len(DECODINGS))]
    for r in sorted(results["records"], key=lambda r: (r["method"], r["shift"], r["seed"], r["budget"])):
        values = [fmt(r[d].get(m)) for d in DECODINGS for m in METRICS]
        lines.append(
            f"| {r['method']} (seed {r['seed']}) | {r['shift']} | {r['budget']} | {r['training_tokens']} | "
            + " | ".join(values)
            + " |"
        )
    lines += [
        "",
        "Tokens to reach a fraction of the teacher's score (pass@1, top-1 agreement; for NLL: within "
        "1 - fraction of the teacher's NLL), seed means. '-' = not reached within the measured budgets, or no "
        f"target (pass@1 needs the teacher to solve >= {MIN_TEACHER_PASSES} problems); 'ratio' divides by OPD's "
        "tokens at the same shift ('>x' = not reached, a lower bound):",
        "",
        "| method | shift | decoding | target | pass@1 | NLL | top-1 | ratio to OPD (pass@1 / NLL / top-1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = summary(results)
    cells = sorted({(r["method"], r["shift"]) for r in results["records"] if r["method"] != "init"})
    for method, shift in cells:
        for d in DECODINGS:
            for fraction in TARGET_FRACTIONS:
                entries = [table[f"{method}|shift={int(shift)}|{d}|{m}|{fraction}"] for m in SCORED]
                lines.append(
                    f"| {method} | {shift} | {d} | {fraction:.0%} | "
                    + " | ".join(fmt(e["tokens"]) for e in entries)
                    + " | "
                    + " / ".join(ratio_text(e) for e in entries)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(DECODINGS), len(METRICS), figsize=(4.2 * len(METRICS), 3.4 * len(DECODINGS)), squeeze=False
    )
    cells = sorted({(r["method"], r["shift"]) for r in results["records"] if r["method"] != "init"})
    colors = {cell: f"C{index % 10}" for index, cell in enumerate(cells)}  # one colour per cell in every panel
    teacher = results.get("teacher") or {}
    for row, decoding in enumerate(DECODINGS):
        for col, metric in enumerate(METRICS):
            ax = axes[row][col]
            for method, shift in cells:
                curve = [(b, v) for b, v in mean_curve(results, method, shift, decoding, metric) if b > 0]
                if curve:
                    ax.plot(
                        *zip(*curve, strict=True),
                        marker="o",
                        color=colors[(method, shift)],
                        label=f"{method} shift={int(shift)}",
                    )
            if teacher.get(metric) is not None:
                ax.axhline(teacher[metric], color="black", linestyle="--", label="teacher (AR)")
            ax.set_xscale("log")
            if metric == "teacher_nll_per_token":
                ax.set_yscale("log")  # unshifted students sit an order of magnitude above the rest
            ax.set_title(f"{metric} ({decoding})", fontsize=9)
            ax.set_xlabel("training tokens")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ driver


def merge_lanes(results: dict, lanes: list[Path]) -> None:
    """Union of several lanes' records (one per cell and budget; the first lane wins a duplicate).

    Lanes are independent invocations with their own ``--out-dir`` (e.g. two single-thread processes on
    a 2-core machine); the teacher row and the teacher-data cost come from the first lane that has them.
    """
    seen = {(r["cell"], r["budget"]) for r in results["records"]}
    for lane in lanes:
        if not (lane / "results.json").exists():
            log(f"merge: {lane} has no results.json yet; skipped")
            continue
        data = json.loads((lane / "results.json").read_text())
        for key in ("teacher", "teacher_data"):
            if key in data and key not in results:
                results[key] = data[key]
        for record in data.get("records", []):
            if (record["cell"], record["budget"]) not in seen:
                seen.add((record["cell"], record["budget"]))
                results["records"].append(record)
        results.setdefault("lanes", []).append({"dir": str(lane), "config": data.get("config")})
    configs = [lane["config"] for lane in results["lanes"] if lane["config"]]
    if configs:  # the lanes' common settings, with what their records actually cover
        trained = [r for r in results["records"] if r["method"] != "init"]
        merged = dict(configs[0])
        for field, key in (("methods", "method"), ("shifts", "shift"), ("seeds", "seed"), ("budgets", "budget")):
            merged[field] = sorted({int(r[key]) if key == "shift" else r[key] for r in trained})
        results["config"] = merged


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--shifts", nargs="+", type=int, default=[0, 1], choices=[0, 1], help="0 = paper, 1 = shifted")
    p.add_argument(
        "--budgets", nargs="+", type=int, help="training tokens (default 1024 2048 4096 8192; --smoke: 16 32)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--extra-seed-budgets",
        type=int,
        default=2,
        help="seeds after the first train only up to this many of the smallest budgets",
    )
    p.add_argument("--eval-prompts", type=int, default=100, help="held-out HumanEval prompts")
    p.add_argument("--heldout-size", type=int, default=100)
    p.add_argument("--train-prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32, help="rollout / teacher answer / evaluation length")
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.9, help="dynamic decoding (rollouts and evaluation)")
    p.add_argument("--finetune", choices=["full", "lora"], default="full")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="train with bf16 mixed precision (float32 master weights; ~3x faster steps on a bf16-capable CPU, "
        "benchmarks/train_step.py --compare-precision); evaluations stay float32",
    )
    p.add_argument("--model", help="teacher checkpoint dir (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument(
        "--dynamic-budgets",
        choices=["all", "last", "none"],
        default="all",
        help="evaluate dynamic decoding at every budget, only at each cell's last one, or never (each "
        "skipped evaluation halves the cost where students still commit ~1 token per forward)",
    )
    p.add_argument("--no-init", action="store_true", help="skip the 0-token rows (another lane runs them)")
    p.add_argument("--init-only", action="store_true", help="only the 0-token rows and the teacher row")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="merge the results.json of several --out-dir lanes (run in parallel) into --out-dir; trains nothing",
    )
    p.add_argument(
        "--save-steps",
        type=int,
        help="training checkpoint every N optimizer steps, for a resume inside a killed cell (default 5; "
        "--smoke: 1; 0 = none)",
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep a finished cell's last checkpoint")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default="benchmarks/out/token_efficiency")
    p.add_argument("--smoke", action="store_true", help="tiny random models, a few prompts (< 60 s, CI)")
    args = p.parse_args(argv)
    if args.smoke:
        # The chosen methods (default: all) on the shifted student (test_baselines covers both conventions).
        args.shifts, args.seeds = [1], [0]
        args.budgets = args.budgets or [16, 32]
        args.save_steps = 1 if args.save_steps is None else args.save_steps
        args.eval_prompts, args.train_prompts, args.new_tokens, args.max_prompt_length = 1, 4, 8, 48
        args.batch_size, args.eval_batch_size, args.lr = 2, 2, 1e-3
    args.budgets = args.budgets or [1024, 2048, 4096, 8192]
    args.save_steps = 5 if args.save_steps is None else args.save_steps
    return args


def main(argv=None) -> dict:
    from opdlm_trl.sampling import SamplerConfig

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    config = {k: v for k, v in vars(args).items() if k not in ("out_dir", "threads", "save_steps", "keep_checkpoints")}
    config.update(
        mode="smoke (tiny random models)" if args.smoke else f"{args.finetune} fine-tune, constant lr",
        loss="forward_kl full vocabulary",
        rollout_temperature=1.0,
        commit_order=SamplerConfig.commit_order,  # rollouts and evaluation (records before session 10: confidence)
        host=platform.node(),
        torch_threads=torch.get_num_threads(),
    )
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("config", {}).get("budgets") not in (None, config["budgets"]) and not args.smoke:
        log("note: budgets differ from the stored run; stored records are kept")
    results.setdefault("records", [])
    results["config"] = config

    def save(figure: bool = False) -> None:
        """JSON + markdown after every evaluation; the PNG (about a second of matplotlib) after every cell."""
        results["summary"] = summary(results)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float))
        os.replace(tmp, path)
        (out / "token_efficiency.md").write_text(markdown(results))
        if figure:
            plot(results, out / "token_efficiency.png")

    if args.merge:
        merge_lanes(results, [Path(d) for d in args.merge])
        save(figure=True)
        log(f"merged {len(args.merge)} lanes: {len(results['records'])} records -> {path}")
        return results
    for shift in [] if args.no_init else args.shifts:
        run_init(bool(shift), args, results, save)
    if args.init_only:
        save(figure=True)
        log(f"0-token rows done: {path}")
        return results
    for seed_index, seed in enumerate(args.seeds):
        for shift in args.shifts:
            for method in args.methods:
                run_cell(method, bool(shift), seed, cell_budgets(seed_index, args), args, results, save)
    save(figure=True)
    log(f"done: {path}")
    return results


if __name__ == "__main__":
    main()
