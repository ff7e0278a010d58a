"""The TRL / transformers surface opdlm_trl relies on, in one place (checked by tests/unit/test_trl_contract.py).

Every trainer of the package is TRL's ``DistillationTrainer`` with its generation and loss hooks replaced
(:class:`opdlm_trl.diffusion_trainer.DiffusionTrainer`), so it depends on names TRL does not promise to keep:
private methods, private attributes, helpers in ``trl.*.utils``. Every one of them is imported or named here, with
why it is needed, so that a TRL upgrade that moves one fails in ``tests/unit/test_trl_contract.py`` with a message
saying what moved, instead of deep inside a training step.

Imported (use these, not the TRL paths):

* ``DistillationConfig`` / ``DistillationTrainer``: the base classes of ``DiffusionTrainingConfig`` /
  ``DiffusionTrainer``.
* ``prepare_deepspeed(model, accelerator)``: wraps a local teacher for ZeRO inference (no optimizer state).
* ``unwrap_model_for_generation(model, accelerator, gather_deepspeed3_params=..., gradient_checkpointing_kwargs=...)``:
  the student decodes rollouts with gathered ZeRO-3 weights and gradient checkpointing off.
* ``split_tensor_dict`` / ``shuffle_sequence_dict``: not called by us, but ``DistillationTrainer._prepare_inputs``
  runs them on the dict our generation hook returns (see :data:`BATCH_CONTRACT`).
* ``RepeatSampler``: TRL's training sampler, which :mod:`opdlm_trl.checkpoints` makes resumable.
* ``create_model_from_path(model_id, architecture=None, **kwargs)``: TRL's model loading (``dtype`` strings, its
  transformers-version fixes); :func:`opdlm_trl.diffusion_trainer.load_pretrained` calls it the way TRL's trainers do.

Named (not importable, so listed): :data:`HOOKS` (methods we override), :data:`CLASS_ATTRIBUTES` (class attributes
we override), :data:`TRAINER_ATTRIBUTES` (state we read or write) and :data:`BATCH_CONTRACT` (what TRL does with the
generation hook's dict). The lists cannot drift from the code: ``tests/unit/test_trl_contract.py`` derives from the
trainers' own source every private base-class name they override or read and fails on one missing here.
"""

from __future__ import annotations

from transformers.trainer_callback import ExportableState
from trl import DistillationConfig, DistillationTrainer
from trl.models.utils import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, create_model_from_path, shuffle_sequence_dict, split_tensor_dict

__all__ = [
    "BATCH_CONTRACT",
    "CLASS_ATTRIBUTES",
    "HOOKS",
    "TRAINER_ATTRIBUTES",
    "DistillationConfig",
    "DistillationTrainer",
    "ExportableState",
    "RepeatSampler",
    "create_model_from_path",
    "prepare_deepspeed",
    "shuffle_sequence_dict",
    "split_tensor_dict",
    "unwrap_model_for_generation",
]

# Methods of the base classes that OPDTrainer and the baselines override: name -> (the base class that defines the
# version we replace and call through ``super()``, the parameters it must accept). The class matters: if TRL dropped
# its own ``_get_train_sampler``, our override would silently wrap transformers' sampler instead of RepeatSampler.
HOOKS = {
    # TRL's generation hook: called once per generation batch (all accumulation steps) by ``_prepare_inputs``;
    # OPD replaces the AR generation + teacher forward with rollouts, teacher targets and training states.
    "_generate_and_score_completions": ("DistillationTrainer", ("self", "inputs")),
    # TRL's loss hook: receives one accumulation slice of what the generation hook returned.
    "compute_loss": ("DistillationTrainer", ("self", "model", "inputs", "return_outputs", "num_items_in_batch")),
    # The column filter (``remove_unused_columns``): the baselines keep their completion columns.
    "_set_signature_columns_if_needed": ("DistillationTrainer", ("self",)),
    # TRL's prompt renderer (chat template + tokenizer); not overridden, but opdlm_trl.data mirrors it and tests
    # compare the two. It returns a 3-tuple ``(prompt_ids, images, multimodal_fields)``.
    "_tokenize_prompts": ("DistillationTrainer", ("self", "prompts")),
    # TRL's training sampler (RepeatSampler); OPDTrainer makes its epoch order resumable (opdlm_trl.checkpoints).
    "_get_train_sampler": ("DistillationTrainer", ("self", "dataset")),
    # transformers' restore of stateful callbacks on resume; OPDTrainer re-attaches and restores its token counter.
    "_load_callback_state": ("Trainer", ("self",)),
}

# Class attributes of the base classes that the trainers override: name -> the base class that defines them.
CLASS_ATTRIBUTES = {
    # The model card's tags, trainer name and paper (TRL's ``_save_checkpoint`` / ``create_model_card`` read them).
    "_tag_names": "DistillationTrainer",
    "_name": "DistillationTrainer",
    "_paper": "DistillationTrainer",
}

# Attributes of a DistillationTrainer (instance, or class for ``loss_is_scaled_for_ga``) that opdlm_trl uses.
TRAINER_ATTRIBUTES = {
    # {"train"|"eval": defaultdict(list)}: every metric we log is appended here; TRL averages and logs it.
    "_metrics": "self._metrics =",
    # {"prompt": deque, "completion": deque}: rollout texts for ``log_completions``.
    "_logs": "self._logs =",
    # Stop ids; TRL fills them from the tokenizer and generation_config, OPDTrainer widens them to end-of-turn.
    "eos_token_ids": "self.eos_token_ids =",
    # The text tokenizer of ``processing_class`` (decoding, pad / EOS ids, the baselines' completion tokens).
    "_tokenizer": "self._tokenizer =",
    # True: compute_loss divides by the generation batch's ``normaliser`` itself, so transformers must not divide by
    # gradient_accumulation_steps again (DiffusionTrainer.compute_loss relies on it).
    "loss_is_scaled_for_ga": "loss_is_scaled_for_ga = True",
    # transformers' cache of kept columns: None until ``_set_signature_columns_if_needed`` fills it.
    "_signature_columns": "self._signature_columns =",
}

# What ``_prepare_inputs`` does with the generation hook's dict, and so what that dict must be: every tensor has
# the generation batch's rows on dim 0 (shuffled in unison, then cut into gradient_accumulation_steps equal slices
# in order); a 0-d tensor (``normaliser``, the whole batch's divisor) is passed whole to every slice; a
# ``None`` value (an absent teacher target) stays ``None``.
BATCH_CONTRACT = "rows on dim 0 split in order; 0-d tensors copied to every slice; None kept"
