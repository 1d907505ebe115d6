"""Reading memories end to end: causal chunk retrieval, generation, evaluation, continual phase."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from memory3.config import ConfigError, Recipe
from memory3.data.synthetic import make_world, write_world
from memory3.generate import generate
from memory3.memory.bank import MemoryBank
from memory3.memory.build import build_bank
from memory3.memory.encoder import MemoryEncoder
from memory3.memory.reading import (chunk_queries, encode_distinct, encode_rows, read_distinct,
                                    retrieve_for_chunks)
from memory3.model import compact_slots
from memory3.train.checkpoint import load_model, load_tokenizer
from memory3.train.metrics import read_metrics
from memory3.train.trainer import train

# Small chunks so that the tiny preset's short sequences span several of them.
MEMORY = ["model.chunk_len=16", "model.memories_per_chunk=5", 'model.memory_layers="all"']


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    return write_world(make_world(seed=0, n_entities=60), tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def warm_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("warm")
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", "train.max_steps=20", "train.eval_every=100", *MEMORY])
    train(recipe, out, progress=False)
    return out


@pytest.fixture(scope="module")
def bank_dir(warm_run, world_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bank") / "bank"
    build_bank(warm_run, [world_files["knowledge"]], out, progress=False)
    return out


def test_chunk_retrieval_is_causal_and_filters_copies(warm_run, bank_dir):
    tok = load_tokenizer(warm_run)
    bank = MemoryBank.open(bank_dir)
    record = bank.references([7])[0]
    other = bank.references([8])[0]
    # chunk 0: another reference's text; chunk 1: reference 7's own text, verbatim.
    seq = (list(other.tokens) + [tok.eos_id] * 16)[:16] + (list(record.tokens) * 2)[:16]
    rows = retrieve_for_chunks(bank, tok, torch.tensor([seq]), chunk_len=16, k=5,
                               overlap_threshold=None)
    assert (rows[0, 0] == -1).all()  # chunk 0 has no previous chunk to query with
    own = retrieve_for_chunks(bank, tok, torch.tensor([seq]), chunk_len=16, k=5,
                              overlap_threshold=None, own_chunk=True)
    assert own[0, 1, 0] == 7  # its own text finds it...
    assert rows[0, 1, 0] == own[0, 0, 0]  # ...but causally chunk 1 reads what chunk 0 found
    # A reference that the predicted sequence contains is filtered out at 2/3.
    seq_with_copy = list(record.tokens) + list(other.tokens)
    filtered = retrieve_for_chunks(bank, tok, torch.tensor([seq_with_copy]), chunk_len=16, k=5,
                                   overlap_threshold=2 / 3, own_chunk=True)
    assert 7 not in filtered and 8 not in filtered


def document_head(tokens, end, tok, L=16):
    """Plain reference of the "document" query known at position `end`: the first L tokens of
    the document after the last BOS or EOS before `end` (or from the start); None if empty."""
    starts = [i + 1 for i, t in enumerate(tokens[:end]) if t in (tok.bos_id, tok.eos_id)]
    start = max(starts, default=0)
    return tok.decode(tokens[start:min(start + L, end)]) or None


def test_document_queries_are_the_head_of_the_document_under_way(warm_run, bank_dir):
    tok = load_tokenizer(warm_run)
    bank = MemoryBank.open(bank_dir)
    head, other, third = (list(r.tokens) for r in bank.references([7, 8, 9]))
    # A document whose head is reference 7's text runs over chunks 0-2 and ends with chunk 2's
    # last token (EOS); the next one fills chunk 3; chunk 4 holds a BOS mid-chunk.
    seq = ([tok.bos_id] + head)[:16] + other[:16] + third[:15] + [tok.eos_id] \
        + other[:16] + third[:5] + [tok.bos_id] + head[:10]
    queries = chunk_queries(seq, tok, 16, "document")
    assert queries == [document_head(seq, 16 * (c + 1), tok) for c in range(5)]
    assert queries[0] == tok.decode(head[:15])
    assert queries[1] == tok.decode(seq[1:17])  # the head: the document's first 16 tokens
    assert queries[2] is None  # chunk 2 ended the document: nothing of the next one is known
    assert queries[3] == tok.decode(other[:16])
    assert queries[4] == tok.decode(head[:10])
    assert chunk_queries(seq, tok, 16, "chunk") == [tok.decode(seq[i:i + 16])
                                                    for i in range(0, 80, 16)]
    with pytest.raises(ValueError, match="unknown retrieval query rule"):
        chunk_queries(seq, tok, 16, "title")
    # Causal retrieval by the document rule: chunk 2 still retrieves with the head, where the
    # chunk rule queries with chunk 1's text.
    x = torch.tensor([seq])
    by_doc = retrieve_for_chunks(bank, tok, x, chunk_len=16, k=5, overlap_threshold=None,
                                 query="document")
    by_chunk = retrieve_for_chunks(bank, tok, x, chunk_len=16, k=5, overlap_threshold=None)
    assert (by_doc[0, 2] == bank.retrieve([queries[1]], 5)[0][0]).all()
    assert (by_doc[0, 1] == bank.retrieve([queries[0]], 5)[0][0]).all()
    assert (by_doc[0, 3] == -1).all() and (by_doc[0, 4] >= 0).any()
    assert (by_chunk[0, 2] == bank.retrieve([tok.decode(seq[16:32])], 5)[0][0]).all()


def test_generation_by_the_document_rule_queries_with_the_document_head(warm_run, bank_dir):
    model, _, _ = load_model(warm_run)
    model.cfg.retrieval_query = "document"
    tok = load_tokenizer(warm_run)
    bank = MemoryBank.open(bank_dir)
    prompt = "The city of Velmora was founded by a man from the river lands"
    n_prompt = len(tok.encode(prompt)) + 1
    out = generate(model, tok, prompt, bank=bank, max_new_tokens=60, stop_at_eos=False)
    prompt_chunks = -(-n_prompt // 16)
    assert [r.chunk for r in out.retrievals] == list(range(-(-len(out.tokens) // 16)))
    assert len(out.retrievals) >= prompt_chunks + 3
    for r in out.retrievals[:prompt_chunks]:  # known text: each prompt chunk's own query
        end = min((r.chunk + 1) * 16, n_prompt)
        assert r.query == (document_head(out.tokens[:n_prompt], end, tok) or "")
    for r in out.retrievals[prompt_chunks:]:
        assert r.query == (document_head(out.tokens, r.chunk * 16, tok) or "")
        assert len(r.references) == (5 if r.query else 0)


def test_retrieval_query_rule_is_checked():
    with pytest.raises(ConfigError, match="model.retrieval_query"):
        Recipe.from_name("tiny-warmup").override(['model.retrieval_query="title"'])


def test_distinct_memories_read_like_memories_encoded_per_slot(warm_run, bank_dir):
    """Training encodes and compacts each distinct reference once, then lays them out per chunk:
    exactly what compacting the per-slot encodings gives, -1 slots all empty."""
    model, _, _ = load_model(warm_run)
    bank = MemoryBank.open(bank_dir)
    encoder = MemoryEncoder(model)
    rows = np.array([[[3, -1, 5], [5, 3, 9]], [[-1, -1, -1], [9, 9, 2]]])
    distinct, index, encoded = encode_distinct(encoder, bank, rows)
    assert distinct.tolist() == [2, 3, 5, 9] and len(encoded) == 4
    assert (distinct[index[index >= 0]] == rows[rows >= 0]).all() and (index[rows < 0] == -1).all()
    memory = read_distinct(encoded, index, encoder.sink_kv())
    per_slot = encode_rows(encoder, bank, rows)
    kv, valid = compact_slots(per_slot.kv, per_slot.positions)
    assert torch.equal(memory.kv, kv) and torch.equal(memory.valid, valid)
    assert not memory.valid[1, 0].any() and not memory.kv[1, 0].any()


def test_generation_retrieves_exactly_at_every_chunk_boundary(warm_run, bank_dir):
    model, _, _ = load_model(warm_run)
    tok = load_tokenizer(warm_run)
    bank = MemoryBank.open(bank_dir)
    prompt = "The city of Velmora was founded by a man from the river lands"
    n_prompt = len(tok.encode(prompt)) + 1
    out = generate(model, tok, prompt, bank=bank, max_new_tokens=60, stop_at_eos=False)
    assert len(out.tokens) == n_prompt + 60
    prompt_chunks = -(-n_prompt // 16)
    # One retrieval per prompt chunk (own text), then one at every later boundary.
    assert [r.chunk for r in out.retrievals] == list(range(-(-len(out.tokens) // 16)))
    for r in out.retrievals[prompt_chunks:]:
        assert r.position == r.chunk * 16 + 1  # made when token chunk*16 is about to be fed
        assert r.query == tok.decode(out.tokens[(r.chunk - 1) * 16:r.chunk * 16])
        assert len(r.references) == 5 and all("text" in ref for ref in r.references)
    # Greedy decoding with memory is reproducible and differs from decoding without.
    again = generate(model, tok, prompt, bank=bank, max_new_tokens=60, stop_at_eos=False)
    assert again.tokens == out.tokens
    plain = generate(model, tok, prompt, max_new_tokens=60, stop_at_eos=False)
    assert plain.retrievals == [] and plain.tokens != out.tokens


def test_eval_modes_score_the_same_tokens(warm_run, bank_dir, world_files, tmp_path):
    from conftest import run_memory3
    out = tmp_path / "eval.json"
    run_memory3("eval", "--checkpoint", str(warm_run), "--bank", str(bank_dir), "--data",
                str(world_files["heldout"]), "--max-sequences", "3", "--copy-probe", "32",
                "--json", str(out))
    results = json.loads(out.read_text())
    probe = results.pop("copy_probe")
    assert probe["length"] == 32 and probe["spans"] > 0 and probe["ratio"] > 0
    through = results.pop("memory_copy_probe")  # warm_run has memory layers
    assert through["sparse"]["top_k"] == 8 and through["dense"]["top_k"] == 127
    for p in through.values():
        assert p["spans"] == probe["spans"] and p["ratio"] == pytest.approx(
            p["memory_loss"] / p["alone_loss"])
    assert set(results) == {"none", "memory", "rag"}
    assert len({r["tokens"] for r in results.values()}) == 1
    assert len({r["bytes"] for r in results.values()}) == 1
    for r in results.values():
        assert r["perplexity"] > 1 and r["tokens_per_s"] > 0
        assert r["bytes"] > r["tokens"]
        assert r["bits_per_byte"] == pytest.approx(
            r["loss"] * r["tokens"] / math.log(2) / r["bytes"])
    assert results["memory"]["perplexity"] != results["none"]["perplexity"]
    run_memory3("eval", "--checkpoint", str(warm_run), "--data", str(world_files["heldout"]),
                "--max-sequences", "3", "--modes", "none", "--seq-len", "48", "--context", "16",
                "--json", str(out))
    assert json.loads(out.read_text())["none"]["tokens"] == 3 * (48 - 16)
    bad = run_memory3("eval", "--checkpoint", str(warm_run), "--data",
                      str(world_files["heldout"]), "--modes", "none", "--seq-len", "48",
                      "--context", "48", check=False)
    assert bad.returncode != 0 and "scoring context (48 tokens)" in bad.stderr


def test_sliding_window_eval_scores_each_token_once_after_its_context(warm_run, bank_dir,
                                                                      world_files):
    """--context N: rows overlap by N tokens and only targets after the first N are scored, so the
    scored tokens are the held-out stream's, each once; every mode's loss is a plain cross-entropy
    over exactly those positions of what the mode computes for the whole row."""
    import torch.nn.functional as F

    from memory3.data import DataError
    from memory3.eval.perplexity import eval_memories, evaluate, rag_logits, text_sequences
    model, _, _ = load_model(warm_run)
    tok = load_tokenizer(warm_run)
    bank = MemoryBank.open(bank_dir)
    T, N = 48, 16
    plain = text_sequences([world_files["heldout"]], tok, T)
    rows = text_sequences([world_files["heldout"]], tok, T, context=N)
    stream = text_sequences([world_files["heldout"]], tok, 1).reshape(-1).tolist()  # all of it
    assert rows.shape[1] == T + 1 and len(rows) > len(plain)
    scored = rows[:, 1 + N:].reshape(-1).tolist()
    assert scored == stream[1 + N:1 + N + len(scored)]  # each token once, in order
    assert len(stream) - len(scored) - (N + 1) <= T - N  # and the stream is used up
    rows = rows[:3]
    results = evaluate(model, tok, rows, ["none", "memory", "rag"], bank=bank, context=N)
    x, y = rows[:, :-1], rows[:, 1:]
    full = {"none": model(x).logits,
            "memory": model(x, memory=eval_memories(model, bank, tok, x)).logits,
            "rag": torch.stack([rag_logits(model, bank, tok, x[b:b + 1]) for b in range(3)])}
    for mode, logits in full.items():
        loss = F.cross_entropy(logits[:, N:].float().flatten(0, 1), y[:, N:].flatten())
        assert results[mode]["loss"] == pytest.approx(loss.item(), rel=1e-5), mode
        assert results[mode]["tokens"] == 3 * (T - N)
    bytes_ = int(tok.token_bytes()[y[:, N:].numpy()].sum())
    assert {r["bytes"] for r in results.values()} == {bytes_}
    with pytest.raises(DataError, match="scoring context"):
        text_sequences([world_files["heldout"]], tok, T, context=T)


@pytest.fixture(scope="module")
def continual_run(warm_run, bank_dir, tiny_data, tmp_path_factory):
    """4 continual steps from warm_run. No weight decay: a weight that gets no gradient then stays
    bit for bit what warmup left (Adam moves one that does by about lr per step)."""
    out = tmp_path_factory.mktemp("cont")
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", "phase=continual", f"continual.bank={bank_dir}",
         f"train.init_from={warm_run}", "train.max_steps=4", "train.eval_every=2",
         "continual.write_back=false", "optim.weight_decay=0", *MEMORY])
    return recipe, out, train(recipe, out, progress=False)


def test_continual_phase_trains_with_memories(continual_run, warm_run, tiny_data):
    recipe, out, result = continual_run
    records = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 4 and all(np.isfinite(losses)) and "val_ppl" in result
    # Every evaluation scores the same batches with and without memory.
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        with_memory, without = r["val_loss"], r["val_loss_no_memory"]
        assert np.isfinite([with_memory, without]).all()
        assert r["val_memory_gain"] == pytest.approx(without - with_memory, abs=1e-9)
        assert abs(r["val_memory_gain"]) > 1e-5  # the memories are read
    # "Without memory" is the model reading its sink alone, as wherever retrieval finds nothing,
    # on the validation batches: the checkpoint reproduces it, and the plain forward differs.
    from memory3.data import TokenShards, iter_eval_batches
    from memory3.memory.reading import sink_only
    model, _, _ = load_model(out)
    sink = MemoryEncoder(model).sink_kv()
    total = plain = count = 0.0
    for x, y in iter_eval_batches(TokenShards(tiny_data, "valid"), recipe.data.seq_len,
                                  recipe.train.micro_batch_size, recipe.train.eval_batches):
        alone = sink_only(sink, x, model.cfg)
        with torch.no_grad():
            total += model(x, y, memory=alone).loss.item() * y.numel()
            plain += model(x, y).loss.item() * y.numel()
        count += y.numel()
    assert total / count == pytest.approx(evals[-1]["val_loss_no_memory"], abs=1e-4)
    assert abs(plain - total) / count > 1e-4
    # Warmup evaluations are as before: no memory, nothing to compare.
    warm_evals = [r for r in read_metrics(warm_run / "metrics.jsonl") if r["kind"] == "eval"]
    assert warm_evals and all(set(r) == {"kind", "step", "time", "val_loss", "val_ppl"}
                              for r in warm_evals)


def test_eval_none_of_a_memory_model_is_memory_that_retrieves_nothing(continual_run, bank_dir,
                                                                      world_files):
    """`none` differs from `memory` by the references alone: for a model trained with memory it
    is the forward of chunks whose retrieval found nothing (the sink, no references)."""
    from memory3.eval.perplexity import evaluate, text_sequences, trained_with_memory
    from memory3.memory.reading import chunk_memories
    _, out, _ = continual_run
    model, recipe, _ = load_model(out)
    assert trained_with_memory(recipe)
    tok, bank = load_tokenizer(out), MemoryBank.open(bank_dir)
    seqs = text_sequences([world_files["heldout"]], tok, recipe.data.seq_len, max_sequences=4)
    none = evaluate(model, tok, seqs, ["none"], reads_sink=True)["none"]["loss"]
    plain = evaluate(model, tok, seqs, ["none"])["none"]["loss"]
    x, y = seqs[:, :-1], seqs[:, 1:]
    cfg = model.cfg
    nothing = np.full((len(x), -(-x.shape[1] // cfg.chunk_len), cfg.memories_per_chunk), -1)
    encoder = MemoryEncoder(model)
    with torch.no_grad():
        found_nothing = model(x, y, memory=chunk_memories(bank, nothing, encoder.sink_kv(),
                                                          encoder=encoder)).loss.item()
    assert none == pytest.approx(found_nothing, abs=1e-5)
    assert abs(plain - none) > 1e-5


def test_continual_training_trains_the_reference_bos_sink(continual_run, warm_run):
    """Warmup never sees <ref>: only continual training, through the sink every layer attends
    to, can train its embedding and the sink's keys and values."""
    from memory3.data.tokenizer import REF_BOS_ID
    _, out, _ = continual_run
    warm, _, _ = load_model(warm_run)
    cont, _, _ = load_model(out)
    with torch.no_grad():
        moved = (cont.embed.weight[REF_BOS_ID] - warm.embed.weight[REF_BOS_ID]).abs().max()
        assert moved > 1e-4, "the <ref> embedding got no gradient"
        sink_warm, sink_cont = MemoryEncoder(warm).sink_kv(), MemoryEncoder(cont).sink_kv()
        assert (sink_cont - sink_warm).abs().max() > 1e-4
        # The layers' weights move anyway: the sink must also move through its own token.
        cont.embed.weight[REF_BOS_ID] = warm.embed.weight[REF_BOS_ID]
        assert (sink_cont - MemoryEncoder(cont).sink_kv()).abs().max() > 1e-4


def chunk_text_phase(recipe, tmp_path, previous):
    """(continual phase, a valid batch x, row (B, C)) for a bank with one reference per chunk of
    x holding exactly that chunk's text, so that it is what the chunk's text picks."""
    from memory3.data import TokenShards, Tokenizer, iter_eval_batches, load_manifest
    from memory3.memory.references import Reference, reference_key
    from memory3.train.continual import ContinualPhase
    tok = Tokenizer(load_manifest(recipe.data.path)["tokenizer"]["path"])
    x, _ = next(iter_eval_batches(TokenShards(recipe.data.path, "valid"), recipe.data.seq_len,
                                  3, 1))
    L = recipe.model.chunk_len
    B, C = x.shape[0], x.shape[1] // L
    refs = []
    for b in range(B):
        for c in range(C):
            tokens = tuple(x[b, c * L:(c + 1) * L].tolist())
            refs.append(Reference(reference_key(f"seq{b}", c * L, tokens), f"seq{b}", c * L,
                                  (c + 1) * L, tokens, tok.decode(list(tokens))))
    bank_dir = tmp_path / "bank"
    with MemoryBank.create(bank_dir, recipe.model) as bank:
        row = bank.add(refs).reshape(B, C)
        top, _ = bank.retrieve([r.text for r in refs], 1)
    assert (top[:, 0] == row.reshape(-1)).all()  # the setup: each chunk's text finds its own
    phase = ContinualPhase(recipe.override(
        ["phase=continual", f"continual.bank={bank_dir}", "continual.new_per_chunk=1",
         f"continual.previous_chunks={previous}",
         "continual.overlap_threshold=1.0"]),  # a reference may copy its chunk here
        rank=0, world_size=1, device=torch.device("cpu"))
    return phase, x, row


def test_training_by_the_document_rule_reads_what_the_document_head_retrieves(tiny_data,
                                                                              tmp_path):
    """model.retrieval_query = "document": chunk c reads what the head of the document under way
    at its start retrieves (as evaluation and generation do), nothing where none is under way."""
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", *MEMORY, "model.memories_per_chunk=1",
         'model.retrieval_query="document"'])
    phase, x, row = chunk_text_phase(recipe, tmp_path, 1)
    tok, bank = phase.tokenizer, phase.bank
    reads = phase.pick_references(x)
    B, C = row.shape
    boundaries = 0
    for b in range(B):
        seq = x[b].tolist()
        boundaries += sum(t in (tok.bos_id, tok.eos_id) for t in seq[1:])
        assert reads[b, 0, 0] == -1
        for c in range(1, C):
            query = document_head(seq, c * 16, tok)
            expected = bank.retrieve([query], 1)[0][0, 0] if query is not None else -1
            assert reads[b, c, 0] == expected, (b, c)
    assert boundaries > 0  # the batch holds document boundaries: the rule is exercised


@pytest.mark.parametrize("previous", [1, 3])
def test_training_chunks_read_only_what_earlier_chunks_picked(tiny_data, tmp_path, previous):
    """Chunk c reads exactly the references picked with the text of chunks c-N .. c-1: never its
    own chunk's pick (that text is what it predicts) nor a later one; chunk 0 reads none."""
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", *MEMORY, f"model.memories_per_chunk={previous}"])
    phase, x, row = chunk_text_phase(recipe, tmp_path, previous)
    B, C = row.shape
    reads = phase.pick_references(x)
    assert reads.shape == (B, C, previous)
    for b in range(B):
        for c in range(C):
            read = sorted(r for r in reads[b, c].tolist() if r >= 0)
            assert read == sorted(row[b, max(0, c - previous):c].tolist()), (b, c)
    # The curriculum's share (the first sequences of the batch) reads chunks c-N+1 .. c instead.
    phase.recipe.continual.own_chunk_share = 0.5
    reads = phase.pick_references(x)
    own = round(0.5 * B)
    for b in range(B):
        for c in range(C):
            first = c + 1 if b < own else c
            read = sorted(r for r in reads[b, c].tolist() if r >= 0)
            assert read == sorted(row[b, max(0, first - previous):first].tolist()), (b, c)
    # Every reference here copies its sequence: the ordinary filter drops them all, while the
    # share's own filter (own_chunk_overlap) may keep them: memory that holds the text to predict.
    phase.recipe.continual.overlap_threshold = 0.9
    phase.recipe.continual.own_chunk_overlap = 1.0
    reads = phase.pick_references(x)
    for b in range(B):
        for c in range(C):
            read = sorted(r for r in reads[b, c].tolist() if r >= 0)
            if b < own:
                assert read == sorted(row[b, max(0, c + 1 - previous):c + 1].tolist()), (b, c)
            else:  # other sequences' chunks may be read, never this one's
                assert not set(read) & set(row[b].tolist()), (b, c)


def test_continual_training_writes_back_memories_of_cold_references(warm_run, world_files,
                                                                   tiny_data, tmp_path):
    from memory3.memory.references import iter_references
    tok = load_tokenizer(warm_run)
    model_cfg = Recipe.from_name("tiny-warmup").override(MEMORY).model
    cold = tmp_path / "cold"
    with MemoryBank.create(cold, model_cfg) as bank:  # references only: no memory yet
        bank.add(list(iter_references([world_files["knowledge"]], tok, model_cfg.reference_len)))
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", "phase=continual", f"continual.bank={cold}",
         f"train.init_from={warm_run}", "train.max_steps=2", "train.eval_every=100", *MEMORY])
    train(recipe, tmp_path / "cont", progress=False)
    bank = MemoryBank.open(cold)
    rows = np.arange(len(bank))
    written = rows[~bank.missing(rows)]
    assert 0 < len(written) < len(bank)  # exactly the references training read
    encoders = {r.encoder_id for r in bank.references(written)}
    assert encoders == {f"{tmp_path / 'cont'}@2"}


def test_real_time_encoding_reproduces_the_banks_memories(warm_run, bank_dir, world_files):
    """The bank was filled by warm_run's weights: encoding now must read the same memories
    (up to the bank's bf16 storage)."""
    from memory3.eval.perplexity import evaluate, text_sequences
    model, _, _ = load_model(warm_run)
    tok = load_tokenizer(warm_run)
    bank = MemoryBank.open(bank_dir)
    seqs = text_sequences([world_files["heldout"]], tok, 64, max_sequences=4)
    stored = evaluate(model, tok, seqs, ["memory"], bank=bank)["memory"]["loss"]
    fresh = evaluate(model, tok, seqs, ["memory"], bank=bank, encode_now=True)["memory"]["loss"]
    assert fresh == pytest.approx(stored, rel=1e-3)
    plain = evaluate(model, tok, seqs, ["none"])["none"]["loss"]
    assert abs(fresh - plain) > 1e-4  # and the memories are actually read


def test_a_bank_stores_the_memory_layers_it_is_asked_for(warm_run, bank_dir, world_files,
                                                         tmp_path):
    # A continual recipe may read other layers than its warmup checkpoint was trained with
    # (memory_layers shapes no weight): its bank, encoded by that checkpoint, must store those.
    out = tmp_path / "layer1"
    build_bank(warm_run, [world_files["knowledge"]], out, memory_layers=[1], progress=False)
    both, one = MemoryBank.open(bank_dir), MemoryBank.open(out)
    rows = np.arange(6)
    assert torch.equal(one.memories(rows).kv[:, 0], both.memories(rows).kv[:, 1])
    assert torch.equal(one.memories(rows).positions[:, 0], both.memories(rows).positions[:, 1])
    _, recipe, _ = load_model(warm_run)
    reads_layer1 = recipe.override(["model.memory_layers=[1]"]).model
    one.check_model_config(reads_layer1)
    with pytest.raises(Exception, match="memory_layers"):
        both.check_model_config(reads_layer1)


def test_a_bank_keeps_the_memory_top_k_it_is_asked_for(warm_run, bank_dir, world_files,
                                                       tmp_path):
    # memory_top_k shapes no weight either: a continual recipe may keep more tokens per memory.
    from conftest import run_memory3
    from memory3.data.tokenizer import PAD_ID
    from memory3.memory.references import pack_references
    out = tmp_path / "top16"
    run_memory3("build-bank", "--checkpoint", str(warm_run), "--knowledge",
                str(world_files["knowledge"]), "--out", str(out), "--memory-top-k", "16",
                "--no-progress")
    bank, rows = MemoryBank.open(out), np.arange(6)
    model, recipe, _ = load_model(warm_run)
    encoder = MemoryEncoder(model, top_k=16)
    tokens, lengths = pack_references([r.tokens for r in bank.references(rows)],
                                      ref_bos_id=encoder.ref_bos_id, pad_id=PAD_ID,
                                      reference_len=recipe.model.reference_len)
    with torch.no_grad():
        fresh = encoder.encode(tokens, lengths)
    stored = bank.memories(rows)
    assert stored.positions.shape[-1] == 16 and torch.equal(stored.positions, fresh.positions)
    torch.testing.assert_close(stored.kv.float(), fresh.kv.bfloat16().float())
    keeps16 = recipe.override(["model.memory_top_k=16"]).model
    bank.check_model_config(keeps16)
    with pytest.raises(Exception, match="memory_top_k"):
        MemoryBank.open(bank_dir).check_model_config(keeps16)
