"""The extension points are registries: a loss and a teacher backend added from outside the package train through
OPDTrainer with no package file touched, and an unknown name fails when the config is made.

The toy loss and the toy teacher below are registered by fixtures (and removed after), exactly as a user's module
would register them with :func:`opdlm_trl.losses.register_divergence` / :func:`opdlm_trl.teachers.register_teacher`.
"""

from __future__ import annotations

import pytest
import torch

from opdlm_trl import losses as L
from opdlm_trl.batch import SupervisedRows, TrainingBatch
from opdlm_trl.teachers import TEACHERS, TeacherBackend, TeacherTargets, register_teacher
from opdlm_trl.teachers.targets import empty_targets
from tests.integration.test_trainer import PROMPTS, fixed_batch, make_trainer, opd_config, roll_out, snapshot

TOY_LOSS = "toy_double_forward_kl"
TOY_TEACHER = "toy_constant"


# ------------------------------------------------------------------------------------------------- the toys
def double_forward_kl(student_logits: torch.Tensor, rows: SupervisedRows, args) -> torch.Tensor:
    """twice the forward KL (a loss whose value says it was the one called)."""
    double_forward_kl.calls += 1
    targets = rows.targets
    return 2.0 * L.forward_kl(
        student_logits,
        teacher_full_logprobs=targets["full_logprobs"],
        teacher_top_ids=targets["top_ids"],
        teacher_top_logprobs=targets["top_logprobs"],
    )


class ConstantTeacher(TeacherBackend):
    """A teacher that is sure of one token everywhere: top-1 target ``token`` with probability 1."""

    full_vocabulary = False  # the config must then require teacher_top_k
    option_fields = {"chunk_size": "teacher_chunk_size"}  # read from the config like a built-in backend's

    def __init__(self, token: int, chunk_size: int):
        self.token = token
        self.chunk_size = chunk_size
        self.calls: list[int] = []  # rows of each score() call

    @classmethod
    def from_context(cls, context, chunk_size: int):
        cls.context = context
        return cls(token=context.settings.teacher_vocab_size - 1, chunk_size=chunk_size)

    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask, top_k) -> TeacherTargets:
        self.calls.append(completion_ids.shape[0])
        targets = empty_targets(completion_mask, 1, None)
        where = completion_mask.bool()
        targets.top_ids[where] = self.token
        targets.top_logprobs[where] = 0.0
        targets.token_logprobs[where] = torch.where(completion_ids[where] == self.token, 0.0, float("-inf"))
        return targets


@pytest.fixture
def toy_loss():
    double_forward_kl.calls = 0
    L.register_divergence(TOY_LOSS, double_forward_kl)
    yield double_forward_kl
    L.DIVERGENCES.pop(TOY_LOSS)


@pytest.fixture
def toy_teacher():
    register_teacher(TOY_TEACHER, ConstantTeacher)
    yield ConstantTeacher
    TEACHERS.pop(TOY_TEACHER)


# ------------------------------------------------------------------------------------------------- tests
def test_a_registered_loss_is_what_the_trainer_computes_and_trains_on(tmp_path, toy_loss):
    trainer = make_trainer(tmp_path / "toy", loss_type=TOY_LOSS, max_steps=1, learning_rate=1e-2)
    rollout, _ = roll_out(trainer)
    batch, _ = fixed_batch(trainer, rollout)
    trainer.model.eval()
    with torch.no_grad():
        toy = trainer.compute_loss(trainer.model, batch)
        trainer.args.loss_type = "forward_kl"
        reference = trainer.compute_loss(trainer.model, batch)
        trainer.args.loss_type = TOY_LOSS
    assert torch.allclose(toy, 2.0 * reference, rtol=1e-5), (toy, reference)

    before, calls = snapshot(trainer.model), toy_loss.calls
    trainer.train()
    assert toy_loss.calls > calls  # the step's loss went through the registered function
    after = snapshot(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_a_registered_teacher_is_built_from_the_config_and_trains_the_student_toward_it(tmp_path, toy_teacher):
    trainer = make_trainer(
        tmp_path / "toy", teacher_backend=TOY_TEACHER, teacher_top_k=1, teacher_chunk_size=7, max_steps=1
    )
    teacher = trainer.teacher
    assert isinstance(teacher, ConstantTeacher) and teacher.chunk_size == 7  # option_fields read from the config
    assert toy_teacher.context.student is trainer.model and toy_teacher.context.top_k == 1

    # Its targets reach the loss: the top-1 forward KL to a certain token is -log p_S(token) per position.
    rollout, _ = roll_out(trainer)
    batch, _ = fixed_batch(trainer, rollout, top_k=1)
    view = TrainingBatch.of(batch)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        nll = -L.student_token_log_probs(trainer.student_logits(batch), torch.full_like(view.row_index, teacher.token))
    expected = L.reduce_loss(nll, view.row_index, view.loss_mask.shape[0], "sequence")
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)

    # One training step: scored once per generation batch, in one call (no scores_padded_batch: no row groups).
    teacher.calls.clear()
    before = snapshot(trainer.model)
    trainer.train()
    assert teacher.calls == [len(PROMPTS)]
    after = snapshot(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_a_teacher_without_full_vocabulary_needs_top_k_at_config_time(tmp_path, toy_teacher):
    with pytest.raises(ValueError, match="returns top-k log-probs only: set teacher_top_k"):
        opd_config(tmp_path, teacher_backend=TOY_TEACHER)


@pytest.mark.parametrize(
    ("field", "registrar"), [("loss_type", "register_divergence"), ("teacher_backend", "register_teacher")]
)
def test_an_unknown_name_fails_when_the_config_is_made_listing_the_registered_ones(tmp_path, field, registrar):
    with pytest.raises(ValueError) as error:
        opd_config(tmp_path, **{field: "not_registered"})
    message = str(error.value)
    known = L.DIVERGENCES if field == "loss_type" else TEACHERS
    assert f"{field}='not_registered'" in message and registrar in message
    assert all(repr(name) in message for name in known)


def test_registered_names_appear_in_the_choices_and_are_accepted(tmp_path, toy_loss, toy_teacher):
    config = opd_config(tmp_path, loss_type=TOY_LOSS, teacher_backend=TOY_TEACHER, teacher_top_k=1)
    assert (config.loss_type, config.teacher_backend) == (TOY_LOSS, TOY_TEACHER)
    assert config.teacher_options() == {"chunk_size": config.teacher_chunk_size}


def test_a_taken_name_or_a_class_without_capabilities_is_refused(toy_loss):
    with pytest.raises(ValueError, match="already registered"):
        L.register_divergence("forward_kl", double_forward_kl)
    with pytest.raises(ValueError, match="already registered"):
        register_teacher("local", ConstantTeacher)
    with pytest.raises(TypeError, match="subclass of opdlm_trl.teachers.TeacherBackend"):
        register_teacher("plain", object)
    with pytest.raises(ValueError, match="not a kind to register"):
        register_teacher("auto", ConstantTeacher)
    assert L.register_divergence(TOY_LOSS, double_forward_kl) is double_forward_kl  # the same function again: no-op
