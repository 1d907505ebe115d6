"""Data pipeline: reading text, tokenizer, resumable token shards, packed loader."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from memory3.data import (DataError, PackedLoader, ReadStats, Tokenizer, TokenShards,
                          iter_documents, iter_eval_batches, load_manifest, prepare_data,
                          require_documents, train_tokenizer)
from memory3.data import shards as shards_module
from conftest import writer_holding

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a of memory model token shard river city ship north quiet green seven 1984 42 "
         "café naïve über 東京 данные λόγος 😀").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "."


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(1, 6)))


def write_corpus(folder: Path, n_paragraphs: int, seed: int = 0) -> Path:
    """A .txt, a .md, a .txt.gz and a .jsonl.gz (with two bad lines) of random paragraphs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    parts = [[paragraph(rng) for _ in range(n_paragraphs // 4)] for _ in range(4)]
    (folder / "a.txt").write_text("\n\n".join(parts[0]) + "\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.md").write_text("\n\n\n".join(parts[1]))
    with gzip.open(folder / "sub" / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(parts[2]))
    with gzip.open(folder / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in parts[3]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
        f.write("{not json\n" + json.dumps({"body": "no text field"}) + "\n")
    (folder / "ignored.csv").write_text("a,b\n")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", 400)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok"), 500, progress=False)


@pytest.fixture(scope="module")
def data_dir(corpus, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_data([corpus], tokenizer.path, out, shard_tokens=1000, valid_fraction=0.1,
                 progress=False)
    return out


# ---- reading text ----

def test_reads_formats_in_sorted_order(corpus):
    stats = ReadStats()
    docs = list(iter_documents([corpus], stats=stats))
    sources = [Path(d.source).name for d in docs]
    assert list(dict.fromkeys(sources)) == ["a.txt", "d.jsonl.gz", "b.md", "c.txt.gz"]
    assert len(docs) == stats.documents == 400
    assert stats.files == 4 and stats.bad_json_lines == 2 and stats.undecodable_lines == 0
    assert [d.index for d in docs if d.source.endswith("b.md")] == list(range(100))
    assert all(d.text == d.text.strip() and "\n\n" not in d.text for d in docs)
    assert "2 bad JSON lines" in stats.summary()


def test_paragraphs_and_undecodable_lines(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"first line\r\nstill first\r\n\r\n\n  \nsecond \xff\xfe bad\nsecond ok\n\n"
                     b"\xc3\n\nthird\n")
    stats = ReadStats()
    texts = [d.text for d in iter_documents([path], stats=stats)]
    assert texts == ["first line\r\nstill first", "second ok", "third"]
    assert stats.undecodable_lines == 2 and stats.undecodable_by_file == {str(path): 2}
    assert "skipped 2 undecodable lines" in stats.summary()


def test_json_lines_field_and_bad_lines(tmp_path):
    path = tmp_path / "x.json"
    lines = [json.dumps({"body": " keep  spaces "}), "[1, 2]", json.dumps({"body": 3}),
             json.dumps({"text": "wrong field"}), "", r'{"body": "lone \ud800 surrogate"}',
             json.dumps({"body": "   "})]
    path.write_text("\n".join(lines))
    stats = ReadStats()
    assert [d.text for d in iter_documents([path], "body", stats)] == [" keep  spaces "]
    assert stats.bad_json_lines == 4


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="nope.txt does not exist"):
        list(iter_documents([tmp_path / "nope.txt"]))
    with pytest.raises(DataError, match="no input files"):
        list(iter_documents([tmp_path]))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_documents([tmp_path / "x.csv"]))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    stats = ReadStats()
    assert list(iter_documents([tmp_path], stats=stats)) == []
    with pytest.raises(DataError, match="no documents found"):
        require_documents(stats, [tmp_path])


# ---- tokenizer ----

def test_tokenizer_special_ids_and_round_trip(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
            tokenizer.ref_bos_id) == (0, 1, 2, 3, 4)
    assert tokenizer.vocab_size == 500
    assert Tokenizer(tokenizer.path.parent).sha256 == tokenizer.sha256
    texts = ["The quiet river of memory.", "  leading and  double  spaces\n\ttab",
             "naïve café 東京 данные 😀 and ☃ never seen", "<ref> is just text <s></s>", ""]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert not set(ids) & {0, 1, 2, 3, 4}
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    ids = tokenizer.encode("seven rivers")
    assert tokenizer.decode([tokenizer.ref_bos_id, tokenizer.bos_id, *ids, tokenizer.eos_id,
                             tokenizer.pad_id]) == "seven rivers"


def test_token_bytes_count_the_text_each_token_decodes_to(tokenizer):
    table = tokenizer.token_bytes()
    assert table.shape == (tokenizer.vocab_size,) and (table[:5] == 0).all()
    # Each token's bytes add up to the text's, whitespace runs and byte-fallback characters
    # included; control tokens add nothing.
    for text in ["The quiet river of memory.", "naïve café 東京 данные 😀 and ☃ never seen",
                 "x  =  [1,\t2]  # spaces\n"]:
        ids = tokenizer.encode(text)
        assert table[ids].sum() == len(text.encode("utf-8")), text
        assert table[[tokenizer.bos_id, *ids, tokenizer.eos_id]].sum() == table[ids].sum()


def test_tokenizer_training_is_reproducible(tokenizer, corpus, tmp_path):
    again = train_tokenizer([corpus], tmp_path, 500, progress=False)
    assert again.sha256 == tokenizer.sha256
    vocab = (tmp_path / "tokenizer.vocab").read_text().splitlines()
    assert len(vocab) == 500 and vocab[4] == "<ref>\t0"
    # Sampling lines too (more of them than max_sentences), in fresh processes: sentencepiece's
    # own sampler ignored its seed and gave each process a different tokenizer.
    train = ("import sys; from memory3.data import train_tokenizer; "
             "print(train_tokenizer([sys.argv[1]], sys.argv[2], 500, max_sentences=150, "
             "progress=False).sha256)")
    runs = [subprocess.run([sys.executable, "-c", train, str(corpus), str(tmp_path / f"s{i}")],
                           capture_output=True, text=True, check=True) for i in range(3)]
    sampled = {run.stdout.split()[-1] for run in runs}  # after any note on skipped input
    assert len(sampled) == 1 and sampled.pop() != tokenizer.sha256


def test_tokenizer_rejects_other_models(tmp_path, corpus):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(d.text for d in iter_documents([corpus])),
        model_prefix=str(tmp_path / "default"), vocab_size=100, minloglevel=2)
    with pytest.raises(DataError, match="special token ids"):
        Tokenizer(tmp_path / "default.model")


def test_train_tokenizer_errors(tmp_path, corpus):
    with pytest.raises(DataError, match="too small"):
        train_tokenizer([corpus], tmp_path / "t", 200, progress=False)
    with pytest.raises(DataError, match="Vocabulary size too high"):
        train_tokenizer([corpus / "a.txt"], tmp_path / "t", 20000, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no documents found"):
        train_tokenizer([tmp_path / "empty"], tmp_path / "t", 400, progress=False)
    assert not (tmp_path / "t").exists()


# ---- shards ----

def expected_streams(corpus: Path, tokenizer: Tokenizer, valid_fraction: float,
                     seed: int = 0) -> dict[str, list[int]]:
    streams: dict[str, list[int]] = {"train": [], "valid": []}
    for doc in iter_documents([corpus]):
        split = "valid" if shards_module._is_valid(doc.text, seed, valid_fraction) else "train"
        streams[split] += [tokenizer.bos_id, *tokenizer.encode(doc.text), tokenizer.eos_id]
    return streams


def test_prepare_data_manifest_and_tokens(data_dir, corpus, tokenizer):
    manifest = load_manifest(data_dir)
    assert manifest["complete"] and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == tokenizer.sha256
    assert manifest["read_stats"]["bad_json_lines"] == 2
    assert len(manifest["settings"]["inputs"]) == 4
    expected = expected_streams(corpus, tokenizer, 0.1)
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "valid")) == 400
    for split, tokens in expected.items():
        entry = manifest["splits"][split]
        assert entry["tokens"] == len(tokens) == sum(s["tokens"] for s in entry["shards"])
        assert all(s["tokens"] >= 1000 for s in entry["shards"][:-1])
        ts = TokenShards(data_dir, split, verify=True)
        assert len(ts) == len(tokens) and ts.vocab_size == 500
        assert ts.read(0, len(ts)).tolist() == tokens
        boundary = entry["shards"][0]["tokens"]
        assert ts.read(boundary - 5, 10).tolist() == tokens[boundary - 5:boundary + 5]
    assert len(entry["shards"]) > 1 and len(manifest["splits"]["train"]["shards"]) > 10
    with pytest.raises(IndexError):
        ts.read(len(ts) - 3, 4)


def test_valid_split_edge_cases(tmp_path, tokenizer):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("First small document.\n\nSecond small document.\n")
    manifest = prepare_data([corpus], tokenizer.path, tmp_path / "a", valid_fraction=1e-6,
                            progress=False)
    assert [manifest["splits"][s]["documents"] for s in ("train", "valid")] == [1, 1]
    assert TokenShards(tmp_path / "a", "valid").read(0, 3).tolist()[0] == tokenizer.bos_id
    manifest = prepare_data([corpus], tokenizer.path, tmp_path / "b", valid_fraction=0,
                            progress=False)
    assert manifest["splits"]["valid"]["tokens"] == 0
    with pytest.raises(DataError, match="'valid' .* is empty"):
        TokenShards(tmp_path / "b", "valid")


def test_prepare_data_refuses_empty_input(tmp_path, tokenizer):
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no documents found"):
        prepare_data([tmp_path / "e.txt"], tokenizer.path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file but the write lock, whose record names the process that last held it."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "write.lock"}


def test_complete_rerun_is_noop_and_changes_are_refused(data_dir, corpus, tokenizer, tmp_path,
                                                        capsys):
    before = snapshot(data_dir)
    mtimes = {name: (data_dir / name).stat().st_mtime_ns for name in before}
    prepare_data([corpus], tokenizer.path, data_dir, shard_tokens=1000, valid_fraction=0.1,
                 progress=False)
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(data_dir) == before
    assert {name: (data_dir / name).stat().st_mtime_ns for name in before} == mtimes
    with pytest.raises(DataError, match="shard_tokens.*fresh output directory"):
        prepare_data([corpus], tokenizer.path, data_dir, shard_tokens=4000, valid_fraction=0.1,
                     progress=False)
    with pytest.raises(DataError, match="inputs"):
        prepare_data([corpus / "a.txt"], tokenizer.path, data_dir, shard_tokens=1000,
                     valid_fraction=0.1, progress=False)
    other = train_tokenizer([corpus], tmp_path / "tok2", 450, progress=False)
    with pytest.raises(DataError, match="tokenizer sha256"):
        prepare_data([corpus], other.path, data_dir, shard_tokens=1000, valid_fraction=0.1,
                     progress=False)


def test_worker_count_changes_no_byte(corpus, tokenizer, tmp_path, monkeypatch, capsys):
    """prepare-data with 1 or 3 tokenization threads (and the CLI's default, every core) writes
    the same files; the count is no setting, so a folder resumes under another one."""
    from memory3.cli import main
    threads = []
    encode = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch",
                        lambda self, texts: threads.append(self.num_threads) or encode(self, texts))
    args = dict(shard_tokens=1000, valid_fraction=0.1, progress=False)
    prepare_data([corpus], tokenizer.path, tmp_path / "one", workers=1, **args)
    prepare_data([corpus], tokenizer.path, tmp_path / "three", workers=3, **args)
    assert set(threads) == {1, 3}
    assert len(snapshot(tmp_path / "one")) > 5  # several shards, their .crc files, the manifest
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "three")

    threads.clear()
    main(["prepare-data", str(corpus), "--tokenizer", str(tokenizer.path), "--out",
          str(tmp_path / "cli"), "--shard-tokens", "1000", "--valid-fraction", "0.1"])
    assert set(threads) == {os.cpu_count()}
    assert snapshot(tmp_path / "cli") == snapshot(tmp_path / "one")
    prepare_data([corpus], tokenizer.path, tmp_path / "one", workers=2, **args)
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(DataError, match="workers must be at least 1, got 0"):
        prepare_data([corpus], tokenizer.path, tmp_path / "zero", workers=0, **args)


def test_resume_after_sigkill_is_byte_identical(tmp_path, corpus, tokenizer, monkeypatch):
    args = dict(shard_tokens=2000, valid_fraction=0.1, progress=False)
    unbroken = tmp_path / "unbroken"
    prepare_data([corpus], tokenizer.path, unbroken, **args)

    killed = tmp_path / "killed"
    # Small tokenizer batches, so that shards are committed one by one as the run goes.
    code = (f"from memory3.data import prepare_data, shards; shards.BATCH_CHARS = 1000; "
            f"prepare_data([{str(corpus)!r}], {str(tokenizer.path)!r}, {str(killed)!r}, "
            f"**{args!r})")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), shards_module.SLOW_SHARD_ENV: "0.2"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                manifest = json.loads((killed / "manifest.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                manifest = None
            if manifest and len(manifest["splits"]["train"]["shards"]) >= 2:
                break
            assert child.poll() is None, "prepare_data ended before it could be killed"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    manifest = load_manifest(killed)
    assert not manifest["complete"]
    with pytest.raises(DataError, match="incomplete"):
        TokenShards(killed)
    # What a kill mid-write leaves behind, and a file of the user's that must survive.
    n_committed = len(manifest["splits"]["train"]["shards"])
    (killed / f"train-{n_committed:05d}.bin").write_bytes(b"uncommitted")
    (killed / f"train-{n_committed + 1:05d}.bin.tmp").write_bytes(b"partial")
    (killed / "manifest.json.tmp").write_bytes(b"{")
    (killed / "notes.txt").write_text("mine")

    monkeypatch.delenv(shards_module.SLOW_SHARD_ENV, raising=False)
    prepare_data([corpus], tokenizer.path, killed, **args)
    assert (killed / "notes.txt").read_text() == "mine"
    (killed / "notes.txt").unlink()
    assert snapshot(killed) == snapshot(unbroken)


# Second case: no document hashes into valid, so the last one is moved there at the end, and
# every document fills a shard and is its own tokenizer batch.
@pytest.mark.parametrize("n_paragraphs,valid_fraction,shard_tokens,batch_chars",
                         [(40, 0.2, 150, 500), (16, 1e-6, 1, 1)])
def test_resume_from_every_crash_point(tmp_path, tokenizer, monkeypatch, n_paragraphs,
                                       valid_fraction, shard_tokens, batch_chars):
    corpus = write_corpus(tmp_path / "small", n_paragraphs, seed=1)
    monkeypatch.setattr(shards_module, "BATCH_CHARS", batch_chars)
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not under test here: speed
    args = dict(shard_tokens=shard_tokens, valid_fraction=valid_fraction, progress=False)
    manifest = prepare_data([corpus], tokenizer.path, tmp_path / "unbroken", **args)
    assert manifest["splits"]["valid"]["documents"] > 0
    expected = snapshot(tmp_path / "unbroken")
    real_write = shards_module.write_atomic
    crash_at = 0
    while True:
        out = tmp_path / f"crash{crash_at}"
        writes = 0

        def crashing_write(path, data):
            nonlocal writes
            if writes == crash_at:
                raise KeyboardInterrupt  # as if killed just before this write
            writes += 1
            real_write(path, data)

        monkeypatch.setattr(shards_module, "write_atomic", crashing_write)
        try:
            prepare_data([corpus], tokenizer.path, out, **args)
            break  # crash_at is past the last write
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(shards_module, "write_atomic", real_write)
        prepare_data([corpus], tokenizer.path, out, **args)
        assert snapshot(out) == expected, f"crash before write {crash_at}"
        crash_at += 1
    assert crash_at > 10


def test_only_the_damaged_block_of_a_shard_is_refused(tmp_path, tokenizer, corpus, monkeypatch):
    monkeypatch.setattr(shards_module, "BLOCK_TOKENS", 64)
    prepare_data([corpus], tokenizer.path, tmp_path / "d", valid_fraction=0.1, progress=False)
    shard = tmp_path / "d" / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[2 * (3 * 64 + 5)] ^= 1  # token 197: block 3
    shard.write_bytes(bytes(data))
    ts = TokenShards(tmp_path / "d")
    ts.read(0, 192), ts.read(256, 500)  # blocks 0-2 and 4-11 are intact
    with pytest.raises(DataError, match=r"train-00000\.bin: tokens 192\.\.255 do not match"):
        ts.read(150, 50)


def test_a_second_writer_is_refused_and_a_killed_writers_lock_taken_over(tmp_path, corpus,
                                                                          tokenizer):
    with writer_holding(tmp_path / "d") as pid:
        with pytest.raises(DataError, match=rf"write\.lock is locked: another process is writing "
                                            rf".*\(pid {pid} on "):
            prepare_data([corpus], tokenizer.path, tmp_path / "d", progress=False)
    assert f"pid {pid} " in (tmp_path / "d" / "write.lock").read_text()  # left by the killed one
    prepare_data([corpus], tokenizer.path, tmp_path / "d", progress=False)
    assert load_manifest(tmp_path / "d")["complete"]


def test_shard_damage_is_detected(tmp_path, data_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name, data in snapshot(data_dir).items():
        (broken / name).write_bytes(data)
    shard = broken / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    ts = TokenShards(broken)  # same size: only a checksum finds it, when the tokens are read
    first = load_manifest(broken)["splits"]["train"]["shards"][0]["tokens"]
    ts.read(0, first)  # the intact shard reads as ever
    with pytest.raises(DataError, match=r"train-00001\.bin: tokens 0\.\.\d+ do not match their "
                                        r"checksum in .*train-00001\.crc"):
        ts.read(first + 100, 10)  # the same block as the flipped byte
    with pytest.raises(DataError, match="train-00001.bin does not match its sha256"):
        TokenShards(broken, verify=True)
    crc = broken / "train-00001.crc"
    crc.write_bytes(crc.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"train-00001\.crc missing or not matching their sha256"):
        TokenShards(broken)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="train-00001.bin has .* bytes"):
        TokenShards(broken)
    shard.unlink()
    with pytest.raises(DataError, match="train-00001.bin listed in the manifest does not exist"):
        TokenShards(broken)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShards(data_dir, "test")
    with pytest.raises(DataError, match="manifest.json does not exist"):
        TokenShards(tmp_path)


# ---- loader ----

@pytest.fixture(scope="module")
def train_shards(data_dir) -> TokenShards:
    return TokenShards(data_dir)


def take(loader: PackedLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_loader_batches_are_shifted_sequences(train_shards):
    loader = PackedLoader(train_shards, 32, 4, seed=3)
    assert loader.n_sequences == (len(train_shards) - 1) // 32
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.int64
    first = int(loader._epoch_permutation()[0])
    row = train_shards.read(first * 32, 33)
    assert inputs[0].tolist() == row[:-1].tolist() and targets[0].tolist() == row[1:].tolist()


def test_loader_is_deterministic(train_shards):
    a = take(PackedLoader(train_shards, 32, 4, seed=1), 5)
    b = take(PackedLoader(train_shards, 32, 4, seed=1), 5)
    c = take(PackedLoader(train_shards, 32, 4, seed=2), 5)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_ranks_split_the_global_batch(train_shards):
    single = take(PackedLoader(train_shards, 16, 6), 7)
    ranks = [take(PackedLoader(train_shards, 16, 2, rank=r, world_size=3), 7) for r in range(3)]
    for step, (inputs, targets) in enumerate(single):
        assert torch.equal(torch.cat([r[step][0] for r in ranks]), inputs)
        assert torch.equal(torch.cat([r[step][1] for r in ranks]), targets)


def test_epochs_roll_over_and_cover_each_sequence_once(train_shards):
    loader = PackedLoader(train_shards, 64, 3, seed=5)
    per_epoch = loader.batches_per_epoch
    seen = [tuple(x.tolist()) for _ in range(per_epoch) for x in loader.next_batch()[0]]
    assert len(set(seen)) == per_epoch * 3 and loader.epoch == 0
    loader.next_batch()
    assert loader.epoch == 1 and loader.batch_in_epoch == 1
    assert not np.array_equal(loader._epoch_permutation(),
                              np.random.default_rng((5, 0)).permutation(loader.n_sequences))


def test_loader_resumes_mid_epoch(train_shards):
    unbroken = PackedLoader(train_shards, 32, 2, rank=1, world_size=2, seed=7)
    reference = take(unbroken, 12)
    first = PackedLoader(train_shards, 32, 2, rank=1, world_size=2, seed=7)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint as JSON
    resumed = PackedLoader(train_shards, 32, 2, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(take(resumed, 7), reference[5:]))

    # Same global batch of 4, now on one rank: it continues with both ranks' sequences.
    whole = PackedLoader(train_shards, 32, 4, seed=7)
    whole.load_state_dict(state)
    assert torch.equal(whole.next_batch()[0][2:], reference[5][0])
    with pytest.raises(DataError, match="global batch"):
        PackedLoader(train_shards, 32, 3, seed=7).load_state_dict(
            {**state, "batch_in_epoch": 1})
    with pytest.raises(DataError, match="seq_len"):
        PackedLoader(train_shards, 16, 2, rank=1, world_size=2, seed=7).load_state_dict(state)


def test_loader_rejects_too_little_data(train_shards):
    n_sequences = (len(train_shards) - 1) // 64
    with pytest.raises(DataError, match=f"{n_sequences} sequences .* {n_sequences + 1}"):
        PackedLoader(train_shards, 64, n_sequences + 1)
    with pytest.raises(DataError, match="rank 2"):
        PackedLoader(train_shards, 64, 1, rank=2, world_size=2)


def test_eval_batches_are_fixed_and_split_across_ranks(data_dir):
    valid = TokenShards(data_dir, "valid")
    once = list(iter_eval_batches(valid, 16, 4, max_batches=3))
    assert len(once) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(once, iter_eval_batches(valid, 16, 4, 3)))
    assert once[0][0][1].tolist() == valid.read(16, 16).tolist()
    ranks = [list(iter_eval_batches(valid, 16, 2, 3, rank=r, world_size=2)) for r in range(2)]
    for step, (inputs, _) in enumerate(once):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), inputs)
    assert len(list(iter_eval_batches(valid, 16, 1))) == (len(valid) - 1) // 16
