"""Type-check the ``lightd`` package (and the mock panel) with mypy, strict; see ``[tool.mypy]``.

Why not plain ``mypy -p lightd``: the folders are not named like the package (``agent/`` is
``lightd``, ``plugins/`` is ``lightd.plugins``, pyproject's ``package-dir``), and the editable
install maps them with an import hook, which mypy does not follow ("Can't find package"). So this
script lays a tree of symlinks named like the package, ``.mypy_cache/lightd-src/lightd/...``
(built anew on every run from ``package-dir``, so new modules are seen at once; the stable
place keeps mypy's incremental cache useful), points mypy at it (``mypy_path`` in
``[tool.mypy]``), and writes the reported paths back as the repository's own (``agent/...``,
``plugins/...``), so editors and ``cut -d: -f1`` see real files.

    .venv/bin/python scripts/typecheck.py            # what scripts/test.sh runs
    .venv/bin/python scripts/typecheck.py --summary  # also a per-file count of errors
Other arguments go to mypy. Exit status: mypy's (0 = no error).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".mypy_cache" / "lightd-src"
#: Checked besides the package: (module, folder), laid into the tree like the package.
EXTRA = {"examples": ROOT / "examples"}
TARGETS = ["-p", "lightd", "-p", "examples.panel_mock"]


def package_dirs() -> dict[str, Path]:
    """``{"lightd": ROOT/"agent", "lightd.plugins": ROOT/"plugins", ...}`` from pyproject."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        mapping: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()} | EXTRA


def lay_tree(dirs: dict[str, Path]) -> dict[Path, Path]:
    """Lay the symlink tree; return {path in the tree: path in the repository}, deepest first."""
    shutil.rmtree(TREE, ignore_errors=True)  # removes the links, never what they point to
    TREE.mkdir(parents=True, exist_ok=True)
    roots: dict[Path, Path] = {}
    for name in sorted(dirs, key=lambda n: n.count(".")):
        target = TREE.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for child in dirs[name].iterdir():
            if child.name != "__pycache__" and not (target / child.name).exists():
                (target / child.name).symlink_to(child)
        roots[target] = dirs[name]
    return dict(sorted(roots.items(), key=lambda kv: len(kv[0].parts), reverse=True))


def main(argv: list[str]) -> int:
    summary = "--summary" in argv
    args = [a for a in argv if a != "--summary"]
    roots = lay_tree(package_dirs())
    env = os.environ | {"MYPY_FORCE_COLOR": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *TARGETS, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    # Deepest first, so lightd/plugins/ is rewritten before lightd/; an absolute path keeps
    # its ROOT prefix and ends up right as well.
    by_text = {str(tree.relative_to(ROOT)) + os.sep: repo for tree, repo in roots.items()}
    pattern = re.compile("|".join(re.escape(text) for text in by_text))

    def real(match: re.Match[str]) -> str:
        return str(by_text[match.group(0)].relative_to(ROOT)) + os.sep

    out = pattern.sub(real, proc.stdout)
    sys.stdout.write(out)
    sys.stderr.write(pattern.sub(real, proc.stderr))
    if summary or proc.returncode:
        counts = collections.Counter(
            line.split(":", 1)[0] for line in out.splitlines() if ": error:" in line
        )
        if counts:
            print("\nmypy errors per file:")
            for path, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                print(f"{n:6d}  {path}")
            total = sum(counts.values())
            print(f"{total:6d}  total in {len(counts)} files (mypy strict, see [tool.mypy])")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
