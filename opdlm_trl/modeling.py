"""ARLM -> diffusion student conversion: mask token, diffusion settings, attention checks, views.

The student is the *unchanged* Hugging Face model: no forked modeling code and no patched forward.
What makes it a diffusion LM is (1) a ``[MASK]`` token it reads at undecided positions and (2) the
block-causal 4D masks of :mod:`opdlm_trl.masks`, passed through the model's own attention interface
by :func:`student_forward`. The teacher view (:func:`teacher_forward`) is the same weights with the
ordinary causal mask and, for a peft student, the adapters disabled: a LoRA conversion needs no
second copy of the model.

The diffusion settings live in ``model.config.opdlm`` so that ``save_pretrained`` and
``from_pretrained`` round-trip them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .masks import block_causal_mask, position_ids_from_mask

__all__ = [
    "CONFIG_KEY",
    "DEFAULT_MASK_TOKEN",
    "SUPPORTED_ATTENTION",
    "DiffusionSettings",
    "adapters_disabled",
    "cache_keyword",
    "decoder_output",
    "diffusion_settings",
    "load_diffusion_model",
    "probe_4d_mask_support",
    "restrict_to_teacher_vocab",
    "save_diffusion_settings",
    "student_forward",
    "suppress_mask_logit",
    "teacher_forward",
    "to_diffusion",
    "trainable_tokens_merged",
    "unwrap_model",
    "whole_models_while_loading",
]

CONFIG_KEY = "opdlm"
SETTINGS_FILE = "opdlm.json"
DEFAULT_MASK_TOKEN = "<|mask|>"
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class DiffusionSettings:
    """What turns an ARLM into this project's diffusion student (stored in ``config.opdlm``)."""

    block_size: int | None
    mask_token_id: int
    shift: bool
    teacher_vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying ``PreTrainedModel`` of a peft / DDP / DeepSpeed wrapper.

    Not accelerate's ``unwrap_model`` (``extract_model_from_parallel``) nor transformers' ``unwrap_model``: those
    strip the parallel wrappers but keep a peft model, and callers here need the base model's ``config``,
    decoder and output head. It also unwraps any ``.module`` holder (a DeepSpeed inference engine of a teacher).
    """
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def diffusion_settings(model: torch.nn.Module) -> DiffusionSettings:
    """Read the diffusion settings of a converted student; a clear error if it was never converted."""
    stored = getattr(unwrap_model(model).config, CONFIG_KEY, None)
    if not stored:
        raise ValueError(
            "This model is not a diffusion student (no `config.opdlm`). Convert it with "
            "`opdlm_trl.to_diffusion(model, tokenizer)` or load one with `opdlm_trl.load_diffusion_model`."
        )
    return DiffusionSettings(**stored)


def _check_attention_backend(model: torch.nn.Module) -> None:
    implementation = getattr(unwrap_model(model).config, "_attn_implementation", None)
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"Attention backend {implementation!r} cannot take the block-causal 4D masks a diffusion student "
            f"needs. Load the model with attn_implementation='sdpa' (recommended) or 'eager', or call "
            f"`model.set_attn_implementation('sdpa')`."
        )


def cache_keyword(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of the model's forward (``cache`` in transformers >= 5.2x)."""
    parameters = inspect.signature(unwrap_model(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@torch.no_grad()
def probe_4d_mask_support(model: torch.nn.Module) -> None:
    """Prove with a 3-token forward that the model honours a custom 4D mask.

    Position 0 is run twice: once allowed to see only itself, once allowed to see all three tokens.
    If the logits agree the model ignored the mask (its attention builds its own), and a diffusion
    student would silently stay causal, so we refuse it.
    """
    base = unwrap_model(model)
    device = next(base.parameters()).device
    dtype = next(base.parameters()).dtype
    vocab = base.config.vocab_size
    input_ids = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab]], device=device)
    attention_mask = torch.ones_like(input_ids)
    position_ids = position_ids_from_mask(attention_mask)
    causal = block_causal_mask(attention_mask, 1, dtype)
    bidirectional = block_causal_mask(attention_mask, None, dtype)
    was_training = base.training
    base.eval()
    try:
        first = base(input_ids=input_ids, attention_mask=causal, position_ids=position_ids).logits[0, 0]
        second = base(input_ids=input_ids, attention_mask=bidirectional, position_ids=position_ids).logits[0, 0]
    finally:
        base.train(was_training)
    if torch.equal(first, second):
        raise ValueError(
            f"{type(base).__name__} ignores custom 4D attention masks (a probe forward gave the same logits "
            "with a causal and a bidirectional mask), so it cannot become a block-causal student. Use an "
            "architecture whose attention accepts 4D masks (Llama, Qwen2/3, Mistral, ...)."
        )


def _grow_embeddings(base: torch.nn.Module, rows: int) -> None:
    """Add embedding rows (a mask token without a free row); new rows = mean of the existing ones."""
    old_rows = base.get_input_embeddings().weight.shape[0]
    base.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        embeddings = base.get_input_embeddings().weight
        embeddings[old_rows:] = embeddings[:old_rows].mean(0, keepdim=True)
        output = base.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != embeddings.data_ptr():
            output.weight[old_rows:] = output.weight[:old_rows].mean(0, keepdim=True)
            if getattr(output, "bias", None) is not None:
                output.bias[old_rows:] = output.bias[:old_rows].mean()


def _resolve_mask_token(model: torch.nn.Module, tokenizer, mask_token: str | int | None) -> int:
    """Mask-token policy: explicit > tokenizer's own > free embedding row > new token (resize).

    A tokenizer saved with a student already holds the added mask token one id past the original
    vocabulary; the original model then gets that row again (this is how LoRA students reload).
    """
    base = unwrap_model(model)
    vocab_size = base.get_input_embeddings().weight.shape[0]
    own_mask = tokenizer.mask_token_id if mask_token is None else None
    saved_mask_row = own_mask is not None and own_mask == vocab_size == len(tokenizer) - 1
    if len(tokenizer) > vocab_size and not saved_mask_row:
        raise ValueError(
            f"Tokenizer has {len(tokenizer)} tokens but the model has only {vocab_size} embedding rows: "
            "they do not belong together. Pass the tokenizer saved with this model."
        )
    if isinstance(mask_token, int):
        if not 0 <= mask_token < vocab_size:
            raise ValueError(f"mask_token id {mask_token} is outside the model vocabulary [0, {vocab_size}).")
        return mask_token
    if own_mask is not None:
        if saved_mask_row:
            _grow_embeddings(base, len(tokenizer))
        return int(own_mask)
    token = mask_token or DEFAULT_MASK_TOKEN
    if token in tokenizer.get_vocab():
        mask_id = int(tokenizer.convert_tokens_to_ids(token))
        tokenizer.mask_token = token
        return mask_id
    tokenizer.add_special_tokens({"mask_token": token})
    mask_id = int(tokenizer.mask_token_id)
    if mask_id >= vocab_size:  # no free row: grow the embedding
        _grow_embeddings(base, len(tokenizer))
    return mask_id


def to_diffusion(
    model: torch.nn.Module,
    tokenizer,
    block_size: int | None = 4,
    mask_token: str | int | None = None,
    shift: bool = True,
    probe: bool = True,
):
    """Configure ``model`` in place as a block-diffusion student; return ``(model, tokenizer)``.

    Args:
        model: a Hugging Face decoder-only causal LM (optionally peft-wrapped) loaded with sdpa or
            eager attention.
        tokenizer: its tokenizer; it receives a mask token when it has none (see the policy in
            ``docs/conversion.md``).
        block_size: tokens per denoising block; ``None`` = one block for the whole completion.
        mask_token: a token string or id to use as ``[MASK]``; default: the tokenizer's own mask
            token, else a free embedding row, else a new token (the embedding grows by one row).
        shift: read token ``i`` from the logit at ``i - 1`` (Dream / Fast-dLLM v2 convention; the
            default, chosen by measurement in ``docs/results.md``). ``False`` is the paper's recipe:
            the logit at ``i`` predicts token ``i`` (see ``docs/conversion.md``).
        probe: run a 3-token forward proving the model honours 4D masks.
    """
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}.")
    _check_attention_backend(model)
    base = unwrap_model(model)
    stored = getattr(base.config, CONFIG_KEY, None)
    teacher_vocab = stored["teacher_vocab_size"] if stored else base.get_input_embeddings().weight.shape[0]
    mask_id = _resolve_mask_token(model, tokenizer, mask_token)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    settings = DiffusionSettings(
        block_size=block_size, mask_token_id=mask_id, shift=bool(shift), teacher_vocab_size=int(teacher_vocab)
    )
    setattr(base.config, CONFIG_KEY, settings.to_dict())
    if probe:
        probe_4d_mask_support(model)
    return model, tokenizer


def save_diffusion_settings(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write ``opdlm.json`` next to a peft adapter, which (unlike a full model) saves no ``config.json``."""
    with open(os.path.join(directory, SETTINGS_FILE), "w") as handle:
        json.dump(diffusion_settings(model).to_dict(), handle, indent=2)


def _load_adapter_student(path: str, tokenizer_path: str | None, base_model_path: str | None, kwargs: dict):
    """Rebuild a LoRA student: original model -> same conversion -> adapter (incl. the mask row)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    settings_path = os.path.join(path, SETTINGS_FILE)
    if not os.path.exists(settings_path):
        raise ValueError(f"{path} holds a peft adapter without {SETTINGS_FILE}: it was not saved by opdlm_trl.")
    with open(settings_path) as handle:
        settings = DiffusionSettings(**json.load(handle))
    base = _load_adapter_base(
        path, base_model_path or PeftConfig.from_pretrained(path).base_model_name_or_path, kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, trust_remote_code=kwargs["trust_remote_code"])
    to_diffusion(base, tokenizer, block_size=settings.block_size, shift=settings.shift, probe=False)
    if diffusion_settings(base) != settings:
        raise ValueError(f"Rebuilt settings {diffusion_settings(base)} differ from the saved {settings}.")
    return PeftModel.from_pretrained(base, path).eval(), tokenizer


def _load_adapter_base(adapter_path: str, base_path: str | None, kwargs: dict):
    """The original model a LoRA student was trained on, or an error naming it and the fix.

    The adapter records its base as a path or hub id. A path that is gone (another machine, a deleted temporary
    folder) would otherwise surface as a hub connection error about a "repo id" that is really a folder name.
    """
    from transformers import AutoModelForCausalLM

    fix = (
        f"Pass base_model_path= (the original model's folder) to load_diffusion_model, or restore that folder; "
        f"the adapter at {adapter_path} cannot be used without the weights it was trained on."
    )
    if not base_path:
        raise ValueError(f"The LoRA student at {adapter_path} names no base model in adapter_config.json. {fix}")
    looks_local = os.path.isabs(base_path) or base_path.startswith((".", "~")) or base_path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(base_path)):
        raise FileNotFoundError(f"The LoRA student's base model {base_path!r} is not a folder on this machine. {fix}")
    try:
        return AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    except OSError as error:
        raise OSError(f"Cannot load the LoRA student's base model {base_path!r} ({error}). {fix}") from error


def load_diffusion_model(
    path_or_id: str, tokenizer_path: str | None = None, base_model_path: str | None = None, **from_pretrained_kwargs
):
    """Load a saved student and its tokenizer with identical behaviour; returns ``(model, tokenizer)``.

    Works for a full student (``config.opdlm`` in its config) and for a LoRA student saved by
    :class:`opdlm_trl.OPDTrainer` (adapter + ``opdlm.json``: the original model named in the adapter config is
    converted the same way and the adapter applied; ``base_model_path`` overrides where that original model is,
    e.g. when the adapter was saved on another machine). Defaults to ``attn_implementation="sdpa"`` and
    ``trust_remote_code=False``; weights load with safetensors. Raises if the checkpoint is not a converted
    student or its tokenizer lost the mask.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from_pretrained_kwargs.setdefault("attn_implementation", "sdpa")
    from_pretrained_kwargs.setdefault("trust_remote_code", False)
    from_pretrained_kwargs.setdefault("use_safetensors", True)
    if os.path.exists(os.path.join(str(path_or_id), "adapter_config.json")):
        return _load_adapter_student(str(path_or_id), tokenizer_path, base_model_path, from_pretrained_kwargs)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_path or path_or_id, trust_remote_code=from_pretrained_kwargs["trust_remote_code"]
    )
    settings = diffusion_settings(model)
    _check_attention_backend(model)
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id != settings.mask_token_id:
        raise ValueError(
            f"Tokenizer mask token id {tokenizer.mask_token_id} differs from the model's "
            f"{settings.mask_token_id}: load the tokenizer saved with this student."
        )
    return model, tokenizer


@contextlib.contextmanager
def whole_models_while_loading(training_args):
    """Inside, ``from_pretrained`` loads models whole in every process, also under DeepSpeed ZeRO-3.

    Under ``accelerate launch`` with a ZeRO-3 config, building the ``TrainingArguments`` (an ``OPDConfig``) registers
    DeepSpeed's config with transformers, and from then on ``from_pretrained`` shards every model while it loads
    (``deepspeed.zero.Init``), whatever ``zero3_init_flag`` says: :func:`to_diffusion` and the teacher vocabulary
    check would then read empty (0-row) embeddings. The trainer shards the student and the teacher when it prepares
    them, so a script loads them whole first (host RAM: one copy per model per process) and the registration is put
    back on the way out. No-op without ZeRO-3.
    """
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    plugin = getattr(training_args, "deepspeed_plugin", None)  # the one TrainingArguments registered
    if not is_deepspeed_zero3_enabled() or getattr(plugin, "dschf", None) is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


def suppress_mask_logit(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The student never predicts ``[MASK]``: give its logit the dtype's minimum (out of place).

    ``finfo.min`` rather than ``-inf`` keeps ``p * log p`` terms finite (``0 * finite = 0``).
    """
    if mask_token_id >= logits.shape[-1]:
        return logits
    fill = torch.finfo(logits.dtype).min
    index = torch.tensor([mask_token_id], device=logits.device)
    return logits.index_fill(-1, index, fill)


def restrict_to_teacher_vocab(logits: torch.Tensor, mask_token_id: int, teacher_vocab_size: int) -> torch.Tensor:
    """The student never predicts ``[MASK]`` nor an id the teacher does not have (an added mask row).

    The sampler draws from these logits and the log-likelihood (:mod:`opdlm_trl.likelihood`) normalises over them,
    so both read the same distribution.
    """
    logits = suppress_mask_logit(logits, mask_token_id)
    if logits.shape[-1] > teacher_vocab_size:
        logits = logits.clone()
        logits[..., teacher_vocab_size:] = torch.finfo(logits.dtype).min
    return logits


def student_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    block_size: int | None = None,
    position_ids: torch.Tensor | None = None,
    cache=None,
    prompt_length: int | None = None,
    **kwargs,
):
    """Block-causal forward of the student over a canvas (or the last blocks of one, with a cache).

    ``attention_mask`` is either the 2D ``(B, K)`` padding mask over every key (cached + new) or an
    already built 4D mask (e.g. :func:`opdlm_trl.masks.training_layout`). ``block_size`` defaults
    to the model's diffusion setting.
    """
    if attention_mask.dim() == 2:
        if block_size is None:
            block_size = diffusion_settings(model).block_size
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        dtype = next(unwrap_model(model).parameters()).dtype
        attention_mask = block_causal_mask(
            attention_mask, block_size, dtype, query_length=input_ids.shape[1], prompt_length=prompt_length
        )
    if cache is not None:
        kwargs[cache_keyword(model)] = cache
        kwargs.setdefault("use_cache", True)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


class _Captured:
    hidden: torch.Tensor | None = None


@contextlib.contextmanager
def decoder_output(model: torch.nn.Module):
    """Capture the final hidden states (``last_hidden_state``) of ``model``'s decoder during a forward inside.

    The trainer calls the *wrapped* model (DDP / DeepSpeed / peft) so that gradient synchronisation is armed as usual,
    asks it for no logits, and reads the decoder's output here: the output heads are applied later in chunks
    (:mod:`opdlm_trl.heads`). A forward hook on ``get_decoder()`` works for every ``*ForCausalLM`` of transformers.
    """
    captured = _Captured()

    def hook(module, args, output):
        captured.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = unwrap_model(model).get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run the base weights of a peft model (no-op for a plain model)."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def _unmerged_trainable_token_layers(model: torch.nn.Module) -> list:
    """peft ``TrainableTokensLayer`` s of ``model`` that an exact merge applies to: active and not merged. DeepSpeed
    ZeRO-3 parameters (``ds_id``) are left alone: outside a gather they hold no weight, and peft's merge replaces a
    parameter's ``.data``, which this project has not run against ZeRO-3's gather and release."""
    try:
        from peft.tuners.trainable_tokens import TrainableTokensLayer
    except ImportError:  # peft is optional
        return []
    return [
        layer
        for layer in model.modules()
        if isinstance(layer, TrainableTokensLayer)
        and not layer.merged
        and not layer.disable_adapters
        and not hasattr(layer.get_base_layer().weight, "ds_id")
    ]


@contextlib.contextmanager
def trainable_tokens_merged(model: torch.nn.Module):
    """Write peft's trainable token rows (a LoRA student's mask row) into the frozen embedding for a no-grad decode.

    Unmerged, peft's ``TrainableTokensLayer`` builds the whole ``(V, H)`` matrix with the rows replaced on every
    forward, for the embedding and again for a tied ``lm_head``: two full copies per decoding step. Merged, the rows
    are written once per decode (SmolLM2-shaped student on CPU: LoRA decoding at 2.3x a plain student's time before,
    1.4x after; ``benchmarks/lora_decode.py``). Exact: the merged weight is the matrix peft would build, and unmerging
    writes the saved original rows back, so the frozen base (the shared-weights teacher) is bitwise unchanged. LoRA
    layers stay unmerged: their merge adds and later subtracts a low-rank product, which is not exact in bf16.
    Only for forwards without gradients: a merged row gets no gradient.
    """
    merged = []
    try:
        for layer in _unmerged_trainable_token_layers(model):
            layer.merge()
            merged.append(layer)  # only what did merge is unmerged, even if a later merge raises
        yield model
    finally:
        for layer in reversed(merged):
            if layer.merged:
                layer.unmerge()


def teacher_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
):
    """The original causal ARLM computed from a student (adapters off, ordinary causal mask).

    Position ids count real tokens (as ``generate`` does for left padding), so the result equals
    the unconverted model's forward on the same batch.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    with adapters_disabled(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
