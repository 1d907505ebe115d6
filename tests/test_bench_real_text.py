"""bench/memory_real_text.py on a user's own corpus, from a warmup run trained elsewhere: the
route issue 15 gives users to measure memory on their own domain (CPU, ~20 s)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

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
    oracle = report["text_oracle"]["continual"]
    assert oracle["documents"] > 0 and 0 < oracle["tokens_head"] <= oracle["tokens"]
    for name in ("alone", "subject", "random", "memory", "memory_dense", "memory_causal"):
        # the split adds up to the whole
        head, rest = oracle["tokens_head"], oracle["tokens"] - oracle["tokens_head"]
        split = (head * math.log(oracle[f"perplexity_{name}_head"])
                 + rest * math.log(oracle[f"perplexity_{name}_rest"]))
        assert split == pytest.approx(oracle["tokens"] * math.log(oracle[f"perplexity_{name}"]))
    # A perfect causal chunk retriever gives the document's first chunk nothing but the sink:
    # scored as `eval --modes none` scores it (sink alone), not as a model without memory.
    assert oracle["perplexity_memory_causal_head"] == pytest.approx(
        oracle["perplexity_alone_head"], rel=1e-4)
    assert "perplexity_memory" not in report["text_oracle"]["warmup"]  # it reads no memory
    assert 0 < report["copying"]["warmup"]["ratio"] < 2
    through = report["copying"]["warmup"]["through_memory"]  # at the continual run's top_k
    assert through["sparse"]["top_k"] == 6 and through["dense"]["top_k"] == 127
    continual = Recipe.from_dict(json.loads((out / "continual" / "recipe.json").read_text()))
    assert continual.train.init_from == str(warmup)
    assert continual.data.path == str(out / "shards")  # the corpus, in the warmup's tokenizer
    assert continual.model.memory_top_k == 6 and continual.continual.own_chunk_overlap == 1.0


def test_memory_sparsity_rows(tiny_data, tmp_path, monkeypatch):
    """bench/memory_sparsity.py: every row at each top_k, the dense copy probe above the sparse
    one's information (a memory holding every token reads as the text itself)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import memory_sparsity

    from memory3.memory.build import build_bank
    world = write_world(make_world(seed=3, n_entities=40), tmp_path / "world")
    # The world's text, a paragraph per document (the probe needs no held-out-ness).
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": p}) + "\n"
                            for p in world["corpus"].read_text().split("\n\n")[:40]))
    warmup = tmp_path / "warmup"
    train(Recipe.from_name("tiny-warmup").override([f"data.path={tiny_data}",
                                                    "train.max_steps=6", "train.eval_every=100"]),
          warmup, progress=False)
    build_bank(warmup, [world["knowledge"]], tmp_path / "bank", memory_layers="all",
               progress=False)
    out = tmp_path / "sparsity.json"
    memory_sparsity.main(["--checkpoint", str(warmup), "--bank", str(tmp_path / "bank"),
                          "--data", str(text), "--top-k", "2,127", "--memory-layers", "all",
                          "--length", "30", "--spans", "4", "--sequences", "2", "--seq-len", "128",
                          "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["spans"] == 4 and set(report["rows"]) == {"2", "127"}
    for row in report["rows"].values():
        assert 0 < row["copy_ratio"] < 2 and math.isfinite(row["next_loss"])
        assert row["causal"] > 1 and row["own_chunk"] > 1
    assert report["rows"]["2"]["copy_ratio"] != report["rows"]["127"]["copy_ratio"]


def test_retrieval_ceiling_rows_match_eval(tiny_data, tmp_path, monkeypatch):
    """bench/retrieval_ceiling.py: its `prev`, `own` and `document` rules are exactly what
    `memory3 eval` reads in modes memory and memory_own_chunk, and memory by the document rule
    (same perplexities), and every rule reports a
    recall in [0, 1]."""
    monkeypatch.syspath_prepend(str(BENCH))
    import retrieval_ceiling

    from memory3.checkpoints import load_model, load_tokenizer
    from memory3.eval.perplexity import evaluate, text_sequences
    from memory3.memory.bank import MemoryBank
    from memory3.memory.build import build_bank
    world = write_world(make_world(seed=3, n_entities=40), tmp_path / "world")
    warmup = tmp_path / "warmup"
    train(Recipe.from_name("tiny-warmup").override([f"data.path={tiny_data}",
                                                    "train.max_steps=6", "train.eval_every=100"]),
          warmup, progress=False)
    build_bank(warmup, [world["knowledge"]], tmp_path / "bank", progress=False)
    report = retrieval_ceiling.main([
        "--checkpoint", str(warmup), "--bank", str(tmp_path / "bank"),
        "--data", str(world["heldout"]), "--sequences", "4", "--seq-len", "128", "--threads", "1",
        "--json", str(tmp_path / "ceiling.json")])
    assert json.loads((tmp_path / "ceiling.json").read_text()) == report
    assert set(report["rows"]) == {"none", "prev", "document", "context", "own", "cover"}
    shares = {c: v["share"] for c, v in report["classes"].items()}
    assert sum(shares.values()) == pytest.approx(1) and shares["first chunk"] == pytest.approx(0.5)
    for name, row in report["rows"].items():
        assert math.isfinite(row["perplexity"])
        assert name == "none" or 0 <= row["novel_recall"] <= 1
        # the classes split the tokens: their perplexities average (in log) to the whole
        assert math.exp(sum(shares[c] * math.log(p) for c, p in
                            row["perplexity_by_class"].items())) == pytest.approx(
            row["perplexity"], rel=1e-6)

    model, _, _ = load_model(warmup)
    tokenizer = load_tokenizer(warmup)
    sequences = text_sequences([world["heldout"]], tokenizer, 128, max_sequences=4)
    with MemoryBank.open(tmp_path / "bank") as bank:
        ref = evaluate(model, tokenizer, sequences, ["none", "memory", "memory_own_chunk"],
                       bank=bank)
    for rule, mode in (("none", "none"), ("prev", "memory"), ("own", "memory_own_chunk")):
        assert math.isclose(report["rows"][rule]["perplexity"], ref[mode]["perplexity"],
                            rel_tol=1e-4), rule
    # Memory changes something, or the equalities above would hold for any rows.
    assert report["rows"]["prev"]["perplexity"] != report["rows"]["none"]["perplexity"]
    model.cfg.retrieval_query = "document"  # as a model trained with that rule evaluates
    with MemoryBank.open(tmp_path / "bank") as bank:
        by_doc = evaluate(model, tokenizer, sequences, ["memory"], bank=bank)["memory"]
    assert math.isclose(report["rows"]["document"]["perplexity"], by_doc["perplexity"],
                        rel_tol=1e-4)


def test_retrieval_ceiling_position_classes(monkeypatch):
    """First chunk / a document under way since an earlier chunk / a document begun in the chunk
    (after its retrieval), by the position that predicts the token."""
    from types import SimpleNamespace
    monkeypatch.syspath_prepend(str(BENCH))
    import retrieval_ceiling
    tok = SimpleNamespace(bos_id=1, eos_id=2)
    seq = [9, 9, 9, 9, 9, 9, 9, 2, 1, 9, 9, 9, 9, 1, 9, 9]  # chunks of 4
    got = retrieval_ceiling.position_classes(torch.tensor([seq]), tok, 4)[0].tolist()
    assert got == [0, 0, 0, 0,  # the first chunk, whatever it holds
                   1, 1, 1, 2,  # under way since chunk 0; the EOS starts a new document
                   2, 2, 2, 2,  # BOS at 8, then its document: begun in chunk 2
                   1, 2, 2, 2]  # under way in chunk 3 until the BOS at 13


def test_retrieval_ceiling_rejects_unknown_rules(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import retrieval_ceiling

    with pytest.raises(SystemExit):
        retrieval_ceiling.parse_args(["--checkpoint", "c", "--bank", "b", "--data", "d",
                                      "--rules", "prev,best"])
    assert "unknown ['best']" in capsys.readouterr().err
