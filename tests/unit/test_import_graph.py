"""The package's import graph: no module imports itself back through others, and training never loads evaluation.

Read from the source with :mod:`ast` (no import is executed), so a cycle is reported by the modules on it, not by
whichever import happens to fail first. Every import statement counts, also one inside a function: a deferred import
that closes a cycle still means two modules that cannot be understood (or moved) one without the other. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "opdlm_trl"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def _module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The package modules an import statement of ``module`` loads by name (a submodule imported with
    ``from package import submodule`` counts as that submodule)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in known:
            found.add(f"{source}.{alias.name}")
        elif source in known:
            found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in _imports(tree):
            edges |= _targets(name, path.name == "__init__.py", node, known)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None when the graph is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, iterators = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            successor = next(iterators[-1], None)
            if successor is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(successor) == 1:
                return path[path.index(successor) :] + [successor]
            elif not state.get(successor):
                state[successor] = 1
                path.append(successor)
                iterators.append(iter(sorted(graph.get(successor, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_absolute_and_deferred_imports():
    graph = import_graph()
    assert "opdlm_trl.masks" in graph["opdlm_trl.sampling"]  # from .masks import ...
    assert "opdlm_trl.losses" in graph["opdlm_trl.trainer"]  # from . import losses as L
    assert "opdlm_trl.eval" in graph["opdlm_trl.synthetic"]  # a deferred import inside a function
    assert "opdlm_trl.sampling" in graph["opdlm_trl.eval.api"]  # from ..sampling import ...


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_training_does_not_import_evaluation():
    """The trainer, its config and the baselines load no module of opdlm_trl.eval (its CLI, its code sandbox): the
    metrics the trainer logs live in opdlm_trl.diagnostics."""
    code = (
        "import sys, opdlm_trl.trainer, opdlm_trl.config, opdlm_trl.baselines\n"
        "loaded = sorted(name for name in sys.modules if name == 'opdlm_trl.eval' or name.startswith('opdlm_trl.eval.'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
