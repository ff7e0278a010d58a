"""Who attends to whom, and which logit predicts which token.

This module is the single source of attention patterns and logit alignment in the project: the
sampler, the training-state builder, the teachers and the evaluation code all call it, so a change
of convention happens in exactly one place.

Vocabulary used throughout:

* **canvas**: one padded row ``[left padding | prompt | completion]`` in which the prompt ends on a
  block boundary, so the completion starts a fresh block (method §1). Blocks are counted from the
  canvas start.
* **block-causal**: a query in block ``q`` attends every real key in blocks ``k <= q``; padding keys
  are never attended. ``block_size=None`` means one block for the whole canvas (bidirectional).
* **training layout** ``[prompt | x0 | x_t]`` (method §4): the clean sequence followed by a noisy copy
  of the completion that reuses the clean position ids. Noisy block ``b`` attends the prompt, the
  clean blocks before ``b`` and itself; clean tokens never see noisy ones.
* **shift**: with ``shift=False`` (the paper) the logit at position ``i`` predicts token ``i``; with
  ``shift=True`` (Dream, Fast-dLLM v2) the logit at ``i - 1`` predicts token ``i``. The first token of
  a noisy block is then read from the last *clean* position before it.

Masks are returned as additive float tensors ``(B, 1, Q, K)`` holding ``0`` (attend) or
``finfo(dtype).min`` (blocked): transformers passes 4D masks to the attention kernels unchanged, and
sdpa and eager both honour them. Boolean 4D masks are avoided on purpose: eager attention adds them
as 0/1, which silently leaks padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "TrainingLayout",
    "align_block_logits",
    "block_causal_mask",
    "block_index",
    "blocks_needed",
    "gather_predictions",
    "left_pad_to_block",
    "position_ids_from_mask",
    "predictor_positions",
    "to_additive_mask",
    "training_layout",
]


def block_index(positions: torch.Tensor, block_size: int | None, prompt_length: int | None = None) -> torch.Tensor:
    """Block number of each canvas position.

    ``block_size=None`` is the bidirectional student: without ``prompt_length`` the whole canvas is
    one block; with it, the prompt is block 0 and the completion one block (1) after it, which is
    what a sampler that prefills the prompt and a ``[prompt | x0 | x_t]`` layout can represent.
    """
    if block_size is None:
        if prompt_length is None:
            return torch.zeros_like(positions)
        return (positions >= prompt_length).long()
    return torch.div(positions, block_size, rounding_mode="floor")


def blocks_needed(length: int, block_size: int) -> int:
    """Smallest number of blocks that hold ``length`` tokens."""
    return -(-length // block_size)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (left padding does not shift positions)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)


def to_additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean ``(B, 1, Q, K)`` pattern into the additive float mask transformers expects."""
    blocked = torch.finfo(dtype).min
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, blocked)


def _allow_self(allowed: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Let every query see itself so no row is fully blocked (a padding query would give NaN in fp16)."""
    diagonal = query_positions[:, None] == key_positions[None, :]
    return allowed | diagonal[None, None]


def block_causal_mask(
    key_mask: torch.Tensor,
    block_size: int | None,
    dtype: torch.dtype = torch.float32,
    query_length: int | None = None,
    prompt_length: int | None = None,
) -> torch.Tensor:
    """Additive block-causal mask for a (possibly cached) forward over a canvas.

    Args:
        key_mask: ``(B, K)`` 1 for real tokens, 0 for padding, over every key position of the canvas
            seen so far (cached keys followed by the current queries).
        block_size: tokens per block, counted from canvas position 0; ``None`` = bidirectional.
        dtype: the model's compute dtype.
        query_length: number of queries; they are the last ``query_length`` key positions (a cached
            decoding step). Defaults to ``K`` (a full forward).
        prompt_length: only used with ``block_size=None`` (see :func:`block_index`).

    Returns:
        ``(B, 1, Q, K)`` float mask: ``0`` where a query may attend a key, ``finfo(dtype).min`` elsewhere.
    """
    key_length = key_mask.shape[-1]
    query_length = key_length if query_length is None else query_length
    device = key_mask.device
    key_positions = torch.arange(key_length, device=device)
    query_positions = key_positions[key_length - query_length :]
    key_blocks = block_index(key_positions, block_size, prompt_length)
    query_blocks = key_blocks[key_length - query_length :]
    same_or_earlier = key_blocks[None, :] <= query_blocks[:, None]
    allowed = same_or_earlier[None, None] & key_mask.bool()[:, None, None, :]
    return to_additive_mask(_allow_self(allowed, query_positions, key_positions), dtype)


def left_pad_to_block(
    sequences: list[list[int]], block_size: int | None, pad_token_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists so every row ends on the same block boundary (method §1).

    Returns ``(input_ids, attention_mask)`` of width ``ceil(max_len / block_size) * block_size``.
    """
    longest = max((len(s) for s in sequences), default=0)
    width = longest if block_size is None else blocks_needed(longest, block_size) * block_size
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        if tokens:
            input_ids[row, width - len(tokens) :] = torch.as_tensor(tokens, dtype=torch.long)
            attention_mask[row, width - len(tokens) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def predictor_positions(target_positions: torch.Tensor, shift: bool) -> torch.Tensor:
    """Index of the logit that predicts the token at ``target_positions`` on a plain canvas.

    Unshifted: the same position. Shifted (and always for a causal teacher): the position before.
    This is the only place the ``i - 1`` convention is written down for plain sequences.
    """
    return target_positions - 1 if shift else target_positions


def gather_predictions(logits: torch.Tensor, target_positions: torch.Tensor, shift: bool) -> torch.Tensor:
    """Logits predicting the tokens at ``target_positions`` (``(B, N)`` or ``(N,)``) of a canvas forward.

    Returns ``(B, N, V)``. Used for the teacher (``shift=True``: a causal LM's logit at ``i-1``
    predicts ``i``) and for block-causal student forwards over a canvas.
    """
    sources = predictor_positions(target_positions, shift)
    if sources.dim() == 1:
        sources = sources.unsqueeze(0).expand(logits.shape[0], -1)
    if (sources < 0).any():
        raise ValueError("A shifted prediction needs a token before the first target position (empty prompt?).")
    return logits.gather(1, sources.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def align_block_logits(block_logits: torch.Tensor, previous_logit: torch.Tensor | None, shift: bool) -> torch.Tensor:
    """Per-position predictions for the current block of a cached decoding step.

    Unshifted: the block's own logits. Shifted: position ``o`` of the block is read from ``o - 1``;
    position 0 from ``previous_logit`` (``(B, V)``), the last clean logit before the block, which the
    sampler keeps from the prompt prefill or from the previous block's commit pass.
    """
    if not shift:
        return block_logits
    if previous_logit is None:
        raise ValueError("shift=True needs the logit of the last clean position before the block.")
    return torch.cat([previous_logit.unsqueeze(1).to(block_logits.dtype), block_logits[:, :-1]], dim=1)


@dataclass
class TrainingLayout:
    """Inputs of one vectorised training forward over ``[prompt | x0 | x_t]``.

    Attributes:
        input_ids: ``(B, P + 2C)`` token ids.
        attention_mask: ``(B, 1, P + 2C, P + 2C)`` additive float mask.
        position_ids: ``(B, P + 2C)``; the noisy copy reuses the clean completion's ids.
        noisy_start: ``P + C``, index of the first noisy token.
        source_index: ``(C,)`` index of the logit that predicts noisy completion position ``j``
            (the same for every row because rows share ``P`` and ``C``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    noisy_start: int
    source_index: torch.Tensor


def training_layout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    clean_ids: torch.Tensor,
    noisy_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    block_size: int | None,
    shift: bool,
    dtype: torch.dtype = torch.float32,
) -> TrainingLayout:
    """Build the ``[prompt | x0 | x_t]`` training forward (method §4).

    ``prompt_ids`` ``(B, P)`` are left-padded so the prompt ends on a block boundary (``P`` is a
    multiple of ``block_size``); ``clean_ids`` / ``noisy_ids`` are ``(B, C)`` with ``completion_mask``
    marking real completion tokens (right padding after the end). The noisy block ``b`` attends the
    prompt, clean blocks ``< b`` and itself, which reproduces exactly the context the sampler had when
    it visited that state, for every block at once.
    """
    prompt_len = prompt_ids.shape[1]
    completion_len = clean_ids.shape[1]
    if block_size is not None and prompt_len % block_size:
        raise ValueError(f"Prompt width {prompt_len} must be a multiple of block_size={block_size}.")
    device = prompt_ids.device
    input_ids = torch.cat([prompt_ids, clean_ids, noisy_ids], dim=1)
    key_mask = torch.cat([prompt_mask, completion_mask, completion_mask], dim=1).bool()

    canvas_len = prompt_len + completion_len
    canvas_positions = torch.arange(canvas_len, device=device)
    layout_canvas = torch.cat([canvas_positions, canvas_positions[prompt_len:]])  # canvas slot of each index
    is_noisy = torch.zeros(canvas_len + completion_len, dtype=torch.bool, device=device)
    is_noisy[canvas_len:] = True
    blocks = block_index(layout_canvas, block_size, prompt_len)

    q_block, k_block = blocks[:, None], blocks[None, :]
    q_noisy, k_noisy = is_noisy[:, None], is_noisy[None, :]
    clean_to_clean = ~q_noisy & ~k_noisy & (k_block <= q_block)
    noisy_to_clean = q_noisy & ~k_noisy & (k_block < q_block)
    noisy_to_noisy = q_noisy & k_noisy & (k_block == q_block)
    pattern = clean_to_clean | noisy_to_clean | noisy_to_noisy
    allowed = pattern[None, None] & key_mask[:, None, None, :]
    index = torch.arange(input_ids.shape[1], device=device)
    allowed = _allow_self(allowed, index, index)

    clean_positions = position_ids_from_mask(torch.cat([prompt_mask, completion_mask], dim=1))
    position_ids = torch.cat([clean_positions, clean_positions[:, prompt_len:]], dim=1)

    noisy_index = torch.arange(canvas_len, canvas_len + completion_len, device=device)
    if shift:
        canvas_slot = canvas_positions[prompt_len:]
        starts_block = (canvas_slot % block_size == 0) if block_size is not None else canvas_slot == prompt_len
        source_index = torch.where(starts_block, canvas_slot - 1, noisy_index - 1)
    else:
        source_index = noisy_index
    return TrainingLayout(
        input_ids=input_ids,
        attention_mask=to_additive_mask(allowed, dtype),
        position_ids=position_ids,
        noisy_start=canvas_len,
        source_index=source_index,
    )
