"""A short OPD run on a tiny model that kills itself with SIGKILL at a chosen point; ``tests/integration/test_checkpoints.py``
runs it in a subprocess and resumes what it left behind.

``build_trainer`` is also imported by the test, so the killed run, the resumed run and the uninterrupted reference
are the same configuration: 6 steps over 12 distinct prompts in batches of 4 (3 steps per epoch) with a checkpoint every
2 steps, so a resume from ``checkpoint-2`` restarts mid-epoch and then crosses an epoch boundary, and one from
``checkpoint-4`` skips a whole epoch (the case in which TRL's sampler alone would replay epoch 0's order). Rollouts sample at
temperature 1 and the state selection draws at random, both from the global torch RNG, so the resumed run repeats
the reference only if the RNG state *and* the data order are restored.

Kill points (``--kill``):

* ``after_step``: at the end of optimizer step ``--kill_step``, between two checkpoints.
* ``while_saving``: inside the save of ``checkpoint-<kill_step>``, after the weights, optimizer and scheduler are
  written and before the RNG state and ``trainer_state.json`` (the state a real kill mid-save leaves).
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from datasets import Dataset
from transformers import TrainerCallback

from opdlm_trl import OPDTrainer
from opdlm_trl.tiny import tiny_model, tiny_tokenizer
from tests.helpers import cpu_config

PROMPTS = [[{"role": "user", "content": f"def f{i}(x):"}] for i in range(12)]
MAX_STEPS = 6
SAVE_STEPS = 2


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            _kill_self()


class KilledWhileSaving(OPDTrainer):
    """Dies where ``Trainer._save_checkpoint`` writes the RNG state of checkpoint ``kill_step``."""

    kill_step = -1

    def _save_rng_state(self, output_dir):
        if self.state.global_step == self.kill_step:
            _kill_self()
        super()._save_rng_state(output_dir)


def build_trainer(output_dir: str, trainer_class=OPDTrainer, **overrides) -> OPDTrainer:
    """The run under test: full fine-tune of a tiny Llama, sampled rollouts, checkpoints every 2 steps."""
    settings = dict(max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS, gradient_checkpointing=True)
    return trainer_class(
        tiny_model("llama"),
        args=cpu_config(output_dir, **{**settings, **overrides}),
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS]),
        processing_class=tiny_tokenizer(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--kill", choices=("after_step", "while_saving"), required=True)
    parser.add_argument("--kill_step", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: the parent's, for bitwise results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kill == "while_saving":
        KilledWhileSaving.kill_step = args.kill_step
        trainer = build_trainer(args.output_dir, trainer_class=KilledWhileSaving)
    else:
        trainer = build_trainer(args.output_dir)
        trainer.add_callback(KillAfterStep(args.kill_step))
    trainer.train()
    raise SystemExit("the run was not killed")


if __name__ == "__main__":
    main()
