"""GPU check: does OPD training run in bf16 on CUDA, how fast is the diffusion sampler, how much memory is used.

Not part of CI (this project has no GPU); written to be run when a GPU machine is lent, offline, in < 10 minutes.
Phases, each bounded (few steps, few tokens) and skipped once ``--time-limit`` is spent:

* ``opd_full``: ``--steps`` OPD steps of SmolLM2-135M-Instruct, full fine-tune, bf16 weights, local frozen teacher.
* ``opd_lora``: the same with LoRA r=16 on every linear layer and the shared-weights teacher.
* ``sampler``: the converted (untrained) student's greedy diffusion sampler (static, one token per step, and dynamic
  at threshold 0.9, exact KV cache) against HF ``generate`` of the AR model, at batch 1 and 16, ``--decode-tokens``
  tokens per row with stop tokens disabled, so every row writes the same number of tokens.

Each phase records seconds, tokens/s, losses and the peak GPU memory (``torch.cuda.max_memory_allocated``, reset
before the phase). One JSON goes to ``--output`` and to stdout.

    python benchmarks/gpu_check.py --model-dir .cache/smollm2-135m-instruct --output gpu_check.json
    python benchmarks/gpu_check.py --dry-run --output /tmp/gpu_check.json   # tiny model on CPU, seconds (CI)

The model directory is a plain HF checkpoint; ``opdlm_trl.data.default_model_dir()`` builds the embedded
SmolLM2-135M-Instruct into ``$OPDLM_CACHE/smollm2-135m-instruct`` (run it once with ``OPDLM_CACHE=.cache`` to get it
inside the repository, where a device run can carry it).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    [{"role": "user", "content": f"Write a Python function that returns the {n}-th {what}."}]
    for n in (2, 3, 5, 7)
    for what in ("prime", "Fibonacci number", "square", "power of two")
]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="HF checkpoint (default: opdlm_trl.data.default_model_dir())")
    p.add_argument("--output", default="gpu_check.json")
    p.add_argument("--steps", type=int, default=3, help="OPD optimizer steps per training phase")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per OPD step")
    p.add_argument("--rollout-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens per row in the sampler phase")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds; later phases are skipped after it")
    p.add_argument("--dry-run", action="store_true", help="tiny random model on CPU, float32, a few tokens (seconds)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps, args.batch_size, args.rollout_tokens, args.decode_tokens = 1, 2, 8, 8
        args.decode_batches = [1, 2]
    return args


def setup(args: argparse.Namespace) -> dict:
    """Device, dtype and a loader of fresh ``(model, tokenizer)`` pairs; refuses a CUDA-less real run early."""
    if args.dry_run:
        from opdlm_trl.tiny import tiny_model, tiny_tokenizer

        return {
            "device": torch.device("cpu"),
            "dtype": torch.float32,
            "load": lambda: (tiny_model("llama", hidden_size=64, num_layers=2), tiny_tokenizer()),
            "model_dir": None,
        }
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs CUDA (use --dry-run for the CPU smoke path).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdlm_trl.data import default_model_dir

    model_dir = args.model_dir or default_model_dir()
    if not (Path(model_dir) / "config.json").is_file():
        raise SystemExit(f"{model_dir} is not a model directory (config.json missing).")

    def load():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
        return model.to("cuda"), AutoTokenizer.from_pretrained(model_dir)

    return {"device": torch.device("cuda"), "dtype": torch.bfloat16, "load": load, "model_dir": str(model_dir)}


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak allocated memory since the last reset; None on CPU (not measured there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def train_phase(env: dict, args: argparse.Namespace, lora: bool) -> dict:
    """``--steps`` OPD steps; bf16 mixed precision on CUDA, a local frozen teacher (full) or shared (LoRA)."""
    from datasets import Dataset
    from peft import LoraConfig

    from opdlm_trl import OPDConfig, OPDTrainer

    model, tokenizer = env["load"]()
    cuda = env["device"].type == "cuda"
    with tempfile.TemporaryDirectory() as output_dir:
        config = OPDConfig(
            output_dir=output_dir,
            use_cpu=not cuda,
            bf16=cuda,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            max_completion_length=args.rollout_tokens,
            learning_rate=1e-4 if lora else 1e-5,
            seed=0,
        )
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear") if lora else None
        dataset = Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS])
        trainer = OPDTrainer(
            model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
        reset_memory(env["device"])
        began = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - began
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in logs]
    return {
        "teacher": type(trainer.teacher).__name__,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "seconds_per_step": seconds / max(trainer.state.global_step, 1),
        "losses": losses,
        "losses_finite": all(math.isfinite(loss) for loss in losses),
        "training_tokens": trainer._progress.training_tokens,
        "peak_memory_mib": peak_memory_mib(env["device"]),
    }


def _timed(device: torch.device, function, *args, **kwargs) -> tuple[object, float]:
    """``function(*args, **kwargs)`` and its wall time, with the GPU's queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    result = function(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - began


@torch.no_grad()
def sampler_phase(env: dict, args: argparse.Namespace) -> dict:
    """Diffusion sampler (static and dynamic 0.9) vs HF ``generate`` (greedy), same tokens per row."""
    from opdlm_trl import OPDConfig
    from opdlm_trl.data import render_prompts
    from opdlm_trl.masks import left_pad_to_block
    from opdlm_trl.modeling import to_diffusion
    from opdlm_trl.sampling import DiffusionSampler

    ar_model, tokenizer = env["load"]()
    ar_model.eval()
    student, student_tokenizer = to_diffusion(*env["load"](), block_size=4, shift=True)
    student.eval()
    n = args.decode_tokens
    with tempfile.TemporaryDirectory() as output_dir:
        options = OPDConfig(output_dir=output_dir, use_cpu=env["device"].type != "cuda", report_to="none")
    results = {}
    reset_memory(env["device"])
    for batch in args.decode_batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        token_lists = render_prompts(prompts, student_tokenizer, {})
        row = {}
        for remasking in ("static", "dynamic"):
            config = options.rollout_sampler_config(
                max_new_tokens=n, remasking=remasking, temperature=0.0, stop_token_ids=[]
            )
            sampler = DiffusionSampler(config, pad_token_id=student_tokenizer.pad_token_id)
            sampler.sample(student, token_lists)  # warm-up (kernels, allocator)
            rollout, seconds = _timed(env["device"], sampler.sample, student, token_lists)
            tokens = int(rollout.completion_mask.sum())
            row[f"diffusion_{remasking}"] = {
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_second": tokens / seconds,
                "forwards": int(rollout.block_steps.sum()),
            }
        ids, mask = left_pad_to_block(render_prompts(prompts, tokenizer, {}), 1, pad_token_id=tokenizer.pad_token_id)
        ids, mask = ids.to(env["device"]), mask.to(env["device"])
        kwargs = dict(
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        ar_model.generate(ids, **kwargs)  # warm-up
        output, seconds = _timed(env["device"], ar_model.generate, ids, **kwargs)
        tokens = (output.shape[1] - ids.shape[1]) * batch
        row["hf_generate"] = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}
        row["speedup_dynamic_vs_generate"] = row["diffusion_dynamic"]["tokens_per_second"] / (tokens / seconds)
        results[f"batch_{batch}"] = row
    results["peak_memory_mib"] = peak_memory_mib(env["device"])
    return results


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(0)
    env = setup(args)
    report = {
        "mode": "dry-run (tiny random model, CPU, float32)" if args.dry_run else "CUDA, bf16",
        "device": torch.cuda.get_device_name(0) if env["device"].type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model_dir": env["model_dir"],
        "settings": {k: v for k, v in vars(args).items() if k not in ("output",)},
        "phases": {},
    }
    phases = {
        "opd_full": lambda: train_phase(env, args, lora=False),
        "opd_lora": lambda: train_phase(env, args, lora=True),
        "sampler": lambda: sampler_phase(env, args),
    }
    began = time.perf_counter()
    for name, phase in phases.items():
        if time.perf_counter() - began > args.time_limit:
            report["phases"][name] = {"skipped": f"time limit {args.time_limit:.0f} s reached"}
            continue
        report["phases"][name] = phase()
        print(f"[gpu_check] {name}: {json.dumps(report['phases'][name])}", flush=True)
    report["total_seconds"] = time.perf_counter() - began
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
