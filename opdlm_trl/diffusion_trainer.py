"""`DiffusionTrainer`: the base of every trainer of the package, on TRL's DistillationTrainer.

What OPD and the baselines share lives here once: loading and converting the student (:func:`opdlm_trl.to_diffusion`),
the block-causal ``[prompt | x0 | x_t]`` forward (:mod:`opdlm_trl.masks`) in row groups, the chunked loss with its
reduction and normaliser, metric gathering, the run's precision, the cumulative ``training_tokens``, complete-checkpoint
resume and saving. A trainer built on it says only how a generation batch of dataset rows becomes a
:class:`opdlm_trl.batch.TrainingBatch` and which loss it trains (docs/trainer.md, "Writing a trainer"):

* :meth:`DiffusionTrainer._batch_from_examples`: dataset rows -> ``TrainingBatch`` (rollouts, given text, ...);
  its public builder ends in :meth:`DiffusionTrainer._with_normaliser`;
* :meth:`DiffusionTrainer._per_position_loss`, :meth:`DiffusionTrainer._reduce` with
  :meth:`DiffusionTrainer._reduction_counts`, :meth:`DiffusionTrainer._metric_sums` and
  :meth:`DiffusionTrainer._log_metric_sums`: the loss and its metrics.

TRL keeps the rest: generation-batch buffering across gradient accumulation, DDP/DeepSpeed preparation, logging of
``_metrics``, checkpointing and model cards.
"""

from __future__ import annotations

import contextlib
import copy
import os
import textwrap

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from . import losses as L
from ._trl import DistillationTrainer, ExportableState, create_model_from_path
from .batch import SupervisedRows, TrainingBatch
from .checkpoints import resolve_resume_checkpoint, resumable_sampler
from .collectives import chunk_bounds
from .config import DiffusionTrainingConfig
from .data import render_prompts
from .grouping import plan_groups
from .heads import OutputHead
from .masks import frontier_offsets, training_layout
from .modeling import (
    DiffusionSettings,
    decoder_output,
    diffusion_settings,
    save_diffusion_settings,
    to_diffusion,
    unwrap_model,
)
from .precision import check_master_weights, warn_if_cpu_bf16_is_slow
from .sampling import default_stop_token_ids

__all__ = ["DiffusionTrainer", "OPDProgress", "is_converted", "load_pretrained", "load_student"]

_OPDLM_CITATION = textwrap.dedent("""\
    @article{su2026opdlm,
        title   = {{Data-Efficient Autoregressive-to-Diffusion Language Models via On-Policy Distillation}},
        author  = {Xingyu Su and Jacob Helwig and Shubham Parashar and Atharv Chagi and Lakshmi Jotsna and Degui Zhi
                   and James Caverlee and Dileep Kalathil and Shuiwang Ji},
        journal = {arXiv preprint arXiv:2606.06712},
        year    = {2026},
    }""")


class OPDProgress(TrainerCallback, ExportableState):
    """Counters that must survive a resume: cumulative training tokens (the paper's headline unit).

    The class name is the key of its state in a checkpoint's ``trainer_state.json``: renaming it would drop the
    counter of every existing checkpoint on resume.
    """

    def __init__(self, training_tokens: int = 0):
        self.training_tokens = training_tokens

    def state(self) -> dict:
        return {"args": {}, "attributes": {"training_tokens": self.training_tokens}}


def load_pretrained(path: str, init_kwargs: dict | None, trust_remote_code: bool):
    """An AR causal LM from a folder or hub id, as TRL's trainers load ``model_init_kwargs`` (``dtype`` strings).

    Two defaults differ from TRL's and are why this is not a bare ``create_model_from_path`` call: ``sdpa``
    attention (the block-causal 4D masks need it, :func:`opdlm_trl.to_diffusion`), and no ``device_map`` unless
    asked for: the model loads whole on the CPU and the accelerator places it, once per process (TRL's default
    ``device_map="auto"`` would spread one process's model over every visible GPU).
    """
    kwargs = dict(init_kwargs or {})
    kwargs.setdefault("attn_implementation", "sdpa")
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    kwargs.setdefault("device_map", None)
    return create_model_from_path(path, AutoModelForCausalLM, **kwargs)


def load_student(model, args: DiffusionTrainingConfig, processing_class):
    """``(model, tokenizer)``: ``model`` loaded when it is a path (its tokenizer too, unless given); a model as is."""
    if isinstance(model, str):
        path = model
        model = load_pretrained(path, args.model_init_kwargs, args.trust_remote_code)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if processing_class is None:
        raise ValueError("Pass `processing_class` (the tokenizer) when `model` is an instantiated model.")
    return model, processing_class


def is_converted(model) -> bool:
    """Whether ``model`` is already a diffusion student (its config carries the conversion's settings)."""
    return bool(getattr(unwrap_model(model).config, "opdlm", None))


def _check_prompt_dataset(dataset, name: str) -> None:
    """Refuse an empty dataset or one without prompts before any model work starts."""
    if dataset is None:
        return
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{name} is empty: a diffusion trainer needs prompts to train on.")
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        hint = " Rename `messages` to `prompt`." if "messages" in columns else ""
        raise ValueError(
            f"{name} has no `prompt` column (found {columns}). Provide plain-text or conversational prompts in a "
            f"`prompt` column, e.g. with opdlm_trl.data.load_prompt_dataset.{hint}"
        )


def _mask_row_trainable(peft_config, settings: DiffusionSettings):
    """LoRA never touches embeddings, but a new mask token has an untrained row: train just that row."""
    if not hasattr(peft_config, "trainable_token_indices"):
        return peft_config
    peft_config = copy.deepcopy(peft_config)
    indices = peft_config.trainable_token_indices
    if indices is None:
        peft_config.trainable_token_indices = [settings.mask_token_id]
    elif isinstance(indices, list) and settings.mask_token_id not in indices:
        peft_config.trainable_token_indices = [*indices, settings.mask_token_id]
    return peft_config


class DiffusionTrainer(DistillationTrainer):
    """A block-diffusion student trained on ``[prompt | x0 | x_t]`` batches: the base of OPD and the baselines.

    Not used on its own: a subclass provides its batch builder and its loss (the module docstring lists the five
    methods). It never builds a teacher; trainers that distil from one add it
    (:class:`opdlm_trl.trainer.TeacherDistillationTrainer`).

    Args:
        model: a path / hub id, an autoregressive ``PreTrainedModel`` (converted on entry with
            :func:`opdlm_trl.to_diffusion` using ``args.block_size``, ``args.mask_token``, ``args.shift``) or an
            already converted student.
        args: a :class:`opdlm_trl.config.DiffusionTrainingConfig` (a subclass's own config).
        train_dataset / eval_dataset: datasets with a ``prompt`` column (text or chat messages).
        processing_class: the tokenizer (loaded from ``model`` when it is a path).
        peft_config: a peft config (LoRA); the mask-token row is added to ``trainable_token_indices``.
    """

    _tag_names = ["trl", "opdlm", "diffusion-lm"]
    _name = "Diffusion"
    _paper = {
        "title": "Data-Efficient Autoregressive-to-Diffusion Language Models via On-Policy Distillation",
        "id": "2606.06712",
        "citation": _OPDLM_CITATION,
    }
    # The config a trainer needs (a subclass names its own) and where a default one writes.
    config_class: type[DiffusionTrainingConfig] = DiffusionTrainingConfig
    _default_output_dir = "diffusion-output"
    # The loss's name in errors and what a non-finite loss most likely means (each trainer says its own).
    _loss_name = "training"
    _nonfinite_hint = "Lower the learning rate, or train in float32/bf16 rather than fp16."

    def __init__(
        self,
        model,
        args: DiffusionTrainingConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        args = self._checked_config(args)
        _check_prompt_dataset(train_dataset, "train_dataset")
        _check_prompt_dataset(eval_dataset, "eval_dataset")
        model, processing_class = load_student(model, args, processing_class)
        if not is_converted(model):
            model, processing_class = to_diffusion(
                model, processing_class, block_size=args.block_size, mask_token=args.mask_token, shift=args.shift
            )
        self.settings = diffusion_settings(model)
        if peft_config is not None:
            peft_config = _mask_row_trainable(peft_config, self.settings)
        self._progress = OPDProgress()
        self._bf16_setting: bool | None = None  # precision(): None follows the run's config
        super().__init__(
            model=model,
            teacher_model=None,  # TRL's teacher path assumes equal vocabularies and its own JSD; subclasses score
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=[*(callbacks or []), self._progress],
            optimizers=optimizers,
            peft_config=peft_config,
        )
        self._check_precision()
        # TRL stops on the tokenizer's and generation_config's EOS; generation and evaluation use the same rule
        # (plus end-of-turn tokens), so training stops rollouts exactly where the student will be stopped later.
        self.eos_token_ids = default_stop_token_ids(self._tokenizer, self.model)

    @classmethod
    def _checked_config(cls, args: DiffusionTrainingConfig | None) -> DiffusionTrainingConfig:
        """``args``, or the trainer's default config, refused unless it is the trainer's ``config_class``."""
        args = args or cls.config_class(output_dir=cls._default_output_dir)
        if not isinstance(args, cls.config_class):
            raise TypeError(
                f"{cls.__name__} needs args of type {cls.config_class.__name__}, got {type(args).__name__}."
            )
        return args

    def _check_precision(self) -> None:
        """float32 master weights (or DeepSpeed's, or the user's explicit opt-in), and a warning where bf16 autocast
        is emulated on this CPU: the package's rules in :mod:`opdlm_trl.precision`."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        check_master_weights(self.model.named_parameters(), self.args, deepspeed_plugin=plugin)
        warn_if_cpu_bf16_is_slow(self.args)

    # ----------------------------------------------------------------------------------------------- public state
    @property
    def training_tokens(self) -> int:
        """Completion tokens trained on so far, over all processes (OPD: generated; baselines: given). Restored on
        resume; the paper's budget unit (docs/method.md §9)."""
        return self._progress.training_tokens

    @contextlib.contextmanager
    def precision(self, bf16: bool | None = None):
        """Run the trainer's own forwards (rollouts, teacher scoring, the loss) in bf16 autocast (``True``), without
        autocast (``False``) or as the config says (``None``: ``args.bf16`` / ``fp16`` through accelerate), until
        the block ends.

        For comparing precisions on one trainer (benchmarks/train_step.py). A prepared (DDP / DeepSpeed) model
        still applies accelerate's own autocast inside its ``forward``; master weights stay as loaded.
        """
        previous, self._bf16_setting = self._bf16_setting, bf16
        try:
            yield self
        finally:
            self._bf16_setting = previous

    def _autocast(self):
        """The autocast context around every forward the trainer calls itself (:meth:`precision` decides it).

        accelerate casts only through the *prepared* model's ``forward``: a rollout can run on the module before the
        first prepare, and a local teacher scores through its backbone and a chunked ``lm_head``, both bypassing that
        wrapper. Without this, ``bf16=True`` trained the loss forward in bf16 but decoded and scored in float32. Master
        weights, logits fed to the losses and the sampler's confidences stay float32 (they are cast up where they are
        read). By default a no-op without mixed precision and under DeepSpeed (which holds bf16 weights itself);
        nesting with accelerate's own autocast is harmless.
        """
        if self._bf16_setting is None:
            return self.accelerator.autocast()
        if self._bf16_setting:
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------------- the batch
    def prompt_token_lists(self, prompts: list) -> list[list[int]]:
        """The token lists the trainer decodes / trains ``prompts`` (text or chat messages) as.

        The package's one prompt renderer (TRL's rule, with ``args.chat_template_kwargs``), shared with generate,
        opdlm-eval and every trainer so a prompt is the same token sequence wherever it is decoded; then
        ``max_prompt_length`` as ``prompt_truncation`` says.
        """
        prompt_ids = render_prompts(prompts, self.processing_class, self.chat_template_kwargs)
        limit = self.args.max_prompt_length
        if limit is None:
            return [list(ids) for ids in prompt_ids]
        too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) > limit]
        if too_long and self.args.prompt_truncation == "error":
            raise ValueError(
                f"{len(too_long)} prompt(s) exceed max_prompt_length={limit} tokens (first: batch row {too_long[0]}, "
                f"{len(prompt_ids[too_long[0]])} tokens). Raise max_prompt_length or set prompt_truncation='left'."
            )
        return [list(ids)[-limit:] for ids in prompt_ids]

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        """TRL's generation hook, shared by every trainer: the subclass's :meth:`_batch_from_examples` as a dict.

        TRL shuffles and splits the dict along dim 0 (:mod:`opdlm_trl.batch`); the batch's 0-d ``normaliser`` goes
        whole to every accumulation slice.
        """
        mode = "train" if self.model.training else "eval"
        return self._batch_from_examples(inputs, mode).to_dict()

    def _batch_from_examples(self, examples: list[dict], mode: str) -> TrainingBatch:
        """One generation batch of dataset rows -> the :class:`TrainingBatch` it trains on, with its normaliser
        (every accumulation step, this process's rows); logs its metrics under ``mode`` ("train" / "eval")."""
        raise NotImplementedError(f"{type(self).__name__} must say how dataset rows become a TrainingBatch.")

    def _with_normaliser(self, batch: TrainingBatch) -> TrainingBatch:
        """``batch`` with its ``normaliser``: what every micro-batch's loss divides by (the one place it is counted).

        :meth:`_reduction_counts` over the whole generation batch, every process's rows (a collective: every process
        calls it), divided by the number of processes because DDP averages their gradients. Summing the
        micro-batch losses of one accumulation window then gives the gradient of the whole batch's mean.
        """
        device = self.accelerator.device
        count = L.normaliser_count(self._reduction_counts(batch).to(device), self.args.loss_normalization)
        total = self.accelerator.gather(count.reshape(1)).sum()
        batch.normaliser = total.float() / self.accelerator.num_processes
        return batch

    def _count_training_tokens(self, lengths: torch.Tensor) -> int:
        """Add the gathered completion ``lengths`` of a training batch to the cumulative ``training_tokens``."""
        self._progress.training_tokens += int(lengths.sum().item())
        self._metrics["train"]["training_tokens"] = [float(self._progress.training_tokens)]
        return self._progress.training_tokens

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss hook, shared by every trainer of the package: forward, per-position loss, reduce, metrics.

        The student's forward stops at its final hidden states (at the supervised positions); the output heads turn
        them into logits ``loss_chunk_size`` positions at a time (:meth:`_loss_and_metric_sums`), so no ``(N, V)``
        tensor of the whole micro-batch exists. Training divides by the batch's ``normaliser`` (the generation
        batch's, :meth:`_with_normaliser`); evaluation reduces each batch on its own.
        """
        mode = "train" if self.model.training else "eval"
        batch = TrainingBatch.of(inputs)
        hidden = self._student_hidden(model, batch)  # (N, H) at supervised positions
        per_position, sums = self._loss_and_metric_sums(hidden, batch)
        loss = self._reduce(per_position, batch, batch.normaliser if self.model.training else None)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite {self._loss_name} loss ({loss.item()}) at step {self.state.global_step}. "
                f"{self._nonfinite_hint}"
            )
        # One row per process: plain gather. gather_for_metrics would cut the rows to the dataset's sample
        # remainder on an epoch's last batch and drop whole processes (tests/integration/test_distributed.py).
        sums = self.accelerator.gather(sums.unsqueeze(0)).sum(0)
        self._log_metric_sums(sums, batch, mode)
        return (loss, None) if return_outputs else loss

    def _per_position_loss(self, student_logits: torch.Tensor, rows: SupervisedRows) -> torch.Tensor:
        """The loss at every supervised position of a chunk, ``(n,)``."""
        raise NotImplementedError(f"{type(self).__name__} must define its per-position loss.")

    def _reduction_counts(self, batch: TrainingBatch) -> torch.Tensor:
        """``(B,)`` what :meth:`_reduce` averages each row over (the normaliser counts it over the whole batch)."""
        raise NotImplementedError(f"{type(self).__name__} must say what its loss averages each row over.")

    def _reduce(self, per_position: torch.Tensor, batch: TrainingBatch, normaliser) -> torch.Tensor:
        """The scalar loss of a micro-batch; ``normaliser`` (None: this batch's own count) replaces its divisor."""
        raise NotImplementedError(f"{type(self).__name__} must define its loss reduction.")

    def _metric_sums(self, student_logits, per_position, rows: SupervisedRows) -> torch.Tensor:
        """This chunk's metric sums (one flat tensor; chunks and then processes are summed by ``compute_loss``)."""
        raise NotImplementedError(f"{type(self).__name__} must define its metric sums.")

    def _log_metric_sums(self, sums: torch.Tensor, batch: TrainingBatch, mode: str) -> None:
        """Turn the all-process sums of :meth:`_metric_sums` into logged means."""
        raise NotImplementedError(f"{type(self).__name__} must log its metric sums.")

    def _resolve_targets(self, rows: SupervisedRows) -> SupervisedRows:
        """A chunk's targets as the loss reads them (a teacher's hidden states become log-probs); as is by default."""
        return rows

    def _loss_and_metric_sums(self, hidden: torch.Tensor, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position loss ``(N,)`` and this process's metric sums, one chunk of positions at a time.

        Each chunk applies the student's head (and, for full-vocabulary targets held as hidden states, the teacher's)
        under non-reentrant activation checkpointing: its ``(chunk, V)`` float32 tensors are freed after the forward
        and recomputed in the backward. Values and gradients equal one unchunked pass (the same pure losses of
        :mod:`opdlm_trl.losses` on the same logits). TRL's ``chunked_divergence`` kernel computes a KL from hidden
        states too, but assumes equal student/teacher vocabularies with no suppressed column (the student's
        ``[MASK]`` row), covers none of the top-k, tail-bucket, ``token_pg`` or MDLM losses, and gives no metrics;
        this keeps one definition of every loss. Every rank runs the same number of chunks (ZeRO-3 gathers each
        head per call, :func:`opdlm_trl.collectives.chunk_bounds`).
        """
        rows = batch.supervised_rows(self._frontier_offsets(batch))
        needs_grad = torch.is_grad_enabled() and hidden.requires_grad
        losses, sums = [], []
        for start, end in chunk_bounds(len(rows), self.args.loss_chunk_size):
            part = rows.slice(start, end)
            if needs_grad:
                loss, metric = checkpoint(self._chunk_loss, hidden[start:end], part, use_reentrant=False)
            else:
                loss, metric = self._chunk_loss(hidden[start:end], part)
            losses.append(loss)
            sums.append(metric)
        return torch.cat(losses), torch.stack(sums).sum(0)

    def _chunk_loss(self, hidden: torch.Tensor, rows: SupervisedRows) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk: student logits from its head, the targets resolved, the loss and the metric sums."""
        with self._autocast():
            logits = self._student_head.logits(hidden)
            rows = self._resolve_targets(rows)
        per_position = self._per_position_loss(logits, rows)
        with torch.no_grad():
            metric = self._metric_sums(logits.detach(), per_position.detach(), rows)
        return per_position, metric

    @property
    def _student_head(self) -> OutputHead:
        """The student's output head over all its rows, ``[MASK]`` suppressed (the sampler's rule)."""
        return OutputHead.of(self.model, suppressed_ids=(self.settings.mask_token_id,))

    def _frontier_offsets(self, batch: TrainingBatch) -> torch.Tensor:
        """Distance of each supervised position from its block's frontier (the confidence-by-offset metrics)."""
        return frontier_offsets(batch.supervised, self.settings.block_size)[batch.supervised]

    def _student_hidden(self, model, inputs: TrainingBatch | dict) -> torch.Tensor:
        """Block-causal forwards over ``[prompt | x0 | x_t]``; final hidden states at the supervised positions.

        Rows go through in ``length_groups`` groups of similar length, each cut to the columns its rows use
        (:mod:`opdlm_trl.grouping`); the states come back in the batch's row-major order of ``loss_mask``.
        """
        batch = TrainingBatch.of(inputs)
        loss_mask = batch.supervised
        if not self.args.length_groups:
            return self._group_hidden(model, batch, slice(None), None, None, loss_mask)
        groups = plan_groups(
            batch.prompt_mask, batch.completion_key_mask, self.settings.block_size, self.args.length_groups
        )
        # position of every supervised (row, column) in the row-major order compute_loss uses
        order = (loss_mask.flatten().long().cumsum(0) - 1).view_as(loss_mask)
        parts, positions = [], []
        for group in groups:
            rows, end = group.rows, group.completion_end
            selected = loss_mask[rows, :end]
            parts.append(self._group_hidden(model, batch, rows, group.prompt_start, end, selected))
            positions.append(order[rows, :end][selected])
        positions = torch.cat(positions)
        if positions.numel() != int(loss_mask.sum()):
            raise RuntimeError(
                "Row groups lost supervised positions: a loss position lies outside completion_key_mask."
            )
        inverse = torch.empty_like(positions)
        inverse[positions] = torch.arange(positions.numel(), device=positions.device)
        return torch.cat(parts)[inverse]

    def student_logits(self, batch: TrainingBatch | dict) -> torch.Tensor:
        """``(N, V)`` float32 student logits at the supervised positions of ``batch`` (``[MASK]`` suppressed).

        What the loss sees, materialised at once: for tests and tools on small batches; training never builds it.
        """
        return self._student_head.logits(self._student_hidden(self.model, batch))

    def _group_hidden(self, model, batch: TrainingBatch, rows, prompt_start, completion_end, selected) -> torch.Tensor:
        """One forward of ``rows`` over prompt columns ``[prompt_start:]`` and completion columns ``[:end]``.

        The forward goes through ``model`` (the DDP / DeepSpeed wrapper, so gradient synchronisation is armed) with an
        empty ``logits_to_keep``: the model's own head produces no logits, and the decoder's output is read by a
        forward hook.
        """
        dtype = next(unwrap_model(self.model).parameters()).dtype
        prompt, completion = slice(prompt_start, None), slice(None, completion_end)
        layout = training_layout(
            batch.prompt_ids[rows, prompt],
            batch.prompt_mask[rows, prompt],
            batch.clean_ids[rows, completion],
            batch.noisy_ids[rows, completion],
            batch.completion_key_mask[rows, completion],
            self.settings.block_size,
            self.settings.shift,
            dtype,
        )
        no_logits = layout.source_index[:0]
        with decoder_output(model) as captured, self._autocast():
            model(
                input_ids=layout.input_ids,
                attention_mask=layout.attention_mask,
                position_ids=layout.position_ids,
                logits_to_keep=no_logits,
                use_cache=False,
            )
        return captured.hidden[:, layout.source_index][selected]

    # ----------------------------------------------------------------------------------------------- resuming
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """TRL's ``train``, resuming only from a *complete* checkpoint (:mod:`opdlm_trl.checkpoints`).

        ``True`` (or the command-line strings ``"true"`` / ``"last"``) picks the newest complete ``checkpoint-N`` of
        ``output_dir``, skipping, with a warning, one that a killed run left half written; an explicit path is
        refused with an error naming the missing file; ``"false"`` / ``"none"`` train from scratch.
        """
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir, self.args)
        return super().train(checkpoint, *args, **kwargs)

    def _get_train_sampler(self, dataset=None):
        """TRL's sampler, with an epoch order that a resume repeats (TRL's replays epoch 0's order on resume).

        TRL's sampler yields whole generation batches only (per-device batch x processes x accumulation steps), so
        a dataset smaller than one batch yields nothing and the run would "finish" without a single step: refused
        here, before any rollout."""
        sampler = super()._get_train_sampler(dataset)
        if len(sampler) == 0:
            prompts = len(dataset if dataset is not None else self.train_dataset)
            batch = self.args.per_device_train_batch_size * self.accelerator.num_processes
            batch *= self.args.gradient_accumulation_steps
            raise ValueError(
                f"The training dataset has {prompts} prompts, fewer than one generation batch of {batch} "
                f"(per_device_train_batch_size {self.args.per_device_train_batch_size} x "
                f"{self.accelerator.num_processes} processes x gradient_accumulation_steps "
                f"{self.args.gradient_accumulation_steps}): every batch would be dropped and nothing trained. "
                "Add prompts or lower the batch size."
            )
        return resumable_sampler(sampler)

    # ----------------------------------------------------------------------------------------------- saving
    def _load_callback_state(self) -> None:
        """Resume the cumulative token counter whatever ``restore_callback_states_from_checkpoint`` says.

        transformers restores stateful callbacks only when that flag is set (default False), and then by
        *replacing* the instance, which would leave ``self._progress`` counting on a detached copy from zero.
        """
        super()._load_callback_state()
        self._progress = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, OPDProgress))
        stored = self.state.stateful_callbacks.get(type(self._progress).__name__)
        stored = stored[0] if isinstance(stored, list) else stored
        if stored:
            self._progress.training_tokens = int(stored.get("attributes", {}).get("training_tokens", 0))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the student (+ tokenizer); with ``merge_lora_on_save`` also a merged full student."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if hasattr(self.model, "peft_config") and self.accelerator.is_main_process:
            save_diffusion_settings(self.model, output_dir)  # an adapter dir has no config.json to carry them
            self._tokenizer.save_pretrained(output_dir)  # the mask token lives in the tokenizer
        if self.args.merge_lora_on_save and hasattr(self.model, "peft_config") and self.accelerator.is_main_process:
            merged_dir = os.path.join(output_dir, "merged")
            merged = copy.deepcopy(self.accelerator.unwrap_model(self.model)).merge_and_unload()
            merged.save_pretrained(merged_dir, safe_serialization=True)
            self._tokenizer.save_pretrained(merged_dir)
