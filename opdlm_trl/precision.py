"""Training precision: float32 master weights for full fine-tunes, and whether bf16 autocast pays on this CPU.

Two rules that decide whether a run learns, and how fast, live here and nowhere else:

* **Master weights.** AdamW applied to bf16 parameters rounds most small updates away: one step at lr 1e-5 on
  N(0, 0.02) weights changes ~16% of bf16 elements (100% in float32), a few percent at a 1e-6 schedule floor. A full
  fine-tune therefore needs float32 trainable parameters (load float32 and train with ``bf16=True``, i.e. accelerate's
  autocast) or DeepSpeed bf16, whose optimizer keeps float32 master copies of bf16 weights. LoRA adapters are
  float32 already (peft casts adapter weights up by default), whatever the dtype of the frozen base.
* **bf16 on a CPU.** bf16 autocast is ~2x faster on a CPU with bf16 instructions (x86 ``avx512_bf16`` or AMX,
  aarch64 ``bf16``) and was measured 10x slower on one without (an AMD EPYC lacking ``avx512_bf16``: 178 s vs 17 s
  per OPD step), where every bf16 matmul is emulated.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "BF16_CPU_FLAGS",
    "CpuBf16Support",
    "bf16_is_fast_here",
    "check_master_weights",
    "cpu_bf16_support",
    "warn_if_cpu_bf16_is_slow",
]

# The /proc/cpuinfo flags of CPU instructions that compute bf16 dot products natively: x86 AVX512-BF16 and AMX-BF16
# (Linux lists them under "flags"), aarch64 BF16 (under "Features").
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class CpuBf16Support:
    """Whether this CPU has bf16 instructions, and the evidence: ``flags`` found, ``source`` of the answer."""

    fast: bool
    flags: tuple[str, ...]
    source: str

    def describe(self) -> str:
        found = ", ".join(self.flags) if self.flags else f"none of {', '.join(BF16_CPU_FLAGS)}"
        return f"{platform.processor() or platform.machine()}: bf16 instructions {found} ({self.source})"


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The feature flags of the first CPU in ``path`` (Linux), or None where there is no such file."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def _torch_cpu_probe() -> tuple[str, ...] | None:
    """torch's own cpuinfo probe (private in torch 2.x, hence optional): the bf16 features it reports, or None."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    found = []
    for flag, name in probes.items():
        probe = getattr(torch.cpu, name, None)
        if probe is None:
            return None
        try:
            if probe():
                found.append(flag)
        except RuntimeError:
            return None
    return tuple(found)


def cpu_bf16_support(cpuinfo_path: str = "/proc/cpuinfo") -> CpuBf16Support:
    """Does this CPU compute bf16 natively? ``/proc/cpuinfo`` flags where the file exists (any architecture), else
    torch's cpuinfo probe (x86 only), else unknown -- reported as *fast* so that no run is warned on a guess.

    ``torch.backends.cpu.get_cpu_capability()`` is not used: it answers "AVX512" with and without ``avx512_bf16``.
    """
    flags = _cpuinfo_flags(cpuinfo_path)
    if flags is not None:
        found = tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)
        return CpuBf16Support(bool(found), found, cpuinfo_path)
    probed = _torch_cpu_probe()
    if probed is not None and platform.machine().lower() in ("x86_64", "amd64"):
        return CpuBf16Support(bool(probed), probed, "torch.cpu")
    return CpuBf16Support(True, (), "unknown: no /proc/cpuinfo and no torch probe for this CPU")


def bf16_is_fast_here(use_cpu: bool = False) -> bool:
    """Should a run on this machine train with bf16 autocast? On CUDA when the GPU supports bf16; on a CPU-only run
    when the CPU has bf16 instructions. Scripts (experiments/levers/levers.sh via ``python -m opdlm_trl.precision``)
    pick their precision with it."""
    if not use_cpu and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_support().fast


def warn_if_cpu_bf16_is_slow(args) -> bool:
    """Warn when ``args`` (TrainingArguments) asks for bf16 autocast on a CPU-only run and the CPU has no bf16
    instructions; returns whether it warned. A warning, not an error: the run is correct, only slow, and a user may
    mean it (e.g. to reproduce bf16 numbers)."""
    on_cpu = bool(getattr(args, "use_cpu", False)) or not torch.cuda.is_available()
    if not (getattr(args, "bf16", False) and on_cpu):
        return False
    support = cpu_bf16_support()
    if support.fast:
        return False
    warnings.warn(
        f"bf16=True on a CPU without bf16 instructions ({support.describe()}): bf16 autocast is emulated there and "
        "was measured 10x slower than float32 for an OPD step (avx512_bf16 missing on an AMD EPYC). Set bf16: false "
        "on this machine, or run on a CPU with avx512_bf16 / amx_bf16 (x86) or bf16 (aarch64).",
        stacklevel=2,
    )
    return True


def _deepspeed_keeps_fp32_master(args, deepspeed_plugin) -> bool:
    """DeepSpeed with bf16/fp16 enabled: its optimizer updates float32 master copies of the low-precision weights
    (ZeRO 1-3 partitions and the BF16 optimizer of stage 0 alike). transformers fills the DeepSpeed config's
    ``"auto"`` precision from ``args.bf16`` / ``args.fp16``; an explicit ``enabled: true`` counts too."""
    if deepspeed_plugin is None:
        return False
    if getattr(args, "bf16", False) or getattr(args, "fp16", False):
        return True
    config = getattr(deepspeed_plugin, "deepspeed_config", None) or {}
    return any((config.get(key) or {}).get("enabled") is True for key in ("bf16", "fp16"))


def check_master_weights(parameters: Iterable[tuple[str, torch.nn.Parameter]], args, deepspeed_plugin=None) -> None:
    """Refuse a trainer whose optimizer would update bf16/fp16 parameters in place, naming the fixes.

    An error rather than a warning: the failure is silent (the loss falls a little, most updates round away), costs a
    whole run, and each fix is one line. ``args.allow_bf16_master_weights`` opts in by name. ``deepspeed_plugin``:
    the accelerator's, when the run is under DeepSpeed.
    """
    low = [(name, p.dtype) for name, p in parameters if p.requires_grad and p.dtype in _LOW_PRECISION]
    if (
        not low
        or getattr(args, "allow_bf16_master_weights", False)
        or _deepspeed_keeps_fp32_master(args, deepspeed_plugin)
    ):
        return
    name, dtype = low[0]
    raise ValueError(
        f"{len(low)} trainable parameters are {str(dtype).removeprefix('torch.')} (first: {name}): AdamW would update "
        "them in place and round most updates away (a full fine-tune that barely learns). Load the model in float32 "
        "and train with bf16 autocast (`dtype: float32` + `bf16: true`), or use DeepSpeed with bf16 (float32 master "
        "weights in its optimizer), or LoRA (float32 adapters); to train low-precision weights on purpose set "
        "`allow_bf16_master_weights: true`."
    )


if __name__ == "__main__":  # `python -m opdlm_trl.precision [--use-cpu]` prints true/false for `--bf16`
    import sys

    print("true" if bf16_is_fast_here(use_cpu="--use-cpu" in sys.argv[1:]) else "false")
