"""Log-likelihood of given continuations under a block-diffusion student: exact for a fixed decoding order, or
the Monte Carlo ELBO.

**Exact, fixed order (the default).** Fix the order in which the sampler writes a continuation: left to right,
one token per step (or any per-block step map, e.g. a sampler's :attr:`~opdlm_trl.sampling.Rollout.step_map`).
Every token then has one predictive distribution, ``p(x_i | context, earlier blocks clean, the positions of its
block written before it, [MASK] on the rest of its block)``, and the product of these is the exact probability
that this decoding process writes the continuation: a number of the same kind as an AR model's log-likelihood,
so log-likelihood-scored tasks (multiple choice, perplexity) compare like with like. The continuation starts a
fresh block (the context is left-padded to a block boundary, as the sampler does) and its last block is filled
with ``[MASK]`` to the block's end, since the sampler always decodes whole blocks.

The states are noisy copies of one training layout (:func:`opdlm_trl.masks.decoding_order_layout`): one forward
of ``[context | x0 | x_t^1 | ... | x_t^K]`` scores every block at once, ``K`` = the decoding steps that need a
noisy state (``block_size`` unshifted, ``block_size - 1`` shifted, none for a shifted ``block_size=1`` student:
that is the plain causal forward of the AR model). A request of ``P`` context and ``C`` continuation tokens
costs one forward over ``P + (K + 1) C`` tokens, at most ``2 * block_size`` times the AR forward's ``P + C``.

**Monte Carlo ELBO** (:func:`elbo_loglikelihood`): the MDLM / block-diffusion bound dLLM reports (``mc_num``
samples), ``E_t [1/t sum_{i masked at rate t} log p(x_i | x_t)]`` with ``t ~ U(0, 1]``, in every block at once.
It estimates a different (lower-bound) quantity with sampling noise; it is here to compare with such numbers.

Both normalise over the distribution the sampler draws from (:func:`opdlm_trl.modeling.restrict_to_teacher_vocab`:
no ``[MASK]``, no id beyond the teacher's vocabulary). ``is_greedy`` is lm-eval's: every continuation token is
the argmax of its predictive distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .masks import decoding_order_layout, in_block_offsets, pad_to_blocks, round_up_to_block, training_layout
from .modeling import diffusion_settings, restrict_to_teacher_vocab, student_forward, unwrap_model

__all__ = [
    "LIKELIHOODS",
    "ContinuationScores",
    "elbo_loglikelihood",
    "elbo_samples",
    "loglikelihood",
    "score_continuations",
]

Request = tuple[Sequence[int], Sequence[int]]
LIKELIHOODS = ("exact", "elbo")  # exact fixed-order log-likelihood, Monte Carlo ELBO


@dataclass
class ContinuationScores:
    """Per-token scores of a batch of continuations (CPU tensors).

    Attributes:
        logprobs: ``(N, C)`` float32 log-probability of each continuation token (0 outside ``mask``).
        greedy: ``(N, C)`` bool, the token is the argmax of its predictive distribution.
        mask: ``(N, C)`` bool, a real continuation token (rows are right-padded).
    """

    logprobs: torch.Tensor
    greedy: torch.Tensor
    mask: torch.Tensor

    def totals(self) -> list[tuple[float, bool]]:
        """``(sum log-probability, is_greedy)`` per row, lm-eval's ``loglikelihood`` answer."""
        sums = (self.logprobs * self.mask).sum(1)
        greedy = (self.greedy | ~self.mask).all(1)
        return [(float(total), bool(flag)) for total, flag in zip(sums, greedy, strict=True)]


@dataclass
class _Canvas:
    """Context left-padded to blocks; continuation + ``[MASK]`` to the end of its last block, right-padded."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    scored: torch.Tensor  # (N, C) bool: real continuation tokens (not the block's [MASK] tail, not padding)


def _canvas(contexts, continuations, block_size, pad_token_id: int, mask_token_id: int, device) -> _Canvas:
    completions = [
        [*tokens, *[mask_token_id] * (round_up_to_block(len(tokens), block_size) - len(tokens))]
        for tokens in continuations
    ]
    prompt_ids, prompt_mask = pad_to_blocks([list(c) for c in contexts], block_size, pad_token_id, "left", device)
    completion_ids, completion_mask = pad_to_blocks(completions, block_size, pad_token_id, "right", device)
    lengths = torch.tensor([len(tokens) for tokens in continuations], device=device)
    scored = torch.arange(completion_ids.shape[1], device=device)[None, :] < lengths[:, None]
    return _Canvas(prompt_ids, prompt_mask, completion_ids, completion_mask, scored)


def _target_scores(
    model, layout, sources: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, settings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability and greedy flag of ``targets`` read at layout indices ``sources`` (same shape, per row).

    Only the logits that are read are computed (``logits_to_keep`` with the sorted unique sources), and the
    log-softmax is never materialised per target: memory stays at one logit row per scored token.
    """
    keep = torch.unique(sources[valid])
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=sources.device)
    logits = student_forward(
        model, layout.input_ids, layout.attention_mask, position_ids=layout.position_ids, logits_to_keep=keep
    ).logits
    logits = restrict_to_teacher_vocab(logits.float(), settings.mask_token_id, settings.teacher_vocab_size)
    normaliser = torch.logsumexp(logits, dim=-1)  # (N, K)
    argmax = logits.argmax(-1)
    column = torch.searchsorted(keep, sources.clamp(min=0)).clamp(max=keep.numel() - 1)
    flat_column = column.reshape(column.shape[0], -1)
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    flat_targets = targets.reshape(targets.shape[0], -1)
    picked = logits[rows, flat_column, flat_targets] - normaliser[rows, flat_column]
    greedy = argmax[rows, flat_column] == flat_targets
    logprobs = picked.view(targets.shape).masked_fill(~valid, 0.0)
    return logprobs, greedy.view(targets.shape) & valid


def _model_place(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(unwrap_model(model).parameters())
    return parameter.device, parameter.dtype


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_token_id: int,
    block_size: int | None = None,
    step_maps: torch.Tensor | None = None,
) -> ContinuationScores:
    """Exact per-token log-probabilities of ``continuations`` after ``contexts`` under a fixed decoding order.

    One forward for the whole batch (see the module docstring). ``block_size`` defaults to the student's own.
    ``step_maps`` ``(N, C_max)``: the block-local step at which each continuation position is written (``-1``
    never); default left to right, one token per step. Every context needs at least one token (a shifted
    student reads the first continuation token from the last context position).
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts for {len(continuations)} continuations.")
    if any(len(context) == 0 for context in contexts):
        raise ValueError("Every context needs at least one token (prepend BOS / EOS to an empty one).")
    settings = diffusion_settings(model)
    block = block_size if block_size is not None else settings.block_size
    device, dtype = _model_place(model)
    canvas = _canvas(contexts, continuations, block, pad_token_id, settings.mask_token_id, device)
    width = canvas.completion_ids.shape[1]
    if step_maps is None:
        step_map = in_block_offsets(width, block, device).expand(len(contexts), -1)
    else:
        step_map = torch.full((len(contexts), width), -1, dtype=torch.long, device=device)
        step_map[:, : step_maps.shape[1]] = step_maps.to(device)[:, :width]
    step_map = step_map.masked_fill(~canvas.scored, -1)
    ordered = decoding_order_layout(
        canvas.prompt_ids,
        canvas.prompt_mask,
        canvas.completion_ids,
        canvas.completion_mask,
        block,
        settings.shift,
        settings.mask_token_id,
        step_map,
        dtype,
    )
    valid = canvas.scored & (step_map >= 0)
    logprobs, greedy = _target_scores(
        model, ordered.layout, ordered.source_index, canvas.completion_ids, valid, settings
    )
    return ContinuationScores(logprobs.cpu(), greedy.cpu(), valid.cpu())


def _checked_requests(requests: Sequence[Request], max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """Requests as lists; contexts left-truncated to lm-eval's hf rule (context + continuation <= max_length + 1).

    An AR model never reads the last continuation token, so the hf model keeps ``max_length + 1`` tokens; the same
    budget here scores the same tokens with the same context (lm-eval's rolling windows rely on it).
    """
    checked = []
    for context, continuation in requests:
        context, continuation = list(context), list(continuation)
        if not continuation:
            raise ValueError("An empty continuation has no log-likelihood to score.")
        if max_length is not None:
            if len(continuation) > max_length:
                raise ValueError(
                    f"A continuation of {len(continuation)} tokens does not fit max_length={max_length}: split it "
                    "into windows (loglikelihood_rolling does) or raise max_length."
                )
            context = context[-max(1, max_length + 1 - len(continuation)) :]
        checked.append((context, continuation))
    return checked


def _longest_first_batches(requests: Sequence[tuple[list[int], list[int]]], batch_size: int) -> list[list[int]]:
    """Request indices in batches of similar length (longest first, as lm-eval's hf model), to waste little padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def loglikelihood(
    model: torch.nn.Module,
    requests: Sequence[Request],
    pad_token_id: int,
    batch_size: int = 8,
    block_size: int | None = None,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """Exact left-to-right ``(sum log-probability, is_greedy)`` of each ``(context_ids, continuation_ids)``.

    What lm-eval's ``loglikelihood`` returns, for a block-diffusion student (module docstring). Requests are
    batched longest first and answered in the given order; batching and padding do not change the numbers.
    ``progress`` is called with the number of requests finished after each batch.
    """
    checked = _checked_requests(requests, max_length)
    results: list[tuple[float, bool] | None] = [None] * len(checked)
    for batch in _longest_first_batches(checked, batch_size):
        scores = score_continuations(
            model, [checked[i][0] for i in batch], [checked[i][1] for i in batch], pad_token_id, block_size
        )
        for index, total in zip(batch, scores.totals(), strict=True):
            results[index] = total
        if progress is not None:
            progress(len(batch))
    return results


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """``U[0, 1)`` drawn on the generator's device (CPU by default) and moved, so a seed gives the same draws anywhere."""
    draw_device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


@torch.no_grad()
def elbo_samples(
    model: torch.nn.Module,
    requests: Sequence[Request],
    pad_token_id: int,
    mc_num: int = 128,
    batch_size: int = 8,
    block_size: int | None = None,
    max_length: int | None = None,
    generator: torch.Generator | None = None,
    samples_per_forward: int = 16,
) -> torch.Tensor:
    """``(N, mc_num)`` float64 one-sample ELBO estimates ``(1/t) sum_masked log p`` of each request (CPU).

    Each sample draws one rate ``t ~ U(0, 1]`` per request and masks every continuation token independently with
    probability ``t``; blocks see earlier blocks clean (the training layout), so every block is scored at once.
    ``samples_per_forward`` samples ride as noisy copies in one forward. The mean over samples is
    :func:`elbo_loglikelihood`; the samples themselves let a benchmark watch the estimate converge.
    """
    if mc_num < 1 or samples_per_forward < 1:
        raise ValueError(f"mc_num and samples_per_forward must be >= 1, got {mc_num} and {samples_per_forward}.")
    settings = diffusion_settings(model)
    block = block_size if block_size is not None else settings.block_size
    device, dtype = _model_place(model)
    checked = _checked_requests(requests, max_length)
    samples = torch.zeros((len(checked), mc_num), dtype=torch.float64)
    for batch in _longest_first_batches(checked, batch_size):
        canvas = _canvas(
            [checked[i][0] for i in batch], [checked[i][1] for i in batch], block, pad_token_id,
            settings.mask_token_id, device,
        )  # fmt: skip
        rows, width = canvas.completion_ids.shape
        for start in range(0, mc_num, samples_per_forward):
            copies = min(samples_per_forward, mc_num - start)
            rate = 1.0 - _uniform((rows, copies), generator, device)  # (0, 1]
            masked = (_uniform((rows, copies, width), generator, device) < rate[..., None]) & canvas.scored[:, None]
            noisy_ids = canvas.completion_ids[:, None].masked_fill(masked, settings.mask_token_id)
            layout = training_layout(
                canvas.prompt_ids, canvas.prompt_mask, canvas.completion_ids, noisy_ids, canvas.completion_mask,
                block, settings.shift, dtype,
            )  # fmt: skip
            sources = layout.source_index.expand(rows, -1, -1)
            targets = canvas.completion_ids[:, None].expand(-1, copies, -1)
            logprobs, _ = _target_scores(model, layout, sources, targets, masked, settings)
            values = logprobs.double().sum(-1) / rate.double()
            samples[torch.tensor(batch), start : start + copies] = values.cpu()
    return samples


def elbo_loglikelihood(
    model: torch.nn.Module,
    requests: Sequence[Request],
    pad_token_id: int,
    mc_num: int = 128,
    batch_size: int = 8,
    block_size: int | None = None,
    max_length: int | None = None,
    generator: torch.Generator | None = None,
    samples_per_forward: int = 16,
) -> list[float]:
    """Monte Carlo ELBO of each continuation: the mean of ``mc_num`` :func:`elbo_samples` (dLLM's estimate).

    Unbiased for the block-diffusion bound; its sampling noise is what ``mc_num`` buys down (heavy-tailed: the
    ``1/t`` weight of a rarely masked token is large), measured by benchmarks/loglikelihood.py.
    """
    samples = elbo_samples(
        model, requests, pad_token_id, mc_num, batch_size, block_size, max_length, generator, samples_per_forward
    )
    return samples.mean(1).tolist()
