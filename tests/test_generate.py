"""Generation with retrieval: memory and rag modes read the same references; rag decoding with its
rebuilt cache equals a full forward over the same [references; context]."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from memory3.generate import generate, rag_inputs, rag_references
from memory3.memory.bank import MemoryBank
from memory3.train.checkpoint import load_model, load_tokenizer

from conftest import SHORT_CHUNK as L  # chunks a short generation crosses several of

PROMPT = "The city of Velmora was founded by a man from the river lands"


@pytest.fixture(scope="module")
def parts(short_chunk_run):
    run, bank_dir = short_chunk_run
    model, _, _ = load_model(run)
    return model.eval(), load_tokenizer(run), MemoryBank.open(bank_dir)


def rows_of(retrieval) -> list[int]:
    return [ref["row"] for ref in retrieval.references]


def test_rag_retrieves_like_memory_mode(parts):
    model, tok, bank = parts
    memory = generate(model, tok, PROMPT, bank=bank, max_new_tokens=50, stop_at_eos=False)
    rag = generate(model, tok, PROMPT, bank=bank, mode="rag", max_new_tokens=50,
                   stop_at_eos=False)
    n_prompt = len(tok.encode(PROMPT)) + 1
    last_prompt_chunk = (n_prompt - 1) // L
    assert len(rag.tokens) == len(memory.tokens) == n_prompt + 50
    # rag needs no memories for the earlier prompt chunks; from the last one on, one retrieval
    # per chunk that a token is fed in, made at the same moment with the same rule as memory
    # mode. The last token is sampled, never fed: a chunk it alone opens retrieves nothing.
    assert [r.chunk for r in rag.retrievals] == list(range(last_prompt_chunk,
                                                           (len(rag.tokens) - 2) // L + 1))
    first_rag, first_memory = rag.retrievals[0], memory.retrievals[last_prompt_chunk]
    assert (first_rag.query, rows_of(first_rag)) == (first_memory.query, rows_of(first_memory))
    for out in (rag, memory):
        for r in out.retrievals:
            if r.chunk > last_prompt_chunk:
                assert r.position == r.chunk * L + 1
                assert r.query == tok.decode(out.tokens[(r.chunk - 1) * L:r.chunk * L])
            assert rows_of(r) == [int(i) for i in bank.retrieve([r.query], 3)[0][0] if i >= 0]


@torch.no_grad()
def test_rag_decoding_equals_full_forward_over_the_same_prefix(parts):
    model, tok, bank = parts
    out = generate(model, tok, PROMPT, bank=bank, mode="rag", max_new_tokens=40,
                   stop_at_eos=False)
    refs = {r.chunk: rag_references(bank.references(rows_of(r)), tok.bos_id, tok.eos_id)
            for r in out.retrievals}
    n_prompt = len(tok.encode(PROMPT)) + 1
    for p in range(n_prompt, len(out.tokens)):  # token p was sampled after feeding token p-1
        chunk = (p - 1) // L
        inputs = rag_inputs(refs[chunk], out.tokens[:p], chunk * L,
                            min((chunk + 1) * L, len(out.tokens)), model.cfg.max_seq_len)
        assert inputs[-(p - chunk * L):] == out.tokens[chunk * L:p]
        logits = model(torch.tensor([inputs])).logits[0, -1]
        assert int(logits.argmax()) == out.tokens[p], f"position {p}"



@torch.no_grad()
def test_rag_once_retrieves_once_with_the_prompt_then_decodes_plainly(parts):
    """rag_once: one retrieval, the prompt as the query; its tokens are those of a full forward
    over [references; prompt; generated so far] at every step; a tight window cuts the
    references, never the prompt or the new tokens."""
    model, tok, bank = parts
    out = generate(model, tok, PROMPT, bank=bank, mode="rag_once", max_new_tokens=3 * L,
                   stop_at_eos=False)
    n_prompt = len(tok.encode(PROMPT)) + 1
    assert len(out.tokens) == n_prompt + 3 * L and len(out.retrievals) == 1
    (once,) = out.retrievals
    assert (once.chunk, once.position, once.query) == (0, n_prompt, PROMPT)
    assert rows_of(once) == [int(i) for i in bank.retrieve([PROMPT], 3)[0][0] if i >= 0]
    refs = rag_references(bank.references(rows_of(once)), tok.bos_id, tok.eos_id)
    assert len(refs) > 0
    for p in range(n_prompt, len(out.tokens)):
        logits = model(torch.tensor([refs + out.tokens[:p]])).logits[0, -1]
        assert int(logits.argmax()) == out.tokens[p], f"position {p}"
    tight = copy.deepcopy(model)
    tight.cfg.max_seq_len = n_prompt + 10 + 5  # room for 5 reference tokens after 10 new ones
    cut = generate(tight, tok, PROMPT, bank=bank, mode="rag_once", max_new_tokens=10,
                   stop_at_eos=False)
    assert len(cut.tokens) == n_prompt + 10
    for p in range(n_prompt, len(cut.tokens)):
        logits = tight(torch.tensor([refs[:5] + cut.tokens[:p]])).logits[0, -1]
        assert int(logits.argmax()) == cut.tokens[p], f"position {p}"

def test_rag_inputs_keep_the_chunk_then_references_then_context():
    refs, context = list(range(100, 130)), list(range(40))
    assert rag_inputs(refs, context, 32, 48, 1000) == refs + context
    # 24 slots: the chunk's 16 first, then 8 of the references, no earlier context
    assert rag_inputs(refs, context, 32, 48, 24) == refs[:8] + context[32:]
    # 60 slots: all 30 references, then the 30 latest context positions up to the chunk's end
    assert rag_inputs(refs, context, 32, 48, 60) == refs + context[18:]


def test_generate_cli_rag_mode(short_chunk_run, tmp_path):
    from conftest import run_memory3
    run, bank = short_chunk_run
    out = tmp_path / "rag.json"
    run_memory3("generate", "--checkpoint", str(run), "--bank", str(bank), "--mode", "rag",
                "--prompt", PROMPT, "--max-new-tokens", "20", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["retrievals"] and all(r["references"] for r in result["retrievals"])


def test_generate_cli_rag_once_mode(short_chunk_run, tmp_path):
    """rag_once from the command line: one retrieval, with the prompt, for the whole generation."""
    from conftest import run_memory3
    run, bank = short_chunk_run
    out = tmp_path / "rag_once.json"
    run_memory3("generate", "--checkpoint", str(run), "--bank", str(bank), "--mode", "rag_once",
                "--prompt", PROMPT, "--max-new-tokens", "20", "--json", str(out))
    result = json.loads(out.read_text())
    assert len(result["retrievals"]) == 1 and result["retrievals"][0]["references"]


def test_unknown_mode_is_refused(parts):
    model, tok, bank = parts
    with pytest.raises(ValueError, match="unknown generation mode"):
        generate(model, tok, PROMPT, bank=bank, mode="text")


def test_without_a_bank_a_model_trained_with_memory_decodes_reading_its_sink(parts):
    """reads_sink decoding (KV cache, sink-only memories) equals a plain reference, a full
    forward per token over the whole sequence reading the sink alone; every forward of it is
    given the sink, and none without reads_sink."""
    from memory3.memory.encoder import MemoryEncoder
    from memory3.memory.reading import sink_only
    model, tok, _ = parts
    model = copy.deepcopy(model)
    seen = []
    forward = model.forward

    def recording(*args, memory=None, **kwargs):
        seen.append(memory is not None and memory.sink is not None)
        return forward(*args, memory=memory, **kwargs)

    model.forward = recording
    out = generate(model, tok, PROMPT, max_new_tokens=3 * L, reads_sink=True)
    assert len(seen) > 3 * L - 5 and all(seen)
    seen.clear()
    generate(model, tok, PROMPT, max_new_tokens=3 * L)
    assert seen and not any(seen)
    model.forward = forward
    sink = MemoryEncoder(model).sink_kv()
    tokens = [tok.bos_id, *tok.encode(PROMPT)]
    with torch.no_grad():
        for _ in range(3 * L):
            x = torch.tensor([tokens])
            tokens.append(int(model(x, memory=sink_only(sink, x, model.cfg)).logits[0, -1]
                              .argmax()))
            if tokens[-1] == tok.eos_id:
                break
    assert out.tokens == tokens
