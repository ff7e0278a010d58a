"""Loads the task's questions from the JSONL next to this file, whatever the working directory."""

from pathlib import Path

from datasets import Dataset, DatasetDict

QUESTIONS = Path(__file__).with_name("opdlm_mc.jsonl")


def load_questions(**kwargs) -> DatasetDict:
    """``{"test": ...}`` with columns ``question``, ``choices`` (4 strings) and ``answer`` (index of the right one)."""
    return DatasetDict({"test": Dataset.from_json(str(QUESTIONS))})
