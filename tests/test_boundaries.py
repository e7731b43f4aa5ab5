"""The package's walls: one import package, dependencies one way, plugins on the public surface.

The checks read the source with ``ast`` (nothing is imported), so they see every import:
at module level and inside functions alike. Imports under ``if TYPE_CHECKING:`` are for
the type checker only and are left out. ``python tests/test_boundaries.py`` prints the
graph's summary.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Source folder → the import package it is installed as (pyproject's package-dir).
FOLDERS = {"agent": "lightd", "plugins": "lightd.plugins"}

#: What a plugin may import of the core: the public surface.
PUBLIC = frozenset({"lightd", "lightd.api", "lightd.files"})

#: The core's layers, bottom up; a module imports only from its own layer or below.
LAYERS: list[set[str]] = [
    {"lightd._version", "lightd.errors", "lightd.converter"},
    {
        "lightd.files",
        "lightd.config",
        "lightd.logs",
        "lightd.store",
        "lightd.docker",
        "lightd.outbound",
    },
    {
        "lightd.hookspecs",
        "lightd.plugin_manager",
        "lightd.runtime",
        "lightd.metrics",
        "lightd.interfaces",
        "lightd.jobs",
        "lightd.events",
    },
    {"lightd.containers"},
    {"lightd.api"},
    {"lightd.server", "lightd.cli", "lightd.diagnostics", "lightd.__main__", "lightd.testing"},
]


def module_files() -> dict[str, Path]:
    """Every module of the package: dotted name → file."""
    found: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, typing: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if not typing and isinstance(node, ast.If) and _type_checking_only(node):
            yield from (n for child in node.orelse for n in _imports_in(child, typing))
            continue
        yield from _imports_in(node, typing)


def _imports_in(node: ast.AST, typing: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node, typing)


def imported(name: str, path: Path, modules: dict[str, Path], *, typing: bool = False) -> set[str]:
    """The package's modules that module ``name`` imports (explicit edges only: importing
    ``lightd.a.b`` runs ``lightd/__init__`` too, but that is Python's, not a dependency)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    edges: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path)), typing):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import mod` depends on pkg.mod when that is a module, else on pkg.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            while target and target not in modules:  # `import lightd.a.b` names lightd.a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def import_graph(*, typing: bool = False) -> dict[str, set[str]]:
    """Module → the modules it imports; with ``typing``, ``TYPE_CHECKING`` imports too."""
    modules = module_files()
    return {name: imported(name, path, modules, typing=typing) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int | None:
    for rank, names in enumerate(LAYERS):
        for prefix in names:
            if module == prefix or module.startswith(prefix + "."):
                return rank
    return None


def plugin_of(module: str) -> str | None:
    """``lightd.plugins.port_pool.pool`` → ``lightd.plugins.port_pool``."""
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["lightd", "plugins"] and len(parts) > 2 else None


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_can_fail() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_core_module_has_a_layer() -> None:
    core = [m for m in module_files() if plugin_of(m) is None and m != "lightd.plugins"]
    assert [m for m in core if m != "lightd" and layer_of(m) is None] == []


def test_dependencies_run_down_the_layers() -> None:
    wrong = []
    for module, targets in import_graph().items():
        mine = layer_of(module)
        if mine is None:
            continue
        for target in targets:
            theirs = layer_of(target)
            if target == "lightd" or (theirs is not None and theirs > mine):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_plugins_import_only_the_public_surface_and_never_each_other() -> None:
    checked = dict(module_files())
    hello = ROOT / "tests" / "external_plugin" / "lightd_hello"
    for path in hello.rglob("*.py"):
        checked[f"lightd_hello.{path.stem}"] = path
    # the example packages' plugin code (their tests may import lightd.testing too)
    for path in (ROOT / "examples" / "plugins").glob("*/src/*/*.py"):
        checked[f"{path.parent.name}.{path.stem}"] = path
    examples = tuple(p.name for p in (ROOT / "examples" / "plugins").glob("*/src/*"))
    wrong = []
    for module, path in checked.items():
        if not module.startswith(("lightd.plugins.", "lightd_hello", *examples)):
            continue
        own = plugin_of(module)
        for target in imported(module, path, {**module_files(), module: path}):
            if target in PUBLIC or (own is not None and plugin_of(target) == own):
                continue
            wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_plugin_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from lightd import hookimpl\nfrom lightd.store import Store\n"
        "def f():\n    from lightd.plugins.volumes import VolumeRegistry\n"
    )
    found = imported("lightd.plugins.bad", bad, module_files())
    assert {"lightd.store", "lightd.plugins.volumes"} <= found
    assert "lightd" in found


def test_pyproject_lists_every_package_folder() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {package: folder for folder, package in FOLDERS.items()}
    folders = {m for m, p in module_files().items() if p.name == "__init__.py"}
    assert set(config["packages"]) == folders


def main() -> None:
    graph = import_graph()
    edges = sum(len(targets) for targets in graph.values())
    print(f"{len(graph)} modules, {edges} import edges (module and function level)")
    print(f"cycles: {cycles(graph) or 'none'}")
    print(f"with TYPE_CHECKING imports (annotations only): {cycles(import_graph(typing=True))}")
    for rank, names in enumerate(LAYERS):
        print(f"layer {rank}: {', '.join(sorted(names))}")


if __name__ == "__main__":
    main()
