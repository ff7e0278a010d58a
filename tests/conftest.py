"""Shared fixtures: a local tiny tokenizer and tiny random models per architecture and attention backend.

Everything is built locally (``opdlm_trl.tiny``), never from the hub. Models are cheap (a few tens of
milliseconds) but each distinct configuration is built once per session and handed out as a deep copy,
so a test may convert, resize or peft-wrap what it receives without affecting any other test.

Fixture and constant names other test modules rely on:

* ``ARCHS`` / ``ATTNS``: the architectures (llama, qwen2, qwen3, mistral) and the attention backends
  (sdpa, eager) a diffusion student supports; use them in ``pytest.mark.parametrize``.
* ``arch`` / ``attn``: the same as parametrised fixtures (a test that asks for ``arch`` runs once per
  architecture).
* ``tokenizer``: a fresh tiny tokenizer per test (conversion adds a mask token to it in place).
* ``make_model(arch, attn="sdpa", **kw)``: a fresh unconverted tiny causal LM (eval mode, float32);
  ``kw`` goes to :func:`opdlm_trl.tiny.tiny_model` (``seed``, ``free_rows``, ``vocab_size``, ...).
* ``make_student(arch, attn="sdpa", block_size=4, shift=False, **kw)``: ``(model, tokenizer)``
  converted by :func:`opdlm_trl.to_diffusion` with a fresh tokenizer.
* ``random_ids(batch, length, seed=0)``: token ids drawn from the tokenizer's ordinary (non-special)
  tokens, so no test accidentally feeds a pad / EOS / mask id as content.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from opdlm_trl.modeling import SUPPORTED_ATTENTION, to_diffusion
from opdlm_trl.tiny import ARCHITECTURES, tiny_model, tiny_tokenizer

ARCHS = ARCHITECTURES
ATTNS = SUPPORTED_ATTENTION

_MODEL_CACHE: dict[tuple, torch.nn.Module] = {}


def _model_key(arch: str, attn: str, kwargs: dict) -> tuple:
    return (arch, attn, tuple(sorted((name, repr(value)) for name, value in kwargs.items())))


def build_model(arch: str, attn: str = "sdpa", **kwargs) -> torch.nn.Module:
    """A fresh copy of the session's tiny model for this configuration (built once, copied after)."""
    key = _model_key(arch, attn, kwargs)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = tiny_model(arch, attn_implementation=attn, **kwargs)
    return copy.deepcopy(_MODEL_CACHE[key])


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(params=ATTNS)
def attn(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def _tokenizer_ready() -> None:
    """Train the tiny tokenizer once per session (the first call takes a few seconds)."""
    tiny_tokenizer()


@pytest.fixture
def tokenizer(_tokenizer_ready):
    """A fresh tiny tokenizer (loading the session's trained copy takes milliseconds)."""
    return tiny_tokenizer()


@pytest.fixture
def make_model(_tokenizer_ready) -> Callable[..., torch.nn.Module]:
    """Factory: ``make_model(arch, attn="sdpa", **tiny_model_kwargs)`` -> fresh unconverted tiny LM."""
    return build_model


@pytest.fixture
def make_student(_tokenizer_ready) -> Callable[..., tuple]:
    """Factory: ``make_student(arch, attn="sdpa", block_size=4, shift=False, mask_token=None, **kw)``.

    Returns ``(model, tokenizer)`` after :func:`opdlm_trl.to_diffusion` (probe included).
    """

    def factory(arch: str, attn: str = "sdpa", block_size: int | None = 4, shift: bool = False, mask_token=None, **kw):
        model = build_model(arch, attn, **kw)
        return to_diffusion(model, tiny_tokenizer(), block_size=block_size, mask_token=mask_token, shift=shift)

    return factory


@pytest.fixture
def random_ids(_tokenizer_ready) -> Callable[..., torch.Tensor]:
    """Factory: ``random_ids(batch, length, seed=0)`` -> ``(batch, length)`` ids of ordinary tokens."""
    reference = tiny_tokenizer()
    special = set(reference.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(reference)) if i not in special])

    def factory(batch: int, length: int, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return ordinary[torch.randint(len(ordinary), (batch, length), generator=generator)]

    return factory
