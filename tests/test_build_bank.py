"""`memory3 build-bank`: a real checkpoint and knowledge base -> a bank; resume after SIGKILL is
byte-identical to an unbroken build; bad input fails clearly and damages nothing."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from memory3.config import ModelConfig, Recipe
from memory3.data import DataError, Tokenizer, iter_documents, load_manifest
from memory3.data.synthetic import make_world, write_world
from memory3.memory import BankError, MemoryBank, MemoryEncoder, build_bank, iter_references
from memory3.memory.build import SLOW_SHARD_ENV, encode_in_batches
from memory3.train.checkpoint import load_model
from memory3.train.trainer import train

LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory) -> Path:
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", "train.max_steps=5", "train.save_every=5",
         "train.eval_every=5", "model.memory_layers=\"all\""])
    run = tmp_path_factory.mktemp("bank_run")
    train(recipe, run, progress=False)
    return run


@pytest.fixture(scope="module")
def knowledge(tmp_path_factory) -> Path:
    return write_world(make_world(seed=0, n_entities=40), tmp_path_factory.mktemp("kb"))["knowledge"]


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True,
        wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m memory3.memory.cli ARGS` in a fresh process, outside any launcher."""
    cmd = [sys.executable, "-m", "memory3.memory.cli", *args]
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    full_env.update(env or {})
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                             f"\n{proc.stderr[-5000:]}")
    return proc


def build_args(checkpoint: Path, knowledge: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--knowledge", str(knowledge), "--out", str(out),
            "--shard-memories", "8", "--batch-size", "3", "--no-progress", *extra]


def bank_files(bank: Path) -> dict[str, str]:
    """sha256 of every file of a bank folder (the lock file is no content)."""
    return {str(p.relative_to(bank)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bank.rglob("*")) if p.is_file() and p.name != "write.lock"}


@pytest.fixture(scope="module")
def built(checkpoint, knowledge, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("built") / "bank"
    return out, cli(*build_args(checkpoint, knowledge, out)).stdout


def tokenizer_of(checkpoint: Path) -> Tokenizer:
    recipe = load_model(checkpoint)[1]
    return Tokenizer(load_manifest(recipe.data.path)["tokenizer"]["path"])


def test_built_bank_holds_every_reference_with_its_memory(built, checkpoint, knowledge):
    out, stdout = built
    layout_bytes = 2 * 2 * 2 * 8 * 16 * 2  # tiny, all layers: (2, 2, 2, 8, 16) in bf16
    assert "references/s" in stdout and f"{layout_bytes:,} bytes per memory" in stdout
    refs = list(iter_references([knowledge], tokenizer_of(checkpoint), 128))
    bank = MemoryBank.open(out)
    assert len(bank) == len(refs) and bank.stats()["memories"] == len(refs)
    assert len(bank.manifest["segments"]) == -(-len(refs) // 8)
    build = bank.manifest["builds"][0]
    assert build["complete"] and build["references"] == len(refs)
    assert build["read_stats"]["documents"] == 40

    ids, _ = bank.retrieve([r.text for r in refs], k=1)
    assert ids[:, 0].tolist() == list(range(len(refs)))
    record = bank.references([5])[0]
    assert (record.key, record.doc_id, record.start, record.end) == (
        refs[5].key, refs[5].doc_id, refs[5].start, refs[5].end)
    assert record.encoder_id.startswith(str((checkpoint / "checkpoints").resolve()))

    model = load_model(checkpoint)[0]
    expected = encode_in_batches(MemoryEncoder(model), refs[:8], 3, 128)
    read = bank.memories(np.arange(8))
    assert torch.equal(read.positions, expected.positions)
    assert torch.allclose(read.kv.float(), expected.kv, rtol=1e-2, atol=1e-3)


def test_build_killed_by_sigkill_resumes_to_an_identical_bank(built, checkpoint, knowledge,
                                                              tmp_path):
    out = tmp_path / "bank"
    proc = cli(*build_args(checkpoint, knowledge, out), env={SLOW_SHARD_ENV: "1.0"}, wait=False)
    manifest = out / "manifest.json"
    deadline = time.time() + 120
    while not (manifest.exists() and json.loads(manifest.read_text())["segments"]):
        assert proc.poll() is None and time.time() < deadline, "build ended before a commit"
        time.sleep(0.02)
    assert proc.poll() is None, "build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads(manifest.read_text())
    assert not killed["builds"][0]["complete"]
    assert 0 < len(killed["segments"]) < len(json.loads((built[0] / "manifest.json").read_text())
                                             ["segments"])

    stdout = cli(*build_args(checkpoint, knowledge, out)).stdout
    assert "references/s" in stdout
    assert bank_files(out) == bank_files(built[0])  # checksum for checksum, manifest included
    again = cli(*build_args(checkpoint, knowledge, out)).stdout
    assert "nothing to do" in again and bank_files(out) == bank_files(built[0])


def test_building_into_a_bank_adds_only_what_it_lacks(built, checkpoint, knowledge, tmp_path):
    out = tmp_path / "bank"
    shutil.copytree(built[0], out)
    more = write_world(make_world(seed=1, n_entities=12), tmp_path / "more")["knowledge"]
    before = len(MemoryBank.open(out))
    # The old file again (all duplicates) plus a new one.
    summary = build_bank(checkpoint, [knowledge, more], out, shard_memories=8, progress=False)
    new = len(list(iter_references([more], tokenizer_of(checkpoint), 128)))
    assert summary["rows"] == before + new and summary["added"] == new
    bank = MemoryBank.open(out)
    assert bank.manifest["builds"][1]["duplicates"] == before
    assert bank.manifest["index"]["rows"] == before + new


def test_compressed_build(checkpoint, knowledge, tmp_path, built):
    summary = build_bank(checkpoint, [knowledge], tmp_path / "bank", codec="SQ8",
                         progress=False)
    assert summary["kv_bytes_per_memory"] == 2 * 2 * 2 * 8 * 16  # 1 byte per dimension
    sq8 = MemoryBank.open(tmp_path / "bank").memories(np.arange(10))
    bf16 = MemoryBank.open(built[0]).memories(np.arange(10))
    assert torch.equal(sq8.positions, bf16.positions)
    err = (sq8.kv.float() - bf16.kv.float()).abs().max()
    assert err < 0.02 * bf16.kv.float().abs().max(), err
    with pytest.raises(BankError, match="codec 'SQ8', not 'none'"):
        build_bank(checkpoint, [knowledge], tmp_path / "bank", progress=False)


def test_build_from_code_and_parquet_with_globs(checkpoint, knowledge, tmp_path):
    """`--glob` picks the .py files (each one document, read whole) and the Parquet file (one
    document per row) out of a folder that also holds files the globs leave out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [d.text for d in iter_documents([knowledge])][:12]
    folder = tmp_path / "kb"
    (folder / "src").mkdir(parents=True)
    for i, text in enumerate(texts[:6]):
        (folder / "src" / f"m{i}.py").write_text(f"# module {i}\n\n{text}\n")
    pq.write_table(pa.table({"text": texts[6:]}), folder / "rows.parquet", row_group_size=4)
    (folder / "notes.txt").write_text("left out by the globs\n")
    globs = ["*.py", "*.parquet"]
    documents = [d.text for d in iter_documents([folder], glob=globs)]
    assert documents == texts[6:] + [f"# module {i}\n\n{t}\n" for i, t in enumerate(texts[:6])]

    out = tmp_path / "bank"
    cli(*build_args(checkpoint, folder, out, "--glob", "*.py", "--glob", "*.parquet"))
    refs = list(iter_references([folder], tokenizer_of(checkpoint), 128, glob=globs))
    bank = MemoryBank.open(out)
    build = bank.manifest["builds"][0]
    assert build["settings"]["glob"] == globs and build["read_stats"]["documents"] == 12
    assert len(bank) == len(refs)
    assert [r.key for r in bank.references(list(range(len(refs))))] == [r.key for r in refs]
    refused = cli(*build_args(checkpoint, folder / "src", tmp_path / "none"), check=False)
    assert refused.returncode == 2 and "--glob '*.py'" in refused.stderr


def test_bad_input_fails_clearly_and_damages_nothing(built, checkpoint, knowledge, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"no documents found in {empty}"):
        build_bank(checkpoint, [empty], tmp_path / "b1", progress=False)
    assert not (tmp_path / "b1").exists()
    proc = cli(*build_args(checkpoint, tmp_path / "missing.jsonl", tmp_path / "b1"), check=False)
    assert proc.returncode == 2 and "missing.jsonl does not exist" in proc.stderr

    # Undecodable text is counted and skipped, not fatal.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(knowledge.read_bytes()[:2000].rsplit(b"\n", 1)[0] + b"\n"
                      + b'{"text": "bad \xff byte"}\n')
    build_bank(checkpoint, [mixed], tmp_path / "b2", progress=False)
    stats = MemoryBank.open(tmp_path / "b2").manifest["builds"][0]["read_stats"]
    assert stats["undecodable_lines"] == 1 and stats["documents"] > 0

    # A bank made for another model shape.
    other = ModelConfig.from_name("tiny", memory_layers="all", memory_top_k=4)
    MemoryBank.create(tmp_path / "b3", other).close()
    proc = cli(*build_args(checkpoint, knowledge, tmp_path / "b3"), check=False)
    assert proc.returncode == 2
    assert "different model config" in proc.stderr and "memory_top_k" in proc.stderr
    assert str(tmp_path / "b3" / "manifest.json") in proc.stderr

    # A corrupted shard is found on open, before anything is written.
    damaged = tmp_path / "b4"
    shutil.copytree(built[0], damaged)
    kv = damaged / "shards" / "r000-000001.kv"
    kv.write_bytes(kv.read_bytes()[:-1] + b"\0")
    before = bank_files(damaged)
    with pytest.raises(BankError, match=r"r000-000001\.kv does not match its sha256"):
        build_bank(checkpoint, [knowledge], damaged, progress=False)
    assert bank_files(damaged) == before


@pytest.mark.distributed
def test_two_ranks_build_the_same_memories_as_one(built, checkpoint, knowledge, tmp_path):
    out = tmp_path / "bank"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m",
           "memory3.memory.cli", *build_args(checkpoint, knowledge, out)]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    two, one = MemoryBank.open(out), MemoryBank.open(built[0])
    assert len(two) == len(one)
    names = {e["name"].split("-")[0] for e in two.manifest["segments"]}
    assert names == {"r000", "r001"}
    keys_two = [r.key for r in two.references(np.arange(len(two)))]
    keys_one = [r.key for r in one.references(np.arange(len(one)))]
    assert sorted(keys_two) == sorted(keys_one)
    order = np.array([keys_two.index(k) for k in keys_one])
    assert torch.equal(two.memories(order).positions, one.memories(np.arange(len(one))).positions)
    ids, _ = two.retrieve([r.text for r in one.references(np.arange(5))], k=1)
    assert ids[:, 0].tolist() == order[:5].tolist()
