"""A real-code corpus with a real knowledge base: the standard library's tests and its source.

`Lib/test/test_<module>.py` exercises `<module>` through its API: the names, signatures, defaults
and error messages its source defines. Held-out test files are nowhere in training; the source of
every module (held-out ones included) is in the knowledge base, cut into functions and methods,
and in the training text, as GCIDE's entries are in SPEC 1c. Nothing is imported: files are read
and cut with `ast`.
"""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

LIB = Path(sysconfig.get_paths()["stdlib"])
MAX_DOC_CHARS = 4000


def tested_modules() -> list[tuple[str, list[Path], Path]]:
    """(module, its source files, its test file) for stdlib modules written in Python that have
    a `test_<module>.py`."""
    out = []
    for test in sorted((LIB / "test").glob("test_*.py")):
        name = test.stem.removeprefix("test_")
        if (LIB / f"{name}.py").is_file():
            out.append((name, [LIB / f"{name}.py"], test))
        elif (LIB / name / "__init__.py").is_file():
            out.append((name, sorted((LIB / name).rglob("*.py")), test))
    return out


def _read(path: Path) -> tuple[str, ast.Module] | None:
    try:
        source = path.read_text(encoding="utf-8")
        return source, ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return None


def _segment(source: str, node: ast.AST) -> str:
    lines = source.splitlines()
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(lines[start - 1:node.end_lineno])


def definitions(path: Path) -> list[str]:
    """Functions, and methods led by their class line, of one source file: the knowledge base's
    documents (the bank cuts longer ones into several references)."""
    read = _read(path)
    if read is None:
        return []
    source, tree = read
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(_segment(source, node))
        elif isinstance(node, ast.ClassDef):
            header = source.splitlines()[node.lineno - 1].strip()
            methods = [n for n in node.body if isinstance(n, (ast.FunctionDef,
                                                                ast.AsyncFunctionDef))]
            if not methods:
                out.append(_segment(source, node))
            for m in methods:
                out.append(f"{header}\n{_segment(source, m)}")
    return out


def file_documents(path: Path) -> list[str]:
    """A source file cut into documents of whole top-level statements (a test class stays
    together up to MAX_DOC_CHARS, then is cut at a method), in file order."""
    read = _read(path)
    if read is None:
        return []
    source, tree = read
    pieces: list[str] = []
    for node in tree.body:
        text = _segment(source, node)
        if isinstance(node, ast.ClassDef) and len(text) > MAX_DOC_CHARS:
            header = source.splitlines()[node.lineno - 1].strip()
            pieces += [f"{header}\n{_segment(source, n)}" for n in node.body]
        else:
            pieces.append(text)
    docs, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > MAX_DOC_CHARS:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    return docs + [current] if current else docs
