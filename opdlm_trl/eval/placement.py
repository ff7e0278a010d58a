"""Where and in which precision evaluation runs: the one rule for ``--device`` / ``--dtype`` (``opdlm-eval``)
and ``device=`` / ``dtype=`` (the lm-eval ``opdlm`` model).

``device`` defaults to CUDA when available, else CPU; asking for CUDA where there is none falls back to CPU with a
warning (lm-eval's CLI passes ``device="cuda"`` by default). ``dtype="auto"`` is bfloat16 on a GPU (what models
are trained and served in) and float32 on CPU (where bf16 matmuls can be much slower, docs/evaluation.md).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["DTYPES", "resolve_device", "resolve_dtype"]

DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on; unavailable CUDA falls back to CPU with a warning."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        fallback = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            warnings.warn(f"device={device!r} is not available here; running on {fallback}.", stacklevel=3)
        return torch.device(fallback)
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """``dtype`` as a torch dtype; ``"auto"`` / ``None``: bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = "auto" if dtype in (None, "") else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    chosen = DTYPES[name]
    if chosen is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return chosen
