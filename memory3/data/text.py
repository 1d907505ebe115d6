"""Reading documents from text and JSON Lines files, plain or gzipped.

Formats, chosen by file name (a trailing ".gz" means gzip):
- ``.txt``, ``.text``, ``.md``: documents are paragraphs, separated by one or more blank lines.
- ``.jsonl``, ``.json``: one JSON object per line; the document is the object's text field. Lines
  that are not JSON objects with a string text field (of valid Unicode) are counted and skipped.
  A ``.json`` file is read as JSON Lines too (as most corpus dumps named so are); a file holding a
  single JSON array is not supported.

Every line is decoded as strict UTF-8 on its own, so one bad line costs that line only: it is
counted in `ReadStats` and skipped, never fatal, because a multi-GB corpus with a few bad bytes
should still train.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

PARAGRAPH_SUFFIXES = (".txt", ".text", ".md")
JSON_LINES_SUFFIXES = (".jsonl", ".json")
SUPPORTED_SUFFIXES = PARAGRAPH_SUFFIXES + JSON_LINES_SUFFIXES

PathLike = str | Path


class DataError(ValueError):
    """Input data, a data file or a data setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the file it came from, as listed by `list_files`
    index: int  # position among the documents of that file, for provenance


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    undecodable_lines: int = 0
    bad_json_lines: int = 0
    undecodable_by_file: Counter[str] = field(default_factory=Counter)
    bad_json_by_file: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"read {self.documents} documents from {self.files} files"]
        if self.undecodable_lines:
            parts.append(f"skipped {self.undecodable_lines} undecodable lines "
                         f"({_worst_files(self.undecodable_by_file)})")
        if self.bad_json_lines:
            parts.append(f"skipped {self.bad_json_lines} bad JSON lines "
                         f"({_worst_files(self.bad_json_by_file)})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents,
                "undecodable_lines": self.undecodable_lines, "bad_json_lines": self.bad_json_lines,
                "undecodable_by_file": dict(sorted(self.undecodable_by_file.items())),
                "bad_json_by_file": dict(sorted(self.bad_json_by_file.items()))}


def _worst_files(counts: Counter[str], shown: int = 3) -> str:
    worst = ", ".join(f"{name}: {n}" for name, n in counts.most_common(shown))
    return worst + (f", and {len(counts) - shown} more files" if len(counts) > shown else "")


def _format_of(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return "paragraphs" if suffix in PARAGRAPH_SUFFIXES else "jsonl"
    return None


def list_files(paths: Sequence[PathLike]) -> list[Path]:
    """The input files in reading order: the paths in the order given, each folder expanded
    recursively in sorted order to its supported files; a file listed twice is read once."""
    if isinstance(paths, (str, Path)):
        paths = [paths]  # a bare path is an easy mistake and iterating its characters is not useful
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [f for f in sorted(path.rglob("*")) if f.is_file() and _format_of(f)]
        elif path.is_file():
            if not _format_of(path):
                raise DataError(f"{path}: unsupported file type; expected a name ending in "
                                f"{', '.join(SUPPORTED_SUFFIXES)} (or + .gz)")
            files.append(path)
        else:
            raise DataError(f"input path {path} does not exist")
    files = list(dict.fromkeys(files))
    if not files:
        raise DataError(f"no input files in {', '.join(map(str, paths)) or '(no paths given)'}: "
                        f"expected names ending in {', '.join(SUPPORTED_SUFFIXES)} (or + .gz)")
    return files


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decoded_lines(stream: Iterable[bytes], source: str, stats: ReadStats) -> Iterator[str]:
    for raw in stream:
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.undecodable_lines += 1
            stats.undecodable_by_file[source] += 1


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).strip()
            paragraph = []
    if paragraph:
        yield "".join(paragraph).strip()


def _is_unicode(text: str) -> bool:
    # JSON escapes can spell lone surrogates, which no UTF-8 tokenizer or hash accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_texts(lines: Iterable[str], text_field: str, source: str,
                stats: ReadStats) -> Iterator[str]:
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if isinstance(text, str) and _is_unicode(text):
            yield text
        else:
            stats.bad_json_lines += 1
            stats.bad_json_by_file[source] += 1


def iter_documents(paths: Sequence[PathLike], text_field: str = "text",
                   stats: ReadStats | None = None) -> Iterator[Document]:
    """Yield the non-empty documents of `paths` (files or folders) in a deterministic order.

    Counts go into `stats` as reading proceeds; they are complete once the iterator is exhausted.
    """
    stats = ReadStats() if stats is None else stats
    for path in list_files(paths):
        source = str(path)
        stats.files += 1
        try:
            with _open(path) as stream:
                lines = _decoded_lines(stream, source, stats)
                texts = (_paragraphs(lines) if _format_of(path) == "paragraphs"
                         else _json_texts(lines, text_field, source, stats))
                index = 0
                for text in texts:
                    if text.strip():
                        stats.documents += 1
                        yield Document(text, source, index)
                        index += 1
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from e


def require_documents(stats: ReadStats, paths: Sequence[PathLike]) -> None:
    """Raise if a finished read found nothing to train on."""
    if stats.documents == 0:
        where = ", ".join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))
        raise DataError(f"no documents found in {where} ({stats.summary()})")
