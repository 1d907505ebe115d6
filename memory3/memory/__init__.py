"""Explicit memory: references -> sparse memories (encoder) -> a bank on disk with retrieval.

    from memory3.memory import MemoryBank
    bank = MemoryBank.open("bank")
    rows, scores = bank.retrieve(chunks, k=5)
    memories = bank.memories(rows, device="cuda", dtype=torch.bfloat16)
"""
from memory3.memory.bank import (MemoryBank, ReferenceRecord, checkpoint_encoder,
                                 checkpoint_encoder_id)
from memory3.memory.build import build_bank
from memory3.memory.codec import FaissCodec, RawCodec, make_codec
from memory3.memory.embedders import (HashingEmbedder, LexicalEmbedder,
                                      SentenceTransformerEmbedder, make_embedder)
from memory3.memory.encoder import EncodedMemories, MemoryEncoder
from memory3.memory.index import ReferenceIndex
from memory3.memory.references import Reference, iter_references, pack_references
from memory3.memory.store import BankError, MemoryLayout, MemoryStore

__all__ = ["BankError", "EncodedMemories", "FaissCodec", "HashingEmbedder", "LexicalEmbedder",
           "MemoryBank",
           "MemoryEncoder", "MemoryLayout", "MemoryStore", "RawCodec", "Reference",
           "ReferenceIndex", "ReferenceRecord", "SentenceTransformerEmbedder", "build_bank",
           "checkpoint_encoder", "checkpoint_encoder_id", "iter_references", "make_codec",
           "make_embedder", "pack_references"]
