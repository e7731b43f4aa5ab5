"""Write the hook reference of ``docs/plugins.md`` from ``lightd.hookspecs``.

Usage, from the repository root::

    .venv/bin/python scripts/gen_plugin_docs.py          # rewrite docs/plugins.md
    .venv/bin/python scripts/gen_plugin_docs.py --check  # exit 1 if it is out of date

``docs/plugins.md`` has two parts. Everything above the ``MARKER`` line is written by
hand (the tutorial, the public surface, how a plugin is found and tested, the stability
policy) and kept as it is; everything below is generated here: the exports of the public
modules and of ``lightd.testing``, then the hook specs: the module docstring, then each
spec in source order under the section banner it sits under, with its kind, stability,
signature and docstring.

The stability of a spec: **deprecated** when it carries pluggy's ``warn_on_impl`` (a
plugin implementing it gets that warning at registration), **provisional** when its name
is in ``lightd.hookspecs.PROVISIONAL`` (a set; absent means none), else **stable**.

The kind of a spec: ``firstresult`` specs are **decisions**; a spec whose return
annotation names ``Awaitable`` is a **notification**; any other is a **declaration**
(called while the agent is being built). Docstrings are reStructuredText-lite
(````code````, ``::`` literal blocks, ``:param x:`` fields); they are turned into Markdown.

``tests/test_docs.py`` imports ``render`` and fails when the file differs from it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from types import FunctionType, ModuleType

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "plugins.md"
MARKER = "<!-- generated below by scripts/gen_plugin_docs.py from lightd.hookspecs: do not edit -->"
SPEC_ATTR = "lightd_spec"
#: The only core modules a plugin may import.
PUBLIC_MODULES = ("lightd", "lightd.api", "lightd.files")
#: Public too, for a plugin's tests only (the plugin itself never imports it).
TEST_MODULES = ("lightd.testing",)

KINDS = {
    "declaration": "declaration: called once while the agent is being built",
    "notification": "notification: may return an awaitable, which the core awaits",
    "decision": "decision (`firstresult`): the first non-`None` answer wins",
}

_BANNER = re.compile(r"^# -{10,}\s*$")
_PARAM = re.compile(r"^:param\s+(\w+):\s*(.*)$")
_RETURNS = re.compile(r"^:returns?:\s*(.*)$")


def hook_specs(module: ModuleType) -> list[FunctionType]:
    """The hook specs of ``module``, in source order."""
    specs = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, FunctionType)
        and obj.__module__ == module.__name__
        and getattr(obj, SPEC_ATTR, None) is not None
    ]
    return sorted(specs, key=lambda fn: fn.__code__.co_firstlineno)


def kind_of(fn: FunctionType) -> str:
    options = getattr(fn, SPEC_ATTR) or {}
    if options.get("firstresult"):
        return "decision"
    returns = inspect.signature(fn, eval_str=False).return_annotation
    if "Awaitable" in str(returns):
        return "notification"
    return "declaration"


def stability_of(fn: FunctionType, module: ModuleType) -> str:
    """``stable``, ``provisional`` or ``deprecated: <the warning>`` (see the docstring)."""
    options = getattr(fn, SPEC_ATTR) or {}
    warning = options.get("warn_on_impl")
    if warning is not None:
        return f"deprecated: {warning}"
    if fn.__name__ in getattr(module, "PROVISIONAL", ()):
        return "provisional"
    return "stable"


def _annotation(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, type):
        return value.__qualname__
    return repr(value).replace("typing.", "")


def signature_of(fn: FunctionType) -> str:
    """``name(arg: Type, ...) -> Return`` with the annotations as written in the source."""
    sig = inspect.signature(fn, eval_str=False)
    params = []
    for param in sig.parameters.values():
        text = param.name
        if param.kind is param.VAR_POSITIONAL:
            text = "*" + text
        elif param.kind is param.VAR_KEYWORD:
            text = "**" + text
        if param.annotation is not param.empty:
            text += f": {_annotation(param.annotation)}"
        if param.default is not param.empty:
            text += f" = {param.default!r}"
        params.append(text)
    text = f"{fn.__name__}({', '.join(params)})"
    if sig.return_annotation is not sig.empty:
        text += f" -> {_annotation(sig.return_annotation)}"
    return text


def sections_of(module: ModuleType) -> list[tuple[int, str]]:
    """``(line, title)`` of each section banner in the module's source::

    # -----------------
    # Title of the section.
    # -----------------
    """
    lines = inspect.getsource(module).splitlines()
    found = []
    for index in range(len(lines) - 2):
        if (
            _BANNER.match(lines[index])
            and _BANNER.match(lines[index + 2])
            and lines[index + 1].startswith("# ")
        ):
            found.append((index + 2, lines[index + 1][2:].strip().rstrip(".")))
    return found


def rst_to_markdown(text: str) -> str:
    """The docstring dialect of the hook specs, as Markdown."""
    lines = inspect.cleandoc(text).splitlines()
    out: list[str] = []
    params: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        param = _PARAM.match(stripped)
        returns = _RETURNS.match(stripped)
        if param or returns:
            name, body = (param[1], param[2]) if param else ("returns", returns[1])  # type: ignore[index]
            index += 1
            while index < len(lines) and lines[index].startswith(" ") and lines[index].strip():
                body += " " + lines[index].strip()
                index += 1
            label = f"`{name}`" if param else "returns"
            params.append(f"- {label}: {_inline(body)}")
            continue
        if stripped.endswith("::"):
            lead = stripped[:-2].rstrip()
            if lead:
                out.append(_inline(lead) + ":")
            index += 1
            block: list[str] = []
            while index < len(lines) and (not lines[index].strip() or lines[index].startswith(" ")):
                block.append(lines[index])
                index += 1
            while block and not block[0].strip():
                block.pop(0)
            while block and not block[-1].strip():
                block.pop()
            if out and out[-1]:
                out.append("")
            out.append("```")
            out.extend(_dedent(block))
            out.append("```")
            out.append("")
            continue
        if stripped.startswith("* "):
            out.append("- " + _inline(stripped[2:]))
        elif line.startswith("  ") and out and out[-1].startswith("- "):
            out.append("  " + _inline(stripped))
        else:
            out.append(_inline(line))
        index += 1
    if params:
        while out and not out[-1].strip():
            out.pop()
        out += ["", "Parameters:", "", *params]
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


def _dedent(block: list[str]) -> list[str]:
    width = min((len(x) - len(x.lstrip()) for x in block if x.strip()), default=0)
    return [x[width:] for x in block]


def _inline(text: str) -> str:
    """````code```` → ```code```; a single backtick pair stays as it is."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _summary(obj: object) -> str:
    """The first paragraph of ``obj``'s own docstring (not one inherited), else its kind."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if inspect.isclass(obj) and isinstance(getattr(obj, "status", None), int) and not doc:
        return f"answered as HTTP {obj.status} (`code`: `{obj.code}`)"  # type: ignore[attr-defined]
    if typing.get_origin(obj) is not None:
        text = repr(obj).replace("collections.abc.", "").replace("typing.", "")
        return f"type alias: `{text}`"
    if isinstance(obj, bool | int | float | str):
        return f"constant: `{obj!r}`"
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        if callable(obj) and type(obj).__doc__:
            doc = type(obj).__doc__  # a decorator object such as ``hookimpl``
        else:
            name = getattr(obj, "name", None)
            return f"a `{type(obj).__name__}`" + (f" (`{name}`)" if isinstance(name, str) else "")
    if not doc:
        if inspect.isclass(obj) and obj.__bases__ and obj.__bases__[0] is not object:
            return f"a kind of `{obj.__bases__[0].__name__}`"
        return ""
    first = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return _inline(" ".join(first.split()))


def render_surface(
    names: tuple[str, ...] = PUBLIC_MODULES, tests: tuple[str, ...] = TEST_MODULES
) -> str:
    """What each public module exports (its ``__all__``), with the first docstring
    paragraph of each name. A public module that does not exist yet is skipped."""
    out = ["## The public surface, name by name", ""]
    for name in (*names, *tests):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        doc = inspect.getdoc(module) or ""
        out += [f"### `{name}`", "", _inline(doc.split("\n\n", 1)[0].replace("\n", " ")), ""]
        if name in tests:
            out += ["For a plugin's tests only; see [Testing a plugin](#testing-a-plugin).", ""]
        out += ["| name | what |", "|---|---|"]
        for export in getattr(module, "__all__", ()):
            if export.startswith("_"):
                continue
            text = _summary(getattr(module, export, None)).replace("|", "\\|")
            out.append(f"| `{export}` | {text} |")
        out.append("")
    return "\n".join(out)


def render_reference(module: ModuleType) -> str:
    """The generated part of ``docs/plugins.md``."""
    name = module.__name__
    out = [
        render_surface(),
        "## Hook reference",
        "",
        f"Generated from `{name}` (`agent/hookspecs.py`); run "
        "`.venv/bin/python scripts/gen_plugin_docs.py` after changing a spec.",
        "",
    ]
    if module.__doc__:
        out += [rst_to_markdown(module.__doc__), ""]
    specs = hook_specs(module)
    out += ["| hook | kind | stability |", "|---|---|---|"]
    out += [
        f"| [`{fn.__name__}`](#{fn.__name__}) | {kind_of(fn)} | {stability_of(fn, module)} |"
        for fn in specs
    ]
    out.append("")
    banners = sections_of(module)
    current = None
    for fn in specs:
        line = fn.__code__.co_firstlineno
        title = None
        for banner_line, banner_title in banners:
            if banner_line <= line:
                title = banner_title
        if title is not None and title != current:
            out += [f"### {title}", ""]
            current = title
        kind = kind_of(fn)
        out += [
            f"#### `{fn.__name__}`",
            "",
            f"*Kind:* {KINDS[kind]}. *Stability:* {stability_of(fn, module)}.",
            "",
            "```python",
            signature_of(fn),
            "```",
            "",
        ]
        doc = inspect.getdoc(fn)
        out += [rst_to_markdown(doc) if doc else "(no docstring)", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def render(current: str, module: ModuleType | None = None) -> str:
    """The whole file: the hand-written part of ``current`` (up to and including the
    marker line) followed by the reference generated now."""
    if module is None:
        module = importlib.import_module("lightd.hookspecs")
    head, found, _ = current.partition(MARKER)
    if not found:
        raise ValueError(
            f"{TARGET.name} has no marker line; add it where the reference starts:\n{MARKER}"
        )
    return head + MARKER + "\n\n" + render_reference(module)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    current = TARGET.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{TARGET} is out of date: run .venv/bin/python scripts/gen_plugin_docs.py")
            return 1
        return 0
    if wanted != current:
        TARGET.write_text(wanted, encoding="utf-8")
        print(f"wrote {TARGET}")
    else:
        print(f"{TARGET} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
