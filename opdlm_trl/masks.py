"""Who attends to whom, and which logit predicts which token.

This module is the single source of attention patterns and logit alignment in the project: the
sampler, the training-state builder, the teachers and the evaluation code all call it, so a change
of convention happens in exactly one place.

Vocabulary used throughout:

* **canvas**: one padded row ``[left padding | prompt | completion]`` in which the prompt ends on a
  block boundary, so the completion starts a fresh block (docs/method.md §1). Blocks are counted from the
  canvas start.
* **block-causal**: a query in block ``q`` attends every real key in blocks ``k <= q``; padding keys
  are never attended. ``block_size=None`` means one block for the whole canvas (bidirectional).
* **training layout** ``[prompt | x0 | x_t]`` (docs/method.md §4): the clean sequence followed by a noisy copy
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
    "DecodingOrderLayout",
    "TrainingLayout",
    "align_block_logits",
    "block_causal_mask",
    "block_index",
    "blocks_needed",
    "decoding_order_layout",
    "frontier_offsets",
    "gather_predictions",
    "in_block_offsets",
    "left_pad_to_block",
    "logits_to_keep_for_block",
    "pad_to_blocks",
    "position_ids_from_mask",
    "predictor_positions",
    "round_up_to_block",
    "shown_at",
    "split_previous_logit",
    "to_additive_mask",
    "training_layout",
    "widen_to_blocks",
]

PAD_SIDES = ("left", "right")


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


def round_up_to_block(length: int, block_size: int | None) -> int:
    """Smallest multiple of ``block_size`` that holds ``length`` tokens; ``None`` (one block) keeps ``length``.

    The sampler only decodes whole blocks, so every completion length, curriculum length and padded width in
    the project is rounded here rather than by its own arithmetic.
    """
    return length if block_size is None else blocks_needed(length, block_size) * block_size


def shown_at(step_map: torch.Tensor, step: torch.Tensor | int | None = None) -> torch.Tensor:
    """Whether each position shows its token in the visited state at block-local denoising step ``step``.

    The trajectory rule (docs/method.md §2): a position is visible iff it was committed (``step_map >= 0``) at a
    step before ``step``; ``step`` broadcasts against ``step_map`` (one step per position or per row), and
    ``None`` is the block after its last step (every committed token shown, never-committed ones still
    ``[MASK]``). The sampler's replay, the training states and the trainer's clean canvas all use it.
    """
    committed = step_map >= 0
    return committed if step is None else committed & (step_map < step)


def frontier_offsets(masked: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """Offset of each still-masked completion position from its block's frontier (first masked position).

    A confidence-based sampler can only commit far from the frontier when the student is sure of a
    token whose left neighbours are still unknown, so confidence is read by this offset. ``masked`` is
    ``(B, C)`` over completion positions; the completion starts a fresh block (the sampler's prompt
    ends on a block boundary), so block ``b`` is positions ``[b * block_size, (b + 1) * block_size)``;
    ``block_size=None`` makes the whole completion one block. Returns ``(B, C)`` long, ``-1`` where
    the position is not masked.
    """
    masked = masked.bool()
    batch, length = masked.shape
    size = max(length, 1) if block_size is None else block_size
    padded_length = blocks_needed(length, size) * size
    blocks = torch.nn.functional.pad(masked, (0, padded_length - length)).view(batch, -1, size)
    local = torch.arange(size, device=masked.device)
    frontier = torch.where(blocks, local, size).min(-1, keepdim=True).values
    offsets = torch.where(blocks, local - frontier, -1)
    return offsets.reshape(batch, padded_length)[:, :length]


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


def widen_to_blocks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    block_size: int | None,
    pad_token_id: int,
    side: str = "left",
    min_length: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a ``(B, L)`` batch on ``side`` to whole blocks (and at least ``min_length``): the one padding rule.

    ``"left"`` for prompts, so every row ends on a block boundary and the completion starts a fresh block
    (docs/method.md §1); ``"right"`` for given completions, so they fill whole blocks as a rollout does.
    Padding ids are ``pad_token_id`` and padding mask entries 0.
    """
    if side not in PAD_SIDES:
        raise ValueError(f"side must be one of {PAD_SIDES}, got {side!r}.")
    extra = round_up_to_block(max(input_ids.shape[1], min_length), block_size) - input_ids.shape[1]
    padding = (extra, 0) if side == "left" else (0, extra)
    return (
        torch.nn.functional.pad(input_ids, padding, value=pad_token_id),
        torch.nn.functional.pad(attention_mask, padding, value=0),
    )


def pad_to_blocks(
    sequences: list[list[int]],
    block_size: int | None,
    pad_token_id: int,
    side: str = "left",
    device: torch.device | str | None = None,
    min_length: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as a ``(B, W)`` long ``(input_ids, attention_mask)`` batch padded on ``side``.

    ``W`` is the longest row (at least ``min_length``) rounded up to whole blocks (:func:`widen_to_blocks`).
    """
    if side not in PAD_SIDES:
        raise ValueError(f"side must be one of {PAD_SIDES}, got {side!r}.")
    longest = max((len(s) for s in sequences), default=0)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        if tokens:
            span = slice(longest - len(tokens), longest) if side == "left" else slice(0, len(tokens))
            input_ids[row, span] = torch.as_tensor(list(tokens), dtype=torch.long)
            attention_mask[row, span] = 1
    input_ids, attention_mask = widen_to_blocks(input_ids, attention_mask, block_size, pad_token_id, side, min_length)
    return input_ids.to(device), attention_mask.to(device)


def left_pad_to_block(
    sequences: list[list[int]], block_size: int | None, pad_token_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists so every row ends on the same block boundary (:func:`pad_to_blocks`, ``side="left"``).

    Returns ``(input_ids, attention_mask)`` of width ``ceil(max_len / block_size) * block_size``.
    """
    return pad_to_blocks(sequences, block_size, pad_token_id, "left", device)


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


def logits_to_keep_for_block(width: int, shift: bool) -> int:
    """Logits a decoding forward must return for a block of ``width`` queries at the end of its input.

    Unshifted: the block's own. Shifted: one more, the position just before the block, because it predicts the
    block's first token (:func:`split_previous_logit` separates it again).
    """
    return width + 1 if shift else width


def split_previous_logit(logits: torch.Tensor, shift: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(previous_logit, block_logits)`` from the ``logits_to_keep_for_block`` logits of a decoding forward.

    Shifted: the first kept logit is the last position before the block (``(B, V)``); unshifted: ``None``.
    """
    if not shift:
        return None, logits
    return logits[:, 0], logits[:, 1:]


@dataclass
class TrainingLayout:
    """Inputs of one vectorised training forward over ``[prompt | x0 | x_t]`` (or several noisy copies).

    Attributes:
        input_ids: ``(B, P + (K + 1) C)`` token ids (``K = 1`` for a single noisy copy).
        attention_mask: ``(B, 1, L, L)`` additive float mask over those ``L`` tokens.
        position_ids: ``(B, L)``; every noisy copy reuses the clean completion's ids.
        noisy_start: ``P + C``, index of the first noisy token.
        source_index: ``(C,)`` index of the logit that predicts noisy completion position ``j``
            (the same for every row because rows share ``P`` and ``C``); ``(K, C)`` with several copies.
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
    """Build the ``[prompt | x0 | x_t]`` training forward (docs/method.md §4).

    ``prompt_ids`` ``(B, P)`` are left-padded so the prompt ends on a block boundary (``P`` is a
    multiple of ``block_size``); ``clean_ids`` / ``noisy_ids`` are ``(B, C)`` with ``completion_mask``
    marking real completion tokens (right padding after the end). The noisy block ``b`` attends the
    prompt, clean blocks ``< b`` and itself, which reproduces exactly the context the sampler had when
    it visited that state, for every block at once.

    ``noisy_ids`` may also be ``(B, K, C)``: ``K`` noisy copies side by side, ``[prompt | x0 | x_t^1 | ... |
    x_t^K]``, each block of each copy attending the prompt, the clean blocks before it and its own block of its
    own copy only. One forward then scores ``K`` states of every block (exact log-likelihoods need one state per
    decoding step, :func:`decoding_order_layout`); ``source_index`` is ``(K, C)``. ``K = 0`` is the clean
    canvas alone.
    """
    prompt_len = prompt_ids.shape[1]
    completion_len = clean_ids.shape[1]
    if block_size is not None and prompt_len % block_size:
        raise ValueError(f"Prompt width {prompt_len} must be a multiple of block_size={block_size}.")
    single = noisy_ids.dim() == 2
    copies = noisy_ids.unsqueeze(1) if single else noisy_ids
    num_copies = copies.shape[1]
    device = prompt_ids.device
    input_ids = torch.cat([prompt_ids, clean_ids, copies.reshape(copies.shape[0], -1)], dim=1)
    key_mask = torch.cat([prompt_mask, completion_mask, completion_mask.repeat(1, num_copies)], dim=1).bool()

    canvas_len = prompt_len + completion_len
    canvas_positions = torch.arange(canvas_len, device=device)
    completion_slots = canvas_positions[prompt_len:]
    layout_canvas = torch.cat([canvas_positions, completion_slots.repeat(num_copies)])  # canvas slot of each index
    copy_id = torch.cat(  # 0 = the clean canvas, k = noisy copy k
        [
            torch.zeros(canvas_len, dtype=torch.long, device=device),
            torch.arange(1, num_copies + 1, device=device).repeat_interleave(completion_len),
        ]
    )
    is_noisy = copy_id > 0
    blocks = block_index(layout_canvas, block_size, prompt_len)

    q_block, k_block = blocks[:, None], blocks[None, :]
    q_noisy, k_noisy = is_noisy[:, None], is_noisy[None, :]
    clean_to_clean = ~q_noisy & ~k_noisy & (k_block <= q_block)
    noisy_to_clean = q_noisy & ~k_noisy & (k_block < q_block)
    noisy_to_noisy = q_noisy & k_noisy & (k_block == q_block) & (copy_id[:, None] == copy_id[None, :])
    pattern = clean_to_clean | noisy_to_clean | noisy_to_noisy
    allowed = pattern[None, None] & key_mask[:, None, None, :]
    index = torch.arange(input_ids.shape[1], device=device)
    allowed = _allow_self(allowed, index, index)

    clean_positions = position_ids_from_mask(torch.cat([prompt_mask, completion_mask], dim=1))
    position_ids = torch.cat([clean_positions, clean_positions[:, prompt_len:].repeat(1, num_copies)], dim=1)

    noisy_index = canvas_len + torch.arange(num_copies * completion_len, device=device).view(
        num_copies, completion_len
    )
    if shift:
        starts_block = (
            (completion_slots % block_size == 0) if block_size is not None else completion_slots == prompt_len
        )
        source_index = torch.where(starts_block, completion_slots - 1, noisy_index - 1)
    else:
        source_index = noisy_index
    return TrainingLayout(
        input_ids=input_ids,
        attention_mask=to_additive_mask(allowed, dtype),
        position_ids=position_ids,
        noisy_start=canvas_len,
        source_index=source_index[0] if single else source_index,
    )


def in_block_offsets(length: int, block_size: int | None, device: torch.device | str | None = None) -> torch.Tensor:
    """``(length,)`` offset of each completion position inside its block (``None``: the completion is one block).

    The completion starts a fresh block (the prompt ends on a block boundary), so this is also the step at which
    left-to-right decoding with one token per step writes each position.
    """
    positions = torch.arange(length, device=device)
    return positions if block_size is None else positions - block_index(positions, block_size) * block_size


@dataclass
class DecodingOrderLayout:
    """One forward that scores every completion token in the state in which a decoding order writes it.

    Attributes:
        layout: the multi-copy :class:`TrainingLayout` (one noisy copy per decoding step that needs one).
        source_index: ``(B, C)`` index (into the layout) of the logit predicting completion position ``j`` in
            the state just before ``j`` is written. Meaningless where ``step_map < 0`` (never written).
    """

    layout: TrainingLayout
    source_index: torch.Tensor


def decoding_order_layout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    block_size: int | None,
    shift: bool,
    mask_token_id: int,
    step_map: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> DecodingOrderLayout:
    """The states of a fixed decoding order as noisy copies of one training layout (exact log-likelihood).

    ``step_map`` ``(B, C)`` is the block-local step at which each completion position is written (the sampler's
    :attr:`Rollout.step_map`; ``-1`` = never); the default, :func:`in_block_offsets`, is left to right with one
    token per step. At step ``s`` a block shows the positions written before ``s`` (:func:`shown_at`) and
    ``[MASK]`` elsewhere; earlier blocks are clean. Noisy copy ``k`` holds the state of one step ``s`` in every
    block at once, so a fixed order costs one copy per distinct step. A shifted student reads a block's first
    position from the last clean position before the block, which no noisy content changes: those positions need
    no copy, so left-to-right order costs ``block_size - 1`` copies and ``block_size=1`` none (the causal canvas).
    """
    batch, completion_len = completion_ids.shape
    device = completion_ids.device
    prompt_len = prompt_ids.shape[1]
    offsets = in_block_offsets(completion_len, block_size, device)
    if step_map is None:
        step_map = offsets.expand(batch, -1)
    step_map = step_map.to(device)
    written = (step_map >= 0) & completion_mask.bool()
    first_of_block = (offsets == 0).expand(batch, -1)
    needs_copy = written & ~first_of_block if shift else written
    steps = torch.unique(step_map[needs_copy]).tolist()
    noisy = [torch.where(shown_at(step_map, step), completion_ids, mask_token_id) for step in steps]
    noisy_ids = torch.stack(noisy, dim=1) if noisy else completion_ids.new_empty((batch, 0, completion_len))
    layout = training_layout(
        prompt_ids, prompt_mask, completion_ids, noisy_ids, completion_mask, block_size, shift, dtype
    )
    canvas_source = predictor_positions(prompt_len + torch.arange(completion_len, device=device), shift)
    source_index = canvas_source.expand(batch, -1)
    if steps:
        copy_of_step = torch.zeros(int(step_map.max()) + 1, dtype=torch.long, device=device)
        copy_of_step[torch.tensor(steps, device=device)] = torch.arange(len(steps), device=device)
        copies = copy_of_step[step_map.clamp(min=0)]
        from_copy = layout.source_index[copies, torch.arange(completion_len, device=device)]
        source_index = torch.where(needs_copy, from_copy, source_index)
    return DecodingOrderLayout(layout=layout, source_index=source_index)
