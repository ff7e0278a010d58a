"""A short-prompt version of the HumanEval training prompts: the "shorter prompts" lever (README.md here).

The training prompts (chat template + instruction + signature + full docstring with examples) are ~150-250 tokens,
so the prompt dominates the cost of an OPD step on 64-token rollouts. This writes the same training problems as one
sentence each: "Write a Python function `SIGNATURE` that SUMMARY." (the docstring's first sentence), so the rollout
budget goes to completions. Held-out evaluation stays on the full prompts (the student must still serve them).

    python experiments/levers/short_prompts.py OUT.jsonl [--heldout-size 100]   # a prompt file for convert.py --dataset_name
    python experiments/levers/short_prompts.py --smoke OUT.jsonl                 # the same, plus token lengths on stdout (CI)
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

from transformers import AutoTokenizer

from opdlm_trl.data import DEFAULT_HELDOUT_SIZE, default_model_dir, humaneval_prompt_dataset, render_prompts


def _entry_function(code_prompt: str, entry_point: str) -> ast.FunctionDef:
    functions = [node for node in ast.walk(ast.parse(code_prompt)) if isinstance(node, ast.FunctionDef)]
    named = [node for node in functions if node.name == entry_point]
    if not named:
        raise ValueError(f"No function {entry_point!r} in the HumanEval prompt.")
    return named[0]


def _first_sentence(docstring: str) -> str:
    """The docstring up to its first sentence end or blank line, on one line (examples and doctests dropped)."""
    paragraph = re.split(r"\n\s*\n|>>>|\bExample|\bFor example", docstring.strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text).rstrip(".")


def short_prompt(code_prompt: str, entry_point: str) -> str:
    """One sentence asking for the entry function: its signature line and its docstring's first sentence."""
    function = _entry_function(code_prompt, entry_point)
    signature = code_prompt.splitlines()[function.lineno - 1].strip().rstrip(":")
    docstring = ast.get_docstring(function) or ""
    summary = _first_sentence(docstring)
    request = f"Write a Python function `{signature}`"
    request += f" that does this: {summary}." if summary else "."
    return request + " Reply with the whole function in one ```python code block."


def short_prompt_rows(heldout_size: int = DEFAULT_HELDOUT_SIZE) -> list[dict]:
    """The HumanEval training split (the same problems the long recipe trains on) with short chat prompts."""
    train = humaneval_prompt_dataset("train", heldout_size=heldout_size)
    return [
        {"prompt": [{"role": "user", "content": short_prompt(code, entry)}], "task_id": task}
        for code, entry, task in zip(train["code_prompt"], train["entry_point"], train["task_id"], strict=True)
    ]


def _token_lengths(rows: list[dict], long_prompts: list) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    short = [len(ids) for ids in render_prompts([row["prompt"] for row in rows], tokenizer, {})]
    long = [len(ids) for ids in render_prompts(long_prompts, tokenizer, {})]
    return {"short_mean_tokens": sum(short) / len(short), "long_mean_tokens": sum(long) / len(long)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSONL file to write (one {'prompt': [messages]} row per problem).")
    parser.add_argument("--heldout-size", type=int, default=DEFAULT_HELDOUT_SIZE)
    parser.add_argument("--smoke", action="store_true", help="Also print the mean prompt length in tokens.")
    args = parser.parse_args()
    rows = short_prompt_rows(args.heldout_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"rows": len(rows), "out": str(args.out)}
    if args.smoke:
        summary.update(_token_lengths(rows, humaneval_prompt_dataset("train", args.heldout_size)["prompt"]))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
