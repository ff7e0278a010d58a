"""Properties of the ARLM -> diffusion conversion on tiny random models (no hub).

Every attention property is checked for each architecture (llama, qwen2, qwen3, mistral) and each
supported backend (sdpa, eager), because each family builds and applies its attention mask in its own
modeling code: a pattern that holds for one is no evidence for another.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from opdlm_trl import diffusion_settings, load_diffusion_model, to_diffusion
from opdlm_trl.masks import gather_predictions, left_pad_to_block, position_ids_from_mask, training_layout
from opdlm_trl.modeling import (
    DEFAULT_MASK_TOKEN,
    SUPPORTED_ATTENTION,
    student_forward,
    teacher_forward,
    whole_models_while_loading,
)
from opdlm_trl.tiny import ARCHITECTURES, save_tiny_pair

EXACT = 1e-6  # "unchanged": identical up to float32 reassociation of the same numbers
CLOSE = 1e-5  # two different forwards (different widths / layouts) of the same computation
CHANGED = 1e-3  # a real dependence moves random-init logits by ~1e-1; this is far above rounding noise

ARCH_ATTN = pytest.mark.parametrize("attn", SUPPORTED_ATTENTION)
ALL_ARCHS = pytest.mark.parametrize("arch", ARCHITECTURES)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def logits_of(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    return student_forward(model, input_ids, attention_mask, **kwargs).logits


# --------------------------------------------------------------------------------------------------
# block-causal attention
# --------------------------------------------------------------------------------------------------


@ALL_ARCHS
@ARCH_ATTN
def test_block_causal_invariance(make_student, random_ids, arch, attn):
    """Later blocks never influence earlier ones; inside a block every token sees every other one."""
    model, _ = make_student(arch, attn, block_size=4)
    base = random_ids(1, 12, seed=1)[0]
    later = base.clone()
    later[9] = (base[9] + 1) % 300  # a token of block 2
    same = base.clone()
    same[5] = (base[5] + 1) % 300  # a token of block 1
    logits = logits_of(model, torch.stack([base, later, same]), torch.ones(3, 12, dtype=torch.long))

    assert max_diff(logits[1, :8], logits[0, :8]) <= EXACT  # blocks 0-1 blind to block 2
    assert max_diff(logits[1, 8:], logits[0, 8:]) > CHANGED  # ... which itself does react
    assert max_diff(logits[2, :4], logits[0, :4]) <= EXACT  # block 0 blind to block 1
    for position in (4, 6, 7):  # position 4 comes BEFORE the edit: bidirectional inside the block
        assert max_diff(logits[2, position], logits[0, position]) > CHANGED, f"position {position}"


@ALL_ARCHS
@ARCH_ATTN
def test_padding_invariance(make_student, random_ids, tokenizer, arch, attn):
    """Padded batches give the unpadded sequence's logits on every real token.

    Block boundaries are counted from canvas position 0, so left padding is only neutral when it is a
    whole number of blocks: that is how the sampler pads (prompts end on a block boundary). Padding by
    a non-multiple moves real tokens into other blocks and legitimately changes their logits; the last
    assertion checks that this is indeed the case (so the test really exercises canvas-based blocks).
    """
    model, _ = make_student(arch, attn, block_size=4)
    pad = tokenizer.pad_token_id
    long_row, short_row = random_ids(1, 10, seed=2)[0], random_ids(1, 6, seed=3)[0]
    alone_long = logits_of(model, long_row[None], torch.ones(1, 10, dtype=torch.long))[0]
    alone_short = logits_of(model, short_row[None], torch.ones(1, 6, dtype=torch.long))[0]
    pads = torch.full((4,), pad)
    ones, zeros = torch.ones(6, dtype=torch.long), torch.zeros(4, dtype=torch.long)

    right = logits_of(
        model,
        torch.stack([long_row, torch.cat([short_row, pads])]),
        torch.stack([torch.ones(10, dtype=torch.long), torch.cat([ones, zeros])]),
    )
    assert max_diff(right[0], alone_long) <= CLOSE
    assert max_diff(right[1, :6], alone_short) <= CLOSE

    left = logits_of(
        model,
        torch.stack([long_row, torch.cat([pads, short_row])]),  # 4 pads = exactly one block
        torch.stack([torch.ones(10, dtype=torch.long), torch.cat([zeros, ones])]),
    )
    assert max_diff(left[0], alone_long) <= CLOSE
    assert max_diff(left[1, 4:], alone_short) <= CLOSE

    off_block = logits_of(model, torch.cat([pads[:1], short_row])[None], torch.cat([zeros[:1], ones])[None])
    assert max_diff(off_block[0, 1:], alone_short) > CHANGED


# --------------------------------------------------------------------------------------------------
# the [prompt | x0 | x_t] training layout against plain block-causal forwards
# --------------------------------------------------------------------------------------------------


def _layout_batch(tokenizer, random_ids, block_size: int | None, mask_id: int):
    """Two left-padded prompts (5 and 3 tokens), 8-token completions (the second ends after 6)."""
    prompts = [random_ids(1, 5, seed=4)[0].tolist(), random_ids(1, 3, seed=5)[0].tolist()]
    prompt_ids, prompt_mask = left_pad_to_block(prompts, block_size, tokenizer.pad_token_id)
    clean = random_ids(2, 8, seed=6)
    completion_mask = torch.ones(2, 8, dtype=torch.long)
    completion_mask[1, 6:] = 0
    clean[1, 6:] = tokenizer.pad_token_id
    masked = torch.zeros(2, 8, dtype=torch.bool)
    masked[0, [1, 2, 4, 7]] = True  # every block keeps a mix of masked and decided tokens
    masked[1, [0, 3, 5]] = True
    noisy = clean.masked_fill(masked, mask_id)
    return prompt_ids, prompt_mask, clean, noisy, completion_mask


@ALL_ARCHS
@ARCH_ATTN
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("block_size", [4, None])
def test_training_layout_matches_plain_forward(make_student, random_ids, arch, attn, shift, block_size):
    """Noisy block b of the layout sees exactly what a plain forward over prompt + x0[<b] + x_t[b] sees.

    With ``shift`` the layout reads block b's first token from its clean predecessor
    (``layout.source_index``); the plain forward reads it from the position before (``gather_predictions``).
    ``block_size=None``: the prompt is one block and the completion one bidirectional block.
    """
    model, tokenizer = make_student(arch, attn, block_size=block_size, shift=shift)
    settings = diffusion_settings(model)
    prompt_ids, prompt_mask, clean, noisy, completion_mask = _layout_batch(
        tokenizer, random_ids, block_size, settings.mask_token_id
    )
    prompt_len, completion_len = prompt_ids.shape[1], clean.shape[1]
    layout = training_layout(prompt_ids, prompt_mask, clean, noisy, completion_mask, block_size, shift)
    layout_logits = logits_of(model, layout.input_ids, layout.attention_mask, position_ids=layout.position_ids)

    width = block_size or completion_len
    worst = 0.0
    for start in range(0, completion_len, width):
        block = torch.arange(start, start + width)
        plain_ids = torch.cat([prompt_ids, clean[:, :start], noisy[:, block]], dim=1)
        plain_mask = torch.cat([prompt_mask, completion_mask[:, : start + width]], dim=1)
        plain = logits_of(model, plain_ids, plain_mask, prompt_length=prompt_len)
        expected = gather_predictions(plain, prompt_len + block, shift)
        got = layout_logits[:, layout.source_index[block]]
        real = completion_mask[:, block].bool()
        worst = max(worst, max_diff(got[real], expected[real]))
    assert worst <= CLOSE


# --------------------------------------------------------------------------------------------------
# teacher view and the shifted student at step 0
# --------------------------------------------------------------------------------------------------


def _left_padded_batch(tokenizer, random_ids):
    rows = [random_ids(1, 11, seed=7)[0].tolist(), random_ids(1, 6, seed=8)[0].tolist()]
    return left_pad_to_block(rows, 4, tokenizer.pad_token_id)


def with_random_lora(model):
    """LoRA on q/v with random (not zero) B matrices, so the adapted student differs from the base."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))


@ALL_ARCHS
@ARCH_ATTN
@pytest.mark.parametrize("lora", [None, "after", "before"])
def test_teacher_view_is_the_unconverted_model(make_model, tokenizer, random_ids, arch, attn, lora):
    """teacher_forward reproduces the original ARLM bit for bit, LoRA adapters or not.

    ``lora="after"`` wraps the converted student with peft; ``"before"`` converts a peft model. The
    adapters are initialised randomly (``init_lora_weights=False``) so the student really differs.
    """
    model = make_model(arch, attn)
    input_ids, attention_mask = _left_padded_batch(tokenizer, random_ids)
    position_ids = position_ids_from_mask(attention_mask)
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

    if lora == "before":
        model = with_random_lora(model)
    model, _ = to_diffusion(model, tokenizer, block_size=4)
    if lora == "after":
        model = with_random_lora(model)
    vocab = diffusion_settings(model).teacher_vocab_size

    with torch.no_grad():
        teacher = teacher_forward(model, input_ids, attention_mask).logits
        causal_student = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    assert torch.equal(teacher[..., :vocab], reference)
    if lora is not None:
        assert max_diff(causal_student[..., :vocab], reference) > CHANGED  # the adapter is active outside


def _first_block_sources(prompt_len: int, completion_len: int, block_size: int) -> torch.Tensor:
    """Canvas positions whose logit predicts the first token of each completion block (shift=True)."""
    firsts = torch.arange(prompt_len, prompt_len + completion_len, block_size)
    return firsts - 1


@ALL_ARCHS
@ARCH_ATTN
def test_shifted_one_layer_student_is_the_teacher_at_block_starts(make_student, tokenizer, random_ids, arch, attn):
    """Shift + no training: the first token of each block is predicted by the teacher's own logit.

    That logit sits at the end of the previous block, which under block-causal attention sees exactly
    the causal prefix. With ONE layer the keys it reads are the teacher's, so the equality is exact.
    (With more layers the earlier tokens' hidden states were computed bidirectionally inside their
    blocks and the equality is only approximate: see the next test.)
    """
    model, _ = make_student(arch, attn, block_size=4, shift=True, num_layers=1)
    input_ids, attention_mask = _left_padded_batch(tokenizer, random_ids)
    vocab = diffusion_settings(model).teacher_vocab_size
    sources = _first_block_sources(prompt_len=4, completion_len=8, block_size=4)  # canvas: 4 prompt + 8
    student = logits_of(model, input_ids, attention_mask)[:, sources, :vocab]
    with torch.no_grad():
        teacher = teacher_forward(model, input_ids, attention_mask).logits[:, sources, :vocab]
    real = attention_mask[:, sources].bool()
    assert torch.equal(student[real], teacher[real])


@ALL_ARCHS
@ARCH_ATTN
def test_shifted_block_size_one_student_is_the_teacher_everywhere(make_student, tokenizer, random_ids, arch, attn):
    """With block_size=1 block-causal is causal: the untrained shifted student IS the ARLM, bit for bit."""
    model, _ = make_student(arch, attn, block_size=1, shift=True)
    input_ids, attention_mask = _left_padded_batch(tokenizer, random_ids)
    vocab = diffusion_settings(model).teacher_vocab_size
    student = logits_of(model, input_ids, attention_mask)
    with torch.no_grad():
        teacher = teacher_forward(model, input_ids, attention_mask).logits
    real = attention_mask.bool()
    assert torch.equal(student[real][..., :vocab], teacher[real][..., :vocab])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shifted_multi_layer_student_is_only_close_to_the_teacher(make_student, tokenizer, random_ids, arch):
    """Documents the limit of the step-0 argument (docs/conversion.md, "shift"): with 2 layers and
    block 4 the block-start predictions differ from the teacher's, because layer-1 keys of earlier
    tokens already mixed their block bidirectionally. Measured: max |delta logit| 0.12 (llama) and
    0.22 (qwen3) on these random models."""
    model, _ = make_student(arch, block_size=4, shift=True, num_layers=2)
    input_ids, attention_mask = _left_padded_batch(tokenizer, random_ids)
    vocab = diffusion_settings(model).teacher_vocab_size
    sources = _first_block_sources(prompt_len=4, completion_len=8, block_size=4)
    student = logits_of(model, input_ids, attention_mask)[:, sources, :vocab]
    with torch.no_grad():
        teacher = teacher_forward(model, input_ids, attention_mask).logits[:, sources, :vocab]
    real = attention_mask[:, sources].bool()
    assert max_diff(student[real], teacher[real]) > CHANGED


# --------------------------------------------------------------------------------------------------
# mask-token policy and save -> load
# --------------------------------------------------------------------------------------------------


def _convert_with_policy(make_model, tokenizer, arch: str, policy: str):
    """Convert under one mask-token policy; return (model, tokenizer, expected mask id, rows before)."""
    model = make_model(arch)
    rows_before = model.get_input_embeddings().weight.shape[0]
    tokens_before = len(tokenizer)
    if policy == "own":
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(300)  # an existing ordinary token
        expected_id = 300
    else:
        expected_id = tokens_before  # the first id after the tokenizer: a free row or a new row
    embeddings_before = model.get_input_embeddings().weight.detach().clone()
    model, tokenizer = to_diffusion(model, tokenizer, block_size=2, shift=True)
    return model, tokenizer, expected_id, rows_before, embeddings_before


@pytest.mark.parametrize(
    ("arch", "policy"),
    [
        ("llama", "added"),
        ("mistral", "added"),
        ("qwen2", "free"),
        ("qwen3", "free"),
        ("llama", "own"),
        ("qwen3", "own"),
    ],
)
def test_mask_token_policy_and_save_load_round_trip(make_model, tokenizer, random_ids, tmp_path, arch, policy):
    model, tokenizer, expected_id, rows_before, embeddings_before = _convert_with_policy(
        make_model, tokenizer, arch, policy
    )
    settings = diffusion_settings(model)
    embeddings = model.get_input_embeddings().weight.detach()
    assert settings.mask_token_id == expected_id == tokenizer.mask_token_id
    assert settings.teacher_vocab_size == rows_before
    if policy == "added":  # no free row: one new row, initialised to the mean of the others
        assert embeddings.shape[0] == rows_before + 1 == len(tokenizer)
        assert tokenizer.mask_token == DEFAULT_MASK_TOKEN
        assert max_diff(embeddings[-1], embeddings_before.mean(0)) <= EXACT
        output = model.get_output_embeddings().weight.detach()
        assert max_diff(output[-1], output[:-1].mean(0)) <= EXACT
        assert torch.equal(embeddings[:-1], embeddings_before)
    else:  # free row or the tokenizer's own token: weights and vocabulary untouched
        assert torch.equal(embeddings, embeddings_before)

    input_ids = torch.cat([random_ids(1, 4, seed=9), torch.full((1, 4), settings.mask_token_id)], dim=1)
    attention_mask = torch.ones_like(input_ids)
    before = logits_of(model, input_ids, attention_mask)

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_diffusion_model(str(tmp_path))
    assert diffusion_settings(loaded) == settings
    assert loaded_tokenizer.mask_token == tokenizer.mask_token
    assert loaded_tokenizer.mask_token_id == settings.mask_token_id
    assert len(loaded_tokenizer) == len(tokenizer)
    assert torch.equal(logits_of(loaded.eval(), input_ids, attention_mask), before)


# --------------------------------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------------------------------


def test_flash_attention_is_refused(make_model, tokenizer):
    model = make_model("qwen3")
    model.config._attn_implementation = "flash_attention_2"  # no flash-attn install needed
    with pytest.raises(ValueError, match=r"'flash_attention_2' cannot take the block-causal 4D masks.*sdpa"):
        to_diffusion(model, tokenizer)


def test_tokenizer_longer_than_embedding_is_refused(make_model, tokenizer):
    model = make_model("llama", vocab_size=300)
    with pytest.raises(ValueError, match="Tokenizer has 320 tokens but the model has only 300 embedding rows"):
        to_diffusion(model, tokenizer)


def test_model_that_ignores_4d_masks_is_refused_by_the_probe(make_model, tokenizer):
    """A model whose forward drops the given mask (and so stays causal) is caught by behaviour.

    The class is deliberately named like a supported one: detection must come from the probe forward.
    """
    from transformers import LlamaForCausalLM

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return LlamaForCausalLM.forward(self, input_ids=input_ids, attention_mask=None, **kwargs)

    impostor_class = type("LlamaForCausalLM", (LlamaForCausalLM,), {"forward": forward})
    original = make_model("llama")
    impostor = impostor_class(original.config)
    impostor.load_state_dict(original.state_dict())
    impostor.eval()
    with pytest.raises(ValueError, match="ignores custom 4D attention masks"):
        to_diffusion(impostor, tokenizer)


def test_unconverted_model_has_no_diffusion_settings(make_model, tmp_path):
    with pytest.raises(ValueError, match=r"not a diffusion student.*to_diffusion"):
        diffusion_settings(make_model("qwen2"))
    save_tiny_pair(tmp_path, "llama")
    with pytest.raises(ValueError, match="not a diffusion student"):
        load_diffusion_model(str(tmp_path))


@pytest.mark.parametrize("block_size", [0, -4, 2.5, True, "4"])
def test_invalid_block_size_is_refused(make_model, tokenizer, block_size):
    with pytest.raises(ValueError, match="block_size must be a positive integer or None"):
        to_diffusion(make_model("llama"), tokenizer, block_size=block_size)


def test_mask_token_id_outside_vocabulary_is_refused(make_model, tokenizer):
    with pytest.raises(ValueError, match=r"mask_token id 999 is outside the model vocabulary \[0, 328\)"):
        to_diffusion(make_model("qwen2"), tokenizer, mask_token=999)


def test_lora_student_round_trip_through_adapter_dir(tmp_path):
    """A LoRA student saved as adapter + opdlm.json reloads on top of the original model, mask row included."""
    from peft import LoraConfig, get_peft_model

    from opdlm_trl.modeling import load_diffusion_model, save_diffusion_settings, student_forward, to_diffusion
    from opdlm_trl.tiny import tiny_model, tiny_tokenizer

    original_dir = tmp_path / "original"
    tiny_model("llama").save_pretrained(original_dir)
    student, tokenizer = to_diffusion(tiny_model("llama"), tiny_tokenizer(), block_size=4, shift=True)
    mask_id = tokenizer.mask_token_id
    assert mask_id == student.config.vocab_size - 1  # llama tiny: no free row, so the embedding grew
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"], init_lora_weights=False, trainable_token_indices=[mask_id]
    )
    peft_student = get_peft_model(student, config)
    with torch.no_grad():  # a "trained" mask row
        for name, parameter in peft_student.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.add_(0.5)
    peft_student.peft_config["default"].base_model_name_or_path = str(original_dir)
    adapter_dir = tmp_path / "adapter"
    peft_student.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    save_diffusion_settings(peft_student, adapter_dir)

    loaded, loaded_tokenizer = load_diffusion_model(str(adapter_dir))
    assert loaded_tokenizer.mask_token_id == mask_id
    ids = torch.tensor([[5, 6, 7, 8, mask_id, mask_id, 9, mask_id]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = student_forward(peft_student.eval(), ids, mask).logits
        got = student_forward(loaded, ids, mask).logits
    assert torch.allclose(expected, got, atol=1e-6)

    # The base folder moves (another machine, a deleted temporary folder): a clear error naming the folder and
    # the fix, not a hub connection error; base_model_path= points at the new place and reloads the same student.
    moved_dir = tmp_path / "moved"
    original_dir.rename(moved_dir)
    with pytest.raises(FileNotFoundError, match=rf"{original_dir}'? is not a folder.*Pass base_model_path="):
        load_diffusion_model(str(adapter_dir))
    moved, _ = load_diffusion_model(str(adapter_dir), base_model_path=str(moved_dir))
    with torch.no_grad():
        assert torch.allclose(expected, student_forward(moved, ids, mask).logits, atol=1e-6)


def test_adapter_dir_without_settings_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    from opdlm_trl.modeling import load_diffusion_model
    from opdlm_trl.tiny import tiny_model

    model_dir = tmp_path / "original"
    tiny_model("llama").save_pretrained(model_dir)
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="opdlm.json"):
        load_diffusion_model(str(tmp_path / "adapter"))


def test_published_qwen3_shapes_have_their_published_parameter_counts():
    """``opdlm_trl.tiny.qwen3_config`` + ``parameter_count`` (meta device): the model cards' sizes, tied embeddings
    counted once (the 8B is the one Qwen3 with an untied head)."""
    from opdlm_trl.tiny import QWEN3_ARCHITECTURES, parameter_count, qwen3_config

    counts = {name: parameter_count(qwen3_config(name)) for name in QWEN3_ARCHITECTURES}
    assert counts == {
        "Qwen/Qwen3-0.6B": 596_049_920,
        "Qwen/Qwen3-1.7B": 1_720_574_976,
        "Qwen/Qwen3-4B": 4_022_468_096,
        "Qwen/Qwen3-8B": 8_190_735_360,
    }
    assert parameter_count(qwen3_config("Qwen/Qwen3-0.6B", num_hidden_layers=2)) < counts["Qwen/Qwen3-0.6B"]
    with pytest.raises(ValueError, match="choose from"):
        qwen3_config("Qwen/Qwen3-0.5B")


# --------------------------------------------------------------------------------------------------
# loading under DeepSpeed ZeRO-3
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def zero3_registered():
    """DeepSpeed ZeRO-3 registered with transformers, as building TrainingArguments under ``accelerate launch`` with
    a ZeRO-3 config does; yields such arguments and removes the registration afterwards (no other test sees it)."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        yield SimpleNamespace(deepspeed_plugin=SimpleNamespace(dschf=config))
    finally:
        unset_hf_deepspeed_config()


def test_models_load_whole_under_zero3_and_the_registration_comes_back(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    path = save_tiny_pair(tmp_path / "tiny")  # before ZeRO-3 is registered: it would shard even a new model
    with zero3_registered() as training_args:
        assert is_deepspeed_zero3_enabled()
        with whole_models_while_loading(training_args):
            assert not is_deepspeed_zero3_enabled()
            model = AutoModelForCausalLM.from_pretrained(path)  # under ZeRO-3: 0-row embeddings, or no process group
        assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size > 0
        assert is_deepspeed_zero3_enabled()  # the trainer shards the models when it prepares them
        with pytest.raises(RuntimeError), whole_models_while_loading(training_args):
            raise RuntimeError("a failed load")
        assert is_deepspeed_zero3_enabled()


def test_whole_models_while_loading_is_a_no_op_without_zero3():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    with whole_models_while_loading(SimpleNamespace(deepspeed_plugin=None)):
        assert not is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()
