"""What ``benchmarks/gpu_check.py`` imports besides torch, as pinned distributions: the list ``scripts/gpu_check.sh
pack`` turns into wheels for an offline GPU machine.

The list is measured, not written by hand: import what the check imports, map every third-party module loaded to
its installed distribution, and print ``name==version pure|binary`` per line. Left out: torch and what the GPU
machine's torch installation brings with it (its declared requirements, transitively), and large binary libraries a machine with
Python's scientific stack has anyway (``ASSUMED_PRESENT``: together they would exceed the 64 MiB bundle).
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import sys

# What gpu_check.py needs at run time.
IMPORTS = ("opdlm_trl", "opdlm_trl.trainer", "trl", "transformers", "peft", "accelerate", "datasets", "tokenizers")
# numpy ~16 MB, pyarrow ~42 MB, pandas ~12 MB per wheel: the GPU machine must have them (the run step says so).
ASSUMED_PRESENT = {"numpy", "pyarrow", "pandas", "scipy", "torch", "triton", "opdlm-trl", "pip", "setuptools"}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def _requirement_names(name: str) -> set[str]:
    """The declared run-time requirements of an installed distribution (extras left out)."""
    try:
        requirements = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return set()
    names = set()
    for requirement in requirements:
        if "extra ==" in requirement:
            continue
        head = requirement.split(";")[0].split("[")[0]
        for separator in "<>=!~ (":
            head = head.split(separator)[0]
        names.add(_normalise(head.strip()))
    return names


def _torch_closure() -> set[str]:
    """torch's dependencies and theirs (sympy, mpmath, jinja2, markupsafe, ...): present wherever torch is."""
    seen, todo = set(), ["torch"]
    while todo:
        for name in _requirement_names(todo.pop()) - seen:
            seen.add(name)
            todo.append(name)
    return seen


def _is_pure(distribution: metadata.Distribution) -> bool:
    wheel = distribution.read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel


def required_distributions() -> list[tuple[str, str, bool]]:
    """``(name, version, pure)`` of every installed distribution gpu_check.py's imports load, minus the exclusions."""
    for module in IMPORTS:
        importlib.import_module(module)
    owners = metadata.packages_distributions()
    skip = ASSUMED_PRESENT | _torch_closure()
    found: dict[str, tuple[str, str, bool]] = {}
    for module in list(sys.modules):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names:
            continue
        for name in owners.get(top, []):
            key = _normalise(name)
            if key in skip or key in found:
                continue
            distribution = metadata.distribution(name)
            found[key] = (key, distribution.version, _is_pure(distribution))
    return sorted(found.values())


if __name__ == "__main__":
    for name, version, pure in required_distributions():
        print(f"{name}=={version} {'pure' if pure else 'binary'}")
