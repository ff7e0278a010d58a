"""`OPDTrainer`: on-policy self-distillation of an ARLM into a block-diffusion LM, on TRL's DistillationTrainer.

One optimisation step, as data (docs/trainer.md has the long version):

1. prompts -> chat template -> token lists                           (:func:`opdlm_trl.data.render_prompts`)
2. the student decodes them with the diffusion sampler               (:mod:`opdlm_trl.sampling`)
3. the frozen teacher scores the finished sequences                  (:mod:`opdlm_trl.teachers`)
4. visited states are chosen from the trajectory record              (:mod:`opdlm_trl.states`)
5. one block-causal ``[prompt | x0 | x_t]`` forward of the student   (:mod:`opdlm_trl.masks`)
6. divergence to the teacher at the still-masked positions           (:mod:`opdlm_trl.losses`)

The trainer only orchestrates: it overrides TRL's generation hook (``_generate_and_score_completions``) and its
loss hook (``compute_loss``), each kept short, and keeps the method in the modules above. Everything else —
generation-batch buffering across gradient accumulation, DDP/DeepSpeed preparation, logging of ``_metrics``,
checkpointing, model cards — is TRL's, except that ``train`` resumes only from a complete checkpoint and the train
sampler keeps its epoch order across a resume (:mod:`opdlm_trl.checkpoints`).
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
from ._trl import (
    DistillationTrainer,
    ExportableState,
    create_model_from_path,
    prepare_deepspeed,
    unwrap_model_for_generation,
)
from .batch import SupervisedRows, TrainingBatch
from .checkpoints import resolve_resume_checkpoint, resumable_sampler
from .collectives import chunk_bounds
from .config import OPDConfig
from .curriculum import completion_length, rollout_threshold
from .data import render_prompts
from .eval.diagnostics import (
    offset_confidence_metrics,
    offset_confidence_sums,
    out_of_order_commits,
    teacher_top1_logprob,
    top1_probability,
)
from .grouping import merge_groups, plan_groups
from .heads import OutputHead
from .masks import frontier_offsets, shown_at, training_layout
from .modeling import (
    DiffusionSettings,
    decoder_output,
    diffusion_settings,
    save_diffusion_settings,
    to_diffusion,
    unwrap_model,
)
from .precision import check_master_weights, warn_if_cpu_bf16_is_slow
from .sampling import DiffusionSampler, Rollout, SamplerConfig, default_stop_token_ids
from .states import TrainingStates, select_states
from .teachers import TeacherTargets, build_teacher
from .teachers.factory import AUTO, resolve_kind, teacher_class

__all__ = ["OPDProgress", "OPDTrainer", "load_pretrained"]

_OPDLM_CITATION = textwrap.dedent("""\
    @article{su2026opdlm,
        title   = {{Data-Efficient Autoregressive-to-Diffusion Language Models via On-Policy Distillation}},
        author  = {Xingyu Su and Jacob Helwig and Shubham Parashar and Atharv Chagi and Lakshmi Jotsna and Degui Zhi
                   and James Caverlee and Dileep Kalathil and Shuiwang Ji},
        journal = {arXiv preprint arXiv:2606.06712},
        year    = {2026},
    }""")


class OPDProgress(TrainerCallback, ExportableState):
    """Counters that must survive a resume: cumulative training tokens (the paper's headline unit)."""

    def __init__(self, training_tokens: int = 0):
        self.training_tokens = training_tokens

    def state(self) -> dict:
        return {"args": {}, "attributes": {"training_tokens": self.training_tokens}}


def _check_prompt_dataset(dataset, name: str) -> None:
    """Refuse an empty dataset or one without prompts before any model work starts."""
    if dataset is None:
        return
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{name} is empty: OPD needs prompts to roll out the student on.")
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        hint = " Rename `messages` to `prompt`." if "messages" in columns else ""
        raise ValueError(
            f"{name} has no `prompt` column (found {columns}). Provide plain-text or conversational prompts in a "
            f"`prompt` column, e.g. with opdlm_trl.data.load_prompt_dataset.{hint}"
        )


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


def _is_converted(model) -> bool:
    return bool(getattr(unwrap_model(model).config, "opdlm", None))


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


class OPDTrainer(DistillationTrainer):
    """On-policy self-distillation (OPDLM) of an autoregressive LM into a block-diffusion LM.

    Args:
        model: a path / hub id, an autoregressive ``PreTrainedModel`` (converted on entry with
            :func:`opdlm_trl.to_diffusion` using ``args.block_size``, ``args.mask_token``, ``args.shift``) or an
            already converted student.
        teacher_model: the frozen original ARLM (path or model). Defaults: with ``peft_config`` the student's own
            base weights with adapters disabled (``shared``: no extra memory); otherwise a frozen copy of ``model``
            taken before conversion. Ignored for vLLM teacher backends.
        args: an :class:`OPDConfig`.
        train_dataset / eval_dataset: datasets with a ``prompt`` column (text or chat messages).
        processing_class: the tokenizer (loaded from ``model`` when it is a path).
        peft_config: a peft config (LoRA); the mask-token row is added to ``trainable_token_indices``.
        teacher: an explicit :class:`opdlm_trl.teachers.Teacher` (overrides ``teacher_backend``).
    """

    _tag_names = ["trl", "opdlm", "diffusion-lm", "on-policy-distillation"]
    # Subclasses that train on given text without teacher targets (the MDLM baseline) set this to False: no
    # frozen teacher copy is kept and no teacher is built.
    _needs_teacher = True
    _name = "OPD"
    _paper = {
        "title": "Data-Efficient Autoregressive-to-Diffusion Language Models via On-Policy Distillation",
        "id": "2606.06712",
        "citation": _OPDLM_CITATION,
    }

    def __init__(
        self,
        model,
        teacher_model=None,
        args: OPDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        teacher=None,
    ):
        args = args or OPDConfig(output_dir="opd-output")
        if not isinstance(args, OPDConfig):
            raise TypeError(f"OPDTrainer needs an OPDConfig, got {type(args).__name__}.")
        _check_prompt_dataset(train_dataset, "train_dataset")
        _check_prompt_dataset(eval_dataset, "eval_dataset")
        model, processing_class, teacher_model = self._prepare_student(
            model, teacher_model, args, processing_class, peft_config, teacher
        )
        self.settings = diffusion_settings(model)
        if peft_config is not None:
            peft_config = _mask_row_trainable(peft_config, self.settings)
        self._progress = OPDProgress()
        super().__init__(
            model=model,
            teacher_model=None,  # TRL's teacher path assumes equal vocabularies and its own JSD; we score ourselves
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=[*(callbacks or []), self._progress],
            optimizers=optimizers,
            peft_config=peft_config,
        )
        self._check_precision()
        self.teacher = teacher or (self._build_teacher(teacher_model) if self._needs_teacher else None)
        self._teacher_params = self._count_teacher_parameters(teacher_model)
        self._student_params = sum(p.numel() for p in unwrap_model(self.model).parameters())
        # TRL stops on the tokenizer's and generation_config's EOS; generation and evaluation use the same rule
        # (plus end-of-turn tokens), so training stops rollouts exactly where the student will be stopped later.
        self.eos_token_ids = default_stop_token_ids(self._tokenizer, self.model)

    # ----------------------------------------------------------------------------------------------- setup
    def _prepare_student(self, model, teacher_model, args, processing_class, peft_config, teacher):
        """Load and convert the student; keep a frozen copy of the original as teacher when one is needed."""
        if isinstance(model, str):
            path = model
            model = load_pretrained(path, args.model_init_kwargs, args.trust_remote_code)
            if processing_class is None:
                processing_class = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        if processing_class is None:
            raise ValueError("Pass `processing_class` (the tokenizer) when `model` is an instantiated model.")
        if isinstance(teacher_model, str):
            teacher_model = load_pretrained(teacher_model, args.teacher_model_init_kwargs, args.trust_remote_code)
        needs_local_copy = (
            self._needs_teacher
            and teacher is None
            and teacher_model is None
            and peft_config is None
            and (args.teacher_backend == AUTO or teacher_class(args.teacher_backend).needs_teacher_model)
            and not hasattr(model, "peft_config")
        )
        if not _is_converted(model):
            if needs_local_copy:
                teacher_model = copy.deepcopy(model)
            model, processing_class = to_diffusion(
                model, processing_class, block_size=args.block_size, mask_token=args.mask_token, shift=args.shift
            )
        elif needs_local_copy:
            raise ValueError(
                "The student is already converted and is fully fine-tuned, so its weights are not the original "
                "ARLM: pass `teacher_model` (the original model or its path), use a vLLM teacher backend, or "
                "train with a peft_config (the shared-weights teacher)."
            )
        if teacher_model is not None:
            self._check_teacher_vocab(model, teacher_model)
        return model, processing_class, teacher_model

    def _check_precision(self) -> None:
        """float32 master weights (or DeepSpeed's, or the user's explicit opt-in), and a warning where bf16 autocast
        is emulated on this CPU: the package's rules in :mod:`opdlm_trl.precision`."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        check_master_weights(self.model.named_parameters(), self.args, deepspeed_plugin=plugin)
        warn_if_cpu_bf16_is_slow(self.args)

    @staticmethod
    def _check_teacher_vocab(student, teacher_model) -> None:
        settings = diffusion_settings(student)
        teacher_vocab = unwrap_model(teacher_model).get_input_embeddings().weight.shape[0]
        if teacher_vocab != settings.teacher_vocab_size:
            raise ValueError(
                f"Teacher vocabulary ({teacher_vocab} rows) differs from the student's original vocabulary "
                f"({settings.teacher_vocab_size}): the teacher must be the ARLM the student was converted from."
            )

    def _build_teacher(self, teacher_model):
        """The configured teacher, from the package's one factory (:func:`opdlm_trl.teachers.build_teacher`).

        Only the preparation of a local teacher model stays here (:meth:`_prepare_teacher_model`): it needs this
        trainer's accelerator, which the factory does not know.
        """
        kind = resolve_kind(self.args.teacher_backend, teacher_model)
        options = self.args.teacher_options(kind)
        options.setdefault("model", teacher_model)
        return build_teacher(
            kind,
            student=self.model,
            tokenizer=self._tokenizer,
            top_k=self.args.teacher_top_k,
            prepare_model=self._prepare_teacher_model,
            **options,
        )

    def _prepare_teacher_model(self, teacher_model):
        """A frozen local teacher for inference: a ZeRO inference engine under DeepSpeed (no optimizer state),
        else placed on the device (and wrapped for evaluation) by the accelerator."""
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher_model, self.accelerator)
        return self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

    def _count_teacher_parameters(self, teacher_model) -> int:
        # ds_numel: under ZeRO-3 the prepared teacher holds empty shards, numel() would count 0.
        model = teacher_model if teacher_model is not None else self.model  # same architecture (shared / vLLM)
        return sum(getattr(p, "ds_numel", p.numel()) for p in unwrap_model(model).parameters())

    # ----------------------------------------------------------------------------------------------- rollouts
    def current_completion_length(self) -> int:
        """Rollout length of the curriculum at the current optimizer step (restored on resume)."""
        args = self.args
        return completion_length(
            self.state.global_step,
            args.min_completion_length,
            args.max_completion_length,
            args.curriculum_steps,
            args.curriculum,
            self.settings.block_size,
        )

    def current_rollout_threshold(self) -> float:
        """Dynamic-decoding threshold of the rollouts at the current optimizer step (``threshold_final``'s ramp; the
        ramp's default length runs to the end of training, as the reference code's ``ramp_steps=-1``)."""
        args = self.args
        if args.threshold_final is None:
            return args.threshold
        ramp_steps = args.threshold_ramp_steps
        if ramp_steps is None:
            ramp_steps = max(self.state.max_steps - args.threshold_hold_steps, 1)
        return rollout_threshold(
            self.state.global_step,
            args.threshold,
            args.threshold_final,
            args.threshold_hold_steps,
            ramp_steps,
            args.threshold_schedule,
        )

    def sampler_config(self, max_new_tokens: int) -> SamplerConfig:
        """The rollout sampler: the config's settings with the student's own block size, the stop tokens and the
        threshold of the current step."""
        return self.args.rollout_sampler_config(
            block_size=self.settings.block_size,
            max_new_tokens=max_new_tokens,
            stop_token_ids=list(self.eos_token_ids),
            threshold=self.current_rollout_threshold(),
            synced_ranks=self._rollout_forwards_are_collective(),
        )

    def _rollout_forwards_are_collective(self) -> bool:
        """Several processes decode with ZeRO-3 parameters left sharded (``ds3_gather_for_generation=False``): every
        sampler forward all-gathers, so ranks must run the same number of them (the sampler's ``synced_ranks``)."""
        return (
            self.accelerator.num_processes > 1
            and self.is_deepspeed_enabled
            and not self.args.ds3_gather_for_generation
        )

    def _prompt_token_lists(self, prompts: list) -> list[list[int]]:
        # The package's one prompt renderer (TRL's rule, with args.chat_template_kwargs), shared with generate,
        # opdlm-eval and the baselines so a prompt is the same token sequence wherever it is decoded.
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

    @contextlib.contextmanager
    def _rollout_mode(self):
        """Decode with gathered ZeRO-3 weights, in eval mode (no dropout, no gradient checkpointing), no grad."""
        with unwrap_model_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as unwrapped:
            was_training = unwrapped.training
            unwrapped.eval()
            try:
                with torch.no_grad():
                    yield unwrapped
            finally:
                unwrapped.train(was_training)

    def _mixed_precision(self):
        """The run's mixed precision (``bf16``/``fp16``) around every forward the trainer calls itself.

        accelerate casts only through the *prepared* model's ``forward``: a rollout can run on the module before the
        first prepare, and a local teacher scores through its backbone and a chunked ``lm_head``, both bypassing that
        wrapper. Without this, ``bf16=True`` trained the loss forward in bf16 but decoded and scored in float32. Master
        weights, logits fed to the losses and the sampler's confidences stay float32 (they are cast up where they are
        read). A no-op without mixed precision and under DeepSpeed (which holds bf16 weights itself); nesting with
        accelerate's own autocast is harmless.
        """
        return self.accelerator.autocast()

    def _roll_out(self, prompts: list) -> Rollout:
        length = self.current_completion_length()
        sampler = DiffusionSampler(self.sampler_config(length), pad_token_id=self._tokenizer.pad_token_id)
        with self._rollout_mode() as student, self._mixed_precision():
            rollout = sampler.sample(student, self._prompt_token_lists(prompts))
        return rollout

    def _score(self, rollout: Rollout) -> TeacherTargets:
        """Teacher targets of the rollout; a teacher that scores a padded batch (a local/shared one) does so in row
        groups (exact, less padding).

        A teacher without ``scores_padded_batch`` (vLLM: it sends unpadded token lists already, or any object with
        just a ``score`` method) gets the batch in one call.
        """
        ids, mask = rollout.completion_ids, rollout.completion_mask
        if not self.args.length_groups or not getattr(self.teacher, "scores_padded_batch", False):
            return self._teacher_targets(rollout.prompt_ids, rollout.prompt_mask, ids, mask)
        groups = plan_groups(rollout.prompt_mask, mask, None, self.args.length_groups)
        parts = []
        for group in groups:
            rows, prompt = group.rows, slice(group.prompt_start, None)
            # completions keep their full width: targets of every group stack into (B, C, ...)
            parts.append(
                self._teacher_targets(
                    rollout.prompt_ids[rows, prompt], rollout.prompt_mask[rows, prompt], ids[rows], mask[rows]
                )
            )
        return merge_groups(parts, groups)

    def _teacher_targets(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherTargets:
        """One call of the teacher, in the run's precision, with the configured top-k, moved to the student's device.

        A vLLM teacher answers with CPU tensors and a local teacher may live on another GPU; the loss indexes the
        targets with masks on the student's device.
        """
        with self._mixed_precision():
            targets = self.teacher.score(
                prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=self.args.teacher_top_k
            )
        return targets.to(self.accelerator.device)

    # ----------------------------------------------------------------------------------------------- the batch
    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        """TRL's generation hook, shared by every trainer of the package: :meth:`_make_batch` + the normaliser.

        Returns a dict of tensors (TRL shuffles and splits it along dim 0, :mod:`opdlm_trl.batch`).
        """
        mode = "train" if self.model.training else "eval"
        batch = self._make_batch(inputs, mode)
        batch.num_items_in_batch = self._items_in_batch(batch)
        return batch.to_dict()

    def _make_batch(self, inputs: list[dict], mode: str) -> TrainingBatch:
        """OPD's batch: roll the student out, score the rollout with the teacher, choose the visited states."""
        rollout = self._roll_out([example["prompt"] for example in inputs])
        targets = self._score(rollout)
        states = select_states(rollout, self.args.state_selection, exclude_stop_token=self.args.exclude_stop_token)
        self._log_rollout(rollout, states, mode)
        return self._rollout_batch(rollout, targets, states)

    def _items_in_batch(self, batch: TrainingBatch) -> torch.Tensor:
        """Normaliser of the whole generation batch (all accumulation steps, all processes), see compute_loss."""
        count = L.normaliser_count(
            self._items_per_row(batch).to(self.accelerator.device), self.args.loss_normalization
        )
        return self.accelerator.gather(count.reshape(1)).sum()

    def _items_per_row(self, batch: TrainingBatch) -> torch.Tensor:
        """What :meth:`_reduce` averages over, per row: the supervised positions (``reduce_loss``)."""
        return batch.loss_mask.sum(1)

    def _rollout_batch(self, rollout: Rollout, targets: TeacherTargets, states: TrainingStates) -> TrainingBatch:
        """The batch ``compute_loss`` reads, from a rollout, its teacher targets and the chosen states."""
        rows = states.rows_of  # a selection may train several state rows per rollout row (every_step)
        return TrainingBatch(
            prompt_ids=rows(rollout.prompt_ids),
            prompt_mask=rows(rollout.prompt_mask),
            clean_ids=rows(self._clean_canvas(rollout)),
            noisy_ids=states.noisy_ids,
            completion_key_mask=rows(rollout.decoded_mask),  # every block the sampler ran: the keys of its forwards
            loss_mask=states.loss_mask,
            completion_ids=rows(rollout.completion_ids),
        ).with_targets(targets if states.source_row is None else targets.select(states.source_row))

    def _training_batch(self, rollout: Rollout, targets: TeacherTargets, states: TrainingStates) -> dict:
        """:meth:`_rollout_batch` as the dict TRL would pass to ``compute_loss``.

        A separate step so tests and tools can train on a fixed (recorded, seeded) rollout exactly as the trainer
        does; ``num_items_in_batch`` is left out because it depends on the whole generation batch.
        """
        return self._rollout_batch(rollout, targets, states).to_dict()

    def _clean_canvas(self, rollout: Rollout) -> torch.Tensor:
        """x0 as the sampler last saw it: never-committed positions of decoded blocks were still [MASK]."""
        never = ~shown_at(rollout.step_map) & rollout.decoded_mask.bool()
        return rollout.completion_ids.masked_fill(never, self.settings.mask_token_id)

    def _log_rollout(self, rollout: Rollout, states, mode: str) -> None:
        device = self.accelerator.device
        lengths = self.accelerator.gather(rollout.completion_mask.sum(1).to(device)).float()
        supervised = self.accelerator.gather(states.supervised_per_rollout_row(len(rollout.prompt_ids)).to(device))
        supervised = supervised.float()
        # one row per process: its batch's tokens per denoising step and forward count (NFE)
        per_process = torch.tensor([[rollout.tokens_per_step, rollout.nfe]], device=device, dtype=torch.float32)
        per_step, nfe = self.accelerator.gather(per_process).mean(0).tolist()
        metrics = self._metrics[mode]
        metrics["rollout/length"].append(lengths.mean().item())
        metrics["rollout/tokens_per_step"].append(per_step)
        metrics["rollout/nfe"].append(nfe)  # mean over processes
        stopped = torch.tensor([r == "stop" for r in rollout.finish_reason], device=device, dtype=torch.float32)
        metrics["rollout/stopped_ratio"].append(self.accelerator.gather(stopped).mean().item())  # all processes' rows
        # commits made while a position to their left in the block was still masked (all processes' rows): what the
        # left-to-right commit order rules out (docs/sampling.md)
        late, commits = out_of_order_commits(rollout.step_map, rollout.completion_mask, self.settings.block_size)
        late, commits = self.accelerator.gather(torch.tensor([[late, commits]], device=device)).sum(0).tolist()
        metrics["rollout/out_of_order_rate"].append(late / max(commits, 1))
        metrics["supervised_per_row"].append(supervised.mean().item())
        metrics["curriculum/length"].append(float(self.current_completion_length()))
        metrics["curriculum/threshold"].append(self.current_rollout_threshold())
        if mode == "train":
            tokens = self._count_training_tokens(lengths)
            metrics["flops"] = [float(2 * self._teacher_params * tokens + 6 * self._student_params * tokens)]
        if self.log_completions:
            self._logs["prompt"].extend(self._gather_texts(rollout.prompt_ids, rollout.prompt_mask))
            self._logs["completion"].extend(self._gather_texts(rollout.completion_ids, rollout.completion_mask))

    def _count_training_tokens(self, lengths: torch.Tensor) -> int:
        """Add the gathered completion ``lengths`` of a training batch to the cumulative ``training_tokens``."""
        self._progress.training_tokens += int(lengths.sum().item())
        self._metrics["train"]["training_tokens"] = [float(self._progress.training_tokens)]
        return self._progress.training_tokens

    def _gather_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        from accelerate.utils import gather_object

        texts = [
            self._tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask, strict=True)
        ]
        return gather_object(texts)

    # ----------------------------------------------------------------------------------------------- loss
    # The loss's name in errors (OffPolicyKD trains OPD's divergence, so it keeps "OPD") and what a non-finite loss
    # most likely means (subclasses with another loss say their own).
    _loss_name = "OPD"
    _nonfinite_hint = (
        "Lower the learning rate, check the teacher's targets (a vLLM teacher returning -inf?), or train in "
        "float32/bf16 rather than fp16."
    )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss hook, shared by every trainer of the package: forward, per-position loss, reduce, metrics.

        The student's forward stops at its final hidden states (at the supervised positions); the output heads turn
        them into logits ``loss_chunk_size`` positions at a time (:meth:`_loss_and_metric_sums`), so no ``(N, V)``
        tensor of the whole micro-batch exists.
        """
        mode = "train" if self.model.training else "eval"
        batch = TrainingBatch.of(inputs)
        hidden = self._student_hidden(model, batch)  # (N, H) at supervised positions
        per_position, sums = self._loss_and_metric_sums(hidden, batch)
        loss = self._reduce(per_position, batch, self._normaliser(batch))
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
        """One chunk: student logits from its head, teacher log-probs from theirs if held as hidden states."""
        with self._mixed_precision():
            logits = self._student_head.logits(hidden)
            teacher_hidden = rows.targets.get("hidden")
            if teacher_hidden is not None:
                with torch.no_grad():
                    rows = rows.with_target("full_logprobs", self._teacher_head.log_probs(teacher_hidden))
        per_position = self._per_position_loss(logits, rows)
        with torch.no_grad():
            metric = self._metric_sums(logits.detach(), per_position.detach(), rows)
        return per_position, metric

    @property
    def _student_head(self) -> OutputHead:
        """The student's output head over all its rows, ``[MASK]`` suppressed (the sampler's rule)."""
        return OutputHead.of(self.model, suppressed_ids=(self.settings.mask_token_id,))

    @property
    def _teacher_head(self) -> OutputHead:
        head = getattr(self.teacher, "head", None)
        if head is None:
            raise ValueError(
                f"The batch holds teacher hidden states but the teacher ({type(self.teacher).__name__}) has no `head` "
                "to turn them into log-probs: return full_logprobs or top-k targets from its score()."
            )
        return head

    def _frontier_offsets(self, batch: TrainingBatch) -> torch.Tensor:
        """Distance of each supervised position from its block's frontier (the confidence-by-offset metrics)."""
        return frontier_offsets(batch.supervised, self.settings.block_size)[batch.supervised]

    def _normaliser(self, batch: TrainingBatch) -> torch.Tensor | None:
        """The generation batch's count over all processes / num_processes (training only).

        Summing the micro-batch losses of one accumulation window and averaging gradients over processes (DDP)
        then gives the mean over the whole batch. Evaluation reduces each batch on its own.
        """
        if not self.model.training or batch.num_items_in_batch is None:
            return None
        return batch.num_items_in_batch.float() / self.accelerator.num_processes

    def _reduce(self, per_position: torch.Tensor, batch: TrainingBatch, normaliser) -> torch.Tensor:
        """OPD's reduction: per-row means (``sequence``) or the token mean, :func:`opdlm_trl.losses.reduce_loss`."""
        return L.reduce_loss(
            per_position,
            batch.row_index,
            batch.loss_mask.shape[0],
            self.args.loss_normalization,
            num_items_in_batch=normaliser,
            num_rows_in_batch=normaliser,
        )

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

    def _student_logits(self, model, inputs: TrainingBatch | dict) -> torch.Tensor:
        """``(N, V)`` float32 student logits at the supervised positions (``[MASK]`` suppressed).

        What the loss sees, materialised at once: for tests and tools on small batches; training never builds it.
        """
        return self._student_head.logits(self._student_hidden(model, inputs))

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
        with decoder_output(model) as captured, self._mixed_precision():
            model(
                input_ids=layout.input_ids,
                attention_mask=layout.attention_mask,
                position_ids=layout.position_ids,
                logits_to_keep=no_logits,
                use_cache=False,
            )
        return captured.hidden[:, layout.source_index][selected]

    def _per_position_loss(self, student_logits: torch.Tensor, rows: SupervisedRows) -> torch.Tensor:
        """OPD's divergence to the teacher at every supervised position of a chunk, ``(n,)``: the loss registered
        as ``args.loss_type`` (:data:`opdlm_trl.losses.DIVERGENCES`)."""
        return L.divergence(self.args.loss_type)(student_logits, rows, self.args)

    def _metric_sums(self, student_logits, per_position, rows: SupervisedRows) -> torch.Tensor:
        """This chunk's metric sums (one flat tensor; chunks and then processes are summed by ``compute_loss``).

        ``[divergence, top-1 agreement, positions]`` then the confidence sums by distance from each block's frontier.
        """
        targets = rows.targets
        agreement = L.top1_matches(
            student_logits, teacher_top_ids=targets["top_ids"], teacher_full_logprobs=targets["full_logprobs"]
        ).float()
        count = torch.tensor(float(per_position.numel()), device=student_logits.device)
        sums = torch.stack([per_position.detach().sum(), agreement.sum(), count])
        teacher_logprob = teacher_top1_logprob(targets["top_logprobs"], targets["full_logprobs"])
        teacher_prob = None if teacher_logprob is None else teacher_logprob.exp()
        by_offset = offset_confidence_sums(top1_probability(student_logits), teacher_prob, rows.frontier_offset)
        return torch.cat([sums, by_offset.flatten()])

    def _log_metric_sums(self, sums: torch.Tensor, batch: TrainingBatch, mode: str) -> None:
        """Turn the all-process sums of :meth:`_metric_sums` into logged means."""
        if sums[2] > 0:
            self._metrics[mode]["divergence"].append((sums[0] / sums[2]).item())
            self._metrics[mode]["agreement"].append((sums[1] / sums[2]).item())
        for name, value in offset_confidence_metrics(sums[3:].view(4, -1)).items():
            self._metrics[mode][name].append(value)

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
        """TRL's sampler, with an epoch order that a resume repeats (TRL's replays epoch 0's order on resume)."""
        return resumable_sampler(super()._get_train_sampler(dataset))

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
