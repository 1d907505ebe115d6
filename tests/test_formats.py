"""Corpora as they ship: Parquet, zstd and gzip JSON Lines, folders of source code (--glob).

Every file here is real (written with pyarrow, zstandard, gzip); each format must yield exactly the
documents, order and provenance that the same content gives as plain JSON Lines.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from memory3.data import DataError, ReadStats, TokenShards, Tokenizer, iter_documents, list_files
from memory3.data import prepare_data, train_tokenizer
from memory3.data.text import PARQUET_BATCH_ROWS
from conftest import run_memory3

WORDS = "the memory model reads a city ship river north café 東京 данные 😀 42 1984".split()
N_DOCS = 700


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Documents as corpora hold them: inner newlines and blank lines, unicode, edge spaces."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
                      for _ in range(rng.randint(1, 3))]
        texts.append(f"doc {i}: " + "\n\n".join(paragraphs) + (" " if i % 5 == 0 else ""))
    return texts


def jsonl_bytes(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write_zst(path: Path, data: bytes, frames: int = 3) -> Path:
    """zstd in several frames (as pzstd and `zstd -T0` write), cut at line ends."""
    cuts = [0] + [data.index(b"\n", len(data) * k // frames) + 1 for k in range(1, frames)]
    cuts.append(len(data))
    path.write_bytes(b"".join(zstandard.ZstdCompressor(level=3).compress(data[a:b])
                              for a, b in zip(cuts, cuts[1:])))
    return path


def write_parquet(path: Path, texts: list[str | None], field: str = "text",
                  row_group_size: int = 128) -> Path:
    table = pa.table({"id": list(range(len(texts))), field: texts,
                      "url": [f"https://example.org/{i}" for i in range(len(texts))]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts(N_DOCS)


@pytest.fixture(scope="module")
def corpus(texts, tmp_path_factory) -> Path:
    """The same documents as .jsonl (the reference), .jsonl.zst, .jsonl.gz and .parquet."""
    folder = tmp_path_factory.mktemp("formats")
    (folder / "ref.jsonl").write_bytes(jsonl_bytes(texts))
    write_zst(folder / "docs.jsonl.zst", jsonl_bytes(texts))
    with gzip.open(folder / "docs.jsonl.gz", "wb") as f:
        f.write(jsonl_bytes(texts))
    write_parquet(folder / "docs.parquet", texts)
    return folder


def read(path: Path, **kwargs) -> tuple[list[str], list[int], set[str], ReadStats]:
    stats = ReadStats()
    docs = list(iter_documents([path], stats=stats, **kwargs))
    return [d.text for d in docs], [d.index for d in docs], {d.source for d in docs}, stats


@pytest.mark.parametrize("name", ["docs.jsonl.zst", "docs.jsonl.gz", "docs.parquet"])
def test_format_reads_as_the_same_jsonl(corpus, texts, name):
    path = corpus / name
    if name.endswith(".parquet"):  # the reader must cross row groups and batches
        assert pq.ParquetFile(path).metadata.num_row_groups == -(-N_DOCS // 128) > 1
        assert N_DOCS > 2 * PARQUET_BATCH_ROWS
    got, indices, sources, stats = read(path)
    ref_texts, ref_indices, _, _ = read(corpus / "ref.jsonl")
    assert ref_texts == texts  # the reference itself is right
    assert got == ref_texts and indices == ref_indices == list(range(N_DOCS))
    assert sources == {str(path)}
    assert stats.files == 1 and stats.documents == N_DOCS and not stats.skipped_anything()


def test_folder_of_formats_in_sorted_order(corpus, texts):
    docs = list(iter_documents([corpus]))
    order = [Path(d.source).name for d in docs]
    assert list(dict.fromkeys(order)) == ["docs.jsonl.gz", "docs.jsonl.zst", "docs.parquet",
                                          "ref.jsonl"]
    assert [d.text for d in docs] == texts * 4


def test_text_field_selects_the_parquet_column_and_nulls_are_counted(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", ["first", None, "  ", "third", None],
                         field="content", row_group_size=2)
    got, indices, _, stats = read(path, text_field="content")
    assert got == ["first", "third"] and indices == [0, 1]
    assert stats.null_texts == 2 and stats.null_texts_by_file == {str(path): 2}
    assert "skipped 2 null Parquet texts" in stats.summary()
    with pytest.raises(DataError) as e:
        list(iter_documents([path]))
    assert str(path) in str(e.value)
    assert "no column 'text'" in str(e.value) and "'id', 'content', 'url'" in str(e.value)
    with pytest.raises(DataError, match=r"column 'id' holds int64, expected strings"):
        list(iter_documents([path], text_field="id"))


def test_parquet_streams_a_large_row_group(tmp_path):
    """One 48 MB row group (common in shipped datasets) read in a fresh process: pyarrow's peak
    allocation stays under half of it. Reading whole column chunks would need all of it."""
    text = os.urandom(24 << 20).hex()  # random: neither compression nor dictionaries shrink it
    path = write_parquet(tmp_path / "big.parquet", [text[i:i + 4000]
                                                    for i in range(0, len(text), 4000)],
                         row_group_size=1 << 30)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    code = ("import sys, pyarrow as pa; from memory3.data import iter_documents; "
            "n = sum(len(d.text) for d in iter_documents([sys.argv[1]])); "
            "print(n, pa.default_memory_pool().max_memory())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True).stdout.split()
    chars, peak = int(out[0]), int(out[1])
    assert chars == len(text) and peak < len(text) // 2, (chars, peak)


def test_binary_parquet_column_is_decoded_line_by_value(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok \xc3\xa9", b"bad \xff", None],
                                              type=pa.binary())}), path)
    got, _, _, stats = read(path)
    assert got == ["ok é"] and stats.undecodable_lines == 1 and stats.null_texts == 1


def test_truncated_zstd_names_the_file_and_what_was_read(corpus, tmp_path):
    data = (corpus / "docs.jsonl.zst").read_bytes()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(data[:len(data) * 5 // 6])  # inside the last frame: earlier frames are whole
    with pytest.raises(DataError) as e:
        list(iter_documents([cut]))
    message = str(e.value)
    assert message.startswith(f"{cut}: not a readable zstd file, damaged or truncated")
    assert "truncated" in message and "documents were read before the damage" in message
    assert "Traceback" not in message
    with pytest.raises(DataError) as e:  # through sentencepiece's trainer, still our message
        train_tokenizer([cut], tmp_path / "tok", 300, progress=False)
    assert str(e.value) == message
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this was never zstd\n" * 10)
    with pytest.raises(DataError, match=f"{garbage}: not a readable zstd file"):
        list(iter_documents([garbage]))


def test_damaged_parquet_and_gzip_name_the_file(corpus, tmp_path):
    data = (corpus / "docs.parquet").read_bytes()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(data[:len(data) // 2])  # no footer left
    with pytest.raises(DataError, match=f"{bad}: not a readable Parquet file"):
        list(iter_documents([bad]))
    data = (corpus / "docs.jsonl.gz").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=f"{cut}: not a readable gzip file.*were read before"):
        list(iter_documents([cut]))
    squeezed = tmp_path / "x.parquet.zst"
    squeezed.write_bytes(b"")
    with pytest.raises(DataError, match="Parquet compresses inside the file"):
        list_files([squeezed])


def test_zstd_text_is_paragraphs_like_plain_text(tmp_path):
    text = "one\nstill one\n\n\ntwo\n\nthree\n"
    (tmp_path / "p.txt").write_text(text)
    write_zst(tmp_path / "p.txt.zst", text.encode(), frames=2)
    assert read(tmp_path / "p.txt.zst")[0] == read(tmp_path / "p.txt")[0] == [
        "one\nstill one", "two", "three"]


# ---- a folder of source code, read with a glob ----

def write_code(folder: Path) -> dict[str, str]:
    """A small checkout: .py files at several depths (one with blank lines inside functions),
    plus what a glob for *.py must leave out."""
    sources = {
        "pkg/__init__.py": "",  # empty: no document
        "pkg/core.py": "def f(x):\n    y = x + 1\n\n    return y\n\n\nclass A:\n    pass\n",
        "pkg/sub/util.py": "# café 東京\nimport os\n\n\n\nPATH = os.sep  \n",
        "setup.py": "from setuptools import setup\n\nsetup()",
        "tools/run.py": "\tprint('tabs and trailing spaces')   \n\n",
    }
    for name, text in sources.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / ".venv" / "lib").mkdir(parents=True)
    (folder / ".venv" / "lib" / "site.py").write_text("vendored = True\n")  # hidden: skipped
    (folder / "pkg" / "blob.py").write_bytes(b"x = 1\n\x00\x01binary\n")  # NUL: binary, skipped
    (folder / "README.md").write_text("not python\n")
    (folder / "c_ext.c").write_text("int main(void) { return 0; }\n")
    return {name: text for name, text in sources.items() if text.strip()}


def test_glob_reads_each_matching_file_whole(tmp_path):
    expected = write_code(tmp_path / "repo")
    stats = ReadStats()
    docs = list(iter_documents([tmp_path / "repo"], stats=stats, glob="*.py"))
    assert [Path(d.source).relative_to(tmp_path / "repo").as_posix() for d in docs] == \
        sorted(expected)  # sorted paths, recursive
    assert [d.text for d in docs] == [expected[name] for name in sorted(expected)]
    assert all(d.index == 0 for d in docs)
    assert stats.binary_files == 1 and stats.binary_file_names == [
        str(tmp_path / "repo" / "pkg" / "blob.py")]
    assert "skipped 1 binary files" in stats.summary()

    both = [Path(d.source).name for d in iter_documents([tmp_path / "repo"], glob=["*.c", "*.md"])]
    assert both == ["README.md", "c_ext.c"]  # README.md is one document too, not paragraphs

    direct = tmp_path / "repo" / ".venv" / "lib" / "site.py"  # named directly: read
    assert [d.text for d in iter_documents([direct], glob="*.py")] == ["vendored = True\n"]


def test_without_a_glob_a_folder_of_code_is_refused_with_a_hint(tmp_path):
    write_code(tmp_path / "repo")
    (tmp_path / "repo" / "README.md").unlink()
    with pytest.raises(DataError) as e:
        list_files([tmp_path / "repo"])
    assert "no input files" in str(e.value) and "--glob '*.py'" in str(e.value)
    with pytest.raises(DataError, match="unsupported file type.*--glob"):
        list_files([tmp_path / "repo" / "setup.py"])
    with pytest.raises(DataError, match=r"setup.py: does not match --glob '\*.c'"):
        list_files([tmp_path / "repo" / "setup.py"], glob="*.c")
    with pytest.raises(DataError, match=r"no file name matches --glob '\*.rs'"):
        list_files([tmp_path / "repo"], glob="*.rs")
    with pytest.raises(DataError, match="patterns match file names"):
        list_files([tmp_path / "repo"], glob="pkg/*.py")


def test_glob_selects_record_files_without_changing_how_they_read(corpus, texts):
    docs = list(iter_documents([corpus], glob="*.parquet"))
    assert [d.text for d in docs] == texts and {Path(d.source).name for d in docs} == {
        "docs.parquet"}


# ---- prepare-data end to end ----

def shard_documents(data_dir: Path, tokenizer: Tokenizer) -> list[str]:
    """The documents of a prepared folder's train split, decoded between BOS and EOS."""
    tokens = TokenShards(data_dir, "train", verify=True)
    ids = tokens.read(0, len(tokens))
    starts = np.flatnonzero(ids == tokenizer.bos_id)
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    assert len(starts) == len(ends) and np.all(starts < ends)
    return [tokenizer.decode(ids[s + 1:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def code_repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("code") / "repo"
    return root, write_code(root)


@pytest.fixture(scope="module")
def tokenizer(corpus, code_repo, tmp_path_factory) -> Tokenizer:
    """Trained by the command on the Parquet column and on the code, so both paths run there."""
    out = tmp_path_factory.mktemp("tok")
    run_memory3("train-tokenizer", str(corpus / "docs.parquet"), str(code_repo[0]),
                "--glob", "*.py", "--glob", "*.parquet", "--out", str(out), "--vocab-size", "400")
    return Tokenizer(out)


def test_prepare_data_on_parquet(corpus, texts, tokenizer, tmp_path):
    source = tmp_path / "c.parquet"
    write_parquet(source, texts, field="body", row_group_size=100)
    out = tmp_path / "shards"
    run_memory3("prepare-data", str(source), "--text-field", "body", "--tokenizer",
                str(tokenizer.path), "--out", str(out), "--valid-fraction", "0",
                "--shard-tokens", "5000")
    assert len(json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]) > 1
    assert shard_documents(out, tokenizer) == texts


def test_prepare_data_on_a_folder_of_code(code_repo, tokenizer, tmp_path):
    repo, expected = code_repo
    out = tmp_path / "shards"
    proc = run_memory3("prepare-data", str(repo), "--glob", "*.py", "--tokenizer",
                       str(tokenizer.path), "--out", str(out), "--valid-fraction", "0")
    assert shard_documents(out, tokenizer) == [expected[name] for name in sorted(expected)]
    assert "skipped 1 binary files" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["glob"] == ["*.py"] and manifest["read_stats"]["binary_files"] == 1

    refused = run_memory3("prepare-data", str(repo / "pkg"), "--tokenizer", str(tokenizer.path),
                          "--out", str(tmp_path / "none"), check=False)
    assert refused.returncode == 2 and "--glob '*.py'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_resume_with_another_glob_is_refused(tokenizer, tmp_path):
    """The same .txt files read whole (glob) or as paragraphs (none) are two corpora: a resume
    must not mix them, even though the input files are the same."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("one\n\ntwo\n")
    out = tmp_path / "shards"
    whole = prepare_data([tmp_path / "in"], tokenizer.path, out, valid_fraction=0, glob="*.txt",
                         progress=False)
    assert whole["splits"]["train"]["documents"] == 1
    (out / "manifest.json").write_text(json.dumps({**whole, "complete": False}))
    with pytest.raises(DataError, match="different glob"):
        prepare_data([tmp_path / "in"], tokenizer.path, out, valid_fraction=0, progress=False)
    paragraphs = prepare_data([tmp_path / "in"], tokenizer.path, tmp_path / "p", valid_fraction=0,
                              progress=False)
    assert paragraphs["splits"]["train"]["documents"] == 2


def test_eval_sequences_read_a_glob(code_repo, tokenizer):
    """`memory3 eval --data REPO --glob '*.py'` scores the same whole-file documents."""
    from memory3.eval.perplexity import text_sequences

    repo, expected = code_repo
    stream = [t for name in sorted(expected)
              for t in (tokenizer.bos_id, *tokenizer.encode(expected[name]), tokenizer.eos_id)]
    seqs = text_sequences([repo], tokenizer, 15, glob="*.py")
    n = len(stream) // 16
    assert seqs.shape == (n, 16) and seqs.flatten().tolist() == stream[:n * 16]
