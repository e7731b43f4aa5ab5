"""Meta-tests that keep the plugin contract honest (after datasette and pytest)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import lightd
from lightd import hookspecs

TESTS = Path(__file__).resolve().parent


def hook_names() -> list[str]:
    return [
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("lightd_")
    ]


def test_there_are_hooks() -> None:
    assert len(hook_names()) >= 10


def test_every_hook_spec_is_documented() -> None:
    for name in hook_names():
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 40, f"{name} needs a docstring that says when it is called and why"
        params = [p for p in inspect.signature(getattr(hookspecs, name)).parameters]
        for param in params:
            assert f":param {param}:" in doc, f"{name} does not document {param}"


def test_every_hook_spec_has_a_test() -> None:
    defined: set[str] = set()
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                defined.add(node.name)
    missing = [name for name in hook_names() if f"test_hook_{name}" not in defined]
    assert missing == []


def test_public_surface_is_complete() -> None:
    # Its order is ruff's (RUF022, isort-style: constants, classes, then the rest).
    assert len(set(lightd.__all__)) == len(lightd.__all__)
    for name in lightd.__all__:
        assert hasattr(lightd, name)


def test_the_error_tree_names_every_error_class() -> None:
    root = TESTS.parent
    defined = set()
    for path in [*(root / "agent").rglob("*.py"), *(root / "plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(base, ast.Name) and _is_error_base(base.id) for base in node.bases
            ):
                defined.add(node.name)
    tree = lightd.errors.__doc__ or ""
    assert len(defined) > 20
    # A private class (``_NoEngine``) never leaves its module, so it is not in the tree.
    assert sorted(n for n in defined if not n.startswith("_") and n not in tree) == []


def _is_error_base(name: str) -> bool:
    return name.endswith(("Error", "Exception")) or name in _ERROR_BASES


#: Classes whose subclasses are errors although their names do not say so.
_ERROR_BASES = frozenset(
    {"BadRequest", "NotFound", "Conflict", "Forbidden", "Unauthorized", "InvalidPath"}
    | {"FileExists", "DockerUnavailable"}
)
