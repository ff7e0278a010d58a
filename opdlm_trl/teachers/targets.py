"""Teacher targets: what every teacher backend returns, and the parsing the vLLM backends share.

For ``x0 = prompt + completion`` the target of completion position ``i`` is ``p_T(. | prompt, x0_<i)``
(docs/method.md §3). This module holds the result type (:class:`TeacherTargets`), the protocol a backend
implements (:class:`Teacher`), the base class of the registered backends with their capabilities and what the
factory hands their builder (:class:`TeacherBackend`, :class:`TeacherContext`), the batch layout every backend refuses to guess about (:func:`check_batch`), the
one rule for which ids a teacher must never return (:func:`excluded_token_ids`), and the conversion of vLLM's
per-position ``{token id: logprob}`` maps into targets (:func:`targets_from_logprob_maps`). It imports only torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from ..modeling import DiffusionSettings

__all__ = [
    "Teacher",
    "TeacherBackend",
    "TeacherContext",
    "TeacherServerError",
    "TeacherTargets",
    "check_batch",
    "empty_targets",
    "excluded_token_ids",
    "real_sequences",
    "targets_from_logprob_maps",
]


@dataclass
class TeacherTargets:
    """Teacher targets for a ``(B, C)`` completion batch; positions where ``mask`` is False hold zeros.

    Attributes:
        token_logprobs: ``(B, C)`` float32, ``log p_T(x0_i | prompt, x0_<i)`` of the committed token
            (what the sampled-token policy-gradient loss needs).
        top_ids: ``(B, C, k)`` teacher top-k token ids, descending, or None.
        top_logprobs: ``(B, C, k)`` float32 log-probs of ``top_ids``, normalised over the FULL
            vocabulary (never renormalised over the k), or None.
        full_logprobs: ``(B, C, V_T)`` float32 full distribution, or None. A teacher that can apply its output
            head later returns ``hidden`` instead (what the trainer holds); :meth:`dense_log_probs` gives the full
            distribution either way.
        mask: ``(B, C)`` bool, True where a target exists (the completion mask).
        hidden: ``(B, C, H_T)`` the teacher's final hidden state predicting each completion position (full-vocabulary
            targets of a local / shared-weights teacher), or None. ``O(H)`` per position instead of ``O(V)``: 4 KB
            instead of 608 KB per token for Qwen3-0.6B; the loss applies ``head`` to it a chunk at a time.
        head: the :class:`opdlm_trl.heads.OutputHead` that turns ``hidden`` into the teacher's log-probs (not a
            tensor: it stays with the trainer's teacher and never travels through TRL's batch dict).
    """

    token_logprobs: torch.Tensor
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    full_logprobs: torch.Tensor | None
    mask: torch.Tensor
    hidden: torch.Tensor | None = None
    head: Any = field(default=None, compare=False, repr=False)

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> TeacherTargets:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(
            self, **{name: function(value) for name, value in values.items() if isinstance(value, torch.Tensor)}
        )

    @torch.no_grad()
    def dense_log_probs(self) -> torch.Tensor | None:
        """``(B, C, V_T)`` full-vocabulary log-probs (zeros where ``mask`` is False), from ``hidden`` if needed.

        Materialises ``O(V)`` per position: for evaluation, tests and small batches, never for a training batch.
        """
        if self.full_logprobs is not None or self.hidden is None:
            return self.full_logprobs
        where = self.mask.bool()
        dense = self.hidden.new_zeros((*where.shape, self.head.vocab_size), dtype=torch.float32)
        dense[where] = self.head.log_probs(self.hidden[where])
        return dense

    def to(self, device: torch.device | str) -> TeacherTargets:
        """Move every tensor (e.g. CPU targets from a server to the student's device)."""
        return self._map(lambda tensor: tensor.to(device))

    def select(self, index: int | slice | Sequence[int] | torch.Tensor) -> TeacherTargets:
        """Rows ``index`` of every tensor (micro-batching); an int keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        elif not isinstance(index, slice | torch.Tensor):
            index = torch.as_tensor(index, dtype=torch.long)
        return self._map(lambda tensor: tensor[index])

    __getitem__ = select

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def top_k(self) -> int | None:
        return None if self.top_ids is None else self.top_ids.shape[-1]


@runtime_checkable
class Teacher(Protocol):
    """Anything that scores ``prompt + completion`` batches into :class:`TeacherTargets`."""

    def score(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        top_k: int | None,
    ) -> TeacherTargets: ...


@dataclass(frozen=True)
class TeacherContext:
    """What the factory knows when it builds any backend (:meth:`TeacherBackend.from_context`).

    Attributes:
        student: the converted student (supplies the mask token and ``V_T``), or None.
        model: the teacher model object or path given to the trainer / factory, or None.
        tokenizer: the student's tokenizer, or None.
        top_k: the configured ``teacher_top_k`` (None: full vocabulary).
        settings: the student's :class:`~opdlm_trl.modeling.DiffusionSettings`, or None without a student.
        exclude_token_ids: ids a teacher must never return as a target (:func:`excluded_token_ids`).
        prepare_model: wraps a frozen local model for the trainer's accelerator (ZeRO inference, device), or None.
    """

    student: torch.nn.Module | None = None
    model: torch.nn.Module | str | None = None
    tokenizer: Any = None
    top_k: int | None = None
    settings: DiffusionSettings | None = None
    exclude_token_ids: tuple[int, ...] = ()
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None


class TeacherBackend:
    """Base class of a registered teacher backend (:func:`opdlm_trl.teachers.register_teacher`).

    Its class attributes are what the trainer and the config need to know about a backend before or without
    scoring, so that no caller tests a backend's type or name:

    * ``scores_padded_batch``: :meth:`score` runs one padded forward over the batch, so the trainer may split a
      batch into row groups of similar length (exact, less padding). False for a backend that sends each row
      unpadded anyway (vLLM): one call.
    * ``full_vocabulary``: it can return full-vocabulary targets (``top_k=None``); without, the config requires
      ``teacher_top_k``.
    * ``needs_teacher_model``: it scores a separate copy of the original model, which the trainer takes (a frozen
      copy of the student before conversion) when none is given.
    * ``option_fields``: ``{build_teacher keyword: OPDConfig field}``, the config fields the backend is built with
      (:meth:`opdlm_trl.OPDConfig.teacher_options`).

    :meth:`causal_lm` says whether the teacher can also *write* (its own greedy answers, the AR reference row of
    :func:`opdlm_trl.eval.evaluate_model`) or only scores.
    """

    scores_padded_batch: ClassVar[bool] = False
    full_vocabulary: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = False
    option_fields: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_context(cls, context: TeacherContext, **options: Any) -> Teacher:
        """Build the backend from what the factory knows and its options (default: ``cls(**options)``)."""
        return cls(**options)

    def causal_lm(self) -> contextlib.AbstractContextManager[torch.nn.Module | None]:
        """A context yielding the teacher as an HF causal LM that can ``generate`` its own answers, or None (the
        default) for a backend that only scores, such as a vLLM server."""
        return contextlib.nullcontext()


class TeacherServerError(RuntimeError):
    """The vLLM server is unreachable, kept failing, or answered something unusable."""


def check_batch(prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> None:
    """Refuse layouts the alignment silently depends on: left-padded prompts, right-padded completions."""
    if completion_ids.shape != completion_mask.shape or prompt_mask.shape[0] != completion_mask.shape[0]:
        raise ValueError(
            f"Shape mismatch: prompt_mask {tuple(prompt_mask.shape)}, completion_ids {tuple(completion_ids.shape)}, "
            f"completion_mask {tuple(completion_mask.shape)}."
        )
    prompt_mask, completion_mask = prompt_mask.long(), completion_mask.long()
    if (prompt_mask[:, 1:] < prompt_mask[:, :-1]).any():
        raise ValueError("prompt_mask must be LEFT-padded (zeros before the real prompt tokens).")
    if (completion_mask[:, 1:] > completion_mask[:, :-1]).any():
        raise ValueError("completion_mask must be RIGHT-padded (real completion tokens first, then zeros).")
    if ((prompt_mask.sum(1) == 0) & (completion_mask.sum(1) > 0)).any():
        raise ValueError("A row has completion tokens but an empty prompt: a causal teacher cannot predict token 0.")


def empty_targets(
    completion_mask: torch.Tensor,
    top_k: int | None,
    vocab_size: int | None,
    hidden_size: int | None = None,
    hidden_dtype: torch.dtype = torch.float32,
) -> TeacherTargets:
    """Zero targets of the right shapes: top-k, full-vocabulary, or (``hidden_size`` given) hidden states."""
    batch, length = completion_mask.shape
    device = completion_mask.device
    zeros = torch.zeros((batch, length), dtype=torch.float32, device=device)
    if top_k is None and hidden_size is not None:
        hidden = torch.zeros((batch, length, hidden_size), dtype=hidden_dtype, device=device)
        return TeacherTargets(zeros, None, None, None, completion_mask.bool(), hidden=hidden)
    if top_k is None:
        if vocab_size is None:
            raise ValueError("Full-vocabulary targets need the teacher's vocabulary size.")
        full = torch.zeros((batch, length, vocab_size), dtype=torch.float32, device=device)
        return TeacherTargets(zeros, None, None, full, completion_mask.bool())
    top_ids = torch.zeros((batch, length, top_k), dtype=torch.long, device=device)
    top_lp = torch.zeros((batch, length, top_k), dtype=torch.float32, device=device)
    return TeacherTargets(zeros, top_ids, top_lp, None, completion_mask.bool())


def excluded_token_ids(settings: DiffusionSettings) -> tuple[int, ...]:
    """Ids a teacher must drop from its targets: the student's ``[MASK]`` when it occupies a free row inside ``V_T``.

    An added mask row (``mask_token_id >= V_T``) needs no exclusion: every backend already scores over the
    teacher's ``V_T`` rows only (docs/teachers.md, "The student's mask token").
    """
    return (settings.mask_token_id,) if settings.mask_token_id < settings.teacher_vocab_size else ()


def real_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask) -> tuple[list[list[int]], list[int]]:
    """Token lists without padding (what vLLM must see) and each row's real prompt length."""
    check_batch(prompt_mask, completion_ids, completion_mask)
    prompt_mask, completion_mask = prompt_mask.bool().cpu(), completion_mask.bool().cpu()
    prompt_ids, completion_ids = prompt_ids.cpu(), completion_ids.cpu()
    prompt_lengths = prompt_mask.sum(1).tolist()
    completion_lengths = completion_mask.sum(1).tolist()
    width = prompt_ids.shape[1]
    prompts = prompt_ids.tolist()
    completions = completion_ids.tolist()
    sequences = [
        prompts[row][width - p_len :] + completions[row][:c_len]
        for row, (p_len, c_len) in enumerate(zip(prompt_lengths, completion_lengths, strict=True))
    ]
    return sequences, prompt_lengths


def _top_entries(entries: Mapping[int, float], top_k: int, excluded: frozenset[int], where: str) -> list[tuple]:
    ranked = sorted(
        ((lp, token) for token, lp in entries.items() if token not in excluded), key=lambda e: (-e[0], e[1])
    )
    if len(ranked) < top_k:
        raise TeacherServerError(f"{where}: {len(ranked)} log-probs returned, {top_k} expected.")
    return ranked[:top_k]


def targets_from_logprob_maps(
    sequences: Sequence[Sequence[int]],
    logprob_maps: Sequence[Sequence[Mapping[int, float] | None] | None],
    prompt_lengths: Sequence[int],
    completion_mask: torch.Tensor,
    top_k: int,
    exclude_token_ids: Iterable[int] = (),
) -> TeacherTargets:
    """Build targets from vLLM-style prompt log-probs (shared by the server and colocated teachers).

    ``logprob_maps[b][j]`` is ``{token id: log p(. | sequence_<j)}`` for position ``j`` of the real
    (unpadded) ``sequences[b]``: vLLM already applied the causal shift, so completion position ``i``
    reads entry ``prompt_lengths[b] + i``. Each map holds the top-k (or more) and the actual token.
    Excluded ids (a student mask token on a free row) are dropped from the top-k; the remaining
    log-probs keep vLLM's full-vocabulary normalisation.
    """
    excluded = frozenset(int(i) for i in exclude_token_ids)
    targets = empty_targets(completion_mask.cpu(), top_k, None)
    token_lp, top_lp, top_ids = [], [], []
    for row, (tokens, maps, p_len) in enumerate(zip(sequences, logprob_maps, prompt_lengths, strict=True)):
        if len(tokens) == p_len:
            continue
        if maps is None or len(maps) != len(tokens):
            got = "no" if maps is None else len(maps)
            raise TeacherServerError(
                f"Row {row}: the teacher returned {got} prompt log-prob entries for {len(tokens)} tokens "
                "(response missing positions)."
            )
        for position in range(p_len, len(tokens)):
            entries, token = maps[position], tokens[position]
            where = f"Row {row}, position {position}"
            if entries is None or token not in entries:
                raise TeacherServerError(f"{where}: the log-prob of the actual token {token} is missing.")
            ranked = _top_entries(entries, top_k, excluded, where)
            token_lp.append(entries[token])
            top_lp.append([lp for lp, _ in ranked])
            top_ids.append([tok for _, tok in ranked])
    where = targets.mask
    if token_lp:
        targets.token_logprobs[where] = torch.tensor(token_lp, dtype=torch.float32)
        targets.top_logprobs[where] = torch.tensor(top_lp, dtype=torch.float32)
        targets.top_ids[where] = torch.tensor(top_ids, dtype=torch.long)
    return targets
