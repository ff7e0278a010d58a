"""Log-likelihood evaluation: speed of the exact fixed-order method against lm-eval's ``hf`` model on the teacher,
and how many Monte Carlo ELBO samples come within 0.01 nats/token of the exact value.

Not a test: it prints a summary and writes JSON. The requests are the shipped multiple-choice task's
(examples/lm_eval_tasks/opdlm_mc: ``Question: ...\\nAnswer:`` + each choice), tokenised by lm-eval itself.

* **speed**: the same ``loglikelihood`` requests through lm-eval's ``HFLM`` on the teacher and through the
  ``opdlm`` model on the student, interleaved round by round in one process (the machine may be shared: compare
  the ratio, not the absolute numbers). ``token_ratio`` is the forward tokens of the exact layout over the AR
  forward's, the cost model behind the ``2 * block_size`` bound (``within_bound``).
* **elbo**: per seed, ``mc_max`` one-sample ELBO estimates of every (question, right answer) request; the estimate
  after ``n`` samples is the mean of the first ``n``. ``error[n]`` = |ELBO_n - exact| summed over the requests per
  continuation token, averaged over seeds; ``samples_needed`` = the smallest ``n`` with an error <= 0.01 (None if
  none up to ``mc_max``). ``bias`` compares the mean of all samples with the exact value; ``spread[n]`` is the
  distance of ELBO_n from that all-sample mean (the sampling noise alone) and ``samples_to_settle`` its first
  ``n`` within 0.01.

    python benchmarks/loglikelihood.py --limit 20 --rounds 3 --output loglikelihood.json   # SmolLM2, converted here
    python benchmarks/loglikelihood.py --student DIR ...   # a trained student (its teacher: --teacher)
    python benchmarks/loglikelihood.py --smoke              # tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from opdlm_trl.likelihood import elbo_samples, loglikelihood
from opdlm_trl.masks import round_up_to_block

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "examples" / "lm_eval_tasks" / "opdlm_mc" / "opdlm_mc.jsonl"
TOLERANCE = 0.01  # nats per token


def load_models(args):
    """``(teacher, tokenizer, student, student_tokenizer, description)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdlm_trl import load_diffusion_model, to_diffusion

    if args.smoke:
        from opdlm_trl.tiny import tiny_model, tiny_tokenizer

        teacher, tokenizer, name = tiny_model("llama"), tiny_tokenizer(), "tiny llama (2 layers, hidden 64)"
    else:
        from opdlm_trl.data import default_model_dir

        directory = args.teacher or default_model_dir()
        teacher = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
        tokenizer, name = AutoTokenizer.from_pretrained(directory), directory
    if args.student:
        student, student_tokenizer = load_diffusion_model(args.student, dtype=torch.float32)
        name = f"student {args.student}, teacher {name}"
    else:
        student, student_tokenizer = to_diffusion(
            copy.deepcopy(teacher), copy.deepcopy(tokenizer), block_size=args.block_size, shift=not args.unshifted
        )
        name = f"{name} converted here (untrained student, block {args.block_size}, shift={not args.unshifted})"
    return teacher.eval(), tokenizer, student.eval(), student_tokenizer, name


def mc_instances(limit: int):
    """lm-eval ``Instance`` objects of every (question, choice) pair, and the index of each right answer's."""
    from lm_eval.api.instance import Instance

    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()][:limit]
    instances, right = [], []
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        for choice_index, choice in enumerate(row["choices"]):
            if choice_index == row["answer"]:
                right.append(len(instances))
            instances.append(Instance("loglikelihood", row, (context, f" {choice}"), idx=choice_index))
    return instances, right


def token_pairs(model, instances) -> list[tuple[list[int], list[int]]]:
    """The ``(context_ids, continuation_ids)`` lm-eval's ``loglikelihood`` scores (its own ``_encode_pair``)."""
    return [model._encode_pair(*instance.args) for instance in instances]


def measure_speed(hf, ours, instances, pairs, rounds: int, block_size: int, shift: bool) -> dict:
    """Interleaved rounds of the same requests; requests/s per system and their ratio."""
    seconds = {"hf_teacher": [], "opdlm_exact": []}
    for _ in range(rounds):
        for name, model in (("hf_teacher", hf), ("opdlm_exact", ours)):
            began = time.perf_counter()
            model.loglikelihood(instances, disable_tqdm=True)
            seconds[name].append(time.perf_counter() - began)
    ar_tokens = sum(len(c) + len(x) for c, x in pairs)
    copies = block_size - 1 if shift else block_size
    layout_tokens = sum(
        round_up_to_block(len(c), block_size) + round_up_to_block(len(x), block_size) * (1 + min(copies, len(x)))
        for c, x in pairs
    )
    median = {name: sorted(values)[len(values) // 2] for name, values in seconds.items()}
    ratio = median["opdlm_exact"] / median["hf_teacher"]
    return {
        "requests": len(instances),
        "rounds": rounds,
        "seconds": seconds,
        "requests_per_s": {name: len(instances) / value for name, value in median.items()},
        "time_ratio_exact_over_hf": ratio,
        "token_ratio_exact_over_ar": layout_tokens / ar_tokens,
        "bound_2B": 2 * block_size,
        "within_bound": ratio <= 2 * block_size,
    }


def measure_elbo(student, pad_id: int, pairs, seeds: int, mc_max: int, per_forward: int) -> dict:
    """ELBO error against the exact value as the number of samples grows (prefix means of the same draws)."""
    exact = torch.tensor([total for total, _ in loglikelihood(student, pairs, pad_id)], dtype=torch.float64)
    tokens = sum(len(continuation) for _, continuation in pairs)
    counts = [n for n in (2**k for k in range(int(math.log2(mc_max)) + 1))]
    errors = {n: [] for n in counts}
    runs = [
        elbo_samples(
            student, pairs, pad_id, mc_num=mc_max, samples_per_forward=per_forward,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in range(seeds)
    ]  # fmt: skip
    overall = torch.cat(runs, dim=1).mean(1)  # the estimate's own limit, as well as seeds x mc_max samples know it
    spread = {n: [] for n in counts}
    for samples in runs:
        for n in counts:
            estimate = samples[:, :n].mean(1)
            errors[n].append(float((estimate - exact).abs().sum()) / tokens)
            spread[n].append(float((estimate - overall).abs().sum()) / tokens)
    mean_error = {n: sum(values) / len(values) for n, values in errors.items()}
    mean_spread = {n: sum(values) / len(values) for n, values in spread.items()}
    needed = next((n for n in counts if mean_error[n] <= TOLERANCE), None)
    return {
        "requests": len(pairs),
        "continuation_tokens": tokens,
        "seeds": seeds,
        "exact_nats_per_token": float(exact.sum()) / tokens,
        "elbo_nats_per_token_all_samples": float(overall.sum()) / tokens,
        "bias_nats_per_token": float((overall - exact).sum()) / tokens,
        "error_nats_per_token": {str(n): value for n, value in mean_error.items()},
        "error_per_seed": {str(n): values for n, values in errors.items()},
        "spread_nats_per_token": {str(n): value for n, value in mean_spread.items()},
        "tolerance": TOLERANCE,
        "samples_needed": needed,
        "samples_to_settle": next((n for n in counts if mean_spread[n] <= TOLERANCE), None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=None, help="Teacher directory (default: the embedded SmolLM2-135M).")
    parser.add_argument("--student", default=None, help="A converted student directory (default: convert here).")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--unshifted", action="store_true", help="Convert with shift=False (the paper's).")
    parser.add_argument("--limit", type=int, default=20, help="Questions of the shipped task (4 requests each).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved timing rounds (median reported).")
    parser.add_argument("--seeds", type=int, default=3, help="ELBO repetitions.")
    parser.add_argument("--mc-max", type=int, default=256, help="Most ELBO samples (powers of two up to it).")
    parser.add_argument("--samples-per-forward", type=int, default=32)
    parser.add_argument("--skip-elbo", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="Tiny model, few requests (CI).")
    parser.add_argument("--output", default="loglikelihood.json")
    args = parser.parse_args()
    if args.smoke:
        args.limit, args.rounds, args.seeds, args.mc_max, args.samples_per_forward = 3, 1, 2, 8, 4

    from lm_eval.models.huggingface import HFLM

    from opdlm_trl.eval.lm_eval_model import OPDLMEvalModel

    torch.manual_seed(0)
    teacher, tokenizer, student, student_tokenizer, name = load_models(args)
    hf = HFLM(pretrained=teacher, tokenizer=tokenizer, batch_size=args.batch_size)
    ours = OPDLMEvalModel(student, tokenizer=student_tokenizer, batch_size=args.batch_size)
    instances, right = mc_instances(args.limit)
    pairs = token_pairs(ours, instances)
    shift = bool(student.config.opdlm["shift"])
    block = student.config.opdlm["block_size"]
    report = {
        "model": name,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "block_size": block,
        "shift": shift,
    }
    if not args.skip_speed:
        report["speed"] = speed = measure_speed(hf, ours, instances, pairs, args.rounds, block, shift)
        print(
            f"{name}\n{speed['requests']} loglikelihood requests: hf teacher {speed['requests_per_s']['hf_teacher']:.2f}/s, "
            f"opdlm exact {speed['requests_per_s']['opdlm_exact']:.2f}/s; time ratio "
            f"{speed['time_ratio_exact_over_hf']:.2f} (token ratio {speed['token_ratio_exact_over_ar']:.2f}, "
            f"bound {speed['bound_2B']})"
        )
    if not args.skip_elbo:
        answers = [pairs[i] for i in right]
        report["elbo"] = measure_elbo(
            student, student_tokenizer.pad_token_id, answers, args.seeds, args.mc_max, args.samples_per_forward
        )
        elbo = report["elbo"]
        table = ", ".join(f"n={n}: {value:.3f}" for n, value in elbo["error_nats_per_token"].items())
        print(
            f"ELBO vs exact on {elbo['requests']} right answers ({elbo['continuation_tokens']} tokens): exact "
            f"{elbo['exact_nats_per_token']:.3f} nats/token, ELBO(all samples) {elbo['elbo_nats_per_token_all_samples']:.3f};"
            f" |error| per token {table}; samples needed for {TOLERANCE}: {elbo['samples_needed']}; within "
            f"{TOLERANCE} of its own limit after {elbo['samples_to_settle']}"
        )
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
