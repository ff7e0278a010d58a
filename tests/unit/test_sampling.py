"""Tests of the block-diffusion sampler: cache exactness, schedules, trajectory replay, stops, errors."""

from __future__ import annotations

import pytest
import torch

from opdlm_trl.masks import gather_predictions, training_layout
from opdlm_trl.modeling import student_forward, to_diffusion
from opdlm_trl.sampling import (
    COMMIT_RULES,
    DiffusionSampler,
    Rollout,
    SamplerConfig,
    _commit_mask,
    default_stop_token_ids,
    generate,
)
from opdlm_trl.tiny import ARCHITECTURES, tiny_model, tiny_tokenizer

BLOCK = 4
PAD = tiny_tokenizer().pad_token_id
TEXTS = ("def add(a, b):", "The quick", "for i in range(10):\n    print(i * i)\nclass Stack:")
SHIFTS = (False, True)
SHARPEN = 16.0  # random tiny models are near-uniform; scaling the final norm gives realistic confidences
LOW = 0.2  # a dynamic threshold that several positions per step clear on the sharpened models


def make_student(arch: str = "llama", shift: bool = False, block_size: int | None = BLOCK):
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch)
    to_diffusion(model, tokenizer, block_size=block_size, shift=shift)
    with torch.no_grad():
        model.model.norm.weight.mul_(SHARPEN)
    return model, tokenizer


def prompts_for(tokenizer) -> list[list[int]]:
    """Three prompts of different lengths (mixed left padding)."""
    return [tokenizer(text)["input_ids"] for text in TEXTS]


def run(model, prompts, record: bool = False, **config):
    config.setdefault("max_new_tokens", 16)
    sampler = DiffusionSampler(SamplerConfig(**config), pad_token_id=PAD, record_logits=record)
    return sampler.sample(model, prompts), sampler


def assert_valid(rollout: Rollout, model) -> None:
    """Properties every rollout must have, whatever the settings."""
    vocab = model.config.opdlm["teacher_vocab_size"]
    assert not (rollout.completion_ids == rollout.mask_token_id).any()
    committed = rollout.step_map >= 0
    assert (rollout.completion_ids[committed] < vocab).all()
    assert (rollout.completion_mask <= rollout.decoded_mask).all()
    assert (committed <= rollout.decoded_mask.bool()).all()
    assert rollout.prompt_ids.shape[1] % rollout.block_size == 0


def assert_replay(model, rollout: Rollout, records, tolerance: float = 1e-5) -> int:
    """Every recorded step's logits == a block-causal canvas forward of ``rollout.state(b, s)``."""
    bs, prompt_len = rollout.block_size, rollout.prompt_ids.shape[1]
    checked = 0
    for record in records:
        rows, b, s = record.rows, record.block, record.step
        visited = s < rollout.block_steps[rows, b]  # rows whose block still had masks at this step
        end = (b + 1) * bs
        canvas = torch.cat([rollout.prompt_ids[rows], rollout.state(b, s)[rows, :end]], dim=1)
        keys = torch.cat([rollout.prompt_mask[rows], rollout.decoded_mask[rows, :end]], dim=1)
        with torch.no_grad():
            logits = student_forward(model, canvas, keys).logits
        targets = torch.arange(prompt_len + b * bs, prompt_len + end)
        replayed = gather_predictions(logits, targets, rollout.shift)
        error = (replayed[visited] - record.logits[visited]).abs().max().item()
        assert error <= tolerance, f"block {b} step {s}: replay differs by {error}"
        checked += int(visited.sum())
    return checked


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_equals_uncached(arch, shift):
    model, tokenizer = make_student(arch, shift)
    prompts = prompts_for(tokenizer)
    for remasking, threshold in (("static", 0.9), ("dynamic", LOW)):
        cached, _ = run(model, prompts, remasking=remasking, threshold=threshold, use_cache=True)
        uncached, _ = run(model, prompts, remasking=remasking, threshold=threshold, use_cache=False)
        assert torch.equal(cached.completion_ids, uncached.completion_ids)
        assert torch.equal(cached.step_map, uncached.step_map)
        assert torch.equal(cached.global_step_map, uncached.global_step_map)
        assert torch.equal(cached.block_steps, uncached.block_steps)
        # prefill + one forward per step (commit passes ride on the next block's first step)
        assert cached.nfe == 1 + uncached.nfe
        assert uncached.nfe == int(cached.block_steps.max(0).values.sum())
        assert_valid(cached, model)
    assert cached.tokens_per_step > 1.0  # dynamic at a low threshold committed several per step


@pytest.mark.parametrize("shift", SHIFTS)
def test_static_schedules(shift):
    model, tokenizer = make_student("qwen2", shift)
    prompts = prompts_for(tokenizer)
    one, _ = run(model, prompts, steps_per_block=BLOCK)
    per_block = one.step_map.view(len(prompts), -1, BLOCK)
    assert torch.equal(per_block.sort(-1).values, torch.arange(BLOCK).expand_as(per_block))
    assert (one.block_steps == BLOCK).all() and one.tokens_per_step == 1.0
    assert one.nfe == 1 + 4 * BLOCK
    # the global map counts steps across blocks
    assert torch.equal(one.global_step_map, one.step_map + BLOCK * (torch.arange(16) // BLOCK))

    two, _ = run(model, prompts, steps_per_block=2)
    counts = torch.stack([(two.step_map == s).sum(-1) for s in range(2)], -1)
    assert (counts == 8).all() and two.tokens_per_step == 2.0

    three, _ = run(model, prompts, steps_per_block=3)  # 4 // 3 = 1 per step, the last step takes the rest
    per_block = three.step_map.view(len(prompts), -1, BLOCK)
    counts = torch.stack([(per_block == s).sum(-1) for s in range(3)], -1)
    assert (counts == torch.tensor([1, 1, 2])).all()


@pytest.mark.parametrize("shift", SHIFTS)
def test_dynamic_limits(shift):
    model, tokenizer = make_student("llama", shift)
    prompts = prompts_for(tokenizer)
    static, _ = run(model, prompts)
    strict, _ = run(model, prompts, remasking="dynamic", threshold=1.0)
    assert torch.equal(strict.completion_ids, static.completion_ids)
    assert torch.equal(strict.step_map, static.step_map)
    loose, _ = run(model, prompts, remasking="dynamic", threshold=0.0)
    assert (loose.step_map == 0).all() and (loose.block_steps == 1).all()
    assert loose.tokens_per_step == BLOCK and loose.nfe == 1 + 4


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_replay_reproduces_sampler_logits(arch, shift):
    model, tokenizer = make_student(arch, shift)
    prompts = prompts_for(tokenizer)
    generator = torch.Generator().manual_seed(0)
    config = SamplerConfig(max_new_tokens=16, remasking="dynamic", threshold=LOW, temperature=1.0)
    sampler = DiffusionSampler(config, pad_token_id=PAD, record_logits=True)
    rollout = sampler.sample(model, prompts, generator=generator)
    checked = assert_replay(model, rollout, sampler.records)
    assert checked == int(rollout.block_steps.sum())  # every visited (row, block, step) compared
    assert rollout.tokens_per_step > 1.0


@pytest.mark.parametrize("commit_order", list(COMMIT_RULES))
@pytest.mark.parametrize("shift", SHIFTS)
def test_training_layout_reproduces_one_state_per_block(shift, commit_order):
    """The trainer's vectorised ``[prompt | x0 | x_t]`` forward sees exactly what the sampler saw, whatever the
    order the sampler committed in (the states are rebuilt from its step map alone)."""
    model, tokenizer = make_student("qwen3", shift)
    prompts = prompts_for(tokenizer)
    rollout, sampler = run(model, prompts, record=True, remasking="dynamic", threshold=LOW, commit_order=commit_order)
    assert rollout.tokens_per_step > 1.0  # several commits per step: the states differ from AR prefixes
    generator = torch.Generator().manual_seed(0)
    chosen = (torch.rand(rollout.block_steps.shape, generator=generator) * rollout.block_steps).long()
    noisy = torch.empty_like(rollout.completion_ids)
    for b in range(rollout.block_steps.shape[1]):
        for row in range(len(prompts)):
            span = slice(b * BLOCK, (b + 1) * BLOCK)
            noisy[row, span] = rollout.state(b, int(chosen[row, b]))[row, span]
    layout = training_layout(
        rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, noisy, rollout.decoded_mask, BLOCK, shift
    )
    with torch.no_grad():
        logits = student_forward(model, layout.input_ids, layout.attention_mask, position_ids=layout.position_ids)
    predicted = logits.logits[:, layout.source_index]
    records = {(r.block, r.step): r for r in sampler.records}
    for b in range(rollout.block_steps.shape[1]):
        for row in range(len(prompts)):
            record = records[(b, int(chosen[row, b]))]
            local = int((record.rows == row).nonzero())
            span = slice(b * BLOCK, (b + 1) * BLOCK)
            assert (predicted[row, span] - record.logits[local]).abs().max() <= 1e-5


@pytest.mark.parametrize("shift", SHIFTS)
def test_seeded_sampling_is_reproducible(shift):
    model, tokenizer = make_student("llama", shift)
    prompts = prompts_for(tokenizer)
    config = SamplerConfig(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, remasking="dynamic")
    outputs = [
        DiffusionSampler(config, pad_token_id=PAD).sample(
            model, prompts, generator=torch.Generator().manual_seed(seed)
        )
        for seed in (0, 0, 1)
    ]
    assert torch.equal(outputs[0].completion_ids, outputs[1].completion_ids)
    assert torch.equal(outputs[0].step_map, outputs[1].step_map)
    assert not torch.equal(outputs[0].completion_ids, outputs[2].completion_ids)
    for rollout in outputs:
        assert_valid(rollout, model)  # llama got an added mask row: never sampled, nor the mask id


@pytest.mark.parametrize("shift", SHIFTS)
def test_stop_token_ends_rows(shift):
    model, tokenizer = make_student("mistral", shift)
    prompts = prompts_for(tokenizer)
    free, _ = run(model, prompts, max_new_tokens=24)
    row0 = free.completion_ids[0].tolist()
    fresh = [p for p in range(5, len(row0)) if row0.index(row0[p]) == p]
    assert fresh, "greedy row 0 repeats one token; pick another SHARPEN"
    stop = row0[fresh[0]]  # a token greedy decoding first emits mid-completion in row 0
    stopped, sampler = run(model, prompts, max_new_tokens=24, stop_token_ids=[stop], record=True)
    assert_valid(stopped, model)
    assert_replay(model, stopped, sampler.records)
    for row in range(len(prompts)):
        hits = (free.completion_ids[row] == stop).nonzero().flatten()
        if hits.numel() == 0:
            assert stopped.finish_reason[row] == "length" and stopped.completion_mask[row].all()
            continue
        end = int(hits[0]) + 1
        last_block = (end - 1) // BLOCK
        assert stopped.finish_reason[row] == "stop"
        assert stopped.completion_mask[row].sum() == end
        assert torch.equal(stopped.completion_ids[row, :end], free.completion_ids[row, :end])
        assert stopped.decoded_mask[row].sum() == (last_block + 1) * BLOCK
        assert (stopped.block_steps[row, last_block + 1 :] == 0).all()
        assert (stopped.step_map[row, (last_block + 1) * BLOCK :] == -1).all()
        assert (stopped.completion_ids[row, (last_block + 1) * BLOCK :] == tokenizer.pad_token_id).all()
    assert stopped.finish_reason[0] == "stop"


def test_finished_rows_stop_costing_forwards():
    model, tokenizer = make_student("llama", False)
    prompt = prompts_for(tokenizer)[:1]
    free, _ = run(model, prompt, max_new_tokens=32)
    stop = int(free.completion_ids[0, 2])
    stopped, _ = run(model, prompt, max_new_tokens=32, stop_token_ids=[stop])
    end = int((free.completion_ids[0] == stop).nonzero()[0]) + 1
    assert stopped.finish_reason == ["stop"]
    assert stopped.nfe == 1 + int(stopped.block_steps.sum()) < free.nfe == 1 + 32
    assert int(stopped.block_steps.sum()) <= ((end - 1) // BLOCK + 1) * BLOCK


def test_tensor_prompts_are_repadded_on_the_left():
    model, tokenizer = make_student("qwen2", True)
    prompts = prompts_for(tokenizer)
    width = max(map(len, prompts)) + 1  # deliberately not a multiple of the block size
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(prompts):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    sampler = DiffusionSampler(SamplerConfig(max_new_tokens=8), pad_token_id=PAD)
    from_tensor = sampler.sample(model, ids, attention_mask=mask)
    from_lists = sampler.sample(model, prompts)
    assert from_tensor.prompt_ids.shape[1] % BLOCK == 0
    assert torch.equal(from_tensor.completion_ids, from_lists.completion_ids)
    with pytest.raises(ValueError, match="LEFT-padded"):
        sampler.sample(model, ids, attention_mask=mask.flip(-1))


def test_rounding_up_max_new_tokens_warns():
    model, tokenizer = make_student()
    with pytest.warns(UserWarning, match="max_new_tokens=10"):
        rollout, _ = run(model, prompts_for(tokenizer), max_new_tokens=10)
    assert rollout.completion_ids.shape[1] == 12


@pytest.mark.parametrize("shift", SHIFTS)
def test_whole_completion_block(shift):
    """``block_size=None`` students decode the completion as one bidirectional block."""
    model, tokenizer = make_student("llama", shift, block_size=None)
    prompts = prompts_for(tokenizer)
    cached, sampler = run(model, prompts, max_new_tokens=6, record=True)
    uncached, _ = run(model, prompts, max_new_tokens=6, use_cache=False)
    assert cached.block_size == 6 and cached.block_steps.tolist() == [[6]] * 3
    assert torch.equal(cached.completion_ids, uncached.completion_ids)
    assert torch.equal(cached.step_map, uncached.step_map)


def test_errors_are_clear():
    model, tokenizer = make_student("llama", True)
    with pytest.raises(ValueError, match="Empty prompt.*shifted student"):
        run(model, [[5, 6], []])
    unshifted, _ = make_student("llama", False)
    with pytest.raises(ValueError, match="Empty prompt.*BOS"):
        run(unshifted, [[]])
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        run(model, [[7] * 500], max_new_tokens=16)
    with pytest.raises(ValueError, match="steps_per_block=8 exceeds block_size=4"):
        run(model, [[7, 8]], steps_per_block=8)
    with pytest.raises(ValueError, match="not a diffusion student"):
        DiffusionSampler().sample(tiny_model("llama"), [[1, 2]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"remasking": "greedy"}, "remasking"),
        ({"confidence": "logit"}, "confidence"),
        ({"threshold": 1.5}, "threshold"),
        ({"confidence": "entropy", "threshold": 0.9}, "NEGATIVE entropy"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 4, "steps_per_block": 5}, "steps_per_block"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"commit_order": "random"}, "commit_order=.random. is not a registered commit rule"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


@pytest.mark.parametrize("confidence", ["margin", "entropy"])
def test_other_confidences(confidence):
    model, tokenizer = make_student("qwen3", True)
    threshold = -10.0 if confidence == "entropy" else 0.0  # everything qualifies: one step per block
    rollout, _ = run(model, prompts_for(tokenizer), remasking="dynamic", confidence=confidence, threshold=threshold)
    assert (rollout.block_steps == 1).all()
    assert_valid(rollout, model)


@pytest.mark.parametrize("shift", SHIFTS)
def test_fresh_lora_decodes_like_the_base_model(shift):
    peft = pytest.importorskip("peft", reason="peft is an optional dependency")
    model, tokenizer = make_student("qwen2", shift)
    prompts = prompts_for(tokenizer)
    base, _ = run(model, prompts, remasking="dynamic", threshold=LOW)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    lora, _ = run(wrapped, prompts, remasking="dynamic", threshold=LOW)
    assert wrapped.training  # the sampler restores the caller's mode
    assert torch.equal(base.completion_ids, lora.completion_ids)
    assert torch.equal(base.step_map, lora.step_map)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # lm_head untied / tied to the embedding
def test_lora_mask_row_is_merged_for_decoding_exactly(architecture, monkeypatch):
    """The sampler writes peft's trainable mask row into the frozen embedding once per decode instead of letting peft
    rebuild the (V, H) matrix every forward: the same logits and tokens as peft's own path, the frozen base bitwise
    unchanged afterwards, and the row still trained by the next gradient forward."""
    peft = pytest.importorskip("peft", reason="peft is an optional dependency")
    import contextlib

    from peft.tuners.trainable_tokens import TrainableTokensLayer

    import opdlm_trl.sampling as sampling

    model, tokenizer = make_student(architecture, True)
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        trainable_token_indices=[tokenizer.mask_token_id],
    )  # fmt: skip
    wrapped = peft.get_peft_model(model, config)
    deltas = [p for name, p in wrapped.named_parameters() if "trainable_tokens_delta" in name]
    with torch.no_grad():
        for delta in deltas:
            delta.normal_()  # a trained mask row: decoding depends on it
    frozen = {name: p.detach().clone() for name, p in wrapped.named_parameters() if not p.requires_grad}
    rebuilds = []
    rebuild = TrainableTokensLayer.get_merged_weights
    monkeypatch.setattr(
        TrainableTokensLayer, "get_merged_weights", lambda layer, *a: rebuilds.append(1) or rebuild(layer, *a)
    )
    prompts = prompts_for(tokenizer)

    merged, merged_sampler = run(wrapped, prompts, record=True, remasking="dynamic", threshold=LOW)
    assert not rebuilds, "peft rebuilt the embedding matrix inside the decode"
    monkeypatch.setattr(sampling, "trainable_tokens_merged", contextlib.nullcontext)  # peft's per-forward path
    unmerged, unmerged_sampler = run(wrapped, prompts, record=True, remasking="dynamic", threshold=LOW)
    assert len(rebuilds) >= unmerged.nfe  # the reference really took peft's path

    assert torch.equal(merged.completion_ids, unmerged.completion_ids)
    assert torch.equal(merged.step_map, unmerged.step_map)
    assert len(merged_sampler.records) == len(unmerged_sampler.records)
    for ours, theirs in zip(merged_sampler.records, unmerged_sampler.records, strict=True):
        assert torch.equal(ours.logits, theirs.logits)
    assert not any(layer.merged for layer in wrapped.modules() if isinstance(layer, TrainableTokensLayer))
    for name, p in wrapped.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"the decode left {name} changed"

    wrapped.train()
    ids = merged.completion_ids.new_full((1, 8), tokenizer.mask_token_id)
    student_forward(wrapped, ids, torch.ones_like(ids)).logits.float().square().mean().backward()
    assert all(delta.grad is not None and delta.grad.abs().sum() > 0 for delta in deltas)


def test_generate_text_and_chat():
    model, tokenizer = make_student("llama", True)
    stops = default_stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    texts = generate(model, tokenizer, list(TEXTS), max_new_tokens=8, batch_size=2)
    rollout, _ = run(model, prompts_for(tokenizer), max_new_tokens=8, stop_token_ids=stops)
    assert texts == rollout.texts(tokenizer)
    chats = generate(model, tokenizer, [[{"role": "user", "content": "hi"}]], max_new_tokens=8)
    assert len(chats) == 1 and isinstance(chats[0], str)
    with pytest.raises(TypeError, match="Unknown sampler argument"):
        generate(model, tokenizer, ["x"], max_tokens=3)


@pytest.mark.parametrize("use_cache", [True, False])
def test_logits_never_exceed_the_current_block(use_cache):
    """Every forward materialises at most ``block_size + 1`` positions of logits (``logits_to_keep``)."""
    model, tokenizer = make_student("llama", True)
    widths: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: widths.append(output.shape[1]))
    try:
        rollout, _ = run(model, prompts_for(tokenizer), use_cache=use_cache)
    finally:
        handle.remove()
    assert len(widths) == rollout.nfe and max(widths) <= BLOCK + 1


def test_config_from_options_maps_same_named_fields():
    """One mapping from trainer / CLI options to the sampler: same names, None keeps the default, overrides win."""
    from types import SimpleNamespace

    options = SimpleNamespace(remasking="dynamic", threshold=0.8, top_k=None, temperature=0.5, unrelated=3)
    config = SamplerConfig.from_options(options, max_new_tokens=12, temperature=0.0)
    assert (config.remasking, config.threshold, config.top_k) == ("dynamic", 0.8, 0)
    assert (config.max_new_tokens, config.temperature) == (12, 0.0)


# --------------------------------------------------------------------------------------------------
# Left-to-right commit order
# --------------------------------------------------------------------------------------------------


def commit(confidence, masked, step=0, steps=4, **config):
    """``_commit_mask`` of one block row (``config``: SamplerConfig fields, left-to-right by default)."""
    config.setdefault("commit_order", "left_to_right")
    return _commit_mask(
        torch.tensor([confidence]), torch.tensor([masked]), step, SamplerConfig(**config), steps, len(confidence)
    )[0].tolist()


def test_left_to_right_rule_by_hand():
    all_masked = [True] * 4
    confident_right = [0.1, 0.95, 0.2, 0.99]
    # static: the frontier only, whatever the confidences
    assert commit(confident_right, all_masked) == [True, False, False, False]
    assert commit(confident_right, [False, True, True, True], step=1) == [False, True, False, False]
    # static with 2 steps per block: the first two masked positions; the last step takes what remains
    assert commit(confident_right, all_masked, steps=2) == [True, True, False, False]
    assert commit(confident_right, [False, False, True, True], step=1, steps=2) == [False, False, True, True]
    # dynamic: the frontier, then the unbroken run of next positions at or above the threshold
    dynamic = {"remasking": "dynamic", "threshold": 0.9}
    assert commit(confident_right, all_masked, **dynamic) == [True, True, False, False]
    assert commit([0.3, 0.9, 0.95, 0.5], all_masked, **dynamic) == [True, True, True, False]
    assert commit([0.3, 0.2, 0.95, 0.99], [False, True, True, True], **dynamic) == [False, True, True, True]
    assert commit([0.3, 0.2, 0.95, 0.99], all_masked, remasking="dynamic", threshold=0.0) == [True] * 4
    assert commit([0.99] * 4, [False] * 4, **dynamic) == [False] * 4  # nothing left to commit
    # the confidence order commits the confident positions right of an unsure frontier instead
    assert commit(confident_right, all_masked, commit_order="confidence", **dynamic) == [False, True, False, True]


def assert_prefix_at_every_step(rollout: Rollout) -> None:
    """Inside every block the commit steps never decrease left to right (never-committed positions last), i.e.
    after each step the committed positions are a prefix of the block."""
    steps = rollout.step_map.masked_fill(rollout.step_map < 0, torch.iinfo(torch.long).max)
    per_block = steps.view(steps.shape[0], -1, rollout.block_size)
    assert (per_block[..., 1:] >= per_block[..., :-1]).all()


@pytest.mark.parametrize(("arch", "shift"), [("llama", False), ("qwen3", True)])  # the rule is the architecture's
def test_left_to_right_decoding(arch, shift):
    """Cached == uncached, committed tokens a prefix of the block at every step, static = one frontier token per
    step (AR order), dynamic several per step at a low threshold, and every state replays the sampler's logits."""
    model, tokenizer = make_student(arch, shift)
    prompts = prompts_for(tokenizer)
    for remasking, threshold in (("static", 0.9), ("dynamic", LOW)):
        settings = {"remasking": remasking, "threshold": threshold, "commit_order": "left_to_right"}
        cached, sampler = run(model, prompts, record=True, use_cache=True, **settings)
        uncached, _ = run(model, prompts, use_cache=False, **settings)
        for name in ("completion_ids", "step_map", "global_step_map", "block_steps"):
            assert torch.equal(getattr(cached, name), getattr(uncached, name)), name
        assert_valid(cached, model)
        assert_prefix_at_every_step(cached)
        assert assert_replay(model, cached, sampler.records) == int(cached.block_steps.sum())
        if remasking == "static":
            per_block = cached.step_map.view(len(prompts), -1, BLOCK)
            assert torch.equal(per_block, torch.arange(BLOCK).expand_as(per_block))
    assert cached.tokens_per_step > 1.0  # dynamic at a low threshold committed several per step
