"""bench/memory_real_text.py on a user's own corpus, from a warmup run trained elsewhere: the
route issue 15 gives users to measure memory on their own domain (CPU, ~20 s)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from memory3.config import Recipe
from memory3.data.synthetic import make_world, write_world
from memory3.train.trainer import train

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_own_corpus_from_a_warmup_run(tiny_data, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import memory_real_text

    world = write_world(make_world(seed=3, n_entities=40), tmp_path / "world")
    # Held-out documents long enough for the copy probe's 100-token spans.
    paragraphs = world["heldout"].read_text().split("\n\n")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": " ".join(paragraphs[i:i + 8])}) + "\n"
                               for i in range(0, len(paragraphs), 8)))
    warmup = tmp_path / "warmup"
    train(Recipe.from_name("tiny-warmup").override([f"data.path={tiny_data}",
                                                    "train.max_steps=6", "train.eval_every=100"]),
          warmup, progress=False)
    out = tmp_path / "bench"
    memory_real_text.main([
        "--corpus", "own", "--out", str(out), "--train-text", str(world["corpus"]),
        "--knowledge", str(world["knowledge"]), "--heldout", str(heldout),
        "--warmup-run", str(warmup), "--continual-recipe", "tiny-continual",
        "--continual-steps", "3", "--eval-sequences", "4", "--seq-len", "256",
        "--micro-batch", "4", "--warmup-modes", "none", "--memory-top-k", "6",
        "--continual-set", "continual.own_chunk_share=0.5", "continual.own_chunk_overlap=1.0"])

    report = json.loads((out / "results.json").read_text())
    assert report["corpus"]["sources"]["heldout"] == [str(heldout)]
    for mode in ("none", "memory", "rag"):
        assert math.isfinite(report["eval"]["continual"][mode]["perplexity"])
    assert report["retrieval"] == {}  # a user's corpus names no subjects to score it against
    assert report["text_oracle"]["continual"]["documents"] > 0
    assert 0 < report["copying"]["warmup"]["ratio"] < 2
    through = report["copying"]["warmup"]["through_memory"]  # at the continual run's top_k
    assert through["sparse"]["top_k"] == 6 and through["dense"]["top_k"] == 127
    continual = Recipe.from_dict(json.loads((out / "continual" / "recipe.json").read_text()))
    assert continual.train.init_from == str(warmup)
    assert continual.data.path == str(out / "shards")  # the corpus, in the warmup's tokenizer
    assert continual.model.memory_top_k == 6 and continual.continual.own_chunk_overlap == 1.0
