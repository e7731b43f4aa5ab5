"""The docs in docs/ stay true: the hook reference is what the generator writes from the
hook specs now, and the README's links lead to files that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _generator() -> ModuleType:
    path = ROOT / "scripts" / "gen_plugin_docs.py"
    spec = importlib.util.spec_from_file_location("gen_plugin_docs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugins_md_is_generated_from_the_hook_specs() -> None:
    gen = _generator()
    current = gen.TARGET.read_text(encoding="utf-8")
    wanted = gen.render(current)
    if current != wanted:
        changed = next(
            (
                f"{a!r} != {b!r}"
                for a, b in zip(current.splitlines(), wanted.splitlines(), strict=False)
                if a != b
            ),
            "the length differs",
        )
        pytest.fail(
            "docs/plugins.md is out of date with lightd.hookspecs (or the public modules): "
            "run `.venv/bin/python scripts/gen_plugin_docs.py` and commit the result "
            f"(first difference: {changed})",
            pytrace=False,
        )


def test_every_hook_spec_is_documented() -> None:
    gen = _generator()
    import lightd.hookspecs

    text = gen.TARGET.read_text(encoding="utf-8")
    for fn in gen.hook_specs(lightd.hookspecs):
        assert f"#### `{fn.__name__}`" in text


def test_readme_and_docs_link_only_to_files_that_exist() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_readme_points_inside_the_repository() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "../shared" not in text
    for doc in ("docs/api.md", "docs/plugins.md", "docs/architecture.md"):
        assert f"]({doc}" in text, f"README does not link to {doc}"
