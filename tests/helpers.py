"""The one CPU test configuration and the trainer helpers the unit tests, integration tests and worker scripts share.

A plain module rather than conftest.py because the worker scripts the integration tests launch as subprocesses
(``tests/integration/*_worker.py``) import it too (their launchers put the repo root on ``PYTHONPATH``; pytest gets
it from ``pythonpath`` in pyproject.toml); conftest.py does not import it, so a run of tests that need no trainer
skips TRL's import time.

``cpu_config(output_dir, **overrides)`` is the canonical test run: CPU, float32, nothing logged or saved, seeded, a
tiny model's two steps of four 8-token rollouts. A test that depends on a value passes it as an override even where
it equals the default here, so a change of the default cannot silently change what the test proves.

Accelerate keeps its configuration in process-wide singletons (``PartialState``, ``AcceleratorState``,
``GradientState``) that every trainer reads at use time (``accelerator.autocast()`` builds ``AcceleratorState()``),
and transformers empties them whenever a new config sets up its device. A trainer shared by several tests (a
module-scoped fixture) is therefore valid only while the state it was built with is in place: such fixtures keep
``accelerate_state()`` next to their trainer and put it back with ``restore_accelerate_state`` for each test, and
conftest.py empties it after every test, as accelerate's own test cases do, so no test depends on what ran before.
"""

from __future__ import annotations

import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from datasets import Dataset

from opdlm_trl.config import OPDConfig
from opdlm_trl.sampling import DiffusionSampler, Rollout
from opdlm_trl.states import select_states
from opdlm_trl.tiny import tiny_model, tiny_tokenizer
from opdlm_trl.trainer import OPDTrainer

PROMPTS = [[{"role": "user", "content": f"def add{i}(a, b):"}] for i in range(4)]

# Where and how a test run executes: CPU in float32, no reporting, no checkpoints, no progress bar, seed 0.
CPU_RUN = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
# How much it does: two optimizer steps of four 8-token rollouts, every step logged, a learning rate that moves a
# tiny model visibly, and no gradient checkpointing (recomputation only costs time at this size).
TINY_RUN = dict(
    per_device_train_batch_size=4,
    max_steps=2,
    logging_steps=1,
    max_completion_length=8,
    learning_rate=1e-3,
    gradient_checkpointing=False,
)


def cpu_config(output_dir, config_class=OPDConfig, **overrides):
    """The canonical CPU test config (``CPU_RUN`` + ``TINY_RUN``) of ``config_class``; ``overrides`` win."""
    return config_class(output_dir=str(output_dir), **{**CPU_RUN, **TINY_RUN, **overrides})


def prompt_dataset(n: int = 4) -> Dataset:
    return Dataset.from_list([{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n)])


def make_trainer(output_dir, model=None, peft_config=None, dataset=None, teacher_model=None, **overrides):
    """An OPDTrainer of ``cpu_config`` on a fresh tiny Llama (or ``model``) over ``PROMPTS``."""
    return OPDTrainer(
        model if model is not None else tiny_model("llama"),
        teacher_model=teacher_model,
        args=cpu_config(output_dir, **overrides),
        train_dataset=dataset if dataset is not None else prompt_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
    )


def roll_out(trainer: OPDTrainer, seed: int = 0, record: bool = False) -> tuple[Rollout, DiffusionSampler]:
    """One rollout of ``PROMPTS`` with the trainer's own sampler settings, seeded (optionally recording logits)."""
    config = trainer.sampler_config(trainer.current_completion_length())
    sampler = DiffusionSampler(config, pad_token_id=trainer._tokenizer.pad_token_id, record_logits=record)
    rollout = trainer.rollout(PROMPTS, sampler=sampler, generator=torch.Generator().manual_seed(seed))
    return rollout, sampler


def score(trainer: OPDTrainer, rollout: Rollout, top_k: int | None):
    return trainer.teacher.score(
        rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, top_k=top_k
    )


def fixed_batch(trainer: OPDTrainer, rollout: Rollout, selection: str = "per_block", seed: int = 0, top_k=None):
    """The trainer's training batch for a rollout with seeded state selection; returns ``(batch, states)``."""
    states = select_states(rollout, selection, generator=torch.Generator().manual_seed(seed))
    return trainer.training_batch(rollout, score(trainer, rollout, top_k), states).to_dict(), states


def eval_loss(trainer: OPDTrainer, batch: dict) -> float:
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


ACCELERATE_SINGLETONS = (PartialState, AcceleratorState, GradientState)


def accelerate_state() -> tuple[dict, ...]:
    """A copy of accelerate's process-wide state, as the trainers built last left it."""
    return tuple(dict(singleton._shared_state) for singleton in ACCELERATE_SINGLETONS)


def restore_accelerate_state(saved: tuple[dict, ...]) -> None:
    """Put back a copy taken by ``accelerate_state``, in place: every Accelerator holds these very dicts."""
    for singleton, state in zip(ACCELERATE_SINGLETONS, saved, strict=True):
        singleton._shared_state.clear()
        singleton._shared_state.update(state)
