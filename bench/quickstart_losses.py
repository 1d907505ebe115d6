"""Where the quickstart's held-out loss sits, and which part of it memory reaches.

For a folder of `bench/quickstart_variants.py` and one of its continual runs: the held-out text as
the quickstart scores it (32 x 256 tokens), each target token labelled chunk 0 (reads nothing,
whatever the bank holds) or not, and held-out entity name / fact value / other; per label the
nats in modes none (the sink alone), memory (causal) and own (references retrieved with the chunk
itself: the non-causal upper bound). `in reach`: the share of the value tokens after chunk 0 whose
chunk reads a reference naming both the entity and the value (evaluation retrieval, overlap filter
on). --kept N lists the tokens each memory layer and KV head keeps of the last N records.

    python bench/quickstart_losses.py bench_runs/qsv continual-f1p5 --world '{...}' --text '{...}'

(--world and --text as given to quickstart_variants.py: they name the held-out entities.)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quickstart_variants import (EVAL_SEQUENCES, FRESH_ENTITIES, SHEETS_PER_ENTITY,  # noqa: E402
                                 variant_world)

from memory3.data import Tokenizer  # noqa: E402
from memory3.data.synthetic import make_world  # noqa: E402
from memory3.eval.perplexity import text_sequences  # noqa: E402
from memory3.memory.bank import MemoryBank  # noqa: E402
from memory3.memory.encoder import MemoryEncoder  # noqa: E402
from memory3.memory.overlap import EVAL_OVERLAP  # noqa: E402
from memory3.memory.reading import chunk_memories, retrieve_for_chunks, sink_only  # noqa: E402
from memory3.train.checkpoint import load_model  # noqa: E402

MODES = ("none", "memory", "own")


def token_labels(tokenizer, ids: list[int], spans: list[tuple[str, list[str]]]
                 ) -> tuple[list[str], list[str]]:
    """Per token, the first category one of whose strings overlaps it in the decoded text, and
    that string."""
    ends = [len(tokenizer.decode(ids[:j + 1])) for j in range(len(ids))]
    starts = [0] + ends[:-1]
    text = tokenizer.decode(ids)
    labels, strings = ["other"] * len(ids), [""] * len(ids)
    for category, candidates in spans:
        for s in candidates:
            for m in re.finditer(re.escape(s), text):
                for j in range(len(ids)):
                    if starts[j] < m.end() and ends[j] > m.start() and labels[j] == "other":
                        labels[j], strings[j] = category, s
    return labels, strings


@torch.no_grad()
def mode_losses(model, tok, bank, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Per-token losses (B, T) of y after x in each of MODES, and the rows each chunk reads in
    modes memory (causal, evaluation filter) and own."""
    encoder = MemoryEncoder(model)
    sink = encoder.sink_kv()
    L, M = model.cfg.chunk_len, model.cfg.memories_per_chunk
    rows = {m: retrieve_for_chunks(bank, tok, x, chunk_len=L, k=M, overlap_threshold=EVAL_OVERLAP,
                                   own_chunk=m == "own") for m in ("memory", "own")}
    losses = {}
    for mode in MODES:
        memory = (sink_only(sink, x, model.cfg) if mode == "none" else
                  chunk_memories(bank, rows[mode], sink, encoder=encoder))
        logits = model(x, memory=memory).logits.float()
        losses[mode] = F.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                       reduction="none").view(y.shape)
    return losses, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("run", help="the continual run's folder name under out")
    p.add_argument("--world", default="{}")
    p.add_argument("--text", default="{}")
    p.add_argument("--kept", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    world = variant_world(make_world(**{"seed": 0, "n_fresh": FRESH_ENTITIES,
                                        "sheets_per_entity": SHEETS_PER_ENTITY,
                                        **json.loads(args.world)}), json.loads(args.text))
    tok = Tokenizer(out / "tokenizer")
    model, _, _ = load_model(out / args.run)
    model.eval()
    bank = MemoryBank.open(out / "bank")
    seqs = text_sequences([out / "corpus" / "heldout.txt"], tok, model.cfg.chunk_len * 4,
                          max_sequences=EVAL_SEQUENCES)
    x, y = seqs[:, :-1], seqs[:, 1:]
    L = model.cfg.chunk_len
    losses, rows = mode_losses(model, tok, bank, x, y)
    held = [e for e in world.entities if e.heldout]
    owners = defaultdict(set)  # value -> the held-out entities that have it
    for e in held:
        for f in world.facts_of(e):
            owners[f.value].add(e.name)
    spans = [("name", sorted({e.name for e in held}, key=len, reverse=True)),
             ("value", sorted(owners, key=len, reverse=True))]
    nats, count = defaultdict(lambda: [0.0] * len(MODES)), defaultdict(int)
    reach = [0, 0]
    for b in range(len(y)):
        ids = y[b].tolist()
        labels, strings = token_labels(tok, ids, spans)
        for j, label in enumerate(labels):
            key = ("chunk 0 " if j < L else "") + label
            count[key] += 1
            for i, mode in enumerate(MODES):
                nats[key][i] += losses[mode][b, j].item()
        # In reach: a value token after chunk 0 whose chunk reads a record with entity and value.
        text_of = {r: bank.references([r])[0].text for r in rows["memory"][b].ravel() if r >= 0}
        for c in range(1, y.shape[1] // L):
            read = [text_of[r] for r in rows["memory"][b, c] if r >= 0]
            for j in range(c * L, (c + 1) * L):
                if labels[j] == "value":
                    reach[1] += 1
                    reach[0] += any(name in t and strings[j] in t for t in read
                                    for name in owners[strings[j]])
    total = [sum(v[i] for v in nats.values()) for i in range(len(MODES))]
    tokens = sum(count.values())
    print(f"{'tokens':>22} {'share of none':>14} " + " ".join(f"{m:>7}" for m in MODES)
          + "   (nats per token)")
    for key in sorted(nats):
        print(f"{key:>14} {count[key]:7d} {nats[key][0] / total[0]:14.3f} "
              + " ".join(f"{v / count[key]:7.3f}" for v in nats[key]))
    print(f"{'all':>14} {tokens:7d} {1:14.3f} " + " ".join(f"{t / tokens:7.3f}" for t in total))
    print(f"value tokens after chunk 0 in reach of causal reads: {reach[0]} of {reach[1]} "
          f"({reach[0] / max(reach[1], 1):.2f}); perplexity memory/none "
          f"{torch.tensor((total[1] - total[0]) / tokens).exp().item():.3f}, own/none "
          f"{torch.tensor((total[2] - total[0]) / tokens).exp().item():.3f}")
    if args.kept:
        kept(model, MemoryEncoder(model), tok, bank, args.kept)


def kept(model, encoder, tok, bank, n: int):
    from memory3.data.tokenizer import PAD_ID
    from memory3.memory.references import pack_references
    records = bank.references(list(range(len(bank) - n, len(bank))))
    tokens, lengths = pack_references([r.tokens for r in records], ref_bos_id=encoder.ref_bos_id,
                                      pad_id=PAD_ID, reference_len=model.cfg.reference_len)
    with torch.no_grad():
        positions = encoder.encode(tokens, lengths).positions
    for record, pos in zip(records, positions):
        pieces = ["<ref>"] + [tok.decode([t]) or "_" for t in record.tokens]
        print(record.text)
        for layer in range(pos.shape[0]):
            for g in range(pos.shape[1]):
                print(f"  memory layer {layer} head {g}: " + " ".join(
                    pieces[i] for i in pos[layer, g].tolist() if 0 <= i < len(pieces)))


if __name__ == "__main__":
    main()
