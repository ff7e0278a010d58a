"""`OPDTrainer`: on-policy self-distillation of an ARLM into a block-diffusion LM, on :class:`DiffusionTrainer`.

One optimisation step, as data (docs/trainer.md has the long version), each a public method of the trainer:

1. prompts -> chat template -> token lists                           (:func:`opdlm_trl.data.render_prompts`)
2. the student decodes them with the diffusion sampler               :meth:`OPDTrainer.rollout`
3. the frozen teacher scores the finished sequences                  :meth:`OPDTrainer.score`
4. visited states are chosen from the trajectory record              (:func:`opdlm_trl.states.select_states`)
5. the ``[prompt | x0 | x_t]`` batch with its normaliser             :meth:`OPDTrainer.training_batch`
6. one block-causal forward of the student, divergence to the teacher at the still-masked positions
                                                                     (``compute_loss``, :mod:`opdlm_trl.losses`)

:class:`TeacherDistillationTrainer` is the part OPD shares with off-policy KD (:mod:`opdlm_trl.baselines`): a
frozen teacher, its targets and the divergence to them. The rest (the student's forward, the chunked loss and its
reduction, precision, checkpoints, resume) is :class:`opdlm_trl.diffusion_trainer.DiffusionTrainer`'s.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from . import losses as L
from ._trl import prepare_deepspeed, unwrap_model_for_generation
from .batch import SupervisedRows, TrainingBatch
from .config import DiffusionTrainingConfig, OPDConfig
from .curriculum import completion_length, rollout_threshold
from .diagnostics import (
    offset_confidence_metrics,
    offset_confidence_sums,
    out_of_order_commits,
    teacher_top1_logprob,
    top1_probability,
)
from .diffusion_trainer import DiffusionTrainer, OPDProgress, is_converted, load_pretrained, load_student
from .grouping import merge_groups, plan_groups
from .heads import OutputHead
from .masks import shown_at
from .modeling import unwrap_model
from .sampling import DiffusionSampler, Rollout, SamplerConfig
from .states import TrainingStates, select_states
from .teachers import TeacherTargets, build_teacher
from .teachers.factory import AUTO, resolve_kind, teacher_class

__all__ = ["OPDProgress", "OPDTrainer", "TeacherDistillationTrainer", "load_pretrained"]


class TeacherDistillationTrainer(DiffusionTrainer):
    """A diffusion student trained toward a frozen teacher's targets: OPD's divergence, shared with off-policy KD.

    Adds to :class:`DiffusionTrainer` the teacher (built from ``teacher_backend``, :mod:`opdlm_trl.teachers`), its
    scoring in the run's precision, and the loss registered as ``args.loss_type`` with its metrics (divergence,
    top-1 agreement, confidence by distance from the block's frontier). Subclasses provide the batch builder.

    Args: as :class:`DiffusionTrainer`, plus
        teacher_model: the frozen original ARLM (path or model). Defaults: with ``peft_config`` the student's own
            base weights with adapters disabled (``shared``: no extra memory); otherwise a frozen copy of ``model``
            taken before conversion. Ignored for vLLM teacher backends.
        teacher: an explicit :class:`opdlm_trl.teachers.Teacher` (overrides ``teacher_backend``).
    """

    _loss_name = "OPD"  # off-policy KD trains OPD's divergence, so its errors keep the name
    _nonfinite_hint = (
        "Lower the learning rate, check the teacher's targets (a vLLM teacher returning -inf?), or train in "
        "float32/bf16 rather than fp16."
    )

    def __init__(
        self,
        model,
        teacher_model=None,
        args: DiffusionTrainingConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        teacher=None,
    ):
        args = self._checked_config(args)
        model, processing_class = load_student(model, args, processing_class)
        if isinstance(teacher_model, str):
            teacher_model = load_pretrained(teacher_model, args.teacher_model_init_kwargs, args.trust_remote_code)
        if self._keeps_frozen_copy(model, teacher_model, args, peft_config, teacher):
            if is_converted(model):
                raise ValueError(
                    "The student is already converted and is fully fine-tuned, so its weights are not the original "
                    "ARLM: pass `teacher_model` (the original model or its path), use a vLLM teacher backend, or "
                    "train with a peft_config (the shared-weights teacher)."
                )
            teacher_model = copy.deepcopy(model)  # before conversion: the original ARLM
        super().__init__(
            model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        if teacher_model is not None:
            self._check_teacher_vocab(teacher_model)
        self.teacher = teacher or self._build_teacher(teacher_model)
        # the step's FLOPs metric: 2 per teacher parameter and 6 per student parameter per token
        self._teacher_params = self._count_teacher_parameters(teacher_model)
        self._student_params = sum(p.numel() for p in unwrap_model(self.model).parameters())

    # ----------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _keeps_frozen_copy(model, teacher_model, args, peft_config, teacher) -> bool:
        """Whether the teacher is a frozen copy of the student taken before conversion: a local teacher, with no
        teacher given and no adapters (adapters make the shared-weights teacher)."""
        return (
            teacher is None
            and teacher_model is None
            and peft_config is None
            and (args.teacher_backend == AUTO or teacher_class(args.teacher_backend).needs_teacher_model)
            and not hasattr(model, "peft_config")
        )

    def _check_teacher_vocab(self, teacher_model) -> None:
        teacher_vocab = unwrap_model(teacher_model).get_input_embeddings().weight.shape[0]
        if teacher_vocab != self.settings.teacher_vocab_size:
            raise ValueError(
                f"Teacher vocabulary ({teacher_vocab} rows) differs from the student's original vocabulary "
                f"({self.settings.teacher_vocab_size}): the teacher must be the ARLM the student was converted from."
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

    # ----------------------------------------------------------------------------------------------- targets
    def _teacher_targets(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherTargets:
        """One call of the teacher, in the run's precision, with the configured top-k, moved to the student's device.

        A vLLM teacher answers with CPU tensors and a local teacher may live on another GPU; the loss indexes the
        targets with masks on the student's device.
        """
        with self._autocast():
            targets = self.teacher.score(
                prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=self.args.teacher_top_k
            )
        return targets.to(self.accelerator.device)

    # ----------------------------------------------------------------------------------------------- loss
    @property
    def _teacher_head(self) -> OutputHead:
        head = getattr(self.teacher, "head", None)
        if head is None:
            raise ValueError(
                f"The batch holds teacher hidden states but the teacher ({type(self.teacher).__name__}) has no `head` "
                "to turn them into log-probs: return full_logprobs or top-k targets from its score()."
            )
        return head

    def _resolve_targets(self, rows: SupervisedRows) -> SupervisedRows:
        """Full-vocabulary targets held as the teacher's hidden states become its log-probs, one chunk at a time."""
        teacher_hidden = rows.targets.get("hidden")
        if teacher_hidden is None:
            return rows
        with torch.no_grad():
            return rows.with_target("full_logprobs", self._teacher_head.log_probs(teacher_hidden))

    def _per_position_loss(self, student_logits: torch.Tensor, rows: SupervisedRows) -> torch.Tensor:
        """The divergence to the teacher at every supervised position of a chunk, ``(n,)``: the loss registered
        as ``args.loss_type`` (:data:`opdlm_trl.losses.DIVERGENCES`)."""
        return L.divergence(self.args.loss_type)(student_logits, rows, self.args)

    def _reduction_counts(self, batch: TrainingBatch) -> torch.Tensor:
        """The supervised positions of each row (:func:`opdlm_trl.losses.reduce_loss` averages over them)."""
        return batch.loss_mask.sum(1)

    def _reduce(self, per_position: torch.Tensor, batch: TrainingBatch, normaliser) -> torch.Tensor:
        """Per-row means (``sequence``) or the token mean, :func:`opdlm_trl.losses.reduce_loss`."""
        return L.reduce_loss(
            per_position,
            batch.row_index,
            batch.loss_mask.shape[0],
            self.args.loss_normalization,
            num_items_in_batch=normaliser,
            num_rows_in_batch=normaliser,
        )

    def _metric_sums(self, student_logits, per_position, rows: SupervisedRows) -> torch.Tensor:
        """``[divergence, top-1 agreement, positions]`` then the confidence sums by distance from each block's
        frontier."""
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
        if sums[2] > 0:
            self._metrics[mode]["divergence"].append((sums[0] / sums[2]).item())
            self._metrics[mode]["agreement"].append((sums[1] / sums[2]).item())
        for name, value in offset_confidence_metrics(sums[3:].view(4, -1)).items():
            self._metrics[mode][name].append(value)


class OPDTrainer(TeacherDistillationTrainer):
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

    One step by hand, as the trainer runs it (each a public method; docs/trainer.md)::

        rollout = trainer.rollout(prompts)
        targets = trainer.score(rollout)
        states = select_states(rollout, trainer.args.state_selection)
        batch = trainer.training_batch(rollout, targets, states)
        trainer.compute_loss(trainer.model, batch.to_dict()).backward()
    """

    _tag_names = ["trl", "opdlm", "diffusion-lm", "on-policy-distillation"]
    _name = "OPD"
    config_class = OPDConfig
    _default_output_dir = "opd-output"

    # ----------------------------------------------------------------------------------------------- schedules
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

    # ----------------------------------------------------------------------------------------------- the step
    def rollout(
        self, prompts: list, sampler: DiffusionSampler | None = None, generator: torch.Generator | None = None
    ) -> Rollout:
        """The student decodes ``prompts`` (text or chat messages) as a training step does: the trainer's prompt
        rendering, gathered ZeRO-3 weights, eval mode, no grad, the run's precision (:meth:`precision`).

        ``sampler``: another sampler (e.g. one recording logits, or full-length static decoding); default: the one
        :meth:`sampler_config` describes at the current curriculum step. ``generator`` seeds the sampler's draws.
        """
        if sampler is None:
            sampler = DiffusionSampler(
                self.sampler_config(self.current_completion_length()), pad_token_id=self._tokenizer.pad_token_id
            )
        with self._rollout_mode() as student, self._autocast():
            return sampler.sample(student, self.prompt_token_lists(prompts), generator=generator)

    def score(self, rollout: Rollout) -> TeacherTargets:
        """The teacher's targets for the rollout's completions, on the student's device, in the run's precision.

        A teacher that scores a padded batch (``scores_padded_batch``: a local / shared one) does so in
        ``length_groups`` row groups (exact, less padding). One without it (vLLM: it sends unpadded token lists
        already, or any object with just a ``score`` method) gets the batch in one call.
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

    def training_batch(self, rollout: Rollout, targets: TeacherTargets, states: TrainingStates) -> TrainingBatch:
        """The batch ``compute_loss`` trains on, from a rollout, its teacher targets and the chosen states, with its
        ``normaliser`` (this batch taken as the whole generation batch; a collective under several processes).

        ``x0`` is the canvas the sampler last saw; the keys are every block the sampler ran. Pass
        ``batch.to_dict()`` to ``compute_loss``.
        """
        rows = states.rows_of  # a selection may train several state rows per rollout row (every_step)
        batch = TrainingBatch(
            prompt_ids=rows(rollout.prompt_ids),
            prompt_mask=rows(rollout.prompt_mask),
            clean_ids=rows(self._clean_canvas(rollout)),
            noisy_ids=states.noisy_ids,
            completion_key_mask=rows(rollout.decoded_mask),  # every block the sampler ran: the keys of its forwards
            loss_mask=states.loss_mask,
            completion_ids=rows(rollout.completion_ids),
        ).with_targets(targets if states.source_row is None else targets.select(states.source_row))
        return self._with_normaliser(batch)

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

    def _batch_from_examples(self, examples: list[dict], mode: str) -> TrainingBatch:
        """OPD's batch: roll the student out, score the rollout with the teacher, choose the visited states."""
        rollout = self.rollout([example["prompt"] for example in examples])
        targets = self.score(rollout)
        states = select_states(rollout, self.args.state_selection, exclude_stop_token=self.args.exclude_stop_token)
        self._log_rollout(rollout, states, mode)
        return self.training_batch(rollout, targets, states)

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

    def _gather_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        from accelerate.utils import gather_object

        texts = [
            self._tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask, strict=True)
        ]
        return gather_object(texts)
