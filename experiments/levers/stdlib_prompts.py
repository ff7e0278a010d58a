"""A large, varied code prompt set built offline from Python's own standard library: the "many prompts" lever.

The long CPU recipe trains on the 64 HumanEval training problems, so after ~100k rollout tokens every prompt has been
rolled out ~30 times and the student is evaluated on 100 problems it never saw. This writes HumanEval-shaped prompts
(the same instruction, a signature and a docstring to complete) for the public pure-Python functions and methods of
the standard-library modules below (~950), after the 64 HumanEval training problems: no download, deterministic for
a given Python version. The student writes its own completions (on-policy), so only the prompts matter: they need no
reference solution.

    python experiments/levers/stdlib_prompts.py OUT.jsonl [--max-docstring-chars 600]   # a prompt file for --dataset_name
    python experiments/levers/stdlib_prompts.py --smoke OUT.jsonl                       # also the mean prompt length (CI)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import textwrap
import warnings
from pathlib import Path

from transformers import AutoTokenizer

from opdlm_trl.data import code_completion_prompt, default_model_dir, humaneval_prompt_dataset, render_prompts

MAX_SIGNATURE_CHARS = 160
# Pure-Python modules with documented, self-contained functions (string, path, text, number, date, data-format
# helpers). C-only modules (builtins, not Python functions) and modules that are heavy to import are left out.
# fmt: off
MODULES = (
    "ast", "base64", "bisect", "calendar", "cgi", "colorsys", "configparser", "copy", "csv", "dataclasses",
    "datetime", "difflib", "dis", "email.utils", "email.header", "email.quoprimime", "fnmatch", "fractions",
    "functools", "ftplib", "genericpath", "getopt", "gettext", "glob", "gzip", "heapq", "html", "http.cookiejar",
    "imghdr", "inspect", "ipaddress", "json", "keyword", "linecache", "locale", "mimetypes", "ntpath", "numbers",
    "operator", "optparse", "os", "pathlib", "pickletools", "platform", "posixpath", "pprint", "quopri", "random",
    "re", "reprlib", "shlex", "shutil", "smtplib", "statistics", "string", "struct", "tarfile", "tempfile",
    "textwrap", "tokenize", "traceback", "types", "typing", "urllib.parse", "urllib.request", "uu", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "xml.sax.saxutils", "zipfile", "zoneinfo",
)
# fmt: on


def _documented(value) -> bool:
    doc = inspect.getdoc(value)
    return bool(doc) and len(doc) >= 20


def _documented_functions(module_name: str) -> list[tuple[str, object, str | None]]:
    """``(name, function, class name or None)`` for the module's public functions and the public methods of its
    public classes, defined in the module itself and documented."""
    try:
        with warnings.catch_warnings():  # deprecated modules (cgi, imghdr, uu) warn on import; the prompts don't care
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except ImportError:  # a module this Python lacks (e.g. removed in 3.13): skip it, the set stays large
        return []
    found = []
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value) and _documented(value):
            found.append((name, value, None))
        elif inspect.isclass(value):
            found += [
                (method_name, method, name)
                for method_name, method in sorted(vars(value).items())
                if not method_name.startswith("_") and inspect.isfunction(method) and _documented(method)
            ]
    return found


def function_stub(name: str, function, max_docstring_chars: int, class_name: str | None = None) -> str | None:
    """``def name(signature):`` plus the docstring, cut at a paragraph boundary to ``max_docstring_chars``: the
    HumanEval shape (signature + docstring, body to write); a method sits in a ``class`` line. None when the
    signature cannot be rendered as short, reproducible source."""
    try:
        signature = str(inspect.signature(function))
    except (TypeError, ValueError):
        return None
    # a default rendered as <object at 0x...> is not source and not reproducible; os.environ-sized defaults drown
    # the problem in its signature
    if "<" in signature or len(signature) > MAX_SIGNATURE_CHARS:
        return None
    docstring = inspect.getdoc(function)
    if len(docstring) > max_docstring_chars:
        kept = ""
        for paragraph in docstring.split("\n\n"):
            if kept and len(kept) + len(paragraph) + 2 > max_docstring_chars:
                break
            kept = f"{kept}\n\n{paragraph}" if kept else paragraph
        docstring = kept[:max_docstring_chars].rstrip()
    docstring = docstring.replace('"""', "'''").replace("\\", "\\\\")
    body = textwrap.indent(f'"""{docstring}\n"""', "    ")
    stub = f"def {name}{signature}:\n{body}\n"
    return f"class {class_name}:\n{textwrap.indent(stub, '    ')}" if class_name else stub


def stdlib_prompt_rows(max_docstring_chars: int = 600, with_humaneval_train: bool = True) -> list[dict]:
    """One row per documented stdlib function or method (a name repeated by another module, e.g. ``posixpath`` and
    ``os.path``, is kept once: the first module wins), after the HumanEval training problems unless
    ``with_humaneval_train`` is False (then the set shares no problem with the recipe's)."""
    rows, seen = [], set()
    if with_humaneval_train:
        train = humaneval_prompt_dataset("train")
        rows += [
            {"prompt": prompt, "task_id": task} for prompt, task in zip(train["prompt"], train["task_id"], strict=True)
        ]
    for module_name in MODULES:
        for name, function, class_name in _documented_functions(module_name):
            qualified = f"{class_name}.{name}" if class_name else name
            stub = function_stub(name, function, max_docstring_chars, class_name)
            if stub is None or qualified in seen:
                continue
            seen.add(qualified)
            rows.append({"prompt": code_completion_prompt(stub), "task_id": f"stdlib/{module_name}.{qualified}"})
    return rows


def _token_lengths(rows: list[dict]) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ours = [len(ids) for ids in render_prompts([row["prompt"] for row in rows], tokenizer, {})]
    humaneval = [len(ids) for ids in render_prompts(humaneval_prompt_dataset("train")["prompt"], tokenizer, {})]
    return {
        "mean_tokens": sum(ours) / len(ours),
        "max_tokens": max(ours),
        "humaneval_mean_tokens": sum(humaneval) / len(humaneval),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSONL file to write (one {'prompt': [messages]} row per function).")
    parser.add_argument(
        "--max-docstring-chars", type=int, default=600, help="Longer docstrings are cut at a paragraph."
    )
    parser.add_argument("--no-humaneval", action="store_true", help="Leave out the 64 HumanEval training problems.")
    parser.add_argument("--smoke", action="store_true", help="Also print the prompt lengths in tokens.")
    args = parser.parse_args()
    if args.max_docstring_chars < 20:
        parser.error("--max-docstring-chars must be at least 20 (the shortest docstring kept)")
    rows = stdlib_prompt_rows(args.max_docstring_chars, with_humaneval_train=not args.no_humaneval)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"rows": len(rows), "python": sys.version.split()[0], "out": str(args.out)}
    if args.smoke:
        summary.update(_token_lengths(rows))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
