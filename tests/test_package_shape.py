"""The package drawn as modules and their imports shows the layers: no cycle, the core below the adapters.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: parsed, not run.
"""

import ast
from pathlib import Path

import pytest

import lightning_rigl

PACKAGE = Path(lightning_rigl.__file__).parent
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, by full name (``from pkg import submodule`` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return found


GRAPH = {name: {module for module in imports_of(name, path) if module in MODULES} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as the list of its modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                return path[path.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)) is not None:
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_holds_the_layers():
    assert "lightning_rigl.adapters.callback" in GRAPH["lightning_rigl"]
    assert "lightning_rigl.core.sparse_training" in GRAPH["lightning_rigl.core"]
    # `from lightning_rigl.core.kernels import sparse_ops` names the submodule, not only its package.
    assert "lightning_rigl.core.kernels.sparse_ops" in GRAPH["lightning_rigl.core.kernels.sparse_linear"]


def test_no_import_cycle_between_modules():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", [name for name in MODULES if name.startswith("lightning_rigl.core")])
def test_the_core_imports_neither_the_adapters_nor_lightning(name):
    for module in imports_of(name, MODULES[name]):
        top = module.split(".")[0]
        assert top not in ("lightning", "lightning_fabric", "pytorch_lightning"), f"{name} imports {module}"
        assert not module.startswith("lightning_rigl.adapters"), f"{name} imports {module}"
        assert module != "lightning_rigl", f"{name} imports the package root, which imports the adapters"
    # Nor at run time, by a name in a string (importlib): the core names nothing of the adapters.
    assert "lightning_rigl.adapters" not in MODULES[name].read_text(encoding="utf-8"), name


@pytest.mark.parametrize("name", list(MODULES))
def test_no_module_is_longer_than_the_limit(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines, over {MAX_LINES}: split it by concern"
