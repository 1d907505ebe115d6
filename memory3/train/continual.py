"""Continual training with memory: the warmup model learns to read retrieved memories.

Per batch, every chunk of every sequence retrieves `new_per_chunk` references with its own query
(`model.retrieval_query`, reading.chunk_queries: its text, or the head of its document), skipping
references that overlap the sequence by more than `overlap_threshold`, and ones the previous
chunks already picked; chunk c reads the references picked by chunks c-1 .. c-N
(causal: the text it predicts never chose its memories, as at evaluation and generation), except
in the `own_chunk_share` of each batch, a curriculum whose chunks read the picks of c .. c-N+1.
All distinct references of the batch are encoded together, in real time, by the current weights,
then the ordinary LM loss is computed with them. SPEC 1b weighs gradient through that encoding
(~2x a warmup step) against none (~1.3x); we default to a third choice, `continual.encode_grad =
"kv"`: no gradient through the reference's forward, but the memory layers' key/value projections of
the kept tokens are recomputed with it. Without it keys and values are only ever trained to serve
the context, and memory reading was learnt far more slowly (bench/RESULTS.md, knowledge_reading).
References the bank holds no memory for yet get the fresh encodings written back (rank 0), so the
bank grows as training reads it.
"""
from __future__ import annotations

import numpy as np
import torch

from memory3.config import ConfigError, Recipe
from memory3.data import Tokenizer, load_manifest
from memory3.memory.bank import MemoryBank
from memory3.memory.build import check_bank_tokenizer
from memory3.memory.encoder import EncodedMemories, MemoryEncoder
from memory3.memory.overlap import EVAL_OVERLAP, exceeding
from memory3.memory.reading import (chunk_queries, encode_distinct, read_distinct,
                                    retrieve_for_chunks, retrieve_queries, sink_only)
from memory3.model import ModelOutput
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
        # Before a step writes fresh memories back into it: nothing of the bank is touched.
        check_bank_tokenizer(self.bank, self.tokenizer,
                             f"build one with the tokenizer of data.path {recipe.data.path}")
        self.pending: dict[int, EncodedMemories] = {}  # cold rows encoded, not yet written

    # -- which references each chunk reads ------------------------------------------------
    def pick_references(self, sequences: torch.Tensor) -> np.ndarray:
        """Row ids (B, C, memories_per_chunk) read by each chunk of sequences (B, T)."""
        c, cfg = self.recipe.continual, self.recipe.model
        L, n_new, N = cfg.chunk_len, c.new_per_chunk, c.previous_chunks
        B, T = sequences.shape
        C = -(-T // L)
        queries = [q for seq in sequences.tolist()
                   for q in chunk_queries(seq, self.tokenizer, L, cfg.retrieval_query)]
        candidates = retrieve_queries(self.bank, queries,
                                      n_new + c.extra_candidates).reshape(B, C, -1)
        # One read of the store for the whole batch: sequences often retrieve the same rows.
        everything = np.unique(candidates[candidates >= 0])
        records = self.bank.references(everything)
        tokens = {int(r): rec.tokens for r, rec in zip(everything, records)}
        picked = np.full((B, C, n_new), -1, dtype=np.int64)
        own = round(c.own_chunk_share * B)  # the first sequences: deterministic, nothing to resume
        own_overlap = c.overlap_threshold if c.own_chunk_overlap is None else c.own_chunk_overlap
        for b in range(B):
            rows = np.unique(candidates[b][candidates[b] >= 0]).tolist()
            too_close = exceeding([tokens[r] for r in rows], sequences[b].tolist(),
                                  own_overlap if b < own else c.overlap_threshold)
            copies = {r for r, copy in zip(rows, too_close.tolist()) if copy}
            for ci in range(C):
                # Chunk ci + 1 reads the picks of chunks ci - N + 1 .. ci: no repeats among them.
                recent = set(picked[b, max(0, ci - N + 1):ci].ravel().tolist())
                fresh = [r for r in candidates[b, ci].tolist()
                         if r >= 0 and r not in copies and r not in recent]
                picked[b, ci, :len(fresh[:n_new])] = fresh[:n_new]
        reads = np.full((B, C, N, n_new), -1, dtype=np.int64)
        for j in range(N):  # chunk ci reads the picks of chunk ci - 1 - j
            reads[:, j + 1:, j] = picked[:, :max(0, C - j - 1)]
        for j in range(N):  # ... or, in the curriculum's share, of chunk ci - j
            reads[:own, j:, j] = picked[:own, :C - j]
        return reads.reshape(B, C, N * n_new)

    # -- phase interface ------------------------------------------------------------------
    def next_batch(self) -> Batch:
        batch = super().next_batch()
        batch["rows"] = torch.from_numpy(self.pick_references(batch["inputs"].cpu()))
        return batch

    def forward(self, engine, batch: Batch) -> ModelOutput:
        model = engine.module
        encoder = MemoryEncoder(model)
        grad = self.recipe.continual.encode_grad if model.training else "none"
        distinct, index, encoded = encode_distinct(encoder, self.bank, batch["rows"].numpy(),
                                                   grad=grad)
        # The sink takes gradient in every encode_grad mode: warmup never sees the reference-BOS,
        # so without it its embedding only decays and every layer attends to an untrained key
        # (SPEC 1b "The sink must be learnt"). One token's forward: nearly free.
        memory = read_distinct(encoded, index, encoder.sink_kv(grad=model.training))
        if self.recipe.continual.write_back and self.rank == 0 and model.training:
            self._write_back(distinct, encoded)
        return engine(batch["inputs"], batch["targets"], memory=memory)

    eval_names = ("val_loss", "val_loss_no_memory")

    def eval_losses(self, engine, batch: Batch) -> tuple[torch.Tensor, ...]:
        # The same batches without references (the sink alone, reading.sink_only): whether
        # reading memory pays shows while training runs.
        x = batch["inputs"]
        alone = sink_only(MemoryEncoder(engine.module).sink_kv(), x, self.recipe.model)
        return (self.forward(engine, batch).loss,
                engine(x, batch["targets"], memory=alone).loss)

    def eval_batches(self):
        cfg = self.recipe.model
        for batch in super().eval_batches():
            batch["rows"] = torch.from_numpy(retrieve_for_chunks(
                self.bank, self.tokenizer, batch["inputs"].cpu(), chunk_len=cfg.chunk_len,
                k=cfg.memories_per_chunk, overlap_threshold=EVAL_OVERLAP,
                query=cfg.retrieval_query))
            yield batch

    def _write_back(self, distinct: np.ndarray, encoded: EncodedMemories):
        """Keep the fresh memories (encoded, one per distinct row) of rows the bank has none for;
        `flush` writes them."""
        if not len(distinct):
            return
        cold = self.bank.missing(distinct) & ~np.isin(distinct, list(self.pending))
        for i in np.flatnonzero(cold).tolist():
            self.pending[int(distinct[i])] = EncodedMemories(encoded.kv[i:i + 1].detach().cpu(),
                                                             encoded.positions[i:i + 1].cpu())

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
