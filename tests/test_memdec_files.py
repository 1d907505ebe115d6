"""Damaged Memory Decoder files (issue 14 section 2): every file of a datastore and of a kNN
targets folder truncated, with a byte flipped in its middle, and emptied. Whatever opens or reads
it must stop with a MemDecError naming the file, and leave the damaged file as it was."""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from memory3.config import Recipe
from memory3.memdec import Datastore, KnnTargets, MemDecError, build_datastore, build_targets
from memory3.memdec import cli, files as memdec_files, targets as targets_module
from memory3.train.trainer import train

POSITIONS, WINDOW = 1024, 64
DATASTORE_FILES = ["manifest.json", "keys.bin", "values.bin", "keys.bin.crc", "values.bin.crc",
                   "index.faiss"]
TARGETS_FILES = ["manifest.json", "ids.bin", "probs.bin", "next_token.bin", "ids.bin.crc",
                 "probs.bin.crc", "next_token.bin.crc"]
DAMAGES = ["truncate", "flip", "empty"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tiny_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, datastore, targets): a base after 2 steps, its datastore of 1024 positions of the
    tiny data and their kNN targets, checksummed in blocks of 2 KiB so arrays have many blocks."""
    root = tmp_path_factory.mktemp("memdec_files")
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", "train.max_steps=2", "train.eval_every=1000",
         "train.save_every=2"])
    train(recipe, root / "base", progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memdec_files, "BLOCK_BYTES", 2048)
        build_datastore(root / "base", tiny_data, root / "ds", max_tokens=POSITIONS,
                        window=WINDOW, progress=False)
        build_targets(root / "ds", root / "t", k=8, top=4, progress=False)
    for name in ("keys.bin", "values.bin"):
        assert len((root / "ds" / f"{name}.crc").read_bytes()) > 4  # several blocks
    return root / "base", root / "ds", root / "t"


def damage(path: Path, how: str) -> bytes:
    data = path.read_bytes()
    if how == "truncate":
        data = data[:len(data) // 2]
    elif how == "empty":
        data = b""
    elif path.name == "manifest.json":  # a flip that keeps it valid JSON: a digit changed
        digits = [m.start() for m in re.finditer(rb"[0-9]", data)]
        i = min(digits, key=lambda d: abs(d - len(data) // 2))
        data = data[:i] + (b"1" if data[i:i + 1] != b"1" else b"2") + data[i + 1:]
    else:
        i = len(data) // 2
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    path.write_bytes(data)
    return data


def names(path: Path) -> str:
    """A pattern for messages naming `path` (and not merely a longer name starting with it)."""
    return re.escape(str(path)) + r"($|[:, ])"


def opened_whole(name: str, how: str) -> bool:
    """Whether opening alone finds the damage: all but a flipped byte in a .bin array, which
    only the read of its block finds."""
    return not (how == "flip" and name.endswith(".bin"))


@contextlib.contextmanager
def refused_if(path: Path, must_raise: bool):
    try:
        yield
    except MemDecError as e:
        assert re.search(names(path), str(e)), str(e)
    else:
        assert not must_raise, f"damaged {path} was not refused"


def read_all_targets(folder: Path) -> None:
    """What training reads: open, check against the shards' tokens, rows of every position."""
    targets = KnnTargets(folder)
    targets.rows(np.arange(targets.positions))
    np.asarray(targets.next_token)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", DATASTORE_FILES)
def test_damaged_datastore_file_is_refused(built, tiny_data, tmp_path, capsys, name, how):
    base, ds, _ = built
    copy = tmp_path / "ds"
    shutil.copytree(ds, copy)
    path = copy / name
    damaged = damage(path, how)
    # build-targets opens the datastore and reads every key and value.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["memdec", "build-targets", "--datastore", str(copy), "--out",
                  str(tmp_path / "t"), "--k", "8", "--top", "4", "--no-progress"])
    assert exit_info.value.code == 2
    assert re.search(names(path), capsys.readouterr().err)
    # Building it again into its folder refuses it, or (a flipped array byte, which opening
    # does not read) finds it complete; it never builds over it.
    with refused_if(path, opened_whole(name, how)):
        build_datastore(base, tiny_data, copy, max_tokens=POSITIONS, window=WINDOW,
                        progress=False)
    assert path.read_bytes() == damaged


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", TARGETS_FILES)
def test_damaged_targets_file_is_refused(built, tmp_path, name, how):
    _, ds, t = built
    copy = tmp_path / "t"
    shutil.copytree(t, copy)
    path = copy / name
    damaged = damage(path, how)
    with pytest.raises(MemDecError, match=names(path)):
        read_all_targets(copy)
    with refused_if(path, opened_whole(name, how)):
        build_targets(ds, copy, k=8, top=4, progress=False)
    assert path.read_bytes() == damaged


def test_reads_check_only_the_blocks_they_touch(built, tmp_path):
    """A flipped key is found by the read that touches its block, not by opening the store."""
    _, ds, _ = built
    copy = tmp_path / "ds"
    shutil.copytree(ds, copy)
    store = Datastore(copy)
    rows = store.keys.rows
    data = bytearray((copy / "keys.bin").read_bytes())
    row_bytes = len(data) // POSITIONS
    data[(3 * rows + 1) * row_bytes] ^= 0x01  # in block 3
    (copy / "keys.bin").write_bytes(bytes(data))
    store = Datastore(copy)  # sizes and .crc files are fine
    store.keys[:3 * rows]
    store.keys[np.array([0, 5 * rows])]
    with pytest.raises(MemDecError, match=rf"keys\.bin: rows {3 * rows}\.\.{4 * rows - 1} do "
                                          r"not match their checksum"):
        store.keys[np.array([[1, 3 * rows + 2]])]
    with pytest.raises(MemDecError, match=r"keys\.bin: rows"):
        np.asarray(store.keys)


def test_resume_refuses_an_array_damaged_since_its_last_commit(built, tmp_path, monkeypatch):
    """An interrupted targets build whose ids.bin was then truncated: the re-run must not
    reallocate it (zeros where the manifest says rows are done), nor touch it."""
    _, ds, _ = built
    out = tmp_path / "t"
    real_write, calls = targets_module.write_json_atomic, []

    def failing_write(path, obj):
        calls.append(path)
        if len(calls) == 3:  # start, first batch, then the end
            raise KeyboardInterrupt("interrupted")
        real_write(path, obj)

    monkeypatch.setattr(targets_module, "write_json_atomic", failing_write)
    with pytest.raises(KeyboardInterrupt):
        build_targets(ds, out, k=8, top=4, batch_size=256, progress=False)
    monkeypatch.setattr(targets_module, "write_json_atomic", real_write)
    assert json.loads((out / "manifest.json").read_text())["done_positions"] == 256
    damaged = damage(out / "ids.bin", "truncate")
    with pytest.raises(MemDecError, match=names(out / "ids.bin") + ".*first 256 rows"):
        build_targets(ds, out, k=8, top=4, batch_size=256, progress=False)
    assert (out / "ids.bin").read_bytes() == damaged


def test_old_format_version_says_build_again(built, tmp_path):
    _, ds, _ = built
    copy = tmp_path / "ds"
    shutil.copytree(ds, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemDecError, match="format version 1.*build it again"):
        Datastore(copy)
