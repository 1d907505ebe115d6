"""A real-text corpus with a real knowledge base: Python's library reference and its docstrings.

The library reference (Debian's `python3.11-doc`: reStructuredText sources of docs.python.org) and
the standard library's own docstrings (read from its source with `ast`, nothing imported) describe
the same functions in different words, written by different people at different times: the
docstring of `textwrap.wrap` and the reference's section on it share names, arguments and facts,
not sentences. Held-out reference pages are nowhere in training; their modules' docstrings are
in the knowledge base (and in the training text, as GCIDE's entries are in SPEC 1c).

    apt-get install -y python3-doc
"""
from __future__ import annotations

import ast
import re
import sys
import sysconfig
from pathlib import Path

PAGES = Path("/usr/share/doc/python3.11-doc/html/_sources/library")
# A section starts at a title line underlined by a run of one punctuation character.
_SECTION = re.compile(r"\n(?=[^\n]+\n([-=~^*])\1{3,}\n)")


def read_pages() -> list[tuple[str, list[str], str]]:
    """(page name, modules it documents, text) of every library reference page."""
    if not PAGES.is_dir():
        sys.exit(f"{PAGES} is missing: apt-get install -y python3-doc")
    out = []
    for path in sorted(PAGES.glob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append((path.name.removesuffix(".rst.txt"),
                    re.findall(r"^\.\. module:: (\S+)", text, re.M), text))
    return out


def sections(page: str) -> list[str]:
    """A page cut at its section titles, each section led by the page's title line so that a
    section read alone still names its module."""
    parts = [p.strip() for p in _SECTION.split(page) if p and len(p) > 1]
    title = page.split("\n", 1)[0].strip()
    return [parts[0]] + [f"{title}\n\n{p}" for p in parts[1:]] if parts else []


def module_source(module: str) -> Path | None:
    """The pure-Python source of a standard-library module, None for a C module."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    rel = module.replace(".", "/")
    for path in (lib / f"{rel}.py", lib / rel / "__init__.py"):
        if path.exists():
            return path
    return None


def docstrings(module: str) -> list[str]:
    """Public docstrings of a module, its classes, functions and methods, each led by the
    qualified name and signature it documents ("textwrap.wrap(text, width=70, ...)")."""
    path = module_source(module)
    if path is None:
        return []
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    out = []

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                public = not child.name.startswith("_") or child.name == "__init__"
                doc = ast.get_docstring(child)
                if public and doc:
                    sig = "" if isinstance(child, ast.ClassDef) else f"({ast.unparse(child.args)})"
                    out.append(f"{name}{sig}\n{doc}")
                if public and isinstance(child, ast.ClassDef):
                    visit(child, name)

    doc = ast.get_docstring(tree)
    if doc:
        out.append(f"{module}\n{doc}")
    visit(tree, module)
    return out
