"""Resuming interrupted runs: which checkpoint is safe to resume from, and what a resume must repeat.

A run killed while transformers writes ``checkpoint-N`` (SIGKILL, pre-emption, out of memory) leaves a directory
that looks like a checkpoint but lacks some of its files. transformers' own ``get_last_checkpoint`` picks it anyway
(it only looks at directory names), and ``Trainer.train`` then fails on the missing ``trainer_state.json`` or,
worse, silently restarts the optimizer, scheduler or RNG when *their* files are missing. This module decides
completeness from the files a resume reads, so the newest checkpoint that can actually be resumed is used and an
explicitly named incomplete one is refused with the missing file in the message.

``trainer_state.json`` is written last by ``Trainer._save_checkpoint`` (after the weights, optimizer, scheduler
and RNG state), so it is the commit marker; the other checks catch checkpoints cut short by other writers or
pruned by hand.

The second half keeps the data order of a resumed run identical to an uninterrupted one: TRL's ``RepeatSampler``
draws one permutation per epoch from a single seeded stream, and transformers does not replay the epochs it skips
on resume, so without :class:`ResumableRepeatSampler` a run resumed at epoch ``e`` would see epoch 0's order again.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from ._trl import RepeatSampler

__all__ = [
    "IncompleteCheckpointError",
    "ResumableRepeatSampler",
    "check_checkpoint",
    "last_complete_checkpoint",
    "missing_checkpoint_files",
    "resolve_resume_checkpoint",
    "resumable_sampler",
]

logger = logging.getLogger(__name__)

_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE = TRAINER_STATE_NAME
_ADAPTER_WEIGHTS = (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
_WEIGHTS = (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, *_ADAPTER_WEIGHTS)
_WEIGHT_INDEXES = (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
_OPTIMIZERS = (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN)
_SCHEDULER = SCHEDULER_NAME
# Values of `--resume_from_checkpoint` (a string on the command line) that mean "the newest complete one" / "none".
_LAST = ("true", "last", "yes", "1")
_NONE = ("false", "no", "none", "0", "")


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint directory lacks a file that resuming from it needs."""


def _subdirs(path: str) -> list[str]:
    return [name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name))]


def _has_deepspeed_state(path: str) -> bool:
    """DeepSpeed keeps weights and optimizer shards in ``global_step*/`` (ZeRO-3 may write no full weights)."""
    return any(name.startswith("global_step") for name in _subdirs(path))


def _missing_shards(path: str) -> list[str]:
    """Shards listed by a sharded-weights index that are not on disk (a kill between two shard writes)."""
    missing = []
    for index in _WEIGHT_INDEXES:
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as handle:
                    shards = set(json.load(handle)["weight_map"].values())
            except (OSError, ValueError, KeyError):
                return [f"{index} (unreadable)"]
            missing += sorted(shard for shard in shards if not os.path.isfile(os.path.join(path, shard)))
    return missing


def _weights_missing(path: str) -> list[str]:
    names = set(os.listdir(path))
    subdirs = _subdirs(path)
    has_weights = (
        bool(names.intersection(_WEIGHTS + _WEIGHT_INDEXES))
        or "pytorch_model_fsdp.bin" in names
        or any("pytorch_model_fsdp" in name for name in subdirs)
        or _has_deepspeed_state(path)
        # peft with several adapters saves each in its own sub-directory
        or any(os.path.isfile(os.path.join(path, sub, w)) for sub in subdirs for w in _ADAPTER_WEIGHTS)
    )
    if not has_weights:
        return ["model weights (model.safetensors, pytorch_model.bin, adapter_model.safetensors or a sharded index)"]
    return _missing_shards(path)


def _training_state_missing(path: str) -> list[str]:
    """Optimizer, scheduler and RNG files: without them transformers resumes *silently* from fresh states."""
    names = set(os.listdir(path))
    deepspeed = _has_deepspeed_state(path)
    missing = []
    has_optimizer = names.intersection(_OPTIMIZERS) or deepspeed or any("optimizer" in s for s in _subdirs(path))
    if not has_optimizer:
        missing.append(OPTIMIZER_NAME)
    if _SCHEDULER not in names and not deepspeed:  # a DeepSpeed-owned scheduler lives in global_step*/
        missing.append(_SCHEDULER)
    if not any(name == "rng_state.pth" or re.fullmatch(r"rng_state_\d+\.pth", name) for name in names):
        missing.append("rng_state.pth")
    return missing


def missing_checkpoint_files(path: str | os.PathLike, args=None) -> list[str]:
    """What a resume from ``path`` would need and does not find (empty list: the checkpoint is complete).

    Args:
        path: a ``checkpoint-N`` directory.
        args: the ``TrainingArguments`` of the run that will resume; with ``save_only_model=True`` only the trainer
            state and the weights are required (no optimizer, scheduler or RNG state is saved then).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return [f"the directory itself ({path} does not exist)"]
    missing = []
    state_path = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_path):
        missing.append(TRAINER_STATE)
    else:
        try:
            with open(state_path) as handle:
                json.load(handle)
        except ValueError:
            missing.append(f"{TRAINER_STATE} (truncated: not valid JSON)")
    missing += _weights_missing(path)
    if not getattr(args, "save_only_model", False):
        missing += _training_state_missing(path)
    return missing


def check_checkpoint(path: str | os.PathLike, args=None) -> str:
    """Return ``path`` if a resume can read everything it needs from it; raise :class:`IncompleteCheckpointError`
    naming the missing files otherwise (``args`` as in :func:`missing_checkpoint_files`)."""
    missing = missing_checkpoint_files(path, args)
    if missing:
        raise IncompleteCheckpointError(
            f"Checkpoint {os.fspath(path)} is incomplete (the run was probably interrupted while saving it): "
            f"missing {', '.join(missing)}. Resume from an earlier checkpoint, or pass resume_from_checkpoint=True "
            "to use the newest complete one."
        )
    return os.fspath(path)


def _checkpoints_newest_first(output_dir: str) -> list[str]:
    steps = [
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT_DIR.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [os.path.join(output_dir, name) for _, name in sorted(steps, reverse=True)]


def last_complete_checkpoint(output_dir: str | os.PathLike, args=None) -> str | None:
    """The highest-step ``checkpoint-N`` of ``output_dir`` that :func:`check_checkpoint` accepts, or ``None``.

    Newer but incomplete checkpoints are skipped with a warning that names them and their missing files (they are
    not deleted: that is the user's call).
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    for checkpoint in _checkpoints_newest_first(output_dir):
        missing = missing_checkpoint_files(checkpoint, args)
        if not missing:
            return checkpoint
        logger.warning("Skipping incomplete checkpoint %s (missing %s).", checkpoint, ", ".join(missing))
    return None


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str | os.PathLike, args=None) -> str | None:
    """Turn a ``resume_from_checkpoint`` value into a complete checkpoint path, or ``None`` (train from scratch).

    Accepts what ``Trainer.train`` accepts plus the strings a command line delivers: ``True`` / ``"true"`` /
    ``"last"`` mean the newest complete checkpoint of ``output_dir`` (an error if there is none); ``False`` /
    ``None`` / ``"false"`` / ``"none"`` mean no resume; any other string is a checkpoint path, checked by
    :func:`check_checkpoint`.
    """
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in _NONE:
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in _LAST):
        checkpoint = last_complete_checkpoint(output_dir, args)
        if checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint asks for the last checkpoint, but {os.fspath(output_dir)} holds no complete "
                "checkpoint-N directory (see the warnings above for incomplete ones). Drop resume_from_checkpoint to "
                "start from scratch, or pass the path of a checkpoint."
            )
        return checkpoint
    return check_checkpoint(value, args)


class ResumableRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` whose epoch ``e`` permutation does not depend on how many epochs this process ran.

    An uninterrupted run draws epoch ``e``'s order as the ``(e+1)``-th permutation of a generator seeded with
    ``seed``; transformers calls ``set_epoch(e)`` before each epoch, so this sampler reseeds and replays the ``e``
    earlier draws — the same orders as TRL's sampler, also after a resume that starts at epoch ``e``. Without a
    ``set_epoch`` call (or without a seed, or without shuffling) it behaves exactly like ``RepeatSampler``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch: int | None = None

    @classmethod
    def from_sampler(cls, sampler: RepeatSampler) -> ResumableRepeatSampler:
        return cls(
            data_source=sampler.data_source,
            mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __iter__(self):
        if self.shuffle and self.seed is not None and self._epoch is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(self._epoch):
                torch.randperm(self.num_samples, generator=self.generator)
        return super().__iter__()


def resumable_sampler(sampler):
    """``sampler`` as a :class:`ResumableRepeatSampler` if it is TRL's plain ``RepeatSampler``, else unchanged."""
    return ResumableRepeatSampler.from_sampler(sampler) if type(sampler) is RepeatSampler else sampler
