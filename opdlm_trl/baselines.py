"""Baselines that OPD is measured against, on the same conversion, data pipeline, forward and sampler.

* :class:`MDLMTrainer` — the MDLM / BD3LM objective of prior conversions (docs/method.md §5) on *given* text:
  mask the completion at a random rate ``t ~ U(eps, 1)`` (one per row, or one per block) and train
  ``(1/t) sum_masked -log p_S(x0_i)``. With the teacher's greedy answers as completions it is "SFT on teacher
  answers"; with raw reference text (HumanEval canonical solutions) it is the plain data-driven conversion.
* :class:`OffPolicyKDTrainer` — the OPD forward-KL-to-teacher loss, but on given (teacher-generated)
  responses with random masks instead of the student's own rollouts (the paper's off-policy KD ablation).
* :func:`teacher_responses` — greedy answers of the original ARLM (the SFT / KD data) and what they cost.

Both trainers are a :class:`GivenTextTrainer`, the package's :class:`opdlm_trl.diffusion_trainer.DiffusionTrainer`
(generation hook, ``compute_loss``, normaliser, finite-loss check, metric gathering) fed with dataset rows instead of
rollouts: ``prompt`` + ``completion`` become the very same ``[prompt | x0 | x_t]``
:class:`opdlm_trl.batch.TrainingBatch` (prompt left-padded to a block boundary, completion right-padded to whole
blocks), trained by the same block-causal student forward, so the shift convention, masks and logits alignment are
shared with OPD. MDLM brings its own loss, reduction and metrics; off-policy KD is also a
:class:`opdlm_trl.trainer.TeacherDistillationTrainer` and trains OPD's divergence to the teacher.
``training_tokens`` counts the completion tokens trained on, so budgets compare with OPD's generated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import losses as L
from .autoregressive import autoregressive_greedy
from .batch import SupervisedRows, TrainingBatch
from .config import DiffusionTrainingConfig
from .data import is_conversational, tokenize_prompts
from .diffusion_trainer import DiffusionTrainer
from .losses import mdlm_reduce  # noqa: F401  (re-exported: defined in losses.py with the other reductions)
from .masks import pad_to_blocks
from .sampling import default_stop_token_ids
from .states import TrainingStates, mdlm_states
from .teachers import TeacherTargets
from .trainer import TeacherDistillationTrainer

__all__ = [
    "FINISHED_COLUMN",
    "GivenTextBatch",
    "GivenTextTrainer",
    "MDLMConfig",
    "MDLMTrainer",
    "OffPolicyKDTrainer",
    "completion_text",
    "mdlm_reduce",
    "right_pad_to_blocks",
    "teacher_responses",
]

# Optional dataset column: False marks a completion cut off by the generation limit (no end-of-turn is appended).
FINISHED_COLUMN = "completion_finished"


@dataclass
class MDLMConfig(DiffusionTrainingConfig):
    r"""Configuration of [`MDLMTrainer`] and [`OffPolicyKDTrainer`]: training on given completions.

    [`DiffusionTrainingConfig`]'s fields (no rollout field: nothing is decoded during training) plus the random
    masks of the given text. `max_completion_length` truncates the given completions (end-of-turn token included);
    the teacher fields are read by [`OffPolicyKDTrainer`] only.
    """

    mask_weighting: str = field(
        default="inverse_t",
        metadata={"help": "MDLM weight of a masked position: 'inverse_t' (1/t, the MDLM/BD3LM ELBO) or 'uniform'."},
    )
    mask_eps: float = field(
        default=1e-3, metadata={"help": "Lower bound of the masking rate t ~ U(eps, 1); keeps 1/t finite."}
    )
    block_masking: bool = field(
        default=True,
        metadata={
            "help": "True: one rate t_b per block (BD3LM); False: one rate per sequence (MDLM). The "
            "off-policy KD trainer always uses one rate per sequence (OPD's random_remask states)."
        },
    )
    completion_column: str = field(
        default="completion",
        metadata={"help": "Dataset column holding the target text: a string or an assistant message list."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.mask_weighting not in L.MDLM_WEIGHTINGS:
            raise ValueError(f"mask_weighting={self.mask_weighting!r} is not one of {L.MDLM_WEIGHTINGS}.")
        if not 0.0 < self.mask_eps < 1.0:
            raise ValueError(f"mask_eps must lie in (0, 1), got {self.mask_eps}.")


# ---------------------------------------------------------------------------------------------- given text


def completion_text(completion: Any) -> str:
    """Plain text of a completion: a string, or the concatenated contents of assistant messages."""
    if isinstance(completion, str):
        return completion
    if is_conversational(completion):
        return "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")
    raise ValueError(
        f"A completion must be a string or a list of assistant messages, got {type(completion).__name__}."
    )


def right_pad_to_blocks(
    sequences: Sequence[Sequence[int]], block_size: int, pad_token_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to whole blocks: ``(ids, mask)`` of width ``ceil(max_len / block) * block``.

    At least one block, so an all-empty batch still has a completion block (:func:`opdlm_trl.masks.pad_to_blocks`).
    """
    return pad_to_blocks(sequences, block_size, pad_token_id, "right", device, min_length=1)


@dataclass
class GivenTextBatch:
    """A prompt + given-completion batch in the sampler's layout (what a rollout would have produced)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor


class GivenTextTrainer(DiffusionTrainer):
    """A diffusion student trained on *given* completions (dataset rows with ``prompt`` + a completion column).

    Turns the rows into the tensors a rollout would have provided (:meth:`given_text`), masks them at random
    (:meth:`_random_mask_states`) and builds the training batch (:meth:`training_batch`). Subclasses choose the
    masking, the targets and the loss in :meth:`_batch_from_examples`.

    Args: as :class:`opdlm_trl.diffusion_trainer.DiffusionTrainer`, with an :class:`MDLMConfig` and datasets holding
    ``prompt`` and ``completion`` (``MDLMConfig.completion_column``) columns.
    """

    config_class = MDLMConfig

    def __init__(self, model, args: MDLMConfig | None = None, train_dataset=None, eval_dataset=None, **kwargs):
        args = self._checked_config(args)
        self._check_completion_column(train_dataset, "train_dataset", args.completion_column)
        self._check_completion_column(eval_dataset, "eval_dataset", args.completion_column)
        super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", self.args.completion_column, FINISHED_COLUMN]

    @staticmethod
    def _check_completion_column(dataset, name: str, column: str) -> None:
        columns = getattr(dataset, "column_names", None)
        if dataset is not None and columns is not None and column not in columns:
            raise ValueError(
                f"{name} has no `{column}` column (found {columns}): the baseline trainers train on given "
                "completions. Build one with opdlm_trl.baselines.teacher_responses or set "
                "MDLMConfig.completion_column."
            )

    def _end_of_turn_id(self) -> int:
        """The token the sampler stops on (EOS / end of turn), appended to every completion."""
        eos = self._tokenizer.eos_token_id
        if eos is None:
            eos = sorted(self.eos_token_ids)[0]
        return int(eos)

    def _completion_token_lists(self, completions: Sequence[Any], finished: Sequence[bool]) -> list[list[int]]:
        """Completion tokens + the end-of-turn token, unless the row is a truncated answer (``finished`` False):
        a cut-off answer must not teach the student to stop there."""
        texts = [completion_text(c) for c in completions]
        encoded = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        end = [self._end_of_turn_id()]
        limit = self.args.max_completion_length
        return [(list(ids) + (end if done else []))[:limit] for ids, done in zip(encoded, finished, strict=True)]

    def given_text(self, examples: list[dict]) -> GivenTextBatch:
        """Dataset rows as a rollout would have laid them out: prompts rendered and left-padded to a block boundary,
        completions (+ end of turn unless cut off) right-padded to whole blocks."""
        device = self.accelerator.device
        block = self.settings.block_size
        pad = self._tokenizer.pad_token_id
        prompt_ids, prompt_mask = pad_to_blocks(
            self.prompt_token_lists([x["prompt"] for x in examples]), block, pad, "left", device
        )
        completions = self._completion_token_lists(
            [x[self.args.completion_column] for x in examples],
            [bool(x.get(FINISHED_COLUMN, True)) for x in examples],
        )
        completion_ids, completion_mask = right_pad_to_blocks(completions, block, pad, device)
        return GivenTextBatch(prompt_ids, prompt_mask, completion_ids, completion_mask)

    def _random_mask_states(self, given: GivenTextBatch, per_block: bool) -> TrainingStates:
        """Random masks of the given completions at rates t ~ U(mask_eps, 1), per block or per sequence."""
        return mdlm_states(
            given.completion_ids,
            given.completion_mask,
            self.settings.block_size,
            self.settings.mask_token_id,
            eps=self.args.mask_eps,
            per_block=per_block,
        )

    def _count_tokens(self, given: GivenTextBatch, states: TrainingStates, mode: str) -> None:
        """``training_tokens`` = completion tokens trained on (comparable with OPD's generated tokens)."""
        device = self.accelerator.device
        lengths = self.accelerator.gather(given.completion_mask.sum(1).to(device)).float()
        supervised = self.accelerator.gather(states.loss_mask.sum(1).to(device)).float()
        metrics = self._metrics[mode]
        metrics["completion/length"].append(lengths.mean().item())
        metrics["supervised_per_row"].append(supervised.mean().item())
        metrics["mask_rate"].append(states.mask_rate.mean().item())
        if mode == "train":
            self._count_training_tokens(lengths)

    def training_batch(
        self, given: GivenTextBatch, states: TrainingStates, targets: TeacherTargets | None = None
    ) -> TrainingBatch:
        """The batch ``compute_loss`` trains on, with its ``normaliser`` (a collective under several processes):
        ``x0`` is the given completion, its real tokens are the keys; ``targets``: the teacher's, if any.

        Carries each position's masking rate (MDLM's ``1/t``) and each row's completion length (MDLM's divisor).
        """
        batch = TrainingBatch(
            prompt_ids=given.prompt_ids,
            prompt_mask=given.prompt_mask,
            clean_ids=given.completion_ids,
            noisy_ids=states.noisy_ids,
            completion_key_mask=given.completion_mask,  # padding is never attended
            loss_mask=states.loss_mask,
            completion_ids=given.completion_ids,
            position_rate=states.position_rate,
            row_tokens=given.completion_mask.sum(1),
        )
        if targets is not None:
            batch = batch.with_targets(targets)
        return self._with_normaliser(batch)


# ---------------------------------------------------------------------------------------------- MDLM


class MDLMTrainer(GivenTextTrainer):
    """The MDLM / BD3LM conversion objective on given completions: no rollouts, no teacher.

    Args: as :class:`GivenTextTrainer` (``model``, ``args``, ``train_dataset``, ``eval_dataset``,
    ``processing_class``, ``callbacks``, ``optimizers``, ``peft_config``).
    """

    _tag_names = ["trl", "opdlm", "diffusion-lm", "mdlm"]
    _name = "MDLM"
    _default_output_dir = "mdlm-output"
    _loss_name = "MDLM"
    _nonfinite_hint = "Raise mask_eps or lower the learning rate."

    def __init__(self, model, args: MDLMConfig | None = None, train_dataset=None, eval_dataset=None, **kwargs):
        given = sorted({"teacher_model", "teacher"} & set(kwargs))
        if given:
            raise TypeError(
                f"MDLMTrainer trains without a teacher: drop {', '.join(given)} (OffPolicyKDTrainer uses one)."
            )
        super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)

    def _batch_from_examples(self, examples: list[dict], mode: str) -> TrainingBatch:
        """Given completions, randomly masked at rate ``t`` per block (or row): no rollout, no teacher."""
        given = self.given_text(examples)
        states = self._random_mask_states(given, per_block=self.args.block_masking)
        self._count_tokens(given, states, mode)
        return self.training_batch(given, states)

    def _reduction_counts(self, batch: TrainingBatch) -> torch.Tensor:
        """MDLM divides each row by its completion length (:func:`opdlm_trl.losses.mdlm_reduce`)."""
        return batch.row_tokens

    def _per_position_loss(self, student_logits: torch.Tensor, rows: SupervisedRows) -> torch.Tensor:
        """``-log p_S(x0_i)`` weighted by ``1/t`` (or uniformly) at the masked positions."""
        return L.mdlm_loss(student_logits, rows.tokens, rows.position_rate, weighting=self.args.mask_weighting)

    def _reduce(self, per_position: torch.Tensor, batch: TrainingBatch, normaliser) -> torch.Tensor:
        return L.mdlm_reduce(per_position, batch.row_index, batch.row_tokens, self.args.loss_normalization, normaliser)

    def _metric_sums(self, student_logits, per_position, rows: SupervisedRows) -> torch.Tensor:
        """``[masked NLL, masked accuracy, positions]`` of this chunk."""
        tokens = rows.tokens
        nll = -L.student_token_log_probs(student_logits, tokens)
        accuracy = (student_logits.argmax(-1) == tokens).float()
        return torch.stack([nll.sum(), accuracy.sum(), torch.tensor(float(tokens.numel()), device=nll.device)])

    def _log_metric_sums(self, sums: torch.Tensor, batch: TrainingBatch, mode: str) -> None:
        if sums[2] > 0:
            self._metrics[mode]["masked_nll"].append((sums[0] / sums[2]).item())
            self._metrics[mode]["masked_accuracy"].append((sums[1] / sums[2]).item())


# ---------------------------------------------------------------------------------------------- off-policy KD


class OffPolicyKDTrainer(GivenTextTrainer, TeacherDistillationTrainer):
    """OPD's divergence to the teacher on *given* (teacher-generated) responses with random masks.

    The teacher scores ``prompt + completion`` exactly as it scores a rollout; the states are OPD's
    ``random_remask`` forward process (one ``t ~ U(eps, 1)`` per row), so the only difference from
    ``OPDTrainer(state_selection="random_remask")`` is where ``x0`` comes from.

    Args: as :class:`GivenTextTrainer`, plus ``teacher_model`` and ``teacher`` as
    :class:`opdlm_trl.trainer.TeacherDistillationTrainer` takes them.
    """

    _tag_names = ["trl", "opdlm", "diffusion-lm", "off-policy-distillation"]
    _name = "OffPolicyKD"
    _default_output_dir = "kd-output"

    def __init__(
        self,
        model,
        teacher_model=None,
        args: MDLMConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        **kwargs,
    ):
        super().__init__(
            model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )

    def _batch_from_examples(self, examples: list[dict], mode: str) -> TrainingBatch:
        """Given completions scored by the teacher, randomly masked at one rate ``t`` per row."""
        given = self.given_text(examples)
        targets = self._teacher_targets(
            given.prompt_ids, given.prompt_mask, given.completion_ids, given.completion_mask
        )
        states = self._random_mask_states(given, per_block=False)
        self._count_tokens(given, states, mode)
        return self.training_batch(given, states, targets)


# ---------------------------------------------------------------------------------------------- teacher data


@torch.no_grad()
def teacher_responses(
    model,
    tokenizer,
    prompts,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    chat_template_kwargs: dict | str | None = None,
):
    """Greedy answers of the original AR model: the data of SFT-on-teacher-answers and off-policy KD.

    Prompts are rendered by :func:`opdlm_trl.data.render_prompts` with ``chat_template_kwargs`` (pass the
    training config's, e.g. ``{"enable_thinking": False}`` for Qwen3's non-thinking mode, so the teacher answers
    the very prompts the student is trained on) and stop at :func:`opdlm_trl.sampling.default_stop_token_ids`.

    ``prompts``: a ``datasets.Dataset`` with a ``prompt`` column (its other columns are kept) or a list
    of prompts (text or chat messages). Returns a Dataset with ``completion`` (text, special tokens
    dropped), ``completion_tokens`` (generated tokens up to and including the stop token: the
    generation cost docs/method.md §9 says to count) and ``completion_finished`` (False where ``max_new_tokens`` cut
    the answer off; the trainers then append no end-of-turn token) added. ``tokenizer.pad_token_id`` must
    be set.
    """
    from datasets import Dataset

    rows = prompts if hasattr(prompts, "column_names") else Dataset.from_dict({"prompt": list(prompts)})
    token_lists = tokenize_prompts(rows, tokenizer, max_prompt_length, "left", chat_template_kwargs)
    stop_ids = default_stop_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    texts: list[str] = []
    counts: list[int] = []
    finished: list[bool] = []
    for start in range(0, len(token_lists), batch_size):
        _, _, generated, keep = autoregressive_greedy(
            model, token_lists[start : start + batch_size], tokenizer.pad_token_id, max_new_tokens, stop_ids
        )
        generated, keep = generated.cpu(), keep.cpu().bool()
        counts.extend(keep.sum(1).tolist())
        finished.extend(torch.isin(generated, torch.tensor(stop_ids)).any(1).tolist())
        texts.extend(
            tokenizer.batch_decode(
                [row[k].tolist() for row, k in zip(generated, keep, strict=True)], skip_special_tokens=True
            )
        )
    model.train(was_training)
    return (
        rows.add_column("completion", texts)
        .add_column("completion_tokens", counts)
        .add_column(FINISHED_COLUMN, finished)
    )
