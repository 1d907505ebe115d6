"""Continual training with memory: the warmup model learns to read retrieved memories.

Per batch, every chunk of every sequence retrieves `new_per_chunk` references with its own text
(skipping references that overlap the sequence by more than `overlap_threshold`, and ones the
previous chunks already picked); chunk c reads the references picked by chunks c-1 .. c-N
(causal: the text it predicts never chose its memories, as at evaluation and generation).
All distinct references of the batch are encoded together, in real time, by the current weights
without gradient (SPEC 1b: the cheaper choice), then the ordinary LM loss is computed with them.
References the bank holds no memory for yet get the fresh encodings written back (rank 0), so the
bank grows as training reads it.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from memory3.config import ConfigError, Recipe
from memory3.data import Tokenizer, load_manifest
from memory3.memory.bank import MemoryBank
from memory3.memory.encoder import EncodedMemories, MemoryEncoder
from memory3.memory.overlap import EVAL_OVERLAP, exceeds
from memory3.memory.reading import chunk_texts, encode_rows, retrieve_for_chunks
from memory3.model import ChunkMemories, ModelOutput, compact_slots
from memory3.train.phases import Batch, WarmupPhase


class ContinualPhase(WarmupPhase):
    def __init__(self, recipe: Recipe, rank: int, world_size: int, device: torch.device):
        super().__init__(recipe, rank, world_size, device)
        c = recipe.continual
        if not c.bank:
            raise ConfigError("phase 'continual' needs continual.bank: a folder made by "
                              "`memory3 build-bank`")
        self.bank = MemoryBank.open(c.bank, verify="size")
        self.bank.check_model_config(recipe.model, "the recipe's model")
        self.tokenizer = Tokenizer(load_manifest(recipe.data.path)["tokenizer"]["path"])
        self.pending: dict[int, EncodedMemories] = {}  # cold rows encoded, not yet written

    # -- which references each chunk reads ------------------------------------------------
    def pick_references(self, sequences: torch.Tensor) -> np.ndarray:
        """Row ids (B, C, memories_per_chunk) read by each chunk of sequences (B, T)."""
        c, cfg = self.recipe.continual, self.recipe.model
        L, n_new, N = cfg.chunk_len, c.new_per_chunk, c.previous_chunks
        B, T = sequences.shape
        C = -(-T // L)
        texts = [chunk_texts(seq, self.tokenizer, L) for seq in sequences.tolist()]
        candidates, _ = self.bank.retrieve([t for row in texts for t in row],
                                           n_new + c.extra_candidates)
        candidates = candidates.reshape(B, C, -1)
        picked = np.full((B, C, n_new), -1, dtype=np.int64)
        for b in range(B):
            seq = sequences[b].tolist()
            counts = Counter(seq)
            rows = [int(r) for r in np.unique(candidates[b][candidates[b] >= 0])]
            copies = {r for r, rec in zip(rows, self.bank.references(rows))
                      if exceeds(rec.tokens, seq, c.overlap_threshold, counts)}
            for ci in range(C):
                # Chunk ci + 1 reads the picks of chunks ci - N + 1 .. ci: no repeats among them.
                recent = set(picked[b, max(0, ci - N + 1):ci].ravel().tolist())
                fresh = [int(r) for r in candidates[b, ci]
                         if r >= 0 and int(r) not in copies and int(r) not in recent]
                picked[b, ci, :len(fresh[:n_new])] = fresh[:n_new]
        reads = np.full((B, C, N, n_new), -1, dtype=np.int64)
        for j in range(N):  # chunk ci reads the picks of chunk ci - 1 - j
            reads[:, j + 1:, j] = picked[:, :max(0, C - j - 1)]
        return reads.reshape(B, C, N * n_new)

    # -- phase interface ------------------------------------------------------------------
    def next_batch(self) -> Batch:
        batch = super().next_batch()
        batch["rows"] = torch.from_numpy(self.pick_references(batch["inputs"].cpu()))
        return batch

    def forward(self, engine, batch: Batch) -> ModelOutput:
        model = engine.module
        encoder = MemoryEncoder(model)
        rows = batch["rows"].numpy()
        encoded = encode_rows(encoder, self.bank, rows)
        kv, valid = compact_slots(encoded.kv, encoded.positions)
        memory = ChunkMemories(kv=kv, valid=valid, sink=encoder.sink_kv())
        if self.recipe.continual.write_back and self.rank == 0 and model.training:
            self._write_back(rows, encoded)
        return engine(batch["inputs"], batch["targets"], memory=memory)

    def eval_batches(self):
        cfg = self.recipe.model
        for batch in super().eval_batches():
            batch["rows"] = torch.from_numpy(retrieve_for_chunks(
                self.bank, self.tokenizer, batch["inputs"].cpu(), chunk_len=cfg.chunk_len,
                k=cfg.memories_per_chunk, overlap_threshold=EVAL_OVERLAP))
            yield batch

    def _write_back(self, rows: np.ndarray, encoded: EncodedMemories):
        """Keep the fresh memories of rows the bank has none for; `flush` writes them."""
        flat = rows.reshape(-1)
        unique, first = np.unique(flat, return_index=True)
        keep = unique >= 0
        unique, first = unique[keep], first[keep]
        cold = self.bank.missing(unique) & ~np.isin(unique, list(self.pending))
        kv = encoded.kv.reshape(len(flat), *encoded.kv.shape[rows.ndim:])
        positions = encoded.positions.reshape(len(flat), *encoded.positions.shape[rows.ndim:])
        for row, i in zip(unique[cold], first[cold]):
            self.pending[int(row)] = EncodedMemories(kv[i:i + 1].cpu(), positions[i:i + 1].cpu())

    def flush(self, step: int, run_dir):
        """Write the pending memories to the bank, recorded as made by this run at this step."""
        if not self.pending:
            return
        rows = np.array(sorted(self.pending), dtype=np.int64)
        memories = EncodedMemories(torch.cat([self.pending[r].kv for r in rows.tolist()]),
                                   torch.cat([self.pending[r].positions for r in rows.tolist()]))
        self.bank.put_memories(rows, memories, f"{run_dir}@{step}",
                               info={"run": str(run_dir), "step": step, "phase": "continual"})
        self.pending.clear()
