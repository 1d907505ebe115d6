"""How much could better retrieval give this model? Memory perplexity under several retrieval rules.

One checkpoint, one bank, the same held-out sequences, the same reading (the bank's memories, or
encoded now); only the rows each chunk reads change:

  prev     what `memory3 eval` reads by default: the previous chunk's text is the query (causal).
  document the head (first chunk_len tokens) of the document under way before the chunk (causal;
           what `memory3 eval` reads for a model with model.retrieval_query = "document").
  context  the whole preceding context is the query (causal; the lexical embedder weighs the
           last words most).
  own      the chunk's own text is the query: not causal, the upper bound eval prints as
           memory_own_chunk.
  cover    an oracle, not causal: of the 50 references retrieved with the chunk's own text,
           greedily the ones holding most of the chunk's tokens that its preceding context does
           not (what a retriever that knew the next chunk would fetch).

Every rule keeps the evaluation's overlap filter (a reference copying the sequence beyond 2/3 is
skipped) and the chunk's memories_per_chunk. Beside the perplexity, `novel recall`: the share of
the chunk's tokens new to the sequence (absent from its preceding context) that the chunk's
references contain; a cheap measure of what a rule fetches, comparable across models.

If `own` and `cover` barely beat `none`, no retriever can make memory pay for this model on this
bank: reading, not retrieval, is the limit.

Perplexities are also split by where the predicted token sits: in the sequence's first chunk
(which reads nothing causally), in a document under way since an earlier chunk (which a causal
query can know about), or in a document begun inside its chunk (after its retrieval).

    python bench/retrieval_ceiling.py --checkpoint runs/cpu-continual --bank bank \
        --data heldout.jsonl --sequences 64
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory3.checkpoints import load_model, load_tokenizer  # noqa: E402
from memory3.eval.perplexity import text_sequences, trained_with_memory  # noqa: E402
from memory3.memory.bank import MemoryBank  # noqa: E402
from memory3.memory.encoder import MemoryEncoder  # noqa: E402
from memory3.memory.overlap import EVAL_OVERLAP  # noqa: E402
from memory3.memory.reading import (chunk_memories, chunk_texts, filter_overlapping,  # noqa: E402
                                    retrieve_for_chunks, sink_only)

RULES = ("prev", "document", "context", "own", "cover")
CAUSAL = ("prev", "document", "context")
COVER_CANDIDATES = 50


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint with memory layers")
    p.add_argument("--bank", required=True)
    p.add_argument("--data", required=True, help="held-out text (any format memory3 eval reads)")
    p.add_argument("--tokenizer", help="default: the checkpoint's (its recipe's data.path)")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma list of {', '.join(RULES)}")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, help="default: the checkpoint's data.seq_len")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--memories-per-chunk", type=int,
                   help="memories each chunk reads (default: the checkpoint's model config)")
    p.add_argument("--memory-top-k", type=int,
                   help="tokens a memory keeps per layer and head, as the bank was built with "
                        "(build-bank --memory-top-k), or as --encode-now encodes them "
                        "(default: the checkpoint's)")
    p.add_argument("--chunk-len", type=int,
                   help="retrieve and read memories every this many tokens instead of the "
                        "checkpoint's chunk_len (a finer retrieval stride, the same weights)")
    p.add_argument("--encode-now", action="store_true",
                   help="encode references with the checkpoint (a bank filled by other weights)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    args.rules = [r for r in args.rules.split(",") if r]
    unknown = set(args.rules) - set(RULES)
    if unknown or not args.rules:
        p.error(f"--rules: unknown {sorted(unknown)}; known: {', '.join(RULES)}")
    return args


def _cover(bank, candidates, sequence: list[int], start: int, end: int, k: int) -> list[int]:
    """Up to k candidate rows (overlap-filtered) chosen greedily to hold most of the tokens of
    sequence[start:end] that sequence[:start] lacks."""
    kept = filter_overlapping(bank, candidates, sequence, len(candidates), EVAL_OVERLAP)
    need = set(sequence[start:end]) - set(sequence[:start])
    tokens = {row: set(rec.tokens) for row, rec in zip(kept, bank.references(kept))}
    chosen = []
    while len(chosen) < k and tokens:
        row = max(tokens, key=lambda r: len(tokens[r] & need))
        if not tokens[row] & need:
            break
        chosen.append(row)
        need -= tokens.pop(row)
    return chosen


def rule_rows(rule: str, bank, tokenizer, x: torch.Tensor, chunk_len: int, k: int) -> np.ndarray:
    """Rows (B, C, k) the chunks of x (B, T) read under `rule`; -1 = none; chunk 0 reads none."""
    if rule in ("prev", "document", "own"):
        return retrieve_for_chunks(bank, tokenizer, x, chunk_len=chunk_len, k=k,
                                   overlap_threshold=EVAL_OVERLAP, own_chunk=rule == "own",
                                   query="document" if rule == "document" else "chunk")
    B, T = x.shape
    rows = np.full((B, -(-T // chunk_len), k), -1, dtype=np.int64)
    queries, where = [], []
    for b in range(B):
        tokens = x[b].tolist()
        texts = chunk_texts(tokens, tokenizer, chunk_len)
        for c in range(1, len(texts)):
            queries.append(tokenizer.decode(tokens[:c * chunk_len]) if rule == "context"
                           else texts[c])
            where.append((b, c))
    if not queries:
        return rows
    candidates, _ = bank.retrieve(queries, COVER_CANDIDATES if rule == "cover" else k + 5)
    for (b, c), cand in zip(where, candidates):
        sequence = x[b].tolist()
        kept = (_cover(bank, cand, sequence, c * chunk_len, (c + 1) * chunk_len, k)
                if rule == "cover" else
                filter_overlapping(bank, cand, sequence, k, EVAL_OVERLAP))
        rows[b, c, :len(kept)] = kept
    return rows


def novel_recall(bank, x: torch.Tensor, rows: np.ndarray, chunk_len: int) -> tuple[int, int]:
    """(tokens of each chunk c >= 1 absent from its preceding context and present in one of its
    references, tokens absent from its preceding context)."""
    hit = novel = 0
    for b in range(x.shape[0]):
        sequence = x[b].tolist()
        for c in range(1, rows.shape[1]):
            start = c * chunk_len
            before = set(sequence[:start])
            ref_tokens = set()
            for record in bank.references([r for r in rows[b, c] if r >= 0]):
                ref_tokens.update(record.tokens)
            for token in sequence[start:start + chunk_len]:
                if token not in before:
                    novel += 1
                    hit += token in ref_tokens
    return hit, novel


@torch.no_grad()
def position_classes(x: torch.Tensor, tokenizer, chunk_len: int) -> torch.Tensor:
    """(B, T) index into CLASSES of each position of x (the token it predicts follows it):
    in the sequence's first chunk; in a document under way (begun before the position's chunk);
    in a document begun inside the chunk (after its retrieval: nothing causal can know it)."""
    B, T = x.shape
    out = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        start = 0  # the current document's first position (0: it began before the sequence)
        for t, token in enumerate(x[b].tolist()):
            if token in (tokenizer.bos_id, tokenizer.eos_id):
                start = t + 1
            chunk_start = t // chunk_len * chunk_len
            out[b, t] = 0 if t < chunk_len else 1 if start < chunk_start else 2
    return out


CLASSES = ("first chunk", "document under way", "document begun in the chunk")


def measure(model, tokenizer, bank, sequences: torch.Tensor, rules: list[str], *,
            reads_sink: bool, batch_size: int, encode_now: bool) -> dict:
    cfg = model.cfg
    encoder = MemoryEncoder(model)
    sink = encoder.sink_kv() if reads_sink else None
    names = ["none", *rules]
    nll = {name: torch.zeros(len(CLASSES), dtype=torch.float64) for name in names}
    count = torch.zeros(len(CLASSES), dtype=torch.float64)
    hits = dict.fromkeys(rules, 0)
    novel = 0
    for i in range(0, len(sequences), batch_size):
        x, y = sequences[i:i + batch_size, :-1], sequences[i:i + batch_size, 1:]
        classes = position_classes(x, tokenizer, cfg.chunk_len).flatten()
        count += torch.bincount(classes, minlength=len(CLASSES))

        def loss(memory) -> torch.Tensor:
            """Summed NLL per position class."""
            logits = model(x, memory=memory).logits
            per_token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                        reduction="none")
            return torch.bincount(classes, weights=per_token.double(), minlength=len(CLASSES))

        nll["none"] += loss(None if sink is None else sink_only(sink, x, cfg))
        for rule in rules:
            rows = rule_rows(rule, bank, tokenizer, x, cfg.chunk_len, cfg.memories_per_chunk)
            nll[rule] += loss(chunk_memories(bank, rows, encoder.sink_kv(),
                                             dtype=model.embed.weight.dtype,
                                             encoder=encoder if encode_now else None))
            hit, n = novel_recall(bank, x, rows, cfg.chunk_len)
            hits[rule] += hit
        novel += n  # the same count under every rule
    tokens = sequences[:, 1:].numel()
    ppl = {name: math.exp(v.sum().item() / tokens) for name, v in nll.items()}
    return {"sequences": len(sequences), "tokens": tokens, "novel_tokens": novel,
            "classes": {c: {"share": (count[j] / tokens).item()} for j, c in enumerate(CLASSES)},
            "rows": {name: {"perplexity": ppl[name], "ratio": ppl[name] / ppl["none"],
                            "novel_recall": hits[name] / max(novel, 1) if name in hits else None,
                            "perplexity_by_class": {
                                c: math.exp(nll[name][j].item() / max(count[j].item(), 1))
                                for j, c in enumerate(CLASSES)}}
                     for name in names}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, recipe, _ = load_model(args.checkpoint)
    model.eval()
    if args.memories_per_chunk:
        model.cfg.memories_per_chunk = args.memories_per_chunk
    if args.memory_top_k and not args.encode_now:  # the bank's memories keep this many tokens
        model.cfg.memory_top_k = args.memory_top_k
    if not model.cfg.memory_layer_ids:
        sys.exit(f"{args.checkpoint}: the model has no memory layers (model.memory_layers)")
    tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
    seq_len = args.seq_len or recipe.data.seq_len
    sequences = text_sequences([args.data], tokenizer, seq_len, max_sequences=args.sequences)
    with MemoryBank.open(args.bank, verify="size") as bank:
        bank.check_model_config(model.cfg)
        if args.memory_top_k and args.encode_now:  # memories encoded now keep this many
            model.cfg.memory_top_k = args.memory_top_k
        if args.chunk_len:
            model.cfg.chunk_len = args.chunk_len
        report = measure(model, tokenizer, bank, sequences, args.rules,
                         reads_sink=trained_with_memory(recipe), batch_size=args.batch_size,
                         encode_now=args.encode_now)
    report.update(checkpoint=str(args.checkpoint), bank=str(args.bank), data=str(args.data),
                  seq_len=seq_len)
    print(f"{report['sequences']} x {seq_len} held-out tokens; {report['novel_tokens']} tokens "
          f"new to their sequence in chunks >= 1")
    print(f"{'rule':<8} {'causal':<7} {'perplexity':>10} {'x none':>7} {'novel recall':>13}")
    for name, row in report["rows"].items():
        causal = "-" if name == "none" else "yes" if name in CAUSAL else "no"
        recall = "" if row["novel_recall"] is None else f"{row['novel_recall']:.3f}"
        print(f"{name:<8} {causal:<7} {row['perplexity']:>10.3f} {row['ratio']:>7.3f} "
              f"{recall:>13}")
    print("perplexity by where the predicted token sits (share of tokens):")
    print(f"{'rule':<8} " + " ".join(f"{c} ({v['share']:.2f})".rjust(max(len(c) + 7, 12))
                                    for c, v in report["classes"].items()))
    for name, row in report["rows"].items():
        print(f"{name:<8} " + " ".join(f"{row['perplexity_by_class'][c]:.3f}".rjust(
            max(len(c) + 7, 12)) for c in report["classes"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
