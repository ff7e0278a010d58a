"""Per-position distillation and diffusion losses (docs/method.md §3, §5), as pure tensor functions.

Every function takes tensors already *gathered* at the supervised positions: ``N`` rows, one per
supervised (row, position) pair of the batch. None of them calls a model.

Conventions shared by all functions:

* ``student_logits`` is ``(N, V_S)`` in any dtype; it is normalised in float32 over the student's
  full vocabulary ``V_S``. The caller has already applied
  :func:`opdlm_trl.modeling.suppress_mask_logit`, so the ``[MASK]`` column holds ``finfo.min`` and
  gets probability exactly 0. We deliberately do *not* slice the logits to the teacher's ``V_T``
  before normalising: :func:`opdlm_trl.modeling.to_diffusion` only ever grows the vocabulary by the
  mask row, so normalising over ``V_S`` with that column at ``finfo.min`` equals normalising over
  ``V_T`` (``exp(finfo.min - max) == 0`` in float32) while keeping ``V_S``-wide ids valid (the mask
  id may be ``>= V_T``). Columns ``>= V_T`` must carry no probability; a model whose extra rows are
  live would need them suppressed the same way.
* Teacher log-probs (``(N, V_T)`` full, or ``(N, k)`` top-k ids and log-probs) are normalised over
  the teacher's full vocabulary (docs/method.md §3). ``-inf`` entries are allowed: in a top-k list they mark
  padding (a teacher that returned fewer than ``k`` entries) and contribute nothing; in a full row
  they are an impossible token. They are clamped to ``finfo(float32).min`` so that ``0 * (a - b)``
  terms and their gradients stay finite.
* A ``finfo.min`` student column is harmless: every term that multiplies a log-probability does so
  by a probability that is exactly 0 there, and gradients stay finite (tested).

Top-k divergences follow the method's formula, both distributions normalised over the full
vocabulary and *not* renormalised over the top-k. With ``tail_bucket=True`` the leftover mass
``1 - sum_topk p`` of each side is one more category; the result is then the exact divergence
between the two (k+1)-category coarsenings, which is >= 0 and (data processing inequality) <= the
full-vocabulary divergence.

Memory: a full-vocabulary loss keeps a few ``(N, V)`` float32 tensors for autograd. :func:`chunked`
evaluates any per-position loss over row chunks under activation checkpointing, which bounds those
to one chunk (the recomputation costs one extra loss forward, negligible next to the model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from .registry import register

if TYPE_CHECKING:
    from .batch import SupervisedRows

__all__ = [
    "DIVERGENCES",
    "MDLM_WEIGHTINGS",
    "NORMALIZATIONS",
    "DivergenceFn",
    "chunked",
    "divergence",
    "forward_kl",
    "generalized_jsd",
    "mdlm_loss",
    "mdlm_reduce",
    "normaliser_count",
    "reduce_loss",
    "register_divergence",
    "reverse_kl",
    "student_log_probs",
    "student_token_log_probs",
    "token_policy_gradient",
    "top1_matches",
]

MDLM_WEIGHTINGS = ("inverse_t", "uniform")
NORMALIZATIONS = ("sequence", "token")

_FLOOR = torch.finfo(torch.float32).min
# Largest log-mass treated as "everything": keeps log(1 - mass) finite when a top-k list covers
# (numerically) the whole distribution; the tail is then ~1e-6 on both sides and contributes ~0.
_LOG_MASS_CAP = -1e-6


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------


def student_log_probs(student_logits: torch.Tensor) -> torch.Tensor:
    """``(N, V_S)`` float32 log-probabilities of the student over its full vocabulary."""
    return torch.log_softmax(student_logits, dim=-1, dtype=torch.float32)


def _student_gather(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log p_S`` at ``ids`` (``(N,)`` or ``(N, k)``) without materialising a log-softmax.

    ``logit - logsumexp(logits)`` is exactly the log-softmax entry; autograd keeps only the float32
    logits (no copy when they already are float32) instead of a second ``(N, V)`` output.
    """
    logits = student_logits.float()
    squeeze = ids.dim() == 1
    index = ids.long().unsqueeze(-1) if squeeze else ids.long()
    picked = logits.gather(-1, index) - torch.logsumexp(logits, dim=-1, keepdim=True)
    return picked.squeeze(-1) if squeeze else picked


def student_token_log_probs(student_logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``(N,)`` float32 ``log p_S(token_ids)`` normalised over the student's full vocabulary."""
    _check_rows(student_logits, token_ids=token_ids)
    return _student_gather(student_logits, token_ids)


def _teacher(logprobs: torch.Tensor) -> torch.Tensor:
    """Teacher log-probs as float32 with ``-inf`` clamped to ``finfo.min`` (see module docstring)."""
    return logprobs.float().clamp_min(_FLOOR)


def _log1mexp(log_mass: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for a log-mass ``x <= 0``, stable at both ends (Maechler's switch)."""
    x = log_mass.clamp(max=_LOG_MASS_CAP)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ----------------------------------------------------------------------------------------------
# The categorical support a divergence is evaluated on
# ----------------------------------------------------------------------------------------------


def _check_rows(student_logits: torch.Tensor, **others: torch.Tensor | None) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be gathered to (N, V), got shape {tuple(student_logits.shape)}.")
    rows = student_logits.shape[0]
    for name, tensor in others.items():
        if tensor is not None and (tensor.dim() == 0 or tensor.shape[0] != rows):
            raise ValueError(f"{name} must have {rows} rows (one per supervised position), got {tuple(tensor.shape)}.")


def _support(
    student_logits: torch.Tensor,
    teacher_full_logprobs: torch.Tensor | None,
    teacher_top_ids: torch.Tensor | None,
    teacher_top_logprobs: torch.Tensor | None,
    tail_bucket: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Student and teacher log-probs on the categories a divergence sums over, and which are real.

    Full vocabulary: ``(N, V_T)`` both, no validity mask. Top-k: ``(N, k)`` (``k + 1`` with the tail
    bucket, whose log-masses are ``log(1 - sum_topk p)`` of each side), validity = not padding.
    """
    _check_rows(
        student_logits,
        teacher_full_logprobs=teacher_full_logprobs,
        teacher_top_ids=teacher_top_ids,
        teacher_top_logprobs=teacher_top_logprobs,
    )
    vocab = student_logits.shape[-1]
    if teacher_full_logprobs is not None:
        if teacher_top_ids is not None or teacher_top_logprobs is not None:
            raise ValueError("Pass either teacher_full_logprobs or teacher_top_ids/teacher_top_logprobs, not both.")
        if teacher_full_logprobs.shape[-1] > vocab:
            raise ValueError(
                f"Teacher vocabulary {teacher_full_logprobs.shape[-1]} exceeds the student's {vocab}: the student "
                "must contain the teacher's vocabulary (convert it with opdlm_trl.to_diffusion)."
            )
        teacher_vocab = teacher_full_logprobs.shape[-1]
        return student_log_probs(student_logits)[:, :teacher_vocab], _teacher(teacher_full_logprobs), None
    if teacher_top_ids is None or teacher_top_logprobs is None:
        raise ValueError("Pass teacher_full_logprobs, or both teacher_top_ids and teacher_top_logprobs.")
    if teacher_top_ids.shape != teacher_top_logprobs.shape or teacher_top_ids.dim() != 2:
        raise ValueError(
            f"teacher_top_ids {tuple(teacher_top_ids.shape)} and teacher_top_logprobs "
            f"{tuple(teacher_top_logprobs.shape)} must both be (N, k)."
        )
    if teacher_top_ids.numel() and int(teacher_top_ids.max()) >= vocab:
        raise ValueError(f"A teacher top-k id is >= the student vocabulary size {vocab}.")
    valid = teacher_top_logprobs > float("-inf")
    student = _student_gather(student_logits, teacher_top_ids)
    teacher = _teacher(teacher_top_logprobs)
    if not tail_bucket:
        return student, teacher, valid
    student_tail = _log1mexp(torch.logsumexp(student.masked_fill(~valid, _FLOOR), dim=-1, keepdim=True))
    teacher_tail = _log1mexp(torch.logsumexp(teacher, dim=-1, keepdim=True))
    always = torch.ones_like(valid[:, :1])
    return (
        torch.cat([student, student_tail], dim=-1),
        torch.cat([teacher, teacher_tail], dim=-1),
        torch.cat([valid, always], dim=-1),
    )


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``sum p (log p - log q)`` over the last dim, restricted to ``valid`` categories."""
    terms = log_p.exp() * (log_p - log_q)
    if valid is not None:
        terms = terms.masked_fill(~valid, 0.0)
    return terms.sum(-1)


# ----------------------------------------------------------------------------------------------
# Divergences
# ----------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: torch.Tensor,
    teacher_full_logprobs: torch.Tensor | None = None,
    teacher_top_ids: torch.Tensor | None = None,
    teacher_top_logprobs: torch.Tensor | None = None,
    tail_bucket: bool = False,
) -> torch.Tensor:
    """``KL(p_T || p_S)`` per position, ``(N,)`` float32 (the paper's divergence, docs/method.md §3).

    Full vocabulary: ``sum_v p_T(v) (log p_T(v) - log p_S(v))``. Top-k: the same sum over the
    teacher's top-k ids only (not renormalised; it can be slightly negative, its gradient is the
    full one restricted to the top-k). ``tail_bucket`` adds ``q_T (log q_T - log q_S)`` with
    ``q = 1 - sum_topk p``; it has no effect with the full vocabulary.
    """
    student, teacher, valid = _support(
        student_logits, teacher_full_logprobs, teacher_top_ids, teacher_top_logprobs, tail_bucket
    )
    return _kl_terms(teacher, student, valid)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_full_logprobs: torch.Tensor | None = None,
    teacher_top_ids: torch.Tensor | None = None,
    teacher_top_logprobs: torch.Tensor | None = None,
    tail_bucket: bool = False,
) -> torch.Tensor:
    """``KL(p_S || p_T)`` per position, ``(N,)`` float32.

    Top-k is an approximation: the exact reverse KL sums over the *student's* support, and the
    student's mass outside the teacher's top-k (where the teacher is least likely, so where the
    reverse KL penalises most) is invisible to the top-k sum. ``tail_bucket`` accounts for it as one
    category, ``q_S (log q_S - log q_T)``, a lower bound of the missing part (log-sum inequality).
    """
    student, teacher, valid = _support(
        student_logits, teacher_full_logprobs, teacher_top_ids, teacher_top_logprobs, tail_bucket
    )
    return _kl_terms(student, teacher, valid)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_full_logprobs: torch.Tensor | None = None,
    teacher_top_ids: torch.Tensor | None = None,
    teacher_top_logprobs: torch.Tensor | None = None,
    beta: float = 0.5,
    tail_bucket: bool = False,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence in TRL's convention, ``(N,)`` float32.

    With the mixture ``m = (1 - beta) p_S + beta p_T``:
    ``JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)``. As in TRL
    (``GKDTrainer.generalized_jsd_loss``, ``DistillationTrainer``), the endpoints are special-cased:
    ``beta = 0`` is the forward KL ``KL(p_T || p_S)`` and ``beta = 1`` the reverse KL
    ``KL(p_S || p_T)`` (the mixture formula itself tends to 0 at both ends, so it is not continuous
    there). Top-k and tail bucket as in :func:`forward_kl`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}.")
    full, ids, top = teacher_full_logprobs, teacher_top_ids, teacher_top_logprobs
    if beta == 0.0:
        return forward_kl(student_logits, full, ids, top, tail_bucket)
    if beta == 1.0:
        return reverse_kl(student_logits, full, ids, top, tail_bucket)
    student, teacher, valid = _support(student_logits, full, ids, top, tail_bucket)
    mixture = torch.logaddexp(student + math.log1p(-beta), teacher + math.log(beta))
    return beta * _kl_terms(teacher, mixture, valid) + (1.0 - beta) * _kl_terms(student, mixture, valid)


def token_policy_gradient(
    student_logits: torch.Tensor, token_ids: torch.Tensor, teacher_token_logprobs: torch.Tensor
) -> torch.Tensor:
    """Sampled-token on-policy distillation loss (Tinker / MiniLLM form), ``(N,)`` float32.

    Per-token reward ``r = log p_T(x) - log p_S(x)`` (detached) for the committed token ``x``;
    loss ``-r * log p_S(x)`` (REINFORCE). Its value is not a divergence, but for ``x ~ p_S`` the
    expected gradient, ``-E[r grad log p_S(x)]``, equals the gradient of ``KL(p_S || p_T)`` (the
    ``E[grad log p_S] = 0`` term drops out). It needs only the teacher's log-prob of the sampled
    token. Caveat: rollout tokens were drawn from the *visited-state* distribution at sampling time,
    which is on-policy for the state the loss is evaluated on only up to staleness within a step.
    """
    _check_rows(student_logits, token_ids=token_ids, teacher_token_logprobs=teacher_token_logprobs)
    student = _student_gather(student_logits, token_ids)
    reward = (_teacher(teacher_token_logprobs) - student).detach()
    return -reward * student


def mdlm_loss(
    student_logits: torch.Tensor,
    token_ids: torch.Tensor,
    mask_rate_per_position: torch.Tensor | float,
    weighting: str = "inverse_t",
) -> torch.Tensor:
    """MDLM / BD3LM objective per masked position, ``(N,)`` float32: ``-log p_S(x0_i) * w``.

    ``w = 1 / t`` (``"inverse_t"``; ``t`` is the masking rate of the position's sequence or block,
    :attr:`opdlm_trl.states.TrainingStates.position_rate`) or ``1`` (``"uniform"``).
    """
    if weighting not in MDLM_WEIGHTINGS:
        raise ValueError(f"Unknown MDLM weighting {weighting!r}; choose one of {MDLM_WEIGHTINGS}.")
    _check_rows(student_logits, token_ids=token_ids)
    nll = -_student_gather(student_logits, token_ids)
    if weighting == "uniform":
        return nll
    rate = torch.as_tensor(mask_rate_per_position, dtype=torch.float32, device=nll.device)
    if rate.numel() and bool((rate <= 0).any()):
        raise ValueError("mask rates must be > 0 for the 1/t weighting (draw t from U(eps, 1) with eps > 0).")
    return nll / rate


# ----------------------------------------------------------------------------------------------
# The registry of per-position losses a distillation trainer may pick (``OPDConfig.loss_type``)
# ----------------------------------------------------------------------------------------------

DivergenceFn = Callable[[torch.Tensor, "SupervisedRows", Any], torch.Tensor]
"""A registered loss: ``(student_logits, rows, args) -> (n,)`` float32, one value per supervised position.

``student_logits`` is an ``(n, V_S)`` chunk (``[MASK]`` suppressed), ``rows`` the matching
:class:`opdlm_trl.batch.SupervisedRows` (teacher targets in ``rows.targets``, committed tokens in ``rows.tokens``),
``args`` the trainer's config (options such as ``beta`` or ``tail_bucket``). One signature for every loss, so the
trainer calls whichever name ``loss_type`` holds without knowing what it reads.
"""

# name -> loss. OPDConfig checks ``loss_type`` against it when a config is made, the trainer looks the name up, and
# the config's help text lists it: a loss registered here (from any module) needs no other change.
DIVERGENCES: dict[str, DivergenceFn] = {}


def register_divergence(name: str, fn: DivergenceFn | None = None, *, replace: bool = False):
    """Make ``name`` a valid ``loss_type`` computed by ``fn`` (a :data:`DivergenceFn`).

    Call it directly, ``register_divergence("mine", fn)``, or as a decorator, ``@register_divergence("mine")``;
    register before the ``OPDConfig`` is made (its check reads the registry). The function's first docstring line
    is its summary in ``--help``. A second function under a taken name is refused unless ``replace=True``, so two
    modules cannot silently shadow each other.
    """

    def add(function: DivergenceFn) -> DivergenceFn:
        if not callable(function):
            raise TypeError(f"register_divergence({name!r}) needs a callable, got {type(function).__name__}.")
        return register(DIVERGENCES, name, function, "loss", replace)

    return add if fn is None else add(fn)


def divergence(name: str) -> DivergenceFn:
    """The registered loss called ``name``; an unknown name raises, listing the registered ones."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"loss_type={name!r} is not a registered loss; registered: {tuple(DIVERGENCES)} "
            "(add one with opdlm_trl.losses.register_divergence)."
        ) from None


def _teacher_arguments(rows: SupervisedRows, args) -> dict[str, Any]:
    """The divergences' teacher arguments from a chunk's targets (full vocabulary or top-k) and the config."""
    targets = rows.targets
    return dict(
        teacher_full_logprobs=targets.get("full_logprobs"),
        teacher_top_ids=targets.get("top_ids"),
        teacher_top_logprobs=targets.get("top_logprobs"),
        tail_bucket=args.tail_bucket,
    )


@register_divergence("forward_kl")
def _forward_kl_loss(student_logits: torch.Tensor, rows: SupervisedRows, args) -> torch.Tensor:
    """KL(p_T || p_S), the paper's divergence, over the full vocabulary or the teacher's top-k."""
    return forward_kl(student_logits, **_teacher_arguments(rows, args))


@register_divergence("reverse_kl")
def _reverse_kl_loss(student_logits: torch.Tensor, rows: SupervisedRows, args) -> torch.Tensor:
    """KL(p_S || p_T), mode seeking; over the teacher's top-k an approximation."""
    return reverse_kl(student_logits, **_teacher_arguments(rows, args))


@register_divergence("jsd")
def _jsd_loss(student_logits: torch.Tensor, rows: SupervisedRows, args) -> torch.Tensor:
    """generalised JSD interpolated by `beta`, TRL's convention: 0 = forward KL, 1 = reverse KL."""
    return generalized_jsd(student_logits, beta=args.beta, **_teacher_arguments(rows, args))


@register_divergence("token_pg")
def _token_pg_loss(student_logits: torch.Tensor, rows: SupervisedRows, args) -> torch.Tensor:
    """sampled-token policy gradient with reward log p_T - log p_S; needs only the committed token's log-prob."""
    return token_policy_gradient(student_logits, rows.tokens, rows.targets.get("token_logprobs"))


# ----------------------------------------------------------------------------------------------
# Reduction and metrics
# ----------------------------------------------------------------------------------------------


def reduce_loss(
    per_position: torch.Tensor,
    row_index: torch.Tensor,
    num_rows: int,
    normalization: str = "sequence",
    num_items_in_batch: torch.Tensor | int | None = None,
    num_rows_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Scalar loss from per-position values; ``row_index[n]`` is the batch row of position ``n``.

    * ``"sequence"`` (reference code, docs/method.md §4): each row's sum / its supervised count, then the
      mean over rows with >= 1 supervised position. Under gradient accumulation pass
      ``num_rows_in_batch`` = the number of such rows in the *whole* accumulated batch (across the
      processes the gradients are averaged over, scaled as the caller's trainer expects): the
      micro-batch then returns ``sum(row means) / num_rows_in_batch``, and the accumulated
      gradient equals that of the mean over all rows.
    * ``"token"``: ``sum / (num_items_in_batch or N)``, the global token mean; correct under
      accumulation when ``num_items_in_batch`` counts the supervised tokens of the accumulated batch.

    A batch without supervised positions returns a zero that is still connected to the graph.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown loss normalization {normalization!r}; choose one of {NORMALIZATIONS}.")
    if per_position.shape != row_index.shape or per_position.dim() != 1:
        raise ValueError(
            f"per_position {tuple(per_position.shape)} and row_index {tuple(row_index.shape)} must both be (N,)."
        )
    values = per_position.float()
    if normalization == "token":
        denominator = values.shape[0] if num_items_in_batch is None else num_items_in_batch
        denominator = torch.as_tensor(denominator, dtype=torch.float32, device=values.device).clamp(min=1)
        return values.sum() / denominator
    index = row_index.long()
    row_sum = torch.zeros(num_rows, dtype=torch.float32, device=values.device).index_add(0, index, values)
    count = torch.bincount(index, minlength=num_rows).to(values.device)
    if count.shape[0] > num_rows:
        raise ValueError(f"row_index holds a row >= num_rows={num_rows}.")
    row_mean = row_sum / count.clamp(min=1)
    present = count > 0
    denominator = present.sum() if num_rows_in_batch is None else num_rows_in_batch
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=values.device).clamp(min=1)
    return row_mean.masked_fill(~present, 0.0).sum() / denominator


def mdlm_reduce(
    per_position: torch.Tensor,
    row_index: torch.Tensor,
    row_tokens: torch.Tensor,
    normalization: str = "sequence",
    normaliser: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """MDLM loss from weighted per-position NLLs: each row's sum divided by its *completion length*.

    Why not :func:`reduce_loss`: MDLM's ``1/t`` weight already turns the sum over the ~``t L`` masked
    positions into an unbiased estimate of the sum over all ``L`` tokens; dividing by the masked count
    instead would weight every row by ``1/t`` twice. ``"sequence"``: mean over rows of ``sum_row / L_row``;
    ``"token"``: ``sum / sum_rows L_row``. ``normaliser`` replaces the number of rows (``sequence``) or of
    completion tokens (``token``) for gradient accumulation over a larger batch (:func:`normaliser_count`
    of ``row_tokens`` over that batch).
    """
    values = per_position.float()
    tokens = row_tokens.float().clamp(min=1)
    if normalization == "token":
        denominator = tokens.sum() if normaliser is None else normaliser
        return values.sum() / torch.as_tensor(denominator, dtype=torch.float32, device=values.device).clamp(min=1)
    per_row = values / tokens[row_index]
    denominator = (row_tokens > 0).sum() if normaliser is None else normaliser
    return per_row.sum() / torch.as_tensor(denominator, dtype=torch.float32, device=values.device).clamp(min=1)


def normaliser_count(per_row: torch.Tensor, normalization: str) -> torch.Tensor:
    """What a reduction divides by, for rows holding ``per_row`` counted items each (0-d long tensor).

    ``"token"``: all items; ``"sequence"``: the rows with at least one item. The trainers count it once over the
    whole generation batch (every accumulation step, every process) and pass it to :func:`reduce_loss` /
    :func:`mdlm_reduce` of each micro-batch, so the accumulated gradient is that of the whole batch's mean.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown loss normalization {normalization!r}; choose one of {NORMALIZATIONS}.")
    return per_row.sum() if normalization == "token" else (per_row > 0).sum()


def top1_matches(
    student_logits: torch.Tensor,
    teacher_top_ids: torch.Tensor | None = None,
    teacher_top_logprobs: torch.Tensor | None = None,
    teacher_full_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N,)`` bool: the student's argmax equals the teacher's most likely token (a metric; no grad).

    Per position, from logits; the trainer logs its mean as ``agreement``. Not
    :func:`opdlm_trl.eval.metrics.top1_agreement`, the pooled fraction of *generated* tokens equal to the teacher's
    top-1, which needs no student logits.

    With top-k targets the teacher's top-1 is the id of the largest ``teacher_top_logprobs`` entry
    (the list need not be sorted); without log-probs, column 0 of ``teacher_top_ids``.
    """
    _check_rows(student_logits, teacher_top_ids=teacher_top_ids, teacher_full_logprobs=teacher_full_logprobs)
    with torch.no_grad():
        student_top = student_logits.argmax(-1)
        if teacher_full_logprobs is not None:
            teacher_top = teacher_full_logprobs.argmax(-1)
        elif teacher_top_ids is not None:
            if teacher_top_logprobs is None:
                teacher_top = teacher_top_ids[:, 0]
            else:
                teacher_top = teacher_top_ids.gather(-1, teacher_top_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
        else:
            raise ValueError("Pass teacher_top_ids (optionally with teacher_top_logprobs) or teacher_full_logprobs.")
        return student_top == teacher_top.to(student_top.device)


def chunked(loss_fn: Callable[..., torch.Tensor], *args, chunk_size: int = 1024, **kwargs) -> torch.Tensor:
    """Evaluate a per-position loss ``loss_fn(*args, **kwargs) -> (N,)`` over row chunks.

    Every tensor argument whose first dimension is ``N`` (the first tensor argument's) is sliced;
    everything else is passed unchanged. When gradients are needed each chunk runs under
    non-reentrant activation checkpointing: its ``(chunk, V)`` float32 intermediates are freed after
    the forward and recomputed in the backward, so only one chunk's worth is alive at a time (plain
    chunking without checkpointing would not help: autograd would keep every chunk's intermediates
    until the backward). Values and gradients equal the unchunked call's.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors:
        raise ValueError("chunked needs at least one tensor argument.")
    rows = tensors[0].shape[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def piece(value, start: int):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return value[start : start + chunk_size]
        return value

    outputs = []
    for start in range(0, rows, chunk_size):
        chunk_args = [piece(a, start) for a in args]
        chunk_kwargs = {k: piece(v, start) for k, v in kwargs.items()}
        if needs_grad:
            outputs.append(checkpoint(loss_fn, *chunk_args, use_reentrant=False, **chunk_kwargs))
        else:
            outputs.append(loss_fn(*chunk_args, **chunk_kwargs))
    if not outputs:
        return loss_fn(*args, **kwargs)
    return torch.cat(outputs)
