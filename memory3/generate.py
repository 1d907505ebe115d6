"""Generation with explicit memory: KV-cache decoding that swaps memories chunk by chunk.

Chunks are fixed by absolute position (chunk c = positions [c*L, (c+1)*L), L = chunk_len), the
geometry the model was trained with. The prompt is known text, so each prompt chunk reads
memories retrieved with its own text. The rest of the last prompt chunk (the first generated
tokens) keeps that chunk's memories; at every later chunk boundary the memories are dropped and
`memories_per_chunk` new ones are retrieved with the L tokens just completed as the query.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from memory3.memory.encoder import MemoryEncoder
from memory3.memory.reading import chunk_memories, chunk_texts
from memory3.model import Transformer
from memory3.model.transformer import sample_next


@dataclass
class Retrieval:
    chunk: int               # chunk index; its memories serve positions [chunk*L, (chunk+1)*L)
    position: int            # number of tokens in the sequence when the retrieval was made
    query: str
    references: list[dict]   # row, doc_id, start, end, text of each retrieved reference


@dataclass
class Generation:
    text: str                # the generated continuation (prompt excluded)
    tokens: list[int]        # prompt + continuation
    retrievals: list[Retrieval] = field(default_factory=list)


@torch.no_grad()
def generate(model: Transformer, tokenizer, prompt: str, *, bank=None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             stop_at_eos: bool = True, encode_now: bool = False) -> Generation:
    """encode_now: encode retrieved references with this model rather than reading the bank's
    memories (for a bank filled by other weights)."""
    cfg = model.cfg
    L, M = cfg.chunk_len, cfg.memories_per_chunk
    device = model.embed.weight.device
    tokens = [tokenizer.bos_id] + tokenizer.encode(prompt)
    prompt_len = len(tokens)
    total = min(len(tokens) + max_new_tokens, cfg.max_seq_len)
    if len(tokens) >= total:
        raise ValueError(f"prompt of {len(tokens)} tokens leaves no room under max_seq_len "
                         f"{cfg.max_seq_len}")
    generator = torch.Generator(device=device).manual_seed(seed)
    result = Generation(text="", tokens=tokens)
    encoder = MemoryEncoder(model) if bank is not None else None
    sink = encoder.sink_kv() if encoder is not None else None
    reader = dict(device=model.embed.weight.device, dtype=model.embed.weight.dtype,
                  encoder=encoder if encode_now else None)

    def retrieve(chunk: int, query: str) -> np.ndarray:
        rows = bank.retrieve([query], M)[0][0]
        records = bank.references(rows[rows >= 0])
        result.retrievals.append(Retrieval(chunk, len(tokens), query, [
            {"row": r.row, "doc_id": r.doc_id, "start": r.start, "end": r.end, "text": r.text}
            for r in records]))
        return rows

    cache = model.new_cache(1, total)
    memory = None
    if bank is not None:
        texts = chunk_texts(tokens, tokenizer, L)
        rows = np.stack([retrieve(c, t) for c, t in enumerate(texts)])[None]  # (1, C, M)
        memory = chunk_memories(bank, rows, sink, **reader)
    logits = model(torch.tensor([tokens], device=device), cache=cache, memory=memory).logits[0, -1]
    if memory is not None:  # decoding continues in the last prompt chunk with its memories
        last = memory.kv.shape[1] - 1
        memory = chunk_memories(bank, rows[:, last:], sink, first_chunk=last, **reader)
    while len(tokens) < total:
        nxt = int(sample_next(logits[None], temperature, top_k, generator)[0])
        tokens.append(nxt)
        if (stop_at_eos and nxt == tokenizer.eos_id) or len(tokens) >= total:
            break
        position = len(tokens) - 1  # of the token fed next
        if bank is not None and position % L == 0:
            chunk = position // L
            rows = retrieve(chunk, tokenizer.decode(tokens[position - L:position]))[None, None]
            memory = chunk_memories(bank, rows, sink, first_chunk=chunk, **reader)
        logits = model(torch.tensor([[nxt]], device=device), cache=cache,
                       memory=memory).logits[0, -1]
    result.text = tokenizer.decode(tokens[prompt_len:])
    return result
