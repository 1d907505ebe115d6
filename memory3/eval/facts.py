"""Does a model read its memories? A world of facts nobody can guess, and their loss.

Made-up names (four random syllables) each get a value drawn at random from 40 words. Text states a
fact as "Name Name ... Name = value ." with the name repeated often enough (`repeats`) to fill a
whole 64-token chunk before the value: with causal retrieval the chunk before the value is the
query, so it must be about the entity, as consecutive chunks of real text share their subject. The
knowledge base says the same in other words ("greek letters : Name = value .") five times per
entity (`records`): references of ~13 tokens, of which memory_top_k = 8 keep most. Three disjoint
groups: `train` (text + bank), `warm` (text only: teaches the format, after "=" one of 40 words),
`heldout` (bank only). Without memory no model beats log(40) = 3.7 nats on a held-out value; with
memory read, it can approach 0.
Used by tests/test_knowledge.py and bench/knowledge_reading.py.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

VALUES = ("apple house water green table stone river light music paper glass bread chair cloud "
          "dream earth flame grass heart horse juice knife lemon money night ocean piano queen "
          "radio sheep tiger train wheel zebra sugar tooth smile storm snake plant").split()
SYLLABLES = "ka lo mi ter vun sa dri pol gen ru fa zek bo nil quo xa".split()
FILLER = "alpha beta gamma delta omega sigma kappa theta lambda zeta".split()
# The fact world is read in the shipped memory format (model and continual defaults: 64-token
# chunks, the first half of the layers, top-8 of each reference, 1 new reference per chunk read by
# the next 5 chunks); sequences of 256 tokens hold several facts and 4 chunks.
FACT_DATA = ["data.seq_len=256"]


def write_facts(out: str | Path, n_train: int = 3000, n_warm: int = 500, n_heldout: int = 100,
                seed: int = 0, repeats: tuple[int, int] = (24, 28),
                records: int = 5) -> dict[str, Path]:
    """train.txt, warm.txt, heldout.txt (one fact per paragraph) and kb.jsonl under out."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n_train + n_warm + n_heldout:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(4)).capitalize())
    ordered = sorted(names)
    rng.shuffle(ordered)
    fact = {n: rng.choice(VALUES) for n in ordered}
    groups = {"train": ordered[:n_train], "warm": ordered[n_train:n_train + n_warm],
              "heldout": ordered[n_train + n_warm:]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, group in groups.items():
        docs = [" ".join([n] * rng.randint(*repeats)) + f" = {fact[n]} ." for n in group]
        paths[split] = out / f"{split}.txt"
        paths[split].write_text("\n\n".join(docs) + "\n")
    paths["knowledge"] = out / "kb.jsonl"
    with open(paths["knowledge"], "w") as f:
        for n in groups["train"] + groups["heldout"]:  # warm entities are nowhere in the bank
            for _ in range(records):
                filler = " ".join(rng.sample(FILLER, 5))
                f.write(json.dumps({"text": f"{filler} : {n} = {fact[n]} ."}) + "\n")
    return paths


@torch.no_grad()
def fact_losses(model, bank, tokenizer, heldout: str | Path, *,
                reads_sink: bool = False) -> dict[str, float]:
    """Mean loss (nats) of the value after "=" (all its tokens, summed) in each document of
    `heldout`, without and with memory: causal retrieval by the previous chunk, the evaluation
    overlap filter, references encoded now by `model` (its weights may differ from those that
    filled the bank). A model that knows only the format pays log(40) per value without memory.
    reads_sink: the model was trained reading memory; `none` reads its sink alone
    (perplexity.py)."""
    from memory3.memory.encoder import MemoryEncoder
    from memory3.memory.overlap import EVAL_OVERLAP
    from memory3.memory.reading import chunk_memories, retrieve_for_chunks, sink_only

    model.eval()
    encoder = MemoryEncoder(model)
    sink = encoder.sink_kv()
    L, M = model.cfg.chunk_len, model.cfg.memories_per_chunk
    eq = tokenizer.encode(" =")[-1]
    losses: dict[str, list[float]] = {"none": [], "memory": []}
    for doc in Path(heldout).read_text().split("\n\n"):
        ids = [tokenizer.bos_id] + tokenizer.encode(doc.strip())
        x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
        # y[at:end] are the value's tokens: after the last "=", before the closing " ."
        at, end = len(ids) - 1 - ids[::-1].index(eq), len(ids) - 2
        if at < L:
            raise ValueError(f"{heldout}: a fact sits in the first {L}-token chunk, which has no "
                             f"previous chunk to retrieve with; repeat the name more")
        rows = retrieve_for_chunks(bank, tokenizer, x, chunk_len=L, k=M,
                                   overlap_threshold=EVAL_OVERLAP,
                                   query=model.cfg.retrieval_query)
        memory = chunk_memories(bank, rows, sink, encoder=encoder)
        alone = sink_only(sink, x, model.cfg) if reads_sink else None
        for mode, m in (("none", alone), ("memory", memory)):
            logits = model(x, memory=m).logits[0, at:end].float()
            losses[mode].append(F.cross_entropy(logits, y[0, at:end], reduction="sum").item())
    return {mode: sum(v) / len(v) for mode, v in losses.items()}
