import json
import re
import time

import pytest

from memory3.data.synthetic import make_world, write_world


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0)


def test_deterministic_for_seed():
    a, b = make_world(seed=3, n_entities=60), make_world(seed=3, n_entities=60)
    assert a.facts == b.facts and a.entities == b.entities
    assert a.corpus_documents() == b.corpus_documents()
    assert a.knowledge_documents() == b.knowledge_documents()
    assert a.heldout_documents() == b.heldout_documents()


def test_different_seeds_differ():
    a, b = make_world(seed=1, n_entities=60), make_world(seed=2, n_entities=60)
    assert [e.name for e in a.entities] != [e.name for e in b.entities]
    assert a.corpus_documents() != b.corpus_documents()


def test_entities_and_facts(world):
    names = [e.name for e in world.entities]
    assert len(names) == 400 and len(set(names)) == 400
    assert len({e.kind for e in world.entities}) >= 5
    for e in world.entities:
        assert 4 <= len(world.facts_of(e)) <= 6
    held = [e for e in world.entities if e.heldout]
    assert 30 <= len(held) <= 50 and {e.kind for e in held} == {e.kind for e in world.entities}


def test_heldout_never_in_corpus(world):
    corpus = "\n".join(world.corpus_documents())
    held = [e for e in world.entities if e.heldout]
    for e in held:
        assert not re.search(rf"\b{re.escape(e.name)}\b", corpus), e.name
        for tok in e.name.split():  # every name token is unique, so no part may leak either
            assert not re.search(rf"\b{re.escape(tok)}\b", corpus), tok
    heldout_docs = world.heldout_documents()
    assert len(heldout_docs) >= len(held)
    for e in held:
        assert any(e.name in d for d in heldout_docs)
        # every held-out fact is in the knowledge base
        sheet = next(d for d in world.knowledge_documents() if d.startswith(f"{e.name} {e.kind} "))
        assert all(f.value in sheet for f in world.facts_of(e))


def test_known_facts_repeated_in_corpus(world):
    docs = world.corpus_documents()
    e = next(e for e in world.entities if not e.heldout)
    mentions = [d for d in docs if e.name in d]
    for f in world.facts_of(e):
        assert sum(f.value in d for d in mentions) >= 3


def test_knowledge_documents(world):
    kb = world.knowledge_documents()
    assert len(kb) == len(world.entities)
    for e, doc in zip(world.entities, kb):
        assert e.name in doc and len(doc.split()) <= 100


def test_write_world(tmp_path):
    w = make_world(seed=5, n_entities=50)
    paths = write_world(w, tmp_path / "out")
    assert set(paths) == {"corpus", "knowledge", "heldout"}
    assert all(p.exists() for p in paths.values())
    for key, docs in (("corpus", w.corpus_documents()), ("heldout", w.heldout_documents())):
        paras = [p for p in paths[key].read_text(encoding="utf-8").split("\n\n") if p.strip()]
        assert [p.strip() for p in paras] == docs and all("\n" not in d for d in docs)
    rows = [json.loads(line) for line in paths["knowledge"].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 50 and len({r["id"] for r in rows}) == 50
    assert [r["text"] for r in rows] == w.knowledge_documents()


def test_default_size_and_speed():
    t0 = time.perf_counter()
    w = make_world()
    docs = w.corpus_documents()
    w.knowledge_documents(), w.heldout_documents()
    elapsed = time.perf_counter() - t0
    size = sum(len(d.encode()) + 2 for d in docs)
    assert 1.5e6 <= size <= 3e6, size
    assert elapsed < 2.0, elapsed


def test_fresh_entities_only_in_continual_text_and_knowledge(world):
    fresh_world = make_world(seed=0, n_fresh=30)
    # Adding fresh entities changes nothing about the known and held-out ones.
    assert fresh_world.entities[:len(world.entities)] == world.entities
    assert fresh_world.corpus_documents() == world.corpus_documents()
    assert fresh_world.heldout_documents() == world.heldout_documents()
    fresh = [e for e in fresh_world.entities if e.fresh]
    assert len(fresh) == 30 and not any(e.heldout for e in fresh)
    corpus = "\n".join(world.corpus_documents())
    continual = "\n".join(fresh_world.continual_documents())
    sheets = fresh_world.knowledge_documents()
    for e in fresh:
        assert not re.search(rf"\b{re.escape(e.name)}\b", corpus), e.name
        assert continual.count(e.name) >= 2
        assert any(s.startswith(f"{e.name} {e.kind} ") for s in sheets)
    assert not any(e.name in continual for e in fresh_world.entities if e.heldout)
    assert world.continual_documents() == []


def test_several_sheets_per_entity_each_hold_every_fact():
    w = make_world(seed=0, n_entities=60, sheets_per_entity=3)
    rows = w.knowledge_records()
    assert len(rows) == 3 * len(w.entities) and len({r["id"] for r in rows}) == len(rows)
    for e in w.entities:
        sheets = [r["text"] for r in rows if r["text"].startswith(f"{e.name} {e.kind} ")]
        assert len(set(sheets)) == 3  # the same facts in three orders
        assert all(f.value in s for s in sheets for f in w.facts_of(e))


def test_records_of_one_fact_and_records_worded_as_the_text():
    w = make_world(seed=0, n_entities=60, n_fresh=9, facts_per_record=1, documents_per_fresh=1)
    rows = w.knowledge_records()
    assert len(rows) == len(w.facts) and len({r["id"] for r in rows}) == len(rows)
    for e in w.entities:
        mine = [r["text"] for r in rows if r["text"].startswith(f"{e.name} {e.kind} ")]
        assert sorted(t.split()[-1] for t in mine) == sorted(f.value.split()[-1]
                                                            for f in w.facts_of(e))
    continual = w.continual_documents()
    assert all(sum(e.name in d for d in continual) == 1 for e in w.entities if e.fresh)

    w = make_world(seed=0, n_entities=60, worded_records=True)
    worded = w.knowledge_records()
    assert len(worded) == 3 * len(w.facts)  # every fact in each of its three templates
    person = next(e for e in w.entities if e.kind == "person"
                  and any(f.attribute == "born" for f in w.facts_of(e)))
    born = next(f for f in w.facts_of(person) if f.attribute == "born")
    assert any(r["text"].endswith(f" : {person.name} was born in {born.value}.") for r in worded)
