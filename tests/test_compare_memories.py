"""bench/compare_memories.py end to end on a tiny corpus: every kind of memory scored on the
same held-out tokens, through the `memory3` command, and a re-run that skips what is done
(CPU, ~35 s)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from memory3.config import Recipe
from memory3.data.synthetic import make_world, write_world
from memory3.train.trainer import train

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = ["base", "rag", "continual alone", "memory", "knn-lm", "memdec"]


def test_every_memory_on_the_same_tokens(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import compare_memories

    world = write_world(make_world(seed=3, n_entities=40), tmp_path / "world")
    base = tmp_path / "base"
    train(Recipe.from_name("tiny-warmup").override([f"data.path={tiny_data}", "train.max_steps=6",
                                                    "train.eval_every=100"]),
          base, progress=False)
    out = tmp_path / "compare"
    argv = ["--out", str(out), "--train-text", str(world["corpus"]),
            "--knowledge", str(world["knowledge"]), "--heldout", str(world["heldout"]),
            "--base", str(base), "--continual-recipe", "tiny-continual",
            "--continual-steps", "2", "--memdec-recipe", "memdec-tiny", "--memdec-steps", "3",
            "--datastore-max-tokens", "4096", "--knn-k", "64", "--max-sequences", "3"]
    report = compare_memories.main(argv)

    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ROWS
    # 3 rows of the base's seq_len (128): two 64-token chunks each, so the second reads memory
    assert (report["sequences"], report["seq_len"], report["tokens"]) == (3, 128, 3 * 128)
    for name, r in rows.items():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1, name
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-6), name
        assert r["tokens"] == report["tokens"], name
        assert r["bits_per_byte"] == pytest.approx(
            r["loss"] * r["tokens"] / math.log(2) / report["bytes"], rel=1e-6), name
        assert r["tokens_per_s"] > 0, name
        assert r["commands"] and all(c.startswith("memory3 ") for c in r["commands"]), name
    assert report["bytes"] > report["tokens"]  # words of several letters per token
    assert rows["base"]["footprint_bytes"] == rows["continual alone"]["footprint_bytes"] == 0
    for name in ("rag", "memory", "knn-lm", "memdec"):
        assert rows[name]["footprint_bytes"] > 0, name
    # RAG reads the references, not the memories the eval bank also holds.
    assert rows["rag"]["footprint_bytes"] < rows["memory"]["footprint_bytes"]
    # References were read: the rows differ from the models alone.
    assert rows["rag"]["loss"] != rows["base"]["loss"]
    assert rows["memory"]["loss"] != rows["continual alone"]["loss"]
    # The base, scored by `memory3 eval` and by `memory3 memdec eval --seq-len`: the same rows.
    assert report["checks"]["base_loss_gap"] < 1e-5
    memdec_eval = next(c for c in rows["memdec"]["commands"] if c.startswith("memory3 memdec eval"))
    assert "--seq-len 128 --max-sequences 3" in memdec_eval
    assert report["commands"]["shards"] in rows["knn-lm"]["commands"]
    assert set(report["ran"]) == set(report["commands"])  # --base given: no tokenizer, no warmup
    printed = capsys.readouterr().out
    assert "Context of each row" in printed and memdec_eval in printed

    # A re-run skips every finished stage; a lost output is rebuilt alone.
    (out / "eval-memdec.json").unlink()
    again = compare_memories.main(argv)
    assert again["ran"] == ["eval memdec"]
    assert "done before, skipped" not in printed
    assert capsys.readouterr().out.count("done before, skipped") == len(report["commands"]) - 1
    assert [r["loss"] for r in again["rows"]] == pytest.approx([r["loss"] for r in report["rows"]])
    stored = json.loads((out / "compare.json").read_text())
    assert set(stored["stage_seconds"]) == set(report["commands"])  # earlier times kept
    assert compare_memories.main(argv)["ran"] == []

    # A continual run trained elsewhere: evaluated, not trained; the same weights and bank
    # recipe give the same memory row.
    inputs = argv[2:argv.index("--continual-recipe")]  # the texts and the base
    elsewhere = ["--out", str(tmp_path / "compare-given"), *inputs,
                 "--continual-run", str(out / "continual"), *argv[argv.index("--memdec-recipe"):]]
    given = compare_memories.main(elsewhere)
    assert "continual" not in given["ran"] and "continual" not in given["commands"]
    given_rows = {r["row"]: r for r in given["rows"]}
    for name in ("continual alone", "memory"):
        assert given_rows[name]["loss"] == pytest.approx(rows[name]["loss"], rel=1e-6), name
    assert f"--continual-run {out / 'continual'}" in capsys.readouterr().out
    needs = given_rows["memory"]["commands"]
    assert [c.split()[1] for c in needs] == ["build-bank", "eval"]  # not the base's bank


def test_missing_inputs_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import compare_memories

    with pytest.raises(SystemExit) as exit_info:
        compare_memories.main(["--out", str(tmp_path), "--train-text", "a.txt",
                               "--knowledge", "kb.jsonl"])
    assert exit_info.value.code == 2
    assert "--heldout missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_memories.main(["--out", str(tmp_path), "--train-text", "a.txt", "--knowledge",
                               "kb.jsonl", "--heldout", "h.txt", "--base", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert "--base" in err and "no such run" in err
    inputs = ["--out", str(tmp_path), "--train-text", "a.txt", "--knowledge", "kb.jsonl",
              "--heldout", "h.txt", "--continual-run", str(tmp_path)]
    for extra in ([], ["--base", str(tmp_path), "--continual-steps", "5"]):
        with pytest.raises(SystemExit) as exit_info:
            compare_memories.main(inputs + extra)
        assert exit_info.value.code == 2
        assert "--continual-run evaluates a run trained elsewhere" in capsys.readouterr().err
