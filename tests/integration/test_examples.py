"""The command-line tools and the ``examples/`` files that call them.

``opdlm-generate`` end to end on a saved tiny student (the CLI decodes what the library decodes); every console script
of pyproject.toml resolves to a ``main(argv)`` whose parser is named after the script; ``python -m`` (what
``accelerate launch -m`` runs) and the ``examples/*.py`` recipes reach the same commands.
"""

from __future__ import annotations

import importlib
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from opdlm_trl import load_diffusion_model, to_diffusion
from opdlm_trl.cli import generate as generate_cli
from opdlm_trl.sampling import generate
from opdlm_trl.tiny import tiny_model, tiny_tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest's own dependency on Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# The examples/ recipe files and the command each one is.
RECIPES = {"convert.py": "opdlm-convert", "generate.py": "opdlm-generate", "evaluate.py": "opdlm-eval"}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("student")
    model, tokenizer = to_diffusion(tiny_model("qwen3"), tiny_tokenizer(), block_size=4, shift=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize(("remasking", "temperature"), [("static", 0.0), ("dynamic", 1.0)])
def test_generate_cli_matches_library(student_dir, tmp_path, remasking, temperature):
    """Same settings and seed: the same text (sampled at temperature 1, so not trivially equal)."""
    prompts = ["def add(a, b):", "The quick"]
    output = tmp_path / "out.jsonl"
    arguments = ["--model", student_dir, "--max-new-tokens", "8", "--remasking", remasking, "--threshold", "0.5"]
    arguments += ["--temperature", str(temperature), "--seed", "3"]
    arguments += ["--chat", "--batch-size", "1", "--output", str(output), "--device", "cpu"]
    for prompt in prompts:
        arguments += ["--prompt", prompt]
    generate_cli.main(arguments)
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


def test_generate_cli_needs_a_prompt(student_dir):
    with pytest.raises(SystemExit, match="at least one --prompt"):
        generate_cli.main(["--model", student_dir])


def _help_text(run, capsys) -> str:
    """What ``run()`` prints for ``--help``, which must exit with status 0."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_console_scripts_are_the_package_commands():
    assert CONSOLE_SCRIPTS["opdlm-convert"] == "opdlm_trl.cli.convert:main"
    assert CONSOLE_SCRIPTS["opdlm-generate"] == "opdlm_trl.cli.generate:main"
    assert "opdlm-eval" in CONSOLE_SCRIPTS


@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_console_script_resolves_to_a_main_named_after_it(script, capsys):
    module_name, _, attribute = CONSOLE_SCRIPTS[script].partition(":")
    main = getattr(importlib.import_module(module_name), attribute)
    assert _help_text(lambda: main(["--help"]), capsys).startswith(f"usage: {script} ")


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # already imported by the tests above
@pytest.mark.parametrize("script", ["opdlm-convert", "opdlm-generate"])
def test_python_dash_m_runs_the_command(script, capsys, monkeypatch):
    """``python -m opdlm_trl.cli.X`` (and so ``accelerate launch -m opdlm_trl.cli.X``) runs ``main``."""
    module_name = CONSOLE_SCRIPTS[script].partition(":")[0]
    monkeypatch.setattr(sys, "argv", [module_name, "--help"])
    help_text = _help_text(lambda: runpy.run_module(module_name, run_name="__main__", alter_sys=True), capsys)
    assert help_text.startswith(f"usage: {script} ")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_example_recipe_runs_its_command(recipe, capsys, monkeypatch):
    """``python examples/convert.py ...`` (the README's and older scripts' commands) still runs the command."""
    path = ROOT / "examples" / recipe
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    help_text = _help_text(lambda: runpy.run_path(str(path), run_name="__main__"), capsys)
    assert help_text.startswith(f"usage: {RECIPES[recipe]} ")
