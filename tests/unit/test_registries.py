"""The extension points are registries: a loss, a teacher backend and a commit rule added from outside the package
train through OPDTrainer (the rule also decodes and is evaluated) with no package file touched, and an unknown name
fails when the config is made.

The toys below are registered by fixtures (and removed after), exactly as a user's module would register them with
:func:`opdlm_trl.losses.register_divergence` / :func:`opdlm_trl.teachers.register_teacher` /
:func:`opdlm_trl.sampling.register_commit_rule`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from opdlm_trl import losses as L
from opdlm_trl import to_diffusion
from opdlm_trl.batch import SupervisedRows, TrainingBatch
from opdlm_trl.diagnostics import out_of_order_commits
from opdlm_trl.eval import evaluate_model
from opdlm_trl.eval.cli import build_parser
from opdlm_trl.sampling import COMMIT_RULES, DiffusionSampler, SamplerConfig, register_commit_rule
from opdlm_trl.teachers import TEACHERS, TeacherBackend, TeacherTargets, register_teacher
from opdlm_trl.teachers.targets import empty_targets
from opdlm_trl.tiny import tiny_model, tiny_tokenizer
from tests.helpers import PROMPTS, cpu_config, fixed_batch, make_trainer, roll_out, snapshot

TOY_LOSS = "toy_double_forward_kl"
TOY_TEACHER = "toy_constant"
TOY_RULE = "toy_rightmost_first"


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


def rightmost_first(confidence, masked, count, config):
    """The rightmost ``count`` masked positions of the block (a rule whose order says it was the one used)."""
    rightmost_first.calls += 1
    rank_from_right = masked.flip(-1).long().cumsum(-1).flip(-1) - 1  # 0 at the last masked position
    return masked & (rank_from_right < count.unsqueeze(-1))


@pytest.fixture
def toy_rule():
    rightmost_first.calls = 0
    register_commit_rule(TOY_RULE, rightmost_first)
    yield rightmost_first
    COMMIT_RULES.pop(TOY_RULE)


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
        cpu_config(tmp_path, teacher_backend=TOY_TEACHER)


def test_a_registered_commit_rule_decodes_evaluates_and_trains(tmp_path, toy_rule):
    # decoding: static, one token a step, so each full block is committed right to left (steps 3, 2, 1, 0)
    teacher = tiny_model("llama")
    student, tokenizer = to_diffusion(copy.deepcopy(teacher), tiny_tokenizer(), block_size=4, shift=True)
    config = SamplerConfig(max_new_tokens=8, commit_order=TOY_RULE)
    rollout = DiffusionSampler(config, pad_token_id=tokenizer.pad_token_id).sample(student, [[5, 6, 7], [8, 9]])
    assert toy_rule.calls > 0
    assert rollout.step_map[0, :4].tolist() == [3, 2, 1, 0]
    out_of_order, commits = out_of_order_commits(rollout.step_map, rollout.decoded_mask, rollout.block_size)
    assert commits > 0 and out_of_order == 3 * commits // 4  # all but a block's last (leftmost) commit

    # evaluation: opdlm-eval offers it, evaluate_model runs it as its own row
    assert TOY_RULE in build_parser().parse_args(["--student", "s", "--commit-orders", TOY_RULE]).commit_orders
    prompts = Dataset.from_list([{"prompt": "def add(a, b):"}, {"prompt": "The quick"}])
    report = evaluate_model(
        student, teacher, tokenizer=tokenizer, dataset=prompts, max_new_tokens=8, decodings=("static",),
        commit_orders=(TOY_RULE,), teacher_generate=False,
    )  # fmt: skip
    row = report["results"][f"student_static_{TOY_RULE}"]
    assert row["commit_order"] == TOY_RULE and row["out_of_order_rate"] > 0.5 and row["teacher_nll_per_token"] > 0

    # training: the trainer's rollouts use it, and one step moves the student
    trainer = make_trainer(tmp_path / "toy", commit_order=TOY_RULE, remasking="static", max_steps=1)
    calls, before = toy_rule.calls, snapshot(trainer.model)
    trainer.train()
    assert toy_rule.calls > calls
    after = snapshot(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_a_commit_rule_that_commits_too_little_is_refused_naming_it(toy_rule):
    register_commit_rule("toy_nothing", lambda confidence, masked, count, config: torch.zeros_like(masked))
    try:
        student, tokenizer = to_diffusion(tiny_model("llama"), tiny_tokenizer(), block_size=4)
        sampler = DiffusionSampler(SamplerConfig(max_new_tokens=4, commit_order="toy_nothing"), pad_token_id=0)
        with pytest.raises(ValueError, match="Commit rule 'toy_nothing' committed fewer"):
            sampler.sample(student, [[5, 6, 7]])
    finally:
        COMMIT_RULES.pop("toy_nothing")


REGISTRIES = {"loss_type": L.DIVERGENCES, "teacher_backend": TEACHERS, "commit_order": COMMIT_RULES}


@pytest.mark.parametrize(
    ("field", "registrar"),
    [
        ("loss_type", "register_divergence"),
        ("teacher_backend", "register_teacher"),
        ("commit_order", "register_commit_rule"),
    ],
)
def test_an_unknown_name_fails_when_the_config_is_made_listing_the_registered_ones(tmp_path, field, registrar):
    with pytest.raises(ValueError) as error:
        cpu_config(tmp_path, **{field: "not_registered"})
    message = str(error.value)
    known = REGISTRIES[field]
    assert f"{field}='not_registered'" in message and registrar in message
    assert all(repr(name) in message for name in known)


def test_registered_names_appear_in_the_choices_and_are_accepted(tmp_path, toy_loss, toy_teacher, toy_rule):
    config = cpu_config(
        tmp_path, loss_type=TOY_LOSS, teacher_backend=TOY_TEACHER, teacher_top_k=1, commit_order=TOY_RULE
    )
    assert (config.loss_type, config.teacher_backend, config.commit_order) == (TOY_LOSS, TOY_TEACHER, TOY_RULE)
    assert config.rollout_sampler_config().commit_order == TOY_RULE
    assert config.teacher_options() == {"chunk_size": config.teacher_chunk_size}


def test_a_taken_name_or_a_class_without_capabilities_is_refused(toy_loss, toy_rule):
    with pytest.raises(ValueError, match="already registered"):
        L.register_divergence("forward_kl", double_forward_kl)
    with pytest.raises(ValueError, match="already registered"):
        register_commit_rule("confidence", rightmost_first)
    with pytest.raises(TypeError, match="needs a callable"):
        register_commit_rule("not_a_rule", "rightmost")
    assert register_commit_rule(TOY_RULE, rightmost_first) is rightmost_first  # the same function again: no-op
    with pytest.raises(ValueError, match="already registered"):
        register_teacher("local", ConstantTeacher)
    with pytest.raises(TypeError, match="subclass of opdlm_trl.teachers.TeacherBackend"):
        register_teacher("plain", object)
    with pytest.raises(ValueError, match="not a kind to register"):
        register_teacher("auto", ConstantTeacher)
    assert L.register_divergence(TOY_LOSS, double_forward_kl) is double_forward_kl  # the same function again: no-op
