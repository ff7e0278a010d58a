"""Qwen3 end to end with its real tokenizer: non-thinking prompts everywhere, the free-row mask token, one stop rule.

The model is a tiny random Qwen3 (hidden 64, 2 layers) with Qwen3's 151,936 embedding rows and its real
tokenizer (151,669 tokens, chat template with ``enable_thinking``), so the mask-token policy and the chat
template behave as for ``Qwen/Qwen3-*`` checkpoints; see the ``qwen3_*`` fixtures in conftest.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from opdlm_trl import OPDConfig, OPDTrainer, diffusion_settings, generate, to_diffusion
from opdlm_trl.data import render_prompts
from opdlm_trl.sampling import DiffusionSampler, default_stop_token_ids
from tests.helpers import cpu_config

NON_THINKING = {"enable_thinking": False}
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what Qwen3's template writes after the header with enable_thinking=false
QWEN3_TOKENS = 151_669
QWEN3_ROWS = 151_936
IM_END, END_OF_TEXT = 151645, 151643
MESSAGES = [
    [{"role": "user", "content": "Write a function that adds two numbers."}],
    [{"role": "user", "content": "What is two plus two?"}],
]


def _args(tmp_path, **overrides) -> OPDConfig:
    """A one-step CPU run: batch 2, 8-token rollouts, nothing saved."""
    settings = dict(max_steps=1, per_device_train_batch_size=2, gradient_checkpointing=True)
    return cpu_config(tmp_path / "out", **{**settings, **overrides})


def _trainer(qwen3_pair, tmp_path, **overrides) -> OPDTrainer:
    model, tokenizer = qwen3_pair()
    return OPDTrainer(
        model,
        args=_args(tmp_path, **overrides),
        train_dataset=Dataset.from_list([{"prompt": m} for m in MESSAGES]),
        processing_class=tokenizer,
    )


def _prompt_texts(rollout, tokenizer) -> list[str]:
    return [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=False)
        for ids, mask in zip(rollout.prompt_ids, rollout.prompt_mask, strict=True)
    ]


def _spy_on_sampler(monkeypatch) -> list:
    """Record the prompt token lists every DiffusionSampler.sample call receives."""
    seen = []
    original = DiffusionSampler.sample

    def sample(self, model, prompts, *args, **kwargs):
        seen.extend(list(map(int, p)) for p in prompts)
        return original(self, model, prompts, *args, **kwargs)

    monkeypatch.setattr(DiffusionSampler, "sample", sample)
    return seen


def test_mask_token_takes_a_free_row_and_keeps_the_teacher_vocabulary(qwen3_pair):
    model, tokenizer = qwen3_pair()
    assert len(tokenizer) == QWEN3_TOKENS and tokenizer.mask_token_id is None
    model, tokenizer = to_diffusion(model, tokenizer, block_size=4)
    settings = diffusion_settings(model)
    assert QWEN3_TOKENS <= settings.mask_token_id < QWEN3_ROWS
    assert tokenizer.mask_token_id == settings.mask_token_id
    assert model.get_input_embeddings().weight.shape[0] == QWEN3_ROWS  # no resize: a free row was used
    assert settings.teacher_vocab_size == QWEN3_ROWS


@pytest.mark.parametrize("kwargs", [NON_THINKING, None])
def test_chat_template_kwargs_reach_the_training_rollouts(qwen3_pair, tmp_path, kwargs):
    """The rollout's prompt carries Qwen3's empty think block exactly when enable_thinking=false is configured."""
    trainer = _trainer(qwen3_pair, tmp_path, chat_template_kwargs=kwargs)
    tokenizer = trainer.processing_class
    rollout = trainer.rollout(MESSAGES)
    texts = _prompt_texts(rollout, tokenizer)
    header = "<|im_start|>assistant\n"
    assert all(text.endswith(header + EMPTY_THINK) for text in texts) == (kwargs is not None)
    assert all(("<think>" in text) == (kwargs is not None) for text in texts)
    assert all(text.endswith(header) for text in texts) == (kwargs is None)
    # The package renders exactly as TRL's own training path does, for chat and plain-text prompts.
    for prompts in (MESSAGES, ["def add(a, b):", "The quick brown fox"]):
        trl_ids, _, _ = trainer._tokenize_prompts(prompts)
        assert trainer.prompt_token_lists(prompts) == [list(ids) for ids in trl_ids]


def test_one_stop_rule_for_training_generation_and_evaluation(qwen3_pair, tmp_path):
    """Qwen3's tokenizer EOS is <|im_end|> only; its generation config adds <|endoftext|>: both stop everywhere."""
    trainer = _trainer(qwen3_pair, tmp_path)
    tokenizer = trainer.processing_class
    assert tokenizer.eos_token_id == IM_END
    expected = sorted([IM_END, END_OF_TEXT])
    assert default_stop_token_ids(tokenizer, trainer.model) == expected
    assert sorted(trainer.eos_token_ids) == expected
    assert sorted(trainer.sampler_config(8).stop_token_ids) == expected


def test_generate_eval_and_teacher_answers_render_non_thinking_prompts(qwen3_pair, tmp_path, monkeypatch):
    from opdlm_trl.baselines import teacher_responses
    from opdlm_trl.eval import evaluate_model

    teacher, tokenizer = qwen3_pair()
    student, student_tokenizer = to_diffusion(*qwen3_pair(), block_size=4)
    expected = render_prompts(MESSAGES, tokenizer, NON_THINKING)
    assert all(tokenizer.decode(ids).endswith(EMPTY_THINK) for ids in expected)

    seen = _spy_on_sampler(monkeypatch)
    texts = generate(student, student_tokenizer, MESSAGES, max_new_tokens=8, chat_template_kwargs=NON_THINKING)
    assert len(texts) == 2 and seen == expected

    seen.clear()
    report = evaluate_model(
        student,
        tokenizer=student_tokenizer,
        dataset=Dataset.from_list([{"prompt": m} for m in MESSAGES]),
        max_new_tokens=4,
        decodings=("static",),
        chat_template_kwargs='{"enable_thinking": false}',  # the CLI's JSON form
    )
    assert seen == expected and report["settings"]["chat_template_kwargs"] == NON_THINKING

    answers = teacher_responses(teacher, tokenizer, MESSAGES, max_new_tokens=4, chat_template_kwargs=NON_THINKING)
    assert len(answers) == 2 and all(n >= 1 for n in answers["completion_tokens"])


def test_eval_cli_refuses_a_malformed_chat_template_option():
    from opdlm_trl.eval.cli import build_parser

    assert (
        build_parser()
        .parse_args(["--student", "s", "--chat_template_kwargs", '{"enable_thinking": false}'])
        .chat_template_kwargs
        == NON_THINKING
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--student", "s", "--chat-template-kwargs", "enable_thinking=false"])
    with pytest.raises(ValueError, match="may not set"):
        render_prompts(MESSAGES, None, {"add_generation_prompt": False})


def test_lm_eval_model_applies_the_non_thinking_template(qwen3_pair):
    pytest.importorskip("lm_eval")
    from opdlm_trl.eval.lm_eval_model import OPDLMEvalModel

    student, tokenizer = to_diffusion(*qwen3_pair(), block_size=4)
    for options in ({"chat_template_kwargs": '{"enable_thinking": false}'}, {"enable_thinking": "False"}):
        lm = OPDLMEvalModel(student, tokenizer=tokenizer, device="cpu", **options)
        assert lm.apply_chat_template(MESSAGES[0]).endswith(EMPTY_THINK)
        assert sorted(lm.sampler_defaults["stop_token_ids"]) == sorted([IM_END, END_OF_TEXT])
    assert "<think>" not in OPDLMEvalModel(student, tokenizer=tokenizer, device="cpu").apply_chat_template(MESSAGES[0])


def test_one_opd_training_step_on_cpu(qwen3_pair, tmp_path):
    trainer = _trainer(qwen3_pair, tmp_path, chat_template_kwargs=NON_THINKING)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 1
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert math.isfinite(logged["loss"]) and logged["rollout/length"] > 0
    changed = [
        name for name, p in trainer.model.named_parameters() if name in before and not torch.equal(p, before[name])
    ]
    assert changed, "one optimizer step changed no weight"
