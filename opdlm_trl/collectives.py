"""Rank-synchronised counts: the one place that makes data-dependent loops issue the same collectives everywhere.

Under DeepSpeed ZeRO-3 every forward of a module gathers that module's parameters from all ranks (an all-gather per
call). A loop whose length depends on a rank's data (teacher head chunks over that rank's completion tokens, sampler
steps until that rank's rows stop) then issues a different number of collectives on different ranks: gloo reports
"Received data size doesn't match expected size", NCCL hangs or returns garbage. The fix is always the same: agree
on the count first (the all-ranks maximum), and let ranks with less work run empty iterations. These helpers are
no-ops (no collective at all) in a single process.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["any_rank", "chunk_bounds", "distributed_world", "max_over_ranks"]


def distributed_world() -> bool:
    """True when more than one process takes part in collectives (torch.distributed initialised, world > 1)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only (the current device of this rank); gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(value: int) -> int:
    """The maximum of ``value`` over all ranks (one all-reduce; ``value`` itself in a single process)."""
    if not distributed_world():
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.long, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank (HF ``generate``'s ``synced_gpus`` test)."""
    return bool(max_over_ranks(int(bool(flag))))


def chunk_bounds(rows: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` row chunks of at most ``chunk_size``, as many on every rank as the busiest rank needs.

    Ranks with fewer rows get trailing empty chunks (``start == end == rows``): callers run them anyway (an empty
    head call still gathers the head's parameters under ZeRO-3), so every rank issues the same collectives. There is
    always at least one chunk, so a head whose gradient DDP expects is used even when no rank has a row.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    count = max(1, max_over_ranks(math.ceil(rows / chunk_size)))
    return [(min(i * chunk_size, rows), min((i + 1) * chunk_size, rows)) for i in range(count)]
