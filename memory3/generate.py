"""Generation with retrieval: KV-cache decoding that swaps references chunk by chunk.

Chunks are fixed by absolute position (chunk c = positions [c*L, (c+1)*L), L = chunk_len), the
geometry the model was trained with. The prompt is known text, so each prompt chunk retrieves with
its own query. The rest of the last prompt chunk (the first generated tokens) keeps that chunk's
references; at every later chunk boundary they are dropped and `memories_per_chunk` new ones are
retrieved with the L tokens just completed as the query (or, model.retrieval_query "document",
the head of the document under way).

Two ways to read the retrieved references, with the same queries and references (SPEC 1b):
  memory  as explicit memories: each chunk's memory block is swapped in, the context's KV cache
          stays (the model keeps the block in reserved slots of the cache, attention.py).
  rag     as plain text in front of the context. The prefix changes at every chunk boundary and
          the context's keys sit after it, so the whole cache is rebuilt there: what text RAG
          really costs when decoding.
And the usual RAG baseline (the reference paper's), which retrieves differently:
  rag_once  `memories_per_chunk` references retrieved once, with the whole prompt as the query,
          put as text in front of it; then plain KV-cache decoding, never retrieving again. The
          prompt and the new tokens get the window first, the references what room is left.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from memory3.memory.encoder import MemoryEncoder
from memory3.memory.reading import (chunk_memories, chunk_queries, retrieve_queries,
                                    sink_only)
from memory3.model import Transformer
from memory3.model.transformer import sample_next

MODES = ("memory", "rag", "rag_once")


@dataclass
class Retrieval:
    chunk: int               # chunk index; its references serve positions [chunk*L, (chunk+1)*L)
                             # (rag_once: 0, and they serve the whole generation)
    position: int            # number of tokens in the sequence when the retrieval was made
    query: str
    references: list[dict]   # row, doc_id, start, end, text of each retrieved reference


@dataclass
class Generation:
    text: str                # the generated continuation (prompt excluded)
    tokens: list[int]        # prompt + continuation
    retrievals: list[Retrieval] = field(default_factory=list)


def rag_references(records, bos_id: int, eos_id: int) -> list[int]:
    """Retrieved references as text, the way the model saw documents in training: each one
    [BOS] tokens [EOS], in retrieval order."""
    return [t for r in records for t in (bos_id, *r.tokens, eos_id)]


def rag_inputs(reference_tokens: list[int], context: list[int], chunk_start: int, chunk_end: int,
               max_len: int) -> list[int]:
    """[references; context] for the chunk [chunk_start, chunk_end) whose tokens so far end
    `context`. A model with a short context cannot take everything: the chunk stays whole, then
    the references, then earlier context (the rule of eval/perplexity.py's rag mode)."""
    refs = reference_tokens[:max(0, max_len - (chunk_end - chunk_start))]
    context_start = max(0, chunk_end - (max_len - len(refs)))
    return refs + list(context[context_start:])


@torch.no_grad()
def generate(model: Transformer, tokenizer, prompt: str, *, bank=None, mode: str = "memory",
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0, stop_at_eos: bool = True, encode_now: bool = False,
             reads_sink: bool = False) -> Generation:
    """Continue `prompt`, retrieving from `bank` every chunk (no bank: plain decoding).

    mode: "memory", "rag" or "rag_once" (module docstring). encode_now: encode retrieved
    references with this model rather than reading the bank's memories (for a bank filled by
    other weights).
    reads_sink: with no bank, still read the reference-BOS sink in every chunk, as a model
    trained with memory does in every forward (mode `none` of `memory3 eval`)."""
    if mode not in MODES:
        raise ValueError(f"unknown generation mode {mode!r}; known: {list(MODES)}")
    cfg = model.cfg
    L, M = cfg.chunk_len, cfg.memories_per_chunk
    device = model.embed.weight.device
    tokens = [tokenizer.bos_id] + tokenizer.encode(prompt)
    prompt_len = len(tokens)
    total = min(len(tokens) + max_new_tokens, cfg.max_seq_len)
    if len(tokens) >= total:
        from memory3.data import DataError  # a ValueError: bad input, reported without traceback
        raise DataError(f"the prompt is {len(tokens)} tokens (with BOS), which leaves no room to "
                        f"generate under the model's max_seq_len {cfg.max_seq_len}: shorten it")
    generator = torch.Generator(device=device).manual_seed(seed)
    result = Generation(text="", tokens=tokens)

    def retrieve(chunk: int, query: str | None = None) -> np.ndarray:
        """Rows (M,) of chunk's references, retrieved with `query`, by default chunk's own query
        in the prompt, else the chunk before's (reading.chunk_queries, model.retrieval_query)."""
        if query is None:
            known, own = ((tokens[:prompt_len], chunk) if chunk * L < prompt_len
                          else (tokens[:chunk * L], chunk - 1))
            query = chunk_queries(known, tokenizer, L, cfg.retrieval_query)[own]
        rows = retrieve_queries(bank, [query], M)[0]
        records = bank.references(rows[rows >= 0])
        result.retrievals.append(Retrieval(chunk, len(tokens), query or "", [
            {"row": r.row, "doc_id": r.doc_id, "start": r.start, "end": r.end, "text": r.text}
            for r in records]))
        return rows

    memory = None  # the ChunkMemories read now (memory mode)
    if bank is not None and mode == "rag_once":
        rows = retrieve(0, prompt)
        prefix = rag_references(bank.references(rows[rows >= 0]), tokenizer.bos_id,
                                tokenizer.eos_id)[:cfg.max_seq_len - total]
        cache = model.new_cache(1, len(prefix) + total, memory_slots=0)

        def read(chunk: int) -> torch.Tensor:
            """Prefill [references; prompt] once and return the last logits."""
            return model(torch.tensor([prefix + tokens], device=device), cache=cache,
                         last_only=True).logits[0, -1]
    elif bank is not None and mode == "rag":
        cache = model.new_cache(1, cfg.max_seq_len, memory_slots=0)

        def read(chunk: int) -> torch.Tensor:
            """Rebuild the cache as [chunk's references; context] and return the last logits."""
            rows = retrieve(chunk)
            refs = rag_references(bank.references(rows[rows >= 0]), tokenizer.bos_id,
                                  tokenizer.eos_id)
            inputs = rag_inputs(refs, tokens, chunk * L, min((chunk + 1) * L, total),
                                cfg.max_seq_len)
            cache.reset()
            return model(torch.tensor([inputs], device=device), cache=cache,
                         last_only=True).logits[0, -1]
    else:
        cache = model.new_cache(1, total)
        encoder = MemoryEncoder(model) if bank is not None or reads_sink else None
        sink = encoder.sink_kv() if encoder is not None else None
        reader = dict(device=device, dtype=model.embed.weight.dtype,
                      encoder=encoder if encode_now else None)
        if bank is not None:  # every prompt chunk reads its own memories
            rows = np.stack([retrieve(c) for c in range(-(-prompt_len // L))])[None]  # (1, C, M)
            memory = chunk_memories(bank, rows, sink, **reader)
        elif sink is not None:  # the sink alone, in every chunk there will be
            memory = sink_only(sink, torch.zeros(1, total, dtype=torch.long), cfg)

        def read(chunk: int) -> torch.Tensor:
            nonlocal memory
            if chunk * L < prompt_len:  # the prompt, with all its chunks' memories
                logits = model(torch.tensor([tokens], device=device), cache=cache, memory=memory,
                               last_only=True).logits[0, -1]
                if bank is not None:  # decoding continues in this chunk with its memories
                    memory = chunk_memories(bank, rows[:, chunk:], sink, first_chunk=chunk,
                                            **reader)
                return logits
            if bank is not None:
                memory = chunk_memories(bank, retrieve(chunk)[None, None], sink,
                                        first_chunk=chunk, **reader)
            return step()

    def step() -> torch.Tensor:
        return model(torch.tensor([tokens[-1:]], device=device), cache=cache,
                     memory=memory).logits[0, -1]

    retrieves_per_chunk = bank is not None and mode != "rag_once"
    chunk = (prompt_len - 1) // L
    logits = read(chunk)
    while len(tokens) < total:
        nxt = int(sample_next(logits[None], temperature, top_k, generator)[0])
        tokens.append(nxt)
        if (stop_at_eos and nxt == tokenizer.eos_id) or len(tokens) >= total:
            break
        position = len(tokens) - 1  # of the token fed next
        if retrieves_per_chunk and position // L != chunk:
            chunk = position // L
            logits = read(chunk)
        else:
            logits = step()
    result.text = tokenizer.decode(tokens[prompt_len:])
    return result
