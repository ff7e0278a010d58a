"""Peak memory of one OPD step at Qwen3-0.6B's real widths (151,936-token vocabulary, hidden 1,024), reduced depth.

Not a test: writes JSON (one file per cell, so an interrupted run resumes where it stopped) and prints a table.
Each cell (depth x rollout length x code path) runs in a fresh subprocess and measures, with the kernel's own peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each phase; glibc's mmap threshold is pinned
so freed tensors leave the resident set):

* ``teacher``: the local teacher scores a generation batch of 8 rows (``per_device_train_batch_size`` 2 x gradient
  accumulation 4) of full-vocabulary targets; ``held_targets_bytes`` is what the batch keeps until the last
  micro-batch's loss (the issue's 19.4 GB at 4,000 tokens on the previous code path);
* ``loss``: ``compute_loss`` of one micro-batch (2 rows, ``[prompt | x0 | x_t]``, gradient checkpointing on);
* ``backward``: its backward;
* ``rollout``: the real sampler decoding the 8 prompts for ``--rollout-tokens`` tokens (the KV cache grows linearly
  with the rollout; the table's model extrapolates it).

The rollout is synthetic for the other phases (random committed tokens, every block half masked), which changes no
shape. ``--previous-code DIR`` runs the same cells against another checkout of the package (e.g. ``git worktree add
/tmp/prev <commit>``) for a side-by-side: the previous code path held ``(B, C, V)`` float32 targets.

    python benchmarks/memory.py --out benchmarks/out/memory                          # depth 2 and 4, 500 -> 4,000
    python benchmarks/memory.py --out OUT --previous-code /tmp/prev --lengths 500 1000  # side by side
    python benchmarks/memory.py --out OUT --smoke                                    # tiny widths, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Qwen3-0.6B's widths, written out rather than taken from opdlm_trl.tiny.qwen3_config: --previous-code runs this
# script against older checkouts of the package, which may predate that helper (a test checks the two agree).
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, heads=16, kv_heads=8, head_dim=128, vocab=151936)
SMOKE = dict(hidden_size=64, intermediate_size=128, heads=4, kv_heads=2, head_dim=16, vocab=4096)
GENERATION_BATCH, MICRO_BATCH, PROMPT_TOKENS, BLOCK = 8, 2, 128, 4
PHASES = ("rollout", "teacher", "loss", "backward")


# ------------------------------------------------------------------------------------------------- measuring
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Phase:
    """Peak resident set above the phase's start (MiB), from the kernel's high-water mark."""

    def __init__(self, name: str, record: dict):
        self.name, self.record = name, record

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        self.start_kib, self.t0 = _status_kib("VmRSS"), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.record[self.name] = {
            "peak_above_start_mib": (_status_kib("VmHWM") - self.start_kib) / 1024,
            "end_above_start_mib": (_status_kib("VmRSS") - self.start_kib) / 1024,  # what the phase leaves alive
            "seconds": time.perf_counter() - self.t0,
        }


# ------------------------------------------------------------------------------------------------- one cell
def _model(shape: dict, layers: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        tie_word_embeddings=True,
        max_position_embeddings=16384,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def _synthetic_batch(trainer, length: int, generator):
    """A generation batch as the trainer builds it: prompts, committed tokens, half of every block masked."""
    import torch

    vocab = len(trainer.processing_class) - 8  # ordinary tokens of the tiny tokenizer
    prompt_ids = torch.randint(8, vocab, (GENERATION_BATCH, PROMPT_TOKENS), generator=generator)
    completion = torch.randint(8, vocab, (GENERATION_BATCH, length), generator=generator)
    ones = torch.ones_like(completion)
    noise = torch.rand(completion.shape, generator=generator).view(GENERATION_BATCH, -1, BLOCK)
    masked = (noise.argsort(-1) < BLOCK // 2).view_as(completion)
    noisy = completion.masked_fill(masked, trainer.settings.mask_token_id)
    return prompt_ids, torch.ones_like(prompt_ids), completion, ones, noisy, masked


def _tensor_bytes(targets) -> int:
    import torch

    return sum(v.nbytes for v in vars(targets).values() if isinstance(v, torch.Tensor))


def run_cell(shape: dict, layers: int, length: int, rollout_tokens: int, threads: int) -> dict:
    import torch
    from datasets import Dataset

    from opdlm_trl import OPDConfig, OPDTrainer
    from opdlm_trl.batch import TrainingBatch
    from opdlm_trl.sampling import DiffusionSampler
    from opdlm_trl.tiny import tiny_tokenizer

    torch.set_num_threads(threads)
    record: dict = {"phases": {}}
    args = OPDConfig(
        output_dir="/tmp/opdlm-memory",
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=True,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GENERATION_BATCH // MICRO_BATCH,
        max_completion_length=length,
        block_size=BLOCK,
        teacher_top_k=None,
        length_groups=0,
    )
    prompts = Dataset.from_list([{"prompt": "def f(x):"}] * GENERATION_BATCH)
    trainer = OPDTrainer(_model(shape, layers), args=args, train_dataset=prompts, processing_class=tiny_tokenizer())
    model = trainer.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    generator = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask, completion, completion_mask, noisy, masked = _synthetic_batch(trainer, length, generator)

    if rollout_tokens:
        config = trainer.sampler_config(rollout_tokens)
        sampler = DiffusionSampler(config, pad_token_id=trainer.processing_class.pad_token_id)
        model.eval()
        with Phase("rollout", record["phases"]), torch.no_grad():
            sampler.sample(model, prompt_ids.tolist())
        record["rollout_tokens"] = rollout_tokens
    with Phase("teacher", record["phases"]):
        targets = trainer.teacher.score(prompt_ids, prompt_mask, completion, completion_mask, top_k=None)
    record["held_targets_bytes"] = _tensor_bytes(targets)
    batch = TrainingBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        clean_ids=completion,
        noisy_ids=noisy,
        completion_key_mask=completion_mask,
        loss_mask=masked.long(),
        completion_ids=completion,
    ).with_targets(targets)
    # the whole generation batch's divisor; a --previous-code checkout may predate the field's current name
    divisor = "normaliser" if hasattr(batch, "normaliser") else "num_items_in_batch"
    setattr(batch, divisor, torch.tensor(float(GENERATION_BATCH)))
    micro = {k: (v[:MICRO_BATCH] if v.dim() else v) for k, v in batch.to_dict().items()}
    del targets, batch
    model.train()
    with Phase("loss", record["phases"]):
        loss = trainer.compute_loss(model, micro)
    with Phase("backward", record["phases"]):
        loss.backward()
    record["loss"] = float(loss.detach())
    record["supervised_positions"] = int(micro["loss_mask"].sum())
    return record


# ------------------------------------------------------------------------------------------------- driver
def _cell_path(out: Path, code: str, layers: int, length: int) -> Path:
    return out / f"{code}-L{layers}-T{length}.json"


def _launch_cell(args, code: str, package: Path, layers: int, length: int) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(package), str(ROOT)]),
        "MALLOC_MMAP_THRESHOLD_": "131072",  # freed tensors leave the resident set (fixed, not glibc's adaptive one)
        "TOKENIZERS_PARALLELISM": "false",
    }
    rollout = args.rollout_tokens if length == min(args.lengths) and code == "current" else 0
    command = [
        sys.executable, __file__, "--cell", json.dumps([layers, length, rollout]), "--threads", str(args.threads),
        *(["--smoke"] if args.smoke else []),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "memory")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--rollout-tokens", type=int, default=64, help="Sampler length of the rollout phase.")
    parser.add_argument("--previous-code", type=Path, help="Another checkout of the package, run side by side.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="Tiny widths and lengths (seconds).")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = SMOKE if args.smoke else QWEN3_0_6B
    if args.cell:
        layers, length, rollout = json.loads(args.cell)
        print(json.dumps(run_cell(shape, layers, length, rollout, args.threads)))
        return
    if args.smoke:
        args.layers, args.lengths, args.rollout_tokens = [1, 2], [16, 32], 8
    args.lengths = [-(-length // BLOCK) * BLOCK for length in args.lengths]  # whole blocks, as the sampler decodes
    args.out.mkdir(parents=True, exist_ok=True)
    codes = {"current": ROOT, **({"previous": args.previous_code.resolve()} if args.previous_code else {})}
    for layers in args.layers:
        for length in args.lengths:
            for code, package in codes.items():
                path = _cell_path(args.out, code, layers, length)
                if path.exists() and "error" not in json.loads(path.read_text()):
                    continue  # resume: a finished cell is never rerun (a failed one is)
                if args.smoke and code == "current":  # tiny widths: one process is accurate enough, and fast
                    rollout = args.rollout_tokens if length == min(args.lengths) else 0
                    result = run_cell(shape, layers, length, rollout, args.threads)
                else:
                    result = _launch_cell(args, code, package, layers, length)
                result.update(code=code, layers=layers, length=length, shape=shape, generation_batch=GENERATION_BATCH)
                path.write_text(json.dumps(result, indent=1))
                print(_row(result), flush=True)
    summary = [json.loads(p.read_text()) for p in sorted(args.out.glob("*-L*-T*.json"))]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(summary)} cells in {args.out / 'summary.json'}")


def _row(result: dict) -> str:
    if "error" in result:
        return f"{result['code']:>8} L{result['layers']} T{result['length']}: FAILED {result['error'][-300:]}"
    phases = "  ".join(f"{k} {v['peak_above_start_mib']:8.0f} MiB" for k, v in result["phases"].items())
    held = result["held_targets_bytes"] / 2**20
    return f"{result['code']:>8} L{result['layers']} T{result['length']:>5}: held targets {held:9.1f} MiB  {phases}"


if __name__ == "__main__":
    main()
