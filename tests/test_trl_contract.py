"""The TRL / transformers surface opdlm_trl depends on (opdlm_trl/_trl.py): a TRL upgrade that moves it fails here.

Each assertion names what moved, so the fix starts in ``opdlm_trl/_trl.py`` rather than inside a training step.
"""

import inspect

import pytest
import torch
from transformers import Trainer

from opdlm_trl import _trl


@pytest.mark.parametrize(("name", "parameters"), list(_trl.HOOKS.items()))
def test_overridden_hooks_exist_with_the_parameters_we_override_them_with(name, parameters):
    hook = getattr(_trl.DistillationTrainer, name, None)
    assert hook is not None, f"DistillationTrainer.{name} is gone: OPDTrainer overrides it (opdlm_trl/_trl.py HOOKS)."
    found = tuple(inspect.signature(hook).parameters)
    assert found == parameters, f"DistillationTrainer.{name}{found} changed; OPDTrainer expects {parameters}."


@pytest.mark.parametrize(("name", "assignment"), list(_trl.TRAINER_ATTRIBUTES.items()))
def test_trainer_attributes_we_use_are_still_set_by_the_base_classes(name, assignment):
    sources = "".join(inspect.getsource(cls) for cls in (_trl.DistillationTrainer, Trainer))
    assert assignment in sources, f"TRL/transformers no longer set `{name}` ({assignment!r}); see opdlm_trl/_trl.py."


def test_loss_is_scaled_for_gradient_accumulation_by_the_trainer():
    # OPDTrainer.compute_loss divides by the generation batch's count: transformers must not divide again.
    assert _trl.DistillationTrainer.loss_is_scaled_for_ga is True, (
        "DistillationTrainer.loss_is_scaled_for_ga is no longer True: transformers would divide OPD's loss by "
        "gradient_accumulation_steps a second time (opdlm_trl/_trl.py TRAINER_ATTRIBUTES)."
    )


def test_create_model_from_path_takes_an_architecture_and_from_pretrained_kwargs():
    # opdlm_trl.trainer.load_pretrained passes AutoModelForCausalLM and from_pretrained keyword arguments.
    parameters = inspect.signature(_trl.create_model_from_path).parameters
    assert list(parameters)[:2] == ["model_id", "architecture"] and "kwargs" in parameters, (
        f"trl's create_model_from_path{tuple(parameters)} changed; opdlm_trl.trainer.load_pretrained calls "
        "create_model_from_path(path, AutoModelForCausalLM, **init_kwargs)."
    )


def test_prepare_inputs_shuffles_and_splits_the_generation_hooks_batch():
    source = inspect.getsource(_trl.DistillationTrainer._prepare_inputs)
    for name in ("_generate_and_score_completions", "shuffle_sequence_dict", "split_tensor_dict"):
        assert name in source, f"DistillationTrainer._prepare_inputs no longer calls {name}: re-check BATCH_CONTRACT."


def _generation_batch(rows: int = 6) -> dict:
    """A dict shaped like OPDTrainer's generation hook output: per-row tensors, a 0-d normaliser, absent targets."""
    return {
        "prompt_ids": torch.arange(rows * 4).view(rows, 4),
        "loss_mask": torch.arange(rows * 8).view(rows, 8) % 2 == 0,
        "teacher_full_logprobs": torch.randn(rows, 8, 5),
        "teacher_top_ids": None,
        "num_items_in_batch": torch.tensor(17),
    }


def test_split_tensor_dict_keeps_rows_in_order_copies_scalars_and_keeps_none():
    batch = _generation_batch()
    chunks = _trl.split_tensor_dict(batch, 3)
    assert len(chunks) == 3
    for index, chunk in enumerate(chunks):
        assert torch.equal(chunk["prompt_ids"], batch["prompt_ids"][2 * index : 2 * index + 2])
        assert torch.equal(chunk["teacher_full_logprobs"], batch["teacher_full_logprobs"][2 * index : 2 * index + 2])
        assert chunk["teacher_top_ids"] is None
        assert chunk["num_items_in_batch"].ndim == 0 and int(chunk["num_items_in_batch"]) == 17


def test_shuffle_sequence_dict_permutes_rows_in_unison_and_keeps_scalars():
    batch = _generation_batch()
    torch.manual_seed(0)
    shuffled = _trl.shuffle_sequence_dict(batch)
    order = shuffled["prompt_ids"][:, 0] // 4  # row r of prompt_ids starts with 4 r
    assert sorted(order.tolist()) == list(range(6))
    assert torch.equal(shuffled["loss_mask"], batch["loss_mask"][order])
    assert torch.equal(shuffled["teacher_full_logprobs"], batch["teacher_full_logprobs"][order])
    assert shuffled["teacher_top_ids"] is None and int(shuffled["num_items_in_batch"]) == 17


def test_generation_and_deepspeed_helpers_take_the_arguments_we_pass():
    unwrap = inspect.signature(_trl.unwrap_model_for_generation).parameters
    for name in ("gather_deepspeed3_params", "gradient_checkpointing_kwargs"):
        assert name in unwrap, f"trl's unwrap_model_for_generation lost `{name}` (used by OPDTrainer._rollout_mode)."
    assert tuple(inspect.signature(_trl.prepare_deepspeed).parameters)[:2] == ("model", "accelerator")
    sampler = inspect.signature(_trl.RepeatSampler.__init__).parameters
    for name in ("data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"):
        assert name in sampler, f"trl's RepeatSampler lost `{name}` (subclassed by opdlm_trl.checkpoints)."
