"""What does the sparse memory keep, at this model's scale? One checkpoint, several memory_top_k.

A memory keeps `memory_top_k` tokens per memory layer and KV head of a reference of up to 127
(SPEC 1). Kept dense, a memory reads exactly as its text in front of its chunk
(tests/test_copying.py), so the loss between the dense and the sparse rows is what the selection
drops, and the rows below tell it apart from what retrieval and reading cost:

  copy       the memory copy probe (memory3.eval.copying): each held-out span read as its own
             memory, loss / loss with the sink alone; `text` is the plain copy probe's ratio.
  next       the span's memory read while predicting the span's continuation (the next `length`
             tokens of its document): knowledge of the same document, not a copy of the target.
  causal     `memory3 eval` mode memory on held-out sequences (references retrieved with the
             previous chunk, evaluation overlap filter), memories encoded now at each top_k.
  own_chunk  the same with the chunk's own text as the query (the non-causal upper bound).

Memories are encoded now by the checkpoint at each top_k, so one bank (any top_k: only its index
and references are read) serves all rows. --memory-layers reads other layers than the
checkpoint's (e.g. the continual recipe's, for a warmup checkpoint).

    python bench/memory_sparsity.py --checkpoint runs/cpu-continual --bank bank \
        --data heldout.jsonl --top-k 8,32,127
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory3.checkpoints import load_model, load_tokenizer  # noqa: E402
from memory3.data import iter_documents  # noqa: E402
from memory3.data.tokenizer import PAD_ID  # noqa: E402
from memory3.eval.copying import copy_probe, memory_copy_probe  # noqa: E402
from memory3.eval.perplexity import evaluate, text_sequences, trained_with_memory  # noqa: E402
from memory3.memory.bank import MemoryBank  # noqa: E402
from memory3.memory.encoder import MemoryEncoder  # noqa: E402
from memory3.memory.reading import read_distinct, sink_only  # noqa: E402
from memory3.memory.references import pack_references  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--bank", help="for the causal and own_chunk rows (its index and references)")
    p.add_argument("--data", required=True, help="held-out text (any format memory3 eval reads)")
    p.add_argument("--top-k", default="8,32,127", help="comma list, each below reference_len")
    p.add_argument("--memory-layers", help="default: the checkpoint's model.memory_layers")
    p.add_argument("--length", type=int, default=100, help="span length (below reference_len)")
    p.add_argument("--spans", type=int, default=48)
    p.add_argument("--sequences", type=int, default=64, help="held-out sequences for the eval rows")
    p.add_argument("--seq-len", type=int, help="default: the checkpoint's data.seq_len")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def span_pairs(docs, tokenizer, length: int, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """The first `length` tokens of documents of at least 2 x length, and the `length` after."""
    spans, nexts = [], []
    for doc in docs:
        ids = tokenizer.encode(doc.text)
        if len(ids) >= 2 * length:
            spans.append(ids[:length])
            nexts.append(ids[length:2 * length])
            if len(spans) == n:
                break
    return spans, nexts


@torch.no_grad()
def continuation_loss(model, spans, nexts, bos_id: int, read_span: bool) -> float:
    """Loss on each continuation's tokens 2.. ([BOS] next), every chunk reading the memory of
    the span before it (at the model's memory_top_k), or the sink alone."""
    encoder = MemoryEncoder(model)
    sink = encoder.sink_kv()
    x = torch.tensor([[bos_id, *n] for n in nexts])
    if read_span:
        tokens, lengths = pack_references(spans, ref_bos_id=encoder.ref_bos_id, pad_id=PAD_ID,
                                          reference_len=model.cfg.reference_len)
        C = -(-(x.shape[1] - 1) // model.cfg.chunk_len)
        own = np.arange(len(spans))[:, None, None].repeat(C, axis=1)      # (B, C, 1)
        memory = read_distinct(encoder.encode(tokens, lengths), own, sink)
    else:
        memory = sink_only(sink, x[:, :-1], model.cfg)
    logits = model(x[:, :-1], memory=memory).logits.float()
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")[:, 1:].mean().item()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, recipe, _ = load_model(args.checkpoint)
    model.eval()
    tok = load_tokenizer(args.checkpoint)
    if args.memory_layers:
        layers = args.memory_layers
        if layers.replace(",", "").isdigit():
            layers = [int(i) for i in layers.split(",")]
        model.cfg = dataclasses.replace(model.cfg, memory_layers=layers).validate()
    top_ks = [int(k) for k in args.top_k.split(",")]
    spans, nexts = span_pairs(iter_documents([args.data]), tok, args.length, args.spans)
    if not spans:
        sys.exit(f"--data {args.data}: no document has {2 * args.length} tokens")
    text = copy_probe(model, spans, tok.bos_id)
    next_alone = continuation_loss(model, spans, nexts, tok.bos_id, read_span=False)
    results = {"checkpoint": args.checkpoint, "spans": len(spans), "length": args.length,
               "text_copy_ratio": text["ratio"], "next_alone_loss": next_alone, "rows": {}}
    bank = seqs = None
    if args.bank:
        bank = MemoryBank.open(args.bank, verify="size")
        seqs = text_sequences([args.data], tok, args.seq_len or recipe.data.seq_len,
                              max_sequences=args.sequences)
        results["none"] = evaluate(model, tok, seqs, ["none"],
                                   reads_sink=trained_with_memory(recipe))["none"]["perplexity"]
    print(f"{len(spans)} spans of {args.length} tokens: text copy ratio {text['ratio']:.3f}; "
          f"continuation alone {next_alone:.3f} nats"
          + (f"; {len(seqs)} sequences, perplexity none {results['none']:.3f}" if bank else ""))
    print(f"{'top_k':>5} {'copy':>7} {'next':>7} {'causal':>8} {'own_chunk':>9}")
    for k in top_ks:
        model.cfg = dataclasses.replace(model.cfg, memory_top_k=k).validate()
        row = {"copy_ratio": memory_copy_probe(model, spans, tok.bos_id)["ratio"],
               "next_loss": continuation_loss(model, spans, nexts, tok.bos_id, read_span=True)}
        if bank:
            ev = evaluate(model, tok, seqs, ["memory", "memory_own_chunk"], bank=bank,
                          encode_now=True, reads_sink=True)
            row["causal"] = ev["memory"]["perplexity"]
            row["own_chunk"] = ev["memory_own_chunk"]["perplexity"]
        results["rows"][k] = row
        print(f"{k:>5} {row['copy_ratio']:>7.3f} {row['next_loss']:>7.3f} "
              f"{row.get('causal', math.nan):>8.3f} {row.get('own_chunk', math.nan):>9.3f}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
