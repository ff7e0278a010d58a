"""Exact fixed-order log-likelihood and the Monte Carlo ELBO of a block-diffusion student (opdlm_trl.likelihood)."""

from __future__ import annotations

import copy

import pytest
import torch

from opdlm_trl.likelihood import elbo_loglikelihood, loglikelihood, score_continuations
from opdlm_trl.masks import block_causal_mask, decoding_order_layout, in_block_offsets, pad_to_blocks
from opdlm_trl.modeling import restrict_to_teacher_vocab, student_forward, to_diffusion
from opdlm_trl.sampling import DiffusionSampler, SamplerConfig
from opdlm_trl.tiny import tiny_tokenizer

PAD = tiny_tokenizer().pad_token_id
SHIFTS = (False, True)
SHARPEN = 16.0  # random tiny models are near-uniform; a sharper output makes greedy and argmax checks meaningful
ATOL = 1e-4  # float32, different kernels (cached sampler vs one layout forward): measured differences ~1e-6


def _requests(random_ids, lengths, seed=0) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs of ordinary tokens with the given ``(context, continuation)`` lengths."""
    out = []
    for index, (context, continuation) in enumerate(lengths):
        ids = random_ids(1, context + continuation, seed=seed + index)[0].tolist()
        out.append((ids[:context], ids[context:]))
    return out


def _sharpened(model):
    with torch.no_grad():
        model.model.norm.weight.mul_(SHARPEN)
    return model


def _ar_logprobs(model, context, continuation) -> torch.Tensor:
    """Reference: the causal LM's log-probabilities of ``continuation`` after ``context`` (one plain forward)."""
    sequence = torch.tensor([context + continuation])
    logprobs = model(sequence).logits.float().log_softmax(-1)[0, len(context) - 1 : -1]
    return logprobs.gather(-1, torch.tensor(continuation)[:, None])[:, 0]


LENGTHS = [(5, 3), (9, 1), (3, 7), (6, 4)]


def test_block_one_shifted_student_is_the_ar_model(make_model, tokenizer, random_ids):
    teacher = _sharpened(make_model("llama"))
    student, _ = to_diffusion(copy.deepcopy(teacher), tokenizer, block_size=1, shift=True)
    requests = _requests(random_ids, LENGTHS)
    got = loglikelihood(student, requests, PAD, batch_size=3)
    with torch.no_grad():
        for (context, continuation), (total, greedy) in zip(requests, got, strict=True):
            reference = _ar_logprobs(teacher, context, continuation)
            assert total == pytest.approx(float(reference.sum()), abs=ATOL)
            logits = teacher(torch.tensor([context + continuation])).logits[0, len(context) - 1 : -1]
            assert greedy == bool((logits.argmax(-1) == torch.tensor(continuation)).all())
    # and a continuation made of the AR argmax is greedy for the student too
    context = requests[0][0]
    with torch.no_grad():
        argmax = teacher.generate(torch.tensor([context]), max_new_tokens=4, do_sample=False)[0, len(context) :]
    ((_, greedy),) = loglikelihood(student, [(context, argmax.tolist())], PAD)
    assert greedy


def _left_to_right_reference(model, context, continuation, block_size, shift, mask_id) -> torch.Tensor:
    """Per-token log-probs by running every left-to-right state as its own canvas forward (no training layout)."""
    prompt_ids, prompt_mask = pad_to_blocks([context], block_size, PAD, "left")
    width = -(-len(continuation) // block_size) * block_size
    offsets = in_block_offsets(width, block_size)
    out = []
    for j, token in enumerate(continuation):
        start = j - int(offsets[j])
        block = [*continuation[start:j], *[mask_id] * (block_size - int(offsets[j]))]
        canvas = torch.cat([prompt_ids, torch.tensor([[*continuation[:start], *block]])], dim=1)
        key_mask = torch.cat([prompt_mask, torch.ones(1, canvas.shape[1] - prompt_ids.shape[1], dtype=torch.long)], 1)
        logits = student_forward(model, canvas, key_mask, block_size=block_size).logits[0]
        reader = prompt_ids.shape[1] + j - (1 if shift else 0)
        row = restrict_to_teacher_vocab(logits[reader].float(), mask_id, len(tokenizer_vocab(model)))
        out.append(row.log_softmax(-1)[token])
    return torch.stack(out)


def tokenizer_vocab(model) -> range:
    from opdlm_trl.modeling import diffusion_settings

    return range(diffusion_settings(model).teacher_vocab_size)


@pytest.mark.parametrize("shift", SHIFTS)
def test_left_to_right_states_match_one_canvas_forward_per_token(make_student, random_ids, shift):
    student, tokenizer = make_student("qwen2", block_size=4, shift=shift)
    requests = _requests(random_ids, LENGTHS)
    scores = score_continuations(student, [r[0] for r in requests], [r[1] for r in requests], PAD)
    with torch.no_grad():
        for row, (context, continuation) in enumerate(requests):
            reference = _left_to_right_reference(student, context, continuation, 4, shift, tokenizer.mask_token_id)
            assert scores.mask[row].sum() == len(continuation)
            torch.testing.assert_close(scores.logprobs[row, : len(continuation)], reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("shift", SHIFTS)
def test_exact_loglikelihood_is_the_samplers_own_logprob_of_what_it_wrote(make_student, random_ids, shift):
    """Greedy static decoding, one token per step: the sampler's recorded log-probs along its own commits sum to
    the exact log-likelihood under its step map; every token is greedy."""
    student, tokenizer = make_student("llama", block_size=4, shift=shift)
    _sharpened(student)
    prompts = [ids for ids, _ in _requests(random_ids, [(5, 0), (9, 0), (3, 0)])]
    sampler = DiffusionSampler(
        SamplerConfig(block_size=4, max_new_tokens=8, steps_per_block=4, stop_token_ids=None),
        pad_token_id=PAD,
        record_logits=True,
    )
    rollout = sampler.sample(student, prompts)
    expected = torch.zeros(len(prompts), dtype=torch.float64)
    mask_id, vocab = tokenizer.mask_token_id, len(tokenizer_vocab(student))
    for record in sampler.records:
        logprobs = restrict_to_teacher_vocab(record.logits.float(), mask_id, vocab).log_softmax(-1)
        span = slice(record.block * 4, (record.block + 1) * 4)
        for local, row in enumerate(record.rows.tolist()):
            committed = rollout.step_map[row, span] == record.step
            tokens = rollout.completion_ids[row, span]
            expected[row] += logprobs[local].gather(-1, tokens[:, None])[:, 0][committed].double().sum()
    continuations = rollout.completion_ids.tolist()
    scores = score_continuations(student, prompts, continuations, PAD, step_maps=rollout.step_map)
    totals = scores.totals()
    assert [greedy for _, greedy in totals] == [True] * len(prompts)
    assert [total for total, _ in totals] == pytest.approx(expected.tolist(), abs=ATOL)
    # left to right is the default order: equal to an explicit offset step map, and a different number
    # than the sampler's order wherever that order was not left to right
    left_to_right = score_continuations(student, prompts, continuations, PAD)
    explicit = score_continuations(
        student, prompts, continuations, PAD, step_maps=in_block_offsets(8, 4).expand(len(prompts), -1)
    )
    torch.testing.assert_close(left_to_right.logprobs, explicit.logprobs)
    in_order = (rollout.step_map == in_block_offsets(8, 4)).all(1)
    for row in range(len(prompts)):
        if in_order[row]:
            assert left_to_right.totals()[row][0] == pytest.approx(totals[row][0], abs=ATOL)


@pytest.mark.parametrize("shift", SHIFTS)
def test_batching_and_padding_change_nothing(make_student, random_ids, shift):
    student, _ = make_student("llama", block_size=4, shift=shift)
    requests = _requests(random_ids, [*LENGTHS, (1, 9), (12, 2)])
    alone = [loglikelihood(student, [request], PAD)[0] for request in requests]
    together = loglikelihood(student, requests, PAD, batch_size=len(requests))
    pairs = loglikelihood(student, requests, PAD, batch_size=2)
    for one, *others in zip(alone, together, pairs, strict=True):
        for other in others:
            assert other[0] == pytest.approx(one[0], abs=ATOL) and other[1] == one[1]


def test_copies_per_decoding_step(make_student, random_ids):
    """Left to right costs block_size noisy copies unshifted, block_size - 1 shifted; short continuations fewer."""
    for shift, copies in ((False, 4), (True, 3)):
        student, tokenizer = make_student("llama", block_size=4, shift=shift)
        prompt_ids, prompt_mask = pad_to_blocks([[5, 6, 7]], 4, PAD, "left")
        completion = torch.tensor([[8, 9, 10, 11, 12, 13, 14, 15]])
        ordered = decoding_order_layout(
            prompt_ids, prompt_mask, completion, torch.ones_like(completion), 4, shift, tokenizer.mask_token_id
        )
        assert ordered.layout.input_ids.shape[1] == 4 + 8 * (copies + 1)
    ones = torch.ones(1, 4, dtype=torch.long)
    short = decoding_order_layout(
        prompt_ids, prompt_mask, completion[:, :4], ones, 4, True, tokenizer.mask_token_id,
        step_map=torch.tensor([[0, -1, -1, -1]]),
    )  # fmt: skip
    assert short.layout.input_ids.shape[1] == 8 and short.source_index[0, 0] == 3  # the clean canvas only


def test_block_one_layout_is_the_causal_canvas(make_student):
    """Shifted, block 1: no noisy copy, and the mask of the remaining canvas is the causal mask."""
    student, tokenizer = make_student("llama", block_size=1, shift=True)
    prompt_ids, prompt_mask = pad_to_blocks([[5, 6, 7]], 1, PAD, "left")
    completion = torch.tensor([[8, 9]])
    ordered = decoding_order_layout(
        prompt_ids, prompt_mask, completion, torch.ones_like(completion), 1, True, tokenizer.mask_token_id
    )
    assert ordered.layout.input_ids.shape[1] == 5 and ordered.source_index.tolist() == [[2, 3]]
    causal = block_causal_mask(torch.ones(1, 5, dtype=torch.long), 1)
    torch.testing.assert_close(ordered.layout.attention_mask, causal)


@pytest.mark.parametrize("shift", SHIFTS)
def test_elbo_is_seeded_and_weights_masked_tokens_by_one_over_t(make_student, random_ids, shift):
    """A one-token continuation contributes ``log p / t`` when masked, 0 otherwise: the estimate is ``log p`` times a
    factor that depends on the seed only, never on the model. (That factor has mean 1 but infinite variance under
    ``t ~ U(0, 1]``; benchmarks/loglikelihood.py measures what that means for ``mc_num``.)"""
    requests = _requests(random_ids, [(5, 1)])
    ratios = []
    for seed in (0, 1):
        student, _ = make_student("llama", block_size=4, shift=shift, seed=seed)
        ((exact, _),) = loglikelihood(student, requests, PAD)
        estimate = elbo_loglikelihood(student, requests, PAD, mc_num=16, generator=torch.Generator().manual_seed(3))
        again = elbo_loglikelihood(student, requests, PAD, mc_num=16, generator=torch.Generator().manual_seed(3))
        split = elbo_loglikelihood(
            student, requests, PAD, mc_num=16, samples_per_forward=5, generator=torch.Generator().manual_seed(3)
        )
        assert estimate == again and estimate[0] <= 0.0
        assert split[0] != pytest.approx(estimate[0]) or estimate[0] == 0.0  # other chunking, other draws
        ratios.append(estimate[0] / exact)
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-4) and ratios[0] > 0


def test_elbo_of_longer_continuations_is_finite(make_student, random_ids):
    student, _ = make_student("llama", block_size=4, shift=True)
    requests = _requests(random_ids, [(5, 6), (3, 2)])
    estimate = elbo_loglikelihood(student, requests, PAD, mc_num=8, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(estimate))) and all(value <= 0 for value in estimate)


def test_bad_requests_are_refused_early(make_student):
    student, _ = make_student("llama")
    with pytest.raises(ValueError, match="empty continuation"):
        loglikelihood(student, [([1, 2], [])], PAD)
    with pytest.raises(ValueError, match="at least one token"):
        loglikelihood(student, [([], [1, 2])], PAD)
    with pytest.raises(ValueError, match="max_length"):
        loglikelihood(student, [([1, 2], [3, 4, 5, 6])], PAD, max_length=3)
