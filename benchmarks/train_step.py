"""Where an OPD training step spends its time and memory, against a plain LoRA SFT step on the same batch.

Not a test: prints a table and writes JSON. The default shape is the CPU demo's (examples/configs/cpu_demo.yaml):
SmolLM2-135M-Instruct (``opdlm_trl.data.default_model_dir()``), LoRA r=16 on every linear layer, shared-weights
teacher, batch 4 of HumanEval prompts, 32-token rollouts, block 4, dynamic decoding at threshold 0.9, temperature 1,
shifted student, per-block states, full-vocabulary forward KL.

An OPD step is timed in its phases, each with the trainer's own code:

* ``rollout``: ``OPDTrainer.rollout`` (the diffusion sampler, KV cache, no grad);
* ``teacher``: ``OPDTrainer.score`` (shared weights, adapters off, causal, full-vocabulary log-probs);
* ``states``: state selection + ``OPDTrainer.training_batch`` (batch assembly and its normaliser);
* ``student``: ``compute_loss`` (one ``[prompt | x0 | x_t]`` forward) + backward;
* ``optimizer``: AdamW step + zero_grad.

The SFT reference step is the student forward + backward of the same prompt + completion rows with the ordinary
causal mask and cross-entropy on the completion tokens, plus the same optimizer step.

Peak memory is the process's peak resident set (``VmHWM``), measured in a fresh subprocess per configuration and
reset (``/proc/self/clear_refs``) after the model is loaded, so it covers the training steps only; the resident set
after loading is reported as well. ``psutil`` is not needed.

    python benchmarks/train_step.py --output benchmarks/out/train_step.json
    python benchmarks/train_step.py --smoke          # tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PHASES = ("rollout", "teacher", "states", "student", "optimizer")
TARGET_ROLLOUT_SHARE = 0.5
TARGET_MEMORY_RATIO = 1.15


# ------------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (Linux only)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- worker
def _build_trainer(args: argparse.Namespace, output_dir: str):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdlm_trl.config import OPDConfig
    from opdlm_trl.trainer import OPDTrainer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    config = OPDConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=args.bf16,
        report_to="none",
        gradient_checkpointing=False,
        per_device_train_batch_size=args.batch,
        max_completion_length=args.new_tokens,
        block_size=args.block_size,
        shift=True,
        remasking="dynamic",
        threshold=0.9,
        temperature=1.0,
        learning_rate=5e-5 if args.full_finetune else 2e-4,
        length_groups=args.length_groups,
        max_prompt_length=args.max_prompt_length,
        prompt_truncation="left",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    lora = (
        None if args.full_finetune else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )
    trainer = OPDTrainer(model, args=config, train_dataset=args.dataset, processing_class=tokenizer, peft_config=lora)
    trainer.create_optimizer()
    trainer.model.train()
    return trainer


def _loss_batch(trainer, rollout, targets, states) -> dict:
    """The dict ``compute_loss`` reads: the trainer's batch with its normaliser (a one-micro-batch step)."""
    return trainer.training_batch(rollout, targets, states).to_dict()


def _timed(times: dict, name: str, function, *arguments):
    start = time.perf_counter()
    result = function(*arguments)
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
    return result


def _opd_step(trainer, prompts: list, times: dict):
    """One OPD optimisation step, phase by phase (the trainer's code, without TRL's buffering around it)."""
    from opdlm_trl.states import select_states

    rollout = _timed(times, "rollout", trainer.rollout, prompts)
    targets = _timed(times, "teacher", trainer.score, rollout)

    def assemble():
        return _loss_batch(trainer, rollout, targets, select_states(rollout, trainer.args.state_selection))

    batch = _timed(times, "states", assemble)

    def student():
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return loss.item()

    loss = _timed(times, "student", student)
    _timed(times, "optimizer", _optimizer_step, trainer)
    return rollout, loss


def _optimizer_step(trainer) -> None:
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def _sft_step(trainer, rows: dict, times: dict) -> float:
    """LoRA SFT on the same rows: causal forward over prompt + completion, cross-entropy on the completion."""
    input_ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
    attention_mask = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : rows["prompt_ids"].shape[1]] = -100

    def student():
        loss = trainer.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        loss.backward()
        return loss.item()

    loss = _timed(times, "student", student)
    _timed(times, "optimizer", _optimizer_step, trainer)
    return loss


def run_worker(args: argparse.Namespace) -> dict:
    """Measure one configuration (``opd`` or ``sft``) in this process; returns a JSON-able dict."""
    from opdlm_trl.data import humaneval_prompt_dataset

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dataset = humaneval_prompt_dataset("train").select(range(args.batch))
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _build_trainer(args, output_dir)
        prompts = list(args.dataset["prompt"])
        rows = torch.load(args.rows, weights_only=True) if args.mode == "sft" else None
        loaded_kib = _status_kib("VmRSS")
        reset = _reset_peak()
        per_step = []
        for step in range(args.warmup + args.steps):
            times: dict[str, float] = {}
            start = time.perf_counter()
            if args.mode == "opd":
                rollout, loss = _opd_step(trainer, prompts, times)
                generated = int(rollout.completion_mask.sum())
                times.update(nfe=rollout.nfe, tokens_per_step=rollout.tokens_per_step)
                if step == 0:
                    rows = {
                        k: getattr(rollout, k)
                        for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
                    }
                    torch.save(rows, args.rows)
            else:
                loss, generated = _sft_step(trainer, rows, times), int(rows["completion_mask"].sum())
            times["total"] = time.perf_counter() - start
            if step >= args.warmup:
                per_step.append({**times, "loss": loss, "generated_tokens": generated})
    peak_kib = _status_kib("VmHWM")
    mean = {key: sum(s.get(key, 0.0) for s in per_step) / len(per_step) for key in (*PHASES, "total")}
    return {
        "mode": args.mode,
        "steps": per_step,
        "mean_seconds": mean,
        "rss_after_load_mib": (loaded_kib or 0) / 1024,
        "peak_rss_mib": (peak_kib or 0) / 1024,
        "peak_reset_after_load": reset,
        "prompt_width": int(rows["prompt_ids"].shape[1]),
        "completion_width": int(rows["completion_ids"].shape[1]),
    }


def _full_length_rollout(trainer, prompts: list):
    """A rollout with the shapes of a trained student's: every row decodes the whole budget (static, no stop).

    An untrained student stops after a token or two, which would make any padding comparison meaningless; the
    phases compared here cost the same for any tokens of the same shape.
    """
    from opdlm_trl.sampling import DiffusionSampler

    config = trainer.args.rollout_sampler_config(
        max_new_tokens=trainer.args.max_completion_length, remasking="static", temperature=0.0, stop_token_ids=[]
    )
    return trainer.rollout(
        prompts, sampler=DiffusionSampler(config, pad_token_id=trainer.processing_class.pad_token_id)
    )


def run_paths(args: argparse.Namespace) -> dict:
    """The phases ``length_groups`` changes (teacher scoring, student forward + backward), both paths interleaved
    ``--rounds`` times in ONE process on one fixed full-length rollout, so machine noise hits both alike; plus that
    rollout and an optimizer step timed once, to put the saving in a whole step's terms."""
    from opdlm_trl.data import humaneval_prompt_dataset
    from opdlm_trl.states import select_states

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dataset = humaneval_prompt_dataset("train").select(range(args.batch))
    prompts = list(args.dataset["prompt"])
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _build_trainer(args, output_dir)
        trainer.model.train()
        began = time.perf_counter()
        rollout = _full_length_rollout(trainer, prompts)
        full_rollout_seconds = time.perf_counter() - began
        states = select_states(rollout, "per_block", generator=torch.Generator().manual_seed(0))
        times = {groups: {"teacher": [], "student": []} for groups in args.compare_groups}
        for _ in range(args.rounds):
            for groups in args.compare_groups:
                trainer.args.length_groups = groups
                targets = _timed_list(times[groups]["teacher"], trainer.score, rollout)
                batch = _loss_batch(trainer, rollout, targets, states)

                def student(batch=batch):
                    trainer.model.zero_grad(set_to_none=True)
                    trainer.compute_loss(trainer.model, batch).backward()

                _timed_list(times[groups]["student"], student)
        once: dict[str, float] = {}
        _timed(once, "optimizer", _optimizer_step, trainer)
    return {
        "prompt_width": int(rollout.prompt_ids.shape[1]),
        "prompt_tokens": int(rollout.prompt_mask.sum()),
        "completion_tokens": int(rollout.completion_mask.sum()),
        "rollout_seconds": full_rollout_seconds,
        "rollout_nfe": rollout.nfe,
        "optimizer_seconds": once["optimizer"],
        "seconds": {str(g): t for g, t in times.items()},
    }


def _timed_list(into: list, function, *arguments):
    start = time.perf_counter()
    result = function(*arguments)
    into.append(time.perf_counter() - start)
    return result


def summarise_paths(result: dict) -> dict:
    """Median phase times per path; speed-up of the phases and of a whole step with full-length rollouts.

    A step's generated tokens/s = completion tokens / (rollout + teacher + student + optimizer). The rollout is
    the same code on both paths and is measured once: the full-length static rollout, whose NFE (one token per
    step) equals that of a dynamic rollout of a student that commits one token per forward, as every trained
    student here does.
    """
    import statistics

    medians = {g: {k: statistics.median(v) for k, v in phases.items()} for g, phases in result["seconds"].items()}
    rollout = result["rollout_seconds"]
    step = {g: rollout + m["teacher"] + m["student"] + result["optimizer_seconds"] for g, m in medians.items()}
    base = next(iter(medians))
    table = {
        g: {
            **m,
            "step_seconds_estimate": step[g],
            "generated_tokens_per_second": result["completion_tokens"] / step[g],
            "phase_speedup": (medians[base]["teacher"] + medians[base]["student"]) / (m["teacher"] + m["student"]),
            "step_speedup": step[base] / step[g],
        }
        for g, m in medians.items()
    }
    print(f"{'length_groups':<15}{'teacher s':>11}{'student s':>11}{'phases x':>10}{'step s':>9}{'gen tok/s':>11}")
    for g, row in table.items():
        print(
            f"{g:<15}{row['teacher']:>11.2f}{row['student']:>11.2f}{row['phase_speedup']:>10.2f}"
            f"{row['step_seconds_estimate']:>9.1f}{row['generated_tokens_per_second']:>11.2f}"
        )
    return {"rollout_seconds_full_length": rollout, "paths": table}


def _gradient(trainer, batch) -> tuple[float, torch.Tensor]:
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = [p.grad.flatten().double() for p in trainer.model.parameters() if p.grad is not None]
    return loss.item(), torch.cat(grads)


def precision_fidelity(trainer, rollouts: dict, targets: dict, states) -> dict:
    """How far bf16 autocast moves what the method computes, on the same tokens and states.

    * rollout: share of completion tokens that the bf16 greedy full-length rollout writes identically;
    * teacher: mean ``KL(p_fp32 || p_bf16)`` of the teacher's targets per completion position, and how often
      their argmax agrees;
    * student: relative loss difference and cosine of the full gradient, both on fp32 targets, on one batch.
    """
    reference, mixed = rollouts[False], rollouts[True]
    mask = reference.completion_mask.bool() & mixed.completion_mask.bool()
    same_tokens = (reference.completion_ids == mixed.completion_ids)[mask].float().mean().item()
    t32, t16 = targets[False], targets[True]
    valid = t32.mask.bool()
    p32 = t32.dense_log_probs()[valid]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # hidden-state targets: bf16 applies the teacher's head so
        p16 = t16.dense_log_probs()[valid]
    kl = (p32.exp() * (p32 - p16)).sum(-1)
    argmax_agreement = (p32.argmax(-1) == p16.argmax(-1)).float().mean().item()
    batch = _loss_batch(trainer, reference, t32, states)
    losses, grads = {}, {}
    for bf16 in (False, True):
        with trainer.precision(bf16):
            losses[bf16], grads[bf16] = _gradient(trainer, batch)
    cosine = torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0).item()
    return {
        "rollout_same_token_share": same_tokens,
        "teacher_kl_mean": kl.mean().item(),
        "teacher_kl_max": kl.max().item(),
        "teacher_argmax_agreement": argmax_agreement,
        "student_loss": {"fp32": losses[False], "bf16": losses[True]},
        "student_loss_relative_difference": abs(losses[True] - losses[False]) / abs(losses[False]),
        "gradient_cosine": cosine,
        "gradient_norm_ratio": (grads[True].norm() / grads[False].norm()).item(),
    }


def run_precisions(args: argparse.Namespace) -> dict:
    """float32 against bf16 autocast, every phase of a step, interleaved ``--rounds`` times in ONE process on
    full-length rollouts (one trainer, each path under ``trainer.precision(bf16)``), and the fidelity of bf16 on the same tokens (:func:`precision_fidelity`)."""
    from opdlm_trl.data import humaneval_prompt_dataset
    from opdlm_trl.states import select_states

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dataset = humaneval_prompt_dataset("train").select(range(args.batch))
    prompts = list(args.dataset["prompt"])
    args.bf16 = True
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _build_trainer(args, output_dir)
        trainer.model.train()
        names = {False: "fp32", True: "bf16"}
        times = {name: {"rollout": [], "teacher": [], "student": []} for name in names.values()}
        rollouts, targets = {}, {}
        for _ in range(args.rounds):
            for bf16, name in names.items():
                with trainer.precision(bf16):
                    rollouts[bf16] = _timed_list(times[name]["rollout"], _full_length_rollout, trainer, prompts)
                    targets[bf16] = _timed_list(times[name]["teacher"], trainer.score, rollouts[bf16])
                    states = select_states(rollouts[bf16], "per_block", generator=torch.Generator().manual_seed(0))
                    batch = _loss_batch(trainer, rollouts[bf16], targets[bf16], states)

                    def student(batch=batch):
                        trainer.model.zero_grad(set_to_none=True)
                        trainer.compute_loss(trainer.model, batch).backward()

                    _timed_list(times[name]["student"], student)
        # both precisions' targets of the float32 tokens: the same positions, compared one to one
        for bf16 in (True, False):
            with trainer.precision(bf16):
                targets[bf16] = trainer.score(rollouts[False])
        states = select_states(rollouts[False], "per_block", generator=torch.Generator().manual_seed(0))
        fidelity = precision_fidelity(trainer, rollouts, targets, states)
        once: dict[str, float] = {}
        _timed(once, "optimizer", _optimizer_step, trainer)
    return {
        "prompt_width": int(rollouts[False].prompt_ids.shape[1]),
        "prompt_tokens": int(rollouts[False].prompt_mask.sum()),
        "completion_tokens": int(rollouts[False].completion_mask.sum()),
        "rollout_nfe": rollouts[False].nfe,
        "optimizer_seconds": once["optimizer"],
        "seconds": times,
        "fidelity": fidelity,
    }


def summarise_precisions(result: dict) -> dict:
    """Median phase times per precision; generated tokens/s of a whole step and its speed-up over float32."""
    import statistics

    medians = {p: {k: statistics.median(v) for k, v in phases.items()} for p, phases in result["seconds"].items()}
    step = {p: sum(m.values()) + result["optimizer_seconds"] for p, m in medians.items()}
    table = {
        p: {
            **m,
            "step_seconds": step[p],
            "generated_tokens_per_second": result["completion_tokens"] / step[p],
            "step_speedup": step["fp32"] / step[p],
        }
        for p, m in medians.items()
    }
    print(
        f"{'precision':<11}{'rollout s':>11}{'teacher s':>11}{'student s':>11}{'step s':>9}{'gen tok/s':>11}{'x':>7}"
    )
    for p, row in table.items():
        print(
            f"{p:<11}{row['rollout']:>11.2f}{row['teacher']:>11.2f}{row['student']:>11.2f}"
            f"{row['step_seconds']:>9.1f}{row['generated_tokens_per_second']:>11.2f}{row['step_speedup']:>7.2f}"
        )
    print("fidelity of bf16:", json.dumps(result["fidelity"], indent=1))
    return {"paths": table, "fidelity": result["fidelity"]}


# ------------------------------------------------------------------------------------------------- driver
def _spawn(mode: str, args: argparse.Namespace, rows_path: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", mode, "--rows", rows_path, "--model-dir", args.model_dir,
        "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--block-size", str(args.block_size),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads or 0),
        "--max-prompt-length", str(args.max_prompt_length), "--length-groups", str(args.length_groups),
        *(["--full-finetune"] if args.full_finetune else []),
        *(["--bf16"] if args.bf16 else []),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(opd: dict, sft: dict) -> dict:
    mean = opd["mean_seconds"]
    shares = {phase: mean[phase] / mean["total"] for phase in PHASES}
    dominant = max(PHASES, key=lambda phase: mean[phase])
    peak_ratio = opd["peak_rss_mib"] / sft["peak_rss_mib"]
    growth_opd = opd["peak_rss_mib"] - opd["rss_after_load_mib"]
    growth_sft = sft["peak_rss_mib"] - sft["rss_after_load_mib"]
    return {
        "opd_step_seconds": mean["total"],
        "sft_step_seconds": sft["mean_seconds"]["total"],
        "phase_share": shares,
        "dominant_phase": dominant,
        "rollout_share": shares["rollout"],
        "rollout_target_met": shares["rollout"] <= TARGET_ROLLOUT_SHARE,
        "peak_rss_ratio": peak_ratio,
        "memory_target_met": peak_ratio <= TARGET_MEMORY_RATIO,
        "step_memory_growth_mib": {"opd": growth_opd, "sft": growth_sft},
    }


def generated_tokens_per_second(run: dict) -> float:
    """Rollout tokens of the measured steps over their wall time: the throughput a training run sees."""
    return sum(s["generated_tokens"] for s in run["steps"]) / sum(s["total"] for s in run["steps"])


def compare_paths(paths: dict[int, dict]) -> dict:
    """Generated tokens/s and phase times per ``length_groups`` value, and the speed-up over the first one."""
    first = next(iter(paths))
    base = generated_tokens_per_second(paths[first])
    table = {
        str(groups): {
            "generated_tokens_per_second": generated_tokens_per_second(run),
            "speedup": generated_tokens_per_second(run) / base,
            "mean_seconds": run["mean_seconds"],
            "generated_tokens_per_step": sum(s["generated_tokens"] for s in run["steps"]) / len(run["steps"]),
        }
        for groups, run in paths.items()
    }
    print(f"\n{'length_groups':<15}{'gen tok/s':>11}{'speed-up':>10}" + "".join(f"{p:>11}" for p in PHASES))
    for groups, row in table.items():
        phases = "".join(f"{row['mean_seconds'][p]:>11.2f}" for p in PHASES)
        print(f"{groups:<15}{row['generated_tokens_per_second']:>11.2f}{row['speedup']:>10.2f}{phases}")
    return table


def print_table(opd: dict, sft: dict, summary: dict) -> None:
    mean = opd["mean_seconds"]
    print(f"{'phase':<12}{'OPD s':>10}{'share':>9}{'SFT s':>10}")
    for phase in PHASES:
        sft_value = sft["mean_seconds"].get(phase, 0.0)
        print(f"{phase:<12}{mean[phase]:>10.3f}{summary['phase_share'][phase]:>9.1%}{sft_value:>10.3f}")
    print(f"{'total':<12}{mean['total']:>10.3f}{1:>9.0%}{sft['mean_seconds']['total']:>10.3f}")
    print()
    print(f"{'memory (MiB)':<24}{'OPD':>10}{'SFT':>10}{'ratio':>8}")
    for key, label in (("rss_after_load_mib", "RSS after load"), ("peak_rss_mib", "peak RSS during steps")):
        print(f"{label:<24}{opd[key]:>10.0f}{sft[key]:>10.0f}{opd[key] / sft[key]:>8.3f}")
    growth = summary["step_memory_growth_mib"]
    print(f"{'growth over load':<24}{growth['opd']:>10.0f}{growth['sft']:>10.0f}")
    print()
    print(
        f"rollout share {summary['rollout_share']:.1%} (target <= {TARGET_ROLLOUT_SHARE:.0%}: "
        f"{'met' if summary['rollout_target_met'] else 'NOT met'}); peak RSS ratio {summary['peak_rss_ratio']:.3f} "
        f"(target <= {TARGET_MEMORY_RATIO}: {'met' if summary['memory_target_met'] else 'NOT met'}); "
        f"dominant phase: {summary['dominant_phase']}"
    )


def _cpu_bf16() -> str:
    """The CPU's bf16 instructions, recorded with every result: bf16 timings mean nothing without them (2x faster
    with avx512_bf16, 10x slower without)."""
    from opdlm_trl.precision import cpu_bf16_support

    return cpu_bf16_support().describe()


def _smoke_model_dir(directory: str) -> str:
    from opdlm_trl.tiny import save_tiny_pair

    return save_tiny_pair(directory, "llama", hidden_size=64, num_heads=4)


def _paths_main(args: argparse.Namespace) -> dict:
    """``--compare-groups A B --rounds R``: the interleaved in-process comparison, JSON out."""
    if not args.compare_groups and not args.compare_precision:
        raise SystemExit("--rounds needs --compare-groups (e.g. --compare-groups 0 4) or --compare-precision.")
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            args.model_dir = _smoke_model_dir(os.path.join(scratch, "tiny"))
            args.new_tokens, args.max_prompt_length = 8, 64
        elif args.model_dir is None:
            from opdlm_trl.data import default_model_dir

            args.model_dir = default_model_dir()
        result = run_precisions(args) if args.compare_precision else run_paths(args)
    summary = summarise_precisions(result) if args.compare_precision else summarise_paths(result)
    payload = {"shape": {k: getattr(args, k) for k in ("model_dir", "batch", "new_tokens", "full_finetune")}}
    payload.update(result=result, summary=summary, machine={"cpus": os.cpu_count(), "cpu_bf16": _cpu_bf16()})
    payload["shape"]["threads"] = torch.get_num_threads()
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(payload, indent=2))
    return payload


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="an autoregressive checkpoint (default: the embedded SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts keep their last tokens")
    parser.add_argument("--full-finetune", action="store_true", help="full fine-tune + frozen local teacher copy")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 mixed precision (OPDConfig.bf16: autocast, float32 master weights); on a CPU without bf16 "
        "instructions the trainer warns (emulated bf16: ~10x slower). `python -m opdlm_trl.precision --use-cpu` "
        "says which precision this machine should use.",
    )
    parser.add_argument("--length-groups", type=int, default=4, help="OPDConfig.length_groups of the OPD run")
    parser.add_argument(
        "--compare-groups", type=int, nargs="+", help="run OPD once per value side by side, e.g. 0 4 (0 = old path)"
    )
    parser.add_argument(
        "--compare-precision",
        action="store_true",
        help="with --rounds: float32 against bf16 autocast, every phase of a step, plus bf16's fidelity",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="with --compare-groups: measure only the phases the paths change, interleaved this many times in one "
        "process on one fixed full-length rollout (robust on a shared machine)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 1 step, 8 tokens (seconds)")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--worker", choices=["opd", "sft"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.mode = args.worker
        print(json.dumps(run_worker(args)))
        return None
    if args.rounds:
        return _paths_main(args)
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            args.model_dir = _smoke_model_dir(os.path.join(scratch, "tiny"))
            args.steps, args.warmup, args.new_tokens, args.max_prompt_length = 1, 0, 8, 64
        elif args.model_dir is None:
            from opdlm_trl.data import default_model_dir

            args.model_dir = default_model_dir()
        rows_path = os.path.join(scratch, "rows.pt")
        paths = {}
        for groups in args.compare_groups or []:  # the previous path (0) and the grouped one, same prompts and seed
            args.length_groups = groups
            paths[groups] = _spawn("opd", args, rows_path)
        args.length_groups = args.compare_groups[-1] if args.compare_groups else args.length_groups
        opd = paths.get(args.length_groups) or _spawn("opd", args, rows_path)
        sft = _spawn("sft", args, rows_path)
    summary = summarise(opd, sft)
    print_table(opd, sft, summary)
    if paths:
        summary["paths"] = compare_paths(paths)
    payload = {
        "shape": {
            k: getattr(args, k)
            for k in ("model_dir", "batch", "new_tokens", "block_size", "max_prompt_length", "steps", "smoke")
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_bf16": _cpu_bf16(),
        },
        "opd": opd,
        "sft": sft,
        "summary": summary,
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
