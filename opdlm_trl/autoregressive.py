"""The original autoregressive LM's own decoding: greedy answers, the reference that diffusion students are measured
against (teacher rows of evaluation and diagnostics) and the data of the baselines (SFT / off-policy KD on teacher
answers). Kept apart from :mod:`opdlm_trl.sampling`, which decodes the *diffusion* student.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .masks import pad_to_blocks
from .modeling import unwrap_model

__all__ = ["autoregressive_greedy", "mask_through_first_stop"]


def mask_through_first_stop(token_ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """``(B, T)`` long mask of each row up to and including its first stop token."""
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=token_ids.device)
    is_stop = torch.isin(token_ids, stops).long()
    return ((is_stop.cumsum(-1) - is_stop) == 0).long()


@torch.no_grad()
def autoregressive_greedy(
    model, token_lists: Sequence[Sequence[int]], pad_token_id: int, max_new_tokens: int, stop_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original ARLM's greedy answers (HF ``generate``): the reference for baselines and evaluation.

    Returns ``(prompt_ids, prompt_mask, completion_ids, completion_mask)`` with left-padded prompts and the
    completion mask running through the first stop token.
    """
    device = next(unwrap_model(model).parameters()).device
    prompt_ids, prompt_mask = pad_to_blocks([list(t) for t in token_lists], None, pad_token_id, "left", device)
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_token_id,
    )
    completion_ids = output[:, prompt_ids.shape[1] :]
    return prompt_ids, prompt_mask, completion_ids, mask_through_first_stop(completion_ids, stop_ids)
