"""Memory Decoder end to end on tiny data: datastore, kNN targets, distillation, evaluation.

General corpus = the session's synthetic world (tiny_data); domain = another world (other names
and facts, same tokenizer), where bases trained on the general corpus are weak.
"""
from __future__ import annotations

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

from memory3.config import ConfigError, Recipe
from memory3.data import TokenShards, prepare_data
from memory3.data.synthetic import make_world, write_world
from memory3.memdec import Datastore, KnnTargets, MemDecError, build_datastore, build_targets
from memory3.memdec import cli, targets as targets_module
from memory3.memdec.files import SLOW_COMMIT_ENV, checksum_array, seal
from memory3.memdec.phase import KnnTargetLoader, MemDecPhase
from memory3.train.checkpoint import load_model
from memory3.train.trainer import train

DATASTORE_TOKENS = 12288  # positions stored: the first 12288 of the domain's train split
WINDOW = 128
K, TEMPERATURE = 64, 0.1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def domain(tiny_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("domain")
    files = write_world(make_world(seed=1, n_entities=40), root / "corpus")
    prepare_data([files["corpus"]], tiny_data.parent / "tokenizer", root / "shards",
                 valid_fraction=0.1, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def bases(tiny_data, tmp_path_factory) -> list[Path]:
    """Two different bases (3 and 4 layers) trained briefly on the general corpus."""
    out = []
    for layers in (3, 4):
        run = tmp_path_factory.mktemp(f"base{layers}")
        recipe = Recipe.from_name("tiny-warmup").override(
            [f"data.path={tiny_data}", f"model.n_layers={layers}", "train.max_steps=40",
             "train.eval_every=1000", "train.save_every=40"])
        train(recipe, run, progress=False)
        out.append(run)
    return out


@pytest.fixture(scope="module")
def datastore(bases, domain, tmp_path_factory) -> Datastore:
    return build_datastore(bases[0], domain, tmp_path_factory.mktemp("ds") / "ds",
                           max_tokens=DATASTORE_TOKENS, window=WINDOW, batch_size=4,
                           progress=False)


@pytest.fixture(scope="module")
def knn_targets(datastore, tmp_path_factory) -> KnnTargets:
    # Exact distances: FAISS's (|x|^2 + |y|^2 - 2 x.y in fp32) err by ~1e-5 on keys of squared
    # norm ~60, visible at temperature 0.1 when compared with a brute force to 1e-5.
    return build_targets(datastore.path, tmp_path_factory.mktemp("targets") / "t", k=K,
                         temperature=TEMPERATURE, top=16, exact=True, progress=False)


def brute_force_knn(keys: np.ndarray, values: np.ndarray, queries: list[int], k: int,
                    temperature: float, exclude_self: bool) -> list[dict[int, float] | None]:
    """p_kNN of the given positions by all-pairs numpy distances, as dicts token -> prob; None
    where the k-th and (k+1)-th neighbours are too close to call."""
    out = []
    for q in queries:
        d = ((keys - keys[q]) ** 2).sum(1)
        if exclude_self:
            d[q] = np.inf
        order = np.argsort(d, kind="stable")
        if d[order[k]] - d[order[k - 1]] < 1e-4:  # FAISS may rank a near-tie either way
            out.append(None)
            continue
        nearest = order[:k]
        w = np.exp(-(d[nearest] - d[nearest].min()) / temperature)
        w /= w.sum()
        dist: dict[int, float] = {}
        for v, wi in zip(values[nearest], w):
            dist[int(v)] = dist.get(int(v), 0.0) + wi
        out.append(dist)
    return out


def stored(targets: KnnTargets, position: int) -> dict[int, float]:
    return {int(i): float(p) for i, p in zip(targets.ids[position], targets.probs[position]) if p}


def top_renormalised(dist: dict[int, float], top: int) -> dict[int, float]:
    kept = sorted(dist.items(), key=lambda kv: -kv[1])[:top]
    total = sum(p for _, p in kept)
    return {t: p / total for t, p in kept}


def test_datastore_is_aligned_with_the_token_stream(datastore, domain, bases):
    shards = TokenShards(domain, "train")
    assert datastore.positions == DATASTORE_TOKENS and datastore.window == WINDOW
    assert np.array_equal(datastore.values, shards.read(1, DATASTORE_TOKENS))
    assert datastore.manifest["index"]["kind"] == "flat"
    # Key of position p = last-MLP input of the base reading p's window up to p.
    from memory3.memdec.keys import capture_keys
    from memory3.train.checkpoint import load_model
    model, _, _ = load_model(bases[0])
    for p in (0, 200, 5000):
        start = p // WINDOW * WINDOW
        with capture_keys(model) as captured, torch.no_grad():
            model(torch.from_numpy(shards.read(start, p - start + 1))[None])
        assert np.allclose(datastore.keys[p], captured[0][0, -1].numpy(), atol=2e-3)


def test_knn_targets_equal_brute_force(datastore, knn_targets):
    keys = np.asarray(datastore.keys, dtype=np.float32)
    queries = list(range(0, DATASTORE_TOKENS, 97))
    expected = brute_force_knn(keys, np.asarray(datastore.values), queries, K, TEMPERATURE,
                               exclude_self=True)
    assert sum(d is None for d in expected) < len(queries) / 10
    for q, dist in zip(queries, expected):
        if dist is None:
            continue
        want, got = top_renormalised(dist, 16), stored(knn_targets, q)
        for t in set(want) | set(got):
            assert got.get(t, 0.0) == pytest.approx(want.get(t, 0.0), abs=1e-5), (q, t)
    assert knn_targets.manifest["settings"]["exclude_self"] is True


def test_self_exclusion(datastore, tmp_path):
    """With its own entry, a position's nearest neighbour is itself (distance 0): at a small
    temperature p_kNN is then all on the true next token. Excluded, it is not."""
    with_self = build_targets(datastore.path, tmp_path / "self", k=K, temperature=1e-3,
                              exclude_self=False, top=4, exact=True, progress=False)
    without = build_targets(datastore.path, tmp_path / "noself", k=K, temperature=1e-3, top=4,
                            exact=True, progress=False)
    n = DATASTORE_TOKENS
    p_true = [stored(with_self, p).get(int(with_self.next_token[p]), 0.0) for p in range(n)]
    assert np.mean(np.array(p_true) > 0.99) > 0.97
    p_true = [stored(without, p).get(int(without.next_token[p]), 0.0) for p in range(n)]
    assert np.mean(np.array(p_true) > 0.99) < 0.9
    keys, values = np.asarray(datastore.keys, dtype=np.float32), np.asarray(datastore.values)
    queries = list(range(5, n, 501))
    for q, dist in zip(queries, brute_force_knn(keys, values, queries, K, 1e-3, False)):
        if dist is None:
            continue
        want, got = top_renormalised(dist, 4), stored(with_self, q)
        for t in set(want) | set(got):
            assert got.get(t, 0.0) == pytest.approx(want.get(t, 0.0), abs=1e-5), (q, t)


def test_misaligned_targets_are_refused(knn_targets, domain, tiny_data, tmp_path):
    def phase(*overrides: str) -> MemDecPhase:
        recipe = Recipe.from_name("memdec-tiny").override(
            [f"data.path={domain}", f"memdec.targets={knn_targets.path}", *overrides])
        return MemDecPhase(recipe, 0, 1, torch.device("cpu"))

    phase()  # aligned: accepted
    with pytest.raises(MemDecError, match="built from the tokens of"):
        phase(f"data.path={tiny_data}")  # another corpus
    with pytest.raises(MemDecError, match="built for split 'train'"):
        phase("data.train_split=valid")
    shifted = tmp_path / "shifted"
    shutil.copytree(knn_targets.path, shifted)
    next_token = np.fromfile(shifted / "next_token.bin", dtype="<i4")
    np.roll(next_token, 1).tofile(shifted / "next_token.bin")  # rows one position off
    # ... checksummed anew, as a build that really was off by one would have: misaligned, not
    # corrupt (test_memdec_files.py has the corrupt ones).
    manifest = json.loads((shifted / "manifest.json").read_text())
    manifest["checksums"]["next_token.bin"] = checksum_array(
        shifted / "next_token.bin", np.fromfile(shifted / "next_token.bin", dtype="<i4"))
    (shifted / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(MemDecError, match="misaligned .* position 0"):
        phase(f"memdec.targets={shifted}")
    with pytest.raises(ConfigError, match="memdec.targets is empty"):
        phase("memdec.targets=")


def test_loader_batches_carry_the_targets_of_their_positions(knn_targets, domain):
    shards = TokenShards(domain, "train")
    one = KnnTargetLoader(shards, knn_targets, 64, 4, seed=3)
    assert one.n_sequences == DATASTORE_TOKENS // 64  # only positions the targets cover
    stream = shards.read(0, DATASTORE_TOKENS + 1)
    batches = [one.next_batch() for _ in range(3)]
    for b in batches:
        for row in range(4):
            inputs = b["inputs"][row].numpy()
            start = _offset_of(stream, inputs)
            assert np.array_equal(b["knn_ids"][row].numpy(), knn_targets.ids[start:start + 64])
            assert np.array_equal(b["targets"][row].numpy(),
                                  knn_targets.next_token[start:start + 64])
    # Two ranks with half the micro batch read the same global batches; state resumes exactly.
    ranks = [KnnTargetLoader(shards, knn_targets, 64, 2, rank=r, world_size=2, seed=3)
             for r in (0, 1)]
    first = [r.next_batch() for r in ranks]
    assert torch.equal(torch.cat([f["knn_probs"] for f in first]), batches[0]["knn_probs"])
    resumed = KnnTargetLoader(shards, knn_targets, 64, 4, seed=3)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(resumed.next_batch()["knn_ids"], batches[1]["knn_ids"])


def _offset_of(stream: np.ndarray, row: np.ndarray) -> int:
    """Stream offset of a training row (rows start at multiples of its length)."""
    n = len(row)
    for start in range(0, len(stream) - n, n):
        if np.array_equal(stream[start:start + n], row):
            return start
    raise AssertionError("row not found in the stream")


def test_ivfpq_datastore_and_exact_distances(bases, domain, tmp_path):
    store = build_datastore(bases[0], domain, tmp_path / "ivf", max_tokens=4096, window=WINDOW,
                            index="ivfpq", nlist=16, code_bytes=16, nprobe=4, progress=False)
    assert store.manifest["index"] == {"kind": "ivfpq", "file": "index.faiss", "nlist": 16,
                                       "code_bytes": 16, "nprobe": 4}
    queries = np.asarray(store.keys[:50], dtype=np.float32)
    approx, ids = store.search(queries, 8)
    exact, exact_ids = store.search(queries, 8, exact=True)
    assert np.array_equal(ids, exact_ids) and not np.allclose(approx, exact)
    keys = np.asarray(store.keys, dtype=np.float32)
    want = ((keys[np.maximum(ids, 0)] - queries[:, None]) ** 2).sum(-1)
    assert np.allclose(exact[ids >= 0], want[ids >= 0], rtol=1e-5, atol=1e-5)
    excluded_d, excluded = store.search(queries, 8, exclude_ids=np.arange(50))
    assert excluded.shape == (50, 8) and not (excluded == np.arange(50)[:, None]).any()
    with pytest.raises(MemDecError, match="--code-bytes 48 must divide"):
        build_datastore(bases[0], domain, tmp_path / "bad", index="ivfpq", code_bytes=48,
                        progress=False)


def test_datastore_build_resumes_after_sigkill(bases, domain, datastore, tmp_path):
    """A real kill mid-build, then the same call again: byte-identical to an unbroken build."""
    out = tmp_path / "ds"
    script = (f"from memory3.memdec import build_datastore; build_datastore({str(bases[0])!r}, "
              f"{str(domain)!r}, {str(out)!r}, max_tokens={DATASTORE_TOKENS}, window={WINDOW}, "
              f"batch_size=4, commit_positions=512, progress=False)")
    env = {**os.environ, SLOW_COMMIT_ENV: "0.3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    done = 0
    while done == 0:
        assert proc.poll() is None and time.time() < deadline, "build ended before the kill"
        time.sleep(0.05)
        try:
            done = json.loads((out / "manifest.json").read_text())["done_positions"]
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert 0 < manifest["done_positions"] < DATASTORE_TOKENS and not manifest["complete"]
    with pytest.raises(MemDecError, match="incomplete"):
        Datastore(out)
    resumed = build_datastore(bases[0], domain, out, max_tokens=DATASTORE_TOKENS, window=WINDOW,
                              batch_size=4, progress=False)
    for name in ("keys.bin", "values.bin", "index.faiss"):
        assert (out / name).read_bytes() == (datastore.path / name).read_bytes(), name
    assert resumed.manifest["complete"]
    with pytest.raises(MemDecError, match="different window"):
        build_datastore(bases[0], domain, out, max_tokens=DATASTORE_TOKENS, window=64,
                        batch_size=4, progress=False)


def test_targets_build_resumes_after_interruption_at_every_commit(datastore, tmp_path,
                                                                  monkeypatch):
    settings = dict(k=16, temperature=TEMPERATURE, top=8, batch_size=2048, progress=False)
    unbroken = build_targets(datastore.path, tmp_path / "unbroken", **settings)
    n_commits = 2 + DATASTORE_TOKENS // 2048  # start, one per batch, end
    real_write = targets_module.write_json_atomic
    for stop_at in range(1, n_commits):
        calls = []

        def failing_write(path, obj):
            calls.append(path)
            if len(calls) == stop_at:
                raise KeyboardInterrupt("interrupted")
            real_write(path, obj)

        out = tmp_path / f"stop{stop_at}"
        monkeypatch.setattr(targets_module, "write_json_atomic", failing_write)
        with pytest.raises(KeyboardInterrupt):
            build_targets(datastore.path, out, **settings)
        monkeypatch.setattr(targets_module, "write_json_atomic", real_write)
        resumed = build_targets(datastore.path, out, **settings)
        for name in ("ids.bin", "probs.bin", "next_token.bin"):
            assert (out / name).read_bytes() == (unbroken.path / name).read_bytes(), (stop_at, name)
        assert resumed.manifest["mass_kept_mean"] == unbroken.manifest["mass_kept_mean"]
    with pytest.raises(MemDecError, match="different k"):
        build_targets(datastore.path, tmp_path / "unbroken", **{**settings, "k": 8})


def test_one_decoder_improves_two_bases(bases, domain, knn_targets, datastore, tmp_path):
    """The issue's bar: a decoder distilled from base 0's datastore lowers the domain perplexity
    of both bases, through `memory3 train --recipe memdec-tiny` and `memory3 memdec eval`."""
    recipe = Recipe.from_name("memdec-tiny").override(
        [f"data.path={domain}", f"memdec.targets={knn_targets.path}", "train.max_steps=80",
         "train.eval_every=1000", "train.save_every=80"])
    train(recipe, tmp_path / "decoder", progress=False)

    out = tmp_path / "eval.json"
    cli.main(["memdec", "eval", "--base", str(bases[0]), "--base", str(bases[1]),
              "--decoder", str(tmp_path / "decoder"), "--data", str(domain), "--split", "valid",
              "--lambda", "0.6", "--knn-datastore", str(datastore.path), "--knn-k", str(K),
              "--knn-temperature", str(TEMPERATURE), "--max-tokens", "3000", "--no-progress",
              "--json", str(out)])
    results = {(r["base"], r["mode"]): r for r in json.loads(out.read_text())}
    assert set(results) == {(str(b), m) for b in bases for m in ("base", "knn-lm", "memdec")}
    for b in map(str, bases):
        base, dec, knn = (results[b, m] for m in ("base", "memdec", "knn-lm"))
        assert all(r["tokens_per_s"] > 0 and r["tokens"] == base["tokens"] for r in (dec, knn))
        assert dec["perplexity"] < 0.85 * base["perplexity"], (b, base, dec)
        assert knn["perplexity"] < base["perplexity"], (b, base, knn)


def test_beta_zero_training_does_not_depend_on_the_knn_targets(domain, datastore, knn_targets,
                                                               tmp_path):
    """beta = 0 (bench/memdec_dictionaries.py's cross-entropy-only ablation): the same weights
    bit for bit whatever the targets; beta = 0.5 on the same targets does differ."""
    other = build_targets(datastore.path, tmp_path / "other", k=8, temperature=5.0, top=4,
                          exact=True, progress=False)
    assert not np.array_equal(other.probs[:], knn_targets.probs[:, :4])

    def trained(targets, beta, name):
        recipe = Recipe.from_name("memdec-tiny").override(
            [f"data.path={domain}", f"memdec.targets={targets.path}", f"memdec.beta={beta}",
             "train.max_steps=3", "train.eval_every=1000", "train.save_every=3"])
        train(recipe, tmp_path / name, progress=False)
        return load_model(tmp_path / name)[0].state_dict()

    ce, ce_other = trained(knn_targets, 0.0, "ce"), trained(other, 0.0, "ce-other")
    assert all(torch.equal(ce[k], ce_other[k]) for k in ce)
    distilled = trained(knn_targets, 0.5, "distilled")
    assert not all(torch.equal(ce[k], distilled[k]) for k in ce)


def test_cli_builds_and_reports_user_errors(bases, domain, tmp_path, capsys):
    ds, t = str(tmp_path / "ds"), str(tmp_path / "t")
    cli.main(["memdec", "build-datastore", "--base", str(bases[1]), "--data", str(domain),
              "--out", ds, "--max-tokens", "1000", "--window", "64", "--no-progress"])
    cli.main(["memdec", "build-targets", "--datastore", ds, "--out", t, "--k", "8",
              "--temperature", "0.5", "--no-exclude-self", "--top", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert "1,000 positions, 64-dim keys, flat index" in out and "top 4" in out
    assert KnnTargets(t).manifest["settings"] == {
        "k": 8, "temperature": 0.5, "exclude_self": False, "top": 4, "exact_distances": False,
        "batch_size": 4096}

    def user_error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["memdec", *argv])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "manifest.json does not exist" in user_error(
        "build-targets", "--datastore", str(tmp_path / "nope"), "--out", t)
    assert "holds split 'train'" in user_error(
        "eval", "--base", str(bases[0]), "--data", str(domain), "--split", "train",
        "--knn-datastore", ds, "--no-progress")
    assert "--window 999 must be in 1..256" in user_error(
        "build-datastore", "--base", str(bases[0]), "--data", str(domain), "--out",
        str(tmp_path / "ds2"), "--window", "999")
    assert "--seq-len 999 is longer than the models involved read" in user_error(
        "eval", "--base", str(bases[0]), "--data", str(domain), "--seq-len", "999",
        "--no-progress")
