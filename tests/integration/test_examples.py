"""``examples/generate.py`` end to end on a saved tiny student: the CLI decodes what the library decodes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from opdlm_trl import load_diffusion_model, to_diffusion
from opdlm_trl.sampling import generate
from opdlm_trl.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generate_example():
    spec = importlib.util.spec_from_file_location("opdlm_generate_example", ROOT / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("student")
    model, tokenizer = to_diffusion(tiny_model("qwen3"), tiny_tokenizer(), block_size=4, shift=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize(("remasking", "temperature"), [("static", 0.0), ("dynamic", 1.0)])
def test_generate_cli_matches_library(generate_example, student_dir, tmp_path, remasking, temperature):
    """Same settings and seed: the same text (sampled at temperature 1, so not trivially equal)."""
    prompts = ["def add(a, b):", "The quick"]
    output = tmp_path / "out.jsonl"
    arguments = ["--model", student_dir, "--max-new-tokens", "8", "--remasking", remasking, "--threshold", "0.5"]
    arguments += ["--temperature", str(temperature), "--seed", "3"]
    arguments += ["--chat", "--batch-size", "1", "--output", str(output), "--device", "cpu"]
    for prompt in prompts:
        arguments += ["--prompt", prompt]
    generate_example.main(arguments)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    model, tokenizer = load_diffusion_model(student_dir)
    expected = generate(
        model.eval(),
        tokenizer,
        [[{"role": "user", "content": p}] for p in prompts],
        batch_size=1,
        max_new_tokens=8,
        remasking=remasking,
        threshold=0.5,
        temperature=temperature,
        generator=torch.Generator().manual_seed(3),
    )
    assert [r["prompt"] for r in records] == prompts
    assert [r["completion"] for r in records] == expected
    assert all(r["nfe"] >= 1 and r["finish_reason"] for r in records)
    if temperature > 0:
        assert len(set("".join(expected))) > 2  # varied tokens, not a row of newlines


def test_generate_cli_needs_a_prompt(generate_example, student_dir):
    with pytest.raises(SystemExit, match="at least one --prompt"):
        generate_example.main(["--model", student_dir])
