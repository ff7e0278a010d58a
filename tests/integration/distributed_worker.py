"""One OPD optimisation step on a tiny model, run by every process that ``tests/integration/test_distributed.py`` launches.

The same script runs as one process (the reference) and under ``accelerate launch`` as two gloo processes (DDP,
DeepSpeed ZeRO-2 or ZeRO-3, chosen by the launcher's config). It trains one step per loss normalisation, each from the same fresh
model, and rank 0 writes what it measured to ``--out`` (JSON) and the student's parameters after each step to
``<out>.<normalization>.pt`` (``{name: (before, after)}``).

Why these settings make the step a deterministic function of the global batch, however it is split:

* ``temperature=0`` and ``steps_per_block=1``: the rollout is greedy and each block is decoded in one step, so every
  block has a single visited state and the state selection (random in general) has nothing left to choose.
* Extra stop tokens (:func:`add_uneven_stops`) end the rows at different lengths; otherwise every row of a random
  tiny model runs to the length limit and the per-sequence and per-token normalisations coincide, so a wrong
  cross-process normaliser could not show.
* AdamW with ``adam_epsilon`` far above every gradient entry: Adam's first update is ``lr * g / (|g| + eps)``, i.e.
  ``lr * sign(g)`` with the default epsilon, which would hide a wrong gradient scale (a missing
  ``1 / num_processes``, say). With a large epsilon the update is proportional to the gradient, so the parameters
  after the step check the gradient itself. (DeepSpeed ZeRO refuses plain SGD.)
* ``max_grad_norm`` far above the measured norm: the norm is computed and logged, nothing is clipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile

import torch
from accelerate.utils import gather_object
from datasets import Dataset

from opdlm_trl import OPDConfig, OPDTrainer
from opdlm_trl.sampling import DiffusionSampler
from opdlm_trl.tiny import tiny_model, tiny_tokenizer
from tests.helpers import cpu_config

# The fifth prompt is never trained (one step of 4, no shuffling): it leaves a remainder (5 % 4) in the dataset, the
# case in which accelerate's gather_for_metrics truncates what it gathers on the last batch.
PROMPTS = ("def add(a, b):", "The quick brown fox", "for i in range(10):", "What is two plus two?", "class Stack:")
COMPLETION_LENGTH = 12
LEARNING_RATE = 1e-2
ADAM_EPSILON = 1.0
STOP_AT = {0: 4, 2: 8}  # prompt index -> completion position whose greedy token becomes an extra stop id
# --sharp: rank 0's rows (prompts 0 and 1 at 2 per device) stop at their first token, rank 1's run to the limit.
SHARP_STOP_AT = {0: 0, 1: 0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="JSON file written by rank 0; parameters go to <out>.<norm>.pt")
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--normalizations", nargs="+", default=["sequence", "token"])
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--seed", type=int, default=2, help="Seed of the tiny model's random weights.")
    parser.add_argument("--sharp", action="store_true", help="Rollouts of very different lengths (SHARP_STOP_AT).")
    parser.add_argument("--teacher-chunk-size", type=int, default=1024, help="Positions per teacher head chunk.")
    parser.add_argument(
        "--sharded-generation", action="store_true", help="ds3_gather_for_generation=False (ZeRO-3 forwards gather)."
    )
    return parser.parse_args()


def build_config(args: argparse.Namespace, normalization: str, output_dir: str) -> OPDConfig:
    # cpu_config's use_cpu: with WORLD_SIZE > 1 (accelerate launch --multi_gpu / torchrun), MULTI_CPU over gloo.
    return cpu_config(
        output_dir,
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=LEARNING_RATE,
        adam_epsilon=ADAM_EPSILON,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1e6,
        shuffle_dataset=False,  # the batch is the first four prompts, split in order over the ranks
        block_size=4,
        remasking="static",
        steps_per_block=1,
        temperature=0.0,
        max_completion_length=COMPLETION_LENGTH,
        loss_normalization=normalization,
        teacher_backend="local",
        teacher_chunk_size=args.teacher_chunk_size,
        ds3_gather_for_generation=not args.sharded_generation,
    )


def skip_deepspeed_shm_kernel() -> None:
    """Use plain gloo collectives under DeepSpeed instead of its shared-memory C++ kernel.

    DeepSpeed's CPU backend JIT-compiles that kernel on first use (~3.5 min on 2 cores, cached afterwards in
    ``~/.cache/torch_extensions``); it only speeds up intra-node all-reduce and changes no ZeRO logic.
    """
    try:
        import deepspeed.comm.torch as ds_torch
    except ImportError:
        return
    ds_torch.build_shm_op = lambda: None


@torch.no_grad()
def add_uneven_stops(trainer: OPDTrainer, stop_at: dict[int, int]) -> None:
    """Make the tokens the untrained student writes at ``stop_at`` extra stop ids (same choice on every rank)."""
    sampler = DiffusionSampler(trainer.sampler_config(COMPLETION_LENGTH), pad_token_id=trainer._tokenizer.pad_token_id)
    rollout = sampler.sample(trainer.model, trainer.prompt_token_lists(list(PROMPTS)))
    extra = {int(rollout.completion_ids[row, position]) for row, position in stop_at.items()}
    trainer.eos_token_ids = [*trainer.eos_token_ids, *sorted(extra - set(trainer.eos_token_ids))]


class Recorder:
    """Keeps this process's exact training loss and rollouts (the logged loss is already a cross-rank mean)."""

    def __init__(self, trainer: OPDTrainer):
        self.losses: list[float] = []
        self.completions: dict[str, list[int]] = {}
        self._compute_loss = trainer.compute_loss
        self._generate = trainer._generate_and_score_completions
        trainer.compute_loss = self.compute_loss
        trainer._generate_and_score_completions = self.generate

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = self._compute_loss(model, inputs, *args, **kwargs)
        self.losses.append(float(loss.detach()))
        return loss

    def generate(self, inputs):
        batch = self._generate(inputs)
        masks = batch["loss_mask"].bool()
        for example, ids, mask in zip(inputs, batch["completion_ids"], masks, strict=True):
            self.completions[example["prompt"]] = ids[mask].tolist()
        return batch


def full_parameters(trainer: OPDTrainer) -> dict[str, torch.Tensor]:
    """The student's parameters as full tensors (ZeRO-3 keeps only a shard on each rank: gather them first)."""
    student = trainer.accelerator.unwrap_model(trainer.model)
    gather = contextlib.nullcontext()
    if trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(student.parameters()))
    with gather:
        return {name: p.detach().cpu().clone() for name, p in student.named_parameters()}


def train_one_step(args: argparse.Namespace, model, normalization: str, output_dir: str) -> tuple[OPDTrainer, dict]:
    dataset = Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS])
    config = build_config(args, normalization, output_dir)
    trainer = OPDTrainer(model=model, args=config, train_dataset=dataset, processing_class=tiny_tokenizer())
    add_uneven_stops(trainer, SHARP_STOP_AT if args.sharp else STOP_AT)
    recorder = Recorder(trainer)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    losses = gather_object([recorder.losses])
    completions = gather_object([recorder.completions])
    after = full_parameters(trainer)  # collective under ZeRO-3: every rank takes part
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    engine_optimizer = getattr(trainer.model_wrapped, "optimizer", None)
    result = {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "zero_stage": trainer.model_wrapped.zero_optimization_stage() if trainer.is_deepspeed_enabled else None,
        "optimizer": type(engine_optimizer).__name__ if trainer.is_deepspeed_enabled else None,
        "logged_loss": logged["loss"],
        "grad_norm": logged.get("grad_norm"),
        "divergence": logged.get("divergence"),
        "supervised_per_row": logged.get("supervised_per_row"),
        "stopped_ratio": logged.get("rollout/stopped_ratio"),
        "flops": logged.get("flops"),
        "rank_losses": [loss for rank in losses for loss in rank],
        "supervised_tokens": {prompt: ids for rank in completions for prompt, ids in rank.items()},
    }
    if trainer.accelerator.is_main_process:
        torch.save({name: (before[name], after[name]) for name in after}, f"{args.out}.{normalization}.pt")
    return trainer, result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    skip_deepspeed_shm_kernel()
    # Every model is built before the first trainer: once a ZeRO-3 trainer exists, transformers builds new models
    # already sharded (deepspeed.zero.Init), as it would for any model loaded after the trainer.
    models = {normalization: tiny_model(args.arch, seed=args.seed) for normalization in args.normalizations}
    results = {}
    for normalization, model in models.items():
        with tempfile.TemporaryDirectory() as output_dir:
            trainer, results[normalization] = train_one_step(args, model, normalization, output_dir)
        trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
