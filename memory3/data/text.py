"""Reading documents from corpus files as they ship: text, JSON Lines, Parquet; plain, gzip, zstd.

Formats, chosen by file name (a trailing ".gz" means gzip, ".zst" means zstandard):
- ``.txt``, ``.text``, ``.md``: documents are paragraphs, separated by one or more blank lines.
- ``.jsonl``, ``.json``: one JSON object per line; the document is the object's text field. Lines
  that are not JSON objects with a string text field (of valid Unicode) are counted and skipped.
  A ``.json`` file is read as JSON Lines too (as most corpus dumps named so are); a file holding a
  single JSON array is not supported.
- ``.parquet``: one document per row, the value in the text field's column (a string or binary
  column; nulls are counted and skipped). Parquet compresses inside the file, so no ".gz"/".zst".

With a glob (`--glob '*.py'`, several allowed), a folder yields the files whose names match it, at
any depth, and each matching text file is ONE document, read whole: a source file split at blank
lines would cut functions apart. JSON Lines and Parquet files still hold one document per record
(a glob such as '*.parquet' only selects them). Under a glob, hidden files and folders (.git,
.venv) are skipped and a file holding a NUL byte is counted as binary and skipped, so a glob over a
checkout reads its code, not its tooling. Without a glob, folders yield the files of the formats
above.

Everything streams: compressed files are decompressed chunk by chunk and Parquet files read a batch
of rows at a time through a small buffer (not a row group at once), so memory holds a batch, never
a whole file (a whole-file document excepted).

Every line (or Parquet value) is decoded as strict UTF-8 on its own, so one bad line costs that line
only: it is counted in `ReadStats` and skipped, never fatal, because a multi-GB corpus with a few
bad bytes should still train. Damaged compressed data, by contrast, is fatal: what follows the damage
cannot be read, and a corpus silently cut short is worse than a stop naming the file.
"""
from __future__ import annotations

import fnmatch
import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

PARAGRAPH_SUFFIXES = (".txt", ".text", ".md")
JSON_LINES_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = PARAGRAPH_SUFFIXES + JSON_LINES_SUFFIXES + PARQUET_SUFFIXES
COMPRESSED_SUFFIXES = (".gz", ".zst")
# Bytes read from a file per step (the Parquet column buffer, the zstd line buffer).
READ_CHUNK_BYTES = 1 << 18
# Compressed zstd bytes decompressed per step: the output of one step is held whole, and text
# expands ~3-10x (1 MB at most then; a pathological 1000x file would still stay at 64 MB).
ZSTD_INPUT_BYTES = 1 << 16
# Parquet rows per batch: documents run to 100 KB and more, and 65,536 rows (pyarrow's default)
# of those would hold gigabytes.
PARQUET_BATCH_ROWS = 256
# zstd files made with --long=31 need a 2 GB window; the library refuses more than 128 MB unless
# told. The window is only allocated when a file asks for it.
ZSTD_MAX_WINDOW = 1 << 31

PathLike = str | Path
Glob = str | Sequence[str] | None
_SUPPORTED = f"{', '.join(SUPPORTED_SUFFIXES)} (text and JSON Lines also + .gz or .zst)"
# Command-line help shared by every command that lists input files or folders.
INPUTS_HELP = ("files or folders of .txt/.md (a document per paragraph), .jsonl/.json, .parquet; "
               "text and JSON Lines also .gz or .zst")
GLOB_HELP = ("read the files whose names match this pattern (e.g. '*.py'; repeat for more), each "
             "text file whole as ONE document; hidden files and folders are skipped")
_GLOB_HINT = ("to read other text files, such as source code, each whole as one document, name "
              "them with a glob: --glob '*.py' (repeat --glob for more patterns)")


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
    null_texts: int = 0  # Parquet rows whose text is null
    binary_files: int = 0  # files matched by a glob that hold a NUL byte
    undecodable_by_file: Counter[str] = field(default_factory=Counter)
    bad_json_by_file: Counter[str] = field(default_factory=Counter)
    null_texts_by_file: Counter[str] = field(default_factory=Counter)
    binary_file_names: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"read {self.documents} documents from {self.files} files"]
        if self.undecodable_lines:
            parts.append(f"skipped {self.undecodable_lines} undecodable lines, not UTF-8 "
                         f"({_worst_files(self.undecodable_by_file)})")
        if self.bad_json_lines:
            parts.append(f"skipped {self.bad_json_lines} bad JSON lines "
                         f"({_worst_files(self.bad_json_by_file)})")
        if self.null_texts:
            parts.append(f"skipped {self.null_texts} null Parquet texts "
                         f"({_worst_files(self.null_texts_by_file)})")
        if self.binary_files:
            shown = ", ".join(self.binary_file_names[:3])
            more = len(self.binary_file_names) - 3
            parts.append(f"skipped {self.binary_files} binary files ({shown}"
                         f"{f', and {more} more' if more > 0 else ''})")
        return "; ".join(parts)

    def skipped_anything(self) -> bool:
        return bool(self.undecodable_lines or self.bad_json_lines or self.null_texts
                    or self.binary_files)

    def to_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents,
                "undecodable_lines": self.undecodable_lines, "bad_json_lines": self.bad_json_lines,
                "null_texts": self.null_texts, "binary_files": self.binary_files,
                "undecodable_by_file": dict(sorted(self.undecodable_by_file.items())),
                "bad_json_by_file": dict(sorted(self.bad_json_by_file.items())),
                "null_texts_by_file": dict(sorted(self.null_texts_by_file.items())),
                "binary_file_names": list(self.binary_file_names)}


def _worst_files(counts: Counter[str], shown: int = 3) -> str:
    worst = ", ".join(f"{name}: {n}" for name, n in counts.most_common(shown))
    return worst + (f", and {len(counts) - shown} more files" if len(counts) > shown else "")


def globs(glob: Glob) -> tuple[str, ...]:
    """The glob setting as a tuple of patterns (a bare string is one pattern)."""
    if glob is None:
        return ()
    patterns = (glob,) if isinstance(glob, str) else tuple(glob)
    if not all(isinstance(g, str) and g for g in patterns):
        raise DataError(f"glob patterns must be non-empty strings, got {glob!r}")
    if any("/" in g for g in patterns):
        raise DataError(f"glob {glob!r}: patterns match file names (at any depth), so they hold "
                        f"no '/'; name the subfolder as the input instead")
    return patterns


def _compression(path: Path) -> str | None:
    name = path.name.lower()
    return next((s[1:] for s in COMPRESSED_SUFFIXES if name.endswith(s)), None)


def _format_of(path: Path, patterns: tuple[str, ...] = ()) -> str | None:
    """How `path` is read: "paragraphs", "jsonl", "parquet", "whole" (one document), or None when
    it is not an input (unsupported name, or not matching the glob)."""
    if patterns and not any(fnmatch.fnmatchcase(path.name, g) for g in patterns):
        return None
    name = path.name.lower()
    compression = _compression(path)
    if compression:
        name = name[:-len(compression) - 1]
    if name.endswith(JSON_LINES_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return None if compression else "parquet"
    if patterns:
        return "whole"
    return "paragraphs" if name.endswith(PARAGRAPH_SUFFIXES) else None


def _hidden_below(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def list_files(paths: Sequence[PathLike], glob: Glob = None) -> list[Path]:
    """The input files in reading order: the paths in the order given, each folder expanded
    recursively in sorted order to its supported files (with a glob: to the files whose names
    match it, hidden ones skipped); a file listed twice is read once."""
    if isinstance(paths, (str, Path)):
        paths = [paths]  # a bare path is an easy mistake and iterating its characters is not useful
    patterns = globs(glob)
    shown = " ".join(f"--glob {g!r}" for g in patterns)
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [f for f in sorted(path.rglob("*")) if f.is_file() and _format_of(f, patterns)
                      and not (patterns and _hidden_below(f, path))]
        elif path.is_file():
            if _compression(path) and ".parquet." in path.name.lower():
                raise DataError(f"{path}: Parquet compresses inside the file; decompress it to "
                                f"a plain .parquet file")
            if patterns and not _format_of(path, patterns):
                raise DataError(f"{path}: does not match {shown}")
            if not _format_of(path, patterns):
                raise DataError(f"{path}: unsupported file type; expected a name ending in "
                                f"{_SUPPORTED}; {_GLOB_HINT}")
            files.append(path)
        else:
            raise DataError(f"input path {path} does not exist")
    files = list(dict.fromkeys(files))
    if not files:
        where = ", ".join(map(str, paths)) or "(no paths given)"
        if patterns:
            raise DataError(f"no input files in {where}: no file name matches {shown} (hidden "
                            f"files and folders are skipped)")
        raise DataError(f"no input files in {where}: expected names ending in {_SUPPORTED}; "
                        f"{_GLOB_HINT}")
    return files


class _ChunkStream(io.RawIOBase):
    """A readable stream over an iterator of byte chunks, so io.BufferedReader can split lines."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._rest = chunks, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = memoryview(chunk)
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


class _Truncated(Exception):
    """Compressed data that ends inside a frame."""


def _zstd_chunks(raw: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of every zstd frame in `raw`, a chunk at a time.

    The library's stream reader reads a truncated file as if it ended there; a frame-by-frame
    decompressor tells a finished frame from a cut one (`eof`), so a cut download is refused.
    """
    import zstandard

    context = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    frame, inside = context.decompressobj(), False
    while chunk := raw.read(ZSTD_INPUT_BYTES):
        while chunk:
            out = frame.decompress(chunk)
            inside = True
            if out:
                yield out
            if frame.eof:  # the next frame (files may hold several) starts in what is left
                chunk, frame, inside = frame.unused_data, context.decompressobj(), False
            else:
                chunk = b""
    if inside:
        raise _Truncated("the data ends inside a zstd frame: the file is truncated")


def _line_stream(path: Path, raw: BinaryIO) -> BinaryIO:
    compression = _compression(path)
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zst":
        return io.BufferedReader(_ChunkStream(_zstd_chunks(raw)), READ_CHUNK_BYTES)
    return raw


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


def _whole(stream: Iterable[bytes], source: str, stats: ReadStats) -> Iterator[str]:
    """The file as one document, kept exactly (indentation and trailing newline are code)."""
    lines = list(stream)
    if any(b"\0" in line for line in lines):  # git's test for binary; text never holds NUL
        stats.binary_files += 1
        stats.binary_file_names.append(source)
        return
    yield "".join(_decoded_lines(lines, source, stats))


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


def _parquet_texts(path: Path, text_field: str, source: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # buffer_size: read column chunks through a small buffer. Without it pyarrow reads a whole
    # row group's column at once, and row groups of hundreds of MB are common.
    parquet = pq.ParquetFile(path, buffer_size=READ_CHUNK_BYTES, pre_buffer=False)
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r}; it has columns "
                        f"{', '.join(map(repr, schema.names))} (choose one with --text-field)")
    kind = schema.field(text_field).type
    is_binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not (is_binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or str(kind) == "string_view"):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, expected strings")
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if value is None:
                stats.null_texts += 1
                stats.null_texts_by_file[source] += 1
            elif is_binary:
                yield from _decoded_lines([value], source, stats)
            else:
                yield value


def _texts(path: Path, raw: BinaryIO, text_field: str, patterns: tuple[str, ...],
           stats: ReadStats) -> Iterator[str]:
    source, kind = str(path), _format_of(path, patterns)
    if kind == "parquet":
        return _parquet_texts(path, text_field, source, stats)
    stream = _line_stream(path, raw)
    if kind == "whole":
        return _whole(stream, source, stats)
    lines = _decoded_lines(stream, source, stats)
    return _paragraphs(lines) if kind == "paragraphs" else _json_texts(lines, text_field, source,
                                                                       stats)


def _container(path: Path, patterns: tuple[str, ...]) -> str | None:
    """The library format whose damage `iter_documents` reports: gzip, zstd or Parquet."""
    compression = _compression(path)
    if compression:
        return {"gz": "gzip", "zst": "zstd"}[compression]
    return "Parquet" if _format_of(path, patterns) == "parquet" else None


def _read_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa
    import zstandard
    # OSError: pyarrow reports a damaged Parquet file as one ("Couldn't deserialize thrift").
    return (gzip.BadGzipFile, EOFError, zlib.error, zstandard.ZstdError, _Truncated,
            pa.ArrowException, OSError)


def iter_documents(paths: Sequence[PathLike], text_field: str = "text",
                   stats: ReadStats | None = None, glob: Glob = None) -> Iterator[Document]:
    """Yield the non-empty documents of `paths` (files or folders) in a deterministic order.

    glob: file-name patterns selecting the files of folders, each text file read whole as one
    document (module docstring). Counts go into `stats` as reading proceeds; they are complete
    once the iterator is exhausted.
    """
    stats = ReadStats() if stats is None else stats
    patterns = globs(glob)
    errors = _read_errors()
    for path in list_files(paths, patterns):
        stats.files += 1
        index = 0
        try:
            with open(path, "rb") as raw:
                for text in _texts(path, raw, text_field, patterns, stats):
                    if text.strip():
                        stats.documents += 1
                        yield Document(text, str(path), index)
                        index += 1
        except errors as e:
            container = _container(path, patterns)
            if container is None:  # an I/O error on a plain file names it already
                raise
            read = (f"; its first {index} documents were read before the damage" if index
                    else "")
            raise DataError(f"{path}: not a readable {container} file, damaged or truncated "
                            f"({e}){read}") from e


def require_documents(stats: ReadStats, paths: Sequence[PathLike]) -> None:
    """Raise if a finished read found nothing to train on."""
    if stats.documents == 0:
        where = ", ".join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))
        raise DataError(f"no documents found in {where} ({stats.summary()})")
