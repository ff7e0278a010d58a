"""OPDTrainer end to end on tiny local models (CPU): what training changes, what it optimises, and what it saves.

Every test asserts a measured property: parameters that move or stay bit-identical, a loss on a FIXED rollout batch
that drops, student logits of the training forward that equal the sampler's at every supervised state, gradients
that are invariant to gradient accumulation, state restored on resume, logits preserved by saving, and the exact
error raised for each bad input.

Randomness is pinned where a comparison needs it: rollouts come from a seeded sampler generator (or are built by
hand), states from a seeded ``torch.Generator``, and the trainer's rollout / state hooks are monkeypatched to return
fixed objects when two runs must see the same data. Expensive runs (a checkpointed full fine-tune, a LoRA run) are
module-scoped fixtures shared by several tests.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

import opdlm_trl.trainer as trainer_module
from opdlm_trl import load_diffusion_model
from opdlm_trl import losses as L
from opdlm_trl.batch import TrainingBatch
from opdlm_trl.config import DiffusionTrainingConfig
from opdlm_trl.curriculum import completion_length
from opdlm_trl.diffusion_trainer import DiffusionTrainer
from opdlm_trl.masks import pad_to_blocks, training_layout
from opdlm_trl.modeling import student_forward, suppress_mask_logit, unwrap_model
from opdlm_trl.sampling import Rollout
from opdlm_trl.states import SELECTIONS, select_states
from opdlm_trl.teachers import LocalTeacher, SharedWeightsTeacher
from opdlm_trl.tiny import tiny_model, tiny_tokenizer
from opdlm_trl.trainer import OPDProgress, OPDTrainer
from tests.helpers import (
    PROMPTS,
    accelerate_state,
    cpu_config,
    eval_loss,
    fixed_batch,
    make_trainer,
    prompt_dataset,
    restore_accelerate_state,
    roll_out,
    score,
    snapshot,
)

LORA_LR = 2e-2


# ------------------------------------------------------------------------------------------------- helpers


def canvas_logits(model, settings, seed: int = 0) -> torch.Tensor:
    """Block-causal student logits on a fixed random canvas (for save / load comparisons)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, settings.teacher_vocab_size, (2, 12), generator=generator)
    ids[:, -3:] = settings.mask_token_id
    model.eval()
    with torch.no_grad():
        return student_forward(model, ids, torch.ones_like(ids)).logits


class GradientRecorder(TrainerCallback):
    """Copies every gradient right before the optimizer step (clipping is disabled by the tests using it)."""

    def __init__(self):
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append(
            {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        )


class FirstStepProbe(TrainerCallback):
    """What the trainer holds when the first optimizer step of a (resumed) run begins."""

    def __init__(self, trainer_ref: list):
        self.trainer_ref = trainer_ref
        self.seen: dict | None = None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.seen is None:
            trainer = self.trainer_ref[0]
            self.seen = {
                "global_step": state.global_step,
                "curriculum": trainer.current_completion_length(),
                "training_tokens": trainer.training_tokens,
                "optimizer": copy.deepcopy(optimizer.state_dict()),
            }


# ------------------------------------------------------------------------------------------------- shared runs
CURRICULUM = dict(
    min_completion_length=4, max_completion_length=16, curriculum_steps=4, curriculum="linear",
    threshold_final=0.5, threshold_ramp_steps=4, threshold_schedule="linear",
)  # fmt: skip


@pytest.fixture(scope="module")
def _checkpointed_run(tmp_path_factory):
    """A 2-step full fine-tune that saves checkpoint-2 (curriculum 4 -> 16 tokens and threshold 0.9 -> 0.5 over 4
    steps)."""
    output_dir = tmp_path_factory.mktemp("opd_full")
    trainer = make_trainer(output_dir, save_strategy="steps", save_steps=2, **CURRICULUM)
    initial = snapshot(trainer.model)
    teacher_initial = snapshot(trainer.teacher.model)
    trainer.train()
    return (trainer, output_dir, initial, teacher_initial), accelerate_state()


@pytest.fixture
def checkpointed_run(_checkpointed_run):
    run, state = _checkpointed_run
    restore_accelerate_state(state)  # the module's trainers share it: see tests/helpers.py
    return run


@pytest.fixture(scope="module")
def _lora_run(tmp_path_factory):
    """A 4-step LoRA run (q_proj / v_proj) with the default (shared-weights) teacher and merge-on-save."""
    output_dir = tmp_path_factory.mktemp("opd_lora")
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(
        output_dir, peft_config=peft_config, max_steps=4, learning_rate=LORA_LR, merge_lora_on_save=True
    )
    vocab = unwrap_model(trainer.model).get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        rows_before = trainer.model.get_input_embeddings()(torch.arange(vocab)).clone()
    initial = snapshot(trainer.model)
    trainer.train()
    return (trainer, output_dir, initial, rows_before), accelerate_state()


@pytest.fixture
def lora_run(_lora_run):
    run, state = _lora_run
    restore_accelerate_state(state)
    return run


# ------------------------------------------------------------------------------------------------- what training changes
def test_full_finetune_moves_every_student_tensor_and_no_teacher_tensor(checkpointed_run):
    trainer, _, initial, teacher_initial = checkpointed_run
    assert isinstance(trainer.teacher, LocalTeacher)
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, initial[name])]
    assert sorted(moved) == sorted(initial), f"parameters that did not move: {set(initial) - set(moved)}"
    for name, p in trainer.teacher.model.named_parameters():
        assert torch.equal(p, teacher_initial[name]), name
        assert not p.requires_grad, f"the trainer's teacher is not frozen: {name}"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)


def test_lora_trains_only_adapters_and_the_mask_row(lora_run):
    trainer, _, initial, rows_before = lora_run
    mask_id = trainer.settings.mask_token_id
    assert isinstance(trainer.teacher, SharedWeightsTeacher)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "trainable_tokens" in name for name in trainable)
    assert any("trainable_tokens" in name for name in trainable), "the mask-token row is not trainable"
    for name, p in trainer.model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, initial[name]), f"trainable {name} did not move"
        else:
            assert torch.equal(p, initial[name]), f"frozen {name} changed"
    vocab = rows_before.shape[0]
    with torch.no_grad():
        rows_after = trainer.model.get_input_embeddings()(torch.arange(vocab))
    moved_rows = (rows_after != rows_before).any(-1).nonzero().flatten().tolist()
    assert moved_rows == [mask_id]


def test_shared_teacher_after_lora_training_is_the_original_model(lora_run):
    trainer, _, _, _ = lora_run
    rollout, _ = roll_out(trainer, seed=3)
    shared = score(trainer, rollout, top_k=None)
    original = LocalTeacher(tiny_model("llama"), vocab_size=trainer.settings.teacher_vocab_size)
    reference = original.score(
        rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, top_k=None
    )
    where = rollout.completion_mask.bool()
    torch.testing.assert_close(shared.dense_log_probs()[where], reference.dense_log_probs()[where], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- it optimises the objective
def sharp_model(scale: float = 10.0) -> torch.nn.Module:
    """A tiny model with a sharper output head: a random tiny LM is almost uniform (KL ~0.01, mostly noise); a
    confident teacher gives the student a signal it can learn within a few steps, as with a real ARLM."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


@pytest.mark.parametrize("commit_order", ["left_to_right", "confidence"])
@pytest.mark.parametrize("shift", [False, True])
def test_loss_on_a_fixed_rollout_batch_drops(tmp_path, shift, commit_order):
    """16 steps cut a held-out batch's loss by >= 10% (measured, confidence / left-to-right rollouts: unshifted
    0.65x / 0.70x; shifted, which starts lower because it reuses the next-token head, 0.82x / 0.85x). A broken
    gradient leaves it at ~1.0x."""
    trainer = make_trainer(
        tmp_path, model=sharp_model(), max_steps=16, learning_rate=1e-3, lr_scheduler_type="constant", shift=shift,
        commit_order=commit_order,
    )  # fmt: skip
    rollout, _ = roll_out(trainer, seed=0)
    batch, _ = fixed_batch(trainer, rollout, seed=0)
    before = eval_loss(trainer, batch)
    trainer.train()
    after = eval_loss(trainer, batch)
    assert before > 0 and after <= 0.9 * before, f"held-out loss {before:.5f} -> {after:.5f}"


# ------------------------------------------------------------------------------------------------- train / inference consistency
@pytest.mark.parametrize(
    ("shift", "selection", "commit_order"),
    [
        (False, "per_block", "confidence"),
        (False, "every_step", "confidence"),
        (True, "per_block", "confidence"),
        (True, "every_step", "confidence"),
        (True, "per_block", "left_to_right"),
        (False, "every_step", "left_to_right"),
    ],
)
def test_training_forward_reproduces_the_sampler_logits_at_every_supervised_state(
    tmp_path, shift, selection, commit_order
):
    """The states the trainer rebuilds from a rollout's step map are the sampler's inputs, in either commit order."""
    trainer = make_trainer(tmp_path, shift=shift, max_completion_length=12, commit_order=commit_order)
    rollout, sampler = roll_out(trainer, seed=1, record=True)
    if commit_order == "left_to_right":  # the trainer's sampler follows the config: commits form block prefixes
        steps = rollout.step_map.masked_fill(rollout.step_map < 0, 10**6).view(len(PROMPTS), -1, rollout.block_size)
        assert (steps[..., 1:] >= steps[..., :-1]).all()
    batch, states = fixed_batch(trainer, rollout, selection, seed=2)
    source = states.rows_of(torch.arange(len(rollout.prompt_ids)))  # every_step: several rows per rollout row
    records = {(r.block, r.step): r for r in sampler.records}
    block_size = trainer.settings.block_size
    expected = []
    for row, column in batch["loss_mask"].nonzero().tolist():
        block = column // block_size
        record = records[(block, int(states.state_step[row, block]))]
        index = record.rows.tolist().index(int(source[row]))
        expected.append(record.logits[index, column % block_size])
    expected = suppress_mask_logit(torch.stack(expected), trainer.settings.mask_token_id)
    trainer.model.eval()
    with torch.no_grad():
        actual = trainer.student_logits(batch)
    assert actual.shape == expected.shape and actual.shape[0] >= 8
    steps_used = {int(s) for s in states.state_step[states.state_step >= 0]}
    assert len(steps_used) > 1, "the check should cover several denoising steps"
    assert (actual - expected).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------- states x losses
@pytest.fixture(scope="module")
def _scored_rollout(tmp_path_factory):
    """A trainer, one seeded rollout and its teacher targets (full vocabulary and top-4), shared by the grid."""
    trainer = make_trainer(tmp_path_factory.mktemp("opd_grid"), max_completion_length=12)
    rollout, _ = roll_out(trainer, seed=4)
    targets = {None: score(trainer, rollout, None), 4: score(trainer, rollout, 4)}
    return (trainer, rollout, targets), accelerate_state()


@pytest.fixture
def scored_rollout(_scored_rollout):
    shared, state = _scored_rollout
    restore_accelerate_state(state)
    return shared


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd", "token_pg"])
@pytest.mark.parametrize(("top_k", "tail_bucket"), [(None, False), (4, False), (4, True)])
def test_every_selection_and_loss_gives_a_finite_loss(scored_rollout, loss_type, top_k, tail_bucket):
    trainer, rollout, targets = scored_rollout
    args = copy.copy(trainer.args)
    args.loss_type, args.teacher_top_k, args.tail_bucket, args.beta = loss_type, top_k, tail_bucket, 0.5
    trainer.args = args
    committed = (rollout.step_map >= 0) & rollout.completion_mask.bool()
    for selection in SELECTIONS:
        states = select_states(rollout, selection, generator=torch.Generator().manual_seed(5))
        assert not (states.loss_mask & ~states.rows_of(committed)).any()
        assert states.supervised_per_rollout_row(len(committed)).gt(0).all()
        batch = trainer.training_batch(rollout, targets[top_k], states).to_dict()
        loss = eval_loss(trainer, batch)
        assert math.isfinite(loss), (selection, loss)
        if loss_type != "token_pg" and top_k is None:
            assert loss > 0, (selection, loss)  # a full-vocabulary divergence between different distributions


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_the_training_batch_carries_the_normaliser_of_its_reduction(scored_rollout, normalization):
    """One process, one micro-batch: the batch's normaliser is what its own reduction would divide by, so the training
    loss (normaliser) equals the evaluation loss (the batch reduced on its own)."""
    trainer, rollout, targets = scored_rollout
    use_full_forward_kl(trainer)
    trainer.args.loss_normalization = normalization  # a copy of the shared args, reset by the next test's call
    states = select_states(rollout, "every_step", generator=torch.Generator().manual_seed(3))
    batch = trainer.training_batch(rollout, targets[None], states)
    per_row = states.loss_mask.sum(1)
    assert batch.normaliser.ndim == 0
    assert batch.normaliser.item() == (per_row.sum() if normalization == "token" else (per_row > 0).sum()).item()
    losses = {}
    for training in (True, False):
        trainer.model.train(training)
        with torch.no_grad():
            losses[training] = trainer.compute_loss(trainer.model, batch.to_dict()).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-6) and losses[True] > 0


def use_full_forward_kl(trainer: OPDTrainer) -> None:
    """Reset the shared grid trainer to the default objective (the grid test changes it)."""
    args = copy.copy(trainer.args)
    args.loss_type, args.teacher_top_k, args.tail_bucket, args.beta = "forward_kl", None, False, 0.5
    args.loss_normalization = "sequence"
    trainer.args = args


def test_sequence_loss_is_the_mean_of_per_row_mean_forward_kl(scored_rollout):
    trainer, rollout, targets = scored_rollout
    use_full_forward_kl(trainer)
    batch, _ = fixed_batch(trainer, rollout, seed=6)
    trainer.model.eval()
    with torch.no_grad():
        student = torch.log_softmax(trainer.student_logits(batch), -1)
    teacher = trainer.teacher.head.log_probs(batch["teacher_hidden"][batch["loss_mask"]])
    vocab = teacher.shape[-1]
    kl = (teacher.exp() * (teacher - student[:, :vocab])).sum(-1)
    rows = batch["loss_mask"].nonzero()[:, 0]
    per_row = [kl[rows == r].mean() for r in rows.unique()]
    assert eval_loss(trainer, batch) == pytest.approx(torch.stack(per_row).mean().item(), rel=1e-5)


def hand_rollout(batch: int, pad_id: int, eos_id: int, mask_id: int) -> Rollout:
    """Two blocks of 4. Block 0 took 3 steps (commit steps 0,1,0,2); block 1 committed tokens 4 and EOS (5) at
    step 0 and stopped, so 6 and 7 were never committed and lie outside the completion."""
    completion = torch.tensor([[11, 12, 13, 14, 15, eos_id, pad_id, pad_id]]).repeat(batch, 1)
    return Rollout(
        prompt_ids=torch.tensor([[pad_id, 20, 21, 22]]).repeat(batch, 1),
        prompt_mask=torch.tensor([[0, 1, 1, 1]]).repeat(batch, 1),
        completion_ids=completion,
        completion_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]]).repeat(batch, 1),
        decoded_mask=torch.ones(batch, 8, dtype=torch.long),
        step_map=torch.tensor([[0, 1, 0, 2, 0, 0, -1, -1]]).repeat(batch, 1),
        global_step_map=torch.tensor([[0, 1, 0, 2, 3, 3, -1, -1]]).repeat(batch, 1),
        block_steps=torch.tensor([[3, 1]]).repeat(batch, 1),
        nfe=5,
        tokens_per_step=1.5,
        finish_reason=["stop"] * batch,
        block_size=4,
        shift=False,
        mask_token_id=mask_id,
    )


# Supervised positions of block 0 for each chosen step (masked = committed at a step >= the state's step).
BLOCK0_BY_STEP = {0: [1, 1, 1, 1], 1: [0, 1, 0, 1], 2: [0, 0, 0, 1]}
BLOCK1 = [1, 1, 0, 0]  # tokens 4 and EOS; 6, 7 never committed and after the stop


def test_supervised_positions_on_a_hand_checked_trajectory(scored_rollout):
    trainer, _, _ = scored_rollout
    use_full_forward_kl(trainer)
    tok = trainer._tokenizer
    rollout = hand_rollout(32, tok.pad_token_id, tok.eos_token_id, trainer.settings.mask_token_id)
    generator = torch.Generator().manual_seed(0)
    per_block = select_states(rollout, "per_block", generator=generator)
    assert set(per_block.state_step[:, 0].tolist()) == {0, 1, 2} and set(per_block.state_step[:, 1].tolist()) == {0}
    for row in range(32):
        expected = BLOCK0_BY_STEP[int(per_block.state_step[row, 0])] + BLOCK1
        assert per_block.loss_mask[row].long().tolist() == expected
    global_step = select_states(rollout, "global_step", generator=generator)
    for row in range(32):  # 4 global steps: 0..2 in block 0, 3 in block 1; one block supervised per row
        block0, block1 = global_step.state_step[row].tolist()
        expected = BLOCK0_BY_STEP[block0] + [0] * 4 if block0 >= 0 else [0] * 4 + BLOCK1
        assert global_step.loss_mask[row].long().tolist() == expected
    assert global_step.state_step[:, 1].eq(0).any() and global_step.state_step[:, 0].ge(0).any()
    remask = select_states(rollout, "random_remask", generator=generator)
    assert not remask.loss_mask[:, 6:].any() and remask.loss_mask.any(1).all()
    # The trainer turns one such state into its batch: masked positions read [MASK], never-committed ones too.
    mask_id = trainer.settings.mask_token_id
    one = hand_rollout(1, tok.pad_token_id, tok.eos_token_id, mask_id)
    states = select_states(one, "per_block", generator=generator)
    batch = trainer.training_batch(one, score(trainer, one, None), states).to_dict()
    never_committed = torch.tensor([False] * 6 + [True] * 2)
    assert (batch["clean_ids"][0, 6:] == mask_id).all()
    assert torch.equal(batch["noisy_ids"][0] == mask_id, states.loss_mask[0] | never_committed)
    assert math.isfinite(eval_loss(trainer, batch))


# ------------------------------------------------------------------------------------------------- a trainer on the base
class FixedAnswerTrainer(DiffusionTrainer):
    """A trainer written outside the package on the base class (docs/trainer.md "Writing a trainer"): every prompt's
    completion is one fixed text, wholly masked, trained by the student's NLL of it. Five methods, nothing switched
    off."""

    ANSWER = "return a + b"

    def _batch_from_examples(self, examples, mode):
        tokenizer, device, block = self.processing_class, self.accelerator.device, self.settings.block_size
        answer = tokenizer(self.ANSWER, add_special_tokens=False)["input_ids"]
        prompts = self.prompt_token_lists([example["prompt"] for example in examples])
        prompt_ids, prompt_mask = pad_to_blocks(prompts, block, tokenizer.pad_token_id, "left", device)
        ids, mask = pad_to_blocks([answer] * len(examples), block, tokenizer.pad_token_id, "right", device)
        if mode == "train":
            self._count_training_tokens(mask.sum(1).float())
        noisy = ids.masked_fill(mask.bool(), self.settings.mask_token_id)
        batch = TrainingBatch(prompt_ids, prompt_mask, ids, noisy, mask, loss_mask=mask.bool(), completion_ids=ids)
        return self._with_normaliser(batch)

    def _per_position_loss(self, student_logits, rows):
        return -torch.log_softmax(student_logits, -1).gather(1, rows.tokens[:, None])[:, 0]

    def _reduction_counts(self, batch):
        return batch.loss_mask.sum(1)

    def _reduce(self, per_position, batch, normaliser):
        rows = batch.loss_mask.shape[0]
        norm = self.args.loss_normalization
        return L.reduce_loss(per_position, batch.row_index, rows, norm, normaliser, normaliser)

    def _metric_sums(self, student_logits, per_position, rows):
        return per_position.sum().reshape(1)

    def _log_metric_sums(self, sums, batch, mode):
        self._metrics[mode]["answer_nll_sum"].append(sums[0].item())


def test_a_trainer_written_on_the_base_class_trains(tmp_path):
    """The base brings conversion, forward, loss plumbing, normaliser, token count and logging: the toy trainer's
    loss falls, its metric is logged and its tokens counted, with no teacher and no rollout."""
    args = cpu_config(tmp_path, DiffusionTrainingConfig, max_steps=8, learning_rate=1e-2, lr_scheduler_type="constant")
    trainer = FixedAnswerTrainer(
        tiny_model("llama"), args=args, train_dataset=prompt_dataset(), processing_class=tiny_tokenizer()
    )
    assert not hasattr(trainer, "teacher") and not hasattr(trainer, "rollout")
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 8 and logged[-1]["loss"] < 0.5 * logged[0]["loss"]
    assert all("answer_nll_sum" in entry for entry in logged)
    answer = len(tiny_tokenizer()(FixedAnswerTrainer.ANSWER, add_special_tokens=False)["input_ids"])
    assert trainer.training_tokens == 8 * len(PROMPTS) * answer
    with pytest.raises(TypeError, match="FixedAnswerTrainer needs args of type DiffusionTrainingConfig, got str"):
        FixedAnswerTrainer(tiny_model("llama"), args="nope")


# ------------------------------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_gradient_accumulation_gives_the_single_batch_gradient(tmp_path, monkeypatch, normalization):
    """GA=2 x batch 2 and GA=1 x batch 4 over the same 4-row rollout and states accumulate the same gradient."""
    reference = make_trainer(tmp_path / "ref", max_steps=1)
    rollout, _ = roll_out(reference, seed=7)
    states = select_states(rollout, "per_block", generator=torch.Generator().manual_seed(7))
    assert len(set(states.loss_mask.sum(1).tolist())) > 1, "rows should differ in supervised counts"
    monkeypatch.setattr(OPDTrainer, "rollout", lambda self, prompts, sampler=None, generator=None: rollout)
    monkeypatch.setattr(trainer_module, "select_states", lambda rollout, selection, **kwargs: states)
    gradients = {}
    for accumulation, batch_size in ((1, 4), (2, 2)):
        recorder = GradientRecorder()
        trainer = make_trainer(
            tmp_path / f"ga{accumulation}",
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            loss_normalization=normalization,
            max_grad_norm=0.0,
        )
        trainer.add_callback(recorder)
        trainer.train()
        (gradients[accumulation],) = recorder.gradients
    assert gradients[1].keys() == gradients[2].keys() and len(gradients[1]) > 10
    for name, grad in gradients[1].items():
        torch.testing.assert_close(gradients[2][name], grad, rtol=1e-4, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------------- resume and saving
@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_restores_step_curriculum_threshold_optimizer_and_token_counter(checkpointed_run, restore_callbacks):
    """Also with transformers' own callback restoring, which replaces the callback instance."""
    first, output_dir, _, _ = checkpointed_run
    checkpoint = output_dir / "checkpoint-2"
    saved_state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved_tokens = saved_state["stateful_callbacks"]["OPDProgress"]["attributes"]["training_tokens"]
    assert saved_tokens == first.training_tokens > 0
    holder: list = []
    probe = FirstStepProbe(holder)
    resumed = make_trainer(
        output_dir,
        save_strategy="no",
        max_steps=3,
        restore_callback_states_from_checkpoint=restore_callbacks,
        **CURRICULUM,
    )
    resumed.add_callback(probe)
    holder.append(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    seen = probe.seen
    assert seen["global_step"] == 2 and resumed.state.global_step == 3
    assert seen["curriculum"] == completion_length(2, 4, 16, 4, "linear", 4) == 12
    assert seen["training_tokens"] == saved_tokens
    # the counter the trainer reports is the attached callback's, not a detached copy (transformers replaces it)
    (attached,) = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, OPDProgress)]
    assert attached.training_tokens == resumed.training_tokens > saved_tokens
    step3 = [entry for entry in resumed.state.log_history if entry.get("step") == 3 and "loss" in entry]
    assert step3 and step3[0]["curriculum/length"] == 12.0
    assert step3[0]["curriculum/threshold"] == pytest.approx(0.7)  # the ramp continues at step 2 of 4
    assert step3[0]["training_tokens"] == saved_tokens + step3[0]["rollout/length"] * 4
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    loaded = seen["optimizer"]["state"]
    assert saved.keys() == loaded.keys() and len(saved) > 10
    for index, entry in saved.items():
        assert torch.equal(loaded[index]["exp_avg"], entry["exp_avg"])
        assert torch.equal(loaded[index]["exp_avg_sq"], entry["exp_avg_sq"])


def test_checkpoint_writes_a_model_card_with_tag_and_citation(checkpointed_run):
    _, output_dir, _, _ = checkpointed_run
    card = (output_dir / "README.md").read_text()
    assert "opdlm" in card and "2606.06712" in card and "su2026opdlm" in card


def test_saved_full_student_reloads_with_identical_logits(checkpointed_run, tmp_path):
    trainer, _, _, _ = checkpointed_run
    trainer.save_model(str(tmp_path))
    loaded, tokenizer = load_diffusion_model(str(tmp_path))
    assert tokenizer.mask_token_id == trainer.settings.mask_token_id
    expected = canvas_logits(trainer.model, trainer.settings)
    assert torch.equal(canvas_logits(loaded, trainer.settings), expected)


def test_merged_lora_student_reloads_with_the_peft_students_logits(lora_run, tmp_path):
    trainer, _, _, _ = lora_run
    trainer.save_model(str(tmp_path))
    assert (tmp_path / "adapter_config.json").is_file()
    merged, tokenizer = load_diffusion_model(str(tmp_path / "merged"))
    assert tokenizer.mask_token_id == trainer.settings.mask_token_id
    assert not hasattr(merged, "peft_config")
    expected = canvas_logits(trainer.model, trainer.settings)
    torch.testing.assert_close(canvas_logits(merged, trainer.settings), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- bad input
def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        make_trainer(tmp_path, dataset=Dataset.from_list([]))


def test_dataset_smaller_than_one_batch_is_refused_before_any_rollout(tmp_path):
    """TRL's sampler yields whole batches only: 3 prompts at batch 2 x accumulation 2 would train nothing at all."""
    trainer = make_trainer(tmp_path, dataset=prompt_dataset(3), per_device_train_batch_size=2,
                           gradient_accumulation_steps=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"3 prompts, fewer than one generation batch of 4.*Add prompts"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_dataset_without_prompt_column_is_refused_with_a_hint(tmp_path):
    dataset = Dataset.from_list([{"messages": PROMPTS[0]}])
    with pytest.raises(ValueError, match=r"no `prompt` column.*Rename `messages` to `prompt`"):
        make_trainer(tmp_path, dataset=dataset)


def test_prompt_longer_than_max_prompt_length_errors_or_is_left_truncated(tmp_path):
    full = make_trainer(tmp_path, max_prompt_length=None).prompt_token_lists(PROMPTS)
    limit = min(len(ids) for ids in full) - 3
    strict = make_trainer(tmp_path, max_prompt_length=limit)
    with pytest.raises(ValueError, match=rf"exceed max_prompt_length={limit}.*prompt_truncation='left'"):
        strict.prompt_token_lists(PROMPTS)
    with pytest.raises(ValueError, match="exceed max_prompt_length"):
        strict.train()
    truncated = make_trainer(tmp_path, max_prompt_length=limit, prompt_truncation="left").prompt_token_lists(PROMPTS)
    assert truncated == [ids[-limit:] for ids in full] and all(len(ids) == limit for ids in truncated)


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    teacher = tiny_model("llama", vocab_size=len(tiny_tokenizer()) + 5)
    with pytest.raises(ValueError, match=r"Teacher vocabulary \(\d+ rows\) differs"):
        make_trainer(tmp_path, teacher_model=teacher)


def test_student_generation_with_vllm_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use_vllm=True.*teacher_backend='vllm_server'"):
        cpu_config(tmp_path, use_vllm=True)


@pytest.mark.parametrize("backend", ["vllm_server", "vllm_colocate"])
def test_vllm_teacher_without_top_k_is_refused(tmp_path, backend):
    with pytest.raises(ValueError, match="returns top-k log-probs only: set teacher_top_k"):
        cpu_config(tmp_path, teacher_backend=backend, teacher_url="http://127.0.0.1:1")


def test_nan_student_stops_with_a_floating_point_error(tmp_path):
    trainer = make_trainer(tmp_path, temperature=0.0)  # greedy rollouts: sampling from NaN would fail first
    with torch.no_grad():
        unwrap_model(trainer.model).get_output_embeddings().weight[:, :5] = float("nan")
    assert all(torch.isfinite(p).all() for p in trainer.teacher.model.parameters())
    with pytest.raises(FloatingPointError, match="Non-finite OPD loss .* at step 0. Lower the learning rate"):
        trainer.train()


def test_lora_student_reloads_from_its_adapter_directory(lora_run, tmp_path):
    """save_model on a LoRA student writes adapter + tokenizer + opdlm.json; load_diffusion_model rebuilds it."""
    trainer, _, _, _ = lora_run
    original_dir = tmp_path / "original"
    tiny_model("llama").save_pretrained(original_dir)  # the ARLM the tiny student was converted from
    trainer.model.peft_config["default"].base_model_name_or_path = str(original_dir)
    trainer.save_model(str(tmp_path / "student"))
    assert (tmp_path / "student" / "opdlm.json").is_file()
    loaded, tokenizer = load_diffusion_model(str(tmp_path / "student"))
    assert hasattr(loaded, "peft_config")
    assert tokenizer.mask_token_id == trainer.settings.mask_token_id
    expected = canvas_logits(trainer.model, trainer.settings)
    torch.testing.assert_close(canvas_logits(loaded, trainer.settings), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("exclude_stop_token", [False, True])
def test_exclude_stop_token_leaves_rollouts_that_stop_at_once_nothing_to_train(tmp_path, exclude_stop_token):
    """Greedy rollouts whose first token is made a stop token: by default that stop is the one supervised position
    of each row; with exclude_stop_token (the reference code) nothing is supervised, the loss is 0 (not NaN) and no
    parameter moves."""
    trainer = make_trainer(tmp_path, temperature=0.0, max_steps=1, exclude_stop_token=exclude_stop_token)
    rollout, _ = roll_out(trainer)
    trainer.eos_token_ids = [*trainer.eos_token_ids, *rollout.completion_ids[:, 0].unique().tolist()]
    initial = snapshot(trainer.model)
    trainer.train()
    (logs,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs["rollout/length"] == 1.0 and logs["rollout/stopped_ratio"] == 1.0
    assert logs["rollout/out_of_order_rate"] == 0.0  # one token per row: nothing to its left
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, initial[name])]
    if exclude_stop_token:
        assert logs["supervised_per_row"] == 0.0 and logs["loss"] == 0.0 and not moved
    else:
        assert logs["supervised_per_row"] == 1.0 and logs["loss"] > 0 and len(moved) == len(initial)


def test_every_step_trains_a_copy_per_step_through_trls_accumulation_split(tmp_path):
    """``every_step``: the generation batch holds K copies of each rollout row (K = most steps of a block); TRL
    splits it over the accumulation steps unchanged and the step trains on all of them."""
    trainer = make_trainer(
        tmp_path,
        state_selection="every_step",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
    )
    batches: list[dict] = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: batches.append(generate(inputs)) or batches[-1]
    result = trainer.train()
    (batch,) = batches
    rows = len(PROMPTS)
    assert batch["prompt_ids"].shape[0] % rows == 0 and batch["prompt_ids"].shape[0] > rows
    copies = batch["prompt_ids"].shape[0] // rows
    assert all(
        torch.equal(batch["prompt_ids"][k * rows : (k + 1) * rows], batch["prompt_ids"][:rows]) for k in range(copies)
    )
    assert batch["loss_mask"].any() and 0 < result.training_loss < float("inf")


def test_threshold_ramp_reaches_every_rollout_and_is_logged(tmp_path, monkeypatch):
    """``threshold_final``: the sampler of the rollout at global step s decodes at the ramp's threshold of step s
    (ramp to the end of training by default), and ``curriculum/threshold`` logs it."""
    used: list[float] = []
    sampler_class = trainer_module.DiffusionSampler

    def recording_sampler(config, **kwargs):
        used.append(config.threshold)
        return sampler_class(config, **kwargs)

    monkeypatch.setattr(trainer_module, "DiffusionSampler", recording_sampler)
    trainer = make_trainer(tmp_path, max_steps=3, threshold=0.9, threshold_final=0.6, threshold_schedule="linear")
    trainer.train()
    expected = [0.9, 0.8, 0.7]  # steps 0, 1, 2 of a 3-step ramp from 0.9 towards 0.6
    assert used == pytest.approx(expected)
    logged = [entry["curriculum/threshold"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(expected)


def dense_reference_loss(trainer: OPDTrainer, batch: dict) -> torch.Tensor:
    """The loss the way the trainer computed it before chunking: the model's own logits at the supervised positions
    (one forward, ``logits_to_keep``), the teacher's dense full-vocabulary log-probs, one unchunked divergence."""
    view = TrainingBatch.of(batch)
    layout = training_layout(
        view.prompt_ids,
        view.prompt_mask,
        view.clean_ids,
        view.noisy_ids,
        view.completion_key_mask,
        trainer.settings.block_size,
        trainer.settings.shift,
        torch.float32,
    )
    out = trainer.model(
        input_ids=layout.input_ids,
        attention_mask=layout.attention_mask,
        position_ids=layout.position_ids,
        logits_to_keep=layout.source_index,
        use_cache=False,
    )
    logits = suppress_mask_logit(out.logits[view.supervised].float(), trainer.settings.mask_token_id)
    teacher = trainer.teacher.head.log_probs(view.teacher_hidden[view.supervised])
    per_position = L.forward_kl(logits, teacher_full_logprobs=teacher)
    return L.reduce_loss(per_position, view.row_index, view.loss_mask.shape[0], "sequence")


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_from_hidden_states_equals_the_dense_loss_and_gradients(scored_rollout, chunk):
    """Issue 19: hidden-state targets + a chunked head change neither the loss nor any gradient (float32)."""
    trainer, rollout, _ = scored_rollout
    use_full_forward_kl(trainer)
    args = copy.copy(trainer.args)
    args.length_groups, args.loss_chunk_size = 0, chunk
    trainer.args = args
    batch, _ = fixed_batch(trainer, rollout, seed=6)
    assert (
        batch["teacher_hidden"].shape[-1] == trainer.model.config.hidden_size and "teacher_full_logprobs" not in batch
    )
    model = trainer.model.train()
    results = []
    for compute in (lambda: trainer.compute_loss(model, batch), lambda: dense_reference_loss(trainer, batch)):
        model.zero_grad()
        loss = compute()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (expected, expected_grads) = results
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    model.zero_grad()


class ElsewhereTensor(torch.Tensor):
    """A tensor "on another device" without a second device: any op mixing it with an ordinary tensor raises, as
    mixing CPU and CUDA tensors does; ``.to(...)`` brings it back as an ordinary tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        flat = [*args, *kwargs.values()]
        flat += [item for value in flat if isinstance(value, list | tuple) for item in value]
        ordinary = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, cls) and t.dim() > 0]
        if ordinary:
            raise RuntimeError(f"Expected all tensors to be on the same device ({func.__name__}: one is elsewhere)")
        return super().__torch_function__(func, types, args, kwargs)


class ElsewhereTeacher:
    """A teacher answering on another device (a vLLM server's CPU tensors for a CUDA student)."""

    def __init__(self, teacher):
        self.inner, self.head = teacher, getattr(teacher, "head", None)

    def score(self, *args, **kwargs):
        return self.inner.score(*args, **kwargs)._map(lambda tensor: tensor.as_subclass(ElsewhereTensor))


@pytest.mark.parametrize("top_k", [None, 4])
def test_teacher_targets_from_another_device_reach_the_loss_on_the_students(tmp_path, top_k):
    """Issue 19: whatever device a teacher answers on, the trainer moves its targets to the student's device."""
    trainer = make_trainer(tmp_path, max_steps=1, teacher_top_k=top_k)
    trainer.teacher = ElsewhereTeacher(trainer.teacher)
    targets = trainer.score(roll_out(trainer)[0])
    assert all(type(t) is torch.Tensor for t in (targets.token_logprobs, targets.mask))
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
