"""Confidence-based block-diffusion sampler (docs/method.md §2) and its trajectory record.

The student decodes the completion block by block, left to right. Inside the current block every
position starts as ``[MASK]``; each denoising step predicts all masked positions, draws a candidate
per position and commits some of them (``static``: a fixed number per step; ``dynamic``: everything
above a threshold, never fewer than the static schedule), chosen by a commit rule registered in
:data:`COMMIT_RULES` (``commit_order``): the most confident ones anywhere in the block (``"confidence"``) or in
reading order from the block's frontier (``"left_to_right"``, the default, so committed tokens always form a
prefix of the block); :func:`register_commit_rule` adds one. Earlier blocks are final, so
with block-causal attention their keys/values are cached exactly: the prompt is prefilled once,
each step forwards only the current block against the cache and crops the cache back, and the
clean block is committed to the cache by the first forward of the next block (one forward of
``2 * block_size`` queries, see ``docs/sampling.md``).

Every attention pattern and every logit alignment comes from :mod:`opdlm_trl.masks`; the settings
(mask id, shift convention, block size, teacher vocabulary) come from
:func:`opdlm_trl.modeling.diffusion_settings`. The returned :class:`Rollout` records, per token, the
step at which it was committed, which replays every state the sampler visited
(:meth:`Rollout.state`): the training-state builder relies on that record.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from .collectives import any_rank, distributed_world
from .masks import (
    align_block_logits,
    block_index,
    blocks_needed,
    logits_to_keep_for_block,
    pad_to_blocks,
    round_up_to_block,
    shown_at,
    split_previous_logit,
    widen_to_blocks,
)
from .modeling import (
    diffusion_settings,
    restrict_to_teacher_vocab,
    student_forward,
    trainable_tokens_merged,
    unwrap_model,
)
from .registry import register

__all__ = [
    "COMMIT_RULES",
    "CommitRule",
    "DEFAULT_STOP_TOKENS",
    "DiffusionSampler",
    "Rollout",
    "SamplerConfig",
    "StepRecord",
    "default_stop_token_ids",
    "generate",
    "register_commit_rule",
]

DEFAULT_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
REMASKING = ("static", "dynamic")
CONFIDENCE = ("prob", "margin", "entropy")

# A commit rule picks which masked positions of a block a denoising step commits:
#   rule(confidence (A, K) float, masked (A, K) bool, count (A,) long, config: SamplerConfig) -> (A, K) bool
# ``count`` is the static schedule's number for this step (``block_size // steps_per_block``, everything left at the
# block's last step); a rule returns a subset of ``masked`` with at least ``count`` positions per row (the sampler
# checks), and may take more (dynamic decoding: ``config.remasking`` / ``config.threshold``).
CommitRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "SamplerConfig"], torch.Tensor]

# name -> rule. SamplerConfig checks ``commit_order`` against it (so OPDConfig does, when a config is made),
# ``opdlm-eval --commit-orders`` offers its names and OPDConfig's help lists it: a rule registered here, from any
# module, needs no other change.
COMMIT_RULES: dict[str, CommitRule] = {}


def register_commit_rule(name: str, rule: CommitRule | None = None, *, replace: bool = False):
    """Make ``name`` a valid ``commit_order`` decided by ``rule`` (a :data:`CommitRule`).

    Call it directly, ``register_commit_rule("mine", rule)``, or as a decorator, ``@register_commit_rule("mine")``;
    register before the config that names it is made (its check reads the registry). The rule's first docstring
    line is its summary in ``OPDConfig``'s help. A second rule under a taken name is refused unless
    ``replace=True``, so two modules cannot silently shadow each other.
    """

    def add(function: CommitRule) -> CommitRule:
        if not callable(function):
            raise TypeError(f"register_commit_rule({name!r}) needs a callable, got {type(function).__name__}.")
        return register(COMMIT_RULES, name, function, "commit rule", replace)

    return add if rule is None else add(rule)


@dataclass
class SamplerConfig:
    """How the student decodes (docs/method.md §2). Every field is validated in ``__post_init__``.

    Attributes:
        block_size: tokens per denoising block. ``None`` = the model's ``config.opdlm.block_size``
            (when that is also ``None``, the whole completion is one bidirectional block).
        max_new_tokens: completion length. Decoding runs whole blocks, so a value that is not a
            multiple of the block size is rounded UP to the next multiple (with a warning); the
            rollout then holds the rounded number of positions.
        steps_per_block: denoising steps per block for ``static`` remasking (the cap for ``dynamic``).
            ``None`` = ``block_size`` (one token per step, the paper's evaluation setting). Each step
            commits ``block_size // steps_per_block`` tokens; the last step commits what remains.
        remasking: ``"static"`` (commit the n most confident per step) or ``"dynamic"`` (commit every
            position whose confidence is >= ``threshold``, at least the static count).
        threshold: confidence threshold of ``dynamic`` remasking (paper / Fast-dLLM: 0.9). In
            ``[0, 1]`` for ``prob`` and ``margin``, ``<= 0`` for ``entropy``.
        commit_order: which masked positions a step commits: a rule registered in :data:`COMMIT_RULES`
            (:func:`register_commit_rule` adds one). ``"left_to_right"`` (default): the frontier (first masked
            position) and the static count of positions after it, then (``dynamic``) each next masked position
            while its confidence reaches ``threshold``; committed tokens always form a prefix of the block. OPD's
            target at a masked position is the teacher's ``p_T(. | x_<i)``, which conditions on the left only, so a
            token committed right of the frontier is never trained to agree with what is later filled in to its
            left; this order never makes such a commit (static with one token a step = AR order). ``"confidence"``
            (the paper's, and this project's default until issue 20's measurement): the most confident anywhere in
            the block. On SmolLM2 (three seeds, ~28k rollout tokens) decoding left to right lowered the teacher NLL
            of the student's text for both rollout orders at equal or more tokens per forward (docs/results.md).
        confidence: ranking score of a candidate, from the UNFILTERED softmax of the student's
            logits (temperature 1, before top-k/top-p; ``[MASK]`` and rows beyond the teacher
            vocabulary excluded): ``"prob"`` = probability of the sampled candidate, ``"margin"`` =
            top-1 minus top-2 probability, ``"entropy"`` = negative entropy.
        temperature: sampling temperature of the candidates; ``0`` = greedy (argmax).
        top_p: nucleus filtering of the candidates' distribution (``1.0`` = off).
        top_k: keep the k most likely candidates before sampling (``0`` = off).
        stop_token_ids: a row stops once it has committed one of these with no ``[MASK]`` before it.
            ``None`` = never stop early (:func:`generate` fills in the tokenizer's EOS / end-of-turn ids).
        use_cache: exact KV cache (default). ``False`` runs the whole canvas each step (slow; used by
            tests as the reference and as a fallback for models whose cache cannot be cropped).
        synced_ranks: every rank runs the same number of forwards, as HF ``generate``'s ``synced_gpus``: a rank
            whose rows are done keeps running idle forwards until every rank is done. Needed when a forward is a
            collective (DeepSpeed ZeRO-3 with parameters not gathered for generation); a no-op in one process.
    """

    block_size: int | None = None
    max_new_tokens: int = 256
    steps_per_block: int | None = None
    remasking: str = "static"
    commit_order: str = "left_to_right"
    threshold: float = 0.9
    confidence: str = "prob"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: Sequence[int] | None = None
    use_cache: bool = True
    synced_ranks: bool = False

    @classmethod
    def from_options(cls, options, **overrides) -> SamplerConfig:
        """A config from any object whose attributes share the field names (``OPDConfig``, argparse).

        The trainer and the example CLIs expose the sampler's knobs under the same names, so one
        place maps them; ``overrides`` (e.g. ``max_new_tokens``, ``stop_token_ids``) win, and a
        ``None`` option keeps the field's default.
        """
        values = {f.name: getattr(options, f.name) for f in fields(cls) if getattr(options, f.name, None) is not None}
        return cls(**{**values, **overrides})

    def __post_init__(self) -> None:
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ValueError(f"block_size must be a positive int or None (take the model's), got {self.block_size!r}.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}.")
        if self.steps_per_block is not None and (
            not isinstance(self.steps_per_block, int) or self.steps_per_block < 1
        ):
            raise ValueError(
                f"steps_per_block must be a positive int or None (= block_size), got {self.steps_per_block!r}."
            )
        if self.block_size is not None and self.steps_per_block is not None and self.steps_per_block > self.block_size:
            raise ValueError(
                f"steps_per_block={self.steps_per_block} exceeds block_size={self.block_size}: each step commits at "
                "least one token, so use steps_per_block <= block_size."
            )
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}.")
        if self.commit_order not in COMMIT_RULES:
            raise ValueError(
                f"commit_order={self.commit_order!r} is not a registered commit rule; registered: "
                f"{tuple(COMMIT_RULES)} (add one with opdlm_trl.sampling.register_commit_rule)."
            )
        if self.confidence not in CONFIDENCE:
            raise ValueError(f"confidence must be one of {CONFIDENCE}, got {self.confidence!r}.")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold!r}.")
        if self.confidence == "entropy" and self.threshold > 0:
            raise ValueError(
                f"confidence='entropy' scores candidates by NEGATIVE entropy (<= 0), so threshold={self.threshold} "
                "could never be reached; use a threshold <= 0 (e.g. -0.5)."
            )
        if self.confidence != "entropy" and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] for confidence={self.confidence!r}, got {self.threshold}.")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}.")
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, int):
                self.stop_token_ids = (self.stop_token_ids,)
            self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
            if any(t < 0 for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be non-negative ids, got {self.stop_token_ids}.")


@dataclass
class StepRecord:
    """Debug/test record of one denoising step (``DiffusionSampler(record_logits=True)``).

    ``logits`` are the aligned block logits the sampler read, ``(A, block_size, V)`` float32 and
    before ``[MASK]`` suppression, for the original batch rows ``rows`` (rows that already stopped
    are not in the forward).
    """

    block: int
    step: int
    rows: torch.Tensor
    logits: torch.Tensor


@dataclass
class Rollout:
    """A decoded batch and the trajectory that produced it (other modules rely on these names).

    ``completion_ids`` hold committed tokens; ``pad_token_id`` where nothing was committed (after
    the stop, undecoded blocks). Tokens the sampler had already committed after the stop token in
    the stop's own block stay in ``completion_ids`` (they were on the canvas, so :meth:`state` must
    replay them) but are outside ``completion_mask``. Never a mask id.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    decoded_mask: torch.Tensor
    step_map: torch.Tensor
    global_step_map: torch.Tensor
    block_steps: torch.Tensor
    nfe: int
    tokens_per_step: float
    finish_reason: list[str]
    block_size: int
    shift: bool
    mask_token_id: int

    def texts(self, tokenizer) -> list[str]:
        """Completions decoded over ``completion_mask``, special tokens skipped."""
        ids = self.completion_ids.cpu()
        keep = self.completion_mask.cpu().bool()
        return tokenizer.batch_decode(
            [row[m].tolist() for row, m in zip(ids, keep, strict=True)], skip_special_tokens=True
        )

    def state(self, block: int, step: int) -> torch.Tensor:
        """``(B, C)`` completion as the sampler fed it to the model at (block, step).

        Blocks before ``block`` are clean; inside ``block`` a position shows its token iff it was
        committed at a step ``< step`` (``-1`` = never committed -> ``[MASK]``); later blocks are masked.
        """
        positions = torch.arange(self.completion_ids.shape[1], device=self.completion_ids.device)
        block_of = block_index(positions, self.block_size)
        earlier = (block_of < block).unsqueeze(0)
        committed = (block_of == block).unsqueeze(0) & shown_at(self.step_map, step)
        return self.completion_ids.masked_fill(~(earlier | committed), self.mask_token_id)


# --------------------------------------------------------------------------------------------------
# Candidate proposal and commit selection (vectorised over rows and block positions)
# --------------------------------------------------------------------------------------------------


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering; filtered entries get ``-inf``. Always keeps the argmax."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) > top_p  # mass strictly before this entry
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _draw_candidates(logits: torch.Tensor, config: SamplerConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One candidate per position: argmax at temperature 0, else a draw from the filtered softmax."""
    if config.temperature == 0:
        return logits.argmax(-1)
    filtered = _filter_logits(logits / config.temperature, config.top_k, config.top_p)
    probs = filtered.softmax(-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


def _confidence(probs: torch.Tensor, candidates: torch.Tensor, kind: str) -> torch.Tensor:
    """Score of each candidate from the unfiltered distribution ``probs`` (see ``SamplerConfig.confidence``)."""
    if kind == "prob":
        return probs.gather(-1, candidates.unsqueeze(-1)).squeeze(-1)
    if kind == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # negative entropy


def _commit_mask(
    confidence: torch.Tensor, masked: torch.Tensor, step: int, config: SamplerConfig, steps: int, block_size: int
) -> torch.Tensor:
    """Which masked positions to commit at this step, ``(A, block_size)`` bool.

    The static schedule commits ``block_size // steps`` per step and everything left at the last step; the rule
    registered as ``config.commit_order`` decides which positions (and, dynamic, how many more). A rule that takes
    fewer than the schedule would leave the block undecoded, so it is refused here, naming the rule.
    """
    remaining = masked.sum(-1)
    per_step = block_size // steps
    count = remaining if step >= steps - 1 else remaining.clamp(max=per_step)
    commit = COMMIT_RULES[config.commit_order](confidence, masked, count, config) & masked
    if (commit.sum(-1) < count).any():
        raise ValueError(
            f"Commit rule {config.commit_order!r} committed fewer masked positions than the step's schedule "
            "(`count`: block_size // steps_per_block, all that remain at the block's last step); a rule must "
            "return at least `count` of the `masked` positions per row."
        )
    return commit


@register_commit_rule("confidence")
def _commit_by_confidence(
    confidence: torch.Tensor, masked: torch.Tensor, count: torch.Tensor, config: SamplerConfig
) -> torch.Tensor:
    """The most confident masked positions anywhere in the block (dynamic: also every one at or above the threshold).

    The dynamic count is the number of masked positions at or above ``threshold``, never below the static count.
    """
    score = confidence.masked_fill(~masked, float("-inf"))
    if config.remasking == "dynamic":
        above = ((score >= config.threshold) & masked).sum(-1)
        count = torch.maximum(count, above).minimum(masked.sum(-1))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(masked.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    return (rank < count.unsqueeze(-1)) & masked


@register_commit_rule("left_to_right")
def _commit_left_to_right(
    confidence: torch.Tensor, masked: torch.Tensor, count: torch.Tensor, config: SamplerConfig
) -> torch.Tensor:
    """From the block's frontier in reading order, so committed tokens always form a prefix of the block.

    The first ``count`` masked positions in reading order, then (dynamic) the unbroken run after them whose
    confidence reaches the threshold. Committed positions are skipped over, so the run is over masked ones;
    ``count >= 1`` whenever a mask is left, so the frontier is always committed. OPD's target at a masked position
    is the teacher's ``p_T(. | x_<i)``, which conditions on the left only: this order never commits right of a
    still-masked position, so every commit is one the training checks (static with one token a step = AR order).
    """
    reading_rank = masked.long().cumsum(-1) - 1  # 0 at the frontier, 1 at the next masked position, ...
    takes = ~masked | (reading_rank < count.unsqueeze(-1))
    if config.remasking == "dynamic":
        takes = takes | (confidence >= config.threshold)
    unbroken = takes.long().cumprod(-1).bool()
    return unbroken & masked


# --------------------------------------------------------------------------------------------------
# Forward strategies: exact KV cache, or the whole canvas each step
# --------------------------------------------------------------------------------------------------


class _CachedRunner:
    """Prefill once, then forward only the current block against a cropped-back ``DynamicCache``.

    The clean block ``b`` is committed to the cache by the first step of block ``b + 1``: one forward of
    ``[clean block b | masked block b+1]`` (block-causal, so the clean block never sees the masks),
    after which the masked half is cropped off. Its last clean logit is the shifted student's
    predictor of block ``b + 1``'s first token.
    """

    def __init__(self, model, prompt_ids, prompt_mask, block_size: int, mask_block_size: int | None, shift: bool):
        from transformers import DynamicCache

        self.model, self.block_size, self.mask_block_size, self.shift = model, block_size, mask_block_size, shift
        self.prompt_length = prompt_ids.shape[1]
        self.prompt_mask = prompt_mask
        self.cache = DynamicCache()
        self.pending: torch.Tensor | None = None
        out = self._forward(prompt_ids, prompt_mask, logits_to_keep=1)
        self.previous_logit = out.logits[:, -1]
        self.nfe = 1

    def _forward(self, input_ids, key_mask, logits_to_keep: int):
        return student_forward(
            self.model,
            input_ids,
            key_mask,
            block_size=self.mask_block_size,
            cache=self.cache,
            prompt_length=self.prompt_length,
            logits_to_keep=logits_to_keep,
        )

    def step(self, block: int, x: torch.Tensor) -> torch.Tensor:
        rows, width = x.shape
        ones = torch.ones((rows, (block + 1) * width), dtype=self.prompt_mask.dtype, device=x.device)
        key_mask = torch.cat([self.prompt_mask, ones], dim=1)
        if self.pending is not None:
            keep = logits_to_keep_for_block(width, self.shift)
            logits = self._forward(torch.cat([self.pending, x], dim=1), key_mask, keep).logits
            self.pending = None
            previous, logits = split_previous_logit(logits, self.shift)
            if previous is not None:  # the clean block's last logit predicts this block's first token
                self.previous_logit = previous
        else:
            logits = self._forward(x, key_mask, width).logits
        self.cache.crop(-width)
        self.nfe += 1
        return align_block_logits(logits, self.previous_logit if self.shift else None, self.shift)

    def block_done(self, x: torch.Tensor) -> None:
        self.pending = x

    def keep(self, index: torch.Tensor) -> None:
        self.cache.batch_select_indices(index)
        self.prompt_mask = self.prompt_mask[index]
        self.previous_logit = self.previous_logit[index]
        if self.pending is not None:
            self.pending = self.pending[index]


class _UncachedRunner:
    """Reference path: every step forwards ``[prompt | clean blocks | current block]`` from scratch.

    Later (all-mask) blocks are left out: under block-causal attention they cannot influence the
    current block. Only the last ``block_size (+1)`` logits are materialised (``logits_to_keep``).
    """

    def __init__(self, model, prompt_ids, prompt_mask, block_size: int, mask_block_size: int | None, shift: bool):
        self.model, self.block_size, self.mask_block_size, self.shift = model, block_size, mask_block_size, shift
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.clean = prompt_ids[:, :0]
        self.nfe = 0

    def step(self, block: int, x: torch.Tensor) -> torch.Tensor:
        canvas = torch.cat([self.prompt_ids, self.clean, x], dim=1)
        ones = torch.ones((x.shape[0], canvas.shape[1] - self.prompt_ids.shape[1]), dtype=self.prompt_mask.dtype)
        key_mask = torch.cat([self.prompt_mask, ones.to(x.device)], dim=1)
        keep = logits_to_keep_for_block(x.shape[1], self.shift)
        logits = student_forward(
            self.model,
            canvas,
            key_mask,
            block_size=self.mask_block_size,
            prompt_length=self.prompt_ids.shape[1],
            logits_to_keep=keep,
        ).logits
        self.nfe += 1
        previous, logits = split_previous_logit(logits, self.shift)
        return align_block_logits(logits, previous, self.shift)

    def block_done(self, x: torch.Tensor) -> None:
        self.clean = torch.cat([self.clean, x], dim=1)

    def keep(self, index: torch.Tensor) -> None:
        self.prompt_ids, self.prompt_mask, self.clean = (
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.clean[index],
        )


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


def _default_pad_id(model) -> int:
    config = unwrap_model(model).config
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError("The model config has neither pad_token_id nor eos_token_id: pass pad_token_id= to the sampler.")


class DiffusionSampler:
    """Confidence-based block-diffusion decoding of a converted student (docs/method.md §2).

    Args:
        config: a :class:`SamplerConfig` (default: static, greedy, one token per step).
        pad_token_id: id written where nothing was committed and used to left-pad prompts;
            default: the model config's pad id, else its EOS id. ``sample`` may override it.
        record_logits: keep a :class:`StepRecord` per denoising step in ``self.records`` (tests/debug;
            costs memory of ``(A, block_size, V)`` float32 per step).
    """

    def __init__(
        self, config: SamplerConfig | None = None, pad_token_id: int | None = None, record_logits: bool = False
    ):
        self.config = config or SamplerConfig()
        self.pad_token_id = pad_token_id
        self.record_logits = record_logits
        self.records: list[StepRecord] = []

    # ---- input preparation -------------------------------------------------------------------

    def _block_sizes(self, settings) -> tuple[int | None, bool]:
        """``(block size handed to the masks, whole_completion)``; ``None`` = one bidirectional block."""
        block_size = self.config.block_size if self.config.block_size is not None else settings.block_size
        return block_size, block_size is None

    def _completion_length(self, block_size: int | None) -> int:
        wanted = self.config.max_new_tokens
        rounded = round_up_to_block(wanted, block_size)
        if rounded != wanted:
            warnings.warn(
                f"max_new_tokens={wanted} is not a multiple of block_size={block_size}; decoding whole blocks, "
                f"i.e. {rounded} new tokens. Pass max_new_tokens={rounded} to silence this warning.",
                stacklevel=3,
            )
        return rounded

    def _prepare_prompts(
        self, prompts, attention_mask, block_size: int | None, pad_id: int, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(B, P)`` ids and mask with ``P`` a multiple of the block size."""
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(
                    f"prompts must be a (batch, length) LongTensor or a list of token lists, got {tuple(prompts.shape)}."
                )
            mask = torch.ones_like(prompts) if attention_mask is None else attention_mask.to(prompts.device).long()
            if mask.shape != prompts.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(mask.shape)} differs from prompts {tuple(prompts.shape)}."
                )
            if (mask[:, 1:] < mask[:, :-1]).any():
                raise ValueError(
                    "Prompt tensors must be LEFT-padded (attention_mask 0...0 1...1 per row); re-pad them."
                )
            ids = prompts.long().masked_fill(mask == 0, pad_id)
            ids, mask = widen_to_blocks(ids, mask, block_size, pad_id, "left")
        else:
            sequences = [list(map(int, p)) for p in prompts]
            if not sequences:
                raise ValueError("No prompts given.")
            ids, mask = pad_to_blocks(sequences, block_size, pad_id, "left")
        return ids.to(device), mask.to(device)

    def _check_lengths(self, model, prompt_mask: torch.Tensor, completion_length: int, shift: bool) -> None:
        lengths = prompt_mask.sum(-1)
        if prompt_mask.shape[0] == 0:
            raise ValueError("No prompts given.")
        empty = (lengths == 0).nonzero().flatten().tolist()
        if empty:
            why = (
                "the shifted student (shift=True) reads the first completion token from the logit of the last "
                "prompt token, so there must be one"
                if shift
                else "the unshifted student needs at least one real token (e.g. BOS) to condition on"
            )
            raise ValueError(f"Empty prompt in row(s) {empty}: {why}. Start every prompt with at least a BOS token.")
        limit = getattr(unwrap_model(model).config, "max_position_embeddings", None)
        longest = int(lengths.max())
        if limit is not None and longest + completion_length > limit:
            raise ValueError(
                f"Prompt ({longest} tokens) + {completion_length} new tokens exceeds the model's "
                f"max_position_embeddings={limit}. Shorten the prompt or lower max_new_tokens to "
                f"<= {limit - longest}."
            )

    # ---- decoding ----------------------------------------------------------------------------

    def sample(
        self,
        model: torch.nn.Module,
        prompts: torch.Tensor | Sequence[Sequence[int]],
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
    ) -> Rollout:
        """Decode a batch of prompts; see :class:`Rollout` for what comes back.

        ``prompts``: a left-padded ``(B, P)`` LongTensor with ``attention_mask`` (re-padded on the left
        when ``P`` is not a multiple of the block size) or a list of token-id lists. ``generator``
        seeds sampling at ``temperature > 0`` (it must live on the model's device).
        """
        settings = diffusion_settings(model)
        base = unwrap_model(model)
        parameter = next(base.parameters())
        mask_block_size, whole = self._block_sizes(settings)
        completion_length = self._completion_length(mask_block_size)
        block_size = completion_length if whole else mask_block_size
        steps = self.config.steps_per_block or block_size
        if steps > block_size:
            raise ValueError(
                f"steps_per_block={steps} exceeds block_size={block_size}: use steps_per_block <= block_size."
            )
        pad_id = pad_token_id if pad_token_id is not None else self.pad_token_id
        pad_id = _default_pad_id(model) if pad_id is None else int(pad_id)
        prompt_ids, prompt_mask = self._prepare_prompts(
            prompts, attention_mask, mask_block_size, pad_id, parameter.device
        )
        self._check_lengths(model, prompt_mask, completion_length, settings.shift)
        self.records = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), trainable_tokens_merged(model):
                return self._decode(
                    model, settings, prompt_ids, prompt_mask, completion_length, block_size, mask_block_size, steps,
                    pad_id, generator,
                )  # fmt: skip
        finally:
            model.train(was_training)

    def _propose(self, logits: torch.Tensor, settings, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates and their confidences for one block, from its aligned logits."""
        logits = restrict_to_teacher_vocab(logits.float(), settings.mask_token_id, settings.teacher_vocab_size)
        candidates = _draw_candidates(logits, self.config, generator)
        confidence = _confidence(logits.softmax(-1), candidates, self.config.confidence)
        return candidates, confidence

    def _decode(
        self, model, settings, prompt_ids, prompt_mask, completion_length, block_size, mask_block_size, steps, pad_id,
        generator,
    ) -> Rollout:  # fmt: skip
        config, mask_id, device = self.config, settings.mask_token_id, prompt_ids.device
        batch = prompt_ids.shape[0]
        n_blocks = blocks_needed(completion_length, block_size)
        width = n_blocks * block_size
        completion = torch.full((batch, width), mask_id, dtype=torch.long, device=device)
        step_map = torch.full_like(completion, -1)
        global_step_map = torch.full_like(completion, -1)
        decoded = torch.zeros_like(completion)
        block_steps = torch.zeros((batch, n_blocks), dtype=torch.long, device=device)
        stop_end = torch.full((batch,), -1, dtype=torch.long, device=device)  # exclusive end of a stopped row
        steps_before = torch.zeros(batch, dtype=torch.long, device=device)
        stop_ids = torch.tensor(config.stop_token_ids or (), dtype=torch.long, device=device)

        runner_cls = _CachedRunner if config.use_cache else _UncachedRunner
        runner = runner_cls(model, prompt_ids, prompt_mask, block_size, mask_block_size, settings.shift)
        rows = torch.arange(batch, device=device)
        synced = config.synced_ranks and distributed_world()
        for block in range(n_blocks):
            if rows.numel() == 0 and not synced:
                break
            span = slice(block * block_size, (block + 1) * block_size)
            decoded[rows, span] = 1
            x = torch.full((rows.numel(), block_size), mask_id, dtype=torch.long, device=device)
            step = 0
            while _keep_stepping(x, mask_id, synced):
                masked = x == mask_id
                if not masked.any():  # this rank is done; another is not: take part in its collectives
                    _idle_forward(model, prompt_ids)
                    continue
                logits = runner.step(block, x)
                if self.record_logits:
                    self.records.append(StepRecord(block, step, rows.clone(), logits.float().clone()))
                candidates, confidence = self._propose(logits, settings, generator)
                commit = _commit_mask(confidence, masked, step, config, steps, block_size)
                x = torch.where(commit, candidates, x)
                completion[rows, span] = x
                step_map[rows, span] = torch.where(commit, step, step_map[rows, span])
                global_step_map[rows, span] = torch.where(
                    commit, steps_before[rows, None] + step, global_step_map[rows, span]
                )
                block_steps[rows, block] += masked.any(-1).long()
                step += 1
                if stop_ids.numel():
                    stopped, end = _stopped_rows(x, stop_ids, mask_id)
                    if stopped.any():
                        stop_end[rows[stopped]] = block * block_size + end[stopped]
                        keep = (~stopped).nonzero().flatten()
                        rows, x = rows[keep], x[keep]
                        runner.keep(keep)
            steps_before[rows] += block_steps[rows, block]
            if rows.numel() and block + 1 < n_blocks:
                runner.block_done(x)

        return self._build_rollout(
            prompt_ids, prompt_mask, completion, decoded, step_map, global_step_map, block_steps, stop_end,
            runner.nfe, block_size, settings, pad_id,
        )  # fmt: skip

    @staticmethod
    def _build_rollout(
        prompt_ids, prompt_mask, completion, decoded, step_map, global_step_map, block_steps, stop_end, nfe,
        block_size, settings, pad_id,
    ) -> Rollout:  # fmt: skip
        width = completion.shape[1]
        positions = torch.arange(width, device=completion.device)
        end = torch.where(stop_end >= 0, stop_end, torch.full_like(stop_end, width))
        completion_mask = (positions[None, :] < end[:, None]).long()
        completion_ids = completion.masked_fill(step_map < 0, pad_id)
        committed = int((step_map >= 0).sum())
        total_steps = int(block_steps.sum())
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            decoded_mask=decoded,
            step_map=step_map,
            global_step_map=global_step_map,
            block_steps=block_steps,
            nfe=int(nfe),
            tokens_per_step=committed / max(total_steps, 1),
            finish_reason=["stop" if e >= 0 else "length" for e in stop_end.tolist()],
            block_size=block_size,
            shift=settings.shift,
            mask_token_id=settings.mask_token_id,
        )


def _keep_stepping(x: torch.Tensor, mask_id: int, synced: bool) -> bool:
    """Whether this block needs another step: on this rank, or (``synced``) on any rank."""
    local = bool((x == mask_id).any())
    return any_rank(local) if synced else local


def _idle_forward(model: torch.nn.Module, prompt_ids: torch.Tensor) -> None:
    """One forward that changes no state, so a finished rank issues the collectives of a busy rank's step.

    Under ZeRO-3 a forward all-gathers every layer's parameters whatever the input, so one token suffices.
    """
    model(input_ids=prompt_ids[:1, -1:], use_cache=False, logits_to_keep=1)


def _stopped_rows(x: torch.Tensor, stop_ids: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the current block holding a committed stop token with no ``[MASK]`` before it.

    Earlier blocks are fully committed and stop-free (a stop there would have ended the row), so
    looking inside the current block is enough. Returns ``(stopped (A,), block-local end (A,))``,
    ``end`` being one past the first such stop token.
    """
    masked = x == mask_id
    mask_before = (masked.long().cumsum(-1) - masked.long()) > 0
    hit = torch.isin(x, stop_ids) & ~masked & ~mask_before
    stopped = hit.any(-1)
    first = hit.long().argmax(-1)
    return stopped, first + 1


# --------------------------------------------------------------------------------------------------
# Text-level convenience
# --------------------------------------------------------------------------------------------------


def _as_id_list(value) -> list[int]:
    """An ``eos_token_id`` setting (None, an int or a list of ints) as a list."""
    if value is None:
        return []
    return [int(i) for i in value] if isinstance(value, (list, tuple)) else [int(value)]


def default_stop_token_ids(tokenizer, model: torch.nn.Module | None = None) -> list[int]:
    """The ids that end a completion, for training rollouts, generation and evaluation alike.

    The rule: the tokenizer's EOS, plus every EOS the model's ``generation_config`` declares (what TRL's
    ``DistillationTrainer.eos_token_ids`` and HF ``generate`` stop on; Qwen3 lists both ``<|im_end|>`` and
    ``<|endoftext|>`` there while its tokenizer's EOS is only ``<|im_end|>``), plus the usual end-of-turn
    tokens (:data:`DEFAULT_STOP_TOKENS`) that exist in the vocabulary. One rule everywhere keeps a student
    from being trained to stop where it is not stopped at evaluation, or the other way round.
    """
    ids = _as_id_list(tokenizer.eos_token_id)
    generation_config = getattr(unwrap_model(model), "generation_config", None) if model is not None else None
    if generation_config is not None:
        ids.extend(_as_id_list(generation_config.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[name] for name in DEFAULT_STOP_TOKENS if name in vocab)
    return sorted(set(ids))


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts_or_messages: Sequence,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    chat_template_kwargs: dict | str | None = None,
    **sampler_kwargs,
) -> list[str]:
    """Decode strings or chat conversations with the student; returns the completions' text.

    Prompts are rendered by :func:`opdlm_trl.data.render_prompts`, exactly as training rendered them;
    ``chat_template_kwargs`` are chat-template variables (e.g. ``{"enable_thinking": False}`` for Qwen3's
    non-thinking mode). ``sampler_kwargs`` are :class:`SamplerConfig` fields plus ``pad_token_id``.
    ``stop_token_ids`` defaults to :func:`default_stop_token_ids`; ``pad_token_id`` to the tokenizer's.
    """
    from .data import render_prompts

    names = {f.name for f in fields(SamplerConfig)}
    unknown = set(sampler_kwargs) - names - {"pad_token_id"}
    if unknown:
        raise TypeError(f"Unknown sampler argument(s) {sorted(unknown)}; valid: {sorted(names | {'pad_token_id'})}.")
    pad_id = sampler_kwargs.pop("pad_token_id", None)
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    if sampler_kwargs.get("stop_token_ids") is None:
        sampler_kwargs["stop_token_ids"] = default_stop_token_ids(tokenizer, model)
    sampler = DiffusionSampler(SamplerConfig(**sampler_kwargs), pad_token_id=pad_id)
    encoded = render_prompts(prompts_or_messages, tokenizer, chat_template_kwargs)
    size = batch_size or max(len(encoded), 1)
    chunks = [encoded[i : i + size] for i in range(0, len(encoded), size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="generate", unit="batch")
    texts: list[str] = []
    for chunk in chunks:
        texts.extend(sampler.sample(model, chunk, generator=generator).texts(tokenizer))
    return texts
