"""End to end: OPD turns a teacher whose text allows parallel decoding into a student that decodes in parallel.

A tiny Llama is trained from scratch on a synthetic language (:mod:`opdlm_trl.synthetic`) in which most tokens are
deterministic (a counter, fixed phrases, copies of the prompt) and one token in four to eight is a random choice.
Its chain-bound oracle ceiling (:mod:`opdlm_trl.eval.diagnostics`) at threshold 0.9, block 4, is >= 2 tokens per
forward. OPD then converts it through the public API (``OPDTrainer`` + ``OPDConfig``, the trainer's normal path, a
full fine-tune in float32), and the converted student must reach >= 90% of that ceiling in dynamic decoding at 0.9
(the project's sampler) while its static greedy text keeps the teacher's quality (teacher NLL per token within
``NLL_MARGIN`` of the teacher's own greedy text).

The same run with a deliberately broken training signal must fail: teacher targets shifted by one position (each
masked position is trained on its right neighbour's distribution, the classic off-by-one of a causal shift), or
shuffled across rows (each row is trained on another row's targets). Both are corruptions of the teacher's
:class:`opdlm_trl.teachers.TeacherTargets`, applied by a wrapping teacher, so nothing else in the run changes.

Budget: one teacher (shared by the three runs) and three conversions of ``STEPS`` optimizer steps; tiny models run
fastest on one thread, so the module pins torch to one thread and restores the setting after.
"""

from __future__ import annotations

import copy
from dataclasses import fields, replace

import pytest
import torch

from opdlm_trl import OPDTrainer, to_diffusion
from opdlm_trl.synthetic import PhraseChain, evaluate_student, opd_config, phrase_chain_tokenizer, prompt_dataset
from opdlm_trl.synthetic import train_teacher as fit_teacher
from opdlm_trl.teachers import TeacherTargets, build_teacher

pytestmark = pytest.mark.slow

STEPS = 120  # optimizer steps of each conversion (32 rollouts of 32 tokens: ~123k rollout tokens)
SHARE_OF_CEILING = 0.9  # the good run's tokens per forward at 0.9, as a share of the oracle ceiling
NLL_MARGIN = 0.1  # nats per token the student's static greedy text may lose against the teacher's own
BROKEN_SHARE = 0.8  # a broken run's tokens per forward stays below this share of the ceiling ...
BROKEN_NLL = 0.5  # ... or its static text costs the teacher at least this many nats per token more
EVAL_PROMPTS = 64


class CorruptedTeacher:
    """A teacher whose targets are moved before the trainer sees them: ``"shift"`` or ``"shuffle"``.

    ``shift``: completion position ``i`` receives position ``i + 1``'s targets (its right neighbour's next-token
    distribution). ``shuffle``: row ``b`` receives row ``b + 1``'s targets (cyclically), so no row is trained on its
    own text. A position keeps its own target where the moved one would come from padding (a padded row's zeros
    are not a distribution), so only the alignment is broken, never the targets' validity.
    """

    def __init__(self, teacher, corruption: str):
        self.teacher, self.corruption = teacher, corruption

    def move(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.roll(-1, dims=1) if self.corruption == "shift" else tensor.roll(1, dims=0)

    def score(self, *batch, **options) -> TeacherTargets:
        targets = self.teacher.score(*batch, **options)
        movable = self.move(targets.mask) & targets.mask
        moved = {}
        for field in fields(targets):
            tensor = getattr(targets, field.name)
            if tensor is None or field.name == "mask":
                continue
            where = movable.view(*movable.shape, *([1] * (tensor.dim() - 2)))
            moved[field.name] = torch.where(where, self.move(tensor), tensor)
        return replace(targets, **moved)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def language() -> PhraseChain:
    return PhraseChain()


@pytest.fixture(scope="module")
def tokenizer(language):
    return phrase_chain_tokenizer(language)


@pytest.fixture(scope="module")
def teacher(language, tokenizer):
    return fit_teacher(language, tokenizer, seed=0)


@pytest.fixture(scope="module")
def eval_prompts(language):
    return prompt_dataset(language, EVAL_PROMPTS, seed=12345)


def convert(teacher, tokenizer, language, output_dir, corruption: str | None = None, seed: int = 0) -> OPDTrainer:
    """OPD through the public API: the trainer's own frozen-copy teacher, or that teacher behind a corruption."""
    args = opd_config(output_dir, max_steps=STEPS, seed=seed, logging_steps=STEPS)
    prompts = prompt_dataset(language, STEPS * args.per_device_train_batch_size, seed=seed + 1)
    student = copy.deepcopy(teacher).requires_grad_(True)  # evaluate_student's teacher scorer froze it in place
    if corruption is None:
        trainer = OPDTrainer(student, args=args, train_dataset=prompts, processing_class=tokenizer)
    else:
        student, student_tokenizer = to_diffusion(student, tokenizer, block_size=args.block_size, shift=args.shift)
        signal = CorruptedTeacher(build_teacher("local", student=student, model=copy.deepcopy(teacher)), corruption)
        trainer = OPDTrainer(student, args=args, train_dataset=prompts, processing_class=student_tokenizer, teacher=signal)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def before(teacher, tokenizer, eval_prompts):
    """The unconverted teacher decoded as a diffusion student (what training has to improve on)."""
    student, student_tokenizer = to_diffusion(copy.deepcopy(teacher), tokenizer, block_size=4, shift=True)
    return evaluate_student(student, teacher, student_tokenizer, eval_prompts)


def test_teacher_allows_parallel_decoding(before):
    """The language is learned: >= 2 tokens per forward reachable at 0.9, at a small NLL (one choice per unit)."""
    assert before["ceiling"] >= 2.0, before
    assert before["teacher_nll"] < 0.2, before


def test_opd_reaches_the_ceiling_at_the_teachers_quality(teacher, tokenizer, language, eval_prompts, before, tmp_path):
    trainer = convert(teacher, tokenizer, language, tmp_path)
    after = evaluate_student(trainer.model, teacher, trainer.processing_class, eval_prompts)
    assert after["tokens_per_forward"] >= SHARE_OF_CEILING * after["ceiling"], (before, after)
    assert after["static_nll"] <= after["teacher_nll"] + NLL_MARGIN, (before, after)
    assert after["tokens_per_forward"] > before["tokens_per_forward"] + 0.5, (before, after)


@pytest.mark.parametrize("corruption", ["shift", "shuffle"])
def test_a_broken_signal_fails(teacher, tokenizer, language, eval_prompts, corruption, tmp_path):
    """Same run, corrupted targets: parallelism or quality stays clearly outside what the good run passes."""
    trainer = convert(teacher, tokenizer, language, tmp_path, corruption=corruption)
    after = evaluate_student(trainer.model, teacher, trainer.processing_class, eval_prompts)
    slow = after["tokens_per_forward"] < BROKEN_SHARE * after["ceiling"]
    wrong = after["static_nll"] >= after["teacher_nll"] + BROKEN_NLL
    assert slow or wrong, after
